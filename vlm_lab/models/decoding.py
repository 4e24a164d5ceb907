"""Decoding for the lab's captioners (BLIP, later CoCa): greedy, beam search and nucleus sampling.

Every method only needs a function that scores the next token::

    next_logits(ids (r, t), rows (r,)) -> logits (r, V)          logits of the token after ids[:, -1]

``rows[j]`` says which input (image) row j of ``ids`` belongs to -- beam search keeps ``num_beams`` rows per
image, so a model looks its image features up by ``rows``. No key/value cache: the prefix is re-run each step
(captions are short; clarity first).

- **greedy**: ``argmax`` at every step;
- **beam** (Hugging Face's ``BeamSearchScorer``, ``early_stopping=True``): keep the ``num_beams`` best prefixes by
  summed log-probability; a prefix that emits EOS becomes a finished hypothesis scored
  ``sum_logprob / length ** length_penalty`` (length = generated tokens, EOS included); a row stops when it has
  ``num_beams`` finished hypotheses; at ``max_new_tokens`` the live beams are finished too. ``num_beams=1`` is
  greedy decoding (tested);
- **nucleus** (Holtzman et al., 2020): divide the logits by ``temperature``, keep the smallest set of tokens whose
  probability reaches ``top_p`` (the most likely token always survives), renormalise, sample. BLIP's captioner
  samples with ``top_p=0.9`` and ``repetition_penalty=1.1`` to make CapFilt's synthetic captions diverse.

Shared processors: ``min_new_tokens`` forbids EOS before that many new tokens (BLIP: ``min_length=5``);
``repetition_penalty`` (CTRL, Keskar et al., 2019; as HF): a logit of a token already in the sequence is divided by
the penalty when positive and multiplied by it when negative.

Output: ``(b, k + t)`` = the start ids followed by the generated ones; after a row's EOS the rest is ``pad``.

Shape letters: b inputs, r rows scored at once (b or b * num_beams), t tokens so far, V vocabulary.
"""

from __future__ import annotations

import math

from typing import Callable

import torch
from torch import Tensor

__all__ = ["generate", "greedy", "beam_search", "nucleus", "METHODS"]

NextLogits = Callable[[Tensor, Tensor], Tensor]
METHODS = ("greedy", "beam", "nucleus")


def _process(logits: Tensor, ids: Tensor, step: int, *, eos_token_id: int | None, min_new_tokens: int,
             repetition_penalty: float) -> Tensor:
    logits = logits.float()
    if repetition_penalty != 1.0:
        seen = torch.gather(logits, 1, ids)  # (r, t) logits of tokens already present
        seen = torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
        logits = logits.scatter(1, ids, seen)
    if eos_token_id is not None and step < min_new_tokens:
        logits[:, eos_token_id] = float("-inf")
    return logits


def _check(start_ids: Tensor, max_new_tokens: int, min_new_tokens: int, repetition_penalty: float) -> None:
    if not isinstance(start_ids, Tensor) or start_ids.dim() != 2 or start_ids.dtype != torch.long:
        raise ValueError(f"start_ids must be an int64 tensor (batch, tokens), got {getattr(start_ids, 'shape', start_ids)}")
    if start_ids.shape[1] == 0:
        raise ValueError("start_ids needs at least one token (the decoder's start token)")
    if max_new_tokens < 1 or min_new_tokens < 0 or min_new_tokens > max_new_tokens:
        raise ValueError(f"need 1 <= max_new_tokens and 0 <= min_new_tokens <= max_new_tokens, got "
                         f"{max_new_tokens} and {min_new_tokens}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")


def _finish(ids: Tensor, done_at: Tensor, start_len: int, pad_token_id: int) -> Tensor:
    """Pad everything after each row's EOS."""
    pos = torch.arange(ids.shape[1], device=ids.device)[None]  # (1, t)
    return ids.masked_fill(pos > done_at[:, None], pad_token_id)


@torch.no_grad()
def _sample_loop(next_logits: NextLogits, start_ids: Tensor, pick: Callable[[Tensor], Tensor], *,
                 max_new_tokens: int, eos_token_id: int | None, pad_token_id: int, min_new_tokens: int,
                 repetition_penalty: float) -> Tensor:
    b = start_ids.shape[0]
    rows = torch.arange(b, device=start_ids.device)
    ids = start_ids
    big = torch.iinfo(torch.long).max
    done_at = torch.full((b,), big, dtype=torch.long, device=ids.device)  # index of the EOS of each row
    for step in range(max_new_tokens):
        logits = _process(next_logits(ids, rows), ids, step, eos_token_id=eos_token_id,
                          min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty)
        token = pick(logits)  # (b,)
        token = torch.where(done_at < big, torch.full_like(token, pad_token_id), token)
        ids = torch.cat([ids, token[:, None]], dim=1)  # (b, t + 1)
        if eos_token_id is not None:
            done_at = torch.where((token == eos_token_id) & (done_at == big), ids.shape[1] - 1, done_at)
            if (done_at < big).all():
                break
    return _finish(ids, done_at, start_ids.shape[1], pad_token_id)


def greedy(next_logits: NextLogits, start_ids: Tensor, *, max_new_tokens: int = 20, eos_token_id: int | None = None,
           pad_token_id: int = 0, min_new_tokens: int = 0, repetition_penalty: float = 1.0) -> Tensor:
    """Greedy decoding: the most likely token at every step."""
    _check(start_ids, max_new_tokens, min_new_tokens, repetition_penalty)
    return _sample_loop(next_logits, start_ids, lambda lg: lg.argmax(-1), max_new_tokens=max_new_tokens,
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id, min_new_tokens=min_new_tokens,
                        repetition_penalty=repetition_penalty)


def nucleus(next_logits: NextLogits, start_ids: Tensor, *, top_p: float = 0.9, temperature: float = 1.0,
            max_new_tokens: int = 20, eos_token_id: int | None = None, pad_token_id: int = 0,
            min_new_tokens: int = 0, repetition_penalty: float = 1.0,
            generator: torch.Generator | None = None) -> Tensor:
    """Nucleus (top-p) sampling at ``temperature``."""
    _check(start_ids, max_new_tokens, min_new_tokens, repetition_penalty)
    if not 0.0 < top_p <= 1.0:  # (False for NaN too)
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0 (use method='greedy' for temperature 0), "
                         f"got {temperature}")

    def pick(logits: Tensor) -> Tensor:
        probs = (logits / temperature).softmax(-1)  # (r, V)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the top token always stays (before = 0)
        choice = torch.multinomial(sorted_p, 1, generator=generator)  # (r, 1), renormalised by multinomial
        return order.gather(1, choice).squeeze(1)

    return _sample_loop(next_logits, start_ids, pick, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                        pad_token_id=pad_token_id, min_new_tokens=min_new_tokens,
                        repetition_penalty=repetition_penalty)


@torch.no_grad()
def beam_search(next_logits: NextLogits, start_ids: Tensor, *, num_beams: int = 3, length_penalty: float = 1.0,
                max_new_tokens: int = 20, eos_token_id: int | None = None, pad_token_id: int = 0,
                min_new_tokens: int = 0, repetition_penalty: float = 1.0) -> Tensor:
    """Beam search with ``num_beams`` beams per input; returns the best finished hypothesis of each input."""
    _check(start_ids, max_new_tokens, min_new_tokens, repetition_penalty)
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    b, k0 = start_ids.shape
    n = num_beams
    dev = start_ids.device
    ids = start_ids.repeat_interleave(n, dim=0)  # (b n, k0)
    rows = torch.arange(b, device=dev).repeat_interleave(n)  # (b n,)
    scores = torch.zeros(b, n, device=dev)
    scores[:, 1:] = float("-inf")  # all beams start identical: only the first one may expand at step 0
    finished: list[list[tuple[float, Tensor]]] = [[] for _ in range(b)]
    done = [False] * b
    for step in range(max_new_tokens):
        logits = _process(next_logits(ids, rows), ids, step, eos_token_id=eos_token_id,
                          min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty)
        logp = logits.log_softmax(-1)  # (b n, V)
        v = logp.shape[-1]
        cand = (scores.reshape(-1, 1) + logp).reshape(b, n * v)  # (b, n V)
        top_s, top_i = cand.topk(min(2 * n, n * v), dim=1)  # (b, 2n)
        new_ids, new_scores = [], []
        for i in range(b):
            keep_ids, keep_s = [], []
            for s, j in zip(top_s[i].tolist(), top_i[i].tolist()):
                beam, tok = divmod(j, v)
                seq = torch.cat([ids[i * n + beam], torch.tensor([tok], device=dev)])
                if not done[i] and eos_token_id is not None and tok == eos_token_id:
                    if len(keep_ids) < n and s > float("-inf"):  # only an EOS among the top n counts
                        gen_len = seq.shape[0] - k0
                        finished[i].append((s / gen_len ** length_penalty, seq))
                    continue
                if len(keep_ids) < n:
                    keep_ids.append(seq)
                    keep_s.append(s if not done[i] else float("-inf"))
            while len(keep_ids) < n:  # not enough live candidates (tiny vocabularies)
                keep_ids.append(torch.cat([ids[i * n], torch.tensor([pad_token_id], device=dev)]))
                keep_s.append(float("-inf"))
            if len(finished[i]) >= n:
                done[i] = True
            new_ids.extend(keep_ids)
            new_scores.append(keep_s)
        ids = torch.stack(new_ids)  # (b n, t + 1)
        scores = torch.tensor(new_scores, device=dev)  # (b, n)
        if all(done):
            break
    out = []
    for i in range(b):
        hyps = list(finished[i])
        if not done[i]:  # max length reached: live beams become hypotheses too
            for j in range(n):
                s = float(scores[i, j])
                if s > float("-inf"):
                    seq = ids[i * n + j]
                    hyps.append((s / (seq.shape[0] - k0) ** length_penalty, seq))
        best = max(hyps, key=lambda h: h[0])[1]
        out.append(best)
    width = max(s.shape[0] for s in out)
    result = torch.full((b, width), pad_token_id, dtype=torch.long, device=dev)
    for i, s in enumerate(out):
        result[i, : s.shape[0]] = s
    return result


def generate(next_logits: NextLogits, start_ids: Tensor, *, method: str = "greedy", **kwargs) -> Tensor:
    """Dispatch to ``greedy`` / ``beam_search`` (``method="beam"``) / ``nucleus`` with the same arguments."""
    if method == "greedy":
        kwargs.pop("num_beams", None)
        return greedy(next_logits, start_ids, **kwargs)
    if method == "beam":
        return beam_search(next_logits, start_ids, **kwargs)
    if method == "nucleus":
        return nucleus(next_logits, start_ids, **kwargs)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
