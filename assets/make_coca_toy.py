"""Pre-train the toy CoCa of chapter 08 on synthetic H&E tiles and write ``<out>/model.safetensors`` + ``card.json``.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python assets/make_coca_toy.py assets/coca-toy   # ~5 min, 1 core

The tokenizer is not stored: ``vlm_lab.train.conch.pathology_tokenizer()`` rebuilds it deterministically.
Load with ``vlm_lab.train.checkpoint.load_model("assets/coca-toy/model.safetensors")``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from vlm_lab.train import fit
from vlm_lab.train.checkpoint import save_checkpoint
from vlm_lab.train.conch import TOY_TRAIN, CoCaRecipe, build_toy

STEPS = 1500


def main(out: str) -> None:
    torch.manual_seed(0)
    t0 = time.time()
    model, train_set, collate_fn, tokenizer = build_toy("toy", seed=TOY_TRAIN["seed"])
    recipe = CoCaRecipe.toy(warmup_steps=50)
    config = recipe.train_config(steps=STEPS, collate_fn=collate_fn, device="cpu", progress=False,
                                 checkpoint_every=None, seed=0)
    result = fit(model, train_set, config)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    save_checkpoint(out_dir / "model.safetensors", model, model_name="coca")
    last = result.history[-50:]
    card = {
        "model": "coca", "preset": "toy", "config": model.config.__dict__,
        "data": {"world": "vlm_lab.data.pathology.PathologyTiles", **TOY_TRAIN},
        "tokenizer": "vlm_lab.train.conch.pathology_tokenizer()",
        "training": {"steps": STEPS, "batch_size": config.batch_size, "lr": config.lr,
                     "warmup_steps": config.warmup_steps, "seed": 0, "seconds": round(time.time() - t0, 1),
                     "loss_first": result.history[0]["loss"],
                     "loss_last50": sum(r["loss"] for r in last) / len(last),
                     "loss_caption_last50": sum(r["loss_caption"] for r in last) / len(last),
                     "loss_contrastive_last50": sum(r["loss_contrastive"] for r in last) / len(last)},
        "command": "HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python assets/make_coca_toy.py assets/coca-toy",
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "assets/coca-toy")
