"""Multi-head attention: self, cross and causal, on ``F.scaled_dot_product_attention``.

One module serves every model in the lab. It follows the Transformer paper (Vaswani et al., 2017, eq. 1):

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head) + M) V

with separate q / k / v projections (as Hugging Face's CLIP, BERT and BLIP do, which keeps weight loading a
plain copy) and an optional key/value input of another width for cross-attention.

Masks use one convention everywhere in the lab: **True (or 1) means "may attend"**.

- ``key_padding_mask``: ``(b, m)``, 1 for real keys, 0 for padding;
- ``attn_mask``: boolean ``(n, m)``, ``(b, n, m)`` or ``(b, h, n, m)``, True where attention is allowed;
- ``is_causal``: query i sees keys j <= i (queries and keys must then have the same length).

Looking inside: the fast path never materialises the attention matrix. When a ``vlm_lab.inspect.trace`` asks
for attention weights it sets ``self.weights_hook``; the module then computes the softmax explicitly (same
numbers) and hands the weights ``(b, h, n, m)`` to the hook. Nothing else in a model needs to know.

Shape letters: b batch, n query tokens, m key tokens, d width, h heads, k head width (d = h k).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _as_bool_mask(mask: Tensor, name: str) -> Tensor:
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_floating_point:
        raise TypeError(f"{name} must be a boolean or integer 0/1 mask (True = may attend), got {mask.dtype}")
    return mask != 0


def build_attention_mask(
    b: int,
    n: int,
    m: int,
    *,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    device: torch.device | None = None,
) -> Tensor | None:
    """Combine padding, explicit and causal masks into one boolean mask ``(b, 1 | h, n, m)`` (True = attend).

    Returns None when there is nothing to mask.
    """
    mask: Tensor | None = None
    if key_padding_mask is not None:
        kpm = _as_bool_mask(key_padding_mask, "key_padding_mask")
        if kpm.shape != (b, m):
            raise ValueError(f"key_padding_mask must have shape (batch, keys) = {(b, m)}, got {tuple(kpm.shape)}")
        mask = kpm[:, None, None, :]  # (b, 1, 1, m)
    if attn_mask is not None:
        am = _as_bool_mask(attn_mask, "attn_mask")
        if am.dim() == 2:
            am = am[None, None]  # (1, 1, n, m)
        elif am.dim() == 3:
            am = am[:, None]  # (b, 1, n, m)
        elif am.dim() != 4:
            raise ValueError(f"attn_mask must be 2-, 3- or 4-D, got shape {tuple(attn_mask.shape)}")
        if am.shape[-2:] != (n, m):
            raise ValueError(f"attn_mask must end in (queries, keys) = {(n, m)}, got {tuple(attn_mask.shape)}")
        mask = am if mask is None else mask & am
    if is_causal:
        if n != m:
            raise ValueError(f"is_causal needs as many queries as keys, got {n} queries and {m} keys")
        causal = torch.ones(n, m, dtype=torch.bool, device=device).tril()[None, None]  # (1, 1, n, m)
        mask = causal if mask is None else mask & causal
    return mask


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention with separate q / k / v projections.

    Args:
        dim: width of the queries (and of the output).
        num_heads: number of heads; ``dim`` must be divisible by it.
        kv_dim: width of the keys / values input for cross-attention (defaults to ``dim``).
        qkv_bias: whether q, k, v projections have a bias.
        out_bias: whether the output projection has a bias.
        dropout: dropout on the attention probabilities (training only).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        kv_dim: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        kv_dim = dim if kv_dim is None else kv_dim
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim, bias=out_bias)
        self.dropout = dropout
        # Set by vlm_lab.inspect.trace(attention=True); receives the weights (b, h, n, m).
        self.weights_hook: Callable[[Tensor], None] | None = None

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (b, t, d) -> (b, h, t, k)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """Attend from ``x`` ``(b, n, dim)`` to ``context`` ``(b, m, kv_dim)`` (``x`` itself when None)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (batch, tokens, {self.dim}), got {tuple(x.shape)}")
        kv = x if context is None else context
        if kv.dim() != 3 or kv.shape[0] != x.shape[0]:
            raise ValueError(f"context must have shape (batch={x.shape[0]}, tokens, width), got {tuple(kv.shape)}")
        b, n, _ = x.shape
        m = kv.shape[1]
        q = self._heads(self.q_proj(x))  # (b, h, n, k)
        k = self._heads(self.k_proj(kv))  # (b, h, m, k)
        v = self._heads(self.v_proj(kv))  # (b, h, m, k)
        p = self.dropout if self.training else 0.0

        only_causal = is_causal and key_padding_mask is None and attn_mask is None
        if self.weights_hook is None and only_causal:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            mask = build_attention_mask(
                b, n, m, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal,
                device=x.device,
            )
            if self.weights_hook is None:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            else:  # explicit softmax so the weights can be recorded; same numbers as the fused kernel
                scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5  # (b, h, n, m)
                if mask is not None:
                    scores = scores.masked_fill(~mask, float("-inf"))
                weights = scores.softmax(dim=-1)
                self.weights_hook(weights.detach())
                out = F.dropout(weights, p=p) @ v  # (b, h, n, k)
        out = out.transpose(1, 2).reshape(b, n, self.dim)  # (b, h, n, k) -> (b, n, d)
        return self.out_proj(out)
