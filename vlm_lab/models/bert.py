"""A BERT-style (post-LayerNorm) text transformer with optional cross-attention, shared by ALBEF and BLIP.

BERT (Devlin et al., 2019) as ALBEF's ``xbert.py`` and BLIP's ``med.py`` extend it: each layer is

    x = LN(x + SelfAttn(x))                     bi-directional (encoder) or causal (BLIP's decoder)
    x = LN(x + CrossAttn(x, image))             only in layers built with cross-attention, and only when an
                                                image is given (``mode='text'`` skips it, as ``med.py`` does)
    x = LN(x + FFN(x))                          FFN = fc2(gelu(fc1(x)))

Note the *post*-LN residual (LayerNorm after the sum), unlike the lab's pre-LN ``nn.TransformerBlock``: the
weights of BERT / ALBEF / BLIP checkpoints only reproduce their numbers in this form. Embeddings are word +
absolute position, then LayerNorm (no token types: ALBEF and BLIP never use them).

Names map one-to-one onto Hugging Face ``BlipTextModel`` (``attention.self.query`` -> ``self_attn.q_proj``,
``attention.output.LayerNorm`` -> ``self_norm``, ``crossattention`` -> ``cross_attn`` / ``cross_norm``,
``intermediate.dense`` / ``output.dense`` -> ``mlp.fc1`` / ``mlp.fc2``, ``output.LayerNorm`` -> ``mlp_norm``).

Shape letters: b batch, n text tokens, m image tokens, d width, c image width, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn import MLP, Attention, check_token_ids, get_activation

__all__ = ["BertEmbeddings", "BertLayer", "BertTextEncoder", "BertLMHead", "bert_init"]


class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings, then LayerNorm and dropout: ``(b, n)`` -> ``(b, n, d)``."""

    def __init__(self, vocab_size: int, max_positions: int, width: int, *, ln_eps: float = 1e-12,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.vocab_size, self.max_positions = vocab_size, max_positions
        self.word_embeddings = nn.Embedding(vocab_size, width)
        self.position_embeddings = nn.Embedding(max_positions, width)
        self.norm = nn.LayerNorm(width, eps=ln_eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, input_ids: Tensor) -> Tensor:
        check_token_ids(input_ids, self.vocab_size, self.max_positions)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.drop(self.norm(self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]))


class BertLayer(nn.Module):
    """One post-LN BERT layer: self-attention, optional cross-attention to the image, feed-forward."""

    def __init__(self, width: int, heads: int, mlp_dim: int, *, cross_attention: bool = False,
                 context_dim: int | None = None, ln_eps: float = 1e-12, dropout: float = 0.0,
                 act: str = "gelu") -> None:
        super().__init__()
        self.self_attn = Attention(width, heads, dropout=dropout)
        self.self_norm = nn.LayerNorm(width, eps=ln_eps)
        if cross_attention:
            self.cross_attn = Attention(width, heads, kv_dim=context_dim, dropout=dropout)
            self.cross_norm = nn.LayerNorm(width, eps=ln_eps)
        else:
            self.cross_attn = None
        self.mlp = MLP(width, mlp_dim, act=act, dropout=dropout)
        self.mlp_norm = nn.LayerNorm(width, eps=ln_eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor | None = None, *, key_padding_mask: Tensor | None = None,
                is_causal: bool = False, context_mask: Tensor | None = None) -> Tensor:
        """``x`` ``(b, n, d)``; ``context`` ``(b, m, c)`` or None (then the cross-attention is skipped)."""
        x = self.self_norm(x + self.drop(self.self_attn(x, key_padding_mask=key_padding_mask, is_causal=is_causal)))
        if context is not None:
            if self.cross_attn is None:
                raise ValueError("context was given to a layer built without cross-attention")
            x = self.cross_norm(x + self.drop(self.cross_attn(x, context, key_padding_mask=context_mask)))
        return self.mlp_norm(x + self.mlp(x))


class BertTextEncoder(nn.Module):
    """Embeddings + ``layers`` BERT layers; layers ``>= cross_attention_from`` have cross-attention.

    ALBEF: ``cross_attention_from = layers // 2`` (6 text-only layers, then 6 fusion layers);
    BLIP: ``cross_attention_from = 0`` (every layer can look at the image; text mode skips it).
    ``forward`` can run a slice of layers (``start``, ``end``), which is how ALBEF's text encoder and fusion
    encoder are two halves of one stack.
    """

    def __init__(self, vocab_size: int, max_positions: int, width: int, layers: int, heads: int, mlp_dim: int, *,
                 cross_attention_from: int, context_dim: int, ln_eps: float = 1e-12, dropout: float = 0.0,
                 act: str = "gelu") -> None:
        super().__init__()
        if not 0 <= cross_attention_from <= layers:
            raise ValueError(f"cross_attention_from must be in [0, {layers}], got {cross_attention_from}")
        self.embeddings = BertEmbeddings(vocab_size, max_positions, width, ln_eps=ln_eps, dropout=dropout)
        self.layers = nn.ModuleList(
            BertLayer(width, heads, mlp_dim, cross_attention=i >= cross_attention_from, context_dim=context_dim,
                      ln_eps=ln_eps, dropout=dropout, act=act)
            for i in range(layers))
        self.cross_attention_from = cross_attention_from

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
                embeds: Tensor | None = None, context: Tensor | None = None, is_causal: bool = False,
                start: int = 0, end: int | None = None) -> Tensor:
        """Run layers ``[start, end)`` on ``embed(input_ids)`` (or on ``embeds`` ``(b, n, d)``) -> ``(b, n, d)``.

        ``attention_mask`` ``(b, n)``: 1 = real token. ``context`` ``(b, m, c)``: image tokens for the layers
        that have cross-attention (None = text mode).
        """
        if (input_ids is None) == (embeds is None):
            raise ValueError("pass exactly one of input_ids and embeds")
        x = self.embeddings(input_ids) if embeds is None else embeds
        if attention_mask is not None and attention_mask.shape != x.shape[:2]:
            raise ValueError(f"attention_mask must have shape {tuple(x.shape[:2])}, got {tuple(attention_mask.shape)}")
        for layer in self.layers[start:end]:
            ctx = context if layer.cross_attn is not None else None
            x = layer(x, ctx, key_padding_mask=attention_mask, is_causal=is_causal)
        return x


class BertLMHead(nn.Module):
    """BERT's prediction head: dense -> act -> LayerNorm -> decoder to the vocabulary (``(b, n, d) -> (b, n, V)``)."""

    def __init__(self, width: int, vocab_size: int, *, ln_eps: float = 1e-12, act: str = "gelu") -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = get_activation(act)
        self.norm = nn.LayerNorm(width, eps=ln_eps)
        self.decoder = nn.Linear(width, vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.norm(self.act(self.dense(x))))


def bert_init(*modules: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: N(0, std) weights (BERT: 0.02), zero biases, unit LayerNorms."""
    for root in modules:
        for m in root.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
