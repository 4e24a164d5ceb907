"""Figures for contrastive models: a similarity matrix with captions and image thumbnails, an image grid, a loss curve.

The similarity matrix is CLIP's Figure 3 "N x N" picture made concrete: row i is image i, column j is caption j,
the colour is the cosine similarity (or any score), and the matching pairs lie on the diagonal. OpenAI's
``Interacting_with_CLIP.ipynb`` draws the same figure with thumbnails along the rows; we draw it with the
object-oriented matplotlib API so nothing here touches pyplot's global state.

Every function returns a ``matplotlib.figure.Figure`` (Jupyter shows it when it is the last value of a cell);
none calls ``plt.show()``.

Shape letters: n images (rows), m texts (columns), h / w image height / width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["similarity_matrix", "image_grid", "loss_curve"]


def _new_figure(figsize: tuple[float, float]):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _to_numpy_2d(sim: Any) -> np.ndarray:
    if hasattr(sim, "detach"):  # torch.Tensor
        sim = sim.detach().float().cpu().numpy()
    arr = np.asarray(sim, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"sim: expected a non-empty 2-D matrix (images, texts), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("sim: expected finite values, got NaN or inf")
    return arr


def _to_image_array(image: Any) -> np.ndarray:
    """A displayable ``(h, w, 3)`` array from a PIL image, a uint8/float array, or a normalised ``(3, h, w)`` tensor."""
    if hasattr(image, "detach"):  # a torch tensor, channels first and CLIP-normalised (the lab's pixel_values)
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"images: expected tensors of shape (3, h, w), got {tuple(image.shape)}")
        from vlm_lab.data.transforms import to_uint8

        return to_uint8(image)
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        return arr
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"images: expected (h, w, 3) arrays, PIL images or (3, h, w) tensors, got shape {arr.shape}")
    return arr


def _check_labels(labels: Sequence[str] | None, n: int, name: str) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, str):
        raise TypeError(f"{name}: expected a list of strings, got one string")
    labels = [str(t) for t in labels]
    if len(labels) != n:
        raise ValueError(f"{name}: expected {n} entries (one per {'row' if name == 'images' else 'column'} of sim), "
                         f"got {len(labels)}")
    return labels


def similarity_matrix(sim: Any, images: Sequence[Any] | None = None, texts: Sequence[str] | None = None, *,
                      title: str = "cosine similarity: images (rows) x captions (columns)",
                      annotate: bool | None = None, cmap: str = "viridis", vmin: float | None = None,
                      vmax: float | None = None, highlight_diagonal: bool = True, thumb_size: float = 0.6,
                      wrap: int = 28):
    """A heat map of ``sim (n, m)``, captions along the top, optional image thumbnails down the left.

    Args:
        sim: ``(n, m)`` scores, row = image, column = text (a numpy array, list or torch tensor).
        images: ``n`` images for thumbnails (PIL images, ``(h, w, 3)`` arrays, or normalised ``(3, h, w)`` tensors),
            or None for row numbers only.
        texts: ``m`` captions for the column labels (wrapped at ``wrap`` characters), or None for column numbers.
        annotate: write each value in its cell; default: when the matrix has at most 12 x 12 cells.
        highlight_diagonal: outline the cells (i, i) -- the matching pairs of a CLIP batch -- when the matrix is square.
        thumb_size: thumbnail side in inches.
    Returns:
        a matplotlib ``Figure``.
    """
    import textwrap

    arr = _to_numpy_2d(sim)
    n, m = arr.shape
    texts = _check_labels(texts, m, "texts")
    if images is not None:
        if isinstance(images, (str, bytes)):
            raise TypeError("images: expected a sequence of images")
        images = list(images)
        if len(images) != n:
            raise ValueError(f"images: expected {n} entries (one per row of sim), got {len(images)}")
    annotate = (n <= 12 and m <= 12) if annotate is None else annotate

    cell = 0.55
    left = thumb_size + 0.4 if images is not None else 0.6
    top = 1.6 if texts is not None else 0.6
    fig = _new_figure((left + max(m, 2) * cell + 1.2, top + max(n, 2) * cell + 0.4))
    if images is not None:
        grid = fig.add_gridspec(1, 2, width_ratios=(thumb_size, max(m, 2) * cell))
        ax_img, ax = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    else:
        ax_img, ax = None, fig.add_subplot(1, 1, 1)

    im = ax.imshow(arr, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    ax.set_xticks(range(m))
    ax.xaxis.tick_top()
    if texts is not None:
        ax.set_xticklabels([textwrap.fill(t, wrap) for t in texts], rotation=60, ha="left", fontsize=8)
    ax.set_yticks(range(n))
    if ax_img is not None:
        ax.set_yticklabels([])
    if annotate:
        lo, hi = float(arr.min()), float(arr.max())
        mid = (lo + hi) / 2
        for i in range(n):
            for j in range(m):
                ax.text(j, i, f"{arr[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if arr[i, j] > mid else "white")
    if highlight_diagonal and n == m:
        from matplotlib.patches import Rectangle

        for i in range(n):
            ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_title(title, fontsize=10)

    if ax_img is not None:
        # thumbnails stacked in one column, one per row of the matrix, on the same vertical scale
        ax_img.set_xlim(0, 1)
        ax_img.set_ylim(n - 0.5, -0.5)
        ax_img.axis("off")
        for i, image in enumerate(images):
            arr_img = _to_image_array(image)
            ax_img.imshow(arr_img, extent=(0.05, 0.95, i + 0.45, i - 0.45), aspect="auto",
                          cmap="gray" if arr_img.ndim == 2 else None)
    return fig


def image_grid(images: Sequence[Any], titles: Sequence[str] | None = None, *, ncols: int | None = None,
               size: float = 1.6, wrap: int = 22, fontsize: int = 8):
    """Show ``images`` in a grid with an optional title (a caption, a prediction) under each.

    Args:
        images: PIL images, ``(h, w, 3)`` arrays or normalised ``(3, h, w)`` tensors (at least one).
        titles: one string per image, or None.
        ncols: images per row (default: up to 6).
        size: side of one image in inches.
    Returns:
        a matplotlib ``Figure``.
    """
    import textwrap

    if isinstance(images, (str, bytes)) or not hasattr(images, "__len__"):
        raise TypeError("images: expected a sequence of images")
    images = list(images)
    if not images:
        raise ValueError("images: expected at least one image, got an empty sequence")
    titles = _check_labels(titles, len(images), "titles")
    if ncols is None:
        ncols = min(len(images), 6)
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols: expected a positive int, got {ncols!r}")
    nrows = -(-len(images) // ncols)
    text_h = 0.5 if titles is not None else 0.0
    fig = _new_figure((ncols * size, nrows * (size + text_h)))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for k, ax in enumerate(axes):
        ax.axis("off")
        if k >= len(images):
            continue
        arr = _to_image_array(images[k])
        ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None)
        if titles is not None:
            ax.set_title(textwrap.fill(titles[k], wrap), fontsize=fontsize, y=-0.02, va="top")
    return fig


def loss_curve(history: Sequence[Mapping[str, float]] | Any, keys: Sequence[str] = ("loss",), *,
               smooth: int = 1, logy: bool = False, reference: Mapping[str, float] | None = None,
               title: str = "training loss"):
    """Plot ``keys`` of a training history against ``step``.

    Args:
        history: ``FitResult.history`` (a list of dicts with ``step`` and the keys), or a ``FitResult``.
        keys: which entries to plot (each must appear in at least one record).
        smooth: moving-average window in steps (1 = raw); the raw curve is drawn faintly underneath.
        reference: horizontal lines to draw, label -> value (e.g. ``{"ln(batch)": 4.16}``, the loss of chance).
    Returns:
        a matplotlib ``Figure``.
    """
    history = getattr(history, "history", history)
    if isinstance(history, Mapping) or not hasattr(history, "__len__") or not len(history):
        raise ValueError("history: expected a non-empty list of per-step records (dicts with 'step')")
    if isinstance(keys, str):
        keys = (keys,)
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
        raise ValueError(f"smooth: expected a positive int window, got {smooth!r}")
    fig = _new_figure((6, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    for key in keys:
        pts = [(r.get("step", i + 1), r[key]) for i, r in enumerate(history) if key in r]
        if not pts:
            present = sorted({k for r in history for k in r})
            raise ValueError(f"keys: {key!r} is in no record of history; records have {present}")
        x, y = (np.asarray(v, dtype=np.float64) for v in zip(*pts))
        if smooth > 1 and len(y) >= smooth:
            line = ax.plot(x, y, alpha=0.25)[0]
            ys = np.convolve(y, np.ones(smooth) / smooth, mode="valid")  # (len(y) - smooth + 1,)
            ax.plot(x[smooth - 1:], ys, color=line.get_color(), label=f"{key} (mean of {smooth})")
        else:
            ax.plot(x, y, label=key)
    for label, value in (reference or {}).items():
        ax.axhline(float(value), color="gray", linestyle="--", linewidth=1)
        ax.annotate(label, (ax.get_xlim()[1], float(value)), xytext=(-4, 3), textcoords="offset points",
                    ha="right", fontsize=8, color="gray")
    ax.set(xlabel="step", title=title, yscale="log" if logy else "linear")
    ax.legend(fontsize=8)
    return fig
