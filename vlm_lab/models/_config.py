"""Shared helpers of the model files: rebuild a config dataclass from the dict stored in a checkpoint, and check
that a batch dict has the keys a forward pass needs."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_dict(cls: type[T], d: dict[str, Any]) -> T:
    """``cls(**d)``, refusing keys that are not fields of ``cls`` with a message that names them."""
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
    return cls(**d)


def require_keys(batch: Any, *keys: str) -> None:
    """Raise a clear error unless ``batch`` is a dict holding every one of ``keys``."""
    if not isinstance(batch, dict):
        raise TypeError(f"batch must be a dict of tensors, got {type(batch).__name__}")
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"batch is missing {missing}; it has {sorted(batch)}")
