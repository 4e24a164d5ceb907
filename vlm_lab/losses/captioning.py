"""Language-modelling (captioning / image-grounded text generation) loss with label masking.

The objective of every generative head in the lab (BLIP's LM head, BLIP-2's ITG and its stage-2 LLM loss,
CoCa's captioner, LLaVA) is next-token cross-entropy over the supervised positions only:

    L_LM = - 1/|S| * sum_{t in S} log p(y_{t+1} | y_{<=t}, image)           S = {t : labels[t+1] != -100}

Positions that must not be learned -- padding, the prompt, the visual prefix (BLIP-2's 32 query vectors,
LLaVA's image tokens), the decoder's start token -- carry the label ``-100`` (PyTorch's ``ignore_index``),
as in Hugging Face and LAVIS. ``build_lm_labels`` writes those labels; ``lm_loss`` shifts and averages.

With ``label_smoothing=eps`` the target distribution is ``(1 - eps) * onehot + eps / V`` (BLIP and BLIP-2's
Q-Former use 0.1; LLMs use 0).

Mean over *supervised tokens*, not over sequences: for gradient accumulation over micro-batches with
different numbers of supervised tokens, use ``reduction="sum"`` and divide by the total token count (see
model-facts expert test 23).

Shape letters: b batch, n sequence length, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def lm_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    shift: bool = True,
    label_smoothing: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> Tensor:
    """Next-token cross-entropy of ``logits (b, n, V)`` against ``labels (b, n)`` (``-100`` = not supervised).

    Args:
        logits: unnormalised scores for each position.
        labels: target ids; ``ignore_index`` where nothing is learned.
        shift: ``True`` (decoders): position t predicts ``labels[t + 1]``; ``False``: labels are already aligned.
        label_smoothing: epsilon of label smoothing, in [0, 1).
        ignore_index: the label that marks unsupervised positions.
        reduction: ``"mean"`` over supervised tokens, or ``"sum"``.

    Returns a scalar. With no supervised position at all the mean is 0 (not NaN) and still has a gradient path.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must have shape (batch, tokens, vocab), got {getattr(logits, 'shape', logits)}")
    if not isinstance(labels, Tensor) or labels.dim() != 2 or labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape (batch, tokens) = {tuple(logits.shape[:2])}, "
                         f"got {tuple(getattr(labels, 'shape', ()))}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer token ids, got {labels.dtype}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if shift:
        logits = logits[:, :-1]  # (b, n-1, V): position t ...
        labels = labels[:, 1:]  # (b, n-1): ... predicts token t+1
    vocab = logits.shape[-1]
    supervised = labels != ignore_index
    if labels.device.type != "meta" and supervised.any():
        bad = labels[supervised]
        if int(bad.min()) < 0 or int(bad.max()) >= vocab:
            raise ValueError(f"labels must be in [0, {vocab}) or {ignore_index}, found [{int(bad.min())}, {int(bad.max())}]")
    total = F.cross_entropy(logits.reshape(-1, vocab).float(), labels.reshape(-1),  # (b*n, V) vs (b*n,)
                            ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum")
    if reduction == "sum":
        return total
    return total / supervised.sum().clamp(min=1)


def build_lm_labels(
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    prompt_lengths: Tensor | list[int] | int | None = None,
    num_prefix: int = 0,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Labels for a decoder: ``input_ids`` with ``-100`` on padding, on the prompt and on a visual prefix.

    Args:
        input_ids: ``(b, n)`` token ids of the text (right-padded).
        attention_mask: ``(b, n)``, 1 for real tokens; padding gets ``-100``. None = no padding.
        prompt_lengths: number of leading text tokens per row (int or ``(b,)``) that form the prompt and are not
            learned (BLIP-2's "a photo of", BLIP's "a picture of ", LLaVA's system/user turns).
        num_prefix: number of positions *prepended before the text* in the model's input sequence (BLIP-2's
            query vectors); the result then has ``num_prefix + n`` columns, the first ``num_prefix`` all ``-100``.

    Returns an int64 tensor ``(b, num_prefix + n)``.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, tokens), got {getattr(input_ids, 'shape', input_ids)}")
    if num_prefix < 0:
        raise ValueError(f"num_prefix must be >= 0, got {num_prefix}")
    b, n = input_ids.shape
    labels = input_ids.clone().long()
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {(b, n)}, got {tuple(attention_mask.shape)}")
        labels = labels.masked_fill(attention_mask == 0, ignore_index)
    if prompt_lengths is not None:
        lengths = torch.as_tensor(prompt_lengths, device=input_ids.device).long().expand(b)  # (b,)
        if (lengths < 0).any() or (lengths > n).any():
            raise ValueError(f"prompt_lengths must be in [0, {n}], got {lengths.tolist()}")
        in_prompt = torch.arange(n, device=input_ids.device)[None, :] < lengths[:, None]  # (b, n)
        labels = labels.masked_fill(in_prompt, ignore_index)
    if num_prefix:
        prefix = torch.full((b, num_prefix), ignore_index, dtype=labels.dtype, device=labels.device)
        labels = torch.cat([prefix, labels], dim=1)  # (b, num_prefix + n)
    return labels
