"""Pre-LN transformer blocks and the Encoder stack every lab model is assembled from.

A block is the residual recipe of GPT-2 / CLIP / ViT (pre-layer-norm):

    x = x + SelfAttn(LN(x))                      (optionally causal, with padding mask)
    x = x + CrossAttn(LN(x), context)            (only when built with ``cross_attention=True``)
    x = x + MLP(LN(x))                           MLP = fc2(act(fc1(x)))

``layer_scale`` multiplies each residual branch by a learnable per-channel vector (CaiT; used by VLMo).

Shape letters: b batch, n tokens, m context tokens, d width.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Attention


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    """Look an activation up by name (``gelu``, ``gelu_tanh``, ``quick_gelu``, ``relu``, ``silu``)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {name!r}") from None


class MLP(nn.Module):
    """Position-wise feed-forward network: fc2(act(fc1(x)))."""

    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu", dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act_name = act
        self.act = get_activation(act)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class LayerScale(nn.Module):
    """Learnable per-channel scale of a residual branch (Touvron et al., CaiT, 2021)."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class TransformerBlock(nn.Module):
    """Pre-LN block: self-attention, optional cross-attention, MLP; each a residual branch.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_dim: hidden width of the MLP.
        act: MLP activation name.
        cross_attention: add a cross-attention sub-layer attending to a ``context``.
        context_dim: width of the context (defaults to ``dim``).
        ln_eps: LayerNorm epsilon.
        layer_scale: initial LayerScale value, or None for no LayerScale.
        dropout: dropout on attention probabilities and residual branches.
        qkv_bias: bias on the q / k / v projections.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        *,
        act: str = "gelu",
        cross_attention: bool = False,
        context_dim: int | None = None,
        ln_eps: float = 1e-5,
        layer_scale: float | None = None,
        dropout: float = 0.0,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, dropout=dropout)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        if cross_attention:
            self.norm_cross = nn.LayerNorm(dim, eps=ln_eps)
            self.cross_attn = Attention(dim, num_heads, kv_dim=context_dim, qkv_bias=qkv_bias, dropout=dropout)
            self.ls_cross = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        else:
            self.cross_attn = None
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = MLP(dim, mlp_dim, act=act, dropout=dropout)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """``x`` ``(b, n, d)``; ``context`` ``(b, m, d_ctx)`` is required iff the block has cross-attention."""
        h = self.attn(self.norm1(x), key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop(self.ls1(h))
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this block has cross-attention: pass context=(batch, tokens, width)")
            h = self.cross_attn(self.norm_cross(x), context, key_padding_mask=context_mask)
            x = x + self.drop(self.ls_cross(h))
        elif context is not None:
            raise ValueError("context was given but this block was built without cross_attention")
        return x + self.drop(self.ls2(self.mlp(self.norm2(x))))


class Encoder(nn.Module):
    """A stack of ``TransformerBlock``s (all sharing one mask), optionally with a final LayerNorm.

    ``cross_attention_every=k`` puts cross-attention in blocks 0, k, 2k, ... (BLIP-2's Q-Former uses k=2);
    ``cross_attention_every=1`` in every block; 0 in none.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        *,
        act: str = "gelu",
        cross_attention_every: int = 0,
        context_dim: int | None = None,
        ln_eps: float = 1e-5,
        layer_scale: float | None = None,
        dropout: float = 0.0,
        qkv_bias: bool = True,
        final_norm: bool = False,
    ) -> None:
        super().__init__()
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim, num_heads, mlp_dim, act=act,
                cross_attention=cross_attention_every > 0 and i % cross_attention_every == 0,
                context_dim=context_dim, ln_eps=ln_eps, layer_scale=layer_scale, dropout=dropout, qkv_bias=qkv_bias,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=ln_eps) if final_norm else nn.Identity()

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        for block in self.blocks:
            ctx = context if block.cross_attn is not None else None
            x = block(x, ctx, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal,
                      context_mask=context_mask if ctx is not None else None)
        return self.norm(x)
