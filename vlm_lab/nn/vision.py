"""Vision towers: a ViT built from the lab's blocks, and a wrapper for any timm backbone.

``ViT`` follows Dosovitskiy et al. (2021), eq. 1-4, in CLIP's variant (Radford et al., 2021):

    z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos          patches -> tokens, a class token, positions
    z_0 = LN_pre(z_0)                                       CLIP adds this norm (``ln_pre``); plain ViT does not
    z_l = Block(z_{l-1}),  l = 1..L                         pre-LN transformer blocks
    y   = LN_post(z_L^0)                                    the class token, normalised (``pool``)

Both towers expose the same small interface: ``forward(pixel_values) -> tokens (b, n, d)``,
``pool(tokens) -> (b, d)``, ``width`` and ``image_size``; ``ViT.hidden_states`` returns every layer's output
(LLaVA takes the penultimate one).

Shape letters: b batch, n tokens (1 + g*g), g patches per side, d width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .blocks import Encoder
from .embed import PatchEmbed, check_pixel_values


@dataclass
class ViTConfig:
    image_size: int = 224  # input height = width in pixels
    patch_size: int = 16  # patch side p; the grid is image_size / p per side
    width: int = 768  # token width d
    layers: int = 12  # number of transformer blocks
    heads: int = 12  # attention heads
    mlp_dim: int = 3072  # hidden width of each block's MLP
    act: str = "gelu"  # MLP activation ("quick_gelu" for OpenAI CLIP)
    ln_pre: bool = True  # LayerNorm after the embeddings (CLIP) or not (original ViT)
    ln_eps: float = 1e-5  # LayerNorm epsilon
    patch_bias: bool = False  # bias in the patch projection (CLIP: no; ViT: yes)
    channels: int = 3  # input channels

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "heads", "mlp_dim", "channels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ViTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.layers < 0:
            raise ValueError(f"ViTConfig.layers must be >= 0, got {self.layers}")
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig.image_size ({self.image_size}) must be divisible by "
                             f"patch_size ({self.patch_size})")
        if self.width % self.heads:
            raise ValueError(f"ViTConfig.width ({self.width}) must be divisible by heads ({self.heads})")


class ViT(nn.Module):
    """Vision Transformer with a class token: ``(b, 3, H, W) -> (b, 1 + g*g, d)``."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        c = config
        self.config, self.width, self.image_size = c, c.width, c.image_size
        self.patch_embed = PatchEmbed(c.image_size, c.patch_size, c.width, c.channels, bias=c.patch_bias)
        self.class_embedding = nn.Parameter(torch.randn(c.width) * c.width**-0.5)
        self.position_embedding = nn.Parameter(torch.randn(self.patch_embed.num_patches + 1, c.width) * 0.02)
        self.ln_pre = nn.LayerNorm(c.width, eps=c.ln_eps) if c.ln_pre else nn.Identity()
        self.encoder = Encoder(c.width, c.layers, c.heads, c.mlp_dim, act=c.act, ln_eps=c.ln_eps)
        self.ln_post = nn.LayerNorm(c.width, eps=c.ln_eps)

    @property
    def num_tokens(self) -> int:
        return self.patch_embed.num_patches + 1

    def embed(self, pixel_values: Tensor) -> Tensor:
        """Patches, class token and positions, then ``ln_pre``: ``(b, 3, H, W) -> (b, 1 + g*g, d)``."""
        x = self.patch_embed(pixel_values)  # (b, g*g, d)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (d,) -> (b, 1, d)
        x = torch.cat([cls, x], dim=1) + self.position_embedding.to(x.dtype)  # (b, 1 + g*g, d)
        return self.ln_pre(x)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.encoder(self.embed(pixel_values))

    def hidden_states(self, pixel_values: Tensor) -> list[Tensor]:
        """``[embeddings, block_1, ..., block_L]`` outputs, each ``(b, 1 + g*g, d)`` (as HF's ``hidden_states``)."""
        states = [self.embed(pixel_values)]
        for block in self.encoder.blocks:
            states.append(block(states[-1]))
        return states

    def pool(self, tokens: Tensor) -> Tensor:
        """The class token after ``ln_post``: ``(b, n, d) -> (b, d)``."""
        return self.ln_post(tokens[:, 0])


class TimmBackbone(nn.Module):
    """Any timm model as a vision tower (built from its name offline: ``pretrained=False`` by default).

    ``forward`` returns timm's ``forward_features`` tokens ``(b, n, d)`` and ``pool`` its pre-logits vector.
    Loading pretrained weights needs the network (or a local cache) and is an explicit opt-in.
    """

    def __init__(self, name: str, image_size: int, pretrained: bool = False, **kwargs) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as e:  # pragma: no cover - timm is a core dependency
            raise ImportError("TimmBackbone needs timm: pip install timm") from e
        if name not in timm.list_models(pretrained=False) and not timm.is_model(name):
            raise ValueError(f"unknown timm model name {name!r}; see timm.list_models()")
        extra = dict(kwargs)
        if "img_size" not in extra:
            try:  # ViT-like models take img_size; CNNs do not
                self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, img_size=image_size, **extra)
            except TypeError:
                self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, **extra)
        else:
            self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, **extra)
        self.name, self.image_size = name, image_size
        self.width = self.model.num_features

    def forward(self, pixel_values: Tensor) -> Tensor:
        check_pixel_values(pixel_values, self.image_size)
        feats = self.model.forward_features(pixel_values)
        if feats.dim() == 4:  # CNN feature map (b, d, h, w) -> tokens (b, h*w, d)
            feats = feats.flatten(2).transpose(1, 2)
        return feats

    def pool(self, tokens: Tensor) -> Tensor:
        if getattr(self.model, "global_pool", None) == "token" or hasattr(self.model, "cls_token"):
            return self.model.forward_head(tokens, pre_logits=True)
        return tokens.mean(dim=1)
