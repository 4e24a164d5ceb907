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
    if m := re.fullmatch(r"where is the (\w+)( shape)? from the (\w+)( shape)?\?", q):
        assert bool(m[2]) == bool(m[4]), "relational question mixes naming by colour and by shape"
        key = colours if m[2] else shapes
        assert key.count(m[1]) == 1 and key.count(m[3]) == 1, "relational question names an ambiguous shape"
        a, b = scene.shapes[key.index(m[1])], scene.shapes[key.index(m[3])]
        # direction of a seen from b, from the coordinates (x right, y down; the dominant axis decides, ties -> x)
        dx, dy = a.x - b.x, a.y - b.y
        if abs(dx) >= abs(dy):
            return "left" if dx < 0 else "right"
        return "above" if dy < 0 else "below"
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
    yes = by_type["existence"].count("yes") / len(by_type["existence"])
    assert 0.35 < yes < 0.65, yes
    assert set(by_type["existence"]) == {"yes", "no"}
    # relational answers are the four directions, about a quarter each (so no answer wins without the image)
    rel = by_type["relational"]
    assert set(rel) == {"left", "right", "above", "below"}
    assert all(0.15 < rel.count(d) / len(rel) < 0.35 for d in set(rel)), {d: rel.count(d) for d in set(rel)}


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


def test_relational_answer_is_the_direction_and_flips_with_the_question(monkeypatch):
    # red left of blue, mostly horizontal; green below yellow, mostly vertical
    horiz = Scene((ShapeSpec("circle", "red", "small", 4.0, 6.0, 14.0), ShapeSpec("star", "blue", "small", 4.0, 26.0, 18.0)),
                  image_size=32)
    vert = Scene((ShapeSpec("square", "green", "small", 4.0, 14.0, 27.0), ShapeSpec("ring", "yellow", "small", 4.0, 17.0, 5.0)),
                 image_size=32)
    for seed in range(10):  # by default distinct colours name the shapes
        assert ask(horiz, "relational", np.random.default_rng(seed)).text in (
            "where is the red shape from the blue shape?", "where is the blue shape from the red shape?")
    import vlm_lab.data.questions as questions

    monkeypatch.setattr(questions, "RELATIONAL_P_COLOUR", 0.5)  # now by colour or by shape
    seen = {}
    for seed in range(40):
        for scene in (horiz, vert):
            q = ask(scene, "relational", np.random.default_rng(seed))
            assert q.answer in ANSWERS and q.answer == _answer_from_scene(scene, q.text)
            seen[q.text] = q.answer
    assert seen["where is the red shape from the blue shape?"] == "left"
    assert seen["where is the blue shape from the red shape?"] == "right"
    assert seen["where is the circle from the star?"] == "left"
    assert seen["where is the green shape from the yellow shape?"] == "below"
    assert seen["where is the ring from the square?"] == "above"
    assert len(seen) == 8  # both orders, named by colour and by shape, for both scenes


def test_relation_foil():
    s = Scene((ShapeSpec("circle", "red", "small", 4.0, 6.0, 16.0), ShapeSpec("star", "blue", "small", 4.0, 26.0, 17.0)),
              image_size=32)
    assert relation_foil(s) == ("a red circle left of a blue star", "a red circle right of a blue star")
    with pytest.raises(ValueError):
        relation_foil(Scene((s.shapes[0],), image_size=32))
