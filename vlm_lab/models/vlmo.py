"""VLMo: Unified Vision-Language Pre-Training with Mixture-of-Modality-Experts (Bao et al., NeurIPS 2022).

One stack of Multiway blocks (``vlm_lab.nn.MoMEBlock``: shared self-attention, vision / language /
vision-language FFN experts) serves as three models (the paper's Figure 1)::

    image encoder   image tokens through every block, V-FFN             -> [I_cls]  (dual encoder, ITC)
    text encoder    text tokens through every block, L-FFN              -> [T_cls]  (dual encoder, ITC)
    fusion encoder  [text; image] : L-FFN / V-FFN by position in the      -> [T_cls]  (ITM, MLM)
                    bottom blocks, VL-FFN in the top ``depth - vl_start`` blocks

so retrieval can use cheap, cacheable embeddings and matching can use deep fusion, with the same weights.

Pre-training objectives (``vlmo/modules/objectives.py``): ITC (symmetric InfoNCE on the [CLS] tokens of
the two encoders), ITM with **hard negatives** drawn from the ITC similarities, MLM on the fusion encoder
(``mlm_weight`` 0.25 in the reference ``compute_mlm`` with images; 1 for text-only MLM).

Stage-wise pre-training (README, ``run.py``), shown here at toy scale with ``set_stage``:

1. ``"image"``: image-only pre-training of attention + V-FFN. VLMo starts from BEiT (masked image
   modelling on visual tokens); the toy stage predicts the mean colour of masked patches instead, a
   BEiT-like objective that needs no tokenizer.
2. ``"text"``: text-only MLM with the self-attention learned on images **frozen**; only the text embeddings,
   modality-type embeddings, L-FFN (+ its norm), the MLM head and the final norm train.
3. ``"vl"``: everything trains on image-text pairs with ITC + ITM + MLM.

Choices, written down: absolute position embeddings for both modalities (VLMo-B uses BEiT's relative
position bias; VLMo-B+ uses absolute ones); one ITC head pair on the final layer (the reference also trains
a second pair through the VL-FFN layers, ``itc_vl_*``); fused text padded to its batch length, not to a fixed
40 (routing uses the actual text length).

Shape letters: b batch, t text tokens, n image tokens (1 + patches), d width, e ITC width, v vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import clip_loss, hard_negatives, itm_loss, mask_tokens, mlm_loss
from ..nn import MoMEBlock, ModalityTypeEmbedding, PatchEmbed, check_token_ids, get_activation

STAGES = ("image", "text", "vl")


@dataclass
class VLMoConfig:
    """Hyper-parameters of VLMo. Presets: ``toy()`` and ``paper()`` (VLMo-Base)."""

    vocab_size: int = 30522  # word vocabulary (BERT uncased)
    max_text_len: int = 40  # text positions
    image_size: int = 224  # input pixels per side
    patch_size: int = 16  # patch side
    width: int = 768  # token width d
    depth: int = 12  # Multiway blocks
    heads: int = 12  # attention heads
    mlp_dim: int = 3072  # hidden width of every expert
    vl_start: int = 10  # blocks vl_start..depth-1 carry the VL expert (VLMo-B: 10, the top two)
    act: str = "gelu"  # expert activation
    ln_eps: float = 1e-6  # LayerNorm epsilon
    layer_scale: float = 0.1  # LayerScale initial value (VLMo: 0.1)
    dropout: float = 0.0  # dropout in blocks
    embed_dim: int = 768  # ITC embedding width e (VLMo: the hidden width)
    logit_scale_init: float = math.log(1 / 0.07)  # ITC temperature t, learned
    pad_token_id: int = 0  # [PAD]
    mask_token_id: int = 103  # [MASK]
    special_token_ids: tuple[int, ...] = (0, 100, 101, 102, 103)  # never masked
    mlm_probability: float = 0.15  # MLM masking rate
    itc_weight: float = 1.0  # weight of ITC in stage "vl"
    itm_weight: float = 1.0  # weight of ITM in stage "vl"
    mlm_weight: float = 0.25  # weight of image-text MLM in stage "vl" (reference: 0.25)
    mim_mask_ratio: float = 0.4  # share of patches masked in the toy image stage

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_text_len", "image_size", "patch_size", "width", "depth", "heads",
                     "mlp_dim", "embed_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"VLMoConfig.{name} must be a positive int, got {v!r}")
        if not 0 <= self.vl_start <= self.depth:
            raise ValueError(f"VLMoConfig.vl_start must lie in [0, depth={self.depth}], got {self.vl_start}")
        if self.width % self.heads:
            raise ValueError(f"VLMoConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"VLMoConfig.mask_token_id must lie in [0, vocab_size), got {self.mask_token_id}")
        if not 0.0 < self.mim_mask_ratio < 1.0:
            raise ValueError(f"VLMoConfig.mim_mask_ratio must be in (0, 1), got {self.mim_mask_ratio}")
        self.special_token_ids = tuple(int(i) for i in self.special_token_ids)
        get_activation(self.act)

    @classmethod
    def toy(cls, **overrides: Any) -> "VLMoConfig":
        """32 px shapes world, shapes tokenizer ([PAD] 0 [UNK] 1 [CLS] 2 [SEP] 3 [MASK] 4); 4 blocks, VL in the top 2."""
        base = dict(vocab_size=128, max_text_len=24, image_size=32, patch_size=8, width=96, depth=4, heads=4,
                    mlp_dim=256, vl_start=2, embed_dim=64, mask_token_id=4, special_token_ids=(0, 1, 2, 3, 4))
        return cls(**{**base, **overrides})

    @classmethod
    def paper(cls, **overrides: Any) -> "VLMoConfig":
        """VLMo-Base (Bao et al., 2022, sec. 3.1; ``vlmo_base_patch16``): 768 wide, 12 blocks, 12 heads, 224 px,
        patch 16, VL-FFN in the top 2 blocks, BERT vocabulary, 40 text tokens."""
        return cls(**overrides)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VLMoConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown VLMoConfig fields: {unknown}")
        return cls(**d)


@dataclass
class VLMoOutput:
    """What ``VLMo.forward`` returns; terms not used by the current stage are 0."""

    loss: Tensor  # scalar weighted sum for the current stage
    loss_itc: Tensor  # scalar contrastive loss (stage "vl")
    loss_itm: Tensor  # scalar matching loss with hard negatives (stage "vl")
    loss_mlm: Tensor  # scalar masked LM (stage "text": text-only; stage "vl": with the image)
    loss_mim: Tensor  # scalar masked patch colour regression (stage "image")
    itm_logits: Tensor | None = None  # (3b, 2) rows: positives, text + hard image, hard text + image
    itm_labels: Tensor | None = None  # (3b,)
    logits_per_image: Tensor | None = None  # (b, b) ITC logits


class VLMo(nn.Module):
    """A Multiway Transformer usable as image encoder, text encoder, dual encoder and fusion encoder."""

    def __init__(self, config: VLMoConfig) -> None:
        super().__init__()
        c = self.config = config
        self.stage = "vl"
        self.word_embeddings = nn.Embedding(c.vocab_size, c.width)
        self.text_position = nn.Parameter(torch.zeros(1, c.max_text_len, c.width))
        self.text_norm = nn.LayerNorm(c.width, eps=c.ln_eps)
        self.patch_embed = PatchEmbed(c.image_size, c.patch_size, c.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.width))  # replaces masked patches in stage "image"
        self.image_position = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, c.width))
        self.modality = ModalityTypeEmbedding(2, c.width)
        self.blocks = nn.ModuleList(
            MoMEBlock(c.width, c.heads, c.mlp_dim, with_vl_expert=i >= c.vl_start, act=c.act, ln_eps=c.ln_eps,
                      layer_scale=c.layer_scale, dropout=c.dropout) for i in range(c.depth))
        self.norm = nn.LayerNorm(c.width, eps=c.ln_eps)
        self.itc_text_proj = nn.Linear(c.width, c.embed_dim, bias=False)
        self.itc_image_proj = nn.Linear(c.width, c.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(c.logit_scale_init)))
        self.pooler = nn.Linear(c.width, c.width)
        self.itm_head = nn.Linear(c.width, 2)
        self.mlm_head = nn.Sequential(nn.Linear(c.width, c.width), nn.GELU(), nn.LayerNorm(c.width, eps=c.ln_eps),
                                      nn.Linear(c.width, c.vocab_size))
        self.mim_head = nn.Linear(c.width, 3)  # toy image stage: mean RGB of each masked patch
        self._init_weights()

    def _init_weights(self) -> None:
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding, nn.Conv2d)):
                nn.init.trunc_normal_(mod.weight, std=0.02)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
        for p in (self.text_position, self.cls_token, self.mask_token, self.image_position):
            nn.init.trunc_normal_(p, std=0.02)

    # --- embeddings -----------------------------------------------------------------------------------------
    def embed_text(self, input_ids: Tensor) -> Tensor:
        """``(b, t)`` ids -> ``(b, t, d)``: word + position, LayerNorm, + modality type 0."""
        check_token_ids(input_ids, self.config.vocab_size, self.config.max_text_len)
        x = self.word_embeddings(input_ids) + self.text_position[:, : input_ids.shape[1]]
        return self.modality(self.text_norm(x), 0)

    def embed_image(self, pixel_values: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """``(b, 3, H, W)`` -> ``(b, n, d)``: [CLS] + patches (masked ones replaced by a learned token)."""
        x = self.patch_embed(pixel_values)  # (b, P, d)
        if patch_mask is not None:
            x = torch.where(patch_mask[..., None], self.mask_token.expand_as(x), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.image_position  # (b, 1 + P, d)
        return self.modality(x, 1)

    def run_blocks(self, x: Tensor, modality: str, key_padding_mask: Tensor | None = None,
                   num_text_tokens: int | None = None) -> Tensor:
        for block in self.blocks:
            x = block(x, modality, key_padding_mask=key_padding_mask, num_text_tokens=num_text_tokens)
        return self.norm(x)

    # --- the three uses of one model ------------------------------------------------------------------------
    def image_tokens(self, pixel_values: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """Image encoder (V-FFN everywhere): ``(b, n, d)``."""
        return self.run_blocks(self.embed_image(pixel_values, patch_mask), "image")

    def text_tokens(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Text encoder (L-FFN everywhere): ``(b, t, d)``."""
        return self.run_blocks(self.embed_text(input_ids), "text", key_padding_mask=attention_mask)

    def encode_image(self, pixel_values: Tensor, normalize: bool = True) -> Tensor:
        """Dual-encoder image embedding ``(b, e)`` from the image [CLS]."""
        emb = self.itc_image_proj(self.image_tokens(pixel_values)[:, 0])
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, normalize: bool = True) -> Tensor:
        """Dual-encoder text embedding ``(b, e)`` from the text [CLS]."""
        emb = self.itc_text_proj(self.text_tokens(input_ids, attention_mask)[:, 0])
        return F.normalize(emb, dim=-1) if normalize else emb

    def fuse(self, input_ids: Tensor, pixel_values: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Fusion encoder on ``[text; image]``: ``(b, t + n, d)``."""
        text = self.embed_text(input_ids)  # (b, t, d)
        image = self.embed_image(pixel_values)  # (b, n, d)
        if image.shape[0] != text.shape[0]:
            raise ValueError(f"got {image.shape[0]} images for {text.shape[0]} captions")
        am = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        mask = torch.cat([am.long(), am.new_ones(image.shape[:2]).long()], 1)  # (b, t + n)
        return self.run_blocks(torch.cat([text, image], 1), "vl", key_padding_mask=mask,
                               num_text_tokens=input_ids.shape[1])

    def itm_scores(self, input_ids: Tensor, pixel_values: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Fusion-encoder matching log-odds ``(b,)``."""
        logits = self.itm_head(torch.tanh(self.pooler(self.fuse(input_ids, pixel_values, attention_mask)[:, 0])))
        return logits[:, 1] - logits[:, 0]

    # --- stage-wise pre-training ----------------------------------------------------------------------------
    def trainable_prefixes(self, stage: str) -> tuple[str, ...] | None:
        """Parameter-name prefixes that train in ``stage`` (None = all). Stage "text" is VLMo's ``run.py`` list."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if stage == "text":
            experts = tuple(f"blocks.{i}.{n}" for i in range(len(self.blocks)) for n in ("mlp_text", "norm2_text"))
            return ("word_embeddings", "text_position", "text_norm", "modality", "mlm_head", "norm") + experts
        return None

    def set_stage(self, stage: str) -> "VLMo":
        """Switch objectives and freeze what the stage freezes (``requires_grad``). Returns self."""
        prefixes = self.trainable_prefixes(stage)
        for name, p in self.named_parameters():
            p.requires_grad_(prefixes is None or any(name == q or name.startswith(q + ".") for q in prefixes))
        self.stage = stage
        return self

    # --- objectives -----------------------------------------------------------------------------------------
    def _mlm(self, batch: dict[str, Any], with_image: bool) -> Tensor:
        c = self.config
        ids, am = batch["input_ids"], batch.get("attention_mask")
        am = torch.ones_like(ids) if am is None else am
        masked, labels = mask_tokens(ids, mask_token_id=c.mask_token_id, vocab_size=c.vocab_size,
                                     special_token_ids=c.special_token_ids, attention_mask=am,
                                     mlm_probability=c.mlm_probability)
        if with_image:
            hidden = self.fuse(masked, batch["pixel_values"], am)[:, : ids.shape[1]]
        else:
            hidden = self.text_tokens(masked, am)
        return mlm_loss(self.mlm_head(hidden), labels)

    def _mim(self, pixel_values: Tensor) -> Tensor:
        c = self.config
        b, P = pixel_values.shape[0], self.patch_embed.num_patches
        patch_mask = torch.rand(b, P, device=pixel_values.device) < c.mim_mask_ratio  # (b, P)
        patch_mask[:, 0] |= ~patch_mask.any(1)  # at least one masked patch per image
        g, p = self.patch_embed.grid, c.patch_size
        target = pixel_values.reshape(b, 3, g, p, g, p).mean(dim=(3, 5)).flatten(2).transpose(1, 2)  # (b, P, 3)
        pred = self.mim_head(self.image_tokens(pixel_values, patch_mask)[:, 1:])  # (b, P, 3)
        return F.mse_loss(pred[patch_mask], target[patch_mask])

    def forward(self, batch: dict[str, Any]) -> VLMoOutput:
        """One pre-training step of the current stage (``set_stage``) on a batch dict."""
        if not isinstance(batch, dict):
            raise TypeError(f"batch must be a dict of tensors, got {type(batch).__name__}")
        c = self.config
        zero = self.logit_scale.new_zeros(())
        if self.stage == "image":
            loss_mim = self._mim(batch["pixel_values"])
            return VLMoOutput(loss=loss_mim, loss_itc=zero, loss_itm=zero, loss_mlm=zero, loss_mim=loss_mim)
        if self.stage == "text":
            loss_mlm = self._mlm(batch, with_image=False)
            return VLMoOutput(loss=loss_mlm, loss_itc=zero, loss_itm=zero, loss_mlm=loss_mlm, loss_mim=zero)
        ids, px = batch["input_ids"], batch["pixel_values"]
        am = batch.get("attention_mask")
        am = torch.ones_like(ids) if am is None else am
        img, txt = self.encode_image(px), self.encode_text(ids, am)  # (b, e) each
        scale = self.logit_scale.exp()
        loss_itc = clip_loss(img, txt, scale)
        sim = scale * img @ txt.T  # (b, b)
        groups = batch.get("group_ids")
        neg_img = hard_negatives(sim.T, group_ids=groups)  # (b,) a hard image for each caption
        neg_txt = hard_negatives(sim, group_ids=groups)  # (b,) a hard caption for each image
        all_ids = torch.cat([ids, ids, ids[neg_txt]])  # (3b, t)
        all_am = torch.cat([am, am, am[neg_txt]])
        all_px = torch.cat([px, px[neg_img], px])  # (3b, 3, H, W)
        pooled = torch.tanh(self.pooler(self.fuse(all_ids, all_px, all_am)[:, 0]))
        itm_logits = self.itm_head(pooled)  # (3b, 2)
        b = ids.shape[0]
        itm_labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(ids.device)
        loss_itm = itm_loss(itm_logits, itm_labels)
        loss_mlm = self._mlm(batch, with_image=True)
        loss = c.itc_weight * loss_itc + c.itm_weight * loss_itm + c.mlm_weight * loss_mlm
        return VLMoOutput(loss=loss, loss_itc=loss_itc, loss_itm=loss_itm, loss_mlm=loss_mlm, loss_mim=zero,
                          itm_logits=itm_logits, itm_labels=itm_labels, logits_per_image=sim)

    def extra_repr(self) -> str:
        return f"config={asdict(self.config)}, stage={self.stage!r}"
