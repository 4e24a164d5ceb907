"""Chapter 03 (ViLT) checker: BERT's masking rule written by hand.

    def my_mask(ids, attention_mask):       # (b, n) int64 ids, right-padded; (b, n) 1 = real token
        ...
        return masked_ids, labels           # both (b, n); labels = original id where chosen, -100 elsewhere

    check_mask_tokens(my_mask, mask_token_id=tok.mask_token_id, vocab_size=len(tok),
                      special_token_ids=tok.all_special_ids)

Masking is random, so unlike :func:`vlm_lab.exercises.check` this checker does not compare with one reference
output: it runs the learner's function on a large batch and checks the *rule* (what may change, what the labels
hold) exactly and the *statistics* (15 % chosen; of those 80 % [MASK], 10 % random, 10 % unchanged) within
tolerances several standard deviations wide, so a correct function passes (essentially) always. The reference
is :func:`vlm_lab.losses.mask_tokens`.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .core import CheckResult

__all__ = ["check_mask_tokens"]

IGNORE = -100


def _mask_inputs(vocab_size: int, specials: list[int], cls_id: int, sep_id: int, pad_id: int,
                 seed: int = 0, b: int = 2000, n: int = 21) -> tuple[Tensor, Tensor]:
    """Right-padded captions: [CLS] words... [SEP] [PAD]...; words drawn from the non-special ids."""
    g = torch.Generator().manual_seed(seed)
    words = torch.tensor([i for i in range(vocab_size) if i not in set(specials)])
    ids = words[torch.randint(0, len(words), (b, n), generator=g)]  # (b, n)
    lengths = torch.randint(4, n + 1, (b,), generator=g)  # real tokens incl. [CLS] and [SEP]
    pos = torch.arange(n)[None]
    am = (pos < lengths[:, None]).long()
    ids[:, 0] = cls_id
    ids[torch.arange(b), lengths - 1] = sep_id
    ids[am == 0] = pad_id
    return ids, am


def check_mask_tokens(fn: Callable[[Tensor, Tensor], Any], *, mask_token_id: int, vocab_size: int,
                      special_token_ids: Iterable[int], mlm_probability: float = 0.15) -> CheckResult:
    """Check ``fn(ids, attention_mask) -> (masked_ids, labels)`` against BERT's rule (see the module docstring).

    ``special_token_ids`` must contain [PAD], [CLS] and [SEP] (the first, third and fourth of the shapes
    tokenizer's ``all_special_ids``: ``[PAD] [UNK] [CLS] [SEP] [MASK]``).
    """
    name = "my_mask"
    if not callable(fn):
        raise TypeError(f"fn: expected your function, got {type(fn).__name__}")
    specials = sorted({int(i) for i in special_token_ids} | {int(mask_token_id)})
    if len(specials) < 4 or any(not 0 <= s < vocab_size for s in specials):
        raise ValueError(f"special_token_ids: expected at least [PAD], [CLS], [SEP] ids inside [0, {vocab_size}), "
                         f"got {specials}")
    ordered = [int(i) for i in special_token_ids]
    pad_id, cls_id, sep_id = (ordered[0], ordered[2], ordered[3]) if len(ordered) >= 4 else specials[:3]
    ids, am = _mask_inputs(vocab_size, specials, cls_id, sep_id, pad_id)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn(ids.clone(), am.clone())
    except NotImplementedError:
        return CheckResult(False, "not implemented yet: replace the `raise NotImplementedError` with your code.", name)
    except Exception as err:  # the learner's bug, reported, not raised
        return CheckResult(False, f"your function raised {type(err).__name__}: {err}", name)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        return CheckResult(False, f"return two tensors (masked_ids, labels); got {type(out).__name__}", name)
    masked, labels = (torch.as_tensor(x) for x in out)
    if masked.shape != ids.shape or labels.shape != ids.shape:
        return CheckResult(False, f"both outputs must have the input's shape {tuple(ids.shape)}; got "
                                  f"{tuple(masked.shape)} and {tuple(labels.shape)}", name)
    if masked.dtype.is_floating_point or labels.dtype.is_floating_point:
        return CheckResult(False, "token ids and labels must be integers (torch.long), not floats", name)
    masked, labels = masked.long(), labels.long()
    chosen = labels != IGNORE  # (b, n)
    maskable = am.bool() & ~torch.isin(ids, torch.tensor(specials))
    if not chosen.any():
        return CheckResult(False, "no position is labelled: labels must hold the ORIGINAL id at the chosen positions "
                                  "(and -100 elsewhere).", name)
    if (chosen & ~am.bool()).any():
        return CheckResult(False, "you chose padding positions; only real tokens (attention_mask == 1) may be chosen.",
                           name)
    if (chosen & ~maskable).any():
        return CheckResult(False, "you chose special tokens ([CLS], [SEP], ...); they are never masked. Exclude them "
                                  "before drawing.", name)
    if not torch.equal(labels[chosen], ids[chosen]):
        if torch.equal(labels[chosen], masked[chosen]):
            return CheckResult(False, "your labels hold the *masked* ids; they must hold the ORIGINAL ids (what the "
                                      "model has to recover).", name)
        return CheckResult(False, "at chosen positions the label must be the original token id.", name)
    if not torch.equal(masked[~chosen], ids[~chosen]):
        return CheckResult(False, "tokens that were not chosen changed. Only chosen tokens may be replaced, and every "
                                  "changed token needs a label (otherwise the model is never asked about it).", name)
    share = float(chosen.sum() / maskable.sum())
    if abs(share - mlm_probability) > 0.02:
        hint = (" Did you draw over all positions including [CLS]/[SEP]/padding and then drop them? Draw over the "
                "maskable tokens only, with probability 0.15 each.")
        return CheckResult(False, f"{100 * share:.1f} % of the maskable tokens were chosen; expected "
                                  f"{100 * mlm_probability:.0f} % (+-2).{hint}", name, {"chosen_share": share})
    to_mask = float((masked[chosen] == mask_token_id).float().mean())
    same = float((masked[chosen] == ids[chosen]).float().mean())
    rand = 1.0 - to_mask - same
    details = {"chosen_share": share, "mask": to_mask, "random": rand, "unchanged": same}
    if abs(to_mask - 0.8) > 0.05 or abs(rand - 0.1) > 0.04 or abs(same - 0.1) > 0.04:
        hint = ""
        if rand < 0.01 or same < 0.01:
            hint = " Keep both other cases: 10 % become a random token, 10 % stay as they are."
        elif abs(rand - 0.2) < 0.04 or abs(same - 0.2) < 0.04:
            hint = (" The 10 / 10 split is of ALL chosen tokens: after taking 80 % for [MASK], half of the rest is "
                    "random and half unchanged.")
        return CheckResult(False, f"of the chosen tokens {100 * to_mask:.0f} % became [MASK], {100 * rand:.0f} % a "
                                  f"random token, {100 * same:.0f} % stayed; expected 80 / 10 / 10 (+-5/4/4).{hint}",
                           name, details)
    replaced = masked[chosen & (masked != mask_token_id) & (masked != ids)]
    if torch.isin(replaced, torch.tensor(specials)).any():
        return CheckResult(False, "some random replacements are special tokens ([PAD], [CLS], ...). Draw the random "
                                  "word from the ordinary vocabulary only.", name, details)
    # randomness: a second call must choose other positions (not a fixed pattern)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            labels2 = torch.as_tensor(fn(ids.clone(), am.clone())[1]).long()
    except Exception as err:  # pragma: no cover - it ran once already
        return CheckResult(False, f"a second call raised {type(err).__name__}: {err}", name)
    overlap = float(((labels2 != IGNORE) & chosen).sum() / chosen.sum())
    if overlap > 0.5:
        return CheckResult(False, f"two calls chose {100 * overlap:.0f} % of the same positions; the choice must be "
                                  "random on every call (draw fresh random numbers, do not fix a seed inside).",
                           name, details)
    return CheckResult(True, f"follows BERT's rule on {int(maskable.sum())} maskable tokens: {100 * share:.1f} % "
                             f"chosen, then {100 * to_mask:.0f} / {100 * rand:.0f} / {100 * same:.0f} % "
                             "[MASK] / random / unchanged; specials and padding never chosen.", name, details)
