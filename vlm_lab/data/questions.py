"""Questions about the shapes world: attribute, existence, counting and relational VQA, answered from the scene record.

Every question is derived from a :class:`~vlm_lab.data.shapes.Scene` (never from pixels), so answers are exact:

=============  =================================================  ====================================
type           templates                                          answers
=============  =================================================  ====================================
attribute      "what colour is the {shape}?"                      a colour
               "what shape is the {colour} object?"               a shape
existence      "is there a {shape}?" / "is there a {colour} {shape}?"   yes / no (balanced)
counting       "how many shapes are there?"                       one / two
               "how many {colour} shapes are there?"              zero / one / two
relational     "where is the {a} shape from the {b} shape?"  (colours)  left / right / above / below
               "where is the {a} from the {b}?"              (shapes)   (about a quarter each)
=============  =================================================  ====================================

Only questions with a unique answer are asked: "what colour is the circle?" needs exactly one circle, "what shape is
the red object?" exactly one red shape, and a relational question needs two shapes that the named attribute tells
apart (two shapes may share a colour or a shape). The answer is :meth:`Scene.relation` of ``a`` to ``b`` as one word
(the dominant axis of the displacement decides): "where is the red shape from the blue shape?" -> "left" when the red
one is mostly to the left of the blue one.

Why a four-way answer and not "is the red shape left of the blue shape?" -> yes / no: with balanced yes / no
answers that target is an XOR of a text bit (which relation is asked) and an image bit (which relation holds), so
neither modality alone predicts anything and small models get no gradient signal until both are combined -- all
three fusion styles stayed at chance (0.47-0.54) after 3,000 steps. The direction question has the same need for a
*joint* look (which of the two shapes is the question about?) without the XOR.

Every word is in :func:`vlm_lab.data.tokenizers.shapes_tokenizer`'s vocabulary (``QUESTION_TEXTS`` in shapes.py
lists them), and answers are classes of the fixed vocabulary :data:`ANSWERS` (VQA as classification, as in the VQA
v2 baselines and ViLT's VQA head).

:class:`ShapesQADataset` cycles through the four types (item ``i`` has type ``QUESTION_TYPES[i % 4]``), so every
type has the same number of items, and draws each item from ``(seed, split, i)`` alone: the same index always gives
the same scene, question and answer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .shapes import COLOURS, RELATIONS, SHAPES, Scene, ShapesConfig, render, sample_scene
from .transforms import to_tensor

__all__ = ["QUESTION_TYPES", "ANSWERS", "ANSWER_TO_ID", "Question", "ask", "possible_types", "ShapesQADataset",
           "QACollator", "relation_foil"]

QUESTION_TYPES: tuple[str, ...] = ("attribute", "existence", "counting", "relational")
#: The fixed answer vocabulary; ``answer_id`` indexes into it.
ANSWERS: tuple[str, ...] = ("yes", "no", "zero", "one", "two", *COLOURS, *SHAPES, "left", "right", "above", "below")
ANSWER_TO_ID: dict[str, int] = {a: i for i, a in enumerate(ANSWERS)}
_NUMBER = ("zero", "one", "two")
_DIRECTION = {"left of": "left", "right of": "right", "above": "above", "below": "below"}
#: probability that a relational question names its shapes by colour when both colour and shape tell them apart
#: (1.0: by shape only when the two shapes share a colour; recognising shapes at 32 px is slow for the toys, and
#: the relational type should measure binding a name to a position, not shape recognition)
RELATIONAL_P_COLOUR = 1.0
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_SPLIT_CODE = {"train": 0, "heldout": 1, "all": 2}


@dataclass(frozen=True)
class Question:
    """One question about one scene."""

    text: str  # e.g. "is the red shape left of the blue shape?"
    answer: str  # one of ANSWERS
    qtype: str  # one of QUESTION_TYPES

    @property
    def answer_id(self) -> int:
        return ANSWER_TO_ID[self.answer]


def _unique(values: list[str]) -> list[str]:
    """Values that occur exactly once."""
    return [v for v in values if values.count(v) == 1]


def possible_types(scene: Scene) -> list[str]:
    """The question types that have at least one question with a unique answer about ``scene``."""
    colours = [s.colour for s in scene.shapes]
    shapes = [s.shape for s in scene.shapes]
    out = ["existence", "counting"]
    if _unique(colours) or _unique(shapes):
        out.insert(0, "attribute")
    if len(scene.shapes) == 2 and (len(set(colours)) == 2 or len(set(shapes)) == 2):
        out.append("relational")
    return out


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> Question:
    """Draw one question of type ``qtype`` about ``scene`` (its answer read from the record).

    Raises:
        ValueError: ``qtype`` is unknown, or ``scene`` has no question of that type with a unique answer
            (see :func:`possible_types`).
    """
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"qtype: expected one of {list(QUESTION_TYPES)}, got {qtype!r}")
    if not isinstance(scene, Scene):
        raise TypeError(f"scene: expected a Scene, got {type(scene).__name__}")
    if qtype not in possible_types(scene):
        raise ValueError(f"qtype: the scene has no {qtype!r} question with a unique answer "
                         f"(shapes: {[s.name for s in scene.shapes]})")
    colours = [s.colour for s in scene.shapes]
    shapes = [s.shape for s in scene.shapes]

    if qtype == "attribute":
        options = [("colour", s) for s in _unique(shapes)] + [("shape", c) for c in _unique(colours)]
        kind, key = options[int(rng.integers(len(options)))]
        if kind == "colour":
            return Question(f"what colour is the {key}?", colours[shapes.index(key)], qtype)
        return Question(f"what shape is the {key} object?", shapes[colours.index(key)], qtype)

    if qtype == "existence":
        want_yes = bool(rng.random() < 0.5)
        with_colour = bool(rng.random() < 0.5)
        if with_colour:
            present = {(s.colour, s.shape) for s in scene.shapes}
            pool = sorted(present) if want_yes else [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
            c, s = pool[int(rng.integers(len(pool)))]
            return Question(f"is there a {c} {s}?", "yes" if want_yes else "no", qtype)
        pool = sorted(set(shapes)) if want_yes else [s for s in SHAPES if s not in shapes]
        s = pool[int(rng.integers(len(pool)))]
        return Question(f"is there a {s}?", "yes" if want_yes else "no", qtype)

    if qtype == "counting":
        if rng.random() < 0.5:
            return Question("how many shapes are there?", _NUMBER[len(scene.shapes)], qtype)
        # ask about a present colour most of the time so "zero" is not the usual answer
        c = colours[int(rng.integers(len(colours)))] if rng.random() < 0.75 else COLOURS[int(rng.integers(len(COLOURS)))]
        return Question(f"how many {c} shapes are there?", _NUMBER[colours.count(c)], qtype)

    # relational: two shapes told apart by colour (preferred) or by shape; the answer is the direction
    by_colour = len(set(colours)) == 2 and (len(set(shapes)) < 2 or rng.random() < RELATIONAL_P_COLOUR)
    names = [f"{c} shape" for c in colours] if by_colour else shapes
    a = int(rng.integers(2))
    return Question(f"where is the {names[a]} from the {names[1 - a]}?", _DIRECTION[scene.relation(a, 1 - a)], qtype)


class ShapesQADataset(Dataset):
    """Map-style VQA dataset over the shapes world, balanced over the four question types.

    Items are dicts: ``pixel_values`` float32 ``(3, h, w)`` (CLIP-normalised), ``question`` str, ``answer`` str,
    ``labels`` int (index into :data:`ANSWERS`), ``qtype`` str, ``qtype_id`` int (index into
    :data:`QUESTION_TYPES`), ``scene`` the record, and ``caption`` (= the question, so image-text collators work).

    Args:
        split: "train", "heldout" or "all" (which colour-shape compositions scenes use; see shapes.py).
            "heldout" scenes hold one shape only, so they never get relational questions; use "train" / "all".
        n: number of items.
        seed: item ``i`` is drawn from ``(seed, split, i)``.
        types: which question types to cycle through (default all four).
        config: a :class:`ShapesConfig`; keyword overrides (``image_size=32``, ...) are applied on top.
    """

    def __init__(self, split: str = "train", n: int = 1000, seed: int = 0, types: tuple[str, ...] = QUESTION_TYPES,
                 config: ShapesConfig | None = None, **overrides) -> None:
        if split not in _SPLIT_CODE:
            raise ValueError(f"split: expected one of {list(_SPLIT_CODE)}, got {split!r}")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"n: expected a positive int number of items, got {n!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        types = tuple(types)
        if not types or any(t not in QUESTION_TYPES for t in types):
            raise ValueError(f"types: expected a non-empty subset of {list(QUESTION_TYPES)}, got {list(types)}")
        if split == "heldout" and "relational" in types:
            raise ValueError("types: split='heldout' scenes hold one shape, so they have no relational questions; "
                             "drop 'relational' or use split='train' / 'all'")
        config = config if config is not None else ShapesConfig()
        if not isinstance(config, ShapesConfig):
            raise TypeError(f"config: expected a ShapesConfig, got {type(config).__name__}")
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        self.split, self.n, self.seed, self.types = split, int(n), int(seed), types
        self.answers = ANSWERS

    def __len__(self) -> int:
        return self.n

    def sample(self, index: int) -> tuple[Scene, Question]:
        """The scene and question of item ``index`` (no rendering)."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index: expected an int, got {type(index).__name__}")
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(f"index: {index} out of range for a dataset of {self.n} items")
        qtype = self.types[index % len(self.types)]
        rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], int(index), 17])
        # relational questions need two shapes; other types keep the world's own one / two-shape mix
        config = dataclasses.replace(self.config, p_single=0.0) if qtype == "relational" else self.config
        for _ in range(1000):  # a scene without such a question is rare (two shapes sharing colour and shape: never)
            scene = sample_scene(rng, config, self.split)
            if qtype in possible_types(scene):
                return scene, ask(scene, qtype, rng)
        raise RuntimeError(f"could not draw a scene with a {qtype!r} question")  # pragma: no cover

    def __getitem__(self, index: int) -> dict:
        scene, q = self.sample(index)
        return {
            "pixel_values": to_tensor(render(scene)),
            "question": q.text,
            "caption": q.text,
            "answer": q.answer,
            "labels": q.answer_id,
            "qtype": q.qtype,
            "qtype_id": QUESTION_TYPES.index(q.qtype),
            "scene": scene,
        }

    def __repr__(self) -> str:
        return (f"ShapesQADataset(split={self.split!r}, n={self.n}, seed={self.seed}, types={list(self.types)}, "
                f"image_size={self.config.image_size})")


class QACollator:
    """Collate :class:`ShapesQADataset` items: the image-text batch plus ``labels`` (answer ids) and ``qtype_id``.

    Questions are tokenised like captions (``tokenize_captions``: right padding, raises on too-long questions).
    """

    def __init__(self, tokenizer, max_length: int = 16) -> None:
        from .collate import ImageTextCollator

        self._collate = ImageTextCollator(tokenizer, max_length=max_length)

    def __call__(self, items: list[dict]) -> dict:
        batch = self._collate(items)
        batch["qtype_id"] = torch.as_tensor([int(it["qtype_id"]) for it in items], dtype=torch.long)  # (b,)
        batch["question"] = [it["question"] for it in items]
        batch["answer"] = [it["answer"] for it in items]
        return batch


def relation_foil(scene: Scene) -> tuple[str, str]:
    """A two-shape scene's caption and its *foil*: the same words with the relation reversed.

    ``("a red circle left of a blue star", "a red circle right of a blue star")``: a bag-of-words model cannot tell
    them apart; a model that binds words to positions can. Raises ``ValueError`` for one-shape scenes.
    """
    if not isinstance(scene, Scene) or len(scene.shapes) != 2:
        raise ValueError("scene: expected a Scene with two shapes")
    s0, s1 = scene.shapes
    rel = scene.relation(0, 1)
    text = "a {} {} {} a {} {}"
    return (text.format(s0.colour, s0.shape, rel, s1.colour, s1.shape),
            text.format(s0.colour, s0.shape, _OPPOSITE[rel], s1.colour, s1.shape))
