"""CONCH's pre-training recipe as a config, and the toy CoCa-on-synthetic-H&E setup the chapter-08 notebook uses.

The paper (Lu et al., 2024, Nat Med, Methods, "Visual-language pretraining"): 40 epochs on 8 x A100 80 GB, local
batch 48 per GPU and 4 gradient-accumulation steps -> a global batch of 48 x 8 x 4 = 1,536; images 448 x 448:
larger images short-side resized to 448 and centre-cropped, smaller ones zero-padded.

``CoCaRecipe.paper().train_config()`` is a ``TrainConfig`` that ``fit`` accepts as is, on one process or under
``torchrun --nproc_per_node=8`` (``batch_size`` is per process; accumulation is ``cache_features``, so the
contrastive term sees all 1,536 pairs of a step and the caption term is a token mean over them, exactly):

    recipe = CoCaRecipe.paper()
    model = CoCa(CoCaConfig.paper())
    fit(model, dataset_of_448px_items, recipe.train_config(collate_fn=collate))   # torchrun --nproc_per_node=8 ...

Fields the paper gives are marked [paper]; the optimiser numbers are **our choices** (the sources we read do not
state them), flagged [ours].

The toy side: :func:`pathology_tokenizer` (a deterministic word-level WordPiece over the synthetic pathology
vocabulary: captions, every class synonym -- the unseen ones too -- and the prompt templates, so nothing is
``[UNK]``) and :func:`build_toy` (model + tile dataset + collator). Scale knobs live here, not in the notebook.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

__all__ = ["CoCaRecipe", "pathology_tokenizer", "build_toy", "TOY_TRAIN"]


@dataclass
class CoCaRecipe:
    """A pre-training recipe: batch arithmetic, length, image preparation, optimiser (see module docstring)."""

    per_device_batch: int = 48  # [paper] micro-batch per GPU per forward pass
    num_devices: int = 8  # [paper] GPUs (8 x A100 80 GB) = torchrun --nproc_per_node
    grad_accum: int = 4  # [paper] gradient-accumulation steps per optimiser step
    epochs: float = 40  # [paper] passes over the 1.17 M curated image-caption pairs
    image_size: int = 448  # [paper] input side; short-side resize + centre crop, zero-pad small images
    lr: float = 1e-4  # [ours] AdamW peak learning rate
    weight_decay: float = 0.2  # [ours] AdamW decoupled weight decay (matrices only)
    warmup_steps: int = 250  # [ours] linear warmup, then cosine decay
    precision: str = "bf16"  # [ours] autocast on GPU (fit falls back to fp32 on CPU)
    grad_clip: float | None = 1.0  # [ours] global gradient-norm clipping

    def __post_init__(self) -> None:
        for name in ("per_device_batch", "num_devices", "grad_accum", "image_size", "warmup_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "warmup_steps" else 1):
                raise ValueError(f"CoCaRecipe.{name}: expected a positive int, got {v!r}")
        if not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise ValueError(f"CoCaRecipe.epochs: expected a number > 0, got {self.epochs!r}")

    @classmethod
    def paper(cls, **overrides: Any) -> "CoCaRecipe":
        """CONCH: 48 per GPU x 8 GPUs x 4 accumulation = 1,536; 40 epochs; 448 px."""
        return cls(**overrides)

    @classmethod
    def toy(cls, **overrides: Any) -> "CoCaRecipe":
        """One CPU process, 32 px tiles, batch 32, no accumulation (the notebook's run)."""
        base = dict(per_device_batch=32, num_devices=1, grad_accum=1, epochs=1, image_size=32, lr=2e-3,
                    weight_decay=0.1, warmup_steps=20, precision="fp32", grad_clip=None)
        return cls(**{**base, **overrides})

    @property
    def global_batch(self) -> int:
        """Examples per optimiser step: ``per_device_batch * num_devices * grad_accum``."""
        return self.per_device_batch * self.num_devices * self.grad_accum

    def steps_per_epoch(self, dataset_size: int) -> int:
        """Optimiser steps per pass over ``dataset_size`` examples (incomplete last batches dropped)."""
        if dataset_size < self.global_batch:
            raise ValueError(f"dataset_size: {dataset_size} is smaller than one global batch ({self.global_batch})")
        return dataset_size // self.global_batch

    def image_transform(self) -> Callable:
        """uint8 ``(h, w, 3)`` -> uint8 ``(image_size, image_size, 3)``: ``resize_center_crop_pad`` at this size."""
        from vlm_lab.data.transforms import resize_center_crop_pad

        return partial(resize_center_crop_pad, size=self.image_size)

    def train_config(self, world_size: int | None = None, **overrides: Any):
        """The ``TrainConfig`` for ``fit``: per-process batch, accumulation, epochs, ``cache_features``.

        ``world_size`` (default: the ``WORLD_SIZE`` torchrun sets, else 1) must equal ``num_devices``, otherwise
        the global batch would silently differ from the recipe's; pass ``num_devices`` to the recipe to change it.
        """
        from vlm_lab.train.config import TrainConfig

        world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
        if world != self.num_devices:
            raise ValueError(f"world_size: the recipe is for {self.num_devices} processes (global batch "
                             f"{self.global_batch}) but this run has {world}; launch torchrun "
                             f"--nproc_per_node={self.num_devices} or build the recipe with num_devices={world}")
        values = dict(epochs=self.epochs, batch_size=self.per_device_batch, grad_accum=self.grad_accum,
                      accum_mode="cache_features", lr=self.lr, weight_decay=self.weight_decay,
                      warmup_steps=self.warmup_steps, precision=self.precision, grad_clip=self.grad_clip)
        values.update(overrides)
        if values.get("steps") is not None:
            values["epochs"] = None
            if "warmup_steps" not in overrides and values["warmup_steps"] > values["steps"]:
                values["warmup_steps"] = values["steps"] // 10  # a shortened run keeps a 10 % warmup
        return TrainConfig(**values)


# ---------------------------------------------------------------------------------------------------- toy setup

TOY_TRAIN = {
    "n_train": 4608,  # synthetic tiles for pre-training (512 per class); item i is class i % 9
    "size": 32,  # tile side in pixels (PathMNIST-like thumbnails of a 112 um field of view)
    "caption_variants": 5,  # phrasings cycled through
    "seed": 0,  # dataset seed; evaluation tiles use other seeds
    "max_length": 40,  # caption tokens incl. [CLS] / [SEP] (= CoCaConfig.toy().context_length)
}


def pathology_tokenizer(model_max_length: int = 40):
    """Word-level WordPiece over the synthetic pathology vocabulary (deterministic, no ``[UNK]`` in captions
    or zero-shot prompts): ``[PAD]=0, [UNK]=1, [CLS]=2`` (begin), ``[SEP]=3`` (end), ``[MASK]=4``."""
    from vlm_lab.data import pathology as P
    from vlm_lab.data.tokenizers import _wordpiece_fast, _wordpiece_pipeline

    texts: list[str] = []
    for i in range(270):  # enough draws to visit every phrasing of every attribute value
        at = P.sample_attributes(P.CLASSES[i % len(P.CLASSES)], seed=i, size=224)
        texts += [P.caption_from_attributes(at, v, "all") for v in range(5)]
    texts += [t for prompts in P.zero_shot_prompts("all").values() for t in prompts]
    texts += list(P.CLASS_NAMES.values()) + list(P.DIAGNOSES)
    splitter = _wordpiece_pipeline({"[UNK]": 0}, lowercase=True)
    words: set[str] = set()
    for text in texts:
        words.update(w for w, _ in splitter.pre_tokenizer.pre_tokenize_str(splitter.normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    pieces = chars + ["##" + c for c in chars] + sorted(w for w in words if len(w) > 1)
    return _wordpiece_fast(pieces, lowercase=True, model_max_length=model_max_length)


def build_toy(preset: str = "toy", *, seed: int = 0, n_train: int | None = None, **model_overrides: Any) -> tuple:
    """``(model, train_set, collate_fn, tokenizer)`` for a toy CoCa on synthetic H&E tiles with captions.

    Captions use only ``TRAIN_SYNONYMS``; the ``UNSEEN_SYNONYMS`` are in the vocabulary but never in training.
    """
    from vlm_lab.data.collate import ImageTextCollator
    from vlm_lab.data.pathology import PathologyTiles
    from vlm_lab.models.coca import CoCa, CoCaConfig

    if preset not in ("toy", "small"):
        raise ValueError(f"preset: expected 'toy' or 'small' (the paper preset needs real data), got {preset!r}")
    cfg = getattr(CoCaConfig, preset)(**model_overrides)
    tokenizer = pathology_tokenizer(model_max_length=cfg.context_length)
    cfg = CoCaConfig.from_dict({**cfg.__dict__, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id})
    model = CoCa(cfg)
    train_set = PathologyTiles(n_train or TOY_TRAIN["n_train"], size=cfg.image_size, seed=seed,
                               caption_variants=TOY_TRAIN["caption_variants"], synonyms="train", cache=True)
    collate_fn = ImageTextCollator(tokenizer, max_length=cfg.context_length)
    return model, train_set, collate_fn, tokenizer
