"""Mixture-of-modality-experts (MoME) block: VLMo's Multiway Transformer layer (Bao et al., 2022, sec. 2.1).

One self-attention is **shared** by every modality; the feed-forward part is a set of modality experts,
each with its own pre-norm, chosen by the *kind of input* (not by a learned router)::

    x = x + g1 * SelfAttn(LN_1(x))                          shared by image, text and image-text inputs
    x = x + g2 * FFN_e(LN_2^e(x))                            e = expert picked by the routing below

Routing (unilm ``vlmo/modules/multiway_transformer.py``, ``Block.forward``):

- ``modality="image"``: every token -> the vision expert (``mlp_image``, ``norm2_image``);
- ``modality="text"``: every token -> the language expert (``mlp_text``, ``norm2_text``);
- ``modality="vl"`` (an image-text pair, text first): in a block *without* a vision-language expert the
  first ``num_text_tokens`` go to the language expert and the rest to the vision expert; in a block *with*
  one (VLMo puts it in the top layers only) every token goes to the vision-language expert (``mlp_vl``).

``g1``, ``g2`` are LayerScale vectors (CaiT), initialised to 0.1 in VLMo. As in BEiT/VLMo, the q and v
projections have a bias and k has none. Unused experts receive exactly zero gradient (tests/test_vlmo.py).

Shape letters: b batch, n tokens, t text tokens, d width.
"""

from __future__ import annotations

from torch import Tensor, nn

from .attention import Attention
from .blocks import MLP, LayerScale

MODALITIES = ("image", "text", "vl")


class MoMEBlock(nn.Module):
    """Pre-LN block with a shared self-attention and modality-expert FFNs.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_dim: hidden width of each expert FFN.
        with_vl_expert: add the vision-language expert (VLMo's top blocks).
        act: FFN activation.
        ln_eps: LayerNorm epsilon.
        layer_scale: initial LayerScale value (None = no LayerScale).
        dropout: dropout on attention probabilities and residual branches.
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, with_vl_expert: bool = False,
                 act: str = "gelu", ln_eps: float = 1e-6, layer_scale: float | None = 0.1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = Attention(dim, num_heads, dropout=dropout)
        self.attn.k_proj = nn.Linear(dim, dim, bias=False)  # BEiT / VLMo: q and v biases, no k bias
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.norm2_image = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp_image = MLP(dim, mlp_dim, act=act, dropout=dropout)
        self.norm2_text = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp_text = MLP(dim, mlp_dim, act=act, dropout=dropout)
        self.with_vl_expert = with_vl_expert
        if with_vl_expert:
            self.norm2_vl = nn.LayerNorm(dim, eps=ln_eps)
            self.mlp_vl = MLP(dim, mlp_dim, act=act, dropout=dropout)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop = nn.Dropout(dropout)

    def expert(self, name: str) -> tuple[nn.Module, nn.Module]:
        """``(norm, mlp)`` of the expert ``"image"``, ``"text"`` or ``"vl"``."""
        if name == "vl" and not self.with_vl_expert:
            raise ValueError("this block has no vision-language expert (with_vl_expert=False)")
        return getattr(self, f"norm2_{name}"), getattr(self, f"mlp_{name}")

    def route(self, modality: str) -> str:
        """Which expert(s) this block uses for an input of ``modality``: 'image', 'text', 'vl' or 'split'."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if modality == "vl":
            return "vl" if self.with_vl_expert else "split"
        return modality

    def _ffn(self, x: Tensor, name: str) -> Tensor:
        norm, mlp = self.expert(name)
        return mlp(norm(x))

    def forward(self, x: Tensor, modality: str, *, key_padding_mask: Tensor | None = None,
                num_text_tokens: int | None = None) -> Tensor:
        """``x`` ``(b, n, d)``; for ``modality="vl"`` the first ``num_text_tokens`` tokens are the text."""
        h = self.attn(self.norm1(x), key_padding_mask=key_padding_mask)
        x = x + self.drop(self.ls1(h))
        route = self.route(modality)
        if route == "split":
            if num_text_tokens is None or not 0 < num_text_tokens < x.shape[1]:
                raise ValueError(f"modality='vl' needs 0 < num_text_tokens < {x.shape[1]}, got {num_text_tokens}")
            t = num_text_tokens
            y = x.new_empty(x.shape)
            y[:, :t] = self._ffn(x[:, :t], "text")  # (b, t, d) language expert
            y[:, t:] = self._ffn(x[:, t:], "image")  # (b, n - t, d) vision expert
        else:
            y = self._ffn(x, route)
        return x + self.drop(self.ls2(y))
