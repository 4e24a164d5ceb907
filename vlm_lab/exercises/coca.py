"""Checkers for chapter 08 (CoCa / CONCH): the [CLS] attention mask of the text encoder, and the Dice score.

``check_cls_mask(fn)``: ``fn(attention_mask (b, n)) -> bool (b, n + 1, n + 1)``, True = may attend; text rows causal,
the appended [CLS] row sees every real token and itself (``vlm_lab.models.coca.cls_attention_mask``).
``check_dice(fn)``: ``fn(pred (h, w), target (h, w), num_classes) -> (C,)`` Dice per class, NaN when a class is
absent from both maps (``vlm_lab.eval.segmentation.dice_scores``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from .core import CheckResult, check, to_numpy

__all__ = ["check_cls_mask", "check_dice"]


def _mask_inputs(trial: int) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + trial)
    b, n = 3, 4 + trial
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    lengths[0] = n  # one row without padding
    mask = (torch.arange(n)[None] < lengths[:, None]).long()  # (b, n) right padding
    return (mask,)


def _diagnose_mask(inputs: tuple, got: Any, expected: Any) -> str | None:
    from vlm_lab.models.coca import cls_attention_mask

    (mask,) = inputs
    got = to_numpy(got).astype(bool)
    if got.shape != tuple(expected.shape):
        return (f"the mask should have shape (batch, n + 1, n + 1) = {tuple(expected.shape)}: one extra row and "
                "column for [CLS]")
    exp = to_numpy(expected).astype(bool)
    if np.array_equal(got, to_numpy(cls_attention_mask(mask, legacy=True)).astype(bool)):
        return ("this is open_clip's *legacy* mask (validity padded at the front): [CLS] sees the first pad token and "
                "not itself. Put the extra True at the end, for the [CLS] key")
    if not np.array_equal(got[:, :-1], exp[:, :-1]):
        return "look at the text rows: position i may attend to positions j <= i only (causal), padding or not"
    if not got[:, -1, -1].all():
        return "the [CLS] row should attend to the [CLS] position itself"
    return "look at the [CLS] row: it should see exactly the real (non-pad) tokens and itself"


def check_cls_mask(fn: Callable[[torch.Tensor], Any], n_trials: int = 4) -> CheckResult:
    """Compare the learner's [CLS]-appended text mask with ``cls_attention_mask``."""
    from vlm_lab.models.coca import cls_attention_mask

    return check(fn, lambda m: cls_attention_mask(m).float(), _mask_inputs, n_trials,
                 name="CoCa [CLS] attention mask", diagnose=_diagnose_mask,
                 atol=0.0, rtol=0.0)


def _dice_inputs(trial: int) -> tuple:
    rng = np.random.default_rng(200 + trial)
    c = 4
    target = rng.integers(0, c - 1, (12, 10))  # class c - 1 absent from the target ...
    pred = target.copy()
    flip = rng.random(target.shape) < 0.3
    pred[flip] = rng.integers(0, c - 1, flip.sum())  # ... and from the prediction: its Dice is NaN
    return (pred, target, c)


def _diagnose_dice(inputs: tuple, got: Any, expected: Any) -> str | None:
    got, exp = np.asarray(to_numpy(got), float), np.asarray(expected, float)
    if got.shape != exp.shape:
        return f"return one Dice value per class, shape ({exp.shape[0]},)"
    if np.isnan(exp).any() and not np.isnan(got[np.isnan(exp)]).all():
        return "a class that appears in neither map has no Dice (0 / 0): return NaN for it, not 0 or 1"
    pred, target, c = inputs
    iou = np.array([((pred == k) & (target == k)).sum() / max(((pred == k) | (target == k)).sum(), 1)
                    for k in range(c)])
    if np.allclose(np.nan_to_num(got), np.nan_to_num(np.where(np.isnan(exp), np.nan, iou))):
        return "that is the IoU (Jaccard), |P & G| / |P | G|; Dice is 2 |P & G| / (|P| + |G|)"
    return "Dice_c = 2 * |pred == c and target == c| / (|pred == c| + |target == c|)"


def check_dice(fn: Callable[..., Any], n_trials: int = 4) -> CheckResult:
    """Compare the learner's per-class Dice with ``vlm_lab.eval.segmentation.dice_scores``."""
    from vlm_lab.eval.segmentation import dice_scores

    def ref(pred, target, c):
        return np.nan_to_num(dice_scores(pred, target, c), nan=-1.0)

    def wrapped(pred, target, c):
        return np.nan_to_num(np.asarray(to_numpy(fn(pred, target, c)), float), nan=-1.0)

    def diag(inputs, got, expected):
        return _diagnose_dice(inputs, fn(*inputs), dice_scores(*inputs))

    return check(wrapped, ref, _dice_inputs, n_trials, name="Dice per class", diagnose=diag)
