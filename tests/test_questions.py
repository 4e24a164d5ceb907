"""Shapes-world questions: answers agree with the scene record, only unique answers, balance, determinism."""
from __future__ import annotations

import re

import numpy as np
import pytest

from vlm_lab.data.questions import (ANSWERS, QUESTION_TYPES, QACollator, ShapesQADataset, ask, possible_types,
                                    relation_foil)
from vlm_lab.data.shapes import Scene, ShapeSpec


def _answer_from_scene(scene: Scene, q: str) -> str:
    """An independent re-derivation of the answer from the question text and the record."""
    colours = [s.colour for s in scene.shapes]
    shapes = [s.shape for s in scene.shapes]
    if m := re.fullmatch(r"what colour is the (\w+)\?", q):
        assert shapes.count(m[1]) == 1, "attribute question about a shape that is not unique"
        return colours[shapes.index(m[1])]
    if m := re.fullmatch(r"what shape is the (\w+) object\?", q):
        assert colours.count(m[1]) == 1, "attribute question about a colour that is not unique"
        return shapes[colours.index(m[1])]
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", q):
        return "yes" if any(s.colour == m[1] and s.shape == m[2] for s in scene.shapes) else "no"
    if m := re.fullmatch(r"is there a (\w+)\?", q):
        return "yes" if m[1] in shapes else "no"
    if q == "how many shapes are there?":
        return ["zero", "one", "two"][len(shapes)]
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", q):
        return ["zero", "one", "two"][colours.count(m[1])]
    if m := re.fullmatch(r"is the (\w+)(?: shape)? (left of|right of|above|below) the (\w+)(?: shape)?\?", q):
        key = colours if m[1] in colours and m[3] in colours and m[1] != m[3] else shapes
        assert key.count(m[1]) == 1 and key.count(m[3]) == 1, "relational question names an ambiguous shape"
        return "yes" if scene.relation(key.index(m[1]), key.index(m[3])) == m[2] else "no"
    raise AssertionError(f"unexpected question {q!r}")


def test_answers_agree_with_scene_records():
    ds = ShapesQADataset("train", n=240, seed=3, image_size=32)
    for i in range(len(ds)):
        scene, q = ds.sample(i)
        assert q.answer in ANSWERS
        assert q.qtype == QUESTION_TYPES[i % 4]
        assert _answer_from_scene(scene, q.text) == q.answer, (i, q, scene)


def test_yes_no_balanced_and_every_type_present():
    ds = ShapesQADataset("all", n=400, seed=0, image_size=32)
    by_type: dict[str, list[str]] = {}
    for i in range(len(ds)):
        _, q = ds.sample(i)
        by_type.setdefault(q.qtype, []).append(q.answer)
    assert set(by_type) == set(QUESTION_TYPES) and all(len(v) == 100 for v in by_type.values())
    for t in ("existence", "relational"):
        yes = by_type[t].count("yes") / len(by_type[t])
        assert 0.35 < yes < 0.65, (t, yes)
        assert set(by_type[t]) == {"yes", "no"}


def test_items_are_deterministic_and_collate():
    from vlm_lab.data import shapes_tokenizer

    ds = ShapesQADataset("train", n=12, seed=5, image_size=32)
    a, b = ds[7], ds[7]
    assert a["question"] == b["question"] and (a["pixel_values"] == b["pixel_values"]).all()
    assert a["labels"] == ANSWERS.index(a["answer"])
    tok = shapes_tokenizer()
    batch = QACollator(tok, max_length=16)([ds[i] for i in range(12)])
    assert batch["input_ids"].shape[0] == 12 and batch["qtype_id"].tolist() == [i % 4 for i in range(12)]
    assert tok.unk_token_id not in batch["input_ids"].flatten().tolist()


def test_unique_answers_only_and_clear_errors():
    twin = Scene((ShapeSpec("circle", "red", "small", 4.0, 8.0, 16.0), ShapeSpec("circle", "red", "large", 6.0, 24.0, 16.0)),
                 image_size=32)
    assert possible_types(twin) == ["existence", "counting"]  # two red circles: nothing unique to ask about
    with pytest.raises(ValueError, match="unique answer"):
        ask(twin, "attribute", np.random.default_rng(0))
    single = Scene((ShapeSpec("star", "blue", "small", 4.0, 8.0, 16.0),), image_size=32)
    with pytest.raises(ValueError, match="relational"):
        ask(single, "relational", np.random.default_rng(0))
    with pytest.raises(ValueError, match="qtype"):
        ask(single, "colour", np.random.default_rng(0))
    with pytest.raises(ValueError, match="heldout"):
        ShapesQADataset("heldout", n=4)
    with pytest.raises(ValueError, match="types"):
        ShapesQADataset("train", n=4, types=("why",))
    same_colour = Scene((ShapeSpec("circle", "red", "small", 4.0, 8.0, 16.0), ShapeSpec("ring", "red", "large", 6.0, 24.0, 16.0)),
                        image_size=32)
    for seed in range(20):  # the shapes differ but the colours do not: relational questions must name shapes
        q = ask(same_colour, "relational", np.random.default_rng(seed))
        assert "red shape" not in q.text and _answer_from_scene(same_colour, q.text) == q.answer


def test_relation_foil():
    s = Scene((ShapeSpec("circle", "red", "small", 4.0, 6.0, 16.0), ShapeSpec("star", "blue", "small", 4.0, 26.0, 17.0)),
              image_size=32)
    assert relation_foil(s) == ("a red circle left of a blue star", "a red circle right of a blue star")
    with pytest.raises(ValueError):
        relation_foil(Scene((s.shapes[0],), image_size=32))
