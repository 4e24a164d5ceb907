"""Embeddings: image patches, text tokens with learned positions, and modality types.

- ``PatchEmbed`` cuts an image into non-overlapping p x p patches and projects each linearly (ViT, eq. 1;
  implemented as a convolution with kernel = stride = p, the usual trick).
- ``TokenEmbedding`` is a token table plus a learned absolute position table (GPT-2, CLIP, BERT).
- ``ModalityTypeEmbedding`` adds a learned vector per modality (ViLT: text 0, image 1).

Inputs are checked: wrong image sizes, channel counts, token ids outside the vocabulary and sequences longer
than the position table raise ``ValueError`` naming the argument.

Shape letters: b batch, c channels, H/W image height/width, p patch, g patches per side, n tokens, d width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def check_pixel_values(pixel_values: Tensor, image_size: int | None, channels: int = 3,
                       name: str = "pixel_values") -> None:
    """Raise a clear error unless ``pixel_values`` is a finite float ``(b, channels, size, size)`` tensor."""
    if not isinstance(pixel_values, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.dim() != 4:
        raise ValueError(f"{name} must have shape (batch, {channels}, height, width), got {tuple(pixel_values.shape)}")
    if not pixel_values.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor (normalised pixels), got {pixel_values.dtype}")
    if pixel_values.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels, got {pixel_values.shape[1]} "
                         f"(shape {tuple(pixel_values.shape)}; channels come second: (batch, channels, H, W))")
    if pixel_values.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    if image_size is not None and tuple(pixel_values.shape[-2:]) != (image_size, image_size):
        raise ValueError(f"{name} must be {image_size}x{image_size} pixels for this model, "
                         f"got {tuple(pixel_values.shape[-2:])}")
    if pixel_values.device.type != "meta" and not torch.isfinite(pixel_values).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def check_attention_mask(attention_mask: Tensor | None, input_ids: Tensor, name: str = "attention_mask") -> None:
    """Raise a clear error unless ``attention_mask`` is None or a ``(b, n)`` mask of 0 / 1 shaped like
    ``input_ids`` with at least one 1 per row (an all-padding row would be encoded into a meaningless vector)."""
    if attention_mask is None:
        return
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask.device.type == "meta" or not attention_mask.numel():
        return
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 (padding) and 1 (token), got values "
                         f"{sorted(set(attention_mask.flatten().tolist()))[:5]}")
    empty = (attention_mask.sum(dim=-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{name}: row(s) {empty[:5]} mask out every token (an empty caption); give each row at "
                         "least one token")


def check_token_ids(input_ids: Tensor, vocab_size: int, max_length: int | None = None,
                    name: str = "input_ids") -> None:
    """Raise a clear error unless ``input_ids`` is an integer ``(b, n)`` tensor with ids in ``[0, vocab_size)``."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, tokens), got {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {input_ids.dtype}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(input_ids.shape)}); give at least one non-empty caption")
    if max_length is not None and input_ids.shape[1] > max_length:
        raise ValueError(f"{name} has {input_ids.shape[1]} tokens but the model takes at most {max_length}")
    if input_ids.device.type != "meta":
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} must lie in [0, {vocab_size}) (the vocabulary size), found ids in [{lo}, {hi}]; "
                             "was the text tokenised with a different tokenizer?")


class PatchEmbed(nn.Module):
    """Split ``(b, c, H, W)`` into g x g patches of p x p pixels and project each to ``dim``: ``(b, g*g, d)``."""

    def __init__(self, image_size: int, patch_size: int, dim: int, channels: int = 3, bias: bool = True) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch_size ({patch_size})")
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.grid = image_size // patch_size
        self.num_patches = self.grid**2
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, pixel_values: Tensor) -> Tensor:
        check_pixel_values(pixel_values, self.image_size, self.channels)
        weight = self.proj.weight
        if pixel_values.dtype != weight.dtype and not torch.is_autocast_enabled(pixel_values.device.type):
            raise TypeError(f"pixel_values has dtype {pixel_values.dtype} but the model's weights are {weight.dtype}; "
                            f"convert with pixel_values.to({weight.dtype}) (or use autocast)")
        x = self.proj(pixel_values)  # (b, d, g, g)
        return x.flatten(2).transpose(1, 2)  # (b, d, g, g) -> (b, g*g, d)


class TokenEmbedding(nn.Module):
    """Token table + learned absolute positions: ``(b, n)`` ids -> ``(b, n, d)``."""

    def __init__(self, vocab_size: int, dim: int, max_length: int) -> None:
        super().__init__()
        self.vocab_size, self.max_length = vocab_size, max_length
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_length, dim)

    def forward(self, input_ids: Tensor) -> Tensor:
        check_token_ids(input_ids, self.vocab_size, self.max_length)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token(input_ids) + self.position(positions)[None]  # (b, n, d)


class ModalityTypeEmbedding(nn.Module):
    """A learned vector per modality, added to every token of that modality (ViLT: text 0, image 1)."""

    def __init__(self, num_types: int, dim: int) -> None:
        super().__init__()
        self.num_types = num_types
        self.embedding = nn.Embedding(num_types, dim)

    def forward(self, x: Tensor, modality: int) -> Tensor:
        if not 0 <= modality < self.num_types:
            raise ValueError(f"modality must be in [0, {self.num_types}), got {modality}")
        return x + self.embedding.weight[modality]
