"""Image <-> tensor conversion and the normalisation every VLM Lab image goes through.

The mean / std are CLIP's (OpenAI ``clip/clip.py`` ``_transform`` and HF ``CLIPImageProcessor``
``image_mean`` / ``image_std``), so that toy models and pretrained CLIP weights see images prepared the
same way.

Shape legend: ``h`` height, ``w`` width, ``c`` channels (3), ``b`` batch.

``check_image_tensor`` is the data-side validator (datasets, collators, demos). Models do their own
checks: ``models`` must not import ``data``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "to_tensor",
    "denormalize",
    "to_uint8",
    "check_image_tensor",
    "resize_center_crop_pad",
]

#: CLIP's per-channel RGB mean of images scaled to [0, 1].
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
#: CLIP's per-channel RGB standard deviation of images scaled to [0, 1].
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def to_tensor(
    img,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """Turn a uint8 RGB image ``(h, w, 3)`` (numpy array or PIL image) into a normalised float32 ``(3, h, w)``.

    ``(x / 255 - mean) / std`` per channel.
    """
    if not isinstance(img, np.ndarray):
        try:  # PIL images (and anything array-like) without importing PIL here
            img = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img)
        except Exception as exc:  # pragma: no cover - defensive
            raise TypeError(f"img: expected a uint8 numpy array (H, W, 3) or a PIL image, got {type(img).__name__}") from exc
    if img.dtype != np.uint8:
        raise TypeError(f"img: expected dtype uint8, got {img.dtype}")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"img: expected shape (H, W, 3), got {tuple(img.shape)}")
    # numpy, not torch: per-image work this small is slower with torch's intra-op threads
    scale = 1.0 / (255.0 * np.asarray(std, np.float32))  # (c,)
    offset = np.asarray(mean, np.float32) / np.asarray(std, np.float32)  # (c,)
    x = img.transpose(2, 0, 1).astype(np.float32)  # (h, w, c) -> (c, h, w)
    x *= scale[:, None, None]
    x -= offset[:, None, None]
    return torch.from_numpy(x)


def denormalize(
    pixel_values: torch.Tensor,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """Undo :func:`to_tensor`: ``(..., 3, h, w)`` normalised -> the same shape in [0, 1] (clamped)."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values: expected a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.ndim < 3 or pixel_values.shape[-3] != 3:
        raise ValueError(f"pixel_values: expected shape (..., 3, H, W), got {tuple(pixel_values.shape)}")
    m = torch.tensor(mean, dtype=pixel_values.dtype, device=pixel_values.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=pixel_values.dtype, device=pixel_values.device).view(3, 1, 1)
    return (pixel_values * s + m).clamp(0.0, 1.0)


def to_uint8(pixel_values: torch.Tensor) -> np.ndarray:
    """Normalised ``(3, h, w)`` tensor -> uint8 numpy ``(h, w, 3)`` for display."""
    if pixel_values.ndim != 3:
        raise ValueError(f"pixel_values: expected a single image (3, H, W), got shape {tuple(pixel_values.shape)}")
    x = denormalize(pixel_values.detach().float().cpu())
    return (x.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)  # (c, h, w) -> (h, w, c)


def check_image_tensor(
    pixel_values,
    image_size: int | tuple[int, int] | None = None,
    channels: int = 3,
    *,
    batched: bool = True,
    name: str = "pixel_values",
) -> None:
    """Raise a clear error unless ``pixel_values`` is a finite float tensor ``(b, c, h, w)``.

    Args:
        pixel_values: the tensor to check.
        image_size: expected ``h == w == image_size`` (int) or ``(h, w)``; ``None`` accepts any size.
        channels: expected number of channels.
        batched: ``True`` expects ``(b, c, h, w)``, ``False`` expects a single ``(c, h, w)``.
        name: the argument name used in error messages.
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(pixel_values).__name__}")
    want = "(B, C, H, W)" if batched else "(C, H, W)"
    if pixel_values.ndim != (4 if batched else 3):
        raise ValueError(f"{name}: expected a {4 if batched else 3}-d tensor {want}, "
                         f"got shape {tuple(pixel_values.shape)}")
    if not pixel_values.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor (normalised image), got dtype {pixel_values.dtype}")
    c, h, w = pixel_values.shape[-3:]
    if c != channels:
        raise ValueError(f"{name}: expected {channels} channels at dim {-3 % pixel_values.ndim} of {want}, "
                         f"got shape {tuple(pixel_values.shape)}")
    if image_size is not None:
        eh, ew = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if (h, w) != (eh, ew):
            raise ValueError(f"{name}: expected spatial size (H, W) = ({eh}, {ew}), got ({h}, {w})")
    if pixel_values.numel() and not bool(torch.isfinite(pixel_values).all()):
        raise ValueError(f"{name}: contains NaN or Inf values")


def resize_center_crop_pad(img, size: int = 448) -> np.ndarray:
    """CONCH's pre-training image preparation (Lu et al., 2024, Methods): uint8 ``(h, w, 3)`` -> ``(size, size, 3)``.

    An image whose shorter side exceeds ``size`` is resized (bicubic) so that side equals ``size``, then
    centre-cropped; a side shorter than ``size`` is zero-padded (black, centred) instead of being upsampled.
    Mixed cases (one side short, one long) crop the long side and pad the short one. Pass the result to
    :func:`to_tensor`. (Padding centred is our choice; the paper says only "zero-padded as needed".)
    """
    if not isinstance(img, np.ndarray):
        img = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"img: expected a uint8 array (H, W, 3), got {img.dtype} {tuple(img.shape)}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size: expected a positive int, got {size!r}")
    h, w = img.shape[:2]
    if min(h, w) > size:
        from PIL import Image

        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))  # PIL takes (width, height)
        h, w = nh, nw
    y0, x0 = max(0, (h - size) // 2), max(0, (w - size) // 2)
    img = img[y0:y0 + size, x0:x0 + size]  # centre crop of any side longer than size
    out = np.zeros((size, size, 3), np.uint8)
    ch, cw = img.shape[:2]
    py, px = (size - ch) // 2, (size - cw) // 2
    out[py:py + ch, px:px + cw] = img  # zero padding around any side shorter than size
    return out
