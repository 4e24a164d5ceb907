"""Quilt-LLaVA at toy scale: the data of the two training stages, the toy model, evaluation, and ``chat``.

The recipe of Quilt-LLaVA (Seyfioglu et al., 2024) / LLaVA-1.5, shrunk to the synthetic H&E world of
``vlm_lab.data.pathology``:

* **stage 1, feature alignment** -- caption data turned into Q/A: ``"<image>\\n" + a random brief-description
  instruction`` -> the caption (LLaVA's 558k / Quilt-1M pairs; here ``PathologyTiles`` captions). Only the projector
  learns (``LLaVA.configure_stage(1)``);
* **stage 2, visual instruction tuning** -- Quilt-Instruct-style conversations from narrated *training* slides
  (``generate_qa``: independent questions on one patch, reasoning questions across all patches of a slide) plus
  Quilt-VQA-style closed / open questions on training slides and tiles (a 0.15 M-parameter LM cannot answer
  "yes"/"no" zero-shot the way a 7B one does; LLaVA-Med fine-tunes on VQA training splits for the same reason).
  Projector + LM learn (``configure_stage(2)``);
* the **blind baseline** is the same LM tuned on the same stage-2 conversations with every image removed: it shows
  what the questions alone give away.

Images are slide patches (``tile_px=64``: a 64 px patch is a 112 um field, like an NCT-CRC tile) resized to the
toy CoCa tower's 32 px. The toy's frozen vision tower is the image tower of the shipped toy CoCa
(``assets/coca-toy``, trained on the same tissue); the LM is pre-trained text-only on the world's captions and
answers by ``assets/make_llava_toy.py`` (the "Vicuna" of the toy), which also writes the checkpoints in
``assets/llava-toy/``.

Shape letters: k images of one conversation, s image side.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from vlm_lab.data import pathology as P
from vlm_lab.data.transforms import resize_center_crop_pad, to_tensor
from vlm_lab.eval.vqa import score_vqa
from vlm_lab.models.llava import (LLaVA, LLaVAConfig, ConversationTemplate, collate_conversations,
                                  tokenize_conversation)

__all__ = ["STAGE1_INSTRUCTIONS", "TOY_DIR", "SLIDE_KWARGS", "Sample", "to_model_px", "llava_tokenizer",
           "world_texts", "stage1_samples", "stage2_samples", "vqa_samples", "blind", "encode_samples",
           "ConversationDataset", "LLaVACollator", "build_toy_llava", "load_toy", "answer_items", "evaluate_vqa",
           "chat"]

#: Where ``assets/make_llava_toy.py`` writes the toy checkpoints (repository checkout).
TOY_DIR = Path(__file__).resolve().parents[2] / "assets" / "llava-toy"
#: Slide settings for the chapter: 64 px per NCT-CRC field of view, so a 64 px narrative patch is one "tile".
SLIDE_KWARGS = {"tile_px": 64}

#: Brief-description instructions for stage 1 (the kind of list LLaVA's pre-training draws one from at random).
STAGE1_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Give a short and clear explanation of the image.",
    "Summarize the visual content of the image.",
    "Share a concise interpretation of the image provided.",
    "What are the key features of this tissue?",
)


@dataclass
class Sample:
    """One conversation with its images (uint8 ``(h, w, 3)``, placeholders in reading order)."""

    turns: list[tuple[str, str]]  # (question with "<image>\n" placeholders, answer)
    images: list[np.ndarray] = field(default_factory=list)
    kind: str = ""  # "caption", "independent", "reasoning", "closed", "open", "general"


def to_model_px(images: Sequence[np.ndarray], size: int = 32) -> Tensor:
    """uint8 ``(h, w, 3)`` images -> ``(k, 3, size, size)``: centre square, bilinear resize, CLIP normalisation."""
    from PIL import Image

    out = []
    for im in images:
        sq = resize_center_crop_pad(np.asarray(im), min(im.shape[:2]))
        if sq.shape[0] != size:
            sq = np.asarray(Image.fromarray(sq).resize((size, size), Image.BILINEAR))
        out.append(to_tensor(sq))
    if not out:
        return torch.zeros(0, 3, size, size)
    return torch.stack(out)  # (k, 3, s, s)


def _img_prefix(k: int) -> str:
    return "<image>\n" * k


def stage1_samples(n: int, seed: int = 0, size: int = 32) -> list[Sample]:
    """Caption pairs as one-turn Q/A: ``"<image>\\n" + random instruction`` -> caption (``PathologyTiles``)."""
    rng = random.Random(seed)
    tiles = P.PathologyTiles(n, size=size, seed=seed, caption_variants=5, return_image=True)
    return [Sample([(_img_prefix(1) + rng.choice(STAGE1_INSTRUCTIONS), tiles[i]["caption"])], [tiles[i]["image"]],
                   "caption") for i in range(n)]


def _patch(slide: P.Slide, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return slide.image[y0:y1, x0:x1]


def _yes_no(answer: str) -> str:
    return {"yes": "Yes.", "no": "No."}.get(answer, answer)


def vqa_samples(slides: Sequence[P.NarratedSlide], items: Sequence[P.VQAItem]) -> list[Sample]:
    """Quilt-VQA-style items as samples: a patch question shows that patch; a slide question shows every
    narrative patch of the slide (reasoning across patches); a general-knowledge question shows no image."""
    by_id = {s.slide.slide_id: s for s in slides}
    out = []
    for it in items:
        if it.box is not None:
            imgs = [_patch(by_id[it.slide_id].slide, it.box)]
        elif it.slide_id:
            imgs = [p.image for p in by_id[it.slide_id].patches]
        else:
            imgs = []
        kind = "general" if not it.image_dependent else ("closed" if it.closed else "open")
        out.append(Sample([(_img_prefix(len(imgs)) + it.question, _yes_no(it.answer) if it.closed else it.answer)],
                          imgs, kind))
    return out


def _tile_vqa(n: int, seed: int, size: int = 32) -> list[Sample]:
    """Per-tile closed (balanced yes/no) and open tissue-type questions on ``PathologyTiles``."""
    rng = random.Random(seed)
    tiles = P.PathologyTiles(n, size=size, seed=seed, return_image=True)
    out = []
    for i in range(n):
        lab = P.CLASSES[tiles[i]["labels"]]
        ask = lab if rng.random() < 0.5 else rng.choice([c for c in P.CLASSES if c != lab])
        out.append(Sample([(_img_prefix(1) + f"Does this patch show {P.CLASS_NAMES[ask]}?",
                            "Yes." if ask == lab else "No.")], [tiles[i]["image"]], "closed"))
        out.append(Sample([(_img_prefix(1) + "What tissue type is shown in this patch?", P.CLASS_NAMES[lab])],
                          [tiles[i]["image"]], "open"))
    return out


def stage2_samples(slides: Sequence[P.NarratedSlide], seed: int = 0, n_tiles: int = 0,
                   vqa_rounds: int = 2) -> list[Sample]:
    """Stage-2 instruction data from *training* slides: Quilt-Instruct-style independent and reasoning Q/A
    (``generate_qa``), ``vqa_rounds`` draws of Quilt-VQA-style closed / open questions on the same slides, and
    (``n_tiles`` > 0) closed / open questions on extra tiles."""
    by_id = {s.slide.slide_id: s for s in slides}
    out = []
    for qa in P.generate_qa(slides, seed=seed):
        sl = by_id[qa.slide_id].slide
        imgs = [_patch(sl, b) for b in qa.boxes]
        out.append(Sample([(_img_prefix(len(imgs)) + qa.question, qa.answer)], imgs, qa.kind))
    for r in range(vqa_rounds):
        out += vqa_samples(slides, P.make_vqa_eval(slides, seed=seed + 101 * r))
    if n_tiles:
        out += _tile_vqa(n_tiles, seed=seed + 7)
    return out


def blind(samples: Sequence[Sample]) -> list[Sample]:
    """The same conversations with every image and placeholder removed (the blind baseline's data)."""
    return [Sample([(q.replace("<image>\n", ""), a) for q, a in s.turns], [], s.kind) for s in samples]


def world_texts(seed: int = 0) -> list[str]:
    """Text of the world (captions, answers, questions, template words) for the toy BPE and LM pre-training."""
    slides = P.make_narrated_slides(6, seed=seed + 55, prefix="text", **SLIDE_KWARGS)
    texts = [s.turns[0][1] for s in stage1_samples(600, seed=seed + 9)]
    texts += [f"USER: {q} ASSISTANT: {a}" for s in stage2_samples(slides, seed=seed, n_tiles=90) for q, a in s.turns]
    texts += list(STAGE1_INSTRUCTIONS) + list(P.CLASS_NAMES.values()) + list(P.DIAGNOSES)
    texts += [f"Does this patch show {v}?" for v in P.CLASS_NAMES.values()]
    texts += [f"Is this slide consistent with {d}?" for d in P.DIAGNOSES]
    return [t.replace("<image>\n", "") for t in texts]


def llava_tokenizer(seed: int = 0, vocab_size: int = 1024):
    """Byte-level BPE on the world's text, ``<pad>=0 <s>=1 </s>=2 <unk>=3 <image>=4`` (``train_bpe``). BPE merges
    can tie-break differently across runs: the toy checkpoints ship the tokenizer they were trained with."""
    from vlm_lab.data.tokenizers import train_bpe

    return train_bpe(world_texts(seed), vocab_size=vocab_size, model_max_length=320)


def encode_samples(samples: Sequence[Sample], tokenizer: Any, template: ConversationTemplate | None = None,
                   image_size: int = 32) -> list[dict[str, Any]]:
    """Tokenise (answers learned, everything else -100) and prepare the images: items for ``LLaVACollator``."""
    out = []
    for i, s in enumerate(samples):
        enc = tokenize_conversation(s.turns, tokenizer, template, index=i)
        enc["pixel_values"] = to_model_px(s.images, image_size)  # (k, 3, s, s)
        out.append(enc)
    return out


class ConversationDataset(Dataset):
    """Encoded conversations (``encode_samples``) as a map-style dataset for ``fit``."""

    def __init__(self, items: Sequence[dict[str, Any]]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class LLaVACollator:
    """Pads conversations (right) and concatenates their images in reading order."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        batch = collate_conversations(items, self.pad_token_id)
        batch["pixel_values"] = torch.cat([it["pixel_values"] for it in items])  # (m, 3, s, s)
        return batch


def build_toy_llava(tokenizer: Any, lm_state: dict[str, Tensor] | None = None, **overrides: Any) -> LLaVA:
    """A toy LLaVA whose vision tower is the shipped toy CoCa's image tower (``assets/coca-toy``)."""
    from vlm_lab.train.checkpoint import load_model

    cfg = LLaVAConfig.toy(**overrides)
    if len(tokenizer) > cfg.lm.vocab_size or tokenizer.convert_tokens_to_ids("<image>") != cfg.image_token_id:
        raise ValueError(f"tokenizer: needs <= {cfg.lm.vocab_size} tokens and <image> = {cfg.image_token_id}")
    model = LLaVA(cfg)
    coca = load_model(Path(__file__).resolve().parents[2] / "assets" / "coca-toy" / "model.safetensors")
    model.load_vision_tower(coca.visual)
    if lm_state is not None:
        model.language_model.load_state_dict(lm_state)
    return model


def load_toy(name: str = "stage2", path: str | Path | None = None) -> tuple[LLaVA, Any]:
    """A shipped toy checkpoint (``"stage1"``, ``"stage2"`` or ``"blind"``) and its tokenizer."""
    from transformers import AutoTokenizer

    from vlm_lab.train.checkpoint import load_model

    root = Path(path) if path is not None else TOY_DIR
    f = root / f"{name}.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"{f} is missing; regenerate it with: python assets/make_llava_toy.py {root}")
    model = load_model(f)
    model.configure_stage(2)
    tok = AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    return model.eval(), tok


def answer_items(model: LLaVA, tokenizer: Any, samples: Sequence[Sample], *, use_images: bool = True,
                 batch_size: int = 64, max_new_tokens: int = 16) -> list[str]:
    """Greedy answers to the (first) question of each sample; ``use_images=False`` removes the images."""
    preds: list[str] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        qs = [s.turns[0][0].replace("<image>\n", "") for s in chunk]  # answer() puts the placeholders back
        ims = [to_model_px(s.images, model.config.image_size) if (use_images and s.images) else None for s in chunk]
        preds += model.answer(tokenizer, qs, ims, max_new_tokens=max_new_tokens)
    return preds


def evaluate_vqa(model: LLaVA, tokenizer: Any, samples: Sequence[Sample], *, use_images: bool = True,
                 kinds: Sequence[str] = ("closed", "open")) -> tuple[dict[str, float], list[str]]:
    """Closed accuracy / open recall (``score_vqa``) over the image-dependent VQA samples: ``(scores, answers)``."""
    sel = [s for s in samples if s.kind in kinds]
    preds = answer_items(model, tokenizer, sel, use_images=use_images)
    refs = [s.turns[0][1].rstrip(".").lower() if s.kind == "closed" else s.turns[0][1] for s in sel]
    return score_vqa(preds, refs, [s.kind == "closed" for s in sel]), preds


def chat(model: LLaVA, tokenizer: Any, image: np.ndarray | Sequence[np.ndarray] | None, question: str, *,
         max_new_tokens: int = 48) -> str:
    """One chat turn for a UI: ``image`` is a uint8 ``(h, w, 3)`` array (or a list of them, or None)."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question: expected a non-empty str")
    if image is None:
        imgs: list[np.ndarray] = []
    elif isinstance(image, np.ndarray) and image.ndim == 3:
        imgs = [image]
    else:
        imgs = list(image)
    for im in imgs:
        if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            raise ValueError(f"image: expected uint8 (h, w, 3) arrays, got {getattr(im, 'dtype', type(im))} "
                             f"{getattr(im, 'shape', '')}")
    px = to_model_px(imgs, model.config.image_size) if imgs else None
    return model.answer(tokenizer, [question.strip()], [px], max_new_tokens=max_new_tokens)[0]
