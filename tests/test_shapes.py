"""The shapes world: determinism, held-out compositions, captions derivable from scenes, shift knobs."""
import re
from collections import Counter

import numpy as np
import pytest
import torch

from vlm_lab.data import shapes as sh
from vlm_lab.data.shapes import (
    COLOUR_RGB, COLOURS, HELDOUT_PAIRS, SHAPES, Scene, ShapeSpec, ShapesConfig, ShapesDataset,
    class_names, derive_caption, render,
)
from vlm_lab.data.transforms import check_image_tensor, denormalize, to_tensor, to_uint8

_MENTION = re.compile(r"(?:(small|large) )?(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")")
_REL = re.compile(r"(left of|right of|above|below)")


def _parse(caption):
    """Independent parser: [(size or None, colour, shape)], relation or None."""
    mentions = _MENTION.findall(caption)
    rel = _REL.findall(caption)
    return [(s or None, c, k) for s, c, k in mentions], (rel[0] if rel else None)


def _check_caption(scene, caption):
    mentions, rel = _parse(caption)
    assert len(mentions) == len(scene.shapes), caption
    specs = []
    for size, colour, shape in mentions:
        match = [i for i, s in enumerate(scene.shapes) if s.colour == colour and s.shape == shape]
        assert len(match) == 1, (caption, scene)
        if size is not None:
            assert scene.shapes[match[0]].size == size, (caption, scene)
        specs.append(match[0])
    if rel is not None:
        assert scene.relation(specs[0], specs[1]) == rel, (caption, scene)


def test_same_seed_same_pixels_different_seed_different():
    a = ShapesDataset("train", n=50, image_size=32, seed=3)
    b = ShapesDataset("train", n=50, image_size=32, seed=3)
    c = ShapesDataset("train", n=50, image_size=32, seed=4)
    for i in range(0, 50, 7):
        assert torch.equal(a[i]["pixel_values"], b[i]["pixel_values"])
        assert a[i]["caption"] == b[i]["caption"] and a[i]["scene"] == b[i]["scene"]
    differ = sum(not torch.equal(a[i]["pixel_values"], c[i]["pixel_values"]) for i in range(20))
    assert differ >= 18
    assert not torch.equal(a[0]["pixel_values"], a[1]["pixel_values"])
    # splits draw different scenes with the same seed
    d = ShapesDataset("all", n=50, image_size=32, seed=3)
    assert sum(a.scene(i) != d.scene(i) for i in range(20)) >= 18


def test_item_contract_and_render_is_pure():
    ds = ShapesDataset("all", n=10, image_size=30, seed=1)
    item = ds[-1]
    assert set(item) == {"pixel_values", "caption", "scene", "labels"}
    pv = item["pixel_values"]
    assert pv.dtype == torch.float32 and pv.shape == (3, 30, 30)
    check_image_tensor(pv, image_size=30, batched=False)
    assert torch.equal(pv, to_tensor(render(item["scene"])))
    assert np.array_equal(to_uint8(pv), render(item["scene"]))
    assert isinstance(item["labels"], int)
    with pytest.raises(IndexError):
        ds[10]


def test_heldout_compositions_never_in_train():
    ds = ShapesDataset("train", n=4000, seed=0)
    held = set(HELDOUT_PAIRS)
    seen = Counter()
    for i in range(len(ds)):
        for s in ds.scene(i).shapes:
            assert (s.colour, s.shape) not in held, (i, s)
            seen[(s.colour, s.shape)] += 1
    assert set(seen) == set(sh.compositions("train"))  # every training pair is used
    assert {c for c, _ in seen} == set(COLOURS) and {s for _, s in seen} == set(SHAPES)
    assert 0.15 <= len(held) / (len(COLOURS) * len(SHAPES)) <= 0.25


def test_heldout_split_is_single_shape_zero_shot_set():
    ds = ShapesDataset("heldout", n=400, image_size=32, seed=5)
    assert ds.class_names == class_names("heldout") == [f"{c} {s}" for c, s in sh.compositions("heldout")]
    assert "red circle" in ds.class_names and len(ds.class_names) == len(HELDOUT_PAIRS)
    counts = Counter()
    for i in range(len(ds)):
        scene = ds.scene(i)
        assert len(scene.shapes) == 1
        label = ds.class_names.index(scene.shapes[0].name)
        counts[label] += 1
    item = ds[0]
    assert ds.class_names[item["labels"]] == item["scene"].shapes[0].name
    expected = len(ds) / len(ds.class_names)
    assert min(counts.values()) > 0.6 * expected and max(counts.values()) < 1.4 * expected


def test_class_balance_train_single_shapes():
    ds = ShapesDataset("train", n=3400, seed=2, p_single=1.0)
    names = ds.class_names
    assert len(names) == len(COLOURS) * len(SHAPES) - len(HELDOUT_PAIRS)
    counts = Counter(names.index(ds.scene(i).shapes[0].name) for i in range(len(ds)))
    expected = len(ds) / len(names)
    assert len(counts) == len(names)
    assert min(counts.values()) > 0.55 * expected and max(counts.values()) < 1.5 * expected
    # two-shape scenes carry label -1
    two = ShapesDataset("train", n=20, image_size=16, p_single=0.0)
    assert all(two[i]["labels"] == -1 for i in range(5))


@pytest.mark.parametrize("split", ["train", "all", "heldout"])
def test_every_caption_derivable_from_its_scene(split):
    ds = ShapesDataset(split, n=1500, seed=7)
    templates = Counter()
    for i in range(len(ds)):
        scene = ds.scene(i)
        caption = derive_caption(scene)
        _check_caption(scene, caption)
        templates[(len(scene.shapes), scene.template)] += 1
    if split != "heldout":
        assert len(templates) == len(sh.SINGLE_TEMPLATES) + len(sh.PAIR_TEMPLATES)


def test_relation_geometry():
    a = ShapeSpec("circle", "red", "small", 3.0, x=5.0, y=20.0)
    b = ShapeSpec("square", "blue", "large", 5.0, x=25.0, y=22.0)
    c = ShapeSpec("star", "green", "small", 3.0, x=6.0, y=2.0)
    assert Scene((a, b), 32).relation(0, 1) == "left of"
    assert Scene((a, b), 32).relation(1, 0) == "right of"
    assert Scene((c, a), 32).relation(0, 1) == "above"
    assert Scene((a, c), 32).relation(0, 1) == "below"
    with pytest.raises(ValueError, match="a, b"):
        Scene((a, b), 32).relation(0, 0)


def test_two_shape_layout_matches_relation_in_pixels():
    """The rendered colour centroids agree with the relation the caption states."""
    ds = ShapesDataset("train", n=60, image_size=64, seed=11, p_single=0.0)
    checked = 0
    for i in range(len(ds)):
        scene = ds.scene(i)
        if scene.shapes[0].colour == scene.shapes[1].colour:
            continue
        checked += 1
        img = render(scene).astype(np.int32)
        cents = []
        for s in scene.shapes:
            mask = (np.abs(img - np.array(COLOUR_RGB[s.colour])).sum(-1) < 6)
            assert mask.sum() > 5, (i, scene)
            yy, xx = np.nonzero(mask)
            cents.append((xx.mean(), yy.mean()))
        (x0, y0), (x1, y1) = cents
        rel = scene.relation(0, 1)
        if rel == "left of":
            assert x0 < x1
        elif rel == "right of":
            assert x0 > x1
        elif rel == "above":
            assert y0 < y1
        else:
            assert y0 > y1
    assert checked > 40


def test_shape_drawn_at_its_record_with_its_colour():
    ds = ShapesDataset("all", n=80, image_size=48, seed=4, p_single=1.0)
    for i in range(len(ds)):
        s = ds.scene(i).shapes[0]
        img = render(ds.scene(i)).astype(np.int32)
        mask = np.abs(img - np.array(COLOUR_RGB[s.colour])).sum(-1) < 6
        yy, xx = np.nonzero(mask)
        assert len(xx) > 10
        if s.shape in ("circle", "ring", "square", "cross"):  # centrally symmetric
            assert abs(xx.mean() - s.x) < 1.0 and abs(yy.mean() - s.y) < 1.0, (i, s)
        assert np.all(img[0, 0] == 0) or s.x - s.radius < 2  # plain background is black


@pytest.mark.parametrize("knob", [{"background": "noise"}, {"background": "gradient"}, {"background": "stripes"},
                                  {"texture": True}, {"radius_scale": 0.5}, {"radius_scale": 1.6},
                                  {"max_rotation": 40.0}])
def test_shift_knobs_change_pixels_not_captions(knob):
    base = ShapesDataset("all", n=40, image_size=32, seed=9)
    shifted = ShapesDataset("all", n=40, image_size=32, seed=9, **knob)
    changed = 0
    for i in range(len(base)):
        a, b = base[i], shifted[i]
        assert a["caption"] == b["caption"] and a["labels"] == b["labels"]
        _check_caption(b["scene"], b["caption"])  # the geometry still supports the caption
        changed += not torch.equal(a["pixel_values"], b["pixel_values"])
    assert changed >= (20 if "max_rotation" in knob else 38)  # rotation leaves circles and rings unchanged


def test_radius_scale_moves_sizes_outside_training_range():
    def radii(**kw):
        ds = ShapesDataset("all", n=200, image_size=64, **kw)
        out = {"small": [], "large": []}
        for i in range(len(ds)):
            for s in ds.scene(i).shapes:
                out[s.size].append(s.radius)
        return out

    train, shrunk, grown = radii(), radii(radius_scale=0.5), radii(radius_scale=1.6)
    for word in ("small", "large"):
        assert max(shrunk[word]) < min(train[word])
        assert min(grown[word]) > max(train[word])


@pytest.mark.parametrize("size", [16, 17, 30, 448])
def test_image_sizes(size):
    ds = ShapesDataset("all", n=3, image_size=size, seed=0)
    for i in range(3):
        pv = ds[i]["pixel_values"]
        assert pv.shape == (3, size, size) and torch.isfinite(pv).all()
        img = render(ds.scene(i))
        assert img.dtype == np.uint8 and img.shape == (size, size, 3) and img.max() > 100


def test_bad_inputs_raise_naming_the_argument():
    with pytest.raises(ValueError, match="n:"):
        ShapesDataset(n=0)
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("test", n=5)
    for bad in (15, 449, 32.5, True):
        with pytest.raises(ValueError, match="image_size"):
            ShapesDataset(n=5, image_size=bad)
    with pytest.raises(ValueError, match="background"):
        ShapesConfig(background="fog")
    with pytest.raises(ValueError, match="radius_scale"):
        ShapesConfig(radius_scale=3.0)
    with pytest.raises(ValueError, match="p_single"):
        ShapesConfig(p_single=1.5)
    with pytest.raises(TypeError, match="unknown option"):
        ShapesDataset(n=5, colour="red")
    with pytest.raises(ValueError, match="colour"):
        ShapeSpec("circle", "pink", "small", 3.0, 5.0, 5.0)
    with pytest.raises(ValueError, match="shape"):
        ShapeSpec("hexagon", "red", "small", 3.0, 5.0, 5.0)
    with pytest.raises(ValueError, match="radius"):
        ShapeSpec("circle", "red", "small", -1.0, 5.0, 5.0)
    with pytest.raises(ValueError, match="heldout"):  # red would never be seen in training
        ShapesConfig(heldout=tuple(("red", s) for s in SHAPES))
    with pytest.raises(ValueError, match="heldout colour"):
        ShapesConfig(heldout=(("pink", "circle"),))


def test_transforms_round_trip_and_checks():
    img = render(ShapesDataset("all", n=1, image_size=20).scene(0))
    pv = to_tensor(img)
    assert torch.allclose(denormalize(pv) * 255, torch.from_numpy(img).permute(2, 0, 1).float(), atol=1e-3)
    check_image_tensor(pv[None], image_size=20)
    with pytest.raises(ValueError, match="4-d"):
        check_image_tensor(pv)
    with pytest.raises(ValueError, match="channels"):
        check_image_tensor(pv[None, :2])
    with pytest.raises(ValueError, match=r"\(20, 21\)"):
        check_image_tensor(pv[None], image_size=(20, 21))
    with pytest.raises(TypeError, match="floating"):
        check_image_tensor(pv[None].long())
    with pytest.raises(ValueError, match="NaN"):
        check_image_tensor(torch.full((1, 3, 4, 4), float("nan")))
    with pytest.raises(TypeError, match="pixel_values"):
        check_image_tensor(img)
    with pytest.raises(TypeError, match="uint8"):
        to_tensor(img.astype(np.float32))
