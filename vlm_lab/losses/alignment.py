"""Word-patch alignment (WPA) by optimal transport, computed with IPOT (ViLT, Kim et al., 2021, sec. 3.2).

ViLT (after UNITER, Chen et al., 2020) asks the words of a *matching* caption to sit close to the image
patches in the fused space, measured by the optimal-transport distance between the two sets of tokens::

    C_ij = 1 - cos(t_i, v_j)                     cost of moving word i to patch j        (b, m, n)
    T*   = argmin_{T in U(mu, nu)} <T, C>        mu = 1/m on valid words, nu = 1/n on valid patches
    D    = <T*, C> = trace(C^T T*)               the transport (Wasserstein) distance
    loss = w * (sum_pos D - sum_neg D) / B       w = 0.1: pull matching pairs together, push others apart

T* is found with IPOT (Xie et al., 2019): a proximal-point method whose inner step is one Sinkhorn
scaling. With ``G = exp(-C / beta)`` and ``T = 1 1^T``::

    repeat `iterations` times:
        Q = G * T                                 (elementwise)
        repeat k times:  a = mu / (Q b);  b = nu / (Q^T a)
        T = diag(a) Q diag(b)

Unlike plain Sinkhorn it converges to the *exact* transport plan (not an entropy-blurred one).
ViLT's ``ipot`` / ``optimal_transport_dist`` (``vilt/modules/objectives.py``) do exactly this with
beta = 0.5, 50 iterations, k = 1, and the choices are the same here:

- the plan is computed **without gradient** from ``C.detach()``; the gradient reaches the tokens only
  through the cost in ``<T, C>`` (envelope theorem: at the optimum dD/dC = T*);
- only valid positions take part: padded words / patches get zero mass and contribute no cost (the model
  drops [CLS], the last valid text token [SEP] and the image [CLS] before calling this);
- it runs in fp32 with autocast disabled (ViLT does the same; ``exp(-C/beta)`` under fp16 underflows).

Shape letters: b batch, m text tokens, n image tokens, d width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cosine_cost(x: Tensor, y: Tensor) -> Tensor:
    """``1 - cos(x_i, y_j)``: ``x (b, m, d)``, ``y (b, n, d)`` -> ``(b, m, n)`` in [0, 2]."""
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"x and y must be (batch, tokens, width) with the same batch and width, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    return 1.0 - F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).transpose(1, 2)  # (b, m, n)


def _check_masks(cost: Tensor, x_valid: Tensor, y_valid: Tensor) -> None:
    b, m, n = cost.shape
    if x_valid.shape != (b, m) or y_valid.shape != (b, n):
        raise ValueError(f"x_valid must be (batch, m) = {(b, m)} and y_valid (batch, n) = {(b, n)}, got "
                         f"{tuple(x_valid.shape)} and {tuple(y_valid.shape)}")
    if not (x_valid.bool().any(1).all() and y_valid.bool().any(1).all()):
        raise ValueError("every row needs at least one valid position on each side (x_valid, y_valid)")


@torch.no_grad()
def ipot(cost: Tensor, x_valid: Tensor, y_valid: Tensor, *, beta: float = 0.5, iterations: int = 50,
         k: int = 1) -> Tensor:
    """Transport plan ``T (b, m, n)`` between uniform masses on the valid rows / columns of ``cost``.

    Rows of ``T`` sum to 1/m_valid on valid positions and 0 on padding; columns likewise (after
    convergence). No gradient (the plan is a constant for the loss).
    """
    if cost.dim() != 3:
        raise ValueError(f"cost must be (batch, m, n), got {tuple(cost.shape)}")
    if beta <= 0 or iterations < 1 or k < 1:
        raise ValueError(f"beta must be > 0 and iterations, k >= 1; got {beta}, {iterations}, {k}")
    _check_masks(cost, x_valid, y_valid)
    c = cost.detach().float()
    xv, yv = x_valid.bool(), y_valid.bool()
    joint = xv[:, :, None] & yv[:, None, :]  # (b, m, n)
    mu = xv.float() / xv.sum(1, keepdim=True)  # (b, m) 1/m_valid on valid words
    nu = yv.float() / yv.sum(1, keepdim=True)  # (b, n)
    G = torch.exp(-c / beta) * joint  # (b, m, n)
    T = joint.float()
    bvec = torch.ones_like(nu)
    for _ in range(iterations):
        Q = G * T
        for _ in range(k):
            a = mu / (Q @ bvec[..., None]).squeeze(-1).clamp_min(1e-30)  # (b, m)
            bvec = nu / (Q.transpose(1, 2) @ a[..., None]).squeeze(-1).clamp_min(1e-30)  # (b, n)
        T = a[:, :, None] * Q * bvec[:, None, :]
    return T * joint


def transport_distance(x: Tensor, y: Tensor, x_valid: Tensor, y_valid: Tensor, *, beta: float = 0.5,
                       iterations: int = 50, k: int = 1) -> tuple[Tensor, Tensor]:
    """OT distance ``<T*, C>`` per row ``(b,)`` (gradient through C only) and the plan ``T* (b, m, n)``."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        cost = cosine_cost(x.float(), y.float())  # (b, m, n)
        joint = x_valid.bool()[:, :, None] & y_valid.bool()[:, None, :]
        cost = cost.masked_fill(~joint, 0.0)
        plan = ipot(cost, x_valid, y_valid, beta=beta, iterations=iterations, k=k)
        return (cost * plan).sum(dim=(1, 2)), plan


def wpa_loss(text_feats: Tensor, image_feats: Tensor, text_valid: Tensor, image_valid: Tensor,
             is_match: Tensor, *, weight: float = 0.1, beta: float = 0.5, iterations: int = 50,
             k: int = 1) -> Tensor:
    """ViLT's word-patch alignment loss ``weight * (sum_pos D - sum_neg D) / B``.

    Args:
        text_feats: ``(b, m, d)`` fused word tokens (without [CLS]/[SEP]); image_feats ``(b, n, d)`` patches.
        text_valid / image_valid: ``(b, m)`` / ``(b, n)`` 1 for positions that take part.
        is_match: ``(b,)`` bool or 0/1, whether the pair is a true image-caption pair.
    """
    if is_match.shape != (text_feats.shape[0],):
        raise ValueError(f"is_match must be (batch,) = ({text_feats.shape[0]},), got {tuple(is_match.shape)}")
    dist, _ = transport_distance(text_feats, image_feats, text_valid, image_valid, beta=beta,
                                 iterations=iterations, k=k)
    pos = is_match.bool()
    return weight * (dist[pos].sum() - dist[~pos].sum()) / dist.shape[0]
