"""Closed-vocabulary VQA accuracy, overall and per question type (the VQA-as-classification setting of ViLT / VQA v2).

``vqa_accuracy(model, batches)`` runs a model whose output has ``logits (b, a)`` over the answer vocabulary on
batches carrying ``labels`` (answer ids) and, optionally, ``qtype_id``; it returns plain floats (exact match of the
arg-max answer), so a notebook can put them in a table.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import nn

__all__ = ["vqa_accuracy", "vqa_predictions"]


@torch.no_grad()
def vqa_predictions(model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Arg-max answers, labels and question types (``-1`` when absent) over all ``batches``: 1-D int64 tensors."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    preds, labels, qtypes = [], [], []
    try:
        for batch in batches:
            if not isinstance(batch, dict) or "labels" not in batch:
                raise ValueError("batches: every batch must be a dict with 'labels' (answer ids)")
            out = model(batch)
            logits = getattr(out, "logits", out)
            preds.append(logits.argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
            qtypes.append(batch["qtype_id"].cpu() if "qtype_id" in batch else torch.full_like(labels[-1], -1))
    finally:
        model.train(was_training)
    if not preds:
        raise ValueError("batches: got no batches")
    return {"pred": torch.cat(preds), "labels": torch.cat(labels), "qtype_id": torch.cat(qtypes)}


def vqa_accuracy(model: nn.Module, batches: Iterable[dict[str, Any]],
                 type_names: Sequence[str] | None = None) -> dict[str, float]:
    """``{"all": acc, <type name>: acc, ...}``; types are named by ``type_names[qtype_id]`` (ids when None)."""
    p = vqa_predictions(model, batches)
    ok = (p["pred"] == p["labels"]).float()
    out = {"all": float(ok.mean())}
    for t in sorted(set(p["qtype_id"].tolist())):
        if t < 0:
            continue
        name = type_names[t] if type_names is not None else str(t)
        out[name] = float(ok[p["qtype_id"] == t].mean())
    return out
