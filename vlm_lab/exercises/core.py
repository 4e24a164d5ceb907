"""The generic exercise checker: run a learner's function and ours on the same inputs, explain the first difference.

    result = check(my_fn, reference_fn, make_inputs, n_trials=5)
    result            # prints "✓ ..." or "✗ ..." with a hint; result.passed is a bool

A chapter's checker (``vlm_lab.exercises.clip`` ...) builds on :func:`check`: it chooses inputs that reveal the
typical mistakes (a batch of one, a large temperature, unnormalised features) and passes ``diagnose`` -- a
function that looks at a wrong output and names the likely mistake *without* showing the solution.

Nothing here prints; the result object renders itself in a notebook (``__repr__`` / ``_repr_markdown_``).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["CheckResult", "check", "to_numpy"]


@dataclass
class CheckResult:
    """What a checker answers. ``bool(result)`` is ``result.passed``; printing it shows the message."""

    passed: bool                 # True when every trial matched the reference
    message: str                 # what was checked, or the first difference found and a hint
    name: str = "exercise"       # which exercise (shown in the message header)
    details: dict[str, Any] = field(default_factory=dict)  # trial index, expected / got values, for the curious

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        mark = "✓" if self.passed else "✗"
        return f"{mark} {self.name}: {self.message}"

    def __repr__(self) -> str:
        return str(self)

    def _repr_markdown_(self) -> str:
        mark = "✅" if self.passed else "❌"
        return f"{mark} **{self.name}**: {self.message}"


def to_numpy(x: Any) -> np.ndarray:
    """A float64 numpy view of a tensor, array or number (gradients dropped)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _describe(inputs: Any) -> str:
    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"tensor{tuple(v.shape)}" if v.dim() else f"{float(v):.4g}"
        if isinstance(v, np.ndarray):
            return f"array{v.shape}"
        return repr(v)

    if isinstance(inputs, dict):
        return ", ".join(f"{k}={one(v)}" for k, v in inputs.items())
    return ", ".join(one(v) for v in inputs)


def _call(fn: Callable, inputs: Any) -> Any:
    return fn(**inputs) if isinstance(inputs, dict) else fn(*inputs)


def _clone(inputs: Any) -> Any:
    """Fresh copies so a function that modifies its inputs in place cannot change what the other one sees."""
    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.detach().clone()
        if isinstance(v, np.ndarray):
            return v.copy()
        return v

    if isinstance(inputs, dict):
        return {k: one(v) for k, v in inputs.items()}
    return tuple(one(v) for v in inputs)


def check(fn: Callable, reference: Callable, make_inputs: Callable[[int], Any], n_trials: int = 5, *,
          atol: float = 1e-5, rtol: float = 1e-4, name: str = "exercise",
          diagnose: Callable[[Any, Any, Any], str | None] | None = None) -> CheckResult:
    """Compare ``fn`` with ``reference`` on ``n_trials`` inputs; explain the first difference.

    Args:
        fn: the learner's function.
        reference: the package's function (the answer), called with the same inputs.
        make_inputs: ``trial -> inputs`` (a tuple of positional arguments or a dict of keyword arguments);
            deterministic per trial so a failure can be reproduced.
        n_trials: how many inputs to try.
        atol, rtol: tolerance of ``numpy.allclose`` on the outputs (as float64 arrays).
        name: shown in the result.
        diagnose: ``(inputs, got, expected) -> hint or None``, called on the first mismatch to name a likely
            mistake; its hint is added to the message.
    Returns:
        a :class:`CheckResult` (never raises because of the learner's code: an exception becomes the message).
    """
    if not callable(fn):
        raise TypeError(f"fn: expected your function, got {type(fn).__name__}")
    if not callable(reference) or not callable(make_inputs):
        raise TypeError("reference and make_inputs must be callables")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials: expected a positive int, got {n_trials!r}")
    for trial in range(n_trials):
        inputs = make_inputs(trial)
        expected = _call(reference, _clone(inputs))
        try:
            got = _call(fn, _clone(inputs))
        except NotImplementedError:
            return CheckResult(False, "not implemented yet: replace the `raise NotImplementedError` with your code.",
                               name, {"trial": trial})
        except Exception as err:  # the learner's bug, reported, not raised
            where = traceback.extract_tb(err.__traceback__)[-1]
            return CheckResult(False, f"your function raised {type(err).__name__}: {err} (line {where.lineno}) "
                                      f"on inputs {_describe(inputs)}.", name, {"trial": trial})
        if got is None:
            return CheckResult(False, "your function returned None: did you forget `return`?", name, {"trial": trial})
        try:
            g, e = to_numpy(got), to_numpy(expected)
        except (TypeError, ValueError) as err:
            return CheckResult(False, f"your function returned {type(got).__name__}, which is not a number or "
                                      f"array ({err}).", name, {"trial": trial})
        if g.shape != e.shape:
            hint = diagnose(inputs, got, expected) if diagnose else None
            msg = f"on inputs {_describe(inputs)} your output has shape {g.shape}, expected {e.shape}."
            return CheckResult(False, msg + (f" Hint: {hint}" if hint else ""), name,
                               {"trial": trial, "got": g, "expected": e})
        if not np.all(np.isfinite(g)) and np.all(np.isfinite(e)):
            hint = diagnose(inputs, got, expected) if diagnose else None
            msg = f"on inputs {_describe(inputs)} your output is not finite ({g.ravel()[:4]}...)."
            return CheckResult(False, msg + (f" Hint: {hint}" if hint else ""), name,
                               {"trial": trial, "got": g, "expected": e})
        if not np.allclose(g, e, atol=atol, rtol=rtol):
            hint = diagnose(inputs, got, expected) if diagnose else None
            if g.size == 1:
                diff = f"you returned {g.item():.6g}, expected {e.item():.6g}"
            else:
                k = int(np.argmax(np.abs(g - e)))
                idx = np.unravel_index(k, g.shape)
                diff = f"largest difference at index {tuple(int(i) for i in idx)}: {g[idx]:.6g} vs {e[idx]:.6g}"
            msg = f"on inputs {_describe(inputs)} {diff}."
            return CheckResult(False, msg + (f" Hint: {hint}" if hint else ""), name,
                               {"trial": trial, "got": g, "expected": e})
    return CheckResult(True, f"matches the package's function on {n_trials} inputs.", name, {"trials": n_trials})
