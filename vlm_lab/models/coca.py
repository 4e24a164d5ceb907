"""CoCa: Contrastive Captioners are Image-Text Foundation Models (Yu et al., 2022), as CONCH uses it
(Lu et al., 2024, "A visual-language foundation model for computational pathology", Nat Med).

The paper's figure, top to bottom::

    tokens = ViT(image)                              (b, 3, H, W) -> (b, 1 + g*g, d_v)
    u      = f_contrast(tokens)                      attention pooler, 1 query     -> (b, d_e)   global embedding
    z      = f_caption(tokens)                       attention pooler, n_q queries -> (b, n_q, d) caption tokens
    h, c   = g([w_0 .. w_T] + [CLS])                 unimodal causal text encoder; [CLS] appended LAST -> c (b, d_e)
    p      = h_dec(h, z)                             multimodal decoder: causal self-attn, then cross-attn into z
    loss   = lambda_con * (L_i2t + L_t2i) / 2  +  lambda_cap * ( - mean_t log p(w_{t+1} | w_<=t, image) )

Matches the structure of open_clip ``coca_model.py`` / CONCH ``conch/open_clip_custom`` (read for facts, not
copied). Choices, written down (see also the ``CoCaConfig`` field comments):

- **Poolers.** ``pooler_mode="parallel"`` (default; the CoCa paper and CONCH): a separate 1-query contrastive
  pooler (width ``embed_dim``) -> LayerNorm -> ``proj_contrast``, and an ``n_q``-query caption pooler (width of
  the decoder) -> LayerNorm. ``pooler_mode="single"``: one pooler with ``1 + n_q`` queries, query 0 is the
  contrastive one (lucidrains' CoCa-pytorch: 1 + 256). The open_clip *default* CoCa is ``single`` with 256
  queries in all (255 caption tokens), which its own source marks as "does not match paper".
  Poolers are open_clip's ``AttentionalPooler``: LayerNorm on queries and context, one cross-attention, no
  residual, no MLP (``vlm_lab.nn.AttentionPooler``). The ViT tokens go through a final LayerNorm first (timm's
  ``norm``; CONCH's tower is a timm ViT), and the poolers see every token, the class token included.
- **Text [CLS].** A learned embedding appended *after* the (right-padded) sequence, with the next position
  embedding. Text rows are causal; the [CLS] row attends to every non-pad token and to itself
  (:func:`cls_attention_mask`). ``legacy_cls_mask=True`` reproduces the off-by-one mask of open_clip's legacy
  path and CONCH (validity vector padded at the *front*: [CLS] sees key 0 always, key j iff token j-1 is real --
  i.e. the first pad token -- and itself only when the row has no padding). Needed to reproduce CONCH numbers.
  ``pooled = ln_final(x[:, -1]) @ text_projection``; the text tokens ``x[:, :-1]`` (before ``ln_final``) feed
  the decoder.
- **Decoder.** Each layer: causal self-attention, cross-attention into the caption-pooler tokens, one MLP (pre-LN;
  open_clip's ``MultimodalTransformer`` has a second MLP after its cross-attention block). Then LayerNorm and a
  linear head to the vocabulary (not tied to the token table, as open_clip / CONCH).
- **Loss.** Caption term: next-token cross-entropy with shifted labels, padding ignored, mean over supervised
  tokens (open_clip ``CoCaLoss``; ``vlm_lab.losses.captioning``). Weights: CoCa's lambda_cap = 2, lambda_con = 1
  (the paper; open_clip's defaults) in every preset; lucidrains uses 1 : 1. CONCH's Methods write its objective
  as the plain sum of the two contrastive terms and the caption log-likelihood (our reading of the paper;
  no CONCH training code is public), i.e. ``caption_loss_weight=1``.
- **Exact gradient accumulation.** ``contrastive_features`` returns, per sample, the two embeddings *and* the
  caption NLL summed over the sample's tokens with its token count; ``contrastive_loss`` divides by the total
  count. So ``vlm_lab.train.fit(accum_mode="cache_features")`` accumulates both terms exactly (the contrastive
  one sees every negative of the accumulated batch; the caption one is a token-level mean over it). Under DDP
  the contrastive term gathers every rank's embeddings; the caption term stays a per-rank token mean that DDP
  averages (exact only when ranks hold equal token counts, as in open_clip).
- **Temperature.** ``logit_scale`` = ln(1/0.07) at init; ``post_step`` clamps it to [0, ln 100] (open_clip).
- **Weights.** CONCH's released checkpoint is gated (Hugging Face, after accepting its licence) and has the
  multimodal decoder removed; the lab therefore has no ``from_hf`` for it. ``paper()`` builds the architecture
  with random weights.

Shape letters: b batch, n text tokens, g patches per side, q pooler queries, d width, d_e embedding width,
V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import clip_loss
from ..losses.captioning import IGNORE_INDEX
from ..nn import AttentionPooler, Encoder, ViT, ViTConfig, check_token_ids
from ..nn.embed import check_attention_mask
from ._config import config_from_dict, require_keys

_POOLER_MODES = ("parallel", "single")


@dataclass
class CoCaConfig:
    """Hyper-parameters of CoCa / CONCH. Presets: ``toy()`` (CPU, seconds), ``small()``, ``paper()`` (CONCH)."""

    embed_dim: int = 512  # width d_e of the contrastive embedding space (CONCH: 512)
    # --- image encoder (ViT backbone)
    image_size: int = 448  # input pixels per side (CONCH: 448)
    patch_size: int = 16  # ViT patch side (ViT-B/16)
    vision_width: int = 768  # ViT token width d_v
    vision_layers: int = 12  # ViT blocks
    vision_heads: int = 12  # ViT attention heads
    vision_mlp_dim: int = 3072  # ViT MLP hidden width
    # --- attention poolers
    pooler_mode: str = "parallel"  # "parallel": separate 1-query contrastive pooler (paper, CONCH);
                                   # "single": one pooler, query 0 contrastive, the rest caption (lucidrains)
    caption_queries: int = 256  # n_q caption-pooler queries = image tokens the decoder attends to (paper: 256)
    pooler_heads: int = 8  # attention heads of the poolers (open_clip default attn_pooler_heads = 8)
    # --- unimodal text encoder
    vocab_size: int = 32007  # token vocabulary (CONCH's byte-level BPE: 32,007)
    context_length: int = 127  # most text tokens incl. begin / end; +1 position for the appended [CLS] (CONCH 127+1)
    text_width: int = 768  # width d of the text encoder and of the multimodal decoder
    text_layers: int = 12  # unimodal text-encoder blocks
    text_heads: int = 12  # text-encoder attention heads
    text_mlp_dim: int = 3072  # MLP hidden width of text encoder and decoder
    pad_token_id: int = 0  # padding id (used only when no attention_mask is given, and by generate)
    legacy_cls_mask: bool = False  # True: open_clip-legacy / CONCH off-by-one [CLS] padding mask
    # --- multimodal decoder
    decoder_layers: int = 12  # multimodal decoder blocks (self-attn + cross-attn + MLP each)
    decoder_heads: int = 12  # decoder attention heads
    # --- loss
    contrastive_loss_weight: float = 1.0  # lambda_con (CoCa paper, open_clip default: 1)
    caption_loss_weight: float = 2.0  # lambda_cap (CoCa paper, open_clip default: 2; lucidrains / CONCH: 1)
    # --- shared
    act: str = "gelu"  # MLP activation everywhere
    ln_eps: float = 1e-5  # LayerNorm epsilon (timm ViT uses 1e-6; kept one value for simplicity)
    logit_scale_init: float = math.log(1 / 0.07)  # t at initialisation (temperature 0.07)
    logit_scale_max: float = math.log(100.0)  # post_step clamps t to [0, this]

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and f.name not in ("pad_token_id",) and v <= 0:
                raise ValueError(f"CoCaConfig.{f.name} must be positive, got {v}")
        if self.pooler_mode not in _POOLER_MODES:
            raise ValueError(f"CoCaConfig.pooler_mode must be one of {_POOLER_MODES}, got {self.pooler_mode!r}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"CoCaConfig.pad_token_id must lie in [0, vocab_size={self.vocab_size}), "
                             f"got {self.pad_token_id}")
        for width, heads, what in ((self.text_width, self.text_heads, "text_heads"),
                                   (self.text_width, self.decoder_heads, "decoder_heads"),
                                   (self.text_width, self.pooler_heads, "pooler_heads"),
                                   (self.vision_width, self.vision_heads, "vision_heads")):
            if width % heads:
                raise ValueError(f"CoCaConfig.{what} ({heads}) must divide the width ({width})")
        if self.pooler_mode == "parallel" and self.embed_dim % self.pooler_heads:
            raise ValueError(f"CoCaConfig.pooler_heads ({self.pooler_heads}) must divide embed_dim ({self.embed_dim}) "
                             "in parallel mode (the contrastive pooler is embed_dim wide)")
        if self.image_size % self.patch_size:
            raise ValueError(f"CoCaConfig.image_size ({self.image_size}) must be divisible by "
                             f"patch_size ({self.patch_size})")
        for name in ("contrastive_loss_weight", "caption_loss_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"CoCaConfig.{name} must be a finite number >= 0, got {v!r}")

    @classmethod
    def toy(cls, **overrides: Any) -> "CoCaConfig":
        """A CoCa that trains in under a minute on two CPU cores (32 px tiles, ~0.3 M parameters)."""
        base = dict(embed_dim=64, image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=4,
                    vision_mlp_dim=128, caption_queries=8, pooler_heads=4, vocab_size=512, context_length=40,
                    text_width=64, text_layers=2, text_heads=4, text_mlp_dim=128, decoder_layers=2, decoder_heads=4)
        return cls(**{**base, **overrides})

    @classmethod
    def small(cls, **overrides: Any) -> "CoCaConfig":
        """A ~15 M parameter CoCa at 64 px: minutes on a CPU, seconds per epoch on a GPU."""
        base = dict(embed_dim=256, image_size=64, patch_size=8, vision_width=256, vision_layers=6, vision_heads=8,
                    vision_mlp_dim=1024, caption_queries=64, pooler_heads=8, vocab_size=8192, context_length=64,
                    text_width=256, text_layers=4, text_heads=8, text_mlp_dim=1024, decoder_layers=4,
                    decoder_heads=8)
        return cls(**{**base, **overrides})

    @classmethod
    def paper(cls, **overrides: Any) -> "CoCaConfig":
        """CONCH (Lu et al., 2024; ``conch_ViT-B-16.json``): ViT-B/16 at 448 px (768 wide, 12 layers, 12 heads,
        MLP 3072); parallel poolers with 1 and 256 queries; contrastive width 512; text encoder and multimodal
        decoder 12 layers each, 768 wide, 12 heads; vocabulary 32,007; 127 text tokens + the [CLS] slot.
        Loss weights follow CoCa (lambda_cap = 2, lambda_con = 1); pass ``caption_loss_weight=1.0`` for CONCH's
        equal-weight objective and ``legacy_cls_mask=True`` to load / reproduce CONCH's text encoder."""
        return cls(**overrides)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CoCaConfig":
        return config_from_dict(cls, d)


@dataclass
class CoCaOutput:
    """What ``CoCa.forward`` returns."""

    loss: Tensor  # scalar: contrastive_loss_weight * loss_contrastive + caption_loss_weight * loss_caption
    loss_contrastive: Tensor  # scalar symmetric InfoNCE (i2t + t2i) / 2
    loss_caption: Tensor  # scalar next-token cross-entropy, mean over supervised tokens
    logits_per_image: Tensor  # (b, b) exp(t) * cosine similarities, row = image
    logits_per_text: Tensor  # (b, b) its transpose
    image_embeds: Tensor  # (b, d_e) L2-normalised contrastive image embeddings
    text_embeds: Tensor  # (b, d_e) L2-normalised [CLS] text embeddings
    logits: Tensor  # (b, n, V) decoder scores; position t predicts token t + 1
    logit_scale: Tensor  # scalar exp(t)


def cls_attention_mask(attention_mask: Tensor, legacy: bool = False) -> Tensor:
    """Boolean mask ``(b, n + 1, n + 1)`` (True = may attend) of the text encoder with [CLS] appended last.

    Rows 0..n-1 (text) are causal. Row n ([CLS]) attends to every real token and to itself; with
    ``legacy=True`` it uses open_clip's legacy / CONCH rule, the validity vector shifted right by one:
    ``[True, valid_0, ..., valid_{n-1}]``.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must have shape (batch, tokens), got {tuple(attention_mask.shape)}")
    b, n = attention_mask.shape
    valid = attention_mask != 0  # (b, n)
    mask = torch.ones(n + 1, n + 1, dtype=torch.bool, device=valid.device).tril()  # (n+1, n+1) causal
    mask = mask[None].repeat(b, 1, 1)  # (b, n+1, n+1)
    ones = torch.ones(b, 1, dtype=torch.bool, device=valid.device)
    mask[:, n] = torch.cat([ones, valid], dim=1) if legacy else torch.cat([valid, ones], dim=1)
    return mask


class UnimodalTextEncoder(nn.Module):
    """CoCa's text encoder: token + position embeddings, [CLS] appended last, causal pre-LN blocks.

    ``forward`` returns ``(tokens (b, n, d), cls (b, d))``: the text tokens for the decoder and the
    normalised [CLS] state (``ln_final``) for the contrastive embedding.
    """

    def __init__(self, c: CoCaConfig) -> None:
        super().__init__()
        self.config = c
        self.token = nn.Embedding(c.vocab_size, c.text_width)
        self.position = nn.Parameter(torch.randn(c.context_length + 1, c.text_width) * 0.01)
        self.cls_embedding = nn.Parameter(torch.randn(c.text_width) * c.text_width**-0.5)
        self.encoder = Encoder(c.text_width, c.text_layers, c.text_heads, c.text_mlp_dim, act=c.act, ln_eps=c.ln_eps)
        self.ln_final = nn.LayerNorm(c.text_width, eps=c.ln_eps)
        nn.init.normal_(self.token.weight, std=0.02)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                with_cls: bool = True) -> tuple[Tensor, Tensor | None]:
        c = self.config
        check_token_ids(input_ids, c.vocab_size, c.context_length)
        if attention_mask is None:
            attention_mask = (input_ids != c.pad_token_id).long()
        else:
            check_attention_mask(attention_mask, input_ids)
        b, n = input_ids.shape
        x = self.token(input_ids)  # (b, n, d)
        if not with_cls:  # causal: the text rows never see [CLS], so dropping it leaves them unchanged
            return self.encoder(x + self.position[:n], is_causal=True), None
        cls = self.cls_embedding.to(x.dtype).expand(b, 1, -1)  # (d,) -> (b, 1, d)
        x = torch.cat([x, cls], dim=1) + self.position[:n + 1]  # (b, n + 1, d)
        x = self.encoder(x, attn_mask=cls_attention_mask(attention_mask, legacy=c.legacy_cls_mask))
        return x[:, :-1], self.ln_final(x[:, -1])  # (b, n, d), (b, d)


class MultimodalDecoder(nn.Module):
    """Text tokens attend causally to themselves and, by cross-attention, to the caption-pooler tokens."""

    def __init__(self, c: CoCaConfig) -> None:
        super().__init__()
        self.blocks = Encoder(c.text_width, c.decoder_layers, c.decoder_heads, c.text_mlp_dim, act=c.act,
                              cross_attention_every=1, context_dim=c.text_width, ln_eps=c.ln_eps)
        self.ln_final = nn.LayerNorm(c.text_width, eps=c.ln_eps)
        self.lm_head = nn.Linear(c.text_width, c.vocab_size, bias=False)

    def forward(self, text_tokens: Tensor, image_tokens: Tensor) -> Tensor:
        """``(b, n, d)`` text tokens, ``(b, q, d)`` image tokens -> ``(b, n, V)`` next-token logits."""
        x = self.blocks(text_tokens, image_tokens, is_causal=True)  # (b, n, d)
        return self.lm_head(self.ln_final(x))


class CoCa(nn.Module):
    """Contrastive Captioner: image encoder + two attention poolers, unimodal text encoder, multimodal decoder."""

    def __init__(self, config: CoCaConfig) -> None:
        super().__init__()
        c = self.config = config
        self.visual = ViT(ViTConfig(
            image_size=c.image_size, patch_size=c.patch_size, width=c.vision_width, layers=c.vision_layers,
            heads=c.vision_heads, mlp_dim=c.vision_mlp_dim, act=c.act, ln_pre=False, ln_eps=c.ln_eps,
            patch_bias=True))
        if c.pooler_mode == "parallel":
            self.pool_contrast = AttentionPooler(c.embed_dim, 1, c.pooler_heads, context_dim=c.vision_width,
                                                 ln_eps=c.ln_eps)
            self.ln_contrast = nn.LayerNorm(c.embed_dim, eps=c.ln_eps)
            self.pool_caption = AttentionPooler(c.text_width, c.caption_queries, c.pooler_heads,
                                                context_dim=c.vision_width, ln_eps=c.ln_eps)
            contrast_width = c.embed_dim
        else:  # one pooler, query 0 is the contrastive one
            self.pool_contrast = None
            self.ln_contrast = None
            self.pool_caption = AttentionPooler(c.text_width, 1 + c.caption_queries, c.pooler_heads,
                                                context_dim=c.vision_width, ln_eps=c.ln_eps)
            contrast_width = c.text_width
        self.ln_caption = nn.LayerNorm(c.text_width, eps=c.ln_eps)
        self.proj_contrast = nn.Linear(contrast_width, c.embed_dim, bias=False)
        self.text = UnimodalTextEncoder(c)
        self.text_projection = nn.Linear(c.text_width, c.embed_dim, bias=False)
        self.decoder = MultimodalDecoder(c)
        self.logit_scale = nn.Parameter(torch.tensor(float(c.logit_scale_init)))
        nn.init.normal_(self.proj_contrast.weight, std=contrast_width**-0.5)
        nn.init.normal_(self.text_projection.weight, std=c.text_width**-0.5)

    # --- image encoder ---------------------------------------------------------------------------------------
    def image_features(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """``(b, 3, H, W)`` -> (contrastive feature before projection ``(b, w_c)``, caption tokens ``(b, q, d)``).

        ``w_c`` is ``embed_dim`` in parallel mode and ``text_width`` in single mode. The first output is what
        CONCH's ``encode_image(proj_contrast=False, normalize=False)`` gives (linear probes, MIL).
        """
        tokens = self.visual.ln_post(self.visual(pixel_values))  # (b, 1 + g*g, d_v), final norm on every token
        caption = self.ln_caption(self.pool_caption(tokens))  # (b, q, d) or (b, 1 + q, d)
        if self.pool_contrast is not None:
            pooled = self.ln_contrast(self.pool_contrast(tokens))[:, 0]  # (b, 1, d_e) -> (b, d_e)
            return pooled, caption
        return caption[:, 0], caption[:, 1:]  # query 0 contrastive; (b, d), (b, q, d)

    def encode_image(self, pixel_values: Tensor, normalize: bool = True, project: bool = True) -> Tensor:
        """``(b, 3, H, W)`` -> ``(b, d_e)`` contrastive image embeddings (L2-normalised by default).

        ``project=False, normalize=False`` returns the pooled feature before ``proj_contrast``.
        """
        pooled, _ = self.image_features(pixel_values)
        emb = self.proj_contrast(pooled) if project else pooled
        return F.normalize(emb, dim=-1) if normalize else emb

    # --- text encoder ----------------------------------------------------------------------------------------
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, normalize: bool = True) -> Tensor:
        """``(b, n)`` token ids (right-padded) -> ``(b, d_e)`` [CLS] text embeddings (L2-normalised by default)."""
        _, cls = self.text(input_ids, attention_mask)
        emb = self.text_projection(cls)  # (b, d_e)
        return F.normalize(emb, dim=-1) if normalize else emb

    # --- training --------------------------------------------------------------------------------------------
    def _parts(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        require_keys(batch, "pixel_values", "input_ids")
        input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
        pooled, caption_tokens = self.image_features(batch["pixel_values"])
        text_tokens, cls = self.text(input_ids, attention_mask)
        if pooled.shape[0] != cls.shape[0]:
            raise ValueError(f"the batch has {pooled.shape[0]} images but {cls.shape[0]} captions; "
                             "CoCa needs one caption per image")
        logits = self.decoder(text_tokens, caption_tokens)  # (b, n, V)
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)[:, 1:]  # (b, n-1): token t+1 at t
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                              reduction="none")  # (b, V, n-1) vs (b, n-1) -> (b, n-1)
        return {"image_embeds": F.normalize(self.proj_contrast(pooled), dim=-1),
                "text_embeds": F.normalize(self.text_projection(cls), dim=-1),
                "caption_nll": nll.sum(dim=1),  # (b,) summed over the sample's supervised tokens
                "caption_tokens": (labels != IGNORE_INDEX).sum(dim=1).to(nll.dtype),  # (b,)
                "logits": logits}

    def contrastive_features(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Per-sample features for exact accumulation (``fit(accum_mode="cache_features")``), batch dim first."""
        parts = self._parts(batch)
        parts.pop("logits")
        return parts

    def contrastive_loss(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """The full CoCa loss from (possibly accumulated) per-sample features: ``{"loss", "loss_*"}``."""
        c = self.config
        con = clip_loss(features["image_embeds"], features["text_embeds"], self.logit_scale.exp())
        cap = features["caption_nll"].sum() / features["caption_tokens"].sum().clamp(min=1)
        loss = c.contrastive_loss_weight * con + c.caption_loss_weight * cap
        return {"loss": loss, "loss_contrastive": con, "loss_caption": cap}

    def forward(self, batch: dict[str, Any]) -> CoCaOutput:
        """A batch dict with ``pixel_values (b, 3, H, W)``, ``input_ids (b, n)``, optional ``attention_mask``."""
        parts = self._parts(batch)
        terms = self.contrastive_loss(parts)
        scale = self.logit_scale.exp()
        logits_per_image = scale * parts["image_embeds"] @ parts["text_embeds"].T  # (b, b)
        return CoCaOutput(loss=terms["loss"], loss_contrastive=terms["loss_contrastive"],
                          loss_caption=terms["loss_caption"], logits_per_image=logits_per_image,
                          logits_per_text=logits_per_image.T, image_embeds=parts["image_embeds"],
                          text_embeds=parts["text_embeds"], logits=parts["logits"], logit_scale=scale)

    @torch.no_grad()
    def post_step(self) -> None:
        """After each optimiser step: keep t = ``logit_scale`` in [0, ln 100]."""
        self.logit_scale.clamp_(0.0, self.config.logit_scale_max)

    # --- captioning ------------------------------------------------------------------------------------------
    def caption_logits(self, pixel_values: Tensor, input_ids: Tensor) -> Tensor:
        """Decoder scores ``(b, n, V)`` for the prefix ``input_ids`` given the images (no [CLS] needed)."""
        _, caption_tokens = self.image_features(pixel_values)
        text_tokens, _ = self.text(input_ids, with_cls=False)
        return self.decoder(text_tokens, caption_tokens)

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, *, bos_token_id: int, eos_token_id: int,
                 max_new_tokens: int | None = None, method: str = "greedy", **kwargs: Any) -> Tensor:
        """Captions for images ``(b, 3, H, W)`` -> ids ``(b, 1 + t)``: BOS, the generated tokens, then
        ``pad_token_id`` after a row's EOS. ``method`` is ``"greedy"``, ``"beam"`` (``num_beams=``) or ``"nucleus"``
        (``top_p=``), from ``vlm_lab.models.decoding``; ``max_new_tokens`` defaults to ``context_length - 1``.

        The images are encoded once; each step re-runs the causal text encoder (without [CLS]: the text rows
        never see it) and the decoder on the prefix (no key/value cache).
        """
        from .decoding import generate as decode

        c = self.config
        max_new_tokens = c.context_length - 1 if max_new_tokens is None else max_new_tokens
        if not 1 <= max_new_tokens <= c.context_length - 1:
            raise ValueError(f"max_new_tokens must be in [1, context_length - 1 = {c.context_length - 1}], "
                             f"got {max_new_tokens}")
        for name, tok in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
            if not 0 <= tok < c.vocab_size:
                raise ValueError(f"{name} must lie in [0, {c.vocab_size}), got {tok}")
        _, caption_tokens = self.image_features(pixel_values)  # (b, q, d)
        start = torch.full((caption_tokens.shape[0], 1), bos_token_id, dtype=torch.long, device=caption_tokens.device)

        def next_logits(ids: Tensor, rows: Tensor) -> Tensor:  # (r, t), (r,) -> (r, V)
            text_tokens, _ = self.text(ids, with_cls=False)
            return self.decoder(text_tokens, caption_tokens[rows])[:, -1]

        return decode(next_logits, start, method=method, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                      pad_token_id=c.pad_token_id, **kwargs)

    def extra_repr(self) -> str:
        return f"config={asdict(self.config)}"
