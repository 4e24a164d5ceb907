"""Data worlds, transforms, tokenizers and collators.

``shapes``, ``transforms`` and ``collate`` load eagerly (numpy + torch only); the tokenizer helpers import
``transformers`` and load on first use.
"""
from .collate import ImageTextCollator, tokenize_captions
from .shapes import (
    COLOURS,
    HELDOUT_PAIRS,
    SHAPES,
    Scene,
    ShapeSpec,
    ShapesConfig,
    ShapesDataset,
    class_names,
    derive_caption,
    render,
    to_pil,
)
from .transforms import CLIP_MEAN, CLIP_STD, check_image_tensor, denormalize, to_tensor

_LAZY = {"train_wordpiece", "train_bpe", "shapes_tokenizer", "load_tokenizer"}

__all__ = [
    "COLOURS", "SHAPES", "HELDOUT_PAIRS", "Scene", "ShapeSpec", "ShapesConfig", "ShapesDataset", "class_names",
    "derive_caption", "render", "to_pil", "CLIP_MEAN", "CLIP_STD", "to_tensor", "denormalize", "check_image_tensor",
    "ImageTextCollator", "tokenize_captions", *sorted(_LAZY),
]


def __getattr__(name: str):
    if name in _LAZY:
        from . import tokenizers

        return getattr(tokenizers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
