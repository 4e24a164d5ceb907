"""Image <-> text retrieval metrics: Recall@K both ways (as ALBEF's ``itm_eval`` defines them).

Given a score matrix ``S (N_img, N_txt)`` and, for every text, the index of its image:

- image -> text: the rank of an image is the best (smallest) rank among *all* of its ground-truth captions;
- text -> image: each text has exactly one ground-truth image.

R@K is the percentage of queries whose rank is < K; ``r_mean`` averages the six numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def retrieval_metrics(scores: Tensor, text_to_image: Sequence[int] | Tensor,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K (in %) for image->text (``i2t_R@K``) and text->image (``t2i_R@K``) plus ``r_mean``.

    Args:
        scores: ``(N_img, N_txt)`` similarity of every image with every text (higher = more similar).
        text_to_image: length ``N_txt``; the index of the image each text describes.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (images, texts), got shape {tuple(scores.shape)}")
    n_img, n_txt = scores.shape
    t2i = torch.as_tensor(text_to_image, dtype=torch.long)
    if t2i.shape != (n_txt,):
        raise ValueError(f"text_to_image must have one entry per text ({n_txt}), got shape {tuple(t2i.shape)}")
    if n_img == 0 or n_txt == 0:
        raise ValueError("scores is empty")
    if int(t2i.min()) < 0 or int(t2i.max()) >= n_img:
        raise ValueError(f"text_to_image entries must lie in [0, {n_img})")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contains NaN or infinite values")
    scores = scores.float().cpu()
    # image -> text: rank of every text in each image's ordering; keep the best ground-truth rank
    order = scores.argsort(dim=1, descending=True)  # (N_img, N_txt)
    rank_of_text = torch.empty_like(order)
    rank_of_text.scatter_(1, order, torch.arange(n_txt).expand(n_img, n_txt))
    gt = t2i[None, :] == torch.arange(n_img)[:, None]  # (N_img, N_txt) ground-truth pairs
    has_caption = gt.any(dim=1)
    i2t_rank = torch.where(gt, rank_of_text, torch.full_like(rank_of_text, n_txt)).min(dim=1).values[has_caption]
    # text -> image
    order_t = scores.T.argsort(dim=1, descending=True)  # (N_txt, N_img)
    t2i_rank = (order_t == t2i[:, None]).int().argmax(dim=1)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * (i2t_rank < k).float().mean().item()
    for k in ks:
        out[f"t2i_R@{k}"] = 100.0 * (t2i_rank < k).float().mean().item()
    out["r_mean"] = sum(out.values()) / len(out)
    return out
