"""Untrusted images in, model-ready tensors out: the demos' one gate for uploaded pictures.

An uploaded file is read here and nowhere else. ``load_image`` opens it with Pillow, checks the *header* first
(format, width x height, pixel count, frame count) and only then decodes the pixels, so a decompression bomb (a
small PNG that claims 50,000 x 50,000 pixels) is refused before any memory is spent on it; a truncated or
non-image file is refused with a message; the decoded picture is converted to 8-bit RGB (palette, grey,
alpha and CMYK images are converted; 16-bit, 32-bit and float images are refused: the toy models were trained
on 8-bit RGB). ``check_image`` applies the same size rules to an in-memory image (numpy array or PIL image),
and ``to_model_input`` resizes (shorter side, bicubic) and centre-crops it to the model's square input and
normalises it with CLIP's mean / std (``vlm_lab.data.transforms.to_tensor``), giving ``(1, 3, s, s)``.

Every check raises ``ImageError`` (a ``ValueError``) naming what was wrong and what is accepted; the Gradio app
turns it into a message in the UI.

Shape letters: h height, w width, s the model's square input side.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlm_lab.data.transforms import to_tensor

__all__ = ["ImageError", "ImageLimits", "LIMITS", "load_image", "check_image", "to_model_input", "ALLOWED_FORMATS"]

#: Pillow format names accepted from uploads (no SVG, no PDF/EPS, no TIFF: fewer parsers, fewer surprises).
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
#: Modes converted to RGB; anything else (I;16, I, F, LAB, HSV, ...) is refused.
_CONVERTIBLE_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "La", "P", "PA", "1", "CMYK", "YCbCr")


class ImageError(ValueError):
    """An image that the demos refuse (not an image, truncated, too large or too small, unsupported mode)."""


@dataclass(frozen=True)
class ImageLimits:
    """What an uploaded image may be."""

    max_bytes: int = 5 * 1024 * 1024  # file size cap (the app also passes it to Gradio as max_file_size)
    max_pixels: int = 16_000_000  # width * height cap, checked on the header before decoding (~4000 x 4000)
    max_side: int = 8192  # longest side
    min_side: int = 8  # shortest side (a 1 x 1 image carries nothing to classify)


LIMITS = ImageLimits()


def _check_dims(width: int, height: int, limits: ImageLimits, what: str) -> None:
    if min(width, height) < limits.min_side:
        raise ImageError(f"{what}: {width} x {height} pixels is too small; each side must be at least "
                         f"{limits.min_side} pixels")
    if max(width, height) > limits.max_side:
        raise ImageError(f"{what}: {width} x {height} pixels is too large; each side must be at most "
                         f"{limits.max_side} pixels")
    if width * height > limits.max_pixels:
        raise ImageError(f"{what}: {width} x {height} = {width * height:,} pixels is more than the "
                         f"{limits.max_pixels:,} accepted")


def _to_rgb(img: Image.Image, what: str) -> Image.Image:
    if img.mode not in _CONVERTIBLE_MODES:
        raise ImageError(f"{what}: image mode {img.mode!r} is not supported (16-bit / float images are refused); "
                         "expected an 8-bit RGB, RGBA, grey or palette image")
    if img.mode in ("RGBA", "LA", "La", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent areas become white
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(source: str | os.PathLike | bytes, limits: ImageLimits = LIMITS) -> Image.Image:
    """Decode an untrusted image file (a path or its bytes) into a checked 8-bit RGB ``PIL.Image``.

    Raises:
        ImageError: empty, too big a file, not an image, a format outside ``ALLOWED_FORMATS``, too many pixels
            (checked before decoding), too small, truncated / corrupt, or an unsupported mode.
        TypeError: ``source`` is neither a path nor bytes.
    """
    what = "image"
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        what = f"image {path.name!r}"
        if not path.is_file():
            raise ImageError(f"{what}: no such file")
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageError(f"{what}: file is {size / 2**20:.1f} MiB; at most {limits.max_bytes / 2**20:.1f} MiB "
                             "is accepted")
        data = path.read_bytes()
    else:
        raise TypeError(f"source: expected a file path or bytes, got {type(source).__name__}")
    if not data:
        raise ImageError(f"{what}: the file is empty")
    if len(data) > limits.max_bytes:
        raise ImageError(f"{what}: file is {len(data) / 2**20:.1f} MiB; at most {limits.max_bytes / 2**20:.1f} MiB "
                         "is accepted")
    try:
        img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))  # reads the header only
    except UnidentifiedImageError:
        raise ImageError(f"{what}: not a readable image; accepted formats: {', '.join(ALLOWED_FORMATS)}") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"{what}: {err}") from None
    _check_dims(*img.size, limits, what)
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)  # animated GIF / WebP: the first frame is the picture
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()  # decode now: a truncated file fails here, not later inside a model
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{what}: the file is truncated or corrupt ({err})") from None
    return _to_rgb(img, what)


def check_image(image: Any, limits: ImageLimits = LIMITS, name: str = "image") -> Image.Image:
    """An in-memory image (PIL image, or numpy array ``(h, w)``, ``(h, w, 3)`` or ``(h, w, 4)``) as checked RGB.

    numpy arrays must be ``uint8`` (0..255), or floating point in [0, 1] without NaN / Inf.
    """
    if isinstance(image, Image.Image):
        _check_dims(*image.size, limits, name)
        return _to_rgb(image, name)
    if isinstance(image, torch.Tensor):
        raise TypeError(f"{name}: expected a PIL image or a numpy array (h, w, 3); for a normalised tensor call "
                        "the model directly")
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name}: expected a PIL image or a numpy array (h, w, 3), got {type(image).__name__}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ImageError(f"{name}: expected an array of shape (h, w), (h, w, 3) or (h, w, 4), "
                         f"got {tuple(image.shape)}")
    height, width = image.shape[:2]
    _check_dims(width, height, limits, name)
    if image.dtype == np.uint8:
        arr = image
    elif np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ImageError(f"{name}: contains NaN or Inf values")
        if image.min() < 0.0 or image.max() > 1.0:
            raise ImageError(f"{name}: a floating-point image must lie in [0, 1], got values in "
                             f"[{float(image.min()):.3g}, {float(image.max()):.3g}]")
        arr = (image * 255.0 + 0.5).astype(np.uint8)
    else:
        raise TypeError(f"{name}: expected dtype uint8 (0..255) or float in [0, 1], got {image.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]  # (h, w, 1) -> (h, w)
    return _to_rgb(Image.fromarray(np.ascontiguousarray(arr)), name)  # (h, w) -> L, (h, w, 3) -> RGB, 4 -> RGBA


def to_model_input(image: Image.Image, size: int) -> torch.Tensor:
    """Checked RGB image -> ``(1, 3, size, size)`` float32, normalised like the training data.

    The shorter side is resized to ``size`` (bicubic; a picture that is already ``size`` px is untouched), then
    the centre square is cropped.
    """
    if not isinstance(image, Image.Image) or image.mode != "RGB":
        raise TypeError("image: expected an RGB PIL image (pass it through load_image or check_image first)")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size: expected a positive int, got {size!r}")
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return to_tensor(np.asarray(image, dtype=np.uint8))[None]  # (3, s, s) -> (1, 3, s, s)
