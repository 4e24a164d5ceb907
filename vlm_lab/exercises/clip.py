"""Checkers for the exercises of notebooks/02_clip.ipynb: CLIP's loss, and prompt ensembling for zero-shot.

``check_clip_loss(my_clip_loss)``
    The learner writes the second half of the paper's Figure 3 pseudocode::

        def my_clip_loss(image_features, text_features, t):   # (n, d), (n, d) projected, NOT normalised; t scalar
            ...   # L2-normalise, scaled cosine similarities * exp(t), symmetric cross-entropy
            return loss                                        # scalar tensor

    Ours is ``vlm_lab.losses.clip_loss(normalize(I), normalize(T), exp(t))``. The inputs include a batch of one,
    features of very different lengths (to catch a missing normalisation), and exp(t) = 100 with well-aligned
    pairs (logits near 100: a naive ``exp`` then ``log`` overflows in float32).

``check_zero_shot_classifier(my_ensemble)``
    The learner turns prompt embeddings ``(C, T, d)`` -- C classes x T templates, straight from the text encoder,
    NOT normalised -- into classifier weights ``(C, d)``. Ours is ``vlm_lab.eval.zero_shot_classifier`` itself,
    driven by a stand-in text encoder that returns those embeddings (normalise each prompt, average per class,
    normalise again).

On a mismatch each checker recomputes the typical mistakes on the same inputs; when one of them reproduces the
learner's output exactly it answers with that mistake's hint, which names the symptom, never the code.

Shape letters: n batch, d embedding width, C classes, T templates.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import CheckResult, check, to_numpy

__all__ = ["check_clip_loss", "check_zero_shot_classifier", "clip_loss_mistakes", "ensemble_mistakes"]


def _matches(a: Any, b: Any) -> bool:
    try:
        x, y = to_numpy(a), to_numpy(b)
    except (TypeError, ValueError):
        return False
    return x.shape == y.shape and bool(np.all(np.isfinite(y))) and np.allclose(x, y, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ CLIP loss


def _reference_clip_loss(image_features: Tensor, text_features: Tensor, t: Tensor) -> Tensor:
    from vlm_lab.losses import clip_loss

    return clip_loss(F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1), t.exp(), gather=False)


def _ce(logits: Tensor, reduction: str = "mean") -> Tensor:
    return F.cross_entropy(logits, torch.arange(logits.shape[0]), reduction=reduction)


def _cos(i: Tensor, t: Tensor, dim: int = -1) -> Tensor:
    return F.normalize(i, dim=dim) @ F.normalize(t, dim=dim).T  # (n, n)


def clip_loss_mistakes() -> list[tuple[str, Callable[[Tensor, Tensor, Tensor], Tensor], str]]:
    """The typical wrong CLIP losses: ``(name, function, hint)``; the hint describes the symptom, not the fix's code."""
    return [
        ("only image->text", lambda i, t, s: _ce(_cos(i, t) * s.exp()),
         "your loss only has one direction (each image choosing among the captions). CLIP's loss is symmetric: "
         "it also lets each caption choose among the images. Did you average the image->text and text->image terms?"),
        ("only text->image", lambda i, t, s: _ce(_cos(i, t).T * s.exp()),
         "your loss only has one direction (each caption choosing among the images). CLIP's loss is symmetric. "
         "Did you average the image->text and text->image terms?"),
        ("sum of the two directions", lambda i, t, s: _ce(_cos(i, t) * s.exp()) + _ce(_cos(i, t).T * s.exp()),
         "your loss is exactly twice the expected value: the two directions are averaged, not added."),
        ("no L2 normalisation", lambda i, t, s: (_ce(i @ t.T * s.exp()) + _ce(t @ i.T * s.exp())) / 2,
         "your loss changes when a feature vector gets longer. The pseudocode compares directions (cosine "
         "similarity): each embedding is scaled to unit length before the dot product."),
        ("normalised along the batch axis", lambda i, t, s: (_ce(_cos(i, t, 0) * s.exp()) + _ce(_cos(i, t, 0).T * s.exp())) / 2,
         "you normalised, but along the wrong axis: each row (one image's or one caption's embedding) should have "
         "length 1, not each column."),
        ("multiplied by t instead of exp(t)", lambda i, t, s: (_ce(_cos(i, t) * s) + _ce(_cos(i, t).T * s)) / 2,
         "the temperature is off: t is a log-scale, and the pseudocode multiplies the similarities by exp(t)."),
        ("divided by exp(t)", lambda i, t, s: (_ce(_cos(i, t) / s.exp()) + _ce(_cos(i, t).T / s.exp())) / 2,
         "the temperature is applied the wrong way round: a larger t should make the softmax sharper, so the "
         "similarities are multiplied by exp(t), not divided by it."),
        ("divided by t", lambda i, t, s: (_ce(_cos(i, t) / s) + _ce(_cos(i, t).T / s)) / 2,
         "the temperature is applied the wrong way round: t is a log-scale and the similarities are multiplied by "
         "exp(t) (tau = 1 / exp(t) is the temperature you would divide by)."),
        ("no temperature", lambda i, t, s: (_ce(_cos(i, t)) + _ce(_cos(i, t).T)) / 2,
         "your loss ignores t: the cosine similarities are scaled by the learned exp(t) before the softmax "
         "(cosines alone lie in [-1, 1], far too flat a softmax)."),
        ("mean over all entries", lambda i, t, s: -(F.log_softmax(_cos(i, t) * s.exp(), 1).mean()
                                                    + F.log_softmax(_cos(i, t).T * s.exp(), 1).mean()) / 2,
         "you averaged the log-probabilities of all n x n pairs; the cross-entropy only counts, for each row, the "
         "log-probability of the matching pair (the labels are 0, 1, ..., n-1)."),
        ("one softmax over the whole matrix", lambda i, t, s: -F.log_softmax((_cos(i, t) * s.exp()).flatten(), 0)
            .view(i.shape[0], -1).diagonal().mean(),
         "you took one softmax over the whole n x n matrix. Each image is its own classification problem over "
         "the captions (a softmax per row), and each caption one over the images (a softmax per column)."),
        ("summed over the batch", lambda i, t, s: (_ce(_cos(i, t) * s.exp(), "sum") + _ce(_cos(i, t).T * s.exp(), "sum")) / 2,
         "your loss grows with the batch size: the cross-entropy is averaged over the batch, not summed."),
    ]


def _clip_inputs(trial: int) -> tuple[Tensor, Tensor, Tensor]:
    """Deterministic inputs per trial: (image_features (n, d), text_features (n, d), t)."""
    g = torch.Generator().manual_seed(1234 + trial)
    n, d, t = [(5, 8, math.log(1 / 0.07)), (7, 16, 1.3), (1, 6, 2.0), (6, 12, math.log(100.0)), (9, 10, 0.5)][trial % 5]
    image = torch.randn(n, d, generator=g)
    text = torch.randn(n, d, generator=g)
    if trial % 5 == 3:  # well-aligned pairs and exp(t) = 100: logits near 100, a naive exp overflows in float32
        text = image + 0.05 * torch.randn(n, d, generator=g)
    lengths = torch.empty(n, 1).uniform_(0.3, 4.0, generator=g)  # (n, 1) very different feature lengths
    return image * lengths, text * lengths.flip(0), torch.tensor(t)


def _diagnose_clip_loss(inputs: tuple, got: Any, expected: Any) -> str | None:
    image, text, t = inputs
    g = to_numpy(got)
    if g.size != 1:
        return "the loss is one number (a scalar): average the per-example terms."
    if not np.all(np.isfinite(g)):
        return ("your loss overflows when the scaled similarities are large (here exp(t) = 100). Taking exp() then "
                "log() by hand overflows in float32; a log-softmax (or F.cross_entropy) does it stably.")
    for _, wrong, hint in clip_loss_mistakes():
        with torch.no_grad():
            if _matches(got, wrong(image.clone(), text.clone(), t.clone())):
                return hint
    if image.shape[0] == 1:
        return "with a batch of one pair there is only one candidate in each softmax, so the loss must be 0."
    return None


def check_clip_loss(fn: Callable[[Tensor, Tensor, Tensor], Any], n_trials: int = 5) -> CheckResult:
    """Check ``fn(image_features, text_features, t) -> scalar loss`` against the package's CLIP loss.

    ``image_features`` / ``text_features`` are ``(n, d)`` projected features, not yet normalised; ``t`` is the
    learned log-scale (the similarities are multiplied by ``exp(t)``). The loss must also carry gradients
    (training back-propagates through it): after the values match, the gradients w.r.t. both feature matrices
    are compared too.
    """
    name = "my_clip_loss"
    result = check(fn, _reference_clip_loss, _clip_inputs, n_trials, name=name, diagnose=_diagnose_clip_loss)
    if not result.passed:
        return result
    # gradients: the same inputs as trial 0, with requires_grad
    image, text, t = _clip_inputs(0)
    ref_in = [x.clone().requires_grad_(True) for x in (image, text)]
    _reference_clip_loss(ref_in[0], ref_in[1], t).backward()
    mine = [x.clone().requires_grad_(True) for x in (image, text)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # float() of a tensor that requires grad: reported below instead
            out = fn(mine[0], mine[1], t.clone())
    except Exception as err:  # e.g. .numpy() on a tensor that requires grad
        return CheckResult(False, f"the values are right, but on inputs that require gradients your function raised "
                                  f"{type(err).__name__}: {err}. Training back-propagates through the loss, so it has "
                                  "to be computed with torch operations (NumPy cuts the gradient).", name)
    try:
        if not isinstance(out, Tensor) or out.grad_fn is None:
            return CheckResult(False, "the values are right, but your loss carries no gradient (a Python float, a "
                                      "NumPy value, .item() or .detach() cut the graph). Training needs a torch tensor "
                                      "computed from the inputs.", name)
        out.backward()
    except Exception as err:  # the learner's bug, reported, not raised
        return CheckResult(False, f"backward() through your loss raised {type(err).__name__}: {err}", name)
    for label, a, b in (("image_features", mine[0], ref_in[0]), ("text_features", mine[1], ref_in[1])):
        if a.grad is None or not torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6):
            return CheckResult(False, f"the values are right, but the gradient w.r.t. {label} differs. Is part of "
                                      "the computation detached, or done in NumPy?", name)
    return CheckResult(True, f"matches the package's clip_loss (values on {n_trials} inputs, including a batch of "
                             "one and exp(t) = 100, and gradients).", name)


# --------------------------------------------------------------------------------------- prompt ensembling


class _TableTokenizer:
    """Stand-in tokenizer: prompt string -> its row in a table (one token), padding-free."""

    def __init__(self, prompts: list[str]) -> None:
        self.index = {p: k for k, p in enumerate(prompts)}

    def __call__(self, texts: list[str], **_: Any) -> dict[str, Tensor]:
        ids = torch.tensor([[self.index[t]] for t in texts])  # (b, 1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class _TableEncoder(nn.Module):
    """Stand-in text encoder: returns the given (unnormalised) embedding of each prompt."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.table = table  # (P, d), a plain attribute: no parameters

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.table[input_ids[:, 0]]  # (b, d)


def _reference_ensemble(prompt_embeddings: Tensor) -> Tensor:
    """``vlm_lab.eval.zero_shot_classifier`` on a text encoder that returns ``prompt_embeddings (C, T, d)``."""
    from vlm_lab.eval import zero_shot_classifier

    C, T, d = prompt_embeddings.shape
    classes = [f"class{c}" for c in range(C)]
    templates = [f"template{k} {{}}" for k in range(T)]
    prompts = [tpl.format(c) for c in classes for tpl in templates]  # class-major, the order of the (C, T) grid
    table = prompt_embeddings.reshape(C * T, d)  # (C, T, d) -> (C*T, d)
    return zero_shot_classifier(_TableEncoder(table), _TableTokenizer(prompts), classes, templates)


def ensemble_mistakes() -> list[tuple[str, Callable[[Tensor], Tensor], str]]:
    """The typical wrong prompt ensembles: ``(name, function, hint)``."""
    return [
        ("no normalisation", lambda e: e.mean(dim=1),
         "your class embeddings are not unit vectors, and long prompt embeddings outweigh short ones. The "
         "classifier compares directions: normalise the prompt embeddings before averaging, and the average after."),
        ("normalised only after averaging", lambda e: F.normalize(e.mean(dim=1), dim=-1),
         "your result has unit length, but a template whose embedding happens to be long gets more say than the "
         "others. Give every template an equal vote: normalise before averaging as well."),
        ("not normalised after averaging", lambda e: F.normalize(e, dim=-1).mean(dim=1),
         "the average of unit vectors is shorter than 1 (the more the templates disagree, the shorter), so classes "
         "would be scored by how consistent their templates are. Normalise again after averaging."),
        ("normalised along the template axis", lambda e: F.normalize(F.normalize(e, dim=1).mean(dim=1), dim=-1),
         "you normalised along the template axis; each prompt embedding is a d-dimensional vector (the last axis) "
         "that should get unit length."),
    ]


def _ensemble_inputs(trial: int) -> tuple[Tensor]:
    g = torch.Generator().manual_seed(4321 + trial)
    C, T, d = [(3, 4, 6), (5, 2, 8), (4, 1, 5), (1, 3, 7), (6, 7, 9)][trial % 5]
    emb = torch.randn(C, T, d, generator=g)
    lengths = torch.empty(C, T, 1).uniform_(0.2, 5.0, generator=g)  # (C, T, 1) prompts of very different lengths
    return (emb * lengths,)


def _diagnose_ensemble(inputs: tuple, got: Any, expected: Any) -> str | None:
    (emb,) = inputs
    C, T, d = emb.shape
    g = to_numpy(got)
    if g.shape == (T, d) and T != C:
        return "you averaged over the classes (axis 0); average over the templates of each class (axis 1)."
    if g.shape != (C, d):
        return "the classifier has one d-dimensional row per class: shape (C, d)."
    for _, wrong, hint in ensemble_mistakes():
        if _matches(got, wrong(emb.clone())):
            return hint
    return None


def check_zero_shot_classifier(fn: Callable[[Tensor], Any], n_trials: int = 5) -> CheckResult:
    """Check ``fn(prompt_embeddings (C, T, d)) -> classifier (C, d)`` against ``vlm_lab.eval.zero_shot_classifier``.

    The prompt embeddings come straight from a text encoder (not normalised); one class has one template in one
    trial and there is one class in another.
    """
    return check(fn, _reference_ensemble, _ensemble_inputs, n_trials, name="my_ensemble",
                 diagnose=_diagnose_ensemble)
