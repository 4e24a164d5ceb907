"""VQA scoring: closed-vocabulary accuracy (ViLT / VQA v2 as classification) and generative answers (Quilt-VQA).

``vqa_accuracy(model, batches)`` runs a model whose output has ``logits (b, a)`` over the answer vocabulary on
batches carrying ``labels`` (answer ids) and, optionally, ``qtype_id``; it returns plain floats (exact match of the
arg-max answer), so a notebook can put them in a table.

Generative VQA (LLaVA / Quilt-LLaVA answer in free text): ``normalize_answer``, ``open_recall``, ``closed_correct``
and ``score_vqa`` reproduce Quilt-LLaVA's scoring choices (documented in the block comment before them);
``judge_answers`` runs any model-graded judge, with the rule-based offline default ``rule_based_judge``;
``instruction_test_split`` builds the instruction-following test questions from held-out slides.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

__all__ = ["vqa_accuracy", "vqa_predictions", "normalize_answer", "open_recall", "closed_correct", "score_vqa",
           "CLOSED_RULES", "JUDGE_CRITERIA", "JudgeVerdict", "rule_based_judge", "judge_answers", "InstructionItem",
           "instruction_test_split"]


@torch.no_grad()
def vqa_predictions(model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Arg-max answers, labels and question types (``-1`` when absent) over all ``batches``: 1-D int64 tensors."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    preds, labels, qtypes = [], [], []
    try:
        for batch in batches:
            if not isinstance(batch, dict) or "labels" not in batch:
                raise ValueError("batches: every batch must be a dict with 'labels' (answer ids)")
            out = model(batch)
            logits = getattr(out, "logits", out)
            preds.append(logits.argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
            qtypes.append(batch["qtype_id"].cpu() if "qtype_id" in batch else torch.full_like(labels[-1], -1))
    finally:
        model.train(was_training)
    if not preds:
        raise ValueError("batches: got no batches")
    return {"pred": torch.cat(preds), "labels": torch.cat(labels), "qtype_id": torch.cat(qtypes)}


def vqa_accuracy(model: nn.Module, batches: Iterable[dict[str, Any]],
                 type_names: Sequence[str] | None = None) -> dict[str, float]:
    """``{"all": acc, <type name>: acc, ...}``; types are named by ``type_names[qtype_id]`` (ids when None)."""
    p = vqa_predictions(model, batches)
    ok = (p["pred"] == p["labels"]).float()
    out = {"all": float(ok.mean())}
    for t in sorted(set(p["qtype_id"].tolist())):
        if t < 0:
            continue
        name = type_names[t] if type_names is not None else str(t)
        out[name] = float(ok[p["qtype_id"] == t].mean())
    return out


# ---------------------------------------------------------------------------------------------------------------
# Generative VQA: Quilt-VQA / LLaVA-Med scoring, a judge interface, an instruction-following test split
# ---------------------------------------------------------------------------------------------------------------
# Quilt-LLaVA scores free-text answers with ``llava/eval/quilt_eval.py`` + ``quilt_utils.py`` (aldraus/quilt-llava,
# read for facts, not copied; LLaVA-Med's ``run_eval.py`` is the same family). The choices it makes, and ours:
#
# * Normalisation (``normalize_word``): lowercase; each punctuation mark of ; / [ ] " { } ( ) = + \ _ - > < @ ` , ? !
#   is deleted when the string has it next to a space (or has a digit,digit group) and replaced by a space
#   otherwise -- decided once per mark for the whole string; every period not followed by a digit is dropped;
#   number words zero..ten become digits ("none" -> "0"); the articles a / an / the are dropped; contractions
#   written without apostrophe get it back ("dont" -> "don't"; the script has ~120 entries, we keep the common
#   ones); commas are dropped. ``normalize_answer`` does the same.
# * Open questions, *recall* (``calculate_f1score``): unigram counts of the normalised strings; tp = how often the
#   answer uses words that occur in the ground truth (answer counts, not clipped), fn = ground-truth occurrences
#   of words the answer lacks; recall = tp / (tp + fn), 0 for an empty answer. A word the answer repeats is
#   counted each time, so recall can be inflated by repetition: ``open_recall(..., clip=True)`` clips tp at the
#   ground-truth count (the literal "share of ground-truth tokens found in the answer"). Default: the script's.
#   Not reproduced: the script truncates predictions to the character length of an "anchor" answer file
#   (``--anchor`` has a non-empty default), a pitfall rather than a choice.
# * Closed questions (yes/no). The script prints two accuracies: "yes/no accuracy" (``rule="mention"``: correct
#   when the ground-truth word is among the answer's words *and* the answer says yes or no at all -- an answer
#   with neither counts as wrong; LLaVA-Med's rule) and "2 yes/no accuracy" (``rule="negation"``: the answer is
#   "no" when it contains the word no or not anywhere, otherwise "yes" -- so "it is not unlike mucus" reads as
#   no and an evasive answer reads as yes). Our default is "mention" (stricter for evasive answers); both are in
#   ``score_vqa``'s output.
# * Model-graded comparison (``quilt_gpt_eval.py``, LLaVA's ``rule.json``): GPT-4 reads the question, a reference
#   answer and the model's answer and scores helpfulness, relevance, accuracy and level of detail on 1-10; the
#   reported number is model / reference * 100. ``judge_answers`` takes any callable with that contract; the
#   offline default ``rule_based_judge`` is a transparent word-overlap heuristic, *not* a language model, and
#   says so in every verdict (``judge="rule-based"``).

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "didnt": "didn't", "isnt": "isn't", "arent": "aren't",
                 "wasnt": "wasn't", "werent": "weren't", "cant": "can't", "wont": "won't", "couldnt": "couldn't",
                 "shouldnt": "shouldn't", "wouldnt": "wouldn't", "hasnt": "hasn't", "havent": "haven't",
                 "thats": "that's", "whats": "what's", "theres": "there's"}
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA = re.compile(r"\d,\d")
CLOSED_RULES = ("mention", "negation")


def normalize_answer(text: str) -> str:
    """Quilt-LLaVA's answer normalisation (see the notes above): punctuation, periods, number words, articles,
    contractions, commas; lowercase. ``"The Mucus-pools, two!"`` -> ``"mucus pools 2"``."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    s = text.lower()
    out = s
    for p in _PUNCT:  # decided per mark on the whole string, as the script does
        if (p + " " in s or " " + p in s) or _DIGIT_COMMA.search(s):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words).replace(",", "")


def _counts(text: str) -> dict[str, int]:
    c: dict[str, int] = {}
    for w in normalize_answer(text).split():
        c[w] = c.get(w, 0) + 1
    return c


def open_recall(prediction: str, reference: str, *, clip: bool = False) -> float:
    """Open-set recall of one answer (Quilt-LLaVA's ``recall``): tp / (tp + fn) over normalised unigrams.

    ``clip=False`` (the script): tp counts the answer's occurrences of ground-truth words (repetition inflates it);
    ``clip=True``: tp is clipped at the ground-truth count -- the share of ground-truth tokens the answer covers.
    """
    pred, ref = _counts(prediction), _counts(reference)
    if not pred or not ref:
        return 0.0
    tp = sum(min(n, ref[w]) if clip else n for w, n in pred.items() if w in ref)
    fn = sum(n for w, n in ref.items() if w not in pred)
    return tp / (tp + fn) if tp else 0.0


def closed_correct(prediction: str, reference: str, *, rule: str = "mention") -> bool:
    """Is a yes/no answer correct? ``rule="mention"``: the reference word is among the answer's words and the
    answer says yes or no (Quilt's "yes/no accuracy", LLaVA-Med's rule); ``rule="negation"``: the answer means
    "no" iff it contains the word no or not (Quilt's "2 yes/no accuracy")."""
    ref = normalize_answer(reference)
    if ref not in ("yes", "no"):
        raise ValueError(f"reference: a closed question needs the answer 'yes' or 'no', got {reference!r}")
    if rule not in CLOSED_RULES:
        raise ValueError(f"rule: expected one of {CLOSED_RULES}, got {rule!r}")
    words = normalize_answer(prediction).split()
    if rule == "mention":
        return ("yes" in words or "no" in words) and ref in words
    return ("no" if ("no" in words or "not" in words) else "yes") == ref


def score_vqa(predictions: Sequence[str], references: Sequence[str], closed: Sequence[bool], *,
              clip: bool = False) -> dict[str, float]:
    """Quilt-VQA scores of generated answers: ``closed_acc`` (rule "mention"), ``closed_acc_negation``,
    ``open_recall`` (means over the closed / open items; NaN when there are none) and the item counts."""
    if not len(predictions) == len(references) == len(closed):
        raise ValueError(f"predictions, references, closed: expected equal lengths, got {len(predictions)}, "
                         f"{len(references)}, {len(closed)}")
    c = [(p, r) for p, r, k in zip(predictions, references, closed) if k]
    o = [(p, r) for p, r, k in zip(predictions, references, closed) if not k]
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else float("nan")  # noqa: E731
    return {"closed_acc": mean([closed_correct(p, r) for p, r in c]),
            "closed_acc_negation": mean([closed_correct(p, r, rule="negation") for p, r in c]),
            "open_recall": mean([open_recall(p, r, clip=clip) for p, r in o]),
            "n_closed": float(len(c)), "n_open": float(len(o))}


JUDGE_CRITERIA = ("helpfulness", "relevance", "accuracy", "detail")


@dataclass
class JudgeVerdict:
    """One judged answer: scores 1-10 for the model's answer and for the reference, and who judged."""

    scores: dict[str, float]  # criterion -> 1..10 for the model's answer
    reference_scores: dict[str, float]  # criterion -> 1..10 for the reference answer
    judge: str  # "rule-based" for the offline default; a model name otherwise
    explanation: str = ""

    @property
    def score(self) -> float:
        return sum(self.scores.values()) / len(self.scores)

    @property
    def reference_score(self) -> float:
        return sum(self.reference_scores.values()) / len(self.reference_scores)


_STOP = {"is", "are", "was", "were", "be", "of", "in", "on", "at", "to", "and", "or", "with", "this", "that", "these",
         "those", "it", "its", "it's", "there", "here", "what", "which", "shown", "shows", "show", "see", "do", "does",
         "you", "i", "for", "by", "as", "from", "so", "most", "likely", "patch", "region", "image"}


def _content(text: str) -> set[str]:
    return {w for w in normalize_answer(text).replace(".", " ").split() if w not in _STOP}


def rule_based_judge(question: str, reference: str, answer: str, *,
                     key_terms: Sequence[str] = ()) -> JudgeVerdict:
    """A transparent, offline stand-in for the GPT-4 judge -- word overlap, **not** a language model:

    - accuracy  = 1 + 9 * (share of the reference's content words the answer contains), minus 3 for each
      ``key_terms`` phrase (e.g. tissue classes, diagnoses) the answer states that the reference does not (a
      hallucinated finding), floored at 1;
    - relevance = 1 + 9 * (share of the answer's content words that occur in the question or the reference);
    - detail    = 1 + 9 * min(1, answer content words / reference content words);
    - helpfulness = the mean of the three.
    The reference scores 10 on every criterion by construction; content words drop a short stop list.
    """
    ref, ans, q = _content(reference), _content(answer), _content(question)
    ans_text, ref_text = normalize_answer(answer), normalize_answer(reference)
    halluc = [t for t in key_terms if normalize_answer(t) in ans_text and normalize_answer(t) not in ref_text]
    acc = max(1.0, 1 + 9 * (len(ref & ans) / len(ref) if ref else 0.0) - 3 * len(halluc))
    rel = 1 + 9 * (len(ans & (q | ref)) / len(ans) if ans else 0.0)
    det = 1 + 9 * min(1.0, len(ans) / max(len(ref), 1))
    scores = {"accuracy": acc, "relevance": rel, "detail": det}
    scores = {"helpfulness": sum(scores.values()) / 3, **scores}
    why = f"rule-based word overlap (not a model); unsupported key terms: {halluc}" if halluc else \
        "rule-based word overlap (not a model)"
    return JudgeVerdict(scores, {k: 10.0 for k in JUDGE_CRITERIA}, "rule-based", why)


def judge_answers(questions: Sequence[str], references: Sequence[str], answers: Sequence[str],
                  judge: Callable[[str, str, str], JudgeVerdict] | None = None) -> dict[str, Any]:
    """Judge every answer with ``judge(question, reference, answer) -> JudgeVerdict`` (default:
    ``rule_based_judge``, labelled "rule-based"). Returns per-criterion means for the model and the reference,
    the relative score ``100 * model / reference`` (LLaVA / Quilt-LLaVA's summary number), the verdicts, and
    the judge's name."""
    if not len(questions) == len(references) == len(answers):
        raise ValueError(f"questions, references, answers: expected equal lengths, got {len(questions)}, "
                         f"{len(references)}, {len(answers)}")
    if not questions:
        raise ValueError("questions: expected at least one item")
    judge = judge or rule_based_judge
    if not callable(judge):
        raise TypeError(f"judge: expected a callable (question, reference, answer) -> JudgeVerdict, got "
                        f"{type(judge).__name__}")
    verdicts = [judge(q, r, a) for q, r, a in zip(questions, references, answers)]
    for v in verdicts:
        if not isinstance(v, JudgeVerdict) or set(v.scores) != set(JUDGE_CRITERIA):
            raise TypeError(f"judge: must return a JudgeVerdict scoring {JUDGE_CRITERIA}, got {v!r}")
    model = {k: sum(v.scores[k] for v in verdicts) / len(verdicts) for k in JUDGE_CRITERIA}
    ref = {k: sum(v.reference_scores[k] for v in verdicts) / len(verdicts) for k in JUDGE_CRITERIA}
    m, r = sum(model.values()) / 4, sum(ref.values()) / 4
    return {"model": model, "reference": ref, "relative": 100.0 * m / r, "judge": verdicts[0].judge,
            "verdicts": verdicts}


@dataclass
class InstructionItem:
    """One instruction-following test question about held-out patches."""

    slide_id: str
    kind: str  # "conversation", "detail" (detailed description) or "reasoning" (several patches -> diagnosis)
    boxes: list[tuple[int, int, int, int]]  # the patches shown with the question
    question: str
    reference: str  # the template answer (ground-truth based)


def instruction_test_split(slides: Sequence[Any], seed: int = 0) -> list[InstructionItem]:
    """The instruction-following test split (LLaVA-Med's conversation / detailed-description questions, plus
    Quilt-LLaVA's reasoning) from *held-out* narrated slides (``vlm_lab.data.pathology.make_narrated_slides`` with
    a seed stream disjoint from training). Detail questions ask for the findings of one patch, conversation
    questions for its tissue type, reasoning questions for the diagnosis from all the slide's patches."""
    from vlm_lab.data.pathology import generate_qa

    out = []
    for qa in generate_qa(slides, seed=seed):
        if qa.kind == "reasoning":
            kind = "reasoning"
        else:
            kind = "detail" if qa.question.lower().startswith("describe") else "conversation"
        out.append(InstructionItem(qa.slide_id, kind, list(qa.boxes), qa.question, qa.answer))
    return out
