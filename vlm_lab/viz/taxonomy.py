"""The taxonomy pictures of chapter 01, drawn from measurements and by the project itself (matplotlib only).

- :func:`plot_taxonomy`: ViLT's Figure 2 (Kim et al., 2021) redrawn from *our* models: for each model, a VE box and
  a TE box feeding an MI box, each box's height proportional to that part's share of the measured FLOPs (or
  parameters); the exact numbers are printed in the boxes. Input: ``vlm_lab.inspect.taxonomy.TaxonomySplit`` s.
- :func:`plot_taxonomy_bars`: the same numbers as stacked bars (FLOPs and parameters side by side).
- :func:`fusion_styles_figure`: block diagrams of early, intermediate and late fusion.
- :func:`alignment_figure`: cross-modal attention (words attend to patches) vs a joint embedding space.

``assets/make_figures.py`` writes the diagrams into ``assets/`` (regeneration command in ``assets/README.md``).
"""
from __future__ import annotations

from typing import Mapping, Sequence

__all__ = ["plot_taxonomy", "plot_taxonomy_bars", "fusion_styles_figure", "alignment_figure", "COLORS"]

COLORS = {"visual_embedding": "#e8a33d", "textual_embedding": "#4c8cc9", "modality_interaction": "#7a5cb8",
          "head": "#b0b0b0"}
_SHORT = {"visual_embedding": "VE", "textual_embedding": "TE", "modality_interaction": "MI", "head": "head"}


def _human(n: float) -> str:
    for unit, k in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= k:
            return f"{n / k:.3g}{unit}"
    return f"{n:.0f}"


def _splits(splits) -> list[tuple[str, object]]:
    if isinstance(splits, Mapping):
        items = list(splits.items())
    else:
        items = [(s.model, s) for s in splits]
    if not items:
        raise ValueError("splits: expected at least one TaxonomySplit")
    for name, s in items:
        if not hasattr(s, "flops") or not hasattr(s, "params"):
            raise TypeError(f"splits: {name!r} is not a TaxonomySplit (got {type(s).__name__})")
    return items


def plot_taxonomy(splits, what: str = "flops", ncols: int = 3):
    """ViLT Figure 2 from measurements: one panel per model, box heights = share of ``what`` ("flops" / "params")."""
    import math

    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, Rectangle

    if what not in ("flops", "params"):
        raise ValueError(f"what: expected 'flops' or 'params', got {what!r}")
    items = _splits(splits)
    ncols = max(1, min(ncols, len(items)))
    nrows = math.ceil(len(items) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 2.9 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (name, s) in zip(axes.ravel(), items):
        d = getattr(s, what)
        if not d:
            raise ValueError(f"splits: {name!r} has no {what} (measure it with taxonomy_split(model, batch))")
        share = s.share(what)
        ax.set_xlim(0, 3.2), ax.set_ylim(-0.15, 2.25)
        # VE on top-left, TE bottom-left, MI on the right; heights in [0.06, 1.0] of the panel half
        def box(x, y, h, cat, label):
            h = max(h, 0.06)
            ax.add_patch(Rectangle((x, y), 1.0, h, facecolor=COLORS[cat], edgecolor="black", lw=0.8))
            ax.text(x + 0.5, y + h / 2, label, ha="center", va="center", fontsize=7.5,
                    color="white" if h > 0.25 else "black")
            return y + h / 2
        hv, ht, hm = share["visual_embedding"], share["textual_embedding"], share["modality_interaction"]
        yv = box(0.0, 1.15, hv, "visual_embedding", f"VE\n{_human(d['visual_embedding'])}")
        yt = box(0.0, 0.0, ht, "textual_embedding", f"TE\n{_human(d['textual_embedding'])}")
        ym = box(2.0, 1.05 - min(max(hm, 0.06), 2.1) / 2, min(hm * 2, 2.1), "modality_interaction",
                 f"MI\n{_human(d['modality_interaction'])}")
        for y0 in (yv, yt):
            ax.add_patch(FancyArrowPatch((1.05, y0), (1.95, ym), arrowstyle="->", mutation_scale=10, lw=0.8))
        ax.set_title(f"{name}\n{what}: VE {hv:.0%} · TE {ht:.0%} · MI {hm:.0%}", fontsize=8.5)
    fig.suptitle(f"Where the {'compute' if what == 'flops' else 'parameters'} go (ViLT's taxonomy, measured)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_taxonomy_bars(splits, include_head: bool = True):
    """Stacked horizontal bars of VE / TE / MI (/ head) shares: FLOPs on the left, parameters on the right."""
    import matplotlib.pyplot as plt

    items = _splits(splits)
    cats = ("visual_embedding", "textual_embedding", "modality_interaction") + (("head",) if include_head else ())
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.55 * len(items) + 1.4), sharey=True)
    names = [n for n, _ in items]
    for ax, what in zip(axes, ("flops", "params")):
        left = [0.0] * len(items)
        for cat in cats:
            vals = []
            for _, s in items:
                d = getattr(s, what)
                tot = sum(d.get(c, 0) for c in cats)
                vals.append(d.get(cat, 0) / tot if tot else 0.0)
            ax.barh(names, vals, left=left, color=COLORS[cat], label=_SHORT[cat], edgecolor="white")
            left = [a + b for a, b in zip(left, vals)]
        ax.set_xlim(0, 1), ax.set_title(f"share of {what}", fontsize=10), ax.invert_yaxis() if what == "flops" else None
    axes[1].legend(loc="lower right", fontsize=8, ncols=len(cats))
    fig.tight_layout()
    return fig


def _block(ax, x, y, w, h, text, color, fs=8):
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", facecolor=color,
                                edgecolor="black", lw=0.8))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fs)


def _arrow(ax, a, b):
    from matplotlib.patches import FancyArrowPatch

    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="->", mutation_scale=10, lw=0.9))


def fusion_styles_figure():
    """Block diagrams: early (one transformer over both), intermediate (towers + cross-attention), late (decision)."""
    import matplotlib.pyplot as plt

    img, txt, mix, head = "#f6d7a7", "#bcd6ef", "#d3c6ec", "#e4e4e4"
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    titles = ["early fusion (single stream, ViLT)", "intermediate fusion (ALBEF / BLIP)", "late fusion (decision)"]
    for ax, t in zip(axes, titles):
        ax.set_xlim(0, 4), ax.set_ylim(0, 5), ax.axis("off"), ax.set_title(t, fontsize=10)
    a = axes[0]
    _block(a, 0.2, 0.3, 1.6, 0.6, "image patches\n(linear)", img)
    _block(a, 2.2, 0.3, 1.6, 0.6, "words\n(embedding)", txt)
    _block(a, 0.2, 1.5, 3.6, 1.9, "one transformer over\n[words ; patches]\n+ modality-type embeddings", mix)
    _block(a, 1.2, 4.0, 1.6, 0.6, "answer", head)
    _arrow(a, (1.0, 0.9), (1.0, 1.5)), _arrow(a, (3.0, 0.9), (3.0, 1.5)), _arrow(a, (2.0, 3.4), (2.0, 4.0))
    a = axes[1]
    _block(a, 0.2, 0.3, 1.6, 1.5, "image\nencoder\n(ViT)", img)
    _block(a, 2.2, 0.3, 1.6, 1.5, "text\nencoder", txt)
    _block(a, 1.2, 2.3, 2.6, 1.2, "cross-attention:\nwords attend\nto patches", mix)
    _block(a, 1.7, 4.0, 1.6, 0.6, "answer", head)
    _arrow(a, (1.0, 1.8), (1.6, 2.3)), _arrow(a, (3.0, 1.8), (3.0, 2.3)), _arrow(a, (2.5, 3.5), (2.5, 4.0))
    a = axes[2]
    _block(a, 0.2, 0.3, 1.6, 2.2, "image\nencoder\n(ViT)\n-> one vector", img)
    _block(a, 2.2, 0.3, 1.6, 2.2, "text\nencoder\n-> one vector", txt)
    _block(a, 0.9, 3.0, 2.2, 0.7, "concat + MLP\nor product / dot", mix)
    _block(a, 1.2, 4.2, 1.6, 0.55, "answer", head)
    _arrow(a, (1.0, 2.5), (1.5, 3.0)), _arrow(a, (3.0, 2.5), (2.5, 3.0)), _arrow(a, (2.0, 3.7), (2.0, 4.2))
    fig.tight_layout()
    return fig


def alignment_figure():
    """Two ways to align modalities: cross-modal attention (token level) and a joint embedding space (vector level)."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    a = axes[0]
    a.set_xlim(0, 6), a.set_ylim(0, 4), a.axis("off")
    a.set_title("cross-modal attention: each word weighs image patches", fontsize=10)
    words = ["is", "the", "red", "shape", "left", "..."]
    for i, w in enumerate(words):
        _block(a, 0.1, 3.3 - 0.6 * i, 1.1, 0.45, w, "#bcd6ef")
    rng = np.random.default_rng(0)
    for r in range(3):
        for c in range(3):
            _block(a, 3.6 + 0.75 * c, 2.4 - 0.75 * r, 0.6, 0.6, "", "#f6d7a7")
    for (i, r, c, lw) in ((2, 0, 0, 2.5), (2, 1, 2, 0.6), (3, 0, 0, 1.2), (4, 2, 1, 0.5), (4, 0, 0, 1.5)):
        a.plot([1.2, 3.6 + 0.75 * c + 0.3], [3.3 - 0.6 * i + 0.22, 2.4 - 0.75 * r + 0.3], color="#7a5cb8", lw=lw,
               alpha=0.8)
    a.text(3.0, 0.1, "softmax(QK^T / sqrt(d)) V   (queries: words, keys / values: patches)", ha="center", fontsize=8)
    a = axes[1]
    a.set_title("joint embedding space: one vector per image and per text", fontsize=10)
    pts = rng.normal(size=(5, 2)) * 1.6
    names = ["red circle", "blue star", "green ring", "white cross", "yellow square"]
    for (x, y), n in zip(pts, names):
        a.scatter([x], [y], marker="o", s=60, color="#e8a33d", edgecolor="black", zorder=3)
        tx, ty = x + rng.normal(scale=0.25), y + rng.normal(scale=0.25)
        a.scatter([tx], [ty], marker="D", s=45, color="#4c8cc9", edgecolor="black", zorder=3)
        a.plot([x, tx], [y, ty], color="gray", lw=0.8)
        a.text(tx + 0.12, ty + 0.12, f"'a {n}'", fontsize=7.5)
    a.scatter([], [], marker="o", color="#e8a33d", label="image embedding")
    a.scatter([], [], marker="D", color="#4c8cc9", label="text embedding")
    a.legend(fontsize=8, loc="lower right")
    a.set_xticks([]), a.set_yticks([])
    a.text(0.5, -0.08, "contrastive loss pulls matching pairs together, pushes the rest apart; score = cosine",
           transform=a.transAxes, ha="center", fontsize=8)
    fig.tight_layout()
    return fig
