"""Generic helpers for loading weights from other implementations (Hugging Face transformers, timm, open_clip).

Each model's own ``from_hf`` lives in its model file, because knowing the weight names is part of knowing the
model. What is shared lives here:

- ``rename_keys``: apply an ordered list of regular-expression rules to a state dict's keys;
- ``split_qkv`` / ``fuse_qkv``: convert between one fused in-projection (OpenAI CLIP, open_clip, timm) and
  separate q / k / v matrices (Hugging Face, the lab's ``Attention``);
- ``load_converted``: load a converted state dict strictly, with errors that name every missing key,
  unexpected key and shape mismatch instead of a partial, silent load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn


class WeightLoadingError(ValueError):
    """A converted state dict does not fit the target model."""


def rename_keys(state: Mapping[str, Tensor], rules: Iterable[tuple[str, str]],
                drop: Iterable[str] = ()) -> dict[str, Tensor]:
    """Rename every key by the first matching ``(pattern, replacement)`` rule (``re.sub`` semantics).

    Keys matching a pattern in ``drop`` are removed (for buffers the lab recomputes, e.g. ``position_ids``).
    Keys matched by no rule are kept unchanged, so ``load_converted`` reports them as unexpected.
    """
    rules = [(re.compile(p), r) for p, r in rules]
    drops = [re.compile(p) for p in drop]
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if any(d.search(key) for d in drops):
            continue
        new = key
        for pattern, repl in rules:
            if pattern.search(key):
                new = pattern.sub(repl, key)
                break
        if new in out:
            raise WeightLoadingError(f"two source keys map to {new!r}; check the renaming rules")
        out[new] = value
    return out


def split_qkv(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Split a fused ``(3 d, ...)`` in-projection (weight or bias) into q, k, v, each ``(d, ...)``."""
    if weight.shape[0] % 3:
        raise WeightLoadingError(f"a fused qkv tensor needs a first dimension divisible by 3, got {tuple(weight.shape)}")
    q, k, v = weight.chunk(3, dim=0)
    return q, k, v


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Inverse of ``split_qkv``: ``(d, ...)`` x 3 -> ``(3 d, ...)``."""
    return torch.cat([q, k, v], dim=0)


def load_converted(model: nn.Module, state: Mapping[str, Tensor], source: str = "source") -> None:
    """Copy ``state`` into ``model`` strictly; raise ``WeightLoadingError`` listing every mismatch.

    The model's floating-point dtype is kept (tensors are cast on copy).
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: model {tuple(own[k].shape)} vs {source} {tuple(state[k].shape)}"
              for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing in {source}: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(f"not used by the model: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
        if shapes:
            parts.append("shape mismatches: " + "; ".join(shapes[:20]))
        raise WeightLoadingError(f"cannot load {source} weights into {type(model).__name__}: " + " | ".join(parts))
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(state[key].to(dtype=tensor.dtype))
