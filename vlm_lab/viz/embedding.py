"""Maps of a joint embedding space: image and text embeddings projected to 2-D (plotly), and a thumbnail fallback.

:func:`embedding_map` projects image and text embeddings *together* (so distances between the two kinds mean the
same as within a kind) with PCA (an SVD of the centred embeddings; deterministic) or t-SNE (scikit-learn), and draws
an interactive plotly scatter: images as circles, texts as diamonds, a thin line from each image to its own text when
the two sets are paired, hover text showing the caption. Plotly cannot show an image inside a hover label portably,
so :func:`thumbnail_grid` draws the same items as a matplotlib grid of thumbnails with their captions and indices:
hover a point, read its index, find the picture.

Shape letters: N points, D embedding width.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from torch import Tensor

__all__ = ["project_2d", "embedding_map", "thumbnail_grid"]


def _np(x, name: str) -> np.ndarray:
    a = x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty (N, D) array of embeddings, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return a


def project_2d(x, method: str = "pca", seed: int = 0) -> np.ndarray:
    """``(N, D)`` -> ``(N, 2)`` by PCA (default) or t-SNE. One point gives ``[[0, 0]]``."""
    a = _np(x, "x")
    if method not in ("pca", "tsne"):
        raise ValueError(f"method: expected 'pca' or 'tsne', got {method!r}")
    if a.shape[0] == 1:
        return np.zeros((1, 2), np.float32)
    a = a - a.mean(0, keepdims=True)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, a.shape[0] - 1) / 3))
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(a).astype(np.float32)
    _, _, vt = np.linalg.svd(a, full_matrices=False)  # rows of vt: principal directions
    out = a @ vt[:2].T  # (N, D) @ (D, k) -> (N, k), k <= 2
    if out.shape[1] < 2:
        out = np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    vt_sign = np.sign(out[np.abs(out).argmax(0), range(2)])  # fix each axis' sign for reproducible pictures
    return (out * np.where(vt_sign == 0, 1, vt_sign)).astype(np.float32)


def embedding_map(image_embeds=None, text_embeds=None, *, captions: Sequence[str] | None = None,
                  labels: Sequence[str] | None = None, method: str = "pca", paired: bool = True,
                  title: str = "joint embedding space"):
    """An interactive plotly map of image and / or text embeddings in one 2-D projection.

    Args:
        image_embeds: ``(N, D)`` or None.
        text_embeds: ``(M, D)`` or None (at least one of the two).
        captions: hover text per item (length N for images and M for texts when both are given with N == M).
        labels: a group name per item (colours the points), same length rule as ``captions``.
        method: "pca" or "tsne".
        paired: draw a line from image i to text i (needs N == M).
    """
    import plotly.graph_objects as go

    sets = [(k, _np(e, n)) for k, e, n in (("image", image_embeds, "image_embeds"), ("text", text_embeds, "text_embeds"))
            if e is not None]
    if not sets:
        raise ValueError("image_embeds / text_embeds: give at least one of them")
    if len(sets) == 2 and sets[0][1].shape[1] != sets[1][1].shape[1]:
        raise ValueError(f"image_embeds and text_embeds must share the width D, got {sets[0][1].shape[1]} and "
                         f"{sets[1][1].shape[1]}")
    sizes = [a.shape[0] for _, a in sets]
    for name, seq in (("captions", captions), ("labels", labels)):
        if seq is not None and len(seq) not in sizes:
            raise ValueError(f"{name}: expected one entry per point ({' or '.join(map(str, sizes))}), got {len(seq)}")
    xy = project_2d(np.concatenate([a for _, a in sets]), method)
    fig = go.Figure()
    start = 0
    coords = {}
    for kind, a in sets:
        n = a.shape[0]
        pts = xy[start:start + n]
        coords[kind] = pts
        start += n
        cap = list(captions) if captions is not None and len(captions) == n else [f"{kind} {i}" for i in range(n)]
        lab = list(labels) if labels is not None and len(labels) == n else [kind] * n
        groups = sorted(set(lab))
        for g in groups:
            idx = [i for i in range(n) if lab[i] == g]
            fig.add_trace(go.Scatter(
                x=pts[idx, 0], y=pts[idx, 1], mode="markers", name=f"{kind}: {g}" if len(groups) > 1 else kind,
                marker=dict(symbol="circle" if kind == "image" else "diamond", size=9 if kind == "image" else 8,
                            line=dict(width=0.5, color="black")),
                text=[f"#{i} {kind}<br>{cap[i]}" for i in idx], hoverinfo="text", legendgroup=g))
    if paired and len(sets) == 2 and sizes[0] == sizes[1]:
        xs, ys = [], []
        for (x0, y0), (x1, y1) in zip(coords["image"], coords["text"]):
            xs += [float(x0), float(x1), None]
            ys += [float(y0), float(y1), None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(width=0.6, color="rgba(120,120,120,0.4)"),
                                 hoverinfo="skip", name="image-text pair"))
    fig.update_layout(title=title, template="plotly_white", width=720, height=520,
                      xaxis_title=f"{method.upper()} 1", yaxis_title=f"{method.upper()} 2")
    return fig


def thumbnail_grid(images, captions: Sequence[str] | None = None, *, ncols: int = 8, size: float = 1.4):
    """A matplotlib grid of thumbnails titled ``#index`` and (shortened) caption; images as in ``as_image``."""
    import math

    import matplotlib.pyplot as plt

    from .attention import as_image

    images = list(images)
    if not images:
        raise ValueError("images: expected at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"captions: expected {len(images)} captions, got {len(captions)}")
    ncols = max(1, min(ncols, len(images)))
    nrows = math.ceil(len(images) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, (size + 0.35) * nrows), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i < len(images):
            ax.imshow(as_image(images[i]))
            cap = captions[i] if captions is not None else ""
            ax.set_title(f"#{i} {cap[:22]}" + ("…" if len(cap) > 22 else ""), fontsize=6)
    fig.tight_layout()
    return fig
