"""Turn a list of dataset items into the batch dict every lab model takes.

Batch (the shared contract): ``pixel_values`` float32 ``(b, 3, h, w)``; ``input_ids`` and
``attention_mask`` int64 ``(b, l)`` with right padding (1 = real token); ``labels`` int64 ``(b,)`` when
every item has one; ``caption`` list[str]; ``scene`` list when items carry scene records.

Unlike HF processors, nothing is truncated silently: a caption longer than ``max_length`` tokens
(special tokens included) raises unless ``truncation=True``, and then the end token ([SEP] / </s>) is
kept as the last real token, so text towers that pool at the first ``eos_token_id`` still find it.

Shape legend: ``b`` batch, ``l`` tokens, ``h`` / ``w`` image height / width.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["ImageTextCollator", "tokenize_captions"]


def tokenize_captions(
    tokenizer,
    captions: Sequence[str],
    max_length: int = 32,
    truncation: bool = False,
    padding: str = "longest",
) -> dict[str, torch.Tensor]:
    """Tokenise ``captions`` into ``input_ids`` / ``attention_mask`` int64 ``(b, l)``, right-padded.

    Args:
        tokenizer: a Hugging Face tokenizer that adds begin / end tokens (see :mod:`vlm_lab.data.tokenizers`).
        captions: non-empty strings.
        max_length: the most tokens a caption may take, special tokens included.
        truncation: ``False`` raises on a longer caption; ``True`` cuts it to ``max_length`` keeping the
            end token.
        padding: ``"longest"`` pads to the longest caption of the batch, ``"max_length"`` to ``max_length``.
    """
    if isinstance(captions, str) or not isinstance(captions, Sequence):
        raise TypeError(f"captions: expected a list of strings, got {type(captions).__name__}")
    if len(captions) == 0:
        raise ValueError("captions: expected at least one caption, got an empty list")
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise TypeError(f"captions: item {i} is {type(c).__name__}, expected str")
        if not c.strip():
            raise ValueError(f"captions: item {i} is empty (or only whitespace); every caption needs text")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length: expected an int >= 2 (room for the begin and end tokens), got {max_length!r}")
    if padding not in ("longest", "max_length"):
        raise ValueError(f"padding: expected 'longest' or 'max_length', got {padding!r}")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer: has no pad token; set tokenizer.pad_token before collating")

    ids = tokenizer(list(captions), add_special_tokens=True, truncation=False)["input_ids"]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    out: list[list[int]] = []
    for i, seq in enumerate(ids):
        if len(seq) > max_length:
            if not truncation:
                raise ValueError(
                    f"captions: item {i} is {len(seq)} tokens long (special tokens included), more than "
                    f"max_length={max_length}; shorten it, raise max_length, or pass truncation=True")
            ends_with_eos = eos is not None and seq[-1] == eos
            seq = seq[: max_length - 1] + [eos] if ends_with_eos else seq[:max_length]
        out.append(seq)
    length = max_length if padding == "max_length" else max(len(s) for s in out)
    input_ids = torch.full((len(out), length), tokenizer.pad_token_id, dtype=torch.long)  # (b, l)
    attention_mask = torch.zeros((len(out), length), dtype=torch.long)  # (b, l)
    for i, seq in enumerate(out):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class ImageTextCollator:
    """Collate dataset items (dicts with ``pixel_values`` and ``caption``) into a batch dict.

    Args:
        tokenizer: a Hugging Face tokenizer adding begin / end tokens.
        max_length: the most tokens a caption may take, special tokens included.
        truncation: ``False`` (default) raises on a longer caption; ``True`` truncates keeping the end token.
        padding: ``"longest"`` (default) or ``"max_length"``.

    Example::

        collate = ImageTextCollator(shapes_tokenizer(), max_length=16)
        loader = DataLoader(ShapesDataset("train", n=512, image_size=32), batch_size=64, collate_fn=collate)
    """

    def __init__(self, tokenizer, max_length: int = 32, truncation: bool = False, padding: str = "longest") -> None:
        if tokenizer is None or not callable(tokenizer):
            raise TypeError(f"tokenizer: expected a Hugging Face tokenizer, got {type(tokenizer).__name__}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length: expected an int >= 2, got {max_length!r}")
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding: expected 'longest' or 'max_length', got {padding!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation = bool(truncation)
        self.padding = padding

    def __call__(self, items: Sequence[dict]) -> dict:
        if isinstance(items, dict) or not isinstance(items, Sequence) or len(items) == 0:
            raise ValueError("captions: got an empty batch; items must be a non-empty list of dataset items (dicts)")
        for i, it in enumerate(items):
            if not isinstance(it, dict):
                raise TypeError(f"items: item {i} is {type(it).__name__}, expected a dict")
            for key in ("pixel_values", "caption"):
                if key not in it:
                    raise ValueError(f"items: item {i} has no {key!r} key (keys: {sorted(it)})")
        pixels = [it["pixel_values"] for it in items]
        for i, p in enumerate(pixels):
            if not isinstance(p, torch.Tensor) or p.ndim != 3:
                raise ValueError(f"pixel_values: item {i} is not a (3, H, W) tensor "
                                 f"(got {type(p).__name__} {tuple(getattr(p, 'shape', ()))})")
            if p.shape != pixels[0].shape:
                raise ValueError(f"pixel_values: item {i} has shape {tuple(p.shape)}, item 0 has "
                                 f"{tuple(pixels[0].shape)}; all images of a batch must share one size")
        captions = [it["caption"] for it in items]
        batch: dict = {"pixel_values": torch.stack(pixels).float()}  # (b, 3, h, w)
        batch.update(tokenize_captions(self.tokenizer, captions, self.max_length, self.truncation, self.padding))
        if all("labels" in it for it in items):
            batch["labels"] = torch.as_tensor([int(it["labels"]) for it in items], dtype=torch.long)  # (b,)
        batch["caption"] = captions
        if all("scene" in it for it in items):
            batch["scene"] = [it["scene"] for it in items]
        return batch

    def __repr__(self) -> str:
        return (f"ImageTextCollator(tokenizer={type(self.tokenizer).__name__}, max_length={self.max_length}, "
                f"truncation={self.truncation}, padding={self.padding!r})")
