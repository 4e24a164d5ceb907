"""Pooling a token sequence into one vector: CLS, end-of-text, mean, and the attention pooler.

- ``cls_pool``: the first token (ViT, BERT, ViLT's pooler input).
- ``eot_pool``: the end-of-text token of a causal text transformer (CLIP). With ``eot_token_id=None`` the
  position is ``input_ids.argmax(-1)`` (OpenAI CLIP, whose EOT id is the largest id); otherwise the *first*
  position holding ``eot_token_id`` (Hugging Face ``CLIPTextModel``). A row without EOT is an error here
  rather than silently pooling position 0.
- ``mean_pool``: average over real tokens (sentence-transformers, MiniLM).
- ``AttentionPooler``: n learned queries cross-attend to the tokens (CoCa, eq. 4; CONCH; open_clip's
  ``AttentionalPooler``): ``(b, m, d_ctx) -> (b, n, d)``.

Shape letters: b batch, n tokens (or queries), m context tokens, d width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import Attention


def cls_pool(x: Tensor) -> Tensor:
    """``(b, n, d) -> (b, d)``: the first token."""
    return x[:, 0]


def eot_positions(input_ids: Tensor, eot_token_id: int | None) -> Tensor:
    """Index of the end-of-text token in each row of ``input_ids`` ``(b, n)`` -> ``(b,)``."""
    if eot_token_id is None:
        return input_ids.argmax(dim=-1)
    is_eot = input_ids == eot_token_id  # (b, n)
    if input_ids.device.type != "meta" and not bool(is_eot.any(dim=-1).all()):
        missing = (~is_eot.any(dim=-1)).nonzero().flatten().tolist()
        raise ValueError(f"input_ids rows {missing} contain no end-of-text token (id {eot_token_id}); "
                         "tokenise with the model's tokenizer, which appends it")
    return is_eot.int().argmax(dim=-1)  # first True


def eot_pool(x: Tensor, input_ids: Tensor, eot_token_id: int | None) -> Tensor:
    """``(b, n, d) -> (b, d)``: the hidden state at each row's end-of-text position."""
    idx = eot_positions(input_ids, eot_token_id)
    return x[torch.arange(x.shape[0], device=x.device), idx]


def mean_pool(x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """``(b, n, d) -> (b, d)``: average over positions where ``attention_mask`` is 1 (all if None)."""
    if attention_mask is None:
        return x.mean(dim=1)
    m = attention_mask.to(x.dtype).unsqueeze(-1)  # (b, n, 1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


class AttentionPooler(nn.Module):
    """n learned queries attend to a token sequence: ``(b, m, d_ctx) -> (b, n, d)``.

    As in CoCa / open_clip: LayerNorm on the context and on the queries, one multi-head cross-attention.
    """

    def __init__(self, dim: int, num_queries: int, num_heads: int, context_dim: int | None = None,
                 ln_eps: float = 1e-5) -> None:
        super().__init__()
        context_dim = dim if context_dim is None else context_dim
        self.query = nn.Parameter(torch.randn(num_queries, dim) * dim**-0.5)
        self.ln_q = nn.LayerNorm(dim, eps=ln_eps)
        self.ln_k = nn.LayerNorm(context_dim, eps=ln_eps)
        self.attn = Attention(dim, num_heads, kv_dim=context_dim)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        b = x.shape[0]
        q = self.ln_q(self.query).unsqueeze(0).expand(b, -1, -1)  # (n, d) -> (b, n, d)
        return self.attn(q, self.ln_k(x), key_padding_mask=key_padding_mask)
