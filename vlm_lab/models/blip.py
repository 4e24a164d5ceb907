"""BLIP: Bootstrapping Language-Image Pre-training for Unified Vision-Language Understanding and Generation
(Li et al., ICML 2022).

The paper's Figure 2 -- one image encoder, one text transformer used three ways (same colour = shared weights)::

    image (b, 3, H, W) -> ViT                                              image_embeds (b, p, c)
    [CLS] caption  -> unimodal text encoder (bi-directional, no image)     ITC  (momentum distillation, queues)
    [ENC] caption  -> image-grounded encoder (+ cross-attention)           ITM  itm_head([ENC] output), hard negatives
    [DEC] caption  -> image-grounded decoder (CAUSAL self-attention)       LM   next-token CE, label smoothing 0.1

Encoder and decoder share **everything except the self-attention** (BLIP's ``tie_encoder_decoder_weights(...,
'/attention')``): the embeddings, every cross-attention and every feed-forward block are the *same module
objects* in ``text_encoder`` and ``text_decoder``; only ``text_decoder.layers[i].self_attn`` / ``self_norm``
are the decoder's own. The LM head's decoder matrix is tied to the word embeddings (BERT).

Matches ``salesforce/BLIP`` (``models/blip_pretrain.py``, ``med.py``, ``blip.py``) and Hugging Face
``modeling_blip.py`` / ``modeling_blip_text.py``: ``BLIP.from_hf`` loads ``BlipForImageTextRetrieval`` (vision,
text encoder, projections, ITM head) or ``BlipForConditionalGeneration`` (vision, decoder, LM head) with the same
numbers (``tests/test_blip.py``, transformers 5.25). Known differences between the original code and
transformers, and what the lab does:

- ITM: the original replaces [CLS] by [ENC] (``enc_token_id``) before the image-grounded encoder (pre-training
  and the retrieval evaluation); HF's ``BlipForImageTextRetrieval(use_itm_head=True)`` does not (transformers
  #22732 / #25629). The lab's ``forward`` / ``itm_score`` substitute [ENC]; ``fuse`` takes ids as given (parity);
- LM: ``BlipTextConfig.label_smoothing`` defaults to 0.0, the original uses 0.1. ``from_hf`` copies HF's value
  into ``BLIPConfig.label_smoothing``; ``toy()`` / ``paper()`` use 0.1;
- LM: HF's ``BlipForConditionalGeneration.forward`` neither replaces [CLS] by [DEC] nor masks padding in the
  labels (its ``generate`` does replace it); the lab's ``forward`` does both, as the original;
- HF text config defaults to 8 heads (the checkpoints use 12) and the HF vision LayerNorm eps to 1e-5 (the
  original ViT uses 1e-6): ``from_hf`` reads both from the HF config, so parity holds for whatever is set;
- HF has no [ENC] / [DEC] rows of its own: they are ids of the tokenizer (BLIP adds them to BERT's vocabulary,
  30,524 rows); the lab's config names them (``enc_token_id``, ``dec_token_id``).
- ITC: the original uses a momentum encoder, queues (57,600) and distillation (alpha 0.4 ramped over 2 epochs),
  like ALBEF; ``use_momentum=False`` gives a plain in-batch ITC (BLIP's captioner / filter fine-tuning at toy
  scale). HF keeps neither, so ``from_hf`` copies the loaded weights into the momentum encoders. From scratch,
  ``inbatch_itc_steps`` warms up with in-batch ITC first (see ``vlm_lab.models.albef``; toy: 100).
- hard negatives: ``losses.hard_negatives`` removes the positive (and identical captions) before the softmax,
  in fp32; BLIP adds 1e-4 after the softmax and zeroes the diagonal (the fix for BLIP#76). Same support, the
  lab never puts NaN into ``multinomial``.

Captioning (``generate``): a prompt ("a picture of") after [DEC], greedy / beam / nucleus decoding from
``vlm_lab.models.decoding``; the prompt is masked from the loss with ``batch["prompt_lengths"]``.

Shape letters: b batch, p image tokens (1 + g*g), c vision width, n text tokens, d text width, e ITC width,
Q queue length, V vocabulary.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..interop import load_converted, rename_keys, split_qkv
from ..losses import itm_loss
from ..losses.captioning import build_lm_labels, lm_loss
from ..losses.momentum import (FeatureQueue, alpha_at, copy_params, distillation_targets, momentum_itc_loss,
                               momentum_update)
from ..nn import ViT, ViTConfig, check_pixel_values, check_token_ids
from .albef import caption_groups, itm_negatives, rerank
from .bert import BertLMHead, BertTextEncoder, bert_init
from .decoding import generate as _generate
from ._config import config_from_dict, require_keys

__all__ = ["BLIP", "BLIPConfig", "BLIPOutput", "SHARED_DECODER_PARTS"]

# the parts of every decoder layer that are the encoder's own module objects (all but the self-attention)
SHARED_DECODER_PARTS = ("cross_attn", "cross_norm", "mlp", "mlp_norm")


@dataclass
class BLIPConfig:
    """Hyper-parameters of BLIP. Presets: ``toy()`` (CPU, seconds) and ``paper()`` (BLIP ViT-B)."""

    # --- image encoder (ViT-B/16)
    image_size: int = 224  # pre-training image side (fine-tuning 384)
    patch_size: int = 16  # ViT patch side
    vision_width: int = 768  # ViT width c
    vision_layers: int = 12  # ViT blocks
    vision_heads: int = 12  # ViT heads
    vision_mlp_dim: int = 3072  # ViT MLP width
    vision_ln_eps: float = 1e-6  # ViT LayerNorm epsilon (HF's BlipVisionConfig default is 1e-5)
    # --- text transformer (BERT-base, cross-attention in every layer)
    vocab_size: int = 30524  # bert-base-uncased + [DEC] + [ENC]
    max_text_length: int = 512  # position table
    text_width: int = 768  # width d
    text_layers: int = 12  # layers (each: self-attn, cross-attn, FFN)
    text_heads: int = 12  # heads
    text_mlp_dim: int = 3072  # FFN width
    text_ln_eps: float = 1e-12  # BERT LayerNorm epsilon
    act: str = "gelu"  # activation
    dropout: float = 0.0  # BERT dropout (the paper: 0.1 in the text transformer)
    tie_word_embeddings: bool = True  # LM decoder matrix = word embeddings
    # --- special tokens
    pad_token_id: int = 0  # [PAD]
    cls_token_id: int = 101  # [CLS]: unimodal encoder (ITC)
    sep_token_id: int = 102  # [SEP]: end of caption (the decoder's EOS)
    dec_token_id: int = 30522  # [DEC] (BLIP's bos_token): replaces [CLS] for the decoder
    enc_token_id: int = 30523  # [ENC]: replaces [CLS] for the image-grounded encoder (ITM)
    # --- ITC
    embed_dim: int = 256  # ITC width e
    temp_init: float = 0.07  # temperature (divides; clamped to [0.001, 0.5] before each forward)
    use_momentum: bool = True  # momentum encoder + queues + distillation (pre-training); False = in-batch ITC
    queue_size: int = 57600  # momentum features per modality (multiple of the global batch)
    momentum: float = 0.995  # EMA coefficient
    alpha: float = 0.4  # distillation weight
    alpha_warmup_steps: int = 0  # ramp alpha over this many training steps (BLIP: 2 epochs)
    inbatch_itc_steps: int = 0  # with use_momentum: first training steps use in-batch ITC (both towers get gradient),
    # a stand-in for BLIP's pre-trained ViT / BERT when training from scratch (see ALBEFConfig.toy; toy: 100)
    # --- LM
    label_smoothing: float = 0.1  # LM label smoothing (original 0.1; HF default 0.0)
    # --- objective weights (0 switches one off: the captioner trains LM only, the filter ITC + ITM)
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    lm_weight: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and f.name.endswith(("size", "width", "heads", "dim",
                                                                                      "length", "layers")) and v <= 0:
                raise ValueError(f"BLIPConfig.{f.name} must be positive, got {v}")
        if self.image_size % self.patch_size:
            raise ValueError(f"BLIPConfig.image_size ({self.image_size}) must be divisible by patch_size "
                             f"({self.patch_size})")
        for w, h in (("vision_width", "vision_heads"), ("text_width", "text_heads")):
            if getattr(self, w) % getattr(self, h):
                raise ValueError(f"BLIPConfig.{w} ({getattr(self, w)}) must be divisible by {h} ({getattr(self, h)})")
        for name in ("pad_token_id", "cls_token_id", "sep_token_id", "dec_token_id", "enc_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"BLIPConfig.{name} must be in [0, vocab_size={self.vocab_size}), "
                                 f"got {getattr(self, name)}")
        for name in ("momentum", "alpha", "dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"BLIPConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"BLIPConfig.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.alpha_warmup_steps < 0 or self.inbatch_itc_steps < 0:
            raise ValueError("BLIPConfig.alpha_warmup_steps and inbatch_itc_steps must be >= 0")
        if not 0.001 <= self.temp_init <= 0.5:
            raise ValueError(f"BLIPConfig.temp_init must be in [0.001, 0.5], got {self.temp_init}")
        for name in ("itc_weight", "itm_weight", "lm_weight"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"BLIPConfig.{name} must be a number >= 0, got {getattr(self, name)}")

    @classmethod
    def toy(cls, **overrides: Any) -> "BLIPConfig":
        """32 px shapes world with ``shapes_tokenizer`` (112 ids; [PAD] 0, [CLS] 2, [SEP] 3) plus [DEC] = 112 and
        [ENC] = 113: ViT 32/8 x 64 (2 blocks), a 64-wide text transformer with 3 layers, ITC width 32, queue 256."""
        base = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=4,
                    vision_mlp_dim=128, vocab_size=114, max_text_length=40, text_width=64, text_layers=3,
                    text_heads=4, text_mlp_dim=128, pad_token_id=0, cls_token_id=2, sep_token_id=3,
                    dec_token_id=112, enc_token_id=113, embed_dim=32, queue_size=256, inbatch_itc_steps=100)
        return cls(**{**base, **overrides})

    @classmethod
    def paper(cls, **overrides: Any) -> "BLIPConfig":
        """BLIP ViT-B/16 as published (``configs/pretrain.yaml``, ``med_config.json``): 224 px, BERT-base with
        cross-attention in all 12 layers, vocabulary 30,524, ITC width 256, queue 57,600, alpha 0.4."""
        return cls(**{"dropout": 0.1, **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BLIPConfig":
        return config_from_dict(cls, d)


@dataclass
class BLIPOutput:
    """What ``BLIP.forward`` returns."""

    loss: Tensor  # weighted itc + itm + lm
    loss_itc: Tensor  # contrastive (unimodal encoder, [CLS])
    loss_itm: Tensor  # matching (image-grounded encoder, [ENC]) with hard negatives
    loss_lm: Tensor  # captioning (image-grounded decoder, [DEC]) with label smoothing
    alpha: float  # distillation weight used
    sim_i2t: Tensor | None = None  # (b, b [+ Q]) ITC logits
    itm_logits: Tensor | None = None  # (3b, 2)
    lm_logits: Tensor | None = None  # (b, n, V) decoder logits (position t predicts token t + 1)


class BLIP(nn.Module):
    """BLIP: ViT + a text transformer with three modes sharing all but the decoder's self-attention."""

    def __init__(self, config: BLIPConfig) -> None:
        super().__init__()
        if not isinstance(config, BLIPConfig):
            raise TypeError(f"config must be a BLIPConfig, got {type(config).__name__}")
        c = self.config = config
        self.visual = ViT(ViTConfig(
            image_size=c.image_size, patch_size=c.patch_size, width=c.vision_width, layers=c.vision_layers,
            heads=c.vision_heads, mlp_dim=c.vision_mlp_dim, act="gelu", ln_pre=False, ln_eps=c.vision_ln_eps,
            patch_bias=True))

        def text_stack() -> BertTextEncoder:
            return BertTextEncoder(c.vocab_size, c.max_text_length, c.text_width, c.text_layers, c.text_heads,
                                   c.text_mlp_dim, cross_attention_from=0, context_dim=c.vision_width,
                                   ln_eps=c.text_ln_eps, dropout=c.dropout, act=c.act)

        self.text_encoder = text_stack()
        self.text_decoder = text_stack()
        self.lm_head = BertLMHead(c.text_width, c.vocab_size, ln_eps=c.text_ln_eps, act=c.act)
        self.vision_proj = nn.Linear(c.vision_width, c.embed_dim)
        self.text_proj = nn.Linear(c.text_width, c.embed_dim)
        self.itm_head = nn.Linear(c.text_width, 2)
        self.temp = nn.Parameter(torch.tensor(float(c.temp_init)))
        bert_init(self.text_encoder, self.text_decoder, self.lm_head, self.vision_proj, self.text_proj,
                  self.itm_head)
        # share: the decoder uses the encoder's embeddings, cross-attentions and FFNs (the same objects)
        self.text_decoder.embeddings = self.text_encoder.embeddings
        for enc, dec in zip(self.text_encoder.layers, self.text_decoder.layers):
            for part in SHARED_DECODER_PARTS:
                setattr(dec, part, getattr(enc, part))
        if c.tie_word_embeddings:
            self.lm_head.decoder.weight = self.text_encoder.embeddings.word_embeddings.weight
        if c.use_momentum:
            self.visual_m = copy.deepcopy(self.visual)
            self.vision_proj_m = copy.deepcopy(self.vision_proj)
            self.text_encoder_m = copy.deepcopy(self.text_encoder)
            self.text_proj_m = copy.deepcopy(self.text_proj)
            copy_params(self.momentum_pairs())
            self.queue = FeatureQueue(c.queue_size, c.embed_dim)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, momentum) pairs; BLIP has no momentum decoder."""
        if not self.config.use_momentum:
            return []
        return [(self.visual, self.visual_m), (self.vision_proj, self.vision_proj_m),
                (self.text_encoder, self.text_encoder_m), (self.text_proj, self.text_proj_m)]

    def sync_momentum(self) -> None:
        """Copy the online weights into the momentum encoders (after loading weights)."""
        copy_params(self.momentum_pairs())

    # --- the three text modes -------------------------------------------------------------------------------
    def encode_image(self, pixel_values: Tensor, *, momentum: bool = False) -> Tensor:
        """``(b, 3, H, W)`` -> ViT tokens after the final LayerNorm ``(b, p, c)``."""
        check_pixel_values(pixel_values, self.config.image_size)
        visual = self.visual_m if momentum else self.visual
        return visual.ln_post(visual(pixel_values))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                    momentum: bool = False) -> Tensor:
        """Unimodal encoder (ITC; ids start with [CLS]): bi-directional, no cross-attention -> ``(b, n, d)``."""
        enc = self.text_encoder_m if momentum else self.text_encoder
        return enc(input_ids, attention_mask)

    def fuse(self, input_ids: Tensor, attention_mask: Tensor | None, image_embeds: Tensor) -> Tensor:
        """Image-grounded encoder (ITM): bi-directional self-attention + cross-attention -> ``(b, n, d)``.
        ``input_ids`` are used as given (``forward`` puts [ENC] at position 0 first)."""
        return self.text_encoder(input_ids, attention_mask, context=image_embeds)

    def decode(self, input_ids: Tensor, attention_mask: Tensor | None, image_embeds: Tensor) -> Tensor:
        """Image-grounded decoder (LM): causal self-attention + cross-attention -> logits ``(b, n, V)``.
        ``input_ids`` are used as given (``forward`` puts [DEC] at position 0 first)."""
        return self.lm_head(self.text_decoder(input_ids, attention_mask, context=image_embeds, is_causal=True))

    def image_features(self, image_embeds: Tensor, *, momentum: bool = False) -> Tensor:
        proj = self.vision_proj_m if momentum else self.vision_proj
        return F.normalize(proj(image_embeds[:, 0]), dim=-1)  # (b, e)

    def text_features(self, text_embeds: Tensor, *, momentum: bool = False) -> Tensor:
        proj = self.text_proj_m if momentum else self.text_proj
        return F.normalize(proj(text_embeds[:, 0]), dim=-1)  # (b, e)

    def _with_first(self, input_ids: Tensor, token_id: int) -> Tensor:
        ids = input_ids.clone()
        ids[:, 0] = token_id  # [CLS] -> [ENC] / [DEC]
        return ids

    # --- inference ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def itm_probability(self, pixel_values: Tensor, input_ids: Tensor,
                        attention_mask: Tensor | None = None) -> Tensor:
        """p(match) ``(b,)`` for the pairs (image i, caption i): the filter of CapFilt."""
        fused = self.fuse(self._with_first(input_ids, self.config.enc_token_id), attention_mask,
                          self.encode_image(pixel_values))
        return self.itm_head(fused[:, 0]).softmax(-1)[:, 1]

    @torch.no_grad()
    def retrieval_scores(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                         k: int = 16) -> tuple[Tensor, Tensor, Tensor]:
        """``(itc_sim, score_i2t, score_t2i)``: ITC ranking, top k re-scored by ITM logit + ITC cosine (BLIP)."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        image_embeds = self.encode_image(pixel_values)
        sim = self.image_features(image_embeds) @ self.text_features(self.encode_text(input_ids, mask)).T
        enc_ids = self._with_first(input_ids, self.config.enc_token_id)

        def itm_fn(i: Tensor, t: Tensor) -> Tensor:
            return self.itm_head(self.fuse(enc_ids[t], mask[t], image_embeds[i])[:, 0])[:, 1]

        s_i2t, s_t2i = rerank(sim, k, itm_fn, add_itc=True)
        return sim, s_i2t, s_t2i

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, prompt_ids: Tensor | None = None, *, method: str = "greedy",
                 max_new_tokens: int = 20, **kwargs: Any) -> Tensor:
        """Caption images: ``[DEC] + prompt`` then decode until [SEP]; returns the new tokens ``(b, t)``.

        ``prompt_ids`` ``(k,)`` or ``(b, k)``: the prompt's ids *without* [CLS] and [SEP] (e.g. "a picture of").
        ``method``: ``"greedy"``, ``"beam"`` (``num_beams``, ``length_penalty``), ``"nucleus"`` (``top_p``,
        ``temperature``, ``generator``); ``min_new_tokens``, ``repetition_penalty`` for all
        (``vlm_lab.models.decoding.generate``).
        """
        c = self.config
        image_embeds = self.encode_image(pixel_values)  # (b, p, c)
        b = image_embeds.shape[0]
        start = torch.full((b, 1), c.dec_token_id, dtype=torch.long, device=image_embeds.device)
        if prompt_ids is not None:
            if prompt_ids.dim() == 1:
                prompt_ids = prompt_ids[None].expand(b, -1)  # (k,) -> (b, k)
            check_token_ids(prompt_ids, c.vocab_size, name="prompt_ids")
            start = torch.cat([start, prompt_ids.to(start.device)], dim=1)  # (b, 1 + k)

        def next_logits(ids: Tensor, rows: Tensor) -> Tensor:
            return self.decode(ids, None, image_embeds[rows])[:, -1]  # (r, V)

        out = _generate(next_logits, start, method=method, max_new_tokens=max_new_tokens,
                        eos_token_id=c.sep_token_id, pad_token_id=c.pad_token_id, **kwargs)
        return out[:, start.shape[1]:]

    # --- training -------------------------------------------------------------------------------------------
    def current_alpha(self) -> float:
        c = self.config
        return alpha_at(int(self.step), c.alpha, c.alpha_warmup_steps) if c.use_momentum else 0.0

    def forward(self, batch: dict[str, Any], *, alpha: float | None = None,
                generator: torch.Generator | None = None) -> BLIPOutput:
        """``batch``: ``pixel_values``, ``input_ids`` ([CLS] caption [SEP], right-padded), ``attention_mask``,
        optional ``prompt_lengths`` (int or ``(b,)``: leading tokens, [CLS] included, not learned by the LM) and
        ``image_ids`` ``(b,)``."""
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
            self.temp.clamp_(0.001, 0.5)
        image_embeds = self.encode_image(batch["pixel_values"])  # (b, p, c)
        ids = batch.get("image_ids")
        zero = image_embeds.sum() * 0.0

        # ITC (unimodal encoder, [CLS])
        sim_i2t = sim_t2i = None
        loss_itc = zero
        if c.itc_weight > 0 or c.itm_weight > 0:
            image_feat = self.image_features(image_embeds)
            text_feat = self.text_features(self.encode_text(input_ids, mask))
            if c.use_momentum:
                with torch.no_grad():
                    if training:
                        momentum_update(self.momentum_pairs(), c.momentum)
                    image_feat_m = self.image_features(self.encode_image(batch["pixel_values"], momentum=True),
                                                       momentum=True)
                    text_feat_m = self.text_features(self.encode_text(input_ids, mask, momentum=True),
                                                     momentum=True)
                    image_all = torch.cat([image_feat_m, self.queue.image.clone()], dim=0)  # (b + Q, e)
                    text_all = torch.cat([text_feat_m, self.queue.text.clone()], dim=0)  # (b + Q, e)
                    positives = None
                    if ids is not None:
                        ids_all = torch.cat([ids.long(), self.queue.ids.clone()])
                        positives = ids.long()[:, None] == ids_all[None, :]
                    tgt_i2t = distillation_targets(image_feat_m @ text_all.T / self.temp, alpha, positives)
                    tgt_t2i = distillation_targets(text_feat_m @ image_all.T / self.temp, alpha, positives)
                sim_i2t = image_feat @ text_all.T / self.temp  # (b, b + Q)
                sim_t2i = text_feat @ image_all.T / self.temp
                if int(self.step) < c.inbatch_itc_steps:  # warm start: in-batch, gradient through both towers
                    logits = image_feat @ text_feat.T / self.temp  # (b, b)
                    tgt = distillation_targets(logits.detach(), 0.0, None if positives is None else positives[:, :b])
                    loss_itc = momentum_itc_loss(logits, logits.T, tgt, tgt)
                else:
                    loss_itc = momentum_itc_loss(sim_i2t, sim_t2i, tgt_i2t, tgt_t2i)
                if training:
                    self.queue.enqueue(image_feat_m, text_feat_m, ids)
            else:
                sim_i2t = image_feat @ text_feat.T / self.temp  # (b, b)
                sim_t2i = sim_i2t.T
                positives = None if ids is None else ids.long()[:, None] == ids.long()[None, :]
                tgt = distillation_targets(sim_i2t.detach(), 0.0, positives)
                loss_itc = momentum_itc_loss(sim_i2t, sim_t2i, tgt, tgt.T if positives is not None else tgt)

        # ITM (image-grounded encoder, [ENC]) with hard negatives
        itm_logits = None
        loss_itm = zero
        if c.itm_weight > 0 and b > 1:
            enc_ids = self._with_first(input_ids, c.enc_token_id)
            groups = ids.long() if ids is not None else caption_groups(input_ids, mask)
            neg_image, neg_text = itm_negatives(sim_i2t[:, :b], sim_t2i[:, :b], groups, generator)
            ids_all = torch.cat([enc_ids, enc_ids, enc_ids[neg_text]], dim=0)  # (3b, n)
            mask_all = torch.cat([mask, mask, mask[neg_text]], dim=0)  # (3b, n)
            images_all = torch.cat([image_embeds, image_embeds[neg_image], image_embeds], dim=0)  # (3b, p, c)
            itm_logits = self.itm_head(self.fuse(ids_all, mask_all, images_all)[:, 0])  # (3b, 2)
            itm_labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(itm_logits.device)
            loss_itm = itm_loss(itm_logits, itm_labels)

        # LM (image-grounded decoder, [DEC]); [DEC] and the prompt are never targets
        lm_logits = None
        loss_lm = zero
        if c.lm_weight > 0:
            dec_ids = self._with_first(input_ids, c.dec_token_id)
            lm_logits = self.decode(dec_ids, mask, image_embeds)  # (b, n, V)
            labels = build_lm_labels(dec_ids, mask, prompt_lengths=batch.get("prompt_lengths"))
            loss_lm = lm_loss(lm_logits, labels, label_smoothing=c.label_smoothing)

        if training:
            self.step += 1
        loss = c.itc_weight * loss_itc + c.itm_weight * loss_itm + c.lm_weight * loss_lm
        return BLIPOutput(loss=loss, loss_itc=loss_itc, loss_itm=loss_itm, loss_lm=loss_lm, alpha=alpha,
                          sim_i2t=sim_i2t, itm_logits=itm_logits, lm_logits=lm_logits)

    # --- interop --------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model: nn.Module, **overrides: Any) -> "BLIP":
        """A lab BLIP with the weights of transformers' ``BlipForImageTextRetrieval`` (vision, text encoder,
        ``vision_proj`` / ``text_proj`` / ``itm_head``) or ``BlipForConditionalGeneration`` (vision, text decoder
        and LM head). The parts the HF class lacks keep the lab's initialisation; the momentum encoders are set
        to copies of the loaded weights. ``overrides`` go to ``BLIPConfig`` (token ids, ``use_momentum``, ...).
        """
        hc = getattr(hf_model, "config", None)
        if hc is None or not hasattr(hc, "vision_config") or not hasattr(hc, "text_config"):
            raise TypeError(f"hf_model must be a transformers BLIP model, got {type(hf_model).__name__}")
        if hasattr(hf_model, "itm_head") and hasattr(hf_model, "text_encoder"):
            kind, prefix = "retrieval", "text_encoder."
        elif hasattr(hf_model, "text_decoder") and hasattr(hf_model.text_decoder, "cls"):
            kind, prefix = "captioning", "text_decoder.bert."
        else:
            raise TypeError(f"{type(hf_model).__name__} is neither BlipForImageTextRetrieval nor "
                            "BlipForConditionalGeneration")
        v, t = hc.vision_config, hc.text_config
        for name, act in (("vision", v.hidden_act), ("text", t.hidden_act)):
            if act != "gelu":
                raise ValueError(f"only GELU is supported, the {name} config uses {act!r}")
        if not t.is_decoder:
            raise ValueError("the HF text config must have is_decoder=True (BLIP's text layers have cross-attention)")
        if t.encoder_hidden_size != v.hidden_size:
            raise ValueError(f"text encoder_hidden_size {t.encoder_hidden_size} != vision width {v.hidden_size}")
        pad = t.pad_token_id if t.pad_token_id is not None else 0
        base = dict(
            image_size=v.image_size, patch_size=v.patch_size, vision_width=v.hidden_size,
            vision_layers=v.num_hidden_layers, vision_heads=v.num_attention_heads, vision_mlp_dim=v.intermediate_size,
            vision_ln_eps=v.layer_norm_eps, vocab_size=t.vocab_size, max_text_length=t.max_position_embeddings,
            text_width=t.hidden_size, text_layers=t.num_hidden_layers, text_heads=t.num_attention_heads,
            text_mlp_dim=t.intermediate_size, text_ln_eps=t.layer_norm_eps, pad_token_id=pad,
            sep_token_id=t.sep_token_id if t.sep_token_id is not None else 102,
            dec_token_id=t.bos_token_id if t.bos_token_id is not None else 30522,
            embed_dim=getattr(hc, "image_text_hidden_size", 256), label_smoothing=t.label_smoothing,
            cls_token_id=min(101, t.vocab_size - 1), enc_token_id=min(30523, t.vocab_size - 1))
        model = cls(BLIPConfig(**{**base, **overrides}))
        hf_state = dict(hf_model.state_dict())
        for key in [k for k in hf_state if k.endswith("self_attn.qkv.weight")]:  # fused qkv -> q, k, v
            pre = key[: -len("qkv.weight")]
            for name, w in zip("qkv", split_qkv(hf_state.pop(key))):
                hf_state[f"{pre}{name}.weight"] = w
            for name, bias in zip("qkv", split_qkv(hf_state.pop(pre + "qkv.bias"))):
                hf_state[f"{pre}{name}.bias"] = bias
        hf_state["vision_model.embeddings.class_embedding"] = hf_state["vision_model.embeddings.class_embedding"].reshape(-1)
        hf_state["vision_model.embeddings.position_embedding"] = hf_state["vision_model.embeddings.position_embedding"][0]
        if "text_decoder.cls.predictions.decoder.bias" in hf_state:  # HF keeps the tied bias under two names
            hf_state.pop("text_decoder.cls.predictions.bias", None)
        own_text = "text_encoder." if kind == "retrieval" else "text_decoder."
        vl = r"^vision_model\.encoder\.layers\.(\d+)\."
        tl = "^" + prefix.replace(".", r"\.") + r"encoder\.layer\.(\d+)\."
        te = "^" + prefix.replace(".", r"\.") + r"embeddings\."
        rules = [
            (r"^vision_model\.embeddings\.patch_embedding\.", "visual.patch_embed.proj."),
            (r"^vision_model\.embeddings\.class_embedding$", "visual.class_embedding"),
            (r"^vision_model\.embeddings\.position_embedding$", "visual.position_embedding"),
            (r"^vision_model\.post_layernorm\.", "visual.ln_post."),
            (vl + r"self_attn\.([qkv])\.", r"visual.encoder.blocks.\1.attn.\2_proj."),
            (vl + r"self_attn\.projection\.", r"visual.encoder.blocks.\1.attn.out_proj."),
            (vl + r"layer_norm(\d)\.", r"visual.encoder.blocks.\1.norm\2."),
            (vl + r"mlp\.", r"visual.encoder.blocks.\1.mlp."),
            (te + r"LayerNorm\.", "text_encoder.embeddings.norm."),
            (te + r"(word|position)_embeddings\.", r"text_encoder.embeddings.\1_embeddings."),
            (tl + r"attention\.self\.query\.", own_text + r"layers.\1.self_attn.q_proj."),
            (tl + r"attention\.self\.key\.", own_text + r"layers.\1.self_attn.k_proj."),
            (tl + r"attention\.self\.value\.", own_text + r"layers.\1.self_attn.v_proj."),
            (tl + r"attention\.output\.dense\.", own_text + r"layers.\1.self_attn.out_proj."),
            (tl + r"attention\.output\.LayerNorm\.", own_text + r"layers.\1.self_norm."),
            (tl + r"crossattention\.self\.query\.", r"text_encoder.layers.\1.cross_attn.q_proj."),
            (tl + r"crossattention\.self\.key\.", r"text_encoder.layers.\1.cross_attn.k_proj."),
            (tl + r"crossattention\.self\.value\.", r"text_encoder.layers.\1.cross_attn.v_proj."),
            (tl + r"crossattention\.output\.dense\.", r"text_encoder.layers.\1.cross_attn.out_proj."),
            (tl + r"crossattention\.output\.LayerNorm\.", r"text_encoder.layers.\1.cross_norm."),
            (tl + r"intermediate\.dense\.", r"text_encoder.layers.\1.mlp.fc1."),
            (tl + r"output\.dense\.", r"text_encoder.layers.\1.mlp.fc2."),
            (tl + r"output\.LayerNorm\.", r"text_encoder.layers.\1.mlp_norm."),
            (r"^text_decoder\.cls\.predictions\.transform\.dense\.", "lm_head.dense."),
            (r"^text_decoder\.cls\.predictions\.transform\.LayerNorm\.", "lm_head.norm."),
            (r"^text_decoder\.cls\.predictions\.decoder\.", "lm_head.decoder."),
            (r"^text_decoder\.cls\.predictions\.bias$", "lm_head.decoder.bias"),
        ]
        state = rename_keys(hf_state, rules, drop=[r"position_ids$"])
        own = model.state_dict()
        if "lm_head.decoder.weight" in state and model.config.tie_word_embeddings:
            if not torch.equal(state["lm_head.decoder.weight"], state["text_encoder.embeddings.word_embeddings.weight"]):
                raise ValueError("the HF LM decoder is not tied to the word embeddings; build with "
                                 "tie_word_embeddings=False")
        # aliases: the decoder's shared parts (and the tied LM matrix) are the encoder's tensors
        for k in own:
            if k.startswith("text_decoder.") and not any(f".{p}." in k for p in ("self_attn", "self_norm")):
                src = "text_encoder." + k[len("text_decoder."):]
                if src in state:
                    state[k] = state[src]
        if model.config.tie_word_embeddings and "lm_head.decoder.weight" not in state:
            state["lm_head.decoder.weight"] = state["text_encoder.embeddings.word_embeddings.weight"]
        # what this HF class does not have keeps the lab's initialisation
        for k in own:
            if k not in state and not k.startswith(("visual.", "text_encoder.embeddings.")):
                if kind == "retrieval" and k.startswith(("text_decoder.", "lm_head.", "temp", "step", "visual_m.",
                                                         "vision_proj_m.", "text_encoder_m.", "text_proj_m.",
                                                         "queue.")):
                    state[k] = own[k]
                elif kind == "captioning" and not k.startswith(("text_decoder.", "lm_head.")):
                    state[k] = own[k]
        load_converted(model, state, source=f"transformers {type(hf_model).__name__}")
        model.sync_momentum()
        return model.to(next(hf_model.parameters()).dtype)

    def extra_repr(self) -> str:
        c = self.config
        return f"text_layers={c.text_layers}, momentum={c.use_momentum}"
