"""Toy-scale figures for chapters 04 and 06: momentum distillation on noisy captions (ALBEF) and CapFilt (BLIP).

Prints tables; no timed asserts. Both experiments use the 32 px shapes world and the toy presets:

* ``distillation``: 25 % (``--wrong``) of the training captions replaced by another scene's caption; ALBEF trained twice from
  the same seed for the same steps, alpha = 0 (one-hot ITC / MLM targets) vs alpha = 0.4 (momentum distillation);
  retrieval on 128 clean unseen scenes.
* ``capfilt``: a "web" set (40 % wrong captions, 10 % vague ones) and a small clean "human" set; BLIP pre-trained on
  web + human; CapFilt (filter + captioner fine-tuned on human, web captions and nucleus-sampled synthetic captions
  filtered) builds the bootstrapped set; the pre-trained model is then trained further for the same number of steps
  on (a) web + human and (b) the bootstrapped set, and both are evaluated on clean unseen scenes.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/capfilt_and_distillation.py capfilt --steps 300
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/capfilt_and_distillation.py distillation --steps 300
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.utils.data import ConcatDataset

from vlm_lab.data.collate import ImageTextCollator
from vlm_lab.data.shapes import ShapesDataset
from vlm_lab.data.tokenizers import shapes_tokenizer
from vlm_lab.eval import retrieval_metrics
from vlm_lab.eval.captioning import caption_scores
from vlm_lab.models.albef import ALBEF, ALBEFConfig
from vlm_lab.models.blip import BLIP, BLIPConfig
from vlm_lab.train import TrainConfig, fit
from vlm_lab.train.capfilt import ItemList, NoisyCaptions, capfilt


def evaluate(model, tok, collate, n=128, seed=999, captions=False) -> dict[str, float]:
    gal = ShapesDataset("train", n=n, seed=seed, image_size=32)
    g = collate([gal[i] for i in range(n)])
    model.eval()
    with torch.no_grad():
        sim, s_i2t, s_t2i = model.retrieval_scores(g["pixel_values"], g["input_ids"], g["attention_mask"], k=8)
    itc, rr = retrieval_metrics(sim, list(range(n))), retrieval_metrics(s_i2t, list(range(n)))
    out = {"ITC r_mean": itc["r_mean"], "ITC i2t R@1": itc["i2t_R@1"], "re-ranked i2t R@1": rr["i2t_R@1"]}
    if captions:
        ids = model.generate(g["pixel_values"], max_new_tokens=16)
        caps = tok.batch_decode(ids, skip_special_tokens=True)
        s = caption_scores(caps, [[c] for c in g["caption"]])
        out.update({"BLEU-4": 100 * s["BLEU-4"], "CIDEr-D": 100 * s["CIDEr-D"]})
    return out


def cfg(steps, collate, bs=64, lr=2e-3, seed=0):
    return TrainConfig(steps=steps, batch_size=bs, lr=lr, warmup_steps=min(20, steps // 5), precision="fp32",
                       collate_fn=collate, seed=seed, device="cpu", progress=False, log_every=10**6)


def table(rows: dict[str, dict[str, float]]) -> None:
    keys = list(next(iter(rows.values())))
    print(f"{'':28}" + "".join(f"{k:>20}" for k in keys))
    for name, r in rows.items():
        print(f"{name:28}" + "".join(f"{r[k]:>20.1f}" for k in keys))


def distillation(args, tok, collate) -> None:
    noisy = NoisyCaptions(ShapesDataset("train", n=8192, seed=0, image_size=32), wrong=args.wrong, seed=0)
    rows = {}
    for alpha in args.alphas:
        torch.manual_seed(args.seed)
        m = ALBEF(ALBEFConfig.toy(alpha=alpha, alpha_warmup_steps=args.steps // 2))
        fit(m, noisy, cfg(args.steps, collate, seed=args.seed))
        rows[f"alpha = {alpha}"] = evaluate(m, tok, collate)
    table(rows)


def run_capfilt(args, tok, collate) -> None:
    t0 = time.time()
    web = NoisyCaptions(ShapesDataset("train", n=8192, seed=0, image_size=32), wrong=0.4, vague=0.1, seed=0)
    human = ShapesDataset("train", n=512, seed=5, image_size=32)
    noisy_all = ConcatDataset([web, human])
    torch.manual_seed(args.seed)
    base = BLIP(BLIPConfig.toy(use_momentum=False))
    fit(base, noisy_all, cfg(args.steps, collate, seed=args.seed))
    rows = {"pre-trained on web + human": evaluate(base, tok, collate, captions=True)}
    web_sub = torch.utils.data.Subset(web, range(args.web_images))
    res = capfilt(base, web_sub, human, tok, collate, cfg(args.finetune_steps, collate, bs=32, lr=1e-3))
    print(f"CapFilt: kept {res.kept_web}/{res.n_web} web captions, {res.kept_synthetic}/{res.n_web} synthetic; "
          f"{res.stats}")
    boot = ItemList(res.items)
    for name, data in (("+ more web + human", noisy_all), ("+ bootstrapped (CapFilt)", boot)):
        m = copy.deepcopy(base)
        fit(m, data, cfg(args.steps, collate, seed=args.seed + 1))
        rows[name] = evaluate(m, tok, collate, captions=True)
    table(rows)
    print(f"({time.time() - t0:.0f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=["distillation", "capfilt"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--finetune-steps", type=int, default=60)
    ap.add_argument("--web-images", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wrong", type=float, default=0.25, help="distillation: share of wrong captions")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.4], help="distillation: alphas to compare")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = shapes_tokenizer()
    collate = ImageTextCollator(tok, max_length=32)
    (distillation if args.experiment == "distillation" else run_capfilt)(args, tok, collate)


if __name__ == "__main__":
    main()
