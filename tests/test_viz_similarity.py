"""viz.similarity: every function returns a matplotlib Figure (no pyplot state), edge cases and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from vlm_lab.viz import image_grid, loss_curve, similarity_matrix


def _images(n, size=30):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _render(fig):
    fig.canvas.draw()  # a real draw catches layout errors that construction alone does not
    return fig


def test_similarity_matrix_with_thumbnails_and_captions():
    sim = torch.randn(3, 3)
    texts = ["a small red circle", "a blue square left of a green star with a long caption", "x"]
    fig = _render(similarity_matrix(sim, images=_images(3), texts=texts))
    assert isinstance(fig, Figure)
    heat = [ax for ax in fig.axes if ax.images and ax.images[0].get_array().shape == (3, 3)]
    assert len(heat) == 1
    np.testing.assert_allclose(np.asarray(heat[0].images[0].get_array()), sim.numpy(), rtol=1e-6)
    labels = [t.get_text().replace("\n", " ") for t in heat[0].get_xticklabels()]
    assert labels == texts
    thumbs = [ax for ax in fig.axes if len(ax.images) == 3]
    assert len(thumbs) == 1  # one column of three thumbnails
    assert len(heat[0].patches) == 3  # diagonal outlined


def test_similarity_matrix_one_image_one_text_and_rectangular():
    fig = _render(similarity_matrix([[0.5]], images=_images(1), texts=["only one"]))
    assert isinstance(fig, Figure)
    fig = _render(similarity_matrix(np.zeros((1, 4)), texts=list("abcd")))  # one image, four texts
    assert isinstance(fig, Figure) and not fig.axes[0].patches  # no diagonal on a non-square matrix
    fig = _render(similarity_matrix(np.ones((5, 1))))  # five images, one text, no labels
    assert isinstance(fig, Figure)


def test_similarity_matrix_accepts_normalised_tensors_and_pil():
    from PIL import Image

    pixel_values = torch.randn(2, 3, 30, 30)
    fig = _render(similarity_matrix(torch.eye(2), images=[pixel_values[0], Image.fromarray(_images(1)[0])]))
    assert isinstance(fig, Figure)


def test_similarity_matrix_bad_input():
    with pytest.raises(ValueError, match="sim"):
        similarity_matrix(np.zeros(3))
    with pytest.raises(ValueError, match="sim"):
        similarity_matrix(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="sim"):
        similarity_matrix([[float("nan")]])
    with pytest.raises(ValueError, match="texts"):
        similarity_matrix(np.zeros((2, 3)), texts=["a", "b"])
    with pytest.raises(ValueError, match="images"):
        similarity_matrix(np.zeros((2, 3)), images=_images(3))
    with pytest.raises(TypeError, match="texts"):
        similarity_matrix(np.zeros((1, 1)), texts="one string")
    with pytest.raises(ValueError, match="images"):
        similarity_matrix(np.zeros((1, 1)), images=[torch.zeros(1, 30, 30)])


def test_image_grid_titles_and_shapes():
    fig = _render(image_grid(_images(7), [f"caption {k}" for k in range(7)], ncols=3))
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 9 and sum(1 for ax in fig.axes if ax.images) == 7
    assert [ax.get_title() for ax in fig.axes if ax.images][2] == "caption 2"
    one = _render(image_grid(_images(1)))
    assert isinstance(one, Figure) and len(one.axes) == 1
    with pytest.raises(ValueError, match="images"):
        image_grid([])
    with pytest.raises(ValueError, match="titles"):
        image_grid(_images(2), ["only one"])
    with pytest.raises(ValueError, match="ncols"):
        image_grid(_images(2), ncols=0)


def test_loss_curve_from_history_and_fit_result():
    history = [{"step": s, "loss": 4.0 / s, "loss_itc": 2.0 / s, "lr": 1e-3} for s in range(1, 21)]
    fig = _render(loss_curve(history, keys=("loss", "loss_itc"), smooth=5, reference={"ln(64)": 4.16}))
    ax = fig.axes[0]
    assert isinstance(fig, Figure)
    assert len(ax.lines) == 5  # two raw, two smoothed, one reference
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [4.0 / s for s in range(1, 21)])

    class Result:
        pass

    result = Result()
    result.history = history[:1]  # one step only: smoothing window longer than the run falls back to raw
    fig = _render(loss_curve(result, smooth=5))
    assert len(fig.axes[0].lines) == 1
    with pytest.raises(ValueError, match="keys"):
        loss_curve(history, keys=("loss_missing",))
    with pytest.raises(ValueError, match="history"):
        loss_curve([])
    with pytest.raises(ValueError, match="smooth"):
        loss_curve(history, smooth=0)


def test_library_never_touches_pyplot():
    import sys

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    similarity_matrix(np.eye(2))
    image_grid(_images(2))
    loss_curve([{"step": 1, "loss": 1.0}])
    assert plt.get_fignums() == before
    assert "vlm_lab.viz.similarity" in sys.modules
