"""The crowded-scene questions of assets/chapter01_relational_study.py (notebook 01's relational study)."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from vlm_lab.data import shapes_tokenizer
from vlm_lab.data.questions import ANSWERS, QACollator
from vlm_lab.data.shapes import Scene, render

ASSETS = Path(__file__).resolve().parents[1] / "assets"
_spec = importlib.util.spec_from_file_location("chapter01_relational_study", ASSETS / "chapter01_relational_study.py")
study = importlib.util.module_from_spec(_spec)
sys.modules["chapter01_relational_study"] = study
_spec.loader.exec_module(study)


def _named(question: str) -> tuple[str, str]:
    words = question.replace("?", " ").split()
    if question.startswith("where"):  # "where is the A shape from the B shape?"
        return words[3], words[7]
    return words[0], words[2]  # "A or B : what colour is on the W?"


@pytest.mark.parametrize("task", ["where4", "compare3"])
def test_answers_follow_from_the_scene(task):
    for i in range(60):
        specs, question, answer = study.crowded_question(task, 0, i)
        assert len(specs) == (4 if task == "where4" else 3)
        assert len({s.colour for s in specs}) == len(specs)  # colours name shapes uniquely
        for j, a in enumerate(specs):  # no two shapes touch
            for b in specs[j + 1:]:
                assert math.hypot(a.x - b.x, a.y - b.y) >= a.radius + b.radius + 1.5
        ca, cb = _named(question)
        a, b = (next(s for s in specs if s.colour == c) for c in (ca, cb))
        assert answer in ANSWERS
        if task == "where4":
            dx, dy = b.x - a.x, b.y - a.y
            expect = ("left" if dx > 0 else "right") if abs(dx) >= abs(dy) else ("above" if dy > 0 else "below")
            assert answer == expect, (question, specs)
        else:
            word = question.replace("?", "").split()[-1]
            key = {"left": lambda s: -s.x, "right": lambda s: s.x, "top": lambda s: -s.y, "bottom": lambda s: s.y}[word]
            assert answer == max((a, b), key=key).colour, (question, specs)


def test_compare3_needs_the_image_and_the_distractor_matters():
    named_first = extreme_is_answer = 0
    n = 300
    for i in range(n):
        specs, question, answer = study.crowded_question("compare3", 1, i)
        named_first += answer == _named(question)[0]
        word = question.replace("?", "").split()[-1]
        key = {"left": lambda s: -s.x, "right": lambda s: s.x, "top": lambda s: -s.y, "bottom": lambda s: s.y}[word]
        extreme_is_answer += max(specs, key=key).colour == answer
    assert 0.4 < named_first / n < 0.6  # the word order gives nothing away
    assert extreme_is_answer / n < 0.85  # "the most extreme shape in the picture" is often wrong


def test_items_are_deterministic_and_drawn_like_the_world():
    a, b = study.crowded_question("where4", 3, 7), study.crowded_question("where4", 3, 7)
    assert a == b and study.crowded_question("where4", 4, 7) != a
    specs = a[0]
    img = study.draw(specs)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert np.array_equal(study.draw(specs[:1]), render(Scene(shapes=(specs[0],), image_size=32)))
    for s in specs:  # every shape is painted in its colour at its centre
        assert img[int(round(s.y)), int(round(s.x))].max() > 100


def test_questions_fit_the_fusion_models_and_collate():
    tok = shapes_tokenizer()
    for task in ("where2", "where4", "compare3"):
        ds = study.dataset(task, 8, seed=0)
        batch = QACollator(tok, max_length=16)([ds[i] for i in range(8)])  # raises if a question is too long
        assert batch["input_ids"].shape[0] == 8 and batch["labels"].shape == (8,)
        assert not (batch["input_ids"] == tok.unk_token_id).any()


def test_recorded_study_runs_are_complete():
    records = sorted((ASSETS / "chapter01" / "study").glob("*.json"))
    assert records, "assets/chapter01/study/ has no records"
    for path in records:
        r = json.loads(path.read_text())
        assert len(r["curve"]) == len(r["eval_steps"]) == r["steps"] // study.EVAL_EVERY, path.name
        assert r["final"] == r["curve"][-1] and all(0 <= a <= 1 for a in r["curve"]), path.name
        assert f"assets/chapter01_relational_study.py {r['task']} {r['model']}" in r["command"], path.name
