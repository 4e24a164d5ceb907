"""Attention as pictures: a word's cross-attention over image patches, and attention rollout for a ViT.

- :func:`overlay_attention`: one weight per patch ``(p,)`` (p = g*g) drawn as a heat-map over the image.
- :func:`plot_word_attention`: one panel per word, each word's weights over the patches (e.g. from
  ``trace(model, attention=True)`` on a cross-attention layer: ``(b, h, n_words, p)``, averaged over heads).
- :func:`attention_rollout`: Abnar & Zuidema (2020), "Quantifying Attention Flow in Transformers", eq. for rollout:
  with residual connections, the attention of layer l is ``A_l' = 0.5 A_l + 0.5 I`` (rows renormalised), and the
  flow from the input to layer L is ``A_L' A_{L-1}' ... A_1'``. Row 0 of the product (the class token) tells which
  patches the ViT's pooled output draws on.

All figure functions return a matplotlib ``Figure`` (never ``plt.show()``).

Shape letters: b batch, h heads, n tokens, p patches (g*g), g patches per side, H/W pixels.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["attention_rollout", "overlay_attention", "plot_word_attention", "as_image"]


def as_image(image) -> np.ndarray:
    """A uint8 ``(H, W, 3)`` array from a uint8 array, a PIL image or a normalised ``(3, H, W)`` tensor."""
    if isinstance(image, Tensor):
        from ..data.transforms import to_uint8

        return to_uint8(image)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image: expected (H, W, 3) pixels or a (3, H, W) tensor, got shape {arr.shape}")
    return arr


def _grid(weights: np.ndarray, name: str = "weights") -> np.ndarray:
    p = weights.shape[-1]
    g = int(round(math.sqrt(p)))
    if g * g != p:
        raise ValueError(f"{name}: expected one weight per patch of a square g x g grid, got {p} values "
                         "(drop the class token first: weights[..., 1:])")
    return weights.reshape(*weights.shape[:-1], g, g)  # (..., p) -> (..., g, g)


def overlay_attention(image, weights, *, ax=None, alpha: float = 0.55, cmap: str = "inferno", title: str | None = None):
    """Draw ``weights`` ``(p,)`` (one per patch, row-major like ``PatchEmbed``) over ``image``; returns the Figure."""
    import matplotlib.pyplot as plt

    img = as_image(image)
    w = np.asarray(weights.detach().float().cpu() if isinstance(weights, Tensor) else weights, dtype=np.float32)
    if w.ndim != 1:
        raise ValueError(f"weights: expected a 1-D vector with one weight per patch, got shape {w.shape}")
    heat = _grid(w)
    if ax is None:
        fig, ax = plt.subplots(figsize=(2.6, 2.6))
    else:
        fig = ax.figure
    H, W = img.shape[:2]
    ax.imshow(img, extent=(0, W, H, 0))
    ax.imshow(heat, extent=(0, W, H, 0), alpha=alpha, cmap=cmap, interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def plot_word_attention(image, weights, words: Sequence[str], *, ncols: int = 6, title: str | None = None):
    """One panel per word: ``weights`` ``(n_words, p)`` are each word's attention over the image patches.

    ``weights`` may also be ``(h, n_words, p)``: heads are averaged. Returns the Figure (image first, then words).
    """
    import matplotlib.pyplot as plt

    w = weights.detach().float().cpu().numpy() if isinstance(weights, Tensor) else np.asarray(weights, np.float32)
    if w.ndim == 3:
        w = w.mean(0)  # (h, n, p) -> (n, p)
    if w.ndim != 2:
        raise ValueError(f"weights: expected (n_words, patches) or (heads, n_words, patches), got shape {w.shape}")
    words = list(words)
    if len(words) != w.shape[0]:
        raise ValueError(f"words: got {len(words)} words for {w.shape[0]} rows of weights")
    if not words:
        raise ValueError("words: expected at least one word")
    n = len(words) + 1
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.1 * ncols, 2.2 * nrows), squeeze=False)
    axes = axes.ravel()
    axes[0].imshow(as_image(image))
    axes[0].set_title("image", fontsize=9)
    axes[0].set_xticks([]), axes[0].set_yticks([])
    for i, word in enumerate(words):
        overlay_attention(image, w[i], ax=axes[i + 1], title=repr(word))
    for ax in axes[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def attention_rollout(attentions: Sequence[Tensor], *, head_fusion: str = "mean", residual: bool = True) -> Tensor:
    """Attention rollout over layers: a list of ``(b, h, n, n)`` weights (first layer first) -> ``(b, n, n)``.

    ``head_fusion``: "mean" (Abnar & Zuidema), "max" or "min" over heads. ``residual`` adds the identity for the
    skip connection (0.5 A + 0.5 I) before renormalising rows.
    """
    if isinstance(attentions, Tensor):
        attentions = [attentions]
    attentions = list(attentions)
    if not attentions:
        raise ValueError("attentions: expected at least one layer of weights (b, h, n, n)")
    fuse = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}
    if head_fusion not in fuse:
        raise ValueError(f"head_fusion: expected one of {sorted(fuse)}, got {head_fusion!r}")
    out: Tensor | None = None
    for i, a in enumerate(attentions):
        if a.dim() != 4 or a.shape[-1] != a.shape[-2]:
            raise ValueError(f"attentions[{i}]: expected self-attention weights (b, h, n, n), got {tuple(a.shape)}")
        if out is not None and a.shape[-1] != out.shape[-1]:
            raise ValueError(f"attentions[{i}]: {a.shape[-1]} tokens, earlier layers have {out.shape[-1]}")
        m = fuse[head_fusion](a.float())  # (b, h, n, n) -> (b, n, n)
        if residual:
            m = 0.5 * m + 0.5 * torch.eye(m.shape[-1], device=m.device)
        m = m / m.sum(-1, keepdim=True)
        out = m if out is None else m @ out  # (b, n, n): layer l's flow composed with the layers below
    return out
