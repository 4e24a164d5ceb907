"""Zero-shot segmentation (tile -> classify -> assemble -> Dice / pixel accuracy) and the chapter-08 checkers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlm_lab.eval.segmentation import (dice_scores, pixel_accuracy, segmentation_metrics, slide_class_map,
                                       zero_shot_segmentation)


class _ColourModel(nn.Module):
    """'Encodes' a tile as (mean red, mean blue) normalised: red tiles match class 0, blue tiles class 1."""

    class config:  # noqa: N801 - mimics model.config.image_size
        image_size = 6

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))
        self.seen: list[tuple] = []

    def encode_image(self, x):
        self.seen.append(tuple(x.shape))
        return F.normalize(torch.stack([x[:, 0].mean((1, 2)), x[:, 2].mean((1, 2))], dim=1), dim=-1)


def _two_halves(h=20, w=30, split=18):
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :split, 0] = 255  # red left
    img[:, split:, 2] = 255  # blue right
    target = np.zeros((h, w), int)
    target[:, split:] = 1
    return img, target


def test_dice_and_pixel_accuracy_by_hand():
    target = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 2]])
    d = dice_scores(pred, target, 4)
    assert d[0] == pytest.approx(2 * 3 / (3 + 4))
    assert d[1] == pytest.approx(2 * 3 / (4 + 4))
    assert d[2] == 0.0 and np.isnan(d[3])  # predicted only / absent from both
    assert pixel_accuracy(pred, target) == pytest.approx(6 / 8)
    m = segmentation_metrics(pred, target, ["a", "b", "c", "d"])
    assert m["mean_dice"] == pytest.approx((d[0] + d[1]) / 2)  # classes present in the ground truth only
    assert set(m) == {"pixel_accuracy", "mean_dice", "dice/a", "dice/b"}
    with pytest.raises(ValueError, match="shape"):
        pixel_accuracy(pred, target[:1])


def test_zero_shot_segmentation_assembles_tiles():
    img, target = _two_halves()
    model = _ColourModel()
    classifier = torch.eye(2)  # class 0 = red, class 1 = blue
    res = zero_shot_segmentation(model, img, classifier, tile=6)
    assert model.seen[0][1:] == (3, 6, 6)
    assert res.class_map.shape == target.shape and res.prob_map.shape == (20, 30, 2)
    # tiles at x = 0, 6, 12, 18, 24 (+ y shifted back to end at 20): the split at 18 falls on a tile border
    assert res.coords[-1] == (24, 14)
    assert pixel_accuracy(res.class_map, target) == 1.0
    assert segmentation_metrics(res.class_map, target, ["red", "blue"])["mean_dice"] == 1.0
    # a split inside a tile: the mixed tiles go to the majority colour, and overlap (stride < tile) smooths it
    img, target = _two_halves(split=16)
    coarse = zero_shot_segmentation(_ColourModel(), img, classifier, tile=6)
    fine = zero_shot_segmentation(_ColourModel(), img, classifier, tile=6, stride=2)
    acc_c, acc_f = pixel_accuracy(coarse.class_map, target), pixel_accuracy(fine.class_map, target)
    assert acc_c < 1.0 and acc_f >= acc_c
    assert np.allclose(fine.prob_map.sum(-1), 1.0, atol=1e-5)


def test_segmentation_bad_input():
    model = _ColourModel()
    with pytest.raises(ValueError, match="image"):
        zero_shot_segmentation(model, np.zeros((20, 20), np.uint8), torch.eye(2), tile=6)
    with pytest.raises(ValueError, match="classifier"):
        zero_shot_segmentation(model, _two_halves()[0], torch.eye(3), tile=6)
    with pytest.raises(ValueError, match="tile"):
        zero_shot_segmentation(model, _two_halves()[0], torch.eye(2), tile=50)


def test_slide_class_map_matches_regions():
    from vlm_lab.data.pathology import CLASSES, make_slide

    slide = make_slide(3, height=64, width=96, tile_px=32)
    cmap = slide_class_map(slide)
    assert cmap.shape == (64, 96) and cmap.min() >= 0
    for r in slide.regions:
        assert (cmap[slide.region_map == r.id] == CLASSES.index(r.label)).all()


def test_checkers_accept_the_reference_and_name_the_usual_mistakes():
    from vlm_lab.eval.segmentation import dice_scores as ref_dice
    from vlm_lab.exercises.coca import check_cls_mask, check_dice
    from vlm_lab.models.coca import cls_attention_mask

    assert check_cls_mask(cls_attention_mask)
    legacy = check_cls_mask(lambda m: cls_attention_mask(m, legacy=True))
    assert not legacy and "legacy" in legacy.message
    no_causal = check_cls_mask(lambda m: torch.ones(m.shape[0], m.shape[1] + 1, m.shape[1] + 1, dtype=torch.bool))
    assert not no_causal
    assert check_dice(ref_dice)

    def iou(pred, target, c):
        out = np.full(c, np.nan)
        for k in range(c):
            union = ((pred == k) | (target == k)).sum()
            if union:
                out[k] = ((pred == k) & (target == k)).sum() / union
        return out

    res = check_dice(iou)
    assert not res and "IoU" in res.message
    res = check_dice(lambda p, t, c: np.nan_to_num(ref_dice(p, t, c)))
    assert not res and "NaN" in res.message
