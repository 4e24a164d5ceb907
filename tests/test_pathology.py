"""The synthetic H&E world: determinism, balance, captions / answers derivable from the recorded ground truth,
cursor clustering, instruction and VQA splits, figure-panel curation."""
import re
from collections import Counter

import numpy as np
import pytest
import torch

from vlm_lab.data import pathology as P
from vlm_lab.data.pathology import (
    CLASSES, CLASS_NAMES, PROMPT_TEMPLATES, TRAIN_SYNONYMS, UNSEEN_SYNONYMS, PathologyTiles,
    caption_from_attributes, render_attributes, render_tile, sample_attributes,
)
from vlm_lab.data.transforms import to_uint8


# ---------------------------------------------------------------- an independent checker of generated text
def _syn_in(text: str) -> str | None:
    """Class whose (longest) synonym occurs in the text, by an independent scan."""
    best, blen = None, 0
    for c in CLASSES:
        for s in TRAIN_SYNONYMS[c] + UNSEEN_SYNONYMS[c]:
            if re.search(r"(?<![\w-])" + re.escape(s) + r"(?![\w-])", text, re.I) and len(s) > blen:
                best, blen = c, len(s)
    return best


def check_text_matches(attrs, text):
    """Every finding the text states must follow from attrs, and every recorded finding must be stated."""
    t = text.lower()
    assert _syn_in(text) == attrs.label, (attrs.label, text)
    assert ("parallel" in t) == (attrs.fibres == "parallel"), text
    assert ("wavy" in t) == (attrs.fibres == "wavy"), text
    assert ("goblet" in t) == (attrs.vacuoles == "goblet"), text
    assert ("vacuoles" in t or "clear cells" in t) == (attrs.vacuoles == "large"), text
    assert ("round crypts" in t or "test-tube crypts" in t) == (attrs.glands == "regular"), text
    assert ("angulated glands" in t or "back-to-back glands" in t) == (attrs.glands == "irregular"), text
    assert ("solid" in t) == (attrs.glands == "solid"), text
    assert ("basophilic mucin" in t or "pale-blue mucin" in t) == attrs.mucin, text
    assert ("dirty necrosis" in t or "necrotic material" in t) == attrs.necrosis, text
    if attrs.pleomorphism == "none":
        assert "pleomorphism" not in t, text
    else:
        words = {"mild": ["mild"], "marked": ["marked", "severe"]}[attrs.pleomorphism]
        assert any(f"{w} pleomorphism" in t for w in words), text
    if attrs.label != "BACK":
        assert f"{attrs.eosin} eosin staining" in t, text
    if attrs.nucleus_shape != "none" and attrs.label != "BACK":
        assert "nuclei" in t, text
        assert any(w in t for w in P._WORDS.get(attrs.nucleus_shape, (attrs.nucleus_shape,))), text
    else:
        assert "nuclei" not in t, text


# ---------------------------------------------------------------- tiles
def test_tiles_are_deterministic_and_seed_dependent():
    a, at = render_tile("TUM", 64, seed=5)
    b, bt = render_tile("TUM", 64, seed=5)
    c, _ = render_tile("TUM", 64, seed=6)
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
    assert np.array_equal(a, b) and at == bt
    assert not np.array_equal(a, c)
    for size in (28, 100, 448):
        img, _ = render_tile("NORM", size, seed=1)
        assert img.shape == (size, size, 3)


def test_dataset_items_balance_and_regeneration():
    ds = PathologyTiles(45, size=40, seed=3, return_image=True, caption_variants=3)
    again = PathologyTiles(45, size=40, seed=3, return_image=True, caption_variants=3)
    labels = []
    for i in range(len(ds)):
        it = ds[i]
        assert it["pixel_values"].dtype == torch.float32 and it["pixel_values"].shape == (3, 40, 40)
        assert np.array_equal(to_uint8(it["pixel_values"]), it["image"])  # normalised with transforms' mean/std
        at = it["attributes"]
        assert at.label == CLASSES[it["labels"]]
        # the record regenerates the attributes, the pixels and the caption
        assert sample_attributes(at.label, at.seed, at.size, at.stain_variation) == at
        assert np.array_equal(render_attributes(at), it["image"])
        assert it["caption"] == caption_from_attributes(at, (i // 9) % 3)
        assert it["caption"] == again[i]["caption"] and torch.equal(it["pixel_values"], again[i]["pixel_values"])
        labels.append(it["labels"])
    assert Counter(labels) == {k: 5 for k in range(9)}


def test_captions_follow_the_attributes_and_never_use_unseen_synonyms():
    generic = {"tissue", "cells", "cell", "no", "of", "growth"}
    unseen_words = {w for c in CLASSES for s in UNSEEN_SYNONYMS[c] for w in re.findall(r"[\w-]+", s.lower())}
    unseen_words -= generic
    train_words = {w for c in CLASSES for s in TRAIN_SYNONYMS[c] for w in re.findall(r"[\w-]+", s.lower())}
    assert not unseen_words & train_words  # lexically disjoint
    for c in CLASSES:
        for seed in range(8):
            at = sample_attributes(c, seed, 64)
            for v in range(3):
                cap = caption_from_attributes(at, v)
                check_text_matches(at, cap)
                assert not set(re.findall(r"[\w-]+", cap.lower())) & unseen_words, cap
    # asking for the unseen vocabulary does produce it (the split is a switch, not an accident)
    cap = caption_from_attributes(sample_attributes("ADI", 0, 64), 0, synonyms="unseen")
    assert _syn_in(cap) == "ADI" and any(s in cap.lower() for s in UNSEEN_SYNONYMS["ADI"])


def test_pixels_reflect_class_and_density():
    from skimage.color import rgb2hed

    def stats(label, seeds=range(6)):
        hs, whites = [], []
        for s in seeds:
            img, at = render_tile(label, 64, s, stain_variation=0.2)
            hs.append(rgb2hed(img)[..., 0].mean())
            whites.append((img.mean(-1) > 220).mean())
        return np.mean(hs), np.mean(whites)

    h_lym, w_lym = stats("LYM")
    h_str, _ = stats("STR")
    _, w_adi = stats("ADI")
    _, w_back = stats("BACK")
    assert h_lym > h_str  # crowded lymphocyte nuclei carry more haematoxylin than sparse stroma
    assert w_adi > 0.5 and w_back > 0.8 and w_lym < 0.2
    # within LYM, "crowded" tiles hold more haematoxylin than "dense" ones
    by = {"dense": [], "crowded": []}
    for s in range(16):
        img, at = render_tile("LYM", 64, s, stain_variation=0.0)
        by[at.density].append(rgb2hed(img)[..., 0].mean())
    assert by["dense"] and by["crowded"] and np.mean(by["crowded"]) > np.mean(by["dense"])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="label"):
        render_tile("XYZ", 64)
    with pytest.raises(ValueError, match="size"):
        render_tile("TUM", 20)
    with pytest.raises(ValueError, match="stain_variation"):
        PathologyTiles(9, stain_variation=1.5)
    with pytest.raises(ValueError, match="synonyms"):
        P.zero_shot_prompts("some")


def test_zero_shot_prompts():
    pr = P.zero_shot_prompts("unseen")
    assert set(pr) == set(CLASSES)
    assert len(pr["TUM"]) == len(UNSEEN_SYNONYMS["TUM"]) * len(PROMPT_TEMPLATES)
    assert "an image of cancer cells." in pr["TUM"]


# ---------------------------------------------------------------- slides, narratives, clustering
@pytest.fixture(scope="module")
def narrated():
    return P.make_narrated_slides(8, seed=1, height=160, width=224, tile_px=80)


def test_slides_are_consistent(narrated):
    again = P.make_slide(_seed := P._tile_seed(1, 0), height=160, width=224, tile_px=80,
                         diagnosis=list(P.DIAGNOSES)[0], slide_id="train-1-0")
    first = narrated[0].slide
    assert np.array_equal(again.image, first.image) and np.array_equal(again.region_map, first.region_map)
    for ns in narrated:
        sl = ns.slide
        ids = {r.id for r in sl.regions}
        assert set(np.unique(sl.region_map)) == ids
        assert sl.diagnosis == P.diagnose(r.label for r in sl.regions)
        for r in sl.regions:
            assert r.area == int((sl.region_map == r.id).sum())
    assert {ns.slide.diagnosis for ns in narrated} == set(P.DIAGNOSES)


def test_cursor_clustering_recovers_talked_regions(narrated):
    ag = [P.cluster_agreement(ns.slide, ns.narrative, ns.clusters) for ns in narrated]
    recall = np.mean([a["region_recall"] for a in ag])
    ari = np.mean([a["ari"] for a in ag])
    assert recall >= 0.9 and ari >= 0.7, ag
    # a clustering that ignores time and space (everything one cluster) does much worse
    ns = narrated[0]
    lumped = P.cluster_agreement(ns.slide, ns.narrative, np.zeros(len(ns.narrative.trace), int))
    assert lumped["ari"] < 0.2


def test_dbscan_on_a_known_case():
    rng = np.random.default_rng(0)
    blob1 = np.c_[np.arange(20) * 0.1, 50 + rng.normal(0, 2, 20), 50 + rng.normal(0, 2, 20)]
    blob2 = np.c_[5 + np.arange(20) * 0.1, 50 + rng.normal(0, 2, 20), 50 + rng.normal(0, 2, 20)]  # same place, later
    lone = np.array([[3.0, 300.0, 300.0]])
    lab = P.cluster_trace(np.concatenate([blob1, blob2, lone]), eps_px=10, eps_s=1.0, min_samples=4)
    assert len(set(lab[:20])) == 1 and len(set(lab[20:40])) == 1 and lab[0] != lab[20] and lab[-1] == -1
    with pytest.raises(ValueError, match="trace"):
        P.cluster_trace(np.zeros((5, 2)))


def test_patch_narratives_match_the_ground_truth(narrated):
    n = 0
    for ns in narrated:
        for p in ns.patches:
            region = next(r for r in ns.slide.regions if r.id == p.region_id)
            assert p.label == region.label
            assert _syn_in(p.text) == p.label, (p.label, p.text)
            x0, y0, x1, y1 = p.box
            assert p.image.shape == (y1 - y0, x1 - x0, 3)
            n += 1
    assert n >= len(narrated) * 2


def test_generate_qa_is_grounded(narrated):
    qa = P.generate_qa(narrated)
    kinds = Counter(q.kind for q in qa)
    assert kinds["independent"] >= 10 and kinds["reasoning"] == len(narrated)
    for q in qa:
        ns = next(n for n in narrated if n.slide.slide_id == q.slide_id)
        assert q.diagnosis == ns.slide.diagnosis
        if q.kind == "independent":
            p = next(p for p in ns.patches if p.box == q.boxes[0])
            region = next(r for r in ns.slide.regions if r.id == p.region_id)
            assert q.evidence == [region.label]
            check_text_matches(region.attributes, q.answer.removeprefix("This patch shows "))
        else:
            assert q.answer.endswith(f"the most likely diagnosis is {ns.slide.diagnosis}.")
            assert P.diagnose(r.label for r in ns.slide.regions) == ns.slide.diagnosis
            assert len(q.boxes) == len(ns.patches)

    seen = []

    def fake_llm(prompt: str) -> str:
        seen.append(prompt)
        return "LLM says: " + prompt.splitlines()[2]

    qa2 = P.generate_qa(narrated[:2], llm=fake_llm)
    assert all(q.source == "llm" and q.answer.startswith("LLM says: Ground truth") for q in qa2)
    assert len(seen) == len(qa2) and any("the diagnosis is" in s for s in seen)
    with pytest.raises(TypeError, match="llm"):
        P.generate_qa(narrated[:1], llm="gpt")


def test_vqa_eval_split_is_disjoint_and_correct():
    tr, qa, ev, vqa = P.make_instruction_splits(3, 3, seed=2, height=128, width=192, tile_px=64)
    assert not {n.slide.slide_id for n in tr} & {n.slide.slide_id for n in ev}
    assert not any(np.array_equal(a.slide.image, b.slide.image) for a in tr for b in ev)
    assert {q.slide_id for q in qa} <= {n.slide.slide_id for n in tr}
    by_id = {n.slide.slide_id: n for n in ev}
    closed = [v for v in vqa if v.closed]
    assert {v.answer for v in closed} == {"yes", "no"}
    assert any(not v.image_dependent for v in vqa) and any(not v.closed for v in vqa)
    for v in vqa:
        if not v.image_dependent:
            assert v.slide_id == "" and v.box is None
            continue
        ns = by_id[v.slide_id]
        if v.box is not None:
            label = next(p.label for p in ns.patches if p.box == v.box)
            if v.closed:
                asked = v.question.removeprefix("Does this patch show ").rstrip("?")
                assert (v.answer == "yes") == (asked == CLASS_NAMES[label])
            else:
                assert v.answer == CLASS_NAMES[label]
        elif v.closed:
            assert (v.answer == "yes") == (ns.slide.diagnosis in v.question)
        else:
            assert v.answer == ns.slide.diagnosis


# ---------------------------------------------------------------- figure-panel curation
def test_panel_curation_steps_and_accuracy():
    panels = [P.make_panel(i, tile_px=48) for i in range(16)]
    for p in panels:
        assert [s for _, s in P.split_caption(p.caption)] == p.subcaptions
        det = P.detect_subimages(p.image)
        if len(det) == len(p.boxes):  # detected in reading order = letter order
            assert all(P._iou(d, g) > 0.5 for d, g in zip(det, p.boxes)), (det, p.boxes)
        assert "BACK" not in p.labels
    sim = P.PrototypeSimilarity(size=48, n_per_class=6)
    res = P.evaluate_curation(panels, similarity=sim)
    assert res["split_accuracy"] == 1.0
    assert res["detection_recall"] >= 0.8
    assert res["alignment_accuracy"] >= 0.8 and res["alignment_accuracy"] > res["chance"] + 0.3, res

    # each step is replaceable: a similarity that knows nothing aligns at about chance
    rng = np.random.default_rng(0)
    rand = P.evaluate_curation(panels, similarity=lambda ims, txts: rng.random((len(ims), len(txts))))
    assert rand["alignment_accuracy"] < res["alignment_accuracy"] - 0.3
    with pytest.raises(ValueError, match="caption"):
        P.split_caption("no markers here")
    with pytest.raises(ValueError, match="similarity"):
        P.align_subcaptions([np.zeros((4, 4, 3), np.uint8)], ["a"], lambda i, t: np.zeros((2, 2)))
