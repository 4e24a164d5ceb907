"""Fusion and alignment toys: early, intermediate and late fusion; connectors; contrastive vs contrastive + matching.

The map of chapter 01 (course notebook ``01_fusion_and_alignment``), each style a small model built only from
``vlm_lab.nn`` so their parameter budgets can be matched and their FLOPs counted (``vlm_lab.inspect.taxonomy``):

    EarlyFusion          one transformer over [words; patches] + modality-type embeddings   (ViLT's single stream)
        x = [E_w(q) + t_text ; E_p(I) + P + t_image]  ->  Encoder  ->  pool [CLS]  ->  head
    IntermediateFusion   separate encoders, then cross-attention layers (words attend to patches; ALBEF's fusion)
        h_q = TextEnc(q),  h_I = ViT(I),  z = CrossEnc(h_q, context=h_I)  ->  pool [CLS]  ->  head
    LateFusion           separate encoders, combined only at the end (decision fusion)
        combine="concat":  head(MLP([v; u]))              v = ViT(I) pooled, u = TextEnc(q) pooled
        combine="product": head(LN(W_v v) * LN(W_u u))    a per-answer dot product: logit_a = sum_k w_ak v'_k u'_k
    ConnectorVQA         frozen image encoder -> connector (linear | mlp | adapter) -> a small text transformer that
                         reads [visual tokens; words] (LLaVA's recipe at toy size)
    DualEncoder          two towers trained with ITC (CLIP's InfoNCE), optionally + ITM (image-text matching on a
                         cross-attention fusion layer, in-batch hard negatives as in ALBEF, Li et al. 2021, sec. 3.2),
                         optionally + LM (a causal caption decoder that cross-attends to the image tokens: BLIP's
                         image-grounded text decoder, Li et al. 2022, sec. 3.2, at toy size)

The VQA models take the batch of ``vlm_lab.data.questions.QACollator`` (``pixel_values``, ``input_ids``,
``attention_mask``, ``labels`` = answer ids) and return :class:`FusionOutput` with ``loss`` = cross-entropy over the
answer vocabulary (VQA as classification, as ViLT's VQA head) and ``logits``. Questions are pooled at position 0
(the tokenizer's [CLS]). Text encoders are bidirectional (BERT-style), with the padding mask.

Shape letters: b batch, n words, g patches per side, p = g*g patches (+1 with a class token), d width, a answers,
V vocabulary, e joint embedding width.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import build_lm_labels, clip_loss, lm_loss
from ..nn import (Adapter, Encoder, LinearProjector, MLPProjector, ModalityTypeEmbedding, PatchEmbed, TokenEmbedding,
                  ViT, ViTConfig)
from ._config import config_from_dict, require_keys

__all__ = ["FusionConfig", "FusionOutput", "EarlyFusion", "IntermediateFusion", "LateFusion", "ConnectorConfig",
           "ConnectorVQA", "DualEncoderConfig", "DualEncoder", "DualEncoderOutput"]


@dataclass
class FusionConfig:
    """Hyper-parameters shared by the three fusion styles. Presets: ``toy()`` (CPU, seconds), ``small()``."""

    image_size: int = 32  # input pixels per side
    patch_size: int = 8  # patch side; p = (image_size / patch_size)^2 patches
    vocab_size: int = 128  # question tokenizer vocabulary (shapes_tokenizer: 112)
    max_length: int = 16  # longest question in tokens, [CLS] and [SEP] included
    num_answers: int = 22  # size of the answer vocabulary (vlm_lab.data.questions.ANSWERS: 22)
    width: int = 64  # token width d of every tower
    heads: int = 4  # attention heads
    mlp_dim: int = 128  # hidden width of every block's MLP
    # depths: pick them so the three styles have about the same number of parameters (toy: 4 blocks' worth each)
    early_layers: int = 4  # EarlyFusion: blocks of the one joint transformer
    vision_layers: int = 2  # Intermediate / Late: ViT blocks
    text_layers: int = 1  # Intermediate / Late: text blocks
    fusion_layers: int = 1  # Intermediate: blocks with cross-attention (words -> patches)
    late_text_layers: int = 2  # Late: text blocks (late fusion has no fusion blocks, so its towers get them)
    combine: str = "concat"  # Late: "concat" (concatenation + MLP) or "product" (element-wise product, dot-product family)
    act: str = "gelu"  # MLP activation
    dropout: float = 0.0  # dropout on attention and residual branches
    # starting value of the learned patch positions: "sincos" = MAE's fixed 2-D sin-cos table (unit scale, so where a
    # patch is counts from step 0), "random" = N(0, 0.02) (ViT / CLIP; position is then a faint signal next to the
    # patch content and relational questions learn far more slowly at the toy budget)
    position_init: str = "sincos"

    def __post_init__(self) -> None:
        if self.position_init not in ("sincos", "random"):
            raise ValueError(f"FusionConfig.position_init must be 'sincos' or 'random', got {self.position_init!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and v < (0 if f.name.endswith("layers") else 1):
                raise ValueError(f"FusionConfig.{f.name} must be {'>= 0' if f.name.endswith('layers') else 'positive'}"
                                 f", got {v}")
        if self.image_size % self.patch_size:
            raise ValueError(f"FusionConfig.image_size ({self.image_size}) must be divisible by patch_size "
                             f"({self.patch_size})")
        if self.width % self.heads:
            raise ValueError(f"FusionConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if self.combine not in ("concat", "product"):
            raise ValueError(f"FusionConfig.combine must be 'concat' or 'product', got {self.combine!r}")
        if self.position_init == "sincos" and self.width % 4:
            raise ValueError(f"FusionConfig.width ({self.width}) must be a multiple of 4 for position_init='sincos'")

    @classmethod
    def toy(cls, **overrides: Any) -> "FusionConfig":
        """32 px, width 64: each style ~0.16 M parameters, trains in seconds on a CPU."""
        return cls(**overrides)

    @classmethod
    def small(cls, **overrides: Any) -> "FusionConfig":
        """64 px, width 128, twice the depth: minutes on a CPU."""
        base = dict(image_size=64, patch_size=8, width=128, heads=4, mlp_dim=256, early_layers=8, vision_layers=4,
                    text_layers=2, fusion_layers=2, late_text_layers=4)
        return cls(**{**base, **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FusionConfig":
        return config_from_dict(cls, d)


@dataclass
class FusionOutput:
    """What the VQA models return."""

    loss: Tensor | None  # scalar cross-entropy over answers (None when the batch has no labels)
    logits: Tensor  # (b, a) answer scores
    pooled: Tensor  # (b, d_h) the vector the answer head reads


# ---------------------------------------------------------------------------------------------------------------
# shared parts
# ---------------------------------------------------------------------------------------------------------------


def _mask(batch: dict[str, Any]) -> Tensor:
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones_like(ids)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(ids.shape)}, got {tuple(mask.shape)}")
    return mask


def _answer_loss(logits: Tensor, batch: dict[str, Any], num_answers: int) -> Tensor | None:
    labels = batch.get("labels")
    if labels is None:
        return None
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must have shape (batch,) = ({logits.shape[0]},), got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_answers):
        raise ValueError(f"labels must be answer ids in [0, {num_answers}), got [{int(labels.min())}, "
                         f"{int(labels.max())}]")
    return F.cross_entropy(logits, labels)


class TextEncoder(nn.Module):
    """Bidirectional text transformer (BERT-style): ``(b, n)`` ids -> ``(b, n, d)``; ``pool`` takes [CLS] (position 0)."""

    def __init__(self, vocab_size: int, max_length: int, width: int, layers: int, heads: int, mlp_dim: int,
                 act: str = "gelu", dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = TokenEmbedding(vocab_size, width, max_length)
        self.encoder = Encoder(width, layers, heads, mlp_dim, act=act, dropout=dropout)
        self.norm = nn.LayerNorm(width)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.norm(self.encoder(self.embed(input_ids), key_padding_mask=attention_mask))  # (b, n, d)

    @staticmethod
    def pool(hidden: Tensor) -> Tensor:
        return hidden[:, 0]  # (b, n, d) -> (b, d)


def sincos_2d(grid: int, width: int) -> Tensor:
    """MAE's 2-D sin-cos position table ``(grid * grid, width)``, row-major patches: a quarter of the channels each
    for sin / cos of the column and of the row, frequencies ``1 / 10000^(k / (width / 4))``."""
    if width % 4:
        raise ValueError(f"width: the 2-D sin-cos table needs a multiple of 4, got {width}")
    q = width // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float32) / q)  # (q,)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")  # (g, g) each
    ox, oy = xs.reshape(-1, 1) * omega, ys.reshape(-1, 1) * omega  # (g*g, q) each
    return torch.cat([ox.sin(), ox.cos(), oy.sin(), oy.cos()], dim=1)  # (g*g, 4q)


def _init_positions(c: FusionConfig, table: Tensor) -> None:
    """Overwrite a ``(p, d)`` table of learned patch positions with the 2-D sin-cos start if the config asks for it."""
    if c.position_init == "sincos":
        with torch.no_grad():
            table.copy_(sincos_2d(c.image_size // c.patch_size, table.shape[-1]))


def _vit(c: FusionConfig, layers: int) -> ViT:
    vit = ViT(ViTConfig(image_size=c.image_size, patch_size=c.patch_size, width=c.width, layers=layers,
                        heads=c.heads, mlp_dim=c.mlp_dim, act=c.act, ln_pre=True, patch_bias=True))
    _init_positions(c, vit.position_embedding[1:])  # patches only; the class token keeps its own start
    return vit


class AnswerHead(nn.Module):
    """``(b, d_in) -> (b, a)``: LayerNorm -> Linear -> act -> Linear (ViLT's VQA head is the same 2-layer MLP)."""

    def __init__(self, in_dim: int, hidden: int, num_answers: int, act: str = "gelu") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.mlp = MLPProjector(in_dim, num_answers, hidden_dim=hidden, act=act)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.norm(x))


# ---------------------------------------------------------------------------------------------------------------
# the three fusion styles
# ---------------------------------------------------------------------------------------------------------------
class EarlyFusion(nn.Module):
    """Single-stream fusion (ViLT): words and patches enter one transformer together.

    Parts: ``text_embed`` (words + positions), ``patch_embed`` + ``image_position`` (patches + positions),
    ``type_embed`` (text 0, image 1), ``encoder`` (the joint transformer), ``head``.
    """

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        c = self.config = config
        self.text_embed = TokenEmbedding(c.vocab_size, c.width, c.max_length)
        self.patch_embed = PatchEmbed(c.image_size, c.patch_size, c.width)
        self.image_position = nn.Parameter(torch.randn(self.patch_embed.num_patches, c.width) * 0.02)
        _init_positions(c, self.image_position)
        self.type_embed = ModalityTypeEmbedding(2, c.width)
        self.encoder = Encoder(c.width, c.early_layers, c.heads, c.mlp_dim, act=c.act, dropout=c.dropout,
                               final_norm=True)
        self.head = AnswerHead(c.width, c.width, c.num_answers, c.act)

    def embed(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """``[words; patches]`` tokens ``(b, n + p, d)`` and their padding mask ``(b, n + p)``."""
        words = self.type_embed(self.text_embed(batch["input_ids"]), 0)  # (b, n, d)
        patches = self.type_embed(self.patch_embed(batch["pixel_values"]) + self.image_position, 1)  # (b, p, d)
        if words.shape[0] != patches.shape[0]:
            raise ValueError(f"the batch has {patches.shape[0]} images but {words.shape[0]} questions")
        mask = torch.cat([_mask(batch), torch.ones(patches.shape[:2], dtype=torch.long, device=patches.device)], 1)
        return torch.cat([words, patches], dim=1), mask  # (b, n + p, d), (b, n + p)

    def fuse(self, batch: dict[str, Any]) -> Tensor:
        x, mask = self.embed(batch)
        return self.encoder(x, key_padding_mask=mask)  # (b, n + p, d)

    def forward(self, batch: dict[str, Any]) -> FusionOutput:
        require_keys(batch, "pixel_values", "input_ids")
        pooled = self.fuse(batch)[:, 0]  # [CLS]: (b, d)
        logits = self.head(pooled)
        return FusionOutput(_answer_loss(logits, batch, self.config.num_answers), logits, pooled)


class IntermediateFusion(nn.Module):
    """Dual-stream encoders, then cross-attention (ALBEF / BLIP fusion): words attend to image tokens.

    Parts: ``vision`` (ViT), ``text`` (TextEncoder), ``fusion`` (blocks with self- and cross-attention), ``head``.
    """

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        c = self.config = config
        self.vision = _vit(c, c.vision_layers)
        self.text = TextEncoder(c.vocab_size, c.max_length, c.width, c.text_layers, c.heads, c.mlp_dim, c.act,
                                c.dropout)
        self.fusion = Encoder(c.width, c.fusion_layers, c.heads, c.mlp_dim, act=c.act, cross_attention_every=1,
                              dropout=c.dropout, final_norm=True)
        self.head = AnswerHead(c.width, c.width, c.num_answers, c.act)

    def fuse(self, batch: dict[str, Any]) -> Tensor:
        mask = _mask(batch)
        image = self.vision(batch["pixel_values"])  # (b, 1 + p, d)
        words = self.text(batch["input_ids"], mask)  # (b, n, d)
        if words.shape[0] != image.shape[0]:
            raise ValueError(f"the batch has {image.shape[0]} images but {words.shape[0]} questions")
        return self.fusion(words, image, key_padding_mask=mask)  # (b, n, d)

    def forward(self, batch: dict[str, Any]) -> FusionOutput:
        require_keys(batch, "pixel_values", "input_ids")
        pooled = self.fuse(batch)[:, 0]  # (b, d)
        logits = self.head(pooled)
        return FusionOutput(_answer_loss(logits, batch, self.config.num_answers), logits, pooled)


class LateFusion(nn.Module):
    """Decision-level fusion: each tower reduces its input to one vector; they meet only in ``combine`` + ``head``.

    Parts: ``vision`` (ViT, class token), ``text`` (TextEncoder, [CLS]), ``combine`` (concat: nothing to learn;
    product: two projections + LayerNorms), ``head``.
    """

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        c = self.config = config
        self.vision = _vit(c, c.vision_layers)
        self.text = TextEncoder(c.vocab_size, c.max_length, c.width, c.late_text_layers, c.heads, c.mlp_dim, c.act,
                                c.dropout)
        if c.combine == "product":
            self.combine = nn.ModuleDict({"image": nn.Sequential(nn.Linear(c.width, c.width), nn.LayerNorm(c.width)),
                                          "text": nn.Sequential(nn.Linear(c.width, c.width), nn.LayerNorm(c.width))})
            in_dim = c.width
        else:
            self.combine = nn.ModuleDict()
            in_dim = 2 * c.width
        self.head = AnswerHead(in_dim, 2 * c.width, c.num_answers, c.act)

    def fuse(self, batch: dict[str, Any]) -> Tensor:
        v = self.vision.pool(self.vision(batch["pixel_values"]))  # (b, d)
        u = self.text.pool(self.text(batch["input_ids"], _mask(batch)))  # (b, d)
        if v.shape[0] != u.shape[0]:
            raise ValueError(f"the batch has {v.shape[0]} images but {u.shape[0]} questions")
        if self.config.combine == "product":
            return self.combine["image"](v) * self.combine["text"](u)  # (b, d)
        return torch.cat([v, u], dim=-1)  # (b, 2d)

    def forward(self, batch: dict[str, Any]) -> FusionOutput:
        require_keys(batch, "pixel_values", "input_ids")
        pooled = self.fuse(batch)
        logits = self.head(pooled)
        return FusionOutput(_answer_loss(logits, batch, self.config.num_answers), logits, pooled)


# ---------------------------------------------------------------------------------------------------------------
# connectors: a frozen image encoder joined to a text model
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ConnectorConfig:
    """A frozen ViT, a connector, and a small text transformer reading [visual tokens; words]."""

    connector: str = "linear"  # "linear" (LinearProjector), "mlp" (MLPProjector, LLaVA-1.5) or "adapter" (bottleneck)
    adapter_bottleneck: int = 16  # hidden width of the bottleneck adapter
    freeze_image_encoder: bool = True  # keep the image encoder's weights fixed (and run it without gradients)
    image_size: int = 32  # input pixels per side
    patch_size: int = 8  # ViT patch side
    vision_width: int = 64  # ViT width d_v (the adapter needs d_v = text_width: it is residual)
    vision_layers: int = 2  # ViT blocks
    vision_heads: int = 4  # ViT heads
    vision_mlp_dim: int = 128  # ViT MLP width
    vocab_size: int = 128  # question tokenizer vocabulary
    max_length: int = 16  # longest question in tokens
    text_width: int = 64  # text model width d_t
    text_layers: int = 2  # text model blocks (they see visual tokens and words together)
    text_heads: int = 4  # text model heads
    text_mlp_dim: int = 128  # text model MLP width
    num_answers: int = 22  # answer vocabulary size (vlm_lab.data.questions.ANSWERS: 22)
    act: str = "gelu"  # activation everywhere

    def __post_init__(self) -> None:
        if self.connector not in ("linear", "mlp", "adapter"):
            raise ValueError(f"ConnectorConfig.connector must be 'linear', 'mlp' or 'adapter', got {self.connector!r}")
        if self.connector == "adapter" and self.vision_width != self.text_width:
            raise ValueError(f"ConnectorConfig: the residual adapter keeps the width, so vision_width "
                             f"({self.vision_width}) must equal text_width ({self.text_width})")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and v < 1:
                raise ValueError(f"ConnectorConfig.{f.name} must be positive, got {v}")

    def vit_config(self) -> ViTConfig:
        return ViTConfig(image_size=self.image_size, patch_size=self.patch_size, width=self.vision_width,
                         layers=self.vision_layers, heads=self.vision_heads, mlp_dim=self.vision_mlp_dim,
                         act=self.act, ln_pre=True, patch_bias=True)

    @classmethod
    def toy(cls, **overrides: Any) -> "ConnectorConfig":
        return cls(**overrides)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConnectorConfig":
        return config_from_dict(cls, d)


class ConnectorVQA(nn.Module):
    """LLaVA at toy size: ``image_encoder`` (frozen ViT) -> ``connector`` -> ``text`` model over [visual; words].

    Load pre-trained vision weights with ``model.image_encoder.load_state_dict(...)`` (e.g. a ``DualEncoder``'s
    ``vision``); a freshly built model has a *random* frozen encoder. Only the connector, the text model and the head
    train when ``freeze_image_encoder`` is set.
    """

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        c = self.config = config
        self.image_encoder = ViT(c.vit_config())
        if c.connector == "linear":
            self.connector: nn.Module = LinearProjector(c.vision_width, c.text_width)
        elif c.connector == "mlp":
            self.connector = MLPProjector(c.vision_width, c.text_width)
        else:
            self.connector = Adapter(c.vision_width, c.adapter_bottleneck, act=c.act)
        self.text_embed = TokenEmbedding(c.vocab_size, c.text_width, c.max_length)
        self.type_embed = ModalityTypeEmbedding(2, c.text_width)
        self.text = Encoder(c.text_width, c.text_layers, c.text_heads, c.text_mlp_dim, act=c.act, final_norm=True)
        self.head = AnswerHead(c.text_width, c.text_width, c.num_answers, c.act)
        if c.freeze_image_encoder:
            self.image_encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> "ConnectorVQA":
        super().train(mode)
        if self.config.freeze_image_encoder:
            self.image_encoder.eval()  # a frozen encoder stays in eval mode (no dropout)
        return self

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """Frozen visual tokens mapped into the text model's space: ``(b, 1 + p, d_t)``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_image_encoder):
            tokens = self.image_encoder(pixel_values)  # (b, 1 + p, d_v)
        return self.connector(tokens)

    def forward(self, batch: dict[str, Any]) -> FusionOutput:
        require_keys(batch, "pixel_values", "input_ids")
        words = self.type_embed(self.text_embed(batch["input_ids"]), 0)  # (b, n, d_t)
        visual = self.type_embed(self.encode_image(batch["pixel_values"]), 1)  # (b, 1 + p, d_t)
        if words.shape[0] != visual.shape[0]:
            raise ValueError(f"the batch has {visual.shape[0]} images but {words.shape[0]} questions")
        mask = torch.cat([_mask(batch), torch.ones(visual.shape[:2], dtype=torch.long, device=visual.device)], 1)
        h = self.text(torch.cat([words, visual], dim=1), key_padding_mask=mask)  # (b, n + 1 + p, d_t)
        pooled = h[:, 0]
        logits = self.head(pooled)
        return FusionOutput(_answer_loss(logits, batch, self.config.num_answers), logits, pooled)


# ---------------------------------------------------------------------------------------------------------------
# training objectives: contrastive only vs contrastive + matching
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class DualEncoderConfig:
    """Two towers with ITC, optionally ITM on a cross-attention fusion layer (ALBEF's recipe, toy size) and a
    captioning (LM) decoder (BLIP's recipe, toy size)."""

    matching: bool = False  # add the ITM loss (and its fusion layer + head)
    itm_weight: float = 1.0  # weight of the ITM loss in the sum
    captioning: bool = False  # add the LM loss: a causal decoder (fusion_layers blocks, cross-attention to the image)
    lm_weight: float = 1.0  # weight of the LM (captioning) loss in the sum
    embed_dim: int = 32  # width of the joint embedding space
    image_size: int = 32  # input pixels per side
    patch_size: int = 8  # ViT patch side
    width: int = 64  # width of both towers
    vision_layers: int = 2  # ViT blocks
    text_layers: int = 2  # text blocks
    fusion_layers: int = 1  # ITM fusion blocks (words cross-attend to image tokens)
    heads: int = 4  # attention heads
    mlp_dim: int = 128  # MLP width
    vocab_size: int = 128  # tokenizer vocabulary
    max_length: int = 24  # longest caption in tokens
    logit_scale_init: float = 2.659  # ln(1 / 0.07), CLIP's initial temperature
    act: str = "gelu"  # activation

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and v < 1:
                raise ValueError(f"DualEncoderConfig.{f.name} must be positive, got {v}")
        if self.itm_weight < 0:
            raise ValueError(f"DualEncoderConfig.itm_weight must be >= 0, got {self.itm_weight}")
        if self.lm_weight < 0:
            raise ValueError(f"DualEncoderConfig.lm_weight must be >= 0, got {self.lm_weight}")

    def vit_config(self) -> ViTConfig:
        return ViTConfig(image_size=self.image_size, patch_size=self.patch_size, width=self.width,
                         layers=self.vision_layers, heads=self.heads, mlp_dim=self.mlp_dim, act=self.act,
                         ln_pre=True, patch_bias=True)

    @classmethod
    def toy(cls, **overrides: Any) -> "DualEncoderConfig":
        return cls(**overrides)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DualEncoderConfig":
        return config_from_dict(cls, d)


@dataclass
class DualEncoderOutput:
    loss: Tensor  # loss_itc + itm_weight * loss_itm + lm_weight * loss_lm (the terms the config switches on)
    loss_itc: Tensor  # symmetric InfoNCE
    loss_itm: Tensor | None  # 3-way-batch binary CE (positives, hard negative texts, hard negative images); None
    logits_per_image: Tensor  # (b, b) scaled cosine similarities
    image_embeds: Tensor  # (b, e) L2-normalised
    text_embeds: Tensor  # (b, e) L2-normalised
    loss_lm: Tensor | None = None  # next-token cross-entropy of the caption decoder; None without captioning


class DualEncoder(nn.Module):
    """Joint embedding space (ITC) with an optional matching head (ITM) that looks at both inputs jointly.

    ITM negatives (ALBEF, sec. 3.2): for every image one text drawn from the batch with probability
    proportional to ``softmax(sim)`` (hard negatives: similar but wrong), and for every text one image; pairs whose
    texts are identical are never drawn as negatives. ``match_score`` gives p(match) for scoring any pair.

    Captioning (BLIP's LM objective): ``decoder`` reads the caption's token embeddings (shared with the text tower,
    as BLIP shares them) under a causal mask, cross-attends to the image tokens, and ``lm_head`` predicts the next
    token; the loss is :func:`vlm_lab.losses.captioning.lm_loss` over real tokens. ``caption_log_likelihood`` scores
    any caption of an image with it.
    """

    def __init__(self, config: DualEncoderConfig) -> None:
        super().__init__()
        c = self.config = config
        self.vision = ViT(c.vit_config())
        self.text = TextEncoder(c.vocab_size, c.max_length, c.width, c.text_layers, c.heads, c.mlp_dim, c.act)
        self.image_proj = nn.Linear(c.width, c.embed_dim)
        self.text_proj = nn.Linear(c.width, c.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(c.logit_scale_init)))
        if c.matching:
            self.fusion = Encoder(c.width, c.fusion_layers, c.heads, c.mlp_dim, act=c.act, cross_attention_every=1,
                                  final_norm=True)
            self.itm_head = nn.Linear(c.width, 2)
        if c.captioning:
            self.decoder = Encoder(c.width, c.fusion_layers, c.heads, c.mlp_dim, act=c.act, cross_attention_every=1,
                                   final_norm=True)
            self.lm_head = nn.Linear(c.width, c.vocab_size)

    def encode_image(self, pixel_values: Tensor, tokens: bool = False):
        h = self.vision(pixel_values)  # (b, 1 + p, d)
        emb = F.normalize(self.image_proj(self.vision.pool(h)), dim=-1)  # (b, e)
        return (emb, h) if tokens else emb

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, tokens: bool = False):
        h = self.text(input_ids, attention_mask)  # (b, n, d)
        emb = F.normalize(self.text_proj(self.text.pool(h)), dim=-1)  # (b, e)
        return (emb, h) if tokens else emb

    def _itm_logits(self, text_h: Tensor, text_mask: Tensor, image_h: Tensor) -> Tensor:
        return self.itm_head(self.fusion(text_h, image_h, key_padding_mask=text_mask)[:, 0])  # (b, 2)

    def caption_logits(self, input_ids: Tensor, image_h: Tensor) -> Tensor:
        """Next-token scores ``(b, n, V)`` of the caption decoder (causal over words, cross-attention to the image).

        Right padding needs no mask: a causal row never looks at the padding after it.
        """
        if not self.config.captioning:
            raise ValueError("caption_logits needs a DualEncoder built with captioning=True")
        x = self.text.embed(input_ids)  # (b, n, d), embeddings shared with the text tower
        return self.lm_head(self.decoder(x, image_h, is_causal=True))  # (b, n, d) -> (b, n, V)

    @torch.no_grad()
    def caption_log_likelihood(self, pixel_values: Tensor, input_ids: Tensor,
                               attention_mask: Tensor | None = None) -> Tensor:
        """Summed log p(caption | image) over each caption's real tokens after the first, ``(b,)``."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        _, ih = self.encode_image(pixel_values, tokens=True)
        logp = self.caption_logits(input_ids, ih)[:, :-1].log_softmax(-1)  # (b, n-1, V): position t predicts t+1
        tok = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (b, n-1)
        return (tok * mask[:, 1:]).sum(-1)

    @torch.no_grad()
    def match_score(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """p(image i matches text i) for aligned rows, ``(b,)`` (needs ``matching=True``)."""
        if not self.config.matching:
            raise ValueError("match_score needs a DualEncoder built with matching=True")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        _, ih = self.encode_image(pixel_values, tokens=True)
        _, th = self.encode_text(input_ids, mask, tokens=True)
        return self._itm_logits(th, mask, ih).softmax(-1)[:, 1]

    def forward(self, batch: dict[str, Any]) -> DualEncoderOutput:
        require_keys(batch, "pixel_values", "input_ids")
        mask = _mask(batch)
        img, ih = self.encode_image(batch["pixel_values"], tokens=True)
        txt, th = self.encode_text(batch["input_ids"], mask, tokens=True)
        if img.shape[0] != txt.shape[0]:
            raise ValueError(f"the batch has {img.shape[0]} images but {txt.shape[0]} captions")
        scale = self.logit_scale.exp()
        logits = scale * img @ txt.T  # (b, b)
        loss_itc = clip_loss(img, txt, scale, gather=False)
        loss_itm = None
        loss = loss_itc
        if self.config.matching:
            b = img.shape[0]
            ids = batch["input_ids"]
            same = (ids[:, None, :] == ids[None, :, :]).all(-1) if ids.shape[0] == b else torch.eye(b, dtype=torch.bool)
            with torch.no_grad():
                w = logits.detach().float().masked_fill(same, float("-inf")).softmax(-1)  # (b, b), row = image
                w_t = logits.detach().T.float().masked_fill(same, float("-inf")).softmax(-1)  # row = text
                ok = ~same.all(-1)  # rows that have at least one valid negative
                w = torch.where(ok[:, None], w.nan_to_num(0.0), torch.full_like(w, 1.0 / b))
                w_t = torch.where(ok[:, None], w_t.nan_to_num(0.0), torch.full_like(w_t, 1.0 / b))
                neg_text = torch.multinomial(w + 1e-12, 1).squeeze(1)  # (b,) a hard negative text per image
                neg_image = torch.multinomial(w_t + 1e-12, 1).squeeze(1)  # (b,) a hard negative image per text
            text_h = torch.cat([th, th[neg_text], th], 0)  # (3b, n, d)
            text_m = torch.cat([mask, mask[neg_text], mask], 0)  # (3b, n)
            image_h = torch.cat([ih, ih, ih[neg_image]], 0)  # (3b, 1 + p, d)
            itm_logits = self._itm_logits(text_h, text_m, image_h)  # (3b, 2)
            target = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(itm_logits.device)
            loss_itm = F.cross_entropy(itm_logits, target)
            loss = loss + self.config.itm_weight * loss_itm
        loss_lm = None
        if self.config.captioning:
            loss_lm = lm_loss(self.caption_logits(batch["input_ids"], ih), build_lm_labels(batch["input_ids"], mask))
            loss = loss + self.config.lm_weight * loss_lm
        return DualEncoderOutput(loss, loss_itc, loss_itm, logits, img, txt, loss_lm)

    @torch.no_grad()
    def post_step(self) -> None:
        self.logit_scale.clamp_(0.0, 4.6052)  # ln 100, as CLIP
