"""Masked language modelling (MLM): the masking recipe and the loss (BERT, Devlin et al., 2019, sec. 3.1).

BERT's recipe, used unchanged by ViLT, ALBEF and VLMo::

    choose each maskable token with probability p = 0.15          (whole words together, optionally)
    of the chosen:  80 % -> [MASK],  10 % -> a random token,  10 % -> left unchanged
    labels = the original id at chosen positions, -100 everywhere else
    loss   = CE(logits, labels) averaged over the chosen positions only

It matches Hugging Face ``DataCollatorForLanguageModeling`` (the collator ViLT's pre-training uses) and
``DataCollatorForWholeWordMask`` (ViLT's ``whole_word_masking=True``), with two choices written down:

- special tokens ([CLS], [SEP], [PAD], [MASK], ...) and padding (``attention_mask == 0``) are never chosen,
  and the 10 % random replacements are drawn from the *non-special* ids only (HF draws from the whole
  vocabulary, so a random [PAD] or [CLS] can appear mid-sentence);
- the split is done as BERT/HF do: 80 % of the chosen become [MASK]; of the rest, half become random,
  so random = 0.1 and unchanged = 0.1 in expectation.

Whole-word masking: pass ``word_starts`` ``(b, n)`` bool, True where a token begins a new word (WordPiece
continuations ``##...`` are False). A word is chosen with probability p and all its pieces are masked
together (each piece still goes through the 80/10/10 draw, as in HF). ``wordpiece_word_starts`` builds
``word_starts`` from the ids and a per-vocabulary "is a continuation" table.

``mlm_loss`` is the plain cross-entropy over labelled positions; ALBEF's distilled variant
``(1 - a) CE + a soft-CE`` is ``mlm_loss(..., soft_targets=..., alpha=a)``.

Shape letters: b batch, n tokens, v vocabulary.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def _check_ids(input_ids: Tensor, name: str = "input_ids") -> None:
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (batch, tokens), got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}")


def wordpiece_word_starts(input_ids: Tensor, is_continuation: Tensor) -> Tensor:
    """``(b, n)`` bool, True where a token starts a word; ``is_continuation`` ``(v,)`` bool marks ``##`` pieces."""
    _check_ids(input_ids)
    if is_continuation.dim() != 1 or is_continuation.dtype != torch.bool:
        raise ValueError("is_continuation must be a 1-D bool tensor over the vocabulary")
    return ~is_continuation.to(input_ids.device)[input_ids]


def mask_tokens(
    input_ids: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: Iterable[int],
    attention_mask: Tensor | None = None,
    mlm_probability: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
    word_starts: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking. Returns ``(masked_input_ids, labels)``, both ``(b, n)``; labels are -100 where not chosen.

    Args:
        input_ids: ``(b, n)`` token ids (right-padded).
        mask_token_id: id of [MASK].
        vocab_size: number of ids; random replacements are drawn from ``[0, vocab_size)`` minus the specials.
        special_token_ids: ids that are never chosen ([CLS], [SEP], [PAD], [MASK], [UNK], ...).
        attention_mask: ``(b, n)`` 1 = real token; padding is never chosen.
        mlm_probability: chance that a token (or a whole word) is chosen.
        mask_fraction: of the chosen, the share replaced by [MASK] (0.8).
        random_fraction: of the chosen, the share replaced by a random token (0.1); the rest stay unchanged.
        word_starts: ``(b, n)`` bool for whole-word masking (see module docstring); None = per token.
        generator: a ``torch.Generator`` for reproducible masks.
    """
    _check_ids(input_ids)
    if not 0.0 <= mlm_probability <= 1.0:
        raise ValueError(f"mlm_probability must be in [0, 1], got {mlm_probability}")
    if not (0.0 <= mask_fraction and 0.0 <= random_fraction and mask_fraction + random_fraction <= 1.0):
        raise ValueError(f"mask_fraction ({mask_fraction}) and random_fraction ({random_fraction}) must be >= 0 "
                         "and sum to at most 1")
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id must lie in [0, vocab_size={vocab_size}), got {mask_token_id}")
    specials = torch.tensor(sorted({int(i) for i in special_token_ids} | {int(mask_token_id)}),
                            dtype=torch.long, device=input_ids.device)
    maskable = ~torch.isin(input_ids, specials)  # (b, n)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        maskable &= attention_mask.bool()
    dev = input_ids.device

    def uniform(shape: tuple[int, ...]) -> Tensor:
        return torch.rand(shape, generator=generator, device=generator.device if generator else dev).to(dev)

    if word_starts is None:
        chosen = (uniform(input_ids.shape) < mlm_probability) & maskable
    else:
        if word_starts.shape != input_ids.shape or word_starts.dtype != torch.bool:
            raise ValueError(f"word_starts must be a bool tensor of shape {tuple(input_ids.shape)}")
        # A word = a start token and the continuations after it; specials always start their own "word".
        starts = word_starts | ~maskable
        word_index = starts.long().cumsum(dim=1) - 1  # (b, n) index of the word each token belongs to
        word_index = word_index.clamp(min=0)
        word_chosen = uniform(input_ids.shape) < mlm_probability  # (b, n): one draw per possible word slot
        chosen = word_chosen.gather(1, word_index) & maskable

    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    draw = uniform(input_ids.shape)
    to_mask = chosen & (draw < mask_fraction)
    to_random = chosen & (draw >= mask_fraction) & (draw < mask_fraction + random_fraction)
    allowed = torch.ones(vocab_size, dtype=torch.bool, device=dev)
    allowed[specials[specials < vocab_size]] = False
    pool = allowed.nonzero().squeeze(1)  # (v',) ids a random replacement may take
    if pool.numel() == 0:
        raise ValueError("every id of the vocabulary is special; nothing to draw random replacements from")
    pick = (uniform(input_ids.shape) * pool.numel()).long().clamp(max=pool.numel() - 1)
    masked = input_ids.clone()
    masked[to_mask] = mask_token_id
    masked[to_random] = pool[pick[to_random]]
    return masked, labels


def mlm_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    soft_targets: Tensor | None = None,
    alpha: float = 0.0,
) -> Tensor:
    """Cross-entropy over positions whose label is not -100: ``logits (b, n, v)``, ``labels (b, n)``.

    With ``soft_targets`` ``(b, n, v)`` (a momentum model's probabilities, ALBEF) the loss is
    ``(1 - alpha) CE + alpha * soft-CE``, both averaged over the labelled positions only.
    Returns 0 (with a gradient path) when no position is labelled.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (batch, tokens, vocab) and labels (batch, tokens); got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    picked = labels != IGNORE_INDEX  # (b, n)
    if not picked.any():
        return logits.sum() * 0.0
    lg = logits[picked].float()  # (k, v)
    loss = F.cross_entropy(lg, labels[picked])
    if soft_targets is not None:
        if soft_targets.shape != logits.shape:
            raise ValueError(f"soft_targets must have the shape of logits {tuple(logits.shape)}, "
                             f"got {tuple(soft_targets.shape)}")
        soft = -(soft_targets[picked].float() * F.log_softmax(lg, dim=-1)).sum(-1).mean()
        loss = (1 - alpha) * loss + alpha * soft
    return loss
