"""Momentum encoders, feature queues and momentum distillation (ALBEF, Li et al., 2021, sec. 3.2-3.3; BLIP).

ALBEF keeps a *momentum model*: an exponential moving average (EMA) of the online encoders,

    theta_m <- m * theta_m + (1 - m) * theta                       m = 0.995            (``momentum_update``)

Its features serve twice:

1. as **extra negatives**: queues of the last Q momentum features (Q = 65,536 in ALBEF), so each image is
   contrasted with B + Q captions instead of B (MoCo's trick). The queue is a ring buffer: a batch is written
   at ``ptr`` and ``ptr`` moves by the *global* batch, wrapping at Q, which must be a multiple of it
   (``FeatureQueue``);
2. as **soft targets** (momentum distillation): web captions are noisy, so a one-hot "only my caption
   matches" target is partly wrong. The target mixes in the momentum model's own belief,

       q^{i2t} = alpha * softmax(s_m(I, T_all) / tau) + (1 - alpha) * y^{i2t}               (``distillation_targets``)
       L_itc   = 1/2 E[ H(q^{i2t}, p^{i2t}) + H(q^{t2i}, p^{t2i}) ]                        (``soft_cross_entropy``)

   with alpha = 0.4, ramped up linearly from 0 during the first epoch (``alpha_at``). With ``alpha = 0`` this
   is plain InfoNCE over B + Q columns with the positive of row i in column i.

**The order inside one training step matters** (ALBEF ``model_pretrain.py``)::

    1. temp.clamp_(0.001, 0.5)                 (no grad)
    2. online features (with grad)
    3. momentum_update(), THEN momentum features (no grad)
    4. targets and loss against  cat([batch momentum features; queue.clone()])   -- the queue from BEFORE this step
    5. queue.enqueue(momentum features)        -- only after the loss

Enqueueing first would put the current keys in the queue as extra "negatives" that are in fact positives.

Multi-positive targets (retrieval fine-tuning): with ``ids`` (e.g. image ids), the one-hot part becomes uniform
over every column with the same id, queue included: ``pos = (ids[:, None] == ids_all[None]); y = pos / pos.sum(1)``.

Shape letters: b local batch, W world size, Q queue length, e embedding width.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FeatureQueue", "alpha_at", "concat_all_gather", "copy_params", "distillation_targets",
           "momentum_update", "soft_cross_entropy", "momentum_itc_loss"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def concat_all_gather(x: Tensor) -> Tensor:
    """All-gather ``x`` ``(b, ...)`` from every rank -> ``(W b, ...)``, *without* gradient (queue keys only)."""
    if not _distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def copy_params(pairs: Iterable[tuple[nn.Module, nn.Module]]) -> None:
    """Initialise each momentum module as a copy of its online module and freeze it (ALBEF ``copy_params``)."""
    for online, momentum in pairs:
        for p, p_m in zip(online.parameters(), momentum.parameters(), strict=True):
            p_m.copy_(p.detach())
            p_m.requires_grad_(False)


@torch.no_grad()
def momentum_update(pairs: Iterable[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """EMA step ``p_m = m p_m + (1 - m) p`` for every parameter of every (online, momentum) module pair."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    seen: set[int] = set()  # a tied weight (e.g. MLM decoder = word embeddings) is updated once
    for online, mom in pairs:
        for p, p_m in zip(online.parameters(), mom.parameters(), strict=True):
            if id(p_m) in seen:
                continue
            seen.add(id(p_m))
            p_m.mul_(momentum).add_(p.detach(), alpha=1.0 - momentum)


def alpha_at(step: int, alpha: float, warmup_steps: int) -> float:
    """ALBEF's distillation weight at training step ``step`` (0-based): ``alpha * min(1, step / warmup_steps)``.

    ALBEF ramps over the first epoch (``warmup_steps`` = batches per epoch), BLIP over the first two;
    ``warmup_steps = 0`` means no ramp.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps == 0:
        return float(alpha)
    return float(alpha) * min(1.0, step / warmup_steps)


def distillation_targets(sim_m: Tensor, alpha: float, positives: Tensor | None = None) -> Tensor:
    """Soft ITC targets ``alpha * softmax(sim_m) + (1 - alpha) * y`` ``(b, b + Q)``.

    ``sim_m`` ``(b, b + Q)`` are the momentum similarities already divided by the temperature. ``y`` is one-hot on
    column i for row i (the batch comes first), or, given ``positives`` ``(b, b + Q)`` bool, uniform over the
    positives of each row (every row needs at least one).
    """
    if sim_m.dim() != 2 or sim_m.shape[1] < sim_m.shape[0]:
        raise ValueError(f"sim_m must be (batch, batch + queue), got {tuple(sim_m.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    b = sim_m.shape[0]
    if positives is None:
        y = torch.zeros_like(sim_m, dtype=torch.float32)
        y[:, :b].fill_diagonal_(1.0)
    else:
        if positives.shape != sim_m.shape:
            raise ValueError(f"positives must have shape {tuple(sim_m.shape)}, got {tuple(positives.shape)}")
        pos = positives.float()
        if (pos.sum(1) == 0).any():
            raise ValueError("every row of positives needs at least one True (its own pair)")
        y = pos / pos.sum(1, keepdim=True)
    if alpha == 0.0:
        return y
    return alpha * sim_m.detach().float().softmax(dim=1) + (1.0 - alpha) * y


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``mean_rows( - sum_cols targets * log_softmax(logits) )`` (computed in fp32)."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the same shape")
    return -(F.log_softmax(logits.float(), dim=1) * targets.float()).sum(dim=1).mean()


def momentum_itc_loss(sim_i2t: Tensor, sim_t2i: Tensor, targets_i2t: Tensor, targets_t2i: Tensor) -> Tensor:
    """ALBEF / BLIP ITC: ``(H(q_i2t, p_i2t) + H(q_t2i, p_t2i)) / 2`` over ``(b, b + Q)`` logits and targets."""
    return (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2


class FeatureQueue(nn.Module):
    """Ring buffers of momentum image / text features (and optional ids), with a pointer.

    Buffers (saved in checkpoints, so a resumed run continues with the same negatives): ``image`` ``(Q, e)``,
    ``text`` ``(Q, e)`` (random unit vectors at the start, as ALBEF), ``ids`` ``(Q,)`` (-100 = no id) and
    ``ptr``. ``enqueue`` gathers the batch from every rank (no gradient), writes it at ``ptr`` and moves
    ``ptr`` by the global batch, modulo Q.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"queue size and dim must be positive, got size={size}, dim={dim}")
        self.size = size
        self.register_buffer("image", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("text", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ids", torch.full((size,), -100, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, image_feat: Tensor, text_feat: Tensor, ids: Tensor | None = None) -> None:
        """Write ``(b, e)`` features (and ``(b,)`` ids) of every rank at ``ptr``; ``ptr += W b (mod Q)``."""
        if image_feat.shape != text_feat.shape or image_feat.dim() != 2:
            raise ValueError(f"image_feat and text_feat must both be (batch, e), got {tuple(image_feat.shape)} "
                             f"and {tuple(text_feat.shape)}")
        image_all = concat_all_gather(image_feat.detach())  # (W b, e)
        text_all = concat_all_gather(text_feat.detach())  # (W b, e)
        n = image_all.shape[0]
        if self.size % n:
            raise ValueError(f"the queue size ({self.size}) must be a multiple of the global batch ({n}), "
                             "as in ALBEF: choose queue_size = k * batch_size * world_size")
        ptr = int(self.ptr)
        self.image[ptr:ptr + n] = image_all.to(self.image.dtype)
        self.text[ptr:ptr + n] = text_all.to(self.text.dtype)
        if ids is not None:
            self.ids[ptr:ptr + n] = concat_all_gather(ids.to(self.ids.device).long())
        self.ptr.fill_((ptr + n) % self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.image.shape[1]}"
