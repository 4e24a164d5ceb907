"""Data worlds: how fast the synthetic H&E world renders, how learnable it is, how well its curation and
narrative steps work, and what a pretrained text tower buys for zero-shot on unseen synonyms.

    python benchmarks/data_worlds.py                  # everything; the LiT part dominates (tens of minutes on a busy 2-core CPU)
    python benchmarks/data_worlds.py --skip-lit       # speed, probe, curation and clustering only (~1 minute)
    python benchmarks/data_worlds.py --lit-only --steps 300 --n-train 1800 --log-every 50   # LiT part only

Prints tables; asserts nothing (tests do that).

1. Tiles per second at 64 px and 224 px (all nine classes in turn, single process).
2. Linear probe on raw pixels (32 px, 1,800 train / 900 test tiles from disjoint seeds; L-BFGS logistic regression
   with L2) against a mean-colour-only probe and chance (1/9): the world must be learnable but not trivial.
3. CONCH-style panel curation: detection recall / precision, caption-split accuracy, alignment accuracy with the
   prototype similarity and with a random one.
4. Cursor-trace clustering: region recall, cluster precision, purity, ARI over narrated slides.
5. LiT vs from scratch: the same ViT image tower trained contrastively for the same steps on 32 px tiles whose
   captions use only TRAIN_SYNONYMS, (a) against the locked all-MiniLM-L6-v2 text tower (``vlm_lab.models.lit``)
   and (b) against CLIP's text transformer trained from scratch with a WordPiece vocabulary learned from the
   training captions; zero-shot top-1 on held-out tiles with prompts built from the training synonyms and from
   UNSEEN_SYNONYMS (x PROMPT_TEMPLATES, prompt-ensembled).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vlm_lab.data import pathology as P  # noqa: E402


def tiles_per_second(size: int, seconds: float = 3.0) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        P.render_tile(P.CLASSES[n % 9], size, seed=n)
        n += 1
    return n / (time.perf_counter() - t0)


def load(n: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    ds = P.PathologyTiles(n, size=size, seed=seed, caption_variants=3)
    items = [ds[i] for i in range(n)]
    return (torch.stack([it["pixel_values"] for it in items]), torch.tensor([it["labels"] for it in items]),
            [it["caption"] for it in items])


def linear_probe(xtr, ytr, xte, yte, wd: float = 1e-2) -> tuple[float, float]:
    xtr, xte = xtr.flatten(1), xte.flatten(1)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    w = torch.zeros(xtr.shape[1], 9, requires_grad=True)
    b = torch.zeros(9, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, ytr) + wd * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (float(((xtr @ w + b).argmax(1) == ytr).float().mean()),
                float(((xte @ w + b).argmax(1) == yte).float().mean()))


def table(title: str, rows: list[tuple]) -> None:
    print(f"\n## {title}")
    for r in rows:
        print("  " + " | ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in r))


def lit_vs_scratch(steps: int, n_train: int, n_test: int, seed: int = 0, log_every: int = 0) -> list[tuple]:
    from vlm_lab.data.collate import ImageTextCollator
    from vlm_lab.data.tokenizers import train_wordpiece
    from vlm_lab.eval.zero_shot import zero_shot_classifier
    from vlm_lab.models.clip import CLIP, CLIPConfig
    from vlm_lab.models.lit import LiT, LiTConfig
    from vlm_lab.train import PrintLogger, TrainConfig, fit

    cbs = [PrintLogger(every=log_every)] if log_every else []

    train = P.PathologyTiles(n_train, size=32, seed=seed, caption_variants=3, cache=True)
    t0 = time.perf_counter()
    caps = [train[i]["caption"] for i in range(len(train))]  # renders and caches every tile once
    xte, yte, _ = load(n_test, seed + 1, 32)
    render_s = time.perf_counter() - t0
    prompt_sets = {"train synonyms": {c: list(P.TRAIN_SYNONYMS[c]) for c in P.CLASSES},
                   "unseen synonyms": {c: list(P.UNSEEN_SYNONYMS[c]) for c in P.CLASSES}}

    def zero_shot(model, tok) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            img = torch.cat([model.encode_image(c) for c in xte.split(256)])
            out = {}
            for name, syn in prompt_sets.items():
                w = zero_shot_classifier(model, tok, syn, P.PROMPT_TEMPLATES)
                out[name] = float(((img @ w.T).argmax(1) == yte).float().mean())
        return out

    rows = []
    # (a) LiT: locked MiniLM text tower
    torch.manual_seed(seed)
    lit = LiT(LiTConfig.toy())
    collate = ImageTextCollator(lit.tokenizer, max_length=lit.config.text_max_length)
    t0 = time.perf_counter()
    res = fit(lit, train, TrainConfig(steps=steps, batch_size=64, lr=1e-3, warmup_steps=steps // 10,
                                      collate_fn=collate, progress=False, precision="fp32", seed=seed),
              callbacks=cbs)
    zs = zero_shot(lit, lit.tokenizer)
    n_tr = sum(p.numel() for p in lit.parameters() if p.requires_grad)
    rows.append(("LiT (locked MiniLM)", f"{n_tr / 1e6:.2f}M trainable", res.final_loss, zs["train synonyms"],
                 zs["unseen synonyms"], f"{time.perf_counter() - t0:.0f}s"))
    # (b) the same image tower with CLIP's text transformer from scratch, WordPiece learned on the captions
    tok = train_wordpiece(caps, vocab_size=600, model_max_length=64)
    torch.manual_seed(seed)
    clip = CLIP(CLIPConfig.toy(vocab_size=len(tok), context_length=64, eot_token_id=tok.sep_token_id))
    collate = ImageTextCollator(tok, max_length=64)
    t0 = time.perf_counter()
    res = fit(clip, train, TrainConfig(steps=steps, batch_size=64, lr=1e-3, warmup_steps=steps // 10,
                                       collate_fn=collate, progress=False, precision="fp32", seed=seed),
              callbacks=cbs)
    zs = zero_shot(clip, tok)
    n_tr = sum(p.numel() for p in clip.parameters() if p.requires_grad)
    rows.append(("CLIP text tower from scratch", f"{n_tr / 1e6:.2f}M trainable", res.final_loss,
                 zs["train synonyms"], zs["unseen synonyms"], f"{time.perf_counter() - t0:.0f}s"))
    rows.append(("chance", "", "", 1 / 9, 1 / 9, f"(tiles rendered in {render_s:.0f}s)"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-lit", action="store_true", help="skip the LiT vs from-scratch training")
    ap.add_argument("--lit-only", action="store_true", help="only the LiT vs from-scratch training")
    ap.add_argument("--log-every", type=int, default=0, help="print the training loss every N steps (0: never)")
    ap.add_argument("--steps", type=int, default=400, help="training steps for each of LiT and CLIP")
    ap.add_argument("--n-train", type=int, default=2700, help="training tiles for LiT / CLIP")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.lit_only:
        return lit_table(args)
    table("Tile rendering (tiles/s, one process)", [("size", "tiles/s")] +
          [(f"{s} px", tiles_per_second(s)) for s in (64, 224)])

    xtr, ytr, _ = load(1800, 0, 32)
    xte, yte, _ = load(900, 1, 32)
    tr, te = linear_probe(xtr, ytr, xte, yte)
    ctr, cte = linear_probe(xtr.mean((2, 3)), ytr, xte.mean((2, 3)), yte, wd=1e-4)
    table("Nine-class linear probe, 32 px (train 1800 / test 900, disjoint seeds)",
          [("features", "train acc", "test acc"), ("raw pixels", tr, te), ("mean colour only", ctr, cte),
           ("chance", 1 / 9, 1 / 9)])

    panels = [P.make_panel(10_000 + i) for i in range(60)]
    good = P.evaluate_curation(panels)
    rng = np.random.default_rng(0)
    rand = P.evaluate_curation(panels, similarity=lambda a, b: rng.random((len(a), len(b))))
    table("Panel curation (60 synthetic figures, 2-6 sub-images)",
          [("similarity", "det. recall", "det. precision", "split acc", "align acc", "chance"),
           ("prototype", good["detection_recall"], good["detection_precision"], good["split_accuracy"],
            good["alignment_accuracy"], good["chance"]),
           ("random", rand["detection_recall"], rand["detection_precision"], rand["split_accuracy"],
            rand["alignment_accuracy"], rand["chance"])])

    ns = P.make_narrated_slides(24, seed=5)
    ag = [P.cluster_agreement(n.slide, n.narrative, n.clusters) for n in ns]
    keys = ("region_recall", "cluster_precision", "purity", "ari")
    table("Cursor-trace clustering (24 narrated slides, DBSCAN eps 20 px / 1 s, min 5)",
          [keys, tuple(float(np.mean([a[k] for a in ag])) for k in keys)])
    qa = P.generate_qa(ns)
    table("Instruction data from those slides", [("independent Q/A", "reasoning Q/A"),
                                                 (sum(q.kind == "independent" for q in qa),
                                                  sum(q.kind == "reasoning" for q in qa))])

    if not args.skip_lit:
        lit_table(args)


def lit_table(args) -> None:
    rows = lit_vs_scratch(args.steps, args.n_train, 900, log_every=args.log_every)
    table(f"Zero-shot top-1 on 900 held-out 32 px tiles after {args.steps} steps x 64 (prompt ensembles: "
          f"synonyms x {len(P.PROMPT_TEMPLATES)} templates)",
          [("model", "params", "final loss", "train synonyms", "unseen synonyms", "time")] + rows)


if __name__ == "__main__":
    main()
