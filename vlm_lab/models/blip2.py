"""BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and LLMs (Li et al., 2023).

The paper's Figure 2 / 3, top to bottom::

    image (b, 3, 224, 224)
      -> frozen ViT (EVA ViT-g/14, 39 blocks)  + ln_vision          image_embeds   (b, 257, 1408)
      -> Q-Former: 32 learned queries cross-attend to the image     query_output   (b, 32, 768)
         stage 1 (representation learning), three objectives, three self-attention masks:
            ITC  queries | text do not see each other; sim = max over queries of cos(query_q, text_cls) / temp
            ITM  queries <-> text bidirectional; logit = itm_head(query outputs) averaged over queries; hard negatives
            ITG  text causal, sees every query; queries never see text; [DEC] replaces [CLS]
         stage 2 (generative learning):
      -> language_projection  Linear(768 -> d_LLM)                  soft visual prompt (b, 32, d_LLM)
      -> frozen LLM (OPT-2.7B: d_LLM 2560) on [prompt vectors; text]; LM loss on the text only

The Q-Former is a BERT-base (post-LayerNorm) whose self-attention layers are *shared* by the query positions and
the text positions; cross-attention to the image (keys and values of width ``vision_width``) sits in blocks
0, 2, 4, ... and touches the query positions only; queries and text have *separate* feed-forward layers
(``query_mlp`` / ``text_mlp``; LAVIS copies the text FFN into the query FFN at initialisation from BERT).

Matches LAVIS ``blip2_qformer.py`` / ``blip2_opt.py`` and Hugging Face ``modeling_blip_2.py``:
``BLIP2.from_hf`` loads ``Blip2ForImageTextRetrieval`` (stage 1: query features, ITC and ITM logits) and
``Blip2ForConditionalGeneration`` / ``Blip2Model`` (stage 2: LLM logits and loss) with identical numbers
(``tests/test_blip2.py``). Choices, written down:

- the ViT is the lab's ``ViT`` without ``ln_pre`` and with a patch bias (EVA / HF); its ``ln_post`` applied to
  *every* token is BLIP-2's ``ln_vision`` (HF folds it into ``post_layernorm``) and, as in LAVIS, stays trainable
  while the rest of the ViT is frozen (``requires_grad=False`` and kept in eval mode by ``train()``);
- ITG runs as LAVIS does -- the text pass reuses the query states of the ITC query pass as a key/value prefix
  (LAVIS's ``past_key_values``) -- which equals one pass over ``[queries; text]`` with the UniLM mask
  ``qformer_mask("itg", ...)`` (a test checks it); text positions restart at 0 after the queries;
- ITC is computed within the local batch (LAVIS gathers other ranks' features without gradient; the lab's
  contrastive losses in ``vlm_lab.losses.contrastive`` show the distributed version); label smoothing 0.1;
  the temperature ``temp`` (init 0.07) is learned with no clamp, as in LAVIS;
- ITM hard negatives are drawn from ``softmax(sim)`` with the positive filled with -10000 before the softmax
  (LAVIS); pairs with *identical captions* are excluded as well (the shapes world repeats captions; LAVIS uses
  ``image_id`` for the same purpose). With a batch of one there is no negative: ``loss_itm`` is 0;
- the ITG head is BERT's LM head (dense -> act -> LayerNorm -> decoder); LAVIS ties the decoder to the word
  embeddings, the lab keeps a separate matrix (not shared storage: simpler, safetensors-friendly);
- stage 2 *prepends* the projected queries to the LLM's input embeddings (LAVIS); transformers 5 scatters them
  into ``num_query_tokens`` ``<image>`` placeholder ids instead -- the same sequence, so the same logits;
- the LLM is any transformers causal LM (``vlm_lab.models.lm``: the shipped toy OPT offline, real OPT /
  Llama weights when online and asked); it is frozen.

Shape letters: b batch, p image tokens (1 + g*g), g patches per side, c vision width, q queries, n text tokens,
d Q-Former width, e ITC embedding width, D LLM width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..interop import load_converted, rename_keys, split_qkv
from ..losses.captioning import build_lm_labels, lm_loss
from ..nn import MLP, Attention, ViT, ViTConfig, check_pixel_values, check_token_ids
from ._config import config_from_dict, require_keys
from .lm import CausalLMConfig, build_causal_lm, freeze, lm_config_from_hf

__all__ = ["BLIP2", "BLIP2Config", "BLIP2Output", "QFormer", "QFormerLayer", "qformer_mask", "itc_similarity",
           "sample_hard_negatives", "MASK_MODES"]

MASK_MODES = ("itc", "itm", "itg")


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class BLIP2Config:
    """Hyper-parameters of BLIP-2. Presets: ``toy()`` (CPU, seconds), ``small()``, ``paper()``."""

    stage: int = 1  # 1: Q-Former with its text half and ITC/ITM/ITG heads; 2: Q-Former -> projection -> LLM
    # --- frozen image encoder (EVA ViT-g/14)
    image_size: int = 224  # input pixels per side
    patch_size: int = 14  # ViT patch side; tokens = 1 + (image_size / patch_size)^2
    vision_width: int = 1408  # ViT token width c
    vision_layers: int = 39  # ViT blocks (EVA-g has 40; BLIP-2 drops the last and uses the penultimate features)
    vision_heads: int = 16  # ViT attention heads
    vision_mlp_dim: int = 6144  # ViT MLP hidden width (1408 * 4.3637)
    vision_ln_eps: float = 1e-6  # ViT LayerNorm epsilon (HF used 1e-5 once: a known logit mismatch, LAVIS#418)
    vision_ln_pre: bool = False  # LayerNorm after the patch embeddings (EVA / HF: no; a lab CLIP tower: yes)
    vision_patch_bias: bool = True  # bias in the patch projection (EVA / HF: yes; a lab CLIP tower: no)
    freeze_vision: bool = True  # freeze the ViT (all but ln_vision) and keep it in eval mode
    # --- Q-Former (BERT-base)
    num_query_tokens: int = 32  # learned queries q
    qformer_width: int = 768  # Q-Former width d
    qformer_layers: int = 12  # Q-Former blocks
    qformer_heads: int = 12  # Q-Former attention heads
    qformer_mlp_dim: int = 3072  # Q-Former feed-forward hidden width (both FFNs)
    cross_attention_every: int = 2  # cross-attention in blocks 0, k, 2k, ... (BLIP-2: every other block)
    qformer_ln_eps: float = 1e-12  # BERT's LayerNorm epsilon
    qformer_dropout: float = 0.0  # dropout on attention probabilities and residual branches (BERT: 0.1)
    act: str = "gelu"  # Q-Former activation
    init_std: float = 0.02  # std of the normal init of Q-Former / head weights and queries (BERT's initializer_range)
    # --- Q-Former text half (stage 1)
    vocab_size: int = 30523  # bert-base-uncased's 30,522 WordPiece tokens + [DEC]
    max_text_length: int = 512  # text position table (captions are cut to 32 tokens in the paper)
    dec_token_id: int = 30522  # [DEC]: replaces [CLS] at position 0 for ITG
    # --- stage-1 heads and losses
    embed_dim: int = 256  # ITC embedding width e
    temp_init: float = 0.07  # ITC temperature at initialisation (learned, not clamped)
    itc_label_smoothing: float = 0.1  # label smoothing of ITC's cross-entropies
    itg_label_smoothing: float = 0.1  # label smoothing of ITG's cross-entropy
    # --- stage 2: the frozen LLM
    lm: CausalLMConfig | None = None  # decoder-only LLM (required for stage 2)

    def __post_init__(self) -> None:
        if isinstance(self.lm, dict):
            self.lm = CausalLMConfig.from_dict(self.lm)
        if self.stage not in (1, 2):
            raise ValueError(f"BLIP2Config.stage must be 1 or 2, got {self.stage!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and v <= 0 and f.name not in ("dec_token_id",):
                raise ValueError(f"BLIP2Config.{f.name} must be positive, got {v}")
        if self.image_size % self.patch_size:
            raise ValueError(f"BLIP2Config.image_size ({self.image_size}) must be divisible by "
                             f"patch_size ({self.patch_size})")
        for w, h in (("vision_width", "vision_heads"), ("qformer_width", "qformer_heads")):
            if getattr(self, w) % getattr(self, h):
                raise ValueError(f"BLIP2Config.{w} ({getattr(self, w)}) must be divisible by {h} ({getattr(self, h)})")
        if not 0 <= self.dec_token_id < self.vocab_size:
            raise ValueError(f"BLIP2Config.dec_token_id must be in [0, vocab_size={self.vocab_size}), "
                             f"got {self.dec_token_id}")
        if not (math.isfinite(self.init_std) and self.init_std > 0):
            raise ValueError(f"BLIP2Config.init_std must be a positive number, got {self.init_std}")
        for name in ("itc_label_smoothing", "itg_label_smoothing", "qformer_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"BLIP2Config.{name} must be in [0, 1), got {getattr(self, name)}")
        if not (math.isfinite(self.temp_init) and self.temp_init > 0):
            raise ValueError(f"BLIP2Config.temp_init must be a positive number, got {self.temp_init}")
        if self.stage == 2 and self.lm is None:
            raise ValueError("BLIP2Config.lm is required for stage 2 (e.g. CausalLMConfig.toy())")
        if self.lm is not None and not isinstance(self.lm, CausalLMConfig):
            raise TypeError(f"BLIP2Config.lm must be a CausalLMConfig or None, got {type(self.lm).__name__}")

    @property
    def num_image_tokens(self) -> int:
        return 1 + (self.image_size // self.patch_size) ** 2

    @classmethod
    def toy(cls, **overrides: Any) -> "BLIP2Config":
        """Trains on the 32 px shapes world in about a minute on two CPU cores: ViT 32 px / patch 8 (17 tokens x 64,
        2 blocks, frozen), 8 queries x 64, 4 Q-Former blocks (cross-attention in 0 and 2), text vocabulary 128
        (``shapes_tokenizer``'s 112 tokens + room, [DEC] = 127); stage 2 uses the shipped toy LM (width 96)."""
        base = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=4, vision_mlp_dim=128,
                    num_query_tokens=8, qformer_width=64, qformer_layers=4, qformer_heads=4, qformer_mlp_dim=128,
                    vocab_size=128, max_text_length=32, dec_token_id=127, embed_dim=32)
        if overrides.get("stage", 1) == 2 and overrides.get("lm") is None:
            base["lm"] = CausalLMConfig.toy()
        return cls(**{**base, **overrides})

    @classmethod
    def small(cls, **overrides: Any) -> "BLIP2Config":
        """A ~20 M parameter BLIP-2 at 64 px (minutes on a CPU): 16 queries x 256, 6 Q-Former blocks."""
        base = dict(image_size=64, patch_size=8, vision_width=256, vision_layers=6, vision_heads=8,
                    vision_mlp_dim=1024, num_query_tokens=16, qformer_width=256, qformer_layers=6, qformer_heads=8,
                    qformer_mlp_dim=1024, vocab_size=8192, max_text_length=64, dec_token_id=8191, embed_dim=128)
        if overrides.get("stage", 1) == 2 and overrides.get("lm") is None:
            base["lm"] = CausalLMConfig.toy(width=512, layers=6, heads=8, mlp_dim=2048, vocab_size=8192)
        return cls(**{**base, **overrides})

    @classmethod
    def paper(cls, llm: str = "opt-2.7b", **overrides: Any) -> "BLIP2Config":
        """The published BLIP-2 (Li et al., 2023, Sec. 3 and 4; LAVIS ``blip2_pretrain.yaml``):

        EVA ViT-g/14 at 224 px (39 blocks used, width 1408: 257 tokens), Q-Former = BERT-base (12 blocks, 768,
        cross-attention every 2nd block) with 32 queries, ITC width 256, temperature 0.07; stage 2 with OPT-2.7B
        (d_LLM 2560) by default (``llm`` = any ``CausalLMConfig.paper`` variant). Use on the meta device.
        """
        base: dict[str, Any] = dict(qformer_dropout=0.1)
        if overrides.get("stage", 1) == 2 and overrides.get("lm") is None:
            base["lm"] = CausalLMConfig.paper(llm)
        return cls(**{**base, **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BLIP2Config":
        return config_from_dict(cls, d, nested={"lm": CausalLMConfig})


@dataclass
class BLIP2Output:
    """What ``BLIP2.forward`` returns (stage-1 fields are None in stage 2 and vice versa)."""

    loss: Tensor  # scalar: itc + itm + itg (stage 1) or lm (stage 2)
    loss_itc: Tensor | None = None  # image-text contrastive (stage 1)
    loss_itm: Tensor | None = None  # image-text matching with hard negatives (stage 1)
    loss_itg: Tensor | None = None  # image-grounded text generation (stage 1)
    loss_lm: Tensor | None = None  # the frozen LLM's loss on the text (stage 2)
    image_embeds: Tensor | None = None  # (b, p, c) frozen ViT tokens after ln_vision
    query_output: Tensor | None = None  # (b, q, d) Q-Former output queries Z
    sim_i2t: Tensor | None = None  # (b, b) ITC logits: max over queries of cosine / temp, row = image
    itm_logits: Tensor | None = None  # (3b, 2) ITM logits for [pos; text+neg image; neg text+image]
    itg_logits: Tensor | None = None  # (b, n, V) ITG next-token logits
    language_model_inputs: Tensor | None = None  # (b, q, D) projected queries = the soft visual prompt
    logits: Tensor | None = None  # (b, q + n, V_LLM) LLM logits (stage 2)


# ---------------------------------------------------------------------------------------------------------------
# The three masks
# ---------------------------------------------------------------------------------------------------------------
def qformer_mask(mode: str, num_query: int, text_mask: Tensor) -> Tensor:
    """Q-Former self-attention mask over ``[queries; text]``, True = may attend: ``(b, q + n, q + n)``.

    - ``"itc"``: unimodal -- queries see queries, text sees text (the two halves never interact);
    - ``"itm"``: bi-directional -- everything sees everything (except text padding);
    - ``"itg"``: multimodal causal (UniLM) -- queries see queries only; text token t sees every query and text
      tokens <= t.

    ``text_mask`` is ``(b, n)`` with 1 for real tokens; padded keys are never attended to.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    if not isinstance(text_mask, Tensor) or text_mask.dim() != 2:
        raise ValueError(f"text_mask must have shape (batch, tokens), got {getattr(text_mask, 'shape', text_mask)}")
    b, n = text_mask.shape
    q = num_query
    real = text_mask.bool()  # (b, n)
    mask = torch.zeros(b, q + n, q + n, dtype=torch.bool, device=text_mask.device)
    mask[:, :q, :q] = True  # queries -> queries: always
    if mode == "itm":
        mask[:, :q, q:] = real[:, None, :]  # queries -> text
        mask[:, q:, :q] = True  # text -> queries
        mask[:, q:, q:] = real[:, None, :]  # text -> text
    elif mode == "itc":
        mask[:, q:, q:] = real[:, None, :]
    else:  # itg
        causal = torch.ones(n, n, dtype=torch.bool, device=text_mask.device).tril()  # (n, n)
        mask[:, q:, :q] = True
        mask[:, q:, q:] = causal[None] & real[:, None, :]
    return mask


# ---------------------------------------------------------------------------------------------------------------
# Q-Former
# ---------------------------------------------------------------------------------------------------------------
class QFormerLayer(nn.Module):
    """One BERT (post-LN) block of the Q-Former: shared self-attention, query-only cross-attention, two FFNs."""

    def __init__(self, c: BLIP2Config, cross_attention: bool, text_ffn: bool) -> None:
        super().__init__()
        d, eps, p = c.qformer_width, c.qformer_ln_eps, c.qformer_dropout
        self.self_attn = Attention(d, c.qformer_heads, dropout=p)
        self.self_norm = nn.LayerNorm(d, eps=eps)
        if cross_attention:
            self.cross_attn = Attention(d, c.qformer_heads, kv_dim=c.vision_width, dropout=p)
            self.cross_norm = nn.LayerNorm(d, eps=eps)
        else:
            self.cross_attn = None
        self.query_mlp = MLP(d, c.qformer_mlp_dim, act=c.act, dropout=p)
        self.query_norm = nn.LayerNorm(d, eps=eps)
        if text_ffn:
            self.text_mlp = MLP(d, c.qformer_mlp_dim, act=c.act, dropout=p)
            self.text_norm = nn.LayerNorm(d, eps=eps)
        else:
            self.text_mlp = None
        self.drop = nn.Dropout(p)

    def forward(self, x: Tensor, num_query: int, image_embeds: Tensor | None = None, *,
                attn_mask: Tensor | None = None, prefix: Tensor | None = None) -> Tensor:
        """``x`` ``(b, q + n, d)`` = queries then text. ``prefix`` ``(b, q', d)``: extra keys / values in front
        (the cached query states of LAVIS's ITG); ``attn_mask`` then covers ``(q + n, q' + q + n)``."""
        kv = x if prefix is None else torch.cat([prefix, x], dim=1)  # (b, q' + q + n, d)
        x = self.self_norm(x + self.drop(self.self_attn(x, kv, attn_mask=attn_mask)))
        queries, text = x[:, :num_query], x[:, num_query:]  # (b, q, d), (b, n, d)
        if num_query:
            if self.cross_attn is not None:
                if image_embeds is None:
                    raise ValueError("image_embeds is required: this block cross-attends from the queries to the image")
                queries = self.cross_norm(queries + self.drop(self.cross_attn(queries, image_embeds)))
            queries = self.query_norm(queries + self.query_mlp(queries))
        if text.shape[1]:
            if self.text_mlp is None:
                raise ValueError("this Q-Former has no text half (stage 2); pass queries only")
            text = self.text_norm(text + self.text_mlp(text))
        return torch.cat([queries, text], dim=1)  # (b, q + n, d)


class QFormer(nn.Module):
    """The Querying Transformer: an embedding LayerNorm, then ``QFormerLayer`` x L (cross-attention every k-th)."""

    def __init__(self, c: BLIP2Config, text: bool) -> None:
        super().__init__()
        self.embed_norm = nn.LayerNorm(c.qformer_width, eps=c.qformer_ln_eps)
        self.embed_drop = nn.Dropout(c.qformer_dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(c, cross_attention=i % c.cross_attention_every == 0, text_ffn=text)
            for i in range(c.qformer_layers))

    def forward(self, x: Tensor, num_query: int, image_embeds: Tensor | None = None, *,
                attn_mask: Tensor | None = None, prefixes: list[Tensor] | None = None,
                return_layer_inputs: bool = False) -> tuple[Tensor, list[Tensor]]:
        """``x`` ``(b, q + n, d)`` embeddings -> ``(b, q + n, d)``, and each layer's input query states
        ``[(b, q, d)] * L`` when ``return_layer_inputs`` (the ITG cache)."""
        x = self.embed_drop(self.embed_norm(x))
        inputs: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            if return_layer_inputs:
                inputs.append(x[:, :num_query])
            x = layer(x, num_query, image_embeds, attn_mask=attn_mask,
                      prefix=None if prefixes is None else prefixes[i])
        return x, inputs


class ITGHead(nn.Module):
    """BERT's LM prediction head: dense -> act -> LayerNorm -> decoder to the vocabulary."""

    def __init__(self, c: BLIP2Config) -> None:
        super().__init__()
        from ..nn import get_activation

        self.dense = nn.Linear(c.qformer_width, c.qformer_width)
        self.act = get_activation(c.act)
        self.norm = nn.LayerNorm(c.qformer_width, eps=c.qformer_ln_eps)
        self.decoder = nn.Linear(c.qformer_width, c.vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.norm(self.act(self.dense(x))))  # (b, n, d) -> (b, n, V)


# ---------------------------------------------------------------------------------------------------------------
# Stage-1 pieces as pure functions
# ---------------------------------------------------------------------------------------------------------------
def itc_similarity(image_feats: Tensor, text_feat: Tensor) -> Tensor:
    """BLIP-2's image-text similarity: for each (image, text), the *best-matching query*.

    ``image_feats`` ``(b_i, q, e)`` and ``text_feat`` ``(b_t, e)`` (both L2-normalised) -> ``(b_i, b_t)``
    ``= max_q <image_feats[i, q], text_feat[t]>``.
    """
    if image_feats.dim() != 3 or text_feat.dim() != 2 or image_feats.shape[-1] != text_feat.shape[-1]:
        raise ValueError(f"image_feats must be (images, queries, e) and text_feat (texts, e); got "
                         f"{tuple(image_feats.shape)} and {tuple(text_feat.shape)}")
    sim = torch.einsum("iqe,te->itq", image_feats, text_feat)  # (b_i, b_t, q)
    return sim.max(dim=-1).values  # (b_i, b_t)


@torch.no_grad()
def sample_hard_negatives(sim_i2t: Tensor, same: Tensor | None = None,
                          generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draw one hard negative per row from ``softmax(sim)`` with positives excluded (LAVIS ``blip2_qformer``).

    ``sim_i2t`` ``(b, b)`` (row = image, column = text; the diagonal are the true pairs). ``same`` ``(b, b)`` bool
    marks extra pairs that must not be used as negatives (e.g. identical captions). Excluded entries are filled
    with -10000 *before* the softmax, in fp32, so no NaN can reach ``multinomial`` (if a row has no valid
    negative the draw is uniform over it -- callers with duplicated batches should check).

    Returns ``(neg_image_for_text (b,), neg_text_for_image (b,))`` indices.
    """
    if sim_i2t.dim() != 2 or sim_i2t.shape[0] != sim_i2t.shape[1]:
        raise ValueError(f"sim_i2t must be a square (batch, batch) matrix, got {tuple(sim_i2t.shape)}")
    b = sim_i2t.shape[0]
    excluded = torch.eye(b, dtype=torch.bool, device=sim_i2t.device)
    if same is not None:
        if same.shape != (b, b):
            raise ValueError(f"same must have shape {(b, b)}, got {tuple(same.shape)}")
        excluded = excluded | same.bool()
    sim = sim_i2t.detach().float().masked_fill(excluded, -10000.0)
    weights_i2t = sim.softmax(dim=1)  # (b, b): image i -> which text
    weights_t2i = sim.T.softmax(dim=1)  # (b, b): text t -> which image
    neg_image = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)  # (b,)
    neg_text = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)  # (b,)
    return neg_image, neg_text


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
class BLIP2(nn.Module):
    """BLIP-2: frozen ViT -> Q-Former (learned queries) -> [stage 1 heads | projection -> frozen LLM]."""

    def __init__(self, config: BLIP2Config) -> None:
        super().__init__()
        if not isinstance(config, BLIP2Config):
            raise TypeError(f"config must be a BLIP2Config, got {type(config).__name__}")
        c = self.config = config
        self.visual = ViT(ViTConfig(
            image_size=c.image_size, patch_size=c.patch_size, width=c.vision_width, layers=c.vision_layers,
            heads=c.vision_heads, mlp_dim=c.vision_mlp_dim, act="gelu", ln_pre=c.vision_ln_pre, ln_eps=c.vision_ln_eps,
            patch_bias=c.vision_patch_bias))
        self.query_tokens = nn.Parameter(torch.randn(1, c.num_query_tokens, c.qformer_width) * c.init_std)
        self.qformer = QFormer(c, text=c.stage == 1)
        if c.stage == 1:
            self.word_embeddings = nn.Embedding(c.vocab_size, c.qformer_width)
            self.position_embeddings = nn.Embedding(c.max_text_length, c.qformer_width)
            self.vision_proj = nn.Linear(c.qformer_width, c.embed_dim)
            self.text_proj = nn.Linear(c.qformer_width, c.embed_dim)
            self.itm_head = nn.Linear(c.qformer_width, 2)
            self.itg_head = ITGHead(c)
            self.temp = nn.Parameter(torch.tensor(float(c.temp_init)))
        else:
            assert c.lm is not None
            self.language_projection = nn.Linear(c.qformer_width, c.lm.width)
            self.language_model = freeze(build_causal_lm(c.lm))
        self._init_weights()
        if c.freeze_vision:
            for name, p in self.visual.named_parameters():
                if not name.startswith("ln_post."):  # ln_vision stays trainable (LAVIS)
                    p.requires_grad_(False)

    def _init_weights(self) -> None:
        """BERT's initialisation for the Q-Former and heads: N(0, init_std) weights, zero biases, unit LayerNorms."""
        mods = [self.qformer] + [getattr(self, n) for n in ("word_embeddings", "position_embeddings", "vision_proj",
                                                             "text_proj", "itm_head", "itg_head",
                                                             "language_projection") if hasattr(self, n)]
        for root in mods:
            for m in root.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=self.config.init_std)
                    if isinstance(m, nn.Linear) and m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        # LAVIS initialises the query FFNs as copies of the text FFNs (both from BERT)
        if self.config.stage == 1:
            with torch.no_grad():
                for layer in self.qformer.layers:
                    layer.query_mlp.load_state_dict(layer.text_mlp.state_dict())
                    layer.query_norm.load_state_dict(layer.text_norm.state_dict())

    def train(self, mode: bool = True) -> "BLIP2":
        """Like ``nn.Module.train``, but frozen parts (the ViT, the LLM) always stay in eval mode."""
        super().train(mode)
        if self.config.freeze_vision:
            self.visual.eval()
        if self.config.stage == 2:
            self.language_model.eval()
        return self

    # --- the frozen image encoder ---------------------------------------------------------------------------
    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """``(b, 3, H, W)`` -> frozen ViT tokens after ``ln_vision``: ``(b, p, c)``."""
        check_pixel_values(pixel_values, self.config.image_size)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_vision):
            tokens = self.visual(pixel_values)  # (b, p, c)
        return self.visual.ln_post(tokens)  # ln_vision on every token

    def load_vision_encoder(self, vit: ViT) -> "BLIP2":
        """Copy a trained lab ``ViT`` (e.g. ``CLIP.visual``) into the frozen image encoder; its ``ln_post`` becomes
        ``ln_vision``. BLIP-2's EVA ViT-g is itself a CLIP image tower -- this is the toy version of that."""
        if not isinstance(vit, ViT):
            raise TypeError(f"vit must be a vlm_lab.nn.ViT, got {type(vit).__name__}")
        mine, theirs = self.visual.config, vit.config
        diffs = [f"{f}: {getattr(theirs, f)} vs {getattr(mine, f)}" for f in ("image_size", "patch_size", "width",
                 "layers", "heads", "mlp_dim", "act", "ln_pre", "patch_bias") if getattr(mine, f) != getattr(theirs, f)]
        if diffs:
            raise ValueError("vit does not match this BLIP2's vision config (given vs expected): " + "; ".join(diffs))
        self.visual.load_state_dict(vit.state_dict())
        return self

    # --- Q-Former passes ------------------------------------------------------------------------------------
    def _queries(self, b: int) -> Tensor:
        return self.query_tokens.expand(b, -1, -1)  # (1, q, d) -> (b, q, d)

    def _text_embeddings(self, input_ids: Tensor) -> Tensor:
        self._require_stage(1, "text embeddings")
        check_token_ids(input_ids, self.config.vocab_size, self.config.max_text_length)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)  # text positions start at 0
        return self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]  # (b, n, d)

    def encode_queries(self, image_embeds: Tensor, *, return_layer_inputs: bool = False):
        """The Q-Former's query pass: learned queries attend to each other and cross-attend to ``image_embeds``.

        ``(b, p, c)`` -> ``(b, q, d)`` (and the per-layer query states for ITG when asked).
        """
        if image_embeds.dim() != 3 or image_embeds.shape[-1] != self.config.vision_width:
            raise ValueError(f"image_embeds must have shape (batch, tokens, {self.config.vision_width}), "
                             f"got {tuple(image_embeds.shape)}")
        out, inputs = self.qformer(self._queries(image_embeds.shape[0]), self.config.num_query_tokens, image_embeds,
                                   return_layer_inputs=return_layer_inputs)
        return (out, inputs) if return_layer_inputs else out

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The Q-Former's unimodal text pass (ITC's text encoder, bi-directional): ``(b, n)`` -> ``(b, n, d)``."""
        mask = self._text_mask(input_ids, attention_mask)
        out, _ = self.qformer(self._text_embeddings(input_ids), 0, attn_mask=attention_mask_text(mask))
        return out

    def fuse(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
             mode: str = "itm") -> Tensor:
        """One Q-Former pass over ``[queries; text]`` with the mask of ``mode``: ``(b, q + n, d)``."""
        mask = self._text_mask(input_ids, attention_mask)
        q = self.config.num_query_tokens
        x = torch.cat([self._queries(input_ids.shape[0]), self._text_embeddings(input_ids)], dim=1)  # (b, q + n, d)
        out, _ = self.qformer(x, q, image_embeds, attn_mask=qformer_mask(mode, q, mask))
        return out

    def image_features(self, query_output: Tensor) -> Tensor:
        """ITC image features: ``normalize(vision_proj(Z))`` ``(b, q, e)``."""
        return F.normalize(self.vision_proj(query_output), dim=-1)

    def text_features(self, text_output: Tensor) -> Tensor:
        """ITC text feature: ``normalize(text_proj([CLS] output))`` ``(b, e)``."""
        return F.normalize(self.text_proj(text_output[:, 0]), dim=-1)

    def itm_logits(self, fused: Tensor) -> Tensor:
        """ITM logits ``(b, 2)``: the head on every output query, averaged over the queries."""
        return self.itm_head(fused[:, : self.config.num_query_tokens]).mean(dim=1)  # (b, q, 2) -> (b, 2)

    def itg_decode(self, layer_inputs: list[Tensor], input_ids: Tensor, attention_mask: Tensor | None = None,
                   image_embeds: Tensor | None = None) -> Tensor:
        """ITG text pass (LAVIS route): ``[DEC] + caption`` attends to the cached query states of every layer and
        causally to itself -> next-token logits ``(b, n, V)``."""
        mask = self._text_mask(input_ids, attention_mask)
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = self.config.dec_token_id  # [DEC] replaces [CLS]
        b, n = dec_ids.shape
        q = layer_inputs[0].shape[1]
        full = qformer_mask("itg", q, mask)[:, q:]  # (b, n, q + n): the text rows of the UniLM mask
        out, _ = self.qformer(self._text_embeddings(dec_ids), 0, image_embeds, attn_mask=full, prefixes=layer_inputs)
        return self.itg_head(out)  # (b, n, V)

    # --- scores for retrieval -------------------------------------------------------------------------------
    @torch.no_grad()
    def itc_scores(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Cosine similarity (max over queries, no temperature) ``(b_images, b_texts)``, as HF's ITC output."""
        image_feats = self.image_features(self.encode_queries(self.encode_image(pixel_values)))
        text_feat = self.text_features(self.encode_text(input_ids, attention_mask))
        return itc_similarity(image_feats, text_feat)

    @torch.no_grad()
    def itm_scores(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """ITM logits ``(b, 2)`` for the pairs (image i, text i); ``softmax(...)[:, 1]`` is p(match)."""
        return self.itm_logits(self.fuse(self.encode_image(pixel_values), input_ids, attention_mask, mode="itm"))

    # --- training -------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any], *, generator: torch.Generator | None = None) -> BLIP2Output:
        """Stage 1: ``pixel_values``, Q-Former ``input_ids`` ([CLS] ... [SEP], WordPiece), ``attention_mask``.
        Stage 2: ``pixel_values``, LLM ``input_ids`` (<s> ... </s>, the LLM's tokenizer), ``attention_mask``,
        optional ``prompt_lengths`` (int or ``(b,)``: leading text tokens that are not learned)."""
        require_keys(batch, "pixel_values", "input_ids")
        if batch["pixel_values"].shape[0] != batch["input_ids"].shape[0]:
            raise ValueError(f"the batch has {batch['pixel_values'].shape[0]} images but "
                             f"{batch['input_ids'].shape[0]} captions; BLIP-2 needs one caption per image")
        if self.config.stage == 2:
            return self._forward_stage2(batch)
        return self._forward_stage1(batch, generator)

    def _forward_stage1(self, batch: dict[str, Any], generator: torch.Generator | None) -> BLIP2Output:
        c = self.config
        input_ids = batch["input_ids"]
        mask = self._text_mask(input_ids, batch.get("attention_mask"))
        b = input_ids.shape[0]
        image_embeds = self.encode_image(batch["pixel_values"])  # (b, p, c)

        # ITC: queries and text in separate passes (they cannot see each other)
        query_output, layer_inputs = self.encode_queries(image_embeds, return_layer_inputs=True)  # (b, q, d)
        image_feats = self.image_features(query_output)  # (b, q, e)
        text_feat = self.text_features(self.encode_text(input_ids, mask))  # (b, e)
        sim_i2t = itc_similarity(image_feats, text_feat) / self.temp  # (b, b)
        targets = torch.arange(b, device=sim_i2t.device)
        ls = c.itc_label_smoothing
        loss_itc = (F.cross_entropy(sim_i2t.float(), targets, label_smoothing=ls)
                    + F.cross_entropy(sim_i2t.T.float(), targets, label_smoothing=ls)) / 2

        # ITM: [pos; text + hard negative image; hard negative text + image], bi-directional mask
        if b > 1:
            same = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1) & (mask[:, None] == mask[None]).all(-1)
            neg_image, neg_text = sample_hard_negatives(sim_i2t, same, generator)
            ids_all = torch.cat([input_ids, input_ids, input_ids[neg_text]], dim=0)  # (3b, n)
            mask_all = torch.cat([mask, mask, mask[neg_text]], dim=0)  # (3b, n)
            images_all = torch.cat([image_embeds, image_embeds[neg_image], image_embeds], dim=0)  # (3b, p, c)
            itm_logits = self.itm_logits(self.fuse(images_all, ids_all, mask_all, mode="itm"))  # (3b, 2)
            itm_labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(itm_logits.device)
            loss_itm = F.cross_entropy(itm_logits.float(), itm_labels)
        else:  # one pair: no negative to contrast with
            itm_logits, loss_itm = None, sim_i2t.sum() * 0.0

        # ITG: causal text that sees every query (queries reused from the ITC pass)
        itg_logits = self.itg_decode(layer_inputs, input_ids, mask, image_embeds)  # (b, n, V)
        labels = build_lm_labels(input_ids, mask)
        loss_itg = lm_loss(itg_logits, labels, label_smoothing=c.itg_label_smoothing)

        return BLIP2Output(loss=loss_itc + loss_itm + loss_itg, loss_itc=loss_itc, loss_itm=loss_itm,
                           loss_itg=loss_itg, image_embeds=image_embeds, query_output=query_output,
                           sim_i2t=sim_i2t, itm_logits=itm_logits, itg_logits=itg_logits)

    # --- stage 2: the soft visual prompt --------------------------------------------------------------------
    def project(self, query_output: Tensor) -> Tensor:
        """``(b, q, d)`` -> the LLM's input space ``(b, q, D)``."""
        self._require_stage(2, "language_projection")
        return self.language_projection(query_output)

    def visual_prompt(self, pixel_values: Tensor) -> Tensor:
        """Image -> frozen ViT -> Q-Former -> projection: the ``(b, q, D)`` soft prompt fed to the LLM."""
        return self.project(self.encode_queries(self.encode_image(pixel_values)))

    def _forward_stage2(self, batch: dict[str, Any]) -> BLIP2Output:
        lm = self.language_model
        input_ids = batch["input_ids"]
        check_token_ids(input_ids, self.config.lm.vocab_size)
        mask = self._text_mask(input_ids, batch.get("attention_mask"))
        image_embeds = self.encode_image(batch["pixel_values"])
        query_output = self.encode_queries(image_embeds)  # (b, q, d)
        prompt = self.project(query_output)  # (b, q, D)
        text = lm.get_input_embeddings()(input_ids)  # (b, n, D)
        inputs = torch.cat([prompt.to(text.dtype), text], dim=1)  # (b, q + n, D)
        full_mask = torch.cat([torch.ones(prompt.shape[:2], dtype=mask.dtype, device=mask.device), mask], dim=1)
        logits = lm(inputs_embeds=inputs, attention_mask=full_mask).logits  # (b, q + n, V)
        labels = build_lm_labels(input_ids, mask, prompt_lengths=batch.get("prompt_lengths"),
                                 num_prefix=prompt.shape[1])  # (b, q + n), -100 on queries / prompt / padding
        loss = lm_loss(logits, labels)
        return BLIP2Output(loss=loss, loss_lm=loss, image_embeds=image_embeds, query_output=query_output,
                           language_model_inputs=prompt, logits=logits)

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, prompt_ids: Tensor | None = None, *, max_new_tokens: int = 20,
                 num_beams: int = 1, do_sample: bool = False, **generate_kwargs: Any) -> Tensor:
        """Caption ``pixel_values`` with the frozen LLM: ``[soft prompt; prompt_ids]`` -> new token ids ``(b, t)``.

        ``prompt_ids`` ``(b, k)`` or ``(k,)`` (default: the LLM's BOS token) must not end with EOS. Extra keyword
        arguments go to ``transformers``' ``generate`` (``min_new_tokens``, ``repetition_penalty``, ...).
        """
        self._require_stage(2, "generate")
        lm, lmc = self.language_model, self.config.lm
        prompt = self.visual_prompt(pixel_values)  # (b, q, D)
        b = prompt.shape[0]
        if prompt_ids is None:
            prompt_ids = torch.full((b, 1), lmc.bos_token_id, dtype=torch.long, device=prompt.device)
        elif prompt_ids.dim() == 1:
            prompt_ids = prompt_ids[None].expand(b, -1)  # (k,) -> (b, k)
        check_token_ids(prompt_ids, lmc.vocab_size, name="prompt_ids")
        if prompt_ids.shape[0] != b:
            raise ValueError(f"prompt_ids has {prompt_ids.shape[0]} rows for {b} images")
        inputs = torch.cat([prompt, lm.get_input_embeddings()(prompt_ids).to(prompt.dtype)], dim=1)  # (b, q + k, D)
        attn = torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)
        return lm.generate(inputs_embeds=inputs, attention_mask=attn, max_new_tokens=max_new_tokens,
                           num_beams=num_beams, do_sample=do_sample, eos_token_id=lmc.eos_token_id,
                           pad_token_id=lmc.pad_token_id, bos_token_id=lmc.bos_token_id, **generate_kwargs)

    # --- building a stage-2 model from a stage-1 one ----------------------------------------------------------
    @classmethod
    def from_stage1(cls, stage1: "BLIP2", language_model: nn.Module | None = None,
                    lm_config: CausalLMConfig | None = None) -> "BLIP2":
        """Stage 2 initialised from a trained stage-1 model (LAVIS loads the stage-1 checkpoint and deletes the
        Q-Former's text half): copies the ViT, ``ln_vision``, the queries and the query half of the Q-Former.

        ``language_model``: a transformers causal LM to use (frozen), e.g. from ``lm.load_toy_lm()``; its config
        must match ``lm_config`` (default: ``CausalLMConfig.toy()``).
        """
        if not isinstance(stage1, BLIP2) or stage1.config.stage != 1:
            raise TypeError("stage1 must be a stage-1 BLIP2 model")
        lmc = lm_config or stage1.config.lm or CausalLMConfig.toy()
        model = cls(replace(stage1.config, stage=2, lm=lmc))
        own = model.state_dict()
        src = {k: v for k, v in stage1.state_dict().items() if k in own and not k.startswith("language_")}
        missing = [k for k in own if k not in src and not k.startswith(("language_model.", "language_projection."))]
        if missing:
            raise ValueError(f"stage-1 model lacks {missing[:10]}")
        model.load_state_dict(src, strict=False)
        if language_model is not None:
            model.language_model.load_state_dict(language_model.state_dict())
        return model

    # --- interop --------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> "BLIP2":
        """A lab BLIP-2 with the weights of a transformers BLIP-2 model (any size):

        - ``Blip2ForImageTextRetrieval`` -> stage 1 (the ITG head, which HF lacks, keeps its initialisation);
        - ``Blip2ForConditionalGeneration`` / ``Blip2Model`` with an OPT or Llama LLM -> stage 2.
        """
        hc = getattr(hf_model, "config", None)
        if hc is None or not all(hasattr(hc, a) for a in ("vision_config", "qformer_config", "num_query_tokens")):
            raise TypeError(f"hf_model must be a transformers BLIP-2 model, got {type(hf_model).__name__}")
        v, qf = hc.vision_config, hc.qformer_config
        stage = 1 if hasattr(hf_model, "itm_head") else 2
        if stage == 2 and not hasattr(hf_model, "language_model"):
            raise TypeError(f"{type(hf_model).__name__} has neither an ITM head nor a language model")
        if v.hidden_act != "gelu" or qf.hidden_act not in ("gelu",):
            raise ValueError(f"only GELU is supported (vision {v.hidden_act}, Q-Former {qf.hidden_act})")
        if not getattr(v, "qkv_bias", True):
            raise ValueError("the vision tower must have q/v biases (qkv_bias=True), as EVA / BLIP-2")
        lm_cfg = None
        if stage == 2:
            lm_cfg = lm_config_from_hf(hc.text_config)
        config = BLIP2Config(
            stage=stage, image_size=v.image_size, patch_size=v.patch_size, vision_width=v.hidden_size,
            vision_layers=v.num_hidden_layers, vision_heads=v.num_attention_heads, vision_mlp_dim=v.intermediate_size,
            vision_ln_eps=v.layer_norm_eps, num_query_tokens=hc.num_query_tokens, qformer_width=qf.hidden_size,
            qformer_layers=qf.num_hidden_layers, qformer_heads=qf.num_attention_heads,
            qformer_mlp_dim=qf.intermediate_size, cross_attention_every=qf.cross_attention_frequency,
            qformer_ln_eps=qf.layer_norm_eps, act=qf.hidden_act, vocab_size=qf.vocab_size + 1,
            max_text_length=qf.max_position_embeddings, dec_token_id=qf.vocab_size,
            embed_dim=getattr(hc, "image_text_hidden_size", 256), lm=lm_cfg)
        if stage == 1 and not qf.use_qformer_text_input:
            raise ValueError("Blip2ForImageTextRetrieval needs qformer_config.use_qformer_text_input=True")
        if qf.encoder_hidden_size != v.hidden_size:
            raise ValueError(f"qformer encoder_hidden_size {qf.encoder_hidden_size} != vision width {v.hidden_size}")
        model = cls(config)
        hf_state = dict(hf_model.state_dict())
        # the vision attention: one fused qkv (no k bias) -> separate q / k / v
        for key in [k for k in hf_state if k.endswith("self_attn.qkv.weight")]:
            pre = key[: -len("qkv.weight")]
            for name, t in zip("qkv", split_qkv(hf_state.pop(key))):
                hf_state[f"{pre}{name}.weight"] = t
            bias = hf_state.pop(pre + "qkv.bias", None)
            if bias is None:
                bias = torch.zeros(3 * v.hidden_size, dtype=t.dtype)
            for name, t in zip("qkv", split_qkv(bias)):
                hf_state[f"{pre}{name}.bias"] = t
        if "vision_model.embeddings.class_embedding" in hf_state:
            hf_state["vision_model.embeddings.class_embedding"] = hf_state["vision_model.embeddings.class_embedding"].reshape(-1)
            hf_state["vision_model.embeddings.position_embedding"] = hf_state["vision_model.embeddings.position_embedding"][0]
        vl = r"^vision_model\.encoder\.layers\.(\d+)\."
        ql = r"^qformer\.encoder\.layer\.(\d+)\."
        rules = [
            (r"^vision_model\.embeddings\.patch_embedding\.", "visual.patch_embed.proj."),
            (r"^vision_model\.embeddings\.class_embedding$", "visual.class_embedding"),
            (r"^vision_model\.embeddings\.position_embedding$", "visual.position_embedding"),
            (r"^vision_model\.post_layernorm\.", "visual.ln_post."),
            (vl + r"self_attn\.([qkv])\.", r"visual.encoder.blocks.\1.attn.\2_proj."),
            (vl + r"self_attn\.projection\.", r"visual.encoder.blocks.\1.attn.out_proj."),
            (vl + r"layer_norm(\d)\.", r"visual.encoder.blocks.\1.norm\2."),
            (vl + r"mlp\.", r"visual.encoder.blocks.\1.mlp."),
            (r"^qformer\.layernorm\.", "qformer.embed_norm."),
            (ql + r"attention\.attention\.query\.", r"qformer.layers.\1.self_attn.q_proj."),
            (ql + r"attention\.attention\.key\.", r"qformer.layers.\1.self_attn.k_proj."),
            (ql + r"attention\.attention\.value\.", r"qformer.layers.\1.self_attn.v_proj."),
            (ql + r"attention\.output\.dense\.", r"qformer.layers.\1.self_attn.out_proj."),
            (ql + r"attention\.output\.LayerNorm\.", r"qformer.layers.\1.self_norm."),
            (ql + r"crossattention\.attention\.query\.", r"qformer.layers.\1.cross_attn.q_proj."),
            (ql + r"crossattention\.attention\.key\.", r"qformer.layers.\1.cross_attn.k_proj."),
            (ql + r"crossattention\.attention\.value\.", r"qformer.layers.\1.cross_attn.v_proj."),
            (ql + r"crossattention\.output\.dense\.", r"qformer.layers.\1.cross_attn.out_proj."),
            (ql + r"crossattention\.output\.LayerNorm\.", r"qformer.layers.\1.cross_norm."),
            (ql + r"intermediate_query\.dense\.", r"qformer.layers.\1.query_mlp.fc1."),
            (ql + r"output_query\.dense\.", r"qformer.layers.\1.query_mlp.fc2."),
            (ql + r"output_query\.LayerNorm\.", r"qformer.layers.\1.query_norm."),
            (ql + r"intermediate\.dense\.", r"qformer.layers.\1.text_mlp.fc1."),
            (ql + r"output\.dense\.", r"qformer.layers.\1.text_mlp.fc2."),
            (ql + r"output\.LayerNorm\.", r"qformer.layers.\1.text_norm."),
            (r"^embeddings\.word_embeddings\.", "word_embeddings."),
            (r"^embeddings\.position_embeddings\.", "position_embeddings."),
            (r"^vision_projection\.", "vision_proj."),
            (r"^text_projection\.", "text_proj."),
        ]
        state = rename_keys(hf_state, rules, drop=[r"position_ids$"])
        own = model.state_dict()
        if stage == 1:
            # HF has no [DEC] row, no ITG head and no temperature: keep the lab's initialisation for those
            wte = own["word_embeddings.weight"].clone()
            wte[: qf.vocab_size] = state["word_embeddings.weight"]
            state["word_embeddings.weight"] = wte
            for k in own:
                if k.startswith("itg_head.") or k == "temp":
                    state[k] = own[k]
        load_converted(model, state, source=f"transformers {type(hf_model).__name__}")
        return model.to(next(hf_model.parameters()).dtype)

    # --- helpers --------------------------------------------------------------------------------------------
    def _text_mask(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, tokens), got {getattr(input_ids, 'shape', input_ids)}")
        if attention_mask is None:
            return torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        return attention_mask

    def _require_stage(self, stage: int, what: str) -> None:
        if self.config.stage != stage:
            raise RuntimeError(f"{what} exists only in a stage-{stage} BLIP2 (this one is stage {self.config.stage}); "
                               + ("build one with BLIP2.from_stage1(model, language_model)" if stage == 2 else ""))

    def extra_repr(self) -> str:
        return f"stage={self.config.stage}, queries={self.config.num_query_tokens}"


def attention_mask_text(text_mask: Tensor) -> Tensor:
    """Key-padding mask of a text-only pass as ``(b, n, n)`` (True = may attend)."""
    return qformer_mask("itc", 0, text_mask)
