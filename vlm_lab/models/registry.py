"""A name -> model-class registry so checkpoints, the CLI and the demos can rebuild any lab model.

A checkpoint records ``{"model": name, "config": dataclasses.asdict(model.config)}``; ``model_from_dict``
turns that back into a model, and ``build_model(name, preset)`` builds a fresh one from a named preset.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .albef import ALBEF, ALBEFConfig
from .blip import BLIP, BLIPConfig
from .blip2 import BLIP2, BLIP2Config
from .clip import CLIP, CLIPConfig
from .coca import CoCa, CoCaConfig
from .fusion import (ConnectorConfig, ConnectorVQA, DualEncoder, DualEncoderConfig, EarlyFusion, FusionConfig,
                     IntermediateFusion, LateFusion)
from .llava import LLaVA, LLaVAConfig
from .vilt import ViLT, ViLTConfig
from .vlmo import VLMo, VLMoConfig

# name -> (model class, config class). Later chapters add their models here.
MODELS: dict[str, tuple[type[nn.Module], type]] = {
    "albef": (ALBEF, ALBEFConfig),
    "blip": (BLIP, BLIPConfig),
    "blip2": (BLIP2, BLIP2Config),
    "clip": (CLIP, CLIPConfig),
    "coca": (CoCa, CoCaConfig),
    "early_fusion": (EarlyFusion, FusionConfig),
    "intermediate_fusion": (IntermediateFusion, FusionConfig),
    "late_fusion": (LateFusion, FusionConfig),
    "connector_vqa": (ConnectorVQA, ConnectorConfig),
    "dual_encoder": (DualEncoder, DualEncoderConfig),
    "llava": (LLaVA, LLaVAConfig),
    "vilt": (ViLT, ViLTConfig),
    "vlmo": (VLMo, VLMoConfig),
}

PRESETS = ("toy", "small", "paper")


def _lookup(name: str) -> tuple[type[nn.Module], type]:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}") from None


def build_model(name: str, preset: str = "toy", **overrides: Any) -> nn.Module:
    """A fresh model from a named preset, e.g. ``build_model("clip", "toy", vocab_size=300)``."""
    model_cls, config_cls = _lookup(name)
    factory = getattr(config_cls, preset, None) if preset in PRESETS else None
    if factory is None:
        available = [p for p in PRESETS if hasattr(config_cls, p)]
        raise ValueError(f"unknown preset {preset!r} for {name}; available presets: {available}")
    return model_cls(factory(**overrides))


def model_from_dict(name: str, config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from the ``{"model": name, "config": {...}}`` record stored in a checkpoint."""
    model_cls, config_cls = _lookup(name)
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    from_dict = getattr(config_cls, "from_dict", None)
    return model_cls(from_dict(config) if from_dict else config_cls(**config))


def model_name(model: nn.Module) -> str:
    """The registry name of a model instance (raises for models that are not registered)."""
    for name, (model_cls, _) in MODELS.items():
        if type(model) is model_cls:
            return name
    raise ValueError(f"{type(model).__name__} is not in the model registry ({sorted(MODELS)})")


def model_record(model: nn.Module) -> dict[str, Any]:
    """``{"model": name, "config": {...}}`` for a checkpoint's metadata."""
    return {"model": model_name(model), "config": dataclasses.asdict(model.config)}
