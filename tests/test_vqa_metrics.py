"""Quilt-VQA scoring (normalisation, open recall, the two closed rules), the judge interface, the test split."""

import math

import pytest

from vlm_lab.eval.vqa import (JUDGE_CRITERIA, JudgeVerdict, closed_correct, instruction_test_split, judge_answers,
                              normalize_answer, open_recall, rule_based_judge, score_vqa)


@pytest.mark.parametrize("text, expected", [
    ("The Mucus-pools, two!", "mucus pools 2"),          # '-' not next to a space -> space; ', ' -> removed
    ("An adipose tissue.", "adipose tissue"),             # articles and the final period go
    ("pH 7.5 (approx)", "ph 7.5 approx"),                  # a period before a digit stays
    ("It dont look like tumour", "it don't look like tumour"),
    ("none of three", "0 of 3"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_open_recall_hand_cases():
    assert open_recall("This patch shows mucus pools.", "mucus pools") == 1.0
    assert open_recall("adipose tissue", "smooth muscle") == 0.0
    assert open_recall("smooth tissue", "smooth muscle") == pytest.approx(0.5)
    assert open_recall("", "mucus") == 0.0
    # the script counts the answer's repetitions (tp = 3, fn = 1); clip=True counts each ground-truth token once
    assert open_recall("mucus mucus mucus", "mucus pools") == pytest.approx(0.75)
    assert open_recall("mucus mucus mucus", "mucus pools", clip=True) == pytest.approx(0.5)
    assert open_recall("The debris.", "debris") == 1.0  # normalisation on both sides


def test_closed_rules_hand_cases():
    assert closed_correct("Yes.", "yes") and closed_correct("No, it does not.", "no")
    assert not closed_correct("Yes.", "no")
    # an evasive answer: "mention" says wrong for both references; "negation" reads it as yes
    assert not closed_correct("It shows stroma.", "yes") and not closed_correct("It shows stroma.", "no")
    assert closed_correct("It shows stroma.", "yes", rule="negation")
    # "not" anywhere means no under "negation"
    assert closed_correct("Yes, it is not unlike mucus.", "no", rule="negation")
    assert closed_correct("Yes, it is not unlike mucus.", "yes")
    with pytest.raises(ValueError, match="reference"):
        closed_correct("yes", "mucus")
    with pytest.raises(ValueError, match="rule"):
        closed_correct("yes", "yes", rule="vote")


def test_score_vqa():
    s = score_vqa(["Yes.", "no", "mucus pools", "debris"], ["yes", "yes", "mucus", "adipose tissue"],
                  [True, True, False, False])
    assert s["closed_acc"] == 0.5 and s["n_closed"] == 2 and s["n_open"] == 2
    assert s["open_recall"] == pytest.approx((1.0 + 0.0) / 2)  # "mucus" fully recalled; "debris" recalls nothing
    assert math.isnan(score_vqa(["yes"], ["yes"], [True])["open_recall"])
    with pytest.raises(ValueError, match="equal lengths"):
        score_vqa(["a"], [], [])


def test_rule_based_judge():
    v = rule_based_judge("What tissue is shown?", "This patch shows mucus pools.", "This patch shows mucus pools.")
    assert v.judge == "rule-based" and "not a model" in v.explanation
    assert v.scores["accuracy"] == 10.0 and v.reference_score == 10.0
    bad = rule_based_judge("What tissue is shown?", "This patch shows mucus pools.",
                           "This patch shows adipose tissue.", key_terms=["adipose tissue", "mucus"])
    assert bad.scores["accuracy"] == 1.0 and "adipose tissue" in bad.explanation
    assert bad.score < v.score
    res = judge_answers(["q1", "q2"], ["mucus pools", "debris"], ["mucus pools", "nothing"])
    assert set(res["model"]) == set(JUDGE_CRITERIA) and res["judge"] == "rule-based"
    assert 0 < res["relative"] < 100

    def constant(q, r, a):
        return JudgeVerdict({k: 5.0 for k in JUDGE_CRITERIA}, {k: 10.0 for k in JUDGE_CRITERIA}, "my-llm")

    assert judge_answers(["q"], ["r"], ["a"], judge=constant)["relative"] == 50.0
    with pytest.raises(TypeError, match="JudgeVerdict"):
        judge_answers(["q"], ["r"], ["a"], judge=lambda q, r, a: 7)


def test_instruction_test_split_is_held_out():
    from vlm_lab.data.pathology import make_narrated_slides

    ev = make_narrated_slides(3, seed=1_000_003, prefix="eval", tile_px=64)
    items = instruction_test_split(ev)
    assert {i.kind for i in items} <= {"conversation", "detail", "reasoning"} and "reasoning" in {i.kind for i in items}
    assert all(i.slide_id.startswith("eval") for i in items)
    assert all(len(i.boxes) >= 2 for i in items if i.kind == "reasoning")
