"""Image-text matching (ITM): a binary "does this caption describe this image?" classifier on fused tokens.

    logits = head(pooled fused [CLS])            (k, 2): column 1 = "match"
    loss   = CE(logits, labels)                  labels 1 for true pairs, 0 for negatives

The objective is only as good as its negatives. Two samplers are here, both returning *which image goes
with which caption* so a model can build the pairs and run its fusion encoder:

- ``random_negatives`` (ViLT, ``compute_itm_wpa``): exactly half of the batch keeps its own image, the
  other half gets another, randomly chosen image; the positions of the negatives are a random permutation.
  ViLT draws the false image from the whole dataset (``false_image_0``); drawing it from the other rows of
  a shuffled batch is the same distribution for a random batch and needs no second data stream.
- ``hard_negatives`` (ALBEF, VLMo, BLIP): for each caption, one image sampled with probability
  ``softmax(similarity)`` over the other images of the batch (never the positive, nor any item with the
  same ``group_ids``), so the fusion encoder sees the confusing cases the contrastive model still gets wrong.

Both honour ``group_ids`` (b,) so two rows describing the same thing are never paired as a "negative".

Shape letters: b batch, k scored pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _forbidden(b: int, group_ids: Tensor | None, device: torch.device) -> Tensor:
    """``(b, b)`` bool: True where pairing caption i with image j is NOT a valid negative."""
    if group_ids is None:
        return torch.eye(b, dtype=torch.bool, device=device)
    if group_ids.shape != (b,):
        raise ValueError(f"group_ids must be (batch,) = ({b},), got {tuple(group_ids.shape)}")
    g = group_ids.to(device)
    return g[:, None] == g[None, :]


def random_negatives(batch_size: int, *, group_ids: Tensor | None = None,
                     generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """ViLT's ITM pairs: ``(image_index (b,), labels (b,))``.

    ``labels`` has exactly ``b // 2`` zeros (negatives) at random positions; a negative row i gets
    ``image_index[i] = j`` with j drawn uniformly among the images that are valid negatives for i, a
    positive row keeps ``image_index[i] = i``. Needs ``batch_size >= 2``.
    """
    b = int(batch_size)
    if b < 2:
        raise ValueError(f"batch_size must be >= 2 to draw a negative image from another row, got {batch_size}")
    gdev = generator.device if generator is not None else device
    labels = torch.ones(b, dtype=torch.long)
    labels[: b // 2] = 0
    labels = labels[torch.randperm(b, generator=generator, device=gdev).cpu()].to(device)  # half 0, shuffled
    forbidden = _forbidden(b, group_ids, torch.device(device))
    weights = (~forbidden).float()  # (b, b) uniform over valid negatives
    if not weights[labels == 0].sum(1).gt(0).all():
        raise ValueError("a row has no valid negative image in the batch (all rows share its group_ids)")
    weights[labels == 1] = 1.0  # placeholder rows, overwritten below
    pick = torch.multinomial(weights.to(gdev), 1, generator=generator).squeeze(1).to(device)  # (b,)
    image_index = torch.where(labels == 1, torch.arange(b, device=device), pick)
    return image_index, labels


def hard_negatives(similarity: Tensor, *, group_ids: Tensor | None = None,
                   generator: torch.Generator | None = None) -> Tensor:
    """For each row i of ``similarity`` ``(b, b)`` (caption i vs image j, or image i vs caption j), one
    column sampled from ``softmax(similarity[i])`` restricted to valid negatives -> ``(b,)`` indices.

    The softmax is taken in fp32 after filling forbidden entries with -inf (BLIP-2's variant; ALBEF zeroes
    them after the softmax, which gives the same distribution), so ``multinomial`` never sees NaN.
    """
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be square (batch, batch), got {tuple(similarity.shape)}")
    b = similarity.shape[0]
    forbidden = _forbidden(b, group_ids, similarity.device)
    if forbidden.all(1).any():
        raise ValueError("a row has no valid negative in the batch (all rows share its group_ids)")
    logits = similarity.detach().float().masked_fill(forbidden, float("-inf"))
    probs = logits.softmax(dim=1)  # (b, b), zero on forbidden entries
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of ``logits (k, 2)`` against ``labels (k,)`` (1 = match)."""
    if logits.dim() != 2 or logits.shape[1] != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (pairs, 2) and labels (pairs,), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    return F.cross_entropy(logits.float(), labels.long())


def itm_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Share of pairs whose argmax agrees with the label."""
    return float((logits.argmax(-1) == labels).float().mean())
