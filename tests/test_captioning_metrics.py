"""BLEU and CIDEr-D as the COCO caption toolkit computes them, on hand-checked examples."""

from __future__ import annotations

import math

import pytest

from vlm_lab.eval.captioning import bleu, caption_scores, cider_d, tokenize


def test_tokenize():
    assert tokenize("A Red circle, left of a STAR.") == ["a", "red", "circle", "left", "of", "a", "star"]


def test_bleu_hand_computed():
    cand = ["the cat sat on the mat"]
    refs = [["the cat is on the mat"]]
    b1, b2, b3, b4 = bleu(cand, refs)
    # clipped precisions 5/6, 3/5, 1/4, 0/3; equal lengths -> no brevity penalty
    assert b1 == pytest.approx(5 / 6)
    assert b2 == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert b3 == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))
    assert b4 < 1e-3
    assert bleu(["a red circle left of a blue star"], [["a red circle left of a blue star"]])[3] == pytest.approx(1.0)


def test_bleu_clipping_brevity_and_closest_reference():
    # "the the the": clipped to 2 by the reference that has two "the"
    assert bleu(["the the the"], [["the cat the", "a dog"]])[0] == pytest.approx(2 / 3)
    # candidate of 3 words, closest reference has 5: BP = exp(1 - 5/3)
    b = bleu(["a red circle"], [["a red circle is here", "a red circle on black ground today"]])
    assert b[0] == pytest.approx(math.exp(1 - 5 / 3))
    # corpus level: counts are summed before dividing
    c = bleu(["a b", "c d e f"], [["a b"], ["c x e f"]])
    assert c[0] == pytest.approx(5 / 6)


def test_cider_identical_beats_different_and_single_image_is_zero():
    refs = [["a red circle", "a small red circle"], ["a blue star", "a large blue star"],
            ["a green square", "one green square"]]
    good = cider_d(["a red circle", "a blue star", "a green square"], refs)
    bad = cider_d(["a blue star", "a green square", "a red circle"], refs)
    assert good[0] > 1.0 > bad[0] >= 0.0
    assert cider_d(["a red circle"], [["a red circle"]])[0] == 0.0  # IDF = log(1 / 1) = 0: corpus-dependent


def test_cider_hand_computed_two_images():
    # two images; candidate == its only reference. Unigram/bigram weights: tf * (log 2 - log df)
    cands = ["red circle", "blue star"]
    refs = [["red circle"], ["blue star"]]
    mean, per = cider_d(cands, refs)
    # every n-gram occurs in one image: weight log 2 for each; cosine 1 for n=1,2; n=3,4 empty -> 0
    assert per[0] == pytest.approx(10 * (1 + 1 + 0 + 0) / 4)
    assert mean == pytest.approx(5.0)


def test_caption_scores_dicts_and_errors():
    s = caption_scores({"1": "a red circle", "2": "a blue star"}, {"1": ["a red circle"], "2": ["a blue star"]})
    assert set(s) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D"}
    with pytest.raises(ValueError, match="one candidate per reference"):
        bleu(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="non-empty"):
        cider_d(["a"], [[]])
    with pytest.raises(TypeError):
        bleu("a red circle", [["a"]])
