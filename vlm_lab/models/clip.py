"""CLIP: Learning Transferable Visual Models From Natural Language Supervision (Radford et al., 2021).

Two towers and one loss (the paper's Figure 3 pseudocode)::

    I_f = image_encoder(I)                 # ViT: (b, 3, H, W) -> class token (b, d_i)
    T_f = text_encoder(T)                  # causal transformer, pooled at [EOT]: (b, n) -> (b, d_t)
    I_e = l2_normalize(I_f @ W_i)          # (b, d_e)
    T_e = l2_normalize(T_f @ W_t)          # (b, d_e)
    logits = I_e @ T_e.T * exp(t)          # (b, b)
    loss = (CE(logits, arange) + CE(logits.T, arange)) / 2      -> vlm_lab.losses.clip_loss

Matches OpenAI ``clip/model.py`` and Hugging Face ``modeling_clip.py`` (``CLIP.from_hf`` loads any
``CLIPModel`` with identical embeddings and logits; ``tests/test_clip_parity.py`` checks transformers 5.x).
Choices, written down:

- the temperature is learned as t = ``logit_scale`` (initialised to ln(1/0.07)); ``post_step`` clamps it to
  [0, ln 100] after each optimiser step, as open_clip's training loop does ("as in the original paper");
  the forward itself does not clamp (like Hugging Face);
- the text tower uses a causal mask plus the padding mask (HF); with right padding the pooled [EOT] output is
  the same either way;
- ``eot_token_id=None`` pools at ``input_ids.argmax(-1)`` (OpenAI, whose [EOT] has the largest id); an id
  pools at its first occurrence (HF);
- the vision tower is the lab's ViT, or any timm model (``vision_backbone="timm:<name>"``).

Shape letters: b batch, n text tokens, d_i / d_t tower widths, d_e embedding width.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..interop import load_converted, rename_keys
from ..losses import clip_loss
from ..nn import Encoder, TimmBackbone, TokenEmbedding, ViT, ViTConfig, check_token_ids, eot_pool
from ..nn.embed import check_attention_mask
from ._config import config_from_dict, require_keys


@dataclass
class CLIPConfig:
    """Hyper-parameters of CLIP. Presets: ``toy()`` (CPU, seconds), ``small()``, ``paper(variant)``."""

    embed_dim: int = 512  # width d_e of the joint embedding space
    # --- vision tower
    vision_backbone: str = "vit"  # "vit" (the lab's ViT) or "timm:<model name>"
    image_size: int = 224  # input pixels per side
    patch_size: int = 32  # ViT patch side
    vision_width: int = 768  # ViT token width d_i
    vision_layers: int = 12  # ViT blocks
    vision_heads: int = 12  # ViT attention heads
    vision_mlp_dim: int = 3072  # ViT MLP hidden width
    # --- text tower
    vocab_size: int = 49408  # token vocabulary (OpenAI BPE: 49,408)
    context_length: int = 77  # maximum text length, including [SOT] and [EOT]
    text_width: int = 512  # text token width d_t
    text_layers: int = 12  # text blocks
    text_heads: int = 8  # text attention heads
    text_mlp_dim: int = 2048  # text MLP hidden width
    eot_token_id: int | None = None  # pool at the first occurrence of this id; None = argmax of ids (OpenAI)
    # --- shared
    act: str = "quick_gelu"  # MLP activation of both towers (OpenAI: QuickGELU)
    ln_eps: float = 1e-5  # LayerNorm epsilon
    logit_scale_init: float = math.log(1 / 0.07)  # t at initialisation (temperature 0.07)
    logit_scale_max: float = math.log(100.0)  # post_step clamps t to [0, this]

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and f.name != "eot_token_id" and v <= 0:
                raise ValueError(f"CLIPConfig.{f.name} must be positive, got {v}")
        if not (self.vision_backbone == "vit" or self.vision_backbone.startswith("timm:")):
            raise ValueError(f"CLIPConfig.vision_backbone must be 'vit' or 'timm:<name>', got {self.vision_backbone!r}")
        if self.eot_token_id is not None and not 0 <= self.eot_token_id < self.vocab_size:
            raise ValueError(f"CLIPConfig.eot_token_id must lie in [0, vocab_size={self.vocab_size}), "
                             f"got {self.eot_token_id}")
        if self.text_width % self.text_heads:
            raise ValueError(f"CLIPConfig.text_width ({self.text_width}) must be divisible by "
                             f"text_heads ({self.text_heads})")
        if not math.isfinite(self.logit_scale_init):
            raise ValueError(f"CLIPConfig.logit_scale_init must be finite, got {self.logit_scale_init}")

    @classmethod
    def toy(cls, **overrides: Any) -> "CLIPConfig":
        """A CLIP that trains in well under a minute on two CPU cores (32 px shapes, ~0.5 M parameters)."""
        base = dict(embed_dim=64, image_size=32, patch_size=8, vision_width=96, vision_layers=3, vision_heads=4,
                    vision_mlp_dim=384, vocab_size=512, context_length=24, text_width=96, text_layers=2,
                    text_heads=4, text_mlp_dim=384, act="gelu")
        return cls(**{**base, **overrides})

    @classmethod
    def small(cls, **overrides: Any) -> "CLIPConfig":
        """A ~10 M parameter CLIP at 64 px: minutes on a CPU, seconds per epoch on a GPU."""
        base = dict(embed_dim=256, image_size=64, patch_size=8, vision_width=256, vision_layers=6, vision_heads=8,
                    vision_mlp_dim=1024, vocab_size=8192, context_length=32, text_width=256, text_layers=6,
                    text_heads=8, text_mlp_dim=1024, act="gelu")
        return cls(**{**base, **overrides})

    @classmethod
    def paper(cls, variant: str = "ViT-B/32", **overrides: Any) -> "CLIPConfig":
        """The published ViT-B/32 or ViT-B/16 (Radford et al., 2021, Table 20; open_clip ``ViT-B-32.json``):

        embed 512; vision width 768, 12 layers, 12 heads, 224 px, patch 32 or 16; text width 512, 12 layers,
        8 heads, vocabulary 49,408, context 77; QuickGELU.
        """
        patches = {"ViT-B/32": 32, "ViT-B/16": 16}
        if variant not in patches:
            raise ValueError(f"variant must be one of {sorted(patches)}, got {variant!r}")
        return cls(**{**dict(patch_size=patches[variant], eot_token_id=None), **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
        return config_from_dict(cls, d)


@dataclass
class CLIPOutput:
    """What ``CLIP.forward`` returns."""

    loss: Tensor  # scalar symmetric InfoNCE
    logits_per_image: Tensor  # (b, b) exp(t) * cosine similarities, row = image
    logits_per_text: Tensor  # (b, b) its transpose, row = text
    image_embeds: Tensor  # (b, d_e) L2-normalised
    text_embeds: Tensor  # (b, d_e) L2-normalised
    logit_scale: Tensor  # scalar exp(t) used for the logits


class TextTransformer(nn.Module):
    """CLIP's text tower: token + position embeddings, causal pre-LN blocks, final LayerNorm, [EOT] pooling."""

    def __init__(self, c: CLIPConfig) -> None:
        super().__init__()
        self.config = c
        self.embed = TokenEmbedding(c.vocab_size, c.text_width, c.context_length)
        self.encoder = Encoder(c.text_width, c.text_layers, c.text_heads, c.text_mlp_dim, act=c.act, ln_eps=c.ln_eps)
        self.ln_final = nn.LayerNorm(c.text_width, eps=c.ln_eps)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``(b, n)`` ids -> ``(b, n, d_t)`` hidden states (causal: position i sees positions <= i)."""
        x = self.embed(input_ids)  # (b, n, d_t)
        x = self.encoder(x, key_padding_mask=attention_mask, is_causal=True)
        return self.ln_final(x)

    def pool(self, hidden: Tensor, input_ids: Tensor) -> Tensor:
        return eot_pool(hidden, input_ids, self.config.eot_token_id)  # (b, d_t)


class CLIP(nn.Module):
    """Contrastive Language-Image Pre-training: an image tower, a text tower, two projections, a temperature."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        c = self.config = config
        if c.vision_backbone == "vit":
            self.visual: nn.Module = ViT(ViTConfig(
                image_size=c.image_size, patch_size=c.patch_size, width=c.vision_width, layers=c.vision_layers,
                heads=c.vision_heads, mlp_dim=c.vision_mlp_dim, act=c.act, ln_pre=True, ln_eps=c.ln_eps,
                patch_bias=False))
        else:
            self.visual = TimmBackbone(c.vision_backbone.removeprefix("timm:"), image_size=c.image_size)
        self.text = TextTransformer(c)
        self.visual_projection = nn.Linear(self.visual.width, c.embed_dim, bias=False)
        self.text_projection = nn.Linear(c.text_width, c.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(c.logit_scale_init)))
        self._init_weights()

    def _init_weights(self) -> None:
        """OpenAI's ``initialize_parameters``: std w^-0.5 for attention, (2w)^-0.5 for fc1, w^-0.5 (2L)^-0.5 out."""
        def init_encoder(enc: Encoder, width: int) -> None:
            proj_std = width**-0.5 * (2 * max(len(enc.blocks), 1)) ** -0.5
            for block in enc.blocks:
                for lin in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj):
                    nn.init.normal_(lin.weight, std=width**-0.5)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.fc1.weight, std=(2 * width) ** -0.5)
                nn.init.normal_(block.mlp.fc2.weight, std=proj_std)

        c = self.config
        nn.init.normal_(self.text.embed.token.weight, std=0.02)
        nn.init.normal_(self.text.embed.position.weight, std=0.01)
        init_encoder(self.text.encoder, c.text_width)
        if isinstance(self.visual, ViT):
            init_encoder(self.visual.encoder, c.vision_width)
        nn.init.normal_(self.text_projection.weight, std=c.text_width**-0.5)
        nn.init.normal_(self.visual_projection.weight, std=self.visual.width**-0.5)

    # --- the two towers -------------------------------------------------------------------------------------
    def encode_image(self, pixel_values: Tensor, normalize: bool = True) -> Tensor:
        """``(b, 3, H, W)`` normalised pixels -> ``(b, d_e)`` image embeddings (L2-normalised by default)."""
        tokens = self.visual(pixel_values)  # (b, 1 + g*g, d_i)
        emb = self.visual_projection(self.visual.pool(tokens))  # (b, d_e)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, normalize: bool = True) -> Tensor:
        """``(b, n)`` token ids (with [EOT]) -> ``(b, d_e)`` text embeddings (L2-normalised by default)."""
        check_token_ids(input_ids, self.config.vocab_size, self.config.context_length)
        check_attention_mask(attention_mask, input_ids)
        hidden = self.text(input_ids, attention_mask)  # (b, n, d_t)
        emb = self.text_projection(self.text.pool(hidden, input_ids))  # (b, d_e)
        return F.normalize(emb, dim=-1) if normalize else emb

    # --- training -------------------------------------------------------------------------------------------
    def contrastive_features(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Per-sample features for exact contrastive gradient accumulation (see ``vlm_lab.train``)."""
        require_keys(batch, "pixel_values", "input_ids")
        image_embeds = self.encode_image(batch["pixel_values"])
        text_embeds = self.encode_text(batch["input_ids"], batch.get("attention_mask"))
        if image_embeds.shape[0] != text_embeds.shape[0]:
            raise ValueError(f"the batch has {image_embeds.shape[0]} images but {text_embeds.shape[0]} captions; "
                             "CLIP needs one caption per image")
        return {"image_embeds": image_embeds, "text_embeds": text_embeds}

    def contrastive_loss(self, features: dict[str, Tensor]) -> Tensor:
        """Symmetric InfoNCE over (possibly accumulated or gathered) features."""
        return clip_loss(features["image_embeds"], features["text_embeds"], self.logit_scale.exp())

    def forward(self, batch: dict[str, Any]) -> CLIPOutput:
        """A batch dict with ``pixel_values (b, 3, H, W)``, ``input_ids (b, n)``, optional ``attention_mask``."""
        feats = self.contrastive_features(batch)
        scale = self.logit_scale.exp()
        logits_per_image = scale * feats["image_embeds"] @ feats["text_embeds"].T  # (b, b)
        return CLIPOutput(loss=self.contrastive_loss(feats), logits_per_image=logits_per_image,
                          logits_per_text=logits_per_image.T, image_embeds=feats["image_embeds"],
                          text_embeds=feats["text_embeds"], logit_scale=scale)

    @torch.no_grad()
    def post_step(self) -> None:
        """After each optimiser step: keep t = ``logit_scale`` in [0, ln 100] (temperature >= 0.01)."""
        self.logit_scale.clamp_(0.0, self.config.logit_scale_max)

    # --- interop --------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> "CLIP":
        """Build a lab CLIP with the weights of a transformers ``CLIPModel`` (any size).

        Embeddings and logits match the reference to fp32 round-off (``tests/test_clip_parity.py``).
        """
        hc = getattr(hf_model, "config", None)
        if hc is None or not hasattr(hc, "vision_config") or not hasattr(hc, "text_config"):
            raise TypeError(f"hf_model must be a transformers CLIPModel, got {type(hf_model).__name__}")
        v, t = hc.vision_config, hc.text_config
        if v.hidden_act != t.hidden_act:
            raise ValueError(f"the two towers use different activations ({v.hidden_act}, {t.hidden_act}); "
                             "the lab's CLIP has one")
        if abs(v.layer_norm_eps - t.layer_norm_eps) > 0:
            raise ValueError("the two towers use different LayerNorm eps; the lab's CLIP has one")
        eos = t.eos_token_id
        config = CLIPConfig(
            embed_dim=hc.projection_dim, image_size=v.image_size, patch_size=v.patch_size, vision_width=v.hidden_size,
            vision_layers=v.num_hidden_layers, vision_heads=v.num_attention_heads, vision_mlp_dim=v.intermediate_size,
            vocab_size=t.vocab_size, context_length=t.max_position_embeddings, text_width=t.hidden_size,
            text_layers=t.num_hidden_layers, text_heads=t.num_attention_heads, text_mlp_dim=t.intermediate_size,
            # HF's legacy rule: eos_token_id == 2 means "argmax of the ids" (OpenAI's convention)
            eot_token_id=None if eos == 2 or eos is None or eos >= t.vocab_size else eos,
            act=v.hidden_act, ln_eps=v.layer_norm_eps,
        )
        model = cls(config)
        layer = r"encoder\.layers\.(\d+)\."
        rules = [
            (r"^vision_model\.embeddings\.patch_embedding\.", "visual.patch_embed.proj."),
            (r"^vision_model\.embeddings\.class_embedding$", "visual.class_embedding"),
            (r"^vision_model\.embeddings\.position_embedding\.weight$", "visual.position_embedding"),
            (r"^vision_model\.pre_layrnorm\.", "visual.ln_pre."),
            (r"^vision_model\.post_layernorm\.", "visual.ln_post."),
            (r"^text_model\.embeddings\.token_embedding\.", "text.embed.token."),
            (r"^text_model\.embeddings\.position_embedding\.", "text.embed.position."),
            (r"^text_model\.final_layer_norm\.", "text.ln_final."),
            (rf"^vision_model\.{layer}self_attn\.", r"visual.encoder.blocks.\1.attn."),
            (rf"^text_model\.{layer}self_attn\.", r"text.encoder.blocks.\1.attn."),
            (rf"^vision_model\.{layer}layer_norm(\d)\.", r"visual.encoder.blocks.\1.norm\2."),
            (rf"^text_model\.{layer}layer_norm(\d)\.", r"text.encoder.blocks.\1.norm\2."),
            (rf"^vision_model\.{layer}mlp\.", r"visual.encoder.blocks.\1.mlp."),
            (rf"^text_model\.{layer}mlp\.", r"text.encoder.blocks.\1.mlp."),
        ]
        state = rename_keys(hf_model.state_dict(), rules, drop=[r"position_ids$"])
        load_converted(model, state, source="transformers CLIPModel")
        return model.to(next(hf_model.parameters()).dtype)

    def extra_repr(self) -> str:
        return f"config={asdict(self.config)}"
