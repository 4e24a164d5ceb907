"""Regenerate the toy Quilt-LLaVA checkpoints of chapter 09: ``assets/llava-toy/``.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python assets/make_llava_toy.py assets/llava-toy     # a few minutes, 1 core

1. Tokenizer: byte-level BPE (1024) on the synthetic world's text (``vlm_lab.train.llava.llava_tokenizer``).
2. The toy "Vicuna": ``LLaVAConfig.toy().lm`` (OPT, width 64, 2 layers) pre-trained text-only on the world's
   captions and Q/A written in the conversation template, images removed (``--lm-steps``).
3. Stage 1: the toy CoCa image tower (frozen) + projector (trained) + that LM (frozen) on caption Q/A
   (``--stage1-steps``, lr 1e-3 as LLaVA).
4. Stage 2: projector + LM on instruction data from *training* slides (``--stage2-steps``).
5. Blind baseline: the pre-trained LM tuned on the same stage-2 conversations without images (same steps).
6. Evaluation on Quilt-VQA-style items from *held-out* slides (closed accuracy, open recall), written to
   ``card.json`` with the times; ``--eval-only`` re-evaluates saved checkpoints (``--eval-seed`` for other
   held-out slides).

Writes ``stage1.safetensors``, ``stage2.safetensors``, ``blind.safetensors`` (lab checkpoints, registry name
"llava"), ``tokenizer/`` and ``card.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vlm_lab.data import pathology as P
from vlm_lab.train import TrainConfig, fit, save_checkpoint
from vlm_lab.train import llava as L


def train(model, items, steps, lr, batch_size, seed, collate):
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.0, warmup_steps=max(steps // 20, 1),
                      collate_fn=collate, device="cpu", precision="fp32", checkpoint_every=None, seed=seed,
                      progress=False, grad_clip=1.0)
    res = fit(model, L.ConversationDataset(items), cfg)
    losses = [h["loss"] for h in res.history]
    return {"steps": steps, "lr": lr, "batch_size": batch_size, "loss_first": losses[0],
            "loss_last20": sum(losses[-20:]) / len(losses[-20:])}


def evaluate(models, tok, seed, n_slides):
    ev = P.make_narrated_slides(n_slides, seed=seed + 1_000_003, prefix="eval", **L.SLIDE_KWARGS)
    samples = L.vqa_samples(ev, P.make_vqa_eval(ev, seed=seed))
    out = {}
    for name, (m, use) in models.items():
        s, _ = L.evaluate_vqa(m, tok, samples, use_images=use)
        out[name] = {k: round(v, 4) for k, v in s.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train-slides", type=int, default=40)
    ap.add_argument("--n-eval-slides", type=int, default=40)
    ap.add_argument("--n-tiles", type=int, default=900)
    ap.add_argument("--lm-steps", type=int, default=600)
    ap.add_argument("--stage1-steps", type=int, default=300)
    ap.add_argument("--stage2-steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--eval-seed", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out_dir)
    t0 = time.perf_counter()
    if args.eval_only:
        models = {n: L.load_toy(n, out) for n in ("stage1", "stage2", "blind")}
        tok = models["stage2"][1]
        seed = args.seed if args.eval_seed is None else args.eval_seed
        res = evaluate({"stage1": (models["stage1"][0], True), "stage2": (models["stage2"][0], True),
                        "blind": (models["blind"][0], False),
                        "stage2_no_image": (models["stage2"][0], False)}, tok, seed, args.n_eval_slides)
        print(json.dumps({"eval_seed": seed, **res, "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
        return
    torch.manual_seed(args.seed)
    tok = L.llava_tokenizer(args.seed)
    collate = L.LLaVACollator(tok.pad_token_id)
    slides = P.make_narrated_slides(args.n_train_slides, seed=args.seed, prefix="train", **L.SLIDE_KWARGS)
    s1 = L.stage1_samples(2000, seed=args.seed + 1)
    s2 = L.stage2_samples(slides, seed=args.seed, n_tiles=args.n_tiles)
    e1, e2, e2b = (L.encode_samples(x, tok) for x in (s1, s2, L.blind(s2)))
    times = {"data": round(time.perf_counter() - t0, 1)}
    card: dict = {"seed": args.seed, "data": {"stage1": len(s1), "stage2": len(s2), "train_slides": len(slides),
                                              "tiles": args.n_tiles}}

    t = time.perf_counter()  # 2. the toy "Vicuna": text only
    lm_model = L.build_toy_llava(tok)
    lm_model.configure_stage(2)
    card["lm"] = train(lm_model, L.encode_samples(L.blind(s1), tok) + e2b, args.lm_steps, 3e-3, 32, args.seed,
                       collate)
    lm_state = {k: v.clone() for k, v in lm_model.language_model.state_dict().items()}
    times["lm"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()  # 3. stage 1
    m = L.build_toy_llava(tok, lm_state).configure_stage(1)
    card["stage1"] = train(m, e1, args.stage1_steps, 1e-3, args.batch_size, args.seed, collate)
    stage1 = {k: v.clone() for k, v in m.state_dict().items()}
    times["stage1"] = round(time.perf_counter() - t, 1)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "stage1.safetensors", m)

    t = time.perf_counter()  # 4. stage 2
    m.configure_stage(2)
    card["stage2"] = train(m, e2, args.stage2_steps, 1e-3, args.batch_size, args.seed, collate)
    times["stage2"] = round(time.perf_counter() - t, 1)
    save_checkpoint(out / "stage2.safetensors", m)

    t = time.perf_counter()  # 5. blind baseline
    b = L.build_toy_llava(tok, lm_state).configure_stage(2)
    card["blind"] = train(b, e2b, args.stage2_steps, 1e-3, args.batch_size, args.seed, collate)
    times["blind"] = round(time.perf_counter() - t, 1)
    save_checkpoint(out / "blind.safetensors", b)
    tok.save_pretrained(str(out / "tokenizer"))

    t = time.perf_counter()
    s1m = L.build_toy_llava(tok)
    s1m.load_state_dict(stage1)
    card["eval"] = evaluate({"stage1": (s1m.eval(), True), "stage2": (m.eval(), True), "blind": (b.eval(), False)},
                            tok, args.seed, args.n_eval_slides)
    times["eval"] = round(time.perf_counter() - t, 1)
    times["total"] = round(time.perf_counter() - t0, 1)
    card["seconds"] = times
    card["command"] = "python assets/make_llava_toy.py " + str(out) + f" --seed {args.seed}"
    (out / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    print(json.dumps(card, indent=1))


if __name__ == "__main__":
    main()
