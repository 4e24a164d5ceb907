"""Attention / embedding / taxonomy figures: they return figures, handle one image / one word, and rollout is right."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from vlm_lab.viz.attention import attention_rollout, overlay_attention, plot_word_attention  # noqa: E402
from vlm_lab.viz.embedding import embedding_map, project_2d, thumbnail_grid  # noqa: E402


def test_word_attention_figures():
    img = np.zeros((24, 24, 3), np.uint8)
    w = torch.softmax(torch.randn(2, 3, 9), -1)  # (heads, words, patches)
    fig = plot_word_attention(img, w, ["red", "left", "star"])
    assert len([a for a in fig.axes if a.images]) == 4
    one = plot_word_attention(torch.randn(3, 24, 24), torch.rand(1, 9), ["red"])  # one word, a tensor image
    assert len([a for a in one.axes if a.images]) == 2
    assert overlay_attention(img, torch.rand(9)).axes
    with pytest.raises(ValueError, match="square"):
        overlay_attention(img, torch.rand(10))
    with pytest.raises(ValueError, match="words"):
        plot_word_attention(img, torch.rand(2, 9), ["only one"])


def test_rollout_by_hand():
    eye = torch.eye(5)[None, None].repeat(2, 3, 1, 1)  # attending only to oneself
    torch.testing.assert_close(attention_rollout([eye, eye]), torch.eye(5).repeat(2, 1, 1))
    a1 = torch.softmax(torch.randn(1, 2, 4, 4), -1)
    a2 = torch.softmax(torch.randn(1, 2, 4, 4), -1)
    r1 = 0.5 * a1.mean(1) + 0.5 * torch.eye(4)
    r2 = 0.5 * a2.mean(1) + 0.5 * torch.eye(4)
    torch.testing.assert_close(attention_rollout([a1, a2]), r2 @ r1)
    out = attention_rollout([a1, a2], head_fusion="max", residual=False)
    torch.testing.assert_close(out.sum(-1), torch.ones(1, 4))
    with pytest.raises(ValueError, match="at least one"):
        attention_rollout([])
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout([a1], head_fusion="median")


def test_embedding_map_and_thumbnails():
    img, txt = torch.randn(6, 8), torch.randn(6, 8)
    fig = embedding_map(img, txt, captions=[f"c{i}" for i in range(6)], labels=list("aabbcc"))
    assert len(fig.data) == 7 and "c0" in fig.data[0].text[0]  # 3 groups x 2 kinds + the pair lines
    single = embedding_map(torch.randn(1, 4))  # one image
    assert single.data[0].x.shape == (1,)
    assert project_2d(torch.randn(3, 1)).shape == (3, 2)
    with pytest.raises(ValueError, match="width"):
        embedding_map(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="at least one"):
        embedding_map()
    assert thumbnail_grid([np.zeros((8, 8, 3), np.uint8)], ["one"]).axes


def test_taxonomy_figures():
    from vlm_lab.inspect.taxonomy import taxonomy_split
    from vlm_lab.models.fusion import EarlyFusion, FusionConfig
    from vlm_lab.viz.taxonomy import alignment_figure, fusion_styles_figure, plot_taxonomy, plot_taxonomy_bars

    c = FusionConfig(image_size=16, width=8, heads=2, mlp_dim=12, early_layers=1, vocab_size=20, max_length=6)
    x = {"pixel_values": torch.randn(1, 3, 16, 16), "input_ids": torch.randint(0, 20, (1, 4))}
    s = taxonomy_split(EarlyFusion(c), x)
    assert plot_taxonomy({"early": s}).axes and plot_taxonomy_bars([s]).axes
    with pytest.raises(ValueError, match="no flops"):
        plot_taxonomy([taxonomy_split(EarlyFusion(c))])
    assert fusion_styles_figure().axes and alignment_figure().axes
