"""Recipes: what `vlm-lab train MODEL` and `vlm-lab eval MODEL` need besides the model itself.

A recipe pairs a registry model (`vlm_lab.models.registry`) with its data world, tokenizer, training settings and
evaluation, per preset. It lives in `train/` because it uses both `models` and `data` (DESIGN.md layering).

    recipe = get_recipe("clip")
    model, train_set, collate_fn, tokenizer = recipe.build("toy", seed=0)
    config = recipe.train_config("toy", out_dir="runs/clip-toy", collate_fn=collate_fn)
    fit(model, train_set, config)
    recipe.evaluate(model, tokenizer)      # {"zero_shot_top1_heldout": ...}

Presets in this release: `clip/toy` (the shapes world, a locally trained WordPiece tokenizer, `CLIPConfig.toy()`,
evaluated by zero-shot accuracy on the colour-shape compositions held out from training).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["Recipe", "RECIPES", "get_recipe"]


@dataclass
class Recipe:
    """How to build, train and evaluate one model from the command line."""

    name: str                                   # registry name, e.g. "clip"
    presets: tuple[str, ...]                    # presets the recipe supports in this release
    build_fn: Callable[..., tuple]              # (preset, **overrides) -> (model, train_set, collate_fn, tokenizer)
    evaluate_fn: Callable[..., dict[str, float]]  # (model, tokenizer) -> metric name -> value
    train_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)  # preset -> TrainConfig field values

    def _check_preset(self, preset: str) -> None:
        if preset not in self.presets:
            raise ValueError(f"preset: {self.name} has no preset {preset!r}; expected one of {self.presets}")

    def build(self, preset: str = "toy", **overrides: Any) -> tuple:
        """Return `(model, train_dataset, collate_fn, tokenizer)` for `preset`."""
        self._check_preset(preset)
        return self.build_fn(preset, **overrides)

    def train_config(self, preset: str = "toy", **overrides: Any):
        """A `vlm_lab.train.TrainConfig` with the preset's defaults; `None` overrides are ignored.

        Override names are the CLI's (`steps`, `batch_size`, `seed`, `out_dir`, `resume`, `collate_fn`); each is
        mapped onto the first matching `TrainConfig` field among a few usual spellings.
        """
        from vlm_lab.train import TrainConfig

        self._check_preset(preset)
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        values: dict[str, Any] = {}
        requested = {**self.train_defaults.get(preset, {}), **{k: v for k, v in overrides.items() if v is not None}}
        for key, value in requested.items():
            target = next((n for n in _FIELD_ALIASES.get(key, (key,)) if n in names), None)
            if target is None:
                if key == "resume" and not value:
                    continue  # nothing asked for
                raise ValueError(f"{key}: vlm_lab.train.TrainConfig has no field for it (fields: {sorted(names)})")
            if key == "resume" and value and target != "resume":
                value = _latest_checkpoint(Path(requested["out_dir"]))  # a path field: point it at the last one
            values[target] = value
        return TrainConfig(**values)

    def evaluate(self, model, tokenizer) -> dict[str, float]:
        """Metrics of `model` (in eval mode, no gradients) on the recipe's evaluation set."""
        import torch

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return self.evaluate_fn(model, tokenizer)
        finally:
            model.train(was_training)


# CLI override name -> TrainConfig field names to try, in order.
_FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "steps": ("steps", "max_steps", "total_steps", "num_steps"),
    "batch_size": ("batch_size", "micro_batch_size"),
    "seed": ("seed",),
    "out_dir": ("out_dir", "output_dir", "checkpoint_dir", "save_dir"),
    "resume": ("resume", "resume_from", "resume_from_checkpoint"),
    "collate_fn": ("collate_fn", "collate"),
    "lr": ("lr", "learning_rate"),
    "warmup_steps": ("warmup_steps", "warmup"),
}


def _latest_checkpoint(out_dir: Path) -> Path:
    candidates = sorted(out_dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ValueError(f"resume: no .safetensors checkpoint in {out_dir}")
    return candidates[-1]


# --------------------------------------------------------------------------------------------------------- CLIP

# Zero-shot prompt templates for the shapes world (the CLIP chapter compares these with bare labels).
CLIP_TEMPLATES = ("a {}.", "a picture of a {}.", "an image with a {}.")


def _clip_build(preset: str, *, seed: int = 0, **_: Any) -> tuple:
    from vlm_lab.data.collate import ImageTextCollator
    from vlm_lab.data.shapes import ShapesDataset
    from vlm_lab.data.tokenizers import shapes_tokenizer
    from vlm_lab.models.clip import CLIP, CLIPConfig

    train_set = ShapesDataset(split="train", seed=seed)
    tokenizer = shapes_tokenizer()
    config = dataclasses.replace(CLIPConfig.toy(), vocab_size=len(tokenizer))
    model = CLIP(config)
    collate_fn = ImageTextCollator(tokenizer, max_length=config.context_length)
    return model, train_set, collate_fn, tokenizer


def _clip_evaluate(model, tokenizer) -> dict[str, float]:
    from vlm_lab.data.shapes import ShapesDataset
    from vlm_lab.eval.zero_shot import zero_shot_accuracy

    heldout = ShapesDataset(split="heldout", seed=12345)
    return {"zero_shot_top1_heldout": float(zero_shot_accuracy(model, tokenizer, heldout, templates=CLIP_TEMPLATES))}


RECIPES: dict[str, Recipe] = {
    "clip": Recipe(
        name="clip",
        presets=("toy",),
        build_fn=_clip_build,
        evaluate_fn=_clip_evaluate,
        train_defaults={"toy": {"steps": 300, "batch_size": 64, "lr": 1e-3}},
    ),
}


def get_recipe(name: str) -> Recipe:
    """The recipe registered under `name`; raises KeyError naming the known ones."""
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"model: no recipe for {name!r}; expected one of {', '.join(sorted(RECIPES))}") from None
