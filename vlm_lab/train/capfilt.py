"""CapFilt (BLIP, Li et al., 2022, sec. 3.3): bootstrap a cleaner caption set from noisy web pairs.

The paper's Figure 3::

    pre-trained BLIP --fine-tune ITC + ITM on clean human pairs (I_h, T_h)--> Filter
                     --fine-tune LM on (I_h, T_h)-----------------------------> Captioner
    web images I_w  --Captioner, nucleus sampling--> synthetic captions T_s
    Filter keeps (I_w, T_w) and (I_w, T_s) whose ITM head says "match"
    D = {(I_h, T_h)} + kept {(I_w, T_w)} + kept {(I_w, T_s)}  -> pre-train a new model on D

BLIP's code does not contain CapFilt (only its filtered and synthetic captions were released), so this follows the
paper. Choices, written down: filter and captioner are both initialised from the same model (the paper does the
same); the filter keeps a pair when ``p(match) > threshold`` (the paper does not give its threshold; 0.5 here);
the captioner samples one synthetic caption per web image with ``top_p = 0.9`` (the paper) and a minimum length.

``noisy_captions`` builds the toy "web": a fraction of the captions replaced by another scene's caption, and a
fraction replaced by a vague one ("a picture"), with the clean caption kept for measuring the filter.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from .config import TrainConfig
from .fit import fit

__all__ = ["NoisyCaptions", "CapFiltResult", "capfilt", "finetune_filter_and_captioner"]

VAGUE = ("a picture", "an image", "some shapes", "a photo of something")


class NoisyCaptions(Dataset):
    """Wrap an image-caption dataset; ``wrong`` of the items get another item's caption and ``vague`` of them a
    vague caption. Items keep ``"clean_caption"`` (the true one) and ``"noise"`` ("none" | "wrong" | "vague")."""

    def __init__(self, base: Dataset, wrong: float = 0.4, vague: float = 0.0, seed: int = 0) -> None:
        if not (0 <= wrong and 0 <= vague and wrong + vague <= 1):
            raise ValueError(f"wrong ({wrong}) and vague ({vague}) must be >= 0 and sum to at most 1")
        g = torch.Generator().manual_seed(seed)
        n = len(base)
        order = torch.randperm(n, generator=g).tolist()
        n_wrong, n_vague = int(wrong * n), int(vague * n)
        partner = torch.randint(1, n, (n,), generator=g).tolist()
        self.base = base
        self.kind: dict[int, tuple[str, Any]] = {}
        for i in order[:n_wrong]:
            self.kind[i] = ("wrong", (i + partner[i]) % n)  # never itself
        for j, i in enumerate(order[n_wrong:n_wrong + n_vague]):
            self.kind[i] = ("vague", VAGUE[j % len(VAGUE)])

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.base[i])
        item["clean_caption"] = item["caption"]
        kind, value = self.kind.get(i, ("none", None))
        item["noise"] = kind
        if kind == "wrong":
            item["caption"] = self.base[value]["caption"]
        elif kind == "vague":
            item["caption"] = value
        return item


@dataclass
class CapFiltResult:
    """What ``capfilt`` returns: the bootstrapped items and the filter's statistics."""

    items: list[dict]  # (pixel_values, caption, source) with source "human" | "web" | "synthetic"
    kept_web: int  # web captions kept by the filter
    kept_synthetic: int  # synthetic captions kept
    n_web: int  # web images
    stats: dict[str, float] = field(default_factory=dict)  # precision of kept web captions etc. (when known)
    filter_model: Any = None  # the fine-tuned filter (ITC + ITM)
    captioner: Any = None  # the fine-tuned captioner (LM)


def finetune_filter_and_captioner(model: torch.nn.Module, human: Dataset, train_config: TrainConfig):
    """Two copies of ``model`` (a ``BLIP``): the filter fine-tuned with ITC + ITM, the captioner with LM, both on
    the clean ``human`` set with ``train_config``. Returns ``(filter, captioner)`` in eval mode."""
    filt, cap = copy.deepcopy(model), copy.deepcopy(model)
    filt.config = dataclasses.replace(filt.config, lm_weight=0.0, itc_weight=max(filt.config.itc_weight, 1.0),
                                      itm_weight=max(filt.config.itm_weight, 1.0))
    cap.config = dataclasses.replace(cap.config, itc_weight=0.0, itm_weight=0.0, lm_weight=1.0)
    fit(filt, human, train_config)
    fit(cap, human, train_config)
    return filt.eval(), cap.eval()


@torch.no_grad()
def capfilt(model: torch.nn.Module, web: Dataset, human: Dataset, tokenizer: Any, collate: Callable[[list], dict],
            train_config: TrainConfig, *, threshold: float | None = None, calibration_quantile: float = 0.25,
            batch_size: int = 128, max_new_tokens: int = 16, min_new_tokens: int = 3, top_p: float = 0.9,
            seed: int = 0) -> CapFiltResult:
    """Run CapFilt with a pre-trained ``BLIP`` ``model``: fine-tune filter and captioner on ``human``, caption and
    filter ``web``, and return the bootstrapped set (human + kept web + kept synthetic)."""
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1] or None (calibrate), got {threshold}")
    if not 0.0 <= calibration_quantile <= 1.0:
        raise ValueError(f"calibration_quantile must be in [0, 1], got {calibration_quantile}")
    with torch.enable_grad():
        filt, cap = finetune_filter_and_captioner(model, human, train_config)
    if threshold is None:  # calibrate on the clean human pairs
        scores = []
        for start in range(0, len(human), batch_size):
            hb = collate([human[i] for i in range(start, min(start + batch_size, len(human)))])
            scores.append(filt.itm_probability(hb["pixel_values"], hb["input_ids"], hb["attention_mask"]))
        threshold = float(torch.cat(scores).quantile(calibration_quantile))
    gen = torch.Generator().manual_seed(seed)
    items = [{"pixel_values": h["pixel_values"], "caption": h["caption"], "source": "human"}
             for h in (human[i] for i in range(len(human)))]
    kept_web = kept_syn = 0
    web_kept_clean = web_kept_total = web_dropped_noisy = web_noisy = 0
    for start in range(0, len(web), batch_size):
        chunk = [web[i] for i in range(start, min(start + batch_size, len(web)))]
        px = torch.stack([it["pixel_values"] for it in chunk])  # (b, 3, H, W)
        new = cap.generate(px, method="nucleus", top_p=top_p, max_new_tokens=max_new_tokens,
                           min_new_tokens=min_new_tokens, generator=gen)
        synthetic = [s.strip() or "a picture" for s in tokenizer.batch_decode(new, skip_special_tokens=True)]
        b_web = collate([{"pixel_values": p, "caption": it["caption"]} for p, it in zip(px, chunk)])
        b_syn = collate([{"pixel_values": p, "caption": s} for p, s in zip(px, synthetic)])
        p_web = filt.itm_probability(px, b_web["input_ids"], b_web["attention_mask"])
        p_syn = filt.itm_probability(px, b_syn["input_ids"], b_syn["attention_mask"])
        for it, p, s, q, pw in zip(chunk, px, synthetic, p_syn.tolist(), p_web.tolist()):
            noisy = it.get("noise", "none") != "none"
            web_noisy += noisy
            if pw > threshold:
                items.append({"pixel_values": p, "caption": it["caption"], "source": "web"})
                kept_web += 1
                web_kept_total += 1
                web_kept_clean += not noisy
            else:
                web_dropped_noisy += noisy
            if q > threshold:
                items.append({"pixel_values": p, "caption": s, "source": "synthetic"})
                kept_syn += 1
    stats: dict[str, float] = {"threshold": threshold}
    if web_noisy:
        stats["web_noise_rate"] = web_noisy / len(web)
        stats["kept_web_clean_rate"] = web_kept_clean / max(1, web_kept_total)
        stats["noisy_removed_rate"] = web_dropped_noisy / web_noisy
    return CapFiltResult(items=items, kept_web=kept_web, kept_synthetic=kept_syn, n_web=len(web), stats=stats,
                         filter_model=filt, captioner=cap)


class ItemList(Dataset):
    """A list of item dicts as a torch Dataset (the bootstrapped set)."""

    def __init__(self, items: Sequence[dict]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]
