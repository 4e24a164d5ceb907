"""Shared helpers of the model files: rebuild a config dataclass from the dict stored in a checkpoint, and check
that a batch dict has the keys a forward pass needs."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_dict(cls: type[T], d: dict[str, Any], nested: dict[str, Any] | None = None) -> T:
    """``cls(**d)``, refusing keys that are not fields of ``cls`` with a message that names them.

    ``nested`` maps a field to the config class of its value: a dict stored there is rebuilt with that class's
    ``from_dict`` first (BLIP-2's and LLaVA's ``lm``).
    """
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
    d = dict(d)
    for name, sub in (nested or {}).items():
        if isinstance(d.get(name), dict):
            d[name] = sub.from_dict(d[name])
    return cls(**d)


def require_keys(batch: Any, *keys: str) -> None:
    """Raise a clear error unless ``batch`` is a dict holding every one of ``keys``."""
    if not isinstance(batch, dict):
        raise TypeError(f"batch must be a dict of tensors, got {type(batch).__name__}")
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"batch is missing {missing}; it has {sorted(batch)}")
