"""Checkers for the exercises of notebooks/01_fusion_and_alignment.ipynb: FLOPs of a transformer block by hand.

``check_block_flops(my_block_flops)``
    The learner counts the floating-point operations of one pre-LN ``vlm_lab.nn.TransformerBlock`` (self-attention
    + MLP) of width ``d`` and MLP width ``m`` over ``N`` tokens of one sequence, counting a multiply-add as 2 FLOPs
    and only the matrix products (LayerNorm, softmax, biases and activations are ignored, as PyTorch's counter does)::

        def my_block_flops(n_tokens: int, width: int, mlp_dim: int) -> int:
            ...
            return flops

    The reference is *measured*, not a formula: ``vlm_lab.inspect.count_flops`` on a real block with that shape.
    The inputs include one token (where the attention term is smallest) and an MLP narrower than the width.

On a mismatch the checker recomputes the typical slips (a multiply-add counted once, the attention products or
the output projection forgotten, the MLP counted once) and names the one that reproduces the learner's number.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .core import CheckResult, check, to_numpy

__all__ = ["check_block_flops", "block_flops_mistakes"]

_CASES = ((1, 8, 16), (7, 12, 20), (16, 64, 128), (33, 32, 8), (5, 20, 80))


def _measured_block_flops(n_tokens: int, width: int, mlp_dim: int) -> int:
    from vlm_lab.inspect import count_flops
    from vlm_lab.nn import TransformerBlock

    heads = 4 if width % 4 == 0 else 1
    with torch.device("meta"):
        block = TransformerBlock(width, heads, mlp_dim)
        x = torch.empty(1, n_tokens, width)
    return count_flops(lambda: block(x))


def block_flops_mistakes(n: int, d: int, m: int) -> dict[str, float]:
    """The typical wrong counts for ``N = n`` tokens, width ``d``, MLP width ``m``, keyed by a hint."""
    proj, attn, mlp = 8 * n * d * d, 4 * n * n * d, 4 * n * d * m
    return {
        "every product is counted once: a multiply-add is two floating-point operations.": (proj + attn + mlp) / 2,
        "the two attention products (Q K^T and the weights times V) are missing: they grow with N^2.": proj + mlp,
        "one of the four d x d projections is missing (queries, keys, values, and the output projection).":
            6 * n * d * d + attn + mlp,
        "the MLP has two matrices (d -> m and m -> d); count both.": proj + attn + mlp / 2,
        "the attention products are counted with one FLOP per multiply-add: they are matrix products too "
        "(2 FLOPs each).": proj + attn / 2 + mlp,
    }


def _diagnose(inputs: Any, got: Any, expected: Any) -> str | None:
    n, d, m = inputs
    try:
        g = float(to_numpy(got))
    except (TypeError, ValueError):
        return None
    for hint, value in block_flops_mistakes(n, d, m).items():
        if abs(g - value) <= 0.5:
            return hint
    return None


def check_block_flops(fn: Callable[[int, int, int], Any]) -> CheckResult:
    """Compare ``fn(n_tokens, width, mlp_dim)`` with the FLOPs PyTorch's counter measures on a real block."""
    return check(fn, _measured_block_flops, lambda t: _CASES[t], n_trials=len(_CASES), atol=0.5, rtol=0.0,
                 name="FLOPs of a transformer block", diagnose=_diagnose)
