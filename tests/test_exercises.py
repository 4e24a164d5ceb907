"""Exercise checkers: the right answer passes, and each typical mistake gets its own hint (never the solution)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlm_lab.exercises import CheckResult, check, check_clip_loss, check_zero_shot_classifier
from vlm_lab.exercises.clip import clip_loss_mistakes, ensemble_mistakes


def correct_clip_loss(image_features, text_features, t):
    i = image_features / image_features.norm(dim=-1, keepdim=True)
    x = text_features / text_features.norm(dim=-1, keepdim=True)
    logits = i @ x.T * t.exp()  # (n, n)
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def correct_ensemble(e):
    return F.normalize(F.normalize(e, dim=-1).mean(dim=1), dim=-1)


# ------------------------------------------------------------------------------------------------ generic check


def test_check_passes_and_reports_first_difference():
    ok = check(lambda x: x * 2, lambda x: x + x, lambda k: (torch.randn(3, generator=torch.Generator().manual_seed(k)),))
    assert ok.passed and bool(ok) and "✓" in str(ok)
    bad = check(lambda x: x * 2 + (x > 1).float(), lambda x: x + x, lambda k: (torch.arange(4.0),), n_trials=2)
    assert not bad.passed and not bad and "index (2,)" in bad.message and "✗" in repr(bad)


def test_check_reports_exceptions_none_shape_and_todo():
    ref = lambda x: x.sum()  # noqa: E731
    inputs = lambda k: (torch.ones(2, 3),)  # noqa: E731

    def todo(x):
        raise NotImplementedError

    assert "not implemented" in check(todo, ref, inputs).message
    assert "ZeroDivisionError" in check(lambda x: 1 / 0, ref, inputs).message
    assert "return" in check(lambda x: None, ref, inputs).message
    assert "shape (3,)" in check(lambda x: x.sum(0), ref, inputs).message
    with pytest.raises(ValueError, match="n_trials"):
        check(ref, ref, inputs, n_trials=0)
    with pytest.raises(TypeError, match="fn"):
        check("not a function", ref, inputs)


def test_check_result_renders_markdown():
    r = CheckResult(False, "try again", "ex")
    assert "❌" in r._repr_markdown_() and "ex" in r._repr_markdown_()


# ------------------------------------------------------------------------------------------------ CLIP loss


def test_correct_clip_loss_passes():
    result = check_clip_loss(correct_clip_loss)
    assert result.passed, result.message


def test_every_clip_loss_mistake_gets_its_own_hint():
    hints = set()
    for name, wrong, hint in clip_loss_mistakes():
        result = check_clip_loss(lambda i, t, s, wrong=wrong: wrong(i, t, s))
        assert not result.passed, name
        assert hint in result.message, (name, result.message)
        hints.add(hint)
    assert len(hints) == len(clip_loss_mistakes())  # each mistake is told apart from the others


def test_clip_loss_hints_do_not_reveal_the_solution():
    for _, _, hint in clip_loss_mistakes():
        assert "cross_entropy(" not in hint and "normalize(" not in hint and "@" not in hint


def test_clip_loss_naive_softmax_overflow_is_explained():
    def naive(i, t, s):
        i, t = F.normalize(i, dim=-1), F.normalize(t, dim=-1)
        logits = (i @ t.T * s.exp()).float()
        p_i = logits.exp() / logits.exp().sum(1, keepdim=True)
        p_t = logits.T.exp() / logits.T.exp().sum(1, keepdim=True)
        return -(p_i.diagonal().log().mean() + p_t.diagonal().log().mean()) / 2

    result = check_clip_loss(naive)
    assert not result.passed and "overflow" in result.message


def test_clip_loss_without_gradient_fails():
    result = check_clip_loss(lambda i, t, s: float(correct_clip_loss(i, t, s)))
    assert not result.passed and "gradient" in result.message
    result = check_clip_loss(lambda i, t, s: correct_clip_loss(i, t, s).detach())
    assert not result.passed and "gradient" in result.message


def test_clip_loss_non_scalar_and_stub():
    def per_example(i, t, s):
        logits = F.normalize(i, dim=-1) @ F.normalize(t, dim=-1).T * s.exp()
        return F.cross_entropy(logits, torch.arange(len(logits)), reduction="none")

    result = check_clip_loss(per_example)
    assert not result.passed and "scalar" in result.message

    def stub(i, t, s):
        raise NotImplementedError

    assert "not implemented" in check_clip_loss(stub).message


def test_clip_loss_numpy_version_passes_values_but_not_gradient():
    def numpy_loss(i, t, s):
        i, t = i.numpy(), t.numpy()
        i = i / np.linalg.norm(i, axis=1, keepdims=True)
        t = t / np.linalg.norm(t, axis=1, keepdims=True)
        logits = i @ t.T * np.exp(float(s))

        def ce(z):
            z = z - z.max(1, keepdims=True)
            return -(np.diag(z) - np.log(np.exp(z).sum(1))).mean()

        return (ce(logits) + ce(logits.T)) / 2

    result = check_clip_loss(numpy_loss)
    assert not result.passed and "values are right" in result.message and "gradient" in result.message


# --------------------------------------------------------------------------------------- prompt ensembling


def test_correct_ensemble_passes():
    result = check_zero_shot_classifier(correct_ensemble)
    assert result.passed, result.message


def test_every_ensemble_mistake_gets_its_own_hint():
    for name, wrong, hint in ensemble_mistakes():
        result = check_zero_shot_classifier(wrong)
        assert not result.passed, name
        assert hint in result.message, (name, result.message)


def test_ensemble_over_the_wrong_axis():
    result = check_zero_shot_classifier(lambda e: correct_ensemble(e.transpose(0, 1)))
    assert not result.passed and "axis 1" in result.message
