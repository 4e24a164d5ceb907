"""Train the toy CLIP of chapter 02 on the shapes world and write ``<out>/model.safetensors`` + ``card.json``.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python assets/make_clip_toy.py assets/clip-toy   # ~1-2 min, 1 core

The same run as ``vlm-lab train clip --preset toy`` (recipe ``vlm_lab.train.recipes.RECIPES["clip"]``: 1,000 steps
of 64 shapes-world pairs, seed 0), without the intermediate step checkpoints. The tokenizer is not stored:
``vlm_lab.data.tokenizers.shapes_tokenizer(model_max_length=32)`` rebuilds it deterministically. The card records
the zero-shot top-1 accuracy on the held-out colour-shape compositions (what ``vlm-lab eval clip`` prints);
``tests/test_assets.py`` reloads the checkpoint and checks that number again.
Load with ``vlm_lab.train.checkpoint.load_model("assets/clip-toy/model.safetensors")``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from vlm_lab.train import fit
from vlm_lab.train.checkpoint import save_checkpoint
from vlm_lab.train.recipes import _CLIP_TOY, get_recipe

SEED = 0


def main(out: str) -> None:
    torch.manual_seed(SEED)
    t0 = time.time()
    recipe = get_recipe("clip")
    model, train_set, collate_fn, tokenizer = recipe.build("toy", seed=SEED)
    config = recipe.train_config("toy", collate_fn=collate_fn, device="cpu", progress=False, checkpoint_every=None,
                                 out_dir=None, seed=SEED)
    result = fit(model, train_set, config)
    seconds = round(time.time() - t0, 1)
    model.eval()
    metrics = recipe.evaluate(model, tokenizer, "toy")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out_dir / "model.safetensors", model, model_name="clip", state={"preset": "toy", "seed": SEED})
    last = result.history[-50:]
    card = {
        "model": "clip", "preset": "toy", "config": json.loads(json.dumps(model.config.__dict__, default=str)),
        "data": {"world": "vlm_lab.data.shapes.ShapesDataset('train')", "n_train": _CLIP_TOY["n_train"],
                 "image_size": model.config.image_size, "seed": SEED,
                 "eval": f"ShapesDataset('heldout', n={_CLIP_TOY['n_eval']}, seed={_CLIP_TOY['eval_seed']})"},
        "tokenizer": "vlm_lab.data.tokenizers.shapes_tokenizer(model_max_length=32)",
        "training": {"steps": config.steps, "batch_size": config.batch_size, "lr": config.lr,
                     "warmup_steps": config.warmup_steps, "seed": SEED, "seconds": seconds, "threads": torch.get_num_threads(),
                     "loss_first": result.history[0]["loss"],
                     "loss_last50": sum(r["loss"] for r in last) / len(last)},
        "metrics": metrics,
        "tolerance": 0.02,
        "command": "HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python assets/make_clip_toy.py assets/clip-toy",
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "assets/clip-toy")
