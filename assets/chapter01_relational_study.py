"""Chapter 01's relational study: when does late fusion fall short of cross-attention on spatial questions?

    HF_HUB_OFFLINE=1 TQDM_DISABLE=1 .venv/bin/python assets/chapter01_relational_study.py TASK MODEL [MODEL ...] \
        [--seeds 0 1 2] [--steps N]

TASK is one of

* ``where2``   -- the relational questions of ``vlm_lab.data.questions`` ("where is the red shape from the blue
  shape?" -> left / right / above / below) on the shapes world's two-shape scenes; 4,000 steps by default.
* ``where4``   -- the same question on crowded scenes: four shapes of four different colours, two of them named;
  8,000 steps by default.
* ``compare3`` -- "red or blue : what colour is on the left?" (or right / top / bottom) on three-shape scenes: the
  answer is one of the two named colours (text alone gives 0.5), and the unnamed third shape is a distractor, so
  "the leftmost shape in the picture" is not the answer a third of the time; 8,000 steps by default.

``--image-tower dual_contrastive`` starts the ViT of the intermediate and late models from the ITC-pretrained toy
image encoder of ``make_chapter01.py dual contrastive`` (as ALBEF and BLIP start from pretrained towers; records are
then named ``<task>-itc_<model>_seed<k>.json``).

MODEL is ``early``, ``intermediate``, ``late`` or ``late_product`` (``FusionConfig.toy()``, the models and recipe of
``make_chapter01.py fusion_rel``: AdamW lr 1e-3, batch 64 fresh questions per step, one CPU thread). Every run
records the accuracy on 400 new questions of its task every 500 steps and writes
``assets/chapter01/study/<task>_<model>_seed<k>.json``; notebook 01 (section 3b) plots them. Crowded scenes are
drawn with the shapes world's renderer, one shape at a time on the plain black background, and composited with a
pixel-wise maximum (shapes never overlap), so they look exactly like the world's own scenes.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vlm_lab.data import shapes_tokenizer
from vlm_lab.data.questions import ANSWER_TO_ID, QUESTION_TYPES, QACollator, ShapesQADataset
from vlm_lab.data.shapes import COLOURS, SHAPES, Scene, ShapeSpec, render
from vlm_lab.data.transforms import to_tensor
from vlm_lab.eval.vqa import vqa_accuracy
from vlm_lab.models.fusion import EarlyFusion, FusionConfig, IntermediateFusion, LateFusion
from vlm_lab.train import TrainConfig, fit

OUT = Path(__file__).resolve().parent / "chapter01" / "study"
IMAGE_SIZE = 32
TASKS = {"where2": 4000, "where4": 8000, "compare3": 8000}  # default steps per task
TEXT_ONLY = {"where2": 0.25, "where4": 0.25, "compare3": 0.5}  # the best a model that ignores the image can do
RECIPE = dict(batch_size=64, lr=1e-3, warmup_steps=200, weight_decay=0.05, grad_clip=1.0)
EVAL_EVERY, N_EVAL = 500, 400
_DIRECTION = {"left of": "left", "right of": "right", "above": "above", "below": "below"}


def crowded_scene(rng: np.random.Generator, k: int, size: int = IMAGE_SIZE) -> list[ShapeSpec] | None:
    """``k`` small shapes of ``k`` different colours at non-overlapping random places (None: no room, draw again)."""
    colours = rng.choice(len(COLOURS), size=k, replace=False)
    specs: list[ShapeSpec] = []
    for c in colours:
        r = (0.09 + 0.04 * rng.random()) * size
        for _ in range(200):
            x, y = r + rng.random() * (size - 1 - 2 * r), r + rng.random() * (size - 1 - 2 * r)
            if all(math.hypot(x - s.x, y - s.y) >= r + s.radius + 1.5 for s in specs):
                break
        else:
            return None
        specs.append(ShapeSpec(shape=SHAPES[int(rng.integers(len(SHAPES)))], colour=COLOURS[int(c)], size="small",
                               radius=r, x=x, y=y))
    return specs


def draw(specs: list[ShapeSpec], size: int = IMAGE_SIZE) -> np.ndarray:
    """Render each shape alone on black and keep the brightest value per pixel: ``(size, size, 3)`` uint8."""
    return np.maximum.reduce([render(Scene(shapes=(s,), image_size=size)) for s in specs])


def crowded_question(task: str, seed: int, index: int) -> tuple[list[ShapeSpec], str, str]:
    """Scene, question and answer of item ``index`` of a crowded task (a pure function of its arguments)."""
    rng = np.random.default_rng([seed, index, 1729])
    while True:
        specs = crowded_scene(rng, 4 if task == "where4" else 3)
        if specs is None:
            continue
        a, b = (int(i) for i in rng.choice(len(specs), size=2, replace=False))
        dx, dy = specs[b].x - specs[a].x, specs[b].y - specs[a].y
        if task == "where4":
            if abs(abs(dx) - abs(dy)) < 2.0:  # the dominant axis must be clear
                continue
            relation = Scene(shapes=(specs[a], specs[b]), image_size=IMAGE_SIZE).relation(0, 1)
            return specs, f"where is the {specs[a].colour} shape from the {specs[b].colour} shape?", _DIRECTION[relation]
        axis, high = int(rng.integers(2)), bool(rng.integers(2))  # x or y; the larger or the smaller coordinate
        if abs((dx, dy)[axis]) < 2.0:
            continue
        word = (("left", "right"), ("top", "bottom"))[axis][int(high)]
        coord = [(s.x, s.y)[axis] for s in specs]
        pick = a if (coord[a] > coord[b]) == high else b
        return specs, f"{specs[a].colour} or {specs[b].colour} : what colour is on the {word}?", specs[pick].colour


class CrowdedQA(Dataset):
    """Items in the layout of ``ShapesQADataset`` (so ``QACollator`` and ``vqa_accuracy`` work unchanged)."""

    def __init__(self, task: str, n: int, seed: int) -> None:
        self.task, self.n, self.seed = task, n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        specs, question, answer = crowded_question(self.task, self.seed, index)
        return {"pixel_values": to_tensor(draw(specs)), "question": question, "caption": question, "answer": answer,
                "labels": ANSWER_TO_ID[answer], "qtype": "relational", "qtype_id": QUESTION_TYPES.index("relational")}


def dataset(task: str, n: int, seed: int) -> Dataset:
    if task == "where2":
        return ShapesQADataset("train", n=n, seed=seed, image_size=IMAGE_SIZE, types=("relational",))
    return CrowdedQA(task, n, seed)


def build(model: str, vocab_size: int) -> torch.nn.Module:
    config = FusionConfig.toy(vocab_size=vocab_size, image_size=IMAGE_SIZE,
                              combine="product" if model == "late_product" else "concat")
    return {"early": EarlyFusion, "intermediate": IntermediateFusion, "late": LateFusion,
            "late_product": LateFusion}[model](config)


def run(task: str, model_name: str, seed: int, steps: int, image_tower: str | None = None) -> dict:
    torch.set_num_threads(1)
    tok = shapes_tokenizer()
    collate = QACollator(tok, max_length=16)
    test = dataset(task, N_EVAL, seed=1)
    test_batches = [collate([test[i] for i in range(s, s + 200)]) for s in range(0, N_EVAL, 200)]
    torch.manual_seed(seed)
    model = build(model_name, len(tok))
    if image_tower:
        if model_name == "early":
            raise SystemExit("--image-tower: early fusion has no separate image tower to start from a checkpoint")
        from vlm_lab.train.checkpoint import load_model

        model.vision.load_state_dict(load_model(OUT.parent / f"{image_tower}.safetensors").vision.state_dict())
    curve: list[float] = []

    def eval_fn(m):
        acc = vqa_accuracy(m, test_batches, QUESTION_TYPES)["relational"]
        curve.append(round(acc, 4))
        return {"relational": acc}

    t0 = time.time()
    fit(model, dataset(task, 64 * steps, seed=0), TrainConfig(steps=steps, seed=seed, **RECIPE, collate_fn=collate,
        precision="fp32", device="cpu", progress=False, shuffle=False, eval_every=EVAL_EVERY), eval_fn=eval_fn)
    tower = f" --image-tower {image_tower}" if image_tower else ""
    return {"task": task, "model": model_name, "seed": seed, "steps": steps, "recipe": RECIPE,
            "image_tower": image_tower or "random init",
            "eval": f"{N_EVAL} new questions of the task (data seed 1), every {EVAL_EVERY} steps",
            "text_only": TEXT_ONLY[task], "eval_steps": list(range(EVAL_EVERY, steps + 1, EVAL_EVERY)),
            "curve": curve, "final": curve[-1], "train_seconds": round(time.time() - t0, 1),
            "parameters": sum(p.numel() for p in model.parameters()), "threads": 1,
            "command": f"HF_HUB_OFFLINE=1 TQDM_DISABLE=1 .venv/bin/python assets/chapter01_relational_study.py "
                       f"{task} {model_name} --seeds {seed} --steps {steps}{tower}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("models", nargs="+", choices=["early", "intermediate", "late", "late_product"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=None, help="training steps (default: per task)")
    p.add_argument("--image-tower", choices=["dual_contrastive", "dual_matching"], default=None,
                   help="start the ViT of intermediate / late fusion from this chapter-01 checkpoint")
    args = p.parse_args()
    steps = args.steps or TASKS[args.task]
    if steps < EVAL_EVERY or steps % EVAL_EVERY:
        p.error(f"--steps: expected a positive multiple of {EVAL_EVERY}, got {steps}")
    OUT.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for name in args.models:
            rec = run(args.task, name, seed, steps, args.image_tower)
            tag = f"{args.task}-itc" if args.image_tower == "dual_contrastive" else \
                f"{args.task}-itm" if args.image_tower else args.task
            (OUT / f"{tag}_{name}_seed{seed}.json").write_text(json.dumps(rec, indent=1))
            print(args.task, name, seed, rec["train_seconds"], rec["curve"], flush=True)


if __name__ == "__main__":
    main()
