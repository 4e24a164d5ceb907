"""Shared helper for the model configs: rebuild a config dataclass from the dict stored in a checkpoint."""

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
