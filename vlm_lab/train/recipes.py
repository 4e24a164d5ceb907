"""Recipes: what `vlm-lab train MODEL` and `vlm-lab eval MODEL` need besides the model itself.

A recipe pairs a registry model (`vlm_lab.models.registry`) with its data world, tokenizer, training settings and
evaluation, per preset. It lives in `train/` because it uses both `models` and `data` (DESIGN.md layering).

    recipe = get_recipe("clip")
    model, train_set, collate_fn, tokenizer = recipe.build("toy", seed=0)
    config = recipe.train_config("toy", out_dir="runs/clip-toy", collate_fn=collate_fn)
    fit(model, train_set, config)
    recipe.evaluate(model, tokenizer)      # {"zero_shot_top1_heldout": ..., ...}

Presets in this release: `clip/toy` — the shapes world at 32 px, the shapes-world WordPiece tokenizer, the registry's
`CLIPConfig.toy()` with the tokenizer's vocabulary size and [SEP] as end-of-text, evaluated by zero-shot top-1
accuracy on single-shape scenes of the colour-shape compositions held out from training (CLIP paper, section 3.1.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["Recipe", "RECIPES", "get_recipe", "CLIP_TEMPLATES"]


@dataclass
class Recipe:
    """How to build, train and evaluate one model from the command line."""

    name: str                                     # registry name, e.g. "clip"
    presets: tuple[str, ...]                      # presets the recipe supports in this release
    build_fn: Callable[..., tuple]                # (preset, *, seed) -> (model, train_set, collate_fn, tokenizer)
    evaluate_fn: Callable[..., dict[str, float]]  # (model, tokenizer, preset) -> metric name -> value
    train_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)  # preset -> TrainConfig field values

    def _check_preset(self, preset: str) -> None:
        if preset not in self.presets:
            raise ValueError(f"preset: {self.name} has no preset {preset!r}; expected one of {self.presets}")

    def build(self, preset: str = "toy", **overrides: Any) -> tuple:
        """Return `(model, train_dataset, collate_fn, tokenizer)` for `preset` (overrides: `seed`)."""
        self._check_preset(preset)
        return self.build_fn(preset, **overrides)

    def train_config(self, preset: str = "toy", **overrides: Any):
        """A `vlm_lab.train.TrainConfig` with the preset's defaults, then `overrides` (those set to None are ignored)."""
        from vlm_lab.train.config import TrainConfig

        self._check_preset(preset)
        values = {**self.train_defaults.get(preset, {}), **{k: v for k, v in overrides.items() if v is not None}}
        steps, warmup = values.get("steps"), values.get("warmup_steps", 0)
        if steps is not None and "warmup_steps" not in overrides and isinstance(steps, int) and warmup > steps:
            values["warmup_steps"] = steps // 10  # a shortened run keeps the preset's warmup fraction (10 %)
        return TrainConfig(**values)

    def evaluate(self, model, tokenizer, preset: str = "toy") -> dict[str, float]:
        """Metrics of `model` on the recipe's evaluation set (eval mode, no gradients; the mode is restored)."""
        import torch

        self._check_preset(preset)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return self.evaluate_fn(model, tokenizer, preset)
        finally:
            model.train(was_training)


# --------------------------------------------------------------------------------------------------------- CLIP

# Zero-shot prompts for the shapes world; "{}" is a class name such as "red circle". Written like the training
# captions ("a small red circle", "there is a red circle"), the way CLIP's prompts mimic alt-text.
CLIP_TEMPLATES = ("a {}", "a picture of a {}", "there is a {}")

_CLIP_TOY = {
    "n_train": 8192,         # training scenes (fit cycles over them; item i is generated from (seed, split, i))
    "n_eval": 512,           # held-out single-shape scenes scored zero-shot
    "eval_seed": 10_000,     # eval scenes differ from any training scene by seed and split
}


def _clip_build(preset: str, *, seed: int = 0) -> tuple:
    from vlm_lab.data.collate import ImageTextCollator
    from vlm_lab.data.shapes import ShapesDataset
    from vlm_lab.data.tokenizers import shapes_tokenizer
    from vlm_lab.models.clip import CLIPConfig
    from vlm_lab.models.registry import build_model

    context_length = CLIPConfig.toy().context_length
    tokenizer = shapes_tokenizer(model_max_length=context_length)
    eot = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    model = build_model("clip", preset, vocab_size=len(tokenizer), eot_token_id=eot)
    train_set = ShapesDataset("train", n=_CLIP_TOY["n_train"], seed=seed, image_size=model.config.image_size)
    collate_fn = ImageTextCollator(tokenizer, max_length=model.config.context_length)
    return model, train_set, collate_fn, tokenizer


def _clip_evaluate(model, tokenizer, preset: str) -> dict[str, float]:
    """Zero-shot top-1 on held-out compositions: among the held-out classes, and among every class of the world."""
    import torch

    from vlm_lab.data.shapes import ShapesDataset, class_names
    from vlm_lab.eval.zero_shot import zero_shot_classifier

    heldout = ShapesDataset("heldout", n=_CLIP_TOY["n_eval"], seed=_CLIP_TOY["eval_seed"],
                            image_size=model.config.image_size)
    device = next(model.parameters()).device
    items = [heldout[i] for i in range(len(heldout))]  # renders each scene once
    labels = torch.tensor([item["labels"] for item in items])  # (N,) index into heldout.class_names
    pixels = torch.stack([item["pixel_values"] for item in items])  # (N, 3, H, W)
    image_embeds = torch.cat([model.encode_image(chunk.to(device)).float().cpu()
                              for chunk in pixels.split(128)])  # (N, D), L2-normalised

    metrics: dict[str, float] = {}
    all_names = class_names("all")
    for key, names in (("zero_shot_top1_heldout", list(heldout.class_names)), ("zero_shot_top1_heldout_among_all", all_names)):
        weights = zero_shot_classifier(model, tokenizer, names, CLIP_TEMPLATES).float().cpu()  # (C, D)
        target = torch.tensor([names.index(heldout.class_names[int(y)]) for y in labels])  # (N,)
        predicted = (image_embeds @ weights.T).argmax(dim=-1)  # (N,)
        metrics[key] = float((predicted == target).float().mean())
    metrics["chance_heldout"] = 1.0 / len(heldout.class_names)
    return metrics


RECIPES: dict[str, Recipe] = {
    "clip": Recipe(
        name="clip",
        presets=("toy",),
        build_fn=_clip_build,
        evaluate_fn=_clip_evaluate,
        train_defaults={"toy": {"steps": 1000, "batch_size": 64, "lr": 2e-3, "warmup_steps": 30,
                                "checkpoint_every": 100, "precision": "fp32"}},
    ),
}


def get_recipe(name: str) -> Recipe:
    """The recipe registered under `name`; raises KeyError naming the known ones."""
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"model: no recipe for {name!r}; expected one of {', '.join(sorted(RECIPES))}") from None
