"""Caption metrics: BLEU-1..4 and CIDEr-D, as the COCO caption toolkit (``pycocoevalcap``) computes them.

**BLEU** (Papineni et al., 2002), *corpus* level as ``pycocoevalcap/bleu``: clipped n-gram precisions summed over
the whole test set, geometric mean up to n, and a brevity penalty from the *closest* reference length::

    p_n  = sum_i sum_g min(c_i(g), max_r c_ir(g)) / sum_i max(0, len_i - n + 1)
    BLEU = BP * (p_1 ... p_N)^(1/N),   BP = exp(1 - R / C) if C < R else 1

(with the toolkit's 1e-15 / 1e-9 guards, so a zero precision gives ~0, not an error).

**CIDEr-D** (Vedantam et al., 2015), as ``pycocoevalcap/cider``: each sentence becomes TF-IDF vectors of its
1..4-grams, IDF from how many *images'* reference sets contain the n-gram (so the score depends on the whole
evaluated corpus: one image alone scores 0); per n the cosine between candidate and each reference, with the
candidate's weights clipped by the reference's and a Gaussian length penalty ``exp(-(l_c - l_r)^2 / (2 * 6^2))``;
mean over n, mean over references, times 10. The length ``l`` is the toolkit's: it counts *bigrams* (a quirk kept
for comparability).

Tokenisation: lower-case, punctuation removed, split on whitespace (the toolkit runs Stanford's PTB tokenizer in
Java; for plain captions like the lab's the result is the same). No dependency.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

__all__ = ["tokenize", "bleu", "cider_d", "caption_scores"]

_PUNCT = re.compile(r"[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lower-case, drop punctuation, split on whitespace."""
    if not isinstance(text, str):
        raise TypeError(f"captions must be strings, got {type(text).__name__}")
    return _PUNCT.sub(" ", text.lower()).split()


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _check(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(candidates, str) or not isinstance(candidates, Sequence):
        raise TypeError("candidates must be a list of strings (one caption per image)")
    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"need one candidate per reference set and at least one image, got {len(candidates)} "
                         f"candidates and {len(references)} reference sets")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{i}] must be a non-empty list of strings")


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1 .. BLEU-``max_n`` (a list) of ``candidates[i]`` against ``references[i]`` (a list each)."""
    _check(candidates, references)
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * max_n, [0] * max_n
    test_len = ref_len = 0
    for cand, refs in zip(candidates, references):
        c = tokenize(cand)
        r = [tokenize(x) for x in refs]
        test_len += len(c)
        ref_len += min((abs(len(x) - len(c)), len(x)) for x in r)[1]  # the closest reference length
        for n in range(1, max_n + 1):
            max_ref: Counter = Counter()
            for x in r:
                max_ref |= _ngrams(x, n)  # element-wise max
            counts = _ngrams(c, n)
            correct[n - 1] += sum(min(k, max_ref[g]) for g, k in counts.items())
            guess[n - 1] += max(0, len(c) - n + 1)
    scores, prod = [], 1.0
    for n in range(max_n):
        prod *= (correct[n] + tiny) / (guess[n] + small)
        scores.append(prod ** (1.0 / (n + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
    """CIDEr-D over the corpus: ``(mean score, per-image scores)``."""
    _check(candidates, references)
    cand_counts = []
    ref_counts = []
    for cand, refs in zip(candidates, references):
        cand_counts.append(_all_ngrams(tokenize(cand), n))
        ref_counts.append([_all_ngrams(tokenize(x), n) for x in refs])
    df: Counter = Counter()
    for refs in ref_counts:
        df.update({g for r in refs for g in r})  # in how many images' reference sets each n-gram occurs
    log_n_images = math.log(float(len(ref_counts)))

    def vec(counts: Counter) -> tuple[list[dict], list[float], int]:
        v: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            w = tf * (log_n_images - math.log(max(1.0, df[g])))
            v[k][g] = w
            norm[k] += w * w
            if k == 1:  # the toolkit's length counts bigrams
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    per_image = []
    for cc, refs in zip(cand_counts, ref_counts):
        vc, nc, lc = vec(cc)
        total = 0.0
        for rc in refs:
            vr, nr, lr = vec(rc)
            penalty = math.exp(-((lc - lr) ** 2) / (2 * sigma ** 2))
            s = 0.0
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vc[k].items())
                if nc[k] != 0 and nr[k] != 0:
                    val /= nc[k] * nr[k]
                s += val * penalty
            total += s / n
        per_image.append(10.0 * total / len(refs))
    return sum(per_image) / len(per_image), per_image


def _all_ngrams(words: list[str], n: int) -> Counter:
    out: Counter = Counter()
    for k in range(1, n + 1):
        out.update(_ngrams(words, k))
    return out


def caption_scores(candidates: Sequence[str] | Mapping[str, str],
                   references: Sequence[Sequence[str]] | Mapping[str, Sequence[str]]) -> dict[str, float]:
    """``{"BLEU-1": .., "BLEU-4": .., "CIDEr-D": ..}`` for candidates and references given as lists (aligned) or as
    dicts keyed by image id (as the COCO toolkit)."""
    if isinstance(candidates, Mapping):
        if not isinstance(references, Mapping) or set(candidates) != set(references):
            raise ValueError("candidates and references given as dicts must have the same keys")
        keys = sorted(candidates)
        candidates = [candidates[k] for k in keys]
        references = [list(references[k]) for k in keys]
    b = bleu(candidates, references)
    return {"BLEU-1": b[0], "BLEU-2": b[1], "BLEU-3": b[2], "BLEU-4": b[3],
            "CIDEr-D": cider_d(candidates, references)[0]}
