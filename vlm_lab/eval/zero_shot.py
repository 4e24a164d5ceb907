"""Zero-shot classification with prompt templates and ensembling (CLIP, section 3.1.4; CONCH).

For each class c, every template is filled in ("a photo of a {}." -> "a photo of a red circle."), encoded and
**L2-normalised; the template embeddings are averaged and the mean normalised again** (OpenAI's
``Prompt_Engineering_for_ImageNet`` notebook, open_clip ``build_zero_shot_classifier``). With CONCH-style
class synonyms, the average runs over synonyms x templates. The classifier is the matrix ``W (C, d)``;
an image is assigned ``argmax_c  <x, w_c>`` (a scale such as 100 does not change the argmax).

Works with any model exposing ``encode_image(pixel_values)`` and ``encode_text(input_ids, attention_mask)``
and a Hugging Face tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# A few CLIP-style templates. "{}" is replaced by the class name.
SIMPLE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
BARE_TEMPLATES: tuple[str, ...] = ("{}",)


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 256,
                 max_length: int | None = None) -> Tensor:
    """Encode ``texts`` with ``model.encode_text`` -> ``(len(texts), d)`` L2-normalised embeddings."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a non-empty list of strings, got {type(texts).__name__}")
    if not len(texts):
        raise ValueError("texts must be a non-empty list of strings")
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must contain strings only, got {type(bad[0]).__name__} {bad[0]!r}")
    if any(not t.strip() for t in texts):
        raise ValueError("texts must not contain empty captions")
    device = _model_device(model)
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), padding=True, return_tensors="pt",
                        truncation=max_length is not None, max_length=max_length)
        out.append(model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)))
    return F.normalize(torch.cat(out).float(), dim=-1)


@torch.no_grad()
def zero_shot_classifier(model: nn.Module, tokenizer: Any,
                         class_names: Sequence[str] | Mapping[str, Sequence[str]],
                         templates: Sequence[str] = SIMPLE_TEMPLATES) -> Tensor:
    """Class embeddings ``(C, d)``: normalise each prompt, average per class, normalise again.

    ``class_names`` is a list of names, or a mapping class -> list of synonyms (the average then runs over
    synonyms x templates, as CONCH does).
    """
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"templates must be a non-empty list of strings containing '{{}}', got {list(templates)}")
    synonyms = dict(class_names) if isinstance(class_names, Mapping) else {c: [c] for c in class_names}
    if not synonyms or any(not names for names in synonyms.values()):
        raise ValueError("class_names must be non-empty (and every class needs at least one name)")
    weights = []
    for names in synonyms.values():
        prompts = [t.format(n) for n in names for t in templates]
        emb = encode_texts(model, tokenizer, prompts)  # (synonyms * templates, d), each normalised
        weights.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(weights)  # (C, d)


@torch.no_grad()
def encode_images(model: nn.Module, images: Tensor | Iterable[Any], batch_size: int = 256) -> Tensor:
    """``model.encode_image`` over a tensor ``(N, 3, H, W)`` or an iterable of batches / dataset items."""
    device = _model_device(model)
    if isinstance(images, Tensor):
        chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    else:
        chunks = (b["pixel_values"] if isinstance(b, Mapping) else b for b in images)
    out = [model.encode_image(c.to(device)).float() for c in chunks]
    if not out:
        raise ValueError("images is empty")
    return F.normalize(torch.cat(out), dim=-1)


def zero_shot_logits(image_embeds: Tensor, classifier: Tensor, scale: float = 100.0) -> Tensor:
    """``scale * image_embeds @ classifier.T`` -> ``(N, C)``."""
    if image_embeds.shape[-1] != classifier.shape[-1]:
        raise ValueError(f"image_embeds width {image_embeds.shape[-1]} != classifier width {classifier.shape[-1]}")
    return scale * image_embeds @ classifier.T


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy for each k (k larger than the number of classes counts as top-C)."""
    if logits.shape[0] != labels.shape[0] or logits.shape[0] == 0:
        raise ValueError(f"logits ({tuple(logits.shape)}) and labels ({tuple(labels.shape)}) must have the same "
                         "non-zero length")
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, k)
    hits = top == labels.to(top.device)[:, None]
    return {f"top{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks}


@torch.no_grad()
def zero_shot_accuracy(model: nn.Module, tokenizer: Any, images: Tensor | Iterable[Any], labels: Tensor,
                       class_names: Sequence[str] | Mapping[str, Sequence[str]],
                       templates: Sequence[str] = SIMPLE_TEMPLATES, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Zero-shot top-k accuracy of ``model`` on ``images`` with true class indices ``labels``."""
    was_training = model.training
    model.eval()
    try:
        classifier = zero_shot_classifier(model, tokenizer, class_names, templates)
        logits = zero_shot_logits(encode_images(model, images), classifier)
    finally:
        model.train(was_training)
    return topk_accuracy(logits, torch.as_tensor(labels), ks)
