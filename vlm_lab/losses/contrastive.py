"""Contrastive image-text losses: CLIP's symmetric InfoNCE and SigLIP's pairwise sigmoid loss.

CLIP (Radford et al., 2021, Figure 3 pseudocode)::

    logits = np.dot(I_e, T_e.T) * np.exp(t)          # [n, n] scaled pairwise cosine similarities
    labels = np.arange(n)
    loss_i = cross_entropy_loss(logits, labels, axis=0)
    loss_t = cross_entropy_loss(logits, labels, axis=1)
    loss   = (loss_i + loss_t) / 2

SigLIP (Zhai et al., 2023, Algorithm 1)::

    logits = t * I_e @ T_e.T + b                     # [n, n]
    labels = 2 * eye(n) - ones(n)                    # +1 on the diagonal, -1 elsewhere
    loss   = -sum(log_sigmoid(labels * logits)) / n

**Across processes** (``torch.distributed`` initialised, world size W > 1), each rank computes the *local* rows
against the features of every rank, gathered **with gradient**, and its labels are offset by the rank
(open_clip's ``local_loss=True, gather_with_grad=True``)::

    logits_i = s * I_local @ T_all.T       (b, W b)   labels = arange(b) + rank * b
    logits_t = s * T_local @ I_all.T       (b, W b)

The mean of the per-rank losses equals the single-process loss on the concatenated batch, and after DDP
averages gradients over ranks they equal the single-process gradients (the gather's backward sums the
contributions of every rank). ``tests/test_contrastive_distributed.py`` checks both with two gloo processes.

Inputs are L2-normalised embeddings; ``logit_scale`` is the *multiplier* exp(t) (not the log), as in
open_clip's ``ClipLoss``.

Shape letters: b local batch, W world size, d embedding width.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)  # (W b, d)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        b = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * b:(dist.get_rank() + 1) * b]


def distributed_ready() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` ``(b, ...)`` from every rank into ``(W b, ...)``, keeping the gradient path.

    Without an initialised multi-rank process group this returns ``x`` unchanged. Every rank must pass the
    same batch size (checked).
    """
    if not distributed_ready():
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"every rank must use the same local batch size, got {[int(s) for s in sizes]}")
    return _GatherWithGrad.apply(x)


def _check_pair(image_emb: Tensor, text_emb: Tensor) -> None:
    for name, t in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (batch, dim), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if image_emb.shape[0] == 0:
        raise ValueError("image_emb is an empty batch")
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image_emb and text_emb must have the same shape (one caption per image), got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")


def _check_scale(value: Tensor | float, name: str) -> Tensor | float:
    v = float(value.detach()) if isinstance(value, Tensor) else float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return value


def clip_logits(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> tuple[Tensor, Tensor]:
    """Single-process scaled similarity matrices: ``logits_per_image (b, b)`` and its transpose."""
    logits_per_image = logit_scale * image_emb @ text_emb.T  # (b, b)
    return logits_per_image, logits_per_image.T


def clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, *, gather: bool = True) -> Tensor:
    """Symmetric InfoNCE over matching image / text pairs (CLIP's pseudocode; see the module docstring).

    Args:
        image_emb: ``(b, d)`` L2-normalised image embeddings.
        text_emb: ``(b, d)`` L2-normalised text embeddings; row i describes image i.
        logit_scale: the multiplier exp(t) applied to cosine similarities (a scalar tensor or float).
        gather: under ``torch.distributed``, contrast against the features of every rank (local loss with
            gather-with-grad, labels offset by rank). False keeps the loss local to this rank's batch.
    Returns:
        scalar loss ``(CE(rows) + CE(columns)) / 2``.
    """
    _check_pair(image_emb, text_emb)
    _check_scale(logit_scale, "logit_scale")
    b = image_emb.shape[0]
    if gather and distributed_ready():
        all_image, all_text = gather_with_grad(image_emb), gather_with_grad(text_emb)  # (W b, d)
        logits_i = logit_scale * image_emb @ all_text.T  # (b, W b)
        logits_t = logit_scale * text_emb @ all_image.T  # (b, W b)
        labels = torch.arange(b, device=image_emb.device) + dist.get_rank() * b
    else:
        logits_i, logits_t = clip_logits(image_emb, text_emb, logit_scale)
        labels = torch.arange(b, device=image_emb.device)
    return (F.cross_entropy(logits_i.float(), labels) + F.cross_entropy(logits_t.float(), labels)) / 2


def siglip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float,
                *, gather: bool = True) -> Tensor:
    """SigLIP's pairwise sigmoid loss: ``-sum(log_sigmoid(z_ij * (t x_i.y_j + b))) / b`` (Algorithm 1).

    ``logit_scale`` is the multiplier t (SigLIP initialises log t = ln 10) and ``logit_bias`` is b (init -10).
    Under ``torch.distributed`` with ``gather=True`` the local images are scored against every rank's texts
    (gathered with gradient); the mean over ranks equals the single-process loss.
    """
    _check_pair(image_emb, text_emb)
    _check_scale(logit_scale, "logit_scale")
    _check_scale(logit_bias, "logit_bias")
    b = image_emb.shape[0]
    offset = 0
    if gather and distributed_ready():
        text_emb = gather_with_grad(text_emb)  # (W b, d)
        offset = dist.get_rank() * b
    logits = (logit_scale * image_emb @ text_emb.T + logit_bias).float()  # (b, W b) or (b, b)
    labels = -torch.ones_like(logits)
    labels[torch.arange(b), torch.arange(b) + offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / b
