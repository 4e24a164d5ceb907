"""`budget()`: memory per accelerator, FLOPs per step and a time estimate for training a lab model, before renting
the accelerators (chapter 10).

The memory of one training step on one device, in bytes (mixed precision as `fit` does it: fp32 master weights,
fp32 gradients, AdamW's two fp32 moments, activations saved by autocast in bf16 / fp16 where its op lists say so):

    weights       4 P                      (P = all parameters; frozen ones included)
    gradients     4 P_t                    (P_t = trainable parameters)
    optimizer     8 P_t                    (AdamW exp_avg + exp_avg_sq)
    casts         2 P                      (bf16 / fp16 only: autocast's per-forward copies of the weights)
    activations   A(b)                     (tensors autograd saves for backward, measured, see below)
    FSDP2 over N ranks: weights, gradients, optimizer and casts / N, plus the all-gathered full weights of the two
    largest blocks (one in use, one prefetched) and one block's unsharded gradients.

``A(b)`` is measured, not guessed: the model runs one forward on the ``meta`` device (no memory, no compute) inside
``torch.autograd.graph.saved_tensors_hooks``, which sees every tensor autograd keeps for backward; parameters and
tensors already counted (same storage) are skipped. So the figure follows the model's real code (frozen towers
save nothing). Attention is counted as a fused kernel saves it (q, k, v, output, log-sum-exp), as on a GPU;
the CPU's own kernel does the same without a mask and keeps the probabilities with one (the text towers). With activation checkpointing, each block keeps only its
input, and one block's activations exist again during its recomputation. bf16 / fp16: ``HALF_ACTIVATION_FRACTION``
of the fp32 bytes (measured with CPU autocast on the toy CLIP: matmul outputs are half precision, LayerNorm /
softmax / loss inputs stay fp32, and autocast saves some tensors in both precisions).

Peak: during backward, activations are freed while gradients appear, so the peak is below the plain sum; the
estimate is ``weights + optimizer + casts + max(activations + gradients of the largest block, gradients)``
(+ FSDP buffers). ``Budget.total`` is the plain sum, an upper bound.

FLOPs: ``vlm_lab.inspect.count_flops`` of the forward on the meta device (a multiply-add = 2 FLOPs), times 3 for
forward + backward (backward ~ 2 x forward; frozen towers need only their forward: counted once), plus one more
forward of the blocks with activation checkpointing. Time = FLOPs / (peak FLOP/s x utilisation); communication
is not modelled (DDP overlaps the all-reduce with backward; at LLaVA scale FSDP's all-gathers are ~10 % extra).

For the language model of LLaVA-style models (7B and up) a closed form is used instead of building the model:
``lm_budget_params(d, layers, ffn, vocab)`` (Llama: 12 d^2 per layer with SwiGLU 3 d f) and Korthikanti et al.
(2022) activations with flash attention, ~34 s b d bytes per layer in half precision (+ 5 a s^2 b without flash).

Shape letters: b batch per device, s sequence length, d width, f MLP width, a heads, N ranks, P parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Budget", "budget", "activation_bytes", "measure_step_memory", "measure_step_memories",
           "HALF_ACTIVATION_FRACTION", "ACCELERATORS", "PAPER_CONFIGS", "lm_params"]

HALF_ACTIVATION_FRACTION = 0.68  # bytes saved under bf16 / fp16 autocast / bytes saved in fp32 (toy CLIP, CPU)

# Dense bf16 peak FLOP/s (vendor spec sheets; no sparsity).
ACCELERATORS: dict[str, float] = {
    "A100-80GB": 312e12,
    "H100-SXM": 989e12,
    "H200": 989e12,
    "L4": 121e12,
    "RTX-4090": 165e12,
}

# The chapter's run cards: name -> arguments of budget().
PAPER_CONFIGS: dict[str, dict[str, Any]] = {
    "CLIP ViT-B/16 (32,768 global, 256 GPUs)": dict(model="clip", preset="paper", overrides={"variant": "ViT-B/16"},
                                                    batch_size=128, world_size=256, precision="bf16", plan="ddp"),
    "BLIP-2 stage 1 (ViT-g frozen, 1,680 global, 16 GPUs)": dict(model="blip2", preset="paper", batch_size=105,
                                                                  world_size=16, precision="bf16", plan="ddp",
                                                                  text_length=32),
    "CONCH (1,536 global, 8 GPUs)": dict(model="coca", preset="paper", batch_size=192, world_size=8,
                                         precision="bf16", plan="ddp"),
    "LLaVA stage 2 (7B LM, 128 global, 8 GPUs FSDP)": dict(model="llava-7b", batch_size=16, world_size=8,
                                                           precision="bf16", plan="fsdp",
                                                           activation_checkpointing=True, text_length=2048),
}

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class Budget:
    """One training step of one device. Bytes unless named otherwise; see the module docstring for each formula."""

    model: str
    preset: str
    batch_size: int                    # micro-batch per device
    world_size: int                    # devices (data parallel / FSDP ranks)
    grad_accum: int
    precision: str
    plan: str                          # "ddp" or "fsdp"
    activation_checkpointing: bool
    params: int                        # P: all parameters
    trainable: int                     # P_t
    weights: float
    gradients: float
    optimizer: float
    casts: float
    activations: float
    fsdp_buffers: float
    peak: float                        # the estimate of the step's peak (below the plain sum)
    flops_per_step: float              # per device, one optimizer step (all micro-batches)
    peak_flops: float | None = None    # accelerator peak FLOP/s used for the time estimate
    utilization: float = 0.4           # achieved fraction of peak (MFU)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        """Plain sum of every term (an upper bound of the peak)."""
        return (self.weights + self.gradients + self.optimizer + self.casts + self.activations + self.fsdp_buffers)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def step_time_s(self) -> float | None:
        """Seconds per optimizer step from FLOPs / (peak x utilisation); None without a peak."""
        if not self.peak_flops:
            return None
        return self.flops_per_step / (self.peak_flops * self.utilization)

    @property
    def samples_per_s(self) -> float | None:
        """Global samples per second (all devices)."""
        t = self.step_time_s
        return None if t is None else self.global_batch / t

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(total=self.total, global_batch=self.global_batch, step_time_s=self.step_time_s,
                 samples_per_s=self.samples_per_s)
        return d

    def table(self) -> str:
        """A small text table in GiB (and the time estimate when a peak is given)."""
        g = 2.0**30
        rows = [("weights", self.weights), ("gradients", self.gradients), ("optimizer (AdamW)", self.optimizer),
                ("autocast weight copies", self.casts), ("activations", self.activations),
                ("FSDP gather buffers", self.fsdp_buffers), ("peak (estimate)", self.peak),
                ("sum (upper bound)", self.total)]
        lines = [f"{self.model} ({self.preset}), {self.params / 1e6:,.1f} M params ({self.trainable / 1e6:,.1f} M "
                 f"trainable), b={self.batch_size} x accum {self.grad_accum} x {self.world_size} devices "
                 f"(global {self.global_batch}), {self.precision}, {self.plan}"
                 + (", activation checkpointing" if self.activation_checkpointing else "")]
        lines += [f"  {name:<24}{value / g:10.2f} GiB" for name, value in rows]
        lines.append(f"  {'TFLOPs per step/device':<24}{self.flops_per_step / 1e12:10.2f}")
        if self.step_time_s is not None:
            lines.append(f"  {'step time (estimate)':<24}{self.step_time_s:10.3f} s at {self.utilization:.0%} of "
                         f"{self.peak_flops / 1e12:.0f} TFLOP/s -> {self.samples_per_s:,.0f} samples/s")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


# ----------------------------------------------------------------------------------------- measurement


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


@contextlib.contextmanager
def _block_tracker(blocks: list[nn.Module]):
    """Attribute saved tensors to the outermost block running (index), or -1 outside every block."""
    current = [-1]
    handles = []
    for i, blk in enumerate(blocks):
        def pre(_m, _a, i=i):
            if current[0] == -1:
                current[0] = i

        def post(_m, _a, _o, i=i):
            if current[0] == i:
                current[0] = -1

        handles += [blk.register_forward_pre_hook(pre), blk.register_forward_hook(post)]
    try:
        yield current
    finally:
        for h in handles:
            h.remove()


class _FusedAttention(torch.autograd.Function):
    """Stands in for ``F.scaled_dot_product_attention`` while activations are counted: it saves what a fused
    (flash / memory-efficient) kernel saves — q, k, v, the output and one fp32 log-sum-exp per query row — instead
    of the (b, h, n, m) probabilities the math fallback (the only path on ``meta``) would keep."""

    @staticmethod
    def forward(ctx, q, k, v, kwargs):  # noqa: D102 - autograd protocol
        with torch.no_grad():
            out = _SDPA(q, k, v, **kwargs)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (b, h, n)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - counting never runs backward
        raise RuntimeError("budget's attention stand-in is for counting saved tensors only")


_SDPA = torch.nn.functional.scaled_dot_product_attention


@contextlib.contextmanager
def _fused_attention():
    import torch.nn.functional as F

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return _FusedAttention.apply(q, k, v, kwargs)
        return _SDPA(q, k, v, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA


def activation_bytes(model: nn.Module, batch: dict[str, torch.Tensor], *, method: str | None = None,
                     fused_attention: bool = True) -> dict[str, Any]:
    """Bytes of the tensors autograd saves in one forward of ``model`` on ``batch`` (any device; ``meta`` costs
    nothing). Returns ``{"total", "per_block" (list), "block_inputs" (list), "outside_blocks"}``.

    ``method``: the model method to call (default: ``contrastive_features`` when the model has it — the loss is
    added by the caller — else ``forward``). ``fused_attention``: count attention as a fused GPU kernel saves it
    (q, k, v, output, log-sum-exp; what training on a GPU uses) rather than as the math fallback (probabilities).
    """
    from vlm_lab.train.parallel import blocks as find_blocks

    blocks = find_blocks(model)
    params = {_storage_key(p) for p in model.parameters()}
    seen: set[int] = set()
    per_block = [0] * len(blocks)
    inputs = [0] * len(blocks)
    outside = 0

    def input_hook(i):
        def hook(_m, args, kwargs=None):
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and inputs[i] == 0:
                inputs[i] = x.numel() * x.element_size()
        return hook

    handles = [blk.register_forward_pre_hook(input_hook(i)) for i, blk in enumerate(blocks)]
    with _block_tracker(blocks) as current:
        keep: list[torch.Tensor] = []  # holds what was seen, so no id is reused while counting

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal outside
            root = t._base if t._base is not None else t  # a view (a linear's flattened input) is its base
            key, rid = _storage_key(t), id(root)
            if key in params or _storage_key(root) in params or key in seen or rid in seen:
                return t
            seen.update((key, rid))
            keep.append(root)
            nbytes = t.untyped_storage().nbytes()
            if current[0] >= 0:
                per_block[current[0]] += nbytes
            else:
                outside += nbytes
            return t

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                    (_fused_attention() if fused_attention else contextlib.nullcontext()):
                name = method or ("contrastive_features" if hasattr(model, "contrastive_features") else "forward")
                out = model(batch) if name == "forward" else getattr(model, name)(batch)
        finally:
            for h in handles:
                h.remove()
    del out
    return {"total": outside + sum(per_block), "per_block": per_block, "block_inputs": inputs,
            "outside_blocks": outside}


def _batch_for(model: nn.Module, b: int, text_length: int | None, device: str) -> dict[str, torch.Tensor]:
    c = model.config
    size = getattr(c, "image_size", 224)
    n = text_length or getattr(c, "context_length", None) or min(getattr(c, "max_text_length", 32), 32)
    ids = torch.zeros(b, n, dtype=torch.long, device=device)
    batch = {"pixel_values": torch.zeros(b, 3, size, size, device=device), "input_ids": ids,
             "attention_mask": torch.ones(b, n, dtype=torch.long, device=device)}
    if device != "meta":
        eot = getattr(c, "eot_token_id", None)
        ids[:, -1] = eot if eot is not None else 1
    return batch


def _flops(model: nn.Module, batch: dict, method: str) -> tuple[float, float]:
    """(forward FLOPs of trainable paths, forward FLOPs of frozen modules) on the given batch."""
    from torch.utils.flop_counter import FlopCounterMode

    from vlm_lab.inspect.trace import cpu_attention_flop_mapping

    with FlopCounterMode(display=False, custom_mapping=cpu_attention_flop_mapping()) as counter:
        model(batch) if method == "forward" else getattr(model, method)(batch)
    total = float(counter.get_total_flops())
    frozen = 0.0
    per_module = counter.get_flop_counts()
    names = {n for n, m in model.named_modules()
             if n and any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())}
    top = {n for n in names if not any(n.startswith(o + ".") for o in names if o != n)}
    prefix = type(model).__name__
    for n in top:
        counts = per_module.get(f"{prefix}.{n}", {})
        frozen += float(sum(counts.values()))
    return total, frozen


def lm_params(d: int = 4096, layers: int = 32, ffn: int = 11008, vocab: int = 32000, tied: bool = False) -> int:
    """Parameters of a Llama-style decoder: per layer 4 d^2 (attention) + 3 d f (SwiGLU) + 2 d (RMSNorm); plus the
    embedding and the LM head (v d each unless tied). Llama-2 7B / Vicuna-7B: 6.74 B."""
    return layers * (4 * d * d + 3 * d * ffn + 2 * d) + vocab * d * (1 if tied else 2) + d


def _llava_7b(b: int, s: int, precision: str, ac: bool) -> dict[str, Any]:
    """Closed form for LLaVA-1.5 stage 2: CLIP ViT-L/14-336 frozen (304 M), MLP projector (21 M), Vicuna-7B
    trained; s tokens (576 image tokens + text)."""
    d, layers, ffn, vocab = 4096, 32, 11008, 32000
    p_lm = lm_params(d, layers, ffn, vocab)
    p_vit, p_proj = 304_000_000, 1024 * 4096 + 4096 * 4096 + 2 * 4096
    half = _BYTES.get(precision, 4) == 2
    act_layer = 34 * s * b * d if half else 68 * s * b * d  # Korthikanti: 34 s b d bytes in 16 bit (flash attn.)
    block_input = s * b * d * (2 if half else 4)
    outside = s * b * vocab * (2 + 4) + s * b * d * 4  # logits (half) + fp32 log-softmax, embeddings
    per_block = [act_layer] * layers
    act = outside + (sum(per_block) if not ac else layers * block_input + act_layer)
    fwd_lm = 2 * p_lm * s * b + 4 * layers * s * s * d * b / 2  # causal attention: half the s^2 terms
    fwd_vit = 2 * p_vit * 577 * b
    return {"params": p_lm + p_vit + p_proj, "trainable": p_lm + p_proj, "activations": act,
            "largest_block": 4 * d * d + 3 * d * ffn, "flops_trainable_fwd": fwd_lm + 2 * p_proj * 576 * b,
            "flops_frozen_fwd": fwd_vit, "block_fwd": fwd_lm - 2 * vocab * d * s * b}


def budget(model: str | nn.Module = "clip", preset: str = "toy", *, batch_size: int = 32, precision: str = "bf16",
           plan: str = "ddp", world_size: int = 1, grad_accum: int = 1, activation_checkpointing: bool = False,
           overrides: dict[str, Any] | None = None, text_length: int | None = None,
           accelerator: str | float | None = None, utilization: float = 0.4) -> Budget:
    """Per-device memory, FLOPs per step and a time estimate for training ``model``.

    Args:
        model: a registry name ("clip", "blip2", "coca", ...), "llava-7b" (closed form), or a built model (its
            parameters are not touched; activations are measured on a meta copy when the model is on meta,
            otherwise on the model itself with a real forward).
        preset: the model config preset ("toy", "small", "paper"); ``overrides`` are passed to it.
        batch_size: micro-batch per device. grad_accum: micro-batches per optimizer step.
        precision: "fp32", "bf16" or "fp16" (autocast with fp32 master weights, as fit does).
        plan: "ddp" (replicas) or "fsdp" (FSDP2: weights, gradients, optimizer sharded over ``world_size``).
        text_length: caption / sequence tokens (default: the model's context length, or 32).
        accelerator: a name in ``ACCELERATORS`` or a peak FLOP/s number, for the time estimate.
        utilization: the fraction of the peak actually reached (model-FLOP utilisation).
    """
    if precision not in _BYTES:
        raise ValueError(f"precision: expected one of {sorted(_BYTES)}, got {precision!r}")
    if plan not in ("ddp", "fsdp"):
        raise ValueError(f"plan: expected 'ddp' or 'fsdp', got {plan!r}")
    for name, v in (("batch_size", batch_size), ("world_size", world_size), ("grad_accum", grad_accum)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization: expected a fraction in (0, 1], got {utilization!r}")
    peak_flops = None
    if accelerator is not None:
        if isinstance(accelerator, str):
            if accelerator not in ACCELERATORS:
                raise ValueError(f"accelerator: expected one of {sorted(ACCELERATORS)} or a FLOP/s number, "
                                 f"got {accelerator!r}")
            peak_flops = ACCELERATORS[accelerator]
        else:
            peak_flops = float(accelerator)
    half = precision != "fp32"
    notes: list[str] = []

    if model == "llava-7b":
        name = "llava-7b"
        preset = "paper"
        f = _llava_7b(batch_size, text_length or 2048, precision, activation_checkpointing)
        P, Pt, act, largest = f["params"], f["trainable"], f["activations"], f["largest_block"]
        fwd_t, fwd_f, block_fwd = f["flops_trainable_fwd"], f["flops_frozen_fwd"], f["block_fwd"]
        notes.append("closed form (Llama-2-7B shapes, Korthikanti et al. 2022 activations with flash attention)")
    else:
        from vlm_lab.train.parallel import blocks as find_blocks

        if isinstance(model, nn.Module):
            net, name = model, type(model).__name__
        else:
            from vlm_lab.models.registry import build_model

            name = model
            with torch.device("meta"):
                net = build_model(model, preset, **(overrides or {}))
        device = next(net.parameters()).device.type
        net.train()
        method = "contrastive_features" if hasattr(net, "contrastive_features") else "forward"
        batch = _batch_for(net, batch_size, text_length, device)
        measured = activation_bytes(net, batch, method=method)
        frac = HALF_ACTIVATION_FRACTION if half else 1.0
        per_block = measured["per_block"]
        if activation_checkpointing and per_block:
            act = measured["outside_blocks"] + sum(measured["block_inputs"]) + max(per_block)
        else:
            act = measured["total"]
        act *= frac
        if method == "contrastive_features":  # the loss: logits against the global batch, softmax, both directions
            g = batch_size * world_size
            act += 3 * 2 * batch_size * g * 4
        P = sum(p.numel() for p in net.parameters())
        Pt = sum(p.numel() for p in net.parameters() if p.requires_grad)
        blks = find_blocks(net)
        largest = max((sum(p.numel() for p in b.parameters()) for b in blks), default=0)
        fwd_total, fwd_f = _flops(net, batch, method)
        fwd_t = fwd_total - fwd_f
        block_fwd = fwd_t  # approximation: recomputation covers (nearly) all trainable forward FLOPs
        if isinstance(model, str):
            del net

    n = world_size if plan == "fsdp" else 1
    weights = 4 * P / n
    grads = 4 * Pt / n
    opt = 8 * Pt / n
    casts = (2 * P / n) if half else 0.0
    fsdp = (2 * 4 * largest + 4 * largest) if plan == "fsdp" and world_size > 1 else 0.0
    peak = weights + opt + casts + fsdp + max(act + 4 * largest, grads)
    if plan == "ddp" and world_size > 1:
        notes.append("DDP also holds gradient buckets (~25 MB each) for the all-reduce; not counted")
    flops_micro = 3 * fwd_t + fwd_f + (block_fwd if activation_checkpointing else 0)
    return Budget(model=name, preset=preset, batch_size=batch_size, world_size=world_size, grad_accum=grad_accum,
                  precision=precision, plan=plan, activation_checkpointing=activation_checkpointing, params=int(P),
                  trainable=int(Pt), weights=weights, gradients=grads, optimizer=opt, casts=casts, activations=act,
                  fsdp_buffers=fsdp, peak=peak, flops_per_step=flops_micro * grad_accum, peak_flops=peak_flops,
                  utilization=utilization, notes=notes)


# ------------------------------------------------------------------------------------ CPU measurement


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _measure_here(spec: dict[str, Any]) -> dict[str, float]:
    """Run in a fresh process (see `measure_step_memory`): baseline RSS, build, one warm-up step (AdamW state is
    created), reset the high-water mark, one measured step."""
    import gc

    from vlm_lab.models.registry import build_model
    from vlm_lab.train.parallel import apply_activation_checkpointing

    torch.set_num_threads(1)

    def setup(batch_size: int) -> tuple:
        torch.manual_seed(0)
        net = build_model(spec["model"], spec.get("preset", "toy"), **spec.get("overrides", {}))
        net.train()
        if spec.get("activation_checkpointing"):
            apply_activation_checkpointing(net)
        batch = _batch_for(net, batch_size, spec.get("text_length"), "cpu")
        batch["pixel_values"].normal_()
        return net, batch, torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)

    def step(net: nn.Module, batch: dict, opt: torch.optim.Optimizer) -> None:
        out = net(batch)
        loss = out if isinstance(out, torch.Tensor) else out.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # warm-up at batch 2 (kernel caches, thread pools, lazy imports: memory that is not the model's), then free it
    net, batch, opt = setup(2)
    step(net, batch, opt)
    del net, batch, opt
    gc.collect()
    base = _rss_kib("VmRSS") * 1024
    net, batch, opt = setup(spec["batch_size"])
    step(net, batch, opt)  # AdamW state appears
    gc.collect()
    after_setup = _rss_kib("VmRSS") * 1024 - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    step(net, batch, opt)
    peak = _rss_kib("VmHWM") * 1024 - base
    return {"peak": float(peak), "after_setup": float(after_setup)}


def measure_step_memory(model: str, preset: str = "toy", *, batch_size: int = 32,
                        overrides: dict[str, Any] | None = None, text_length: int | None = None,
                        activation_checkpointing: bool = False, timeout_s: float = 120.0) -> dict[str, float]:
    """Measured bytes of one fp32 AdamW training step on the CPU (Linux), to check `budget` against.

    A fresh Python process (started with ``MALLOC_MMAP_THRESHOLD_=65536``, so freed tensors go back to the OS and
    the resident set follows live memory) runs a warm-up step at batch 2 and frees it (kernel caches and thread
    pools are not the model's memory), records its resident set, builds the model, runs one step (AdamW's state
    appears), resets the high-water mark (``/proc/self/clear_refs``) and runs one more step. Returns
    ``{"peak": VmHWM - baseline, "after_setup": resident after the first step - baseline}`` in bytes (the latter
    = weights + AdamW state + the batch + allocator slack).
    """
    spec = {"model": model, "preset": preset, "batch_size": batch_size, "overrides": overrides or {},
            "text_length": text_length, "activation_checkpointing": activation_checkpointing}
    return measure_step_memories([spec], timeout_s=timeout_s)[0]


def measure_step_memories(specs: list[dict[str, Any]], timeout_s: float = 180.0) -> list[dict[str, float]]:
    """`measure_step_memory` for several configs (dicts of its keyword arguments) in one measuring process."""
    import json
    import subprocess
    import sys

    specs = [{"preset": "toy", "overrides": {}, "text_length": None, "activation_checkpointing": False, **s}
             for s in specs]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    code = ("import json, sys; from vlm_lab.inspect.budget import _measure_here; "
            "print(json.dumps([_measure_here(s) for s in json.loads(sys.argv[1])]))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(specs)], capture_output=True, text=True, env=env,
                          timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"measure_step_memory: the measuring process failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
