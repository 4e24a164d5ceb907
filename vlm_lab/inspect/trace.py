"""Looking inside any lab model: shapes, parameter counts, attention weights, FLOPs.

    with vlm_lab.inspect.trace(model, attention=True) as t:
        model(batch)
    print(t.table())                       # one row per module call: input / output shapes, parameters
    w = t.attention("visual.encoder.blocks.0.attn")    # (b, h, n, m) softmax weights

``trace`` registers forward hooks on every submodule (or those selected by ``modules``), records what went in and
out, and removes the hooks on exit, leaving the model exactly as it was. Attention weights are recorded only when
asked: each ``vlm_lab.nn.Attention`` then computes its softmax explicitly (same numbers as the fused kernel) and
hands the weights to the trace. Only shapes are read, so a model on PyTorch's ``meta`` device can be traced at
paper size without allocating memory.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ..nn.attention import Attention


def _shapes(obj: Any) -> Any:
    """Nested shapes of the tensors in ``obj`` (tensors, tuples, lists, dicts, dataclasses)."""
    if isinstance(obj, Tensor):
        return tuple(obj.shape)
    if isinstance(obj, (list, tuple)):
        inner = [_shapes(o) for o in obj]
        inner = [s for s in inner if s is not None]
        return inner[0] if len(inner) == 1 else (inner or None)
    if isinstance(obj, dict):
        inner = {k: _shapes(v) for k, v in obj.items()}
        inner = {k: v for k, v in inner.items() if v is not None}
        return inner or None
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _shapes({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    return None


def _fmt(shape: Any) -> str:
    if shape is None:
        return "-"
    if isinstance(shape, tuple) and all(isinstance(s, int) for s in shape):
        return "[" + ", ".join(str(s) for s in shape) + "]"
    if isinstance(shape, list):
        return ", ".join(_fmt(s) for s in shape)
    if isinstance(shape, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in shape.items())
    return str(shape)


@dataclass
class TraceRecord:
    """One call of one module."""

    name: str  # dotted module name ("" for the root)
    kind: str  # class name
    depth: int  # number of dots + 1 (0 for the root)
    inputs: Any  # nested input shapes
    output: Any  # nested output shapes
    params: int  # parameters of the module including its children


@dataclass
class Trace:
    """What ``trace`` recorded."""

    records: list[TraceRecord] = field(default_factory=list)
    attention_weights: dict[str, list[Tensor]] = field(default_factory=dict)

    def table(self, max_depth: int | None = None, names: str | None = None) -> str:
        """A text table of module calls (optionally down to ``max_depth`` and matching the glob ``names``)."""
        rows = [r for r in self.records if (max_depth is None or r.depth <= max_depth)
                and (names is None or fnmatch.fnmatch(r.name, names))]
        head = ("module", "type", "input", "output", "params")
        body = [(("  " * max(r.depth - 1, 0)) + (r.name or "(model)"), r.kind, _fmt(r.inputs), _fmt(r.output),
                 f"{r.params:,}") for r in rows]
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        return "\n".join([line(head), line(["-" * w for w in widths]), *(line(b) for b in body)])

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td style='text-align:left'>{'&nbsp;' * 2 * max(r.depth - 1, 0)}{r.name or '(model)'}</td>"
            f"<td>{r.kind}</td><td>{_fmt(r.inputs)}</td><td>{_fmt(r.output)}</td><td>{r.params:,}</td></tr>"
            for r in self.records)
        return ("<table><tr><th>module</th><th>type</th><th>input</th><th>output</th><th>params</th></tr>"
                f"{rows}</table>")

    def record(self, name: str, call: int = 0) -> TraceRecord:
        """The ``call``-th record of module ``name``."""
        matches = [r for r in self.records if r.name == name]
        if not matches:
            raise KeyError(f"module {name!r} was not traced; traced modules: {sorted({r.name for r in self.records})[:30]}")
        return matches[call]

    def output_shape(self, name: str, call: int = 0) -> Any:
        return self.record(name, call).output

    def attention(self, name: str, call: int = -1) -> Tensor:
        """Attention weights ``(b, h, n, m)`` recorded for the Attention module ``name`` (last call by default)."""
        if name not in self.attention_weights:
            hint = "" if self.attention_weights else " (trace(model, attention=True) records them)"
            raise KeyError(f"no attention weights for {name!r}{hint}; have {sorted(self.attention_weights)}")
        return self.attention_weights[name][call]


@contextmanager
def trace(model: nn.Module, *, attention: bool = False, modules: str | None = None,
          max_depth: int | None = None) -> Iterator[Trace]:
    """Record the shapes (and optionally attention weights) of every module call inside the ``with`` block.

    Args:
        model: any ``nn.Module``.
        attention: also record the weights of every ``vlm_lab.nn.Attention`` (slower explicit softmax).
        modules: a glob on dotted names (e.g. ``"visual.*"``) to trace only some modules.
        max_depth: only record shapes of modules at most this deep (root = 0); attention is recorded at any depth.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    t = Trace()
    handles: list[Any] = []
    hooked_attention: list[Attention] = []

    stack: list[TraceRecord] = []

    def make_hooks(name: str, module: nn.Module, depth: int) -> tuple[Callable, Callable]:
        params = sum(p.numel() for p in module.parameters())

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            # rows are created when a module is *called*, so parents come before their children
            inputs = _shapes(list(args) + [v for v in kwargs.values() if isinstance(v, Tensor)])
            rec = TraceRecord(name, type(mod).__name__, depth, inputs, None, params)
            t.records.append(rec)
            stack.append(rec)

        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            stack.pop().output = _shapes(out)
        return pre_hook, hook

    try:
        for name, module in model.named_modules():
            depth = 0 if name == "" else name.count(".") + 1
            if modules is not None and not fnmatch.fnmatch(name, modules):
                continue
            if max_depth is None or depth <= max_depth:
                pre_hook, hook = make_hooks(name, module, depth)
                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
                handles.append(module.register_forward_hook(hook, with_kwargs=True, always_call=True))
            if attention and isinstance(module, Attention):
                if module.weights_hook is not None:
                    raise RuntimeError(f"{name} is already being traced; nested attention traces are not supported")
                module.weights_hook = lambda w, n=name: t.attention_weights.setdefault(n, []).append(w)
                hooked_attention.append(module)
        yield t
    finally:
        for h in handles:
            h.remove()
        for module in hooked_attention:
            module.weights_hook = None


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def cpu_attention_flop_mapping() -> dict:
    """A FLOP formula for PyTorch's CPU attention kernel, which the flop counter does not know (it would count
    attention as free on a CPU while counting it on CUDA and on the meta device): 4 b h n m k, as for CUDA."""
    from torch.utils.flop_counter import sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:  # pragma: no cover - other PyTorch versions
        return {}

    def flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return {op: flops}


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call of ``fn()`` counted by ``torch.utils.flop_counter`` (a multiply-add
    is 2 FLOPs), attention included on every device. Works on the ``meta`` device."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=cpu_attention_flop_mapping()) as counter:
        fn()
    return int(counter.get_total_flops())
