"""The shapes world: synthetic RGB scenes of one or two coloured shapes, with captions.

Every image is generated lazily from ``(seed, split, index)``, so ``ShapesDataset(n=100_000)`` costs
nothing until an item is read and the same index always gives the same pixels and caption.

A scene is first sampled as a frozen record (:class:`Scene` holding :class:`ShapeSpec` s); pixels come
from :func:`render` and captions from :func:`derive_caption`, both pure functions of the record. Later
tasks (VQA questions about attributes, existence, counting, relations) derive from the same record;
:meth:`Scene.relation` gives the spatial relation between two shapes.

Vocabulary: :data:`SHAPES` (6) x :data:`COLOURS` (7) x sizes ``small`` / ``large``.

Held-out compositions (zero-shot): the fixed list :data:`HELDOUT_PAIRS` (8 of the 42 colour-shape
pairs, 19 %) never appears in ``split="train"`` scenes -- neither alone nor as one of two shapes -- while
every colour and every shape still appears in training with other partners. ``split="heldout"`` is the
zero-shot test set: single-shape scenes of exactly those compositions, with class names such as
``"red circle"``. ``split="all"`` draws from all 42 pairs.

Distribution-shift knobs (for showing where CLIP breaks), all in :class:`ShapesConfig`:
``background`` ("plain" for training, "noise" / "gradient" / "stripes"), ``texture`` (striped shapes),
``radius_scale`` (sizes outside the training range), ``max_rotation``. The knobs never change which random
numbers are drawn for the scene layout, so for a given ``(seed, split, index)`` they change pixels but
never the caption.

Geometry: pixel coordinates, ``x`` to the right, ``y`` downwards, origin at the top-left pixel's centre.
Rendering is numpy only, anti-aliased by a one-pixel ramp on signed distance functions (after Inigo
Quilez's 2D SDFs): about 7k items per second at 32 px, 6k at 64 px and 1k at 224 px on one CPU core.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import to_tensor

__all__ = [
    "SHAPES",
    "COLOURS",
    "COLOUR_RGB",
    "SIZES",
    "RELATIONS",
    "BACKGROUNDS",
    "HELDOUT_PAIRS",
    "SINGLE_TEMPLATES",
    "PAIR_TEMPLATES",
    "ShapeSpec",
    "Scene",
    "ShapesConfig",
    "ShapesDataset",
    "sample_scene",
    "render",
    "derive_caption",
    "class_names",
    "compositions",
    "caption_corpus",
    "to_pil",
]

# ----------------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------------
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "white")
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
SIZES: tuple[str, ...] = ("small", "large")
#: radius range per size word, as a fraction of the image side (before ``radius_scale``).
SIZE_RADIUS: dict[str, tuple[float, float]] = {"small": (0.09, 0.13), "large": (0.17, 0.22)}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
BACKGROUNDS: tuple[str, ...] = ("plain", "noise", "gradient", "stripes")
SPLITS: tuple[str, ...] = ("train", "heldout", "all")

#: Colour-shape compositions never seen in training: every colour once except blue (twice), every shape
#: at most twice, so each colour keeps >= 4 and each shape >= 5 training partners.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "circle"),
    ("orange", "square"),
    ("yellow", "triangle"),
    ("green", "star"),
    ("blue", "cross"),
    ("purple", "ring"),
    ("white", "circle"),
    ("blue", "square"),
)

#: Captions of one-shape scenes. Fields: {size} {colour} {shape}.
SINGLE_TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape}",
    "a {colour} {shape}",
    "a picture of a {size} {colour} {shape}",
    "there is a {colour} {shape}",
    "one {size} {colour} {shape} on the background",
)
#: Captions of two-shape scenes. Fields {size0} {colour0} {shape0} describe shape 0, ... 1 shape 1;
#: {rel01} is ``scene.relation(0, 1)`` and {rel10} is ``scene.relation(1, 0)``.
PAIR_TEMPLATES: tuple[str, ...] = (
    "a {size0} {colour0} {shape0} {rel01} a {size1} {colour1} {shape1}",
    "a {colour0} {shape0} {rel01} a {colour1} {shape1}",
    "a {colour1} {shape1} {rel10} a {colour0} {shape0}",
    "a {size0} {colour0} {shape0} and a {size1} {colour1} {shape1}",
    "two shapes: a {colour0} {shape0} and a {colour1} {shape1}",
)


def _check_choice(value, allowed, name: str) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}")


# ----------------------------------------------------------------------------------------------------
# The scene record
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeSpec:
    """One shape in a scene. Positions and radius are in pixels of the scene's image."""

    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    size: str  # size word, "small" or "large" (the word used in captions)
    radius: float  # circumradius in pixels
    x: float  # centre, pixels from the left
    y: float  # centre, pixels from the top
    rotation: float = 0.0  # degrees, counter-clockwise as seen on screen; ignored for circle / ring

    def __post_init__(self) -> None:
        _check_choice(self.shape, SHAPES, "shape")
        _check_choice(self.colour, COLOURS, "colour")
        _check_choice(self.size, SIZES, "size")
        if not (self.radius > 0 and math.isfinite(self.radius)):
            raise ValueError(f"radius: expected a positive finite number of pixels, got {self.radius!r}")

    @property
    def name(self) -> str:
        """The composition / class name, e.g. ``"red circle"``."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Everything needed to render a scene and to derive its captions (and, later, questions)."""

    shapes: tuple[ShapeSpec, ...]  # one or two shapes, painted in this order
    image_size: int  # side of the square image, pixels
    background: str = "plain"  # one of BACKGROUNDS
    texture: bool = False  # striped texture on the shapes
    template: int = 0  # caption template index (SINGLE_TEMPLATES or PAIR_TEMPLATES by shape count)
    style_seed: int = 0  # seed for background noise / stripes / gradient colours and texture phase

    def __post_init__(self) -> None:
        if not isinstance(self.shapes, tuple):
            object.__setattr__(self, "shapes", tuple(self.shapes))
        if not 1 <= len(self.shapes) <= 2:
            raise ValueError(f"shapes: expected 1 or 2 ShapeSpec, got {len(self.shapes)}")
        if not all(isinstance(s, ShapeSpec) for s in self.shapes):
            raise TypeError("shapes: expected a sequence of ShapeSpec")
        _check_image_size(self.image_size)
        _check_choice(self.background, BACKGROUNDS, "background")
        n_templates = len(SINGLE_TEMPLATES if len(self.shapes) == 1 else PAIR_TEMPLATES)
        if not 0 <= self.template < n_templates:
            raise ValueError(f"template: expected an index in [0, {n_templates}), got {self.template}")

    def relation(self, a: int, b: int) -> str:
        """Spatial relation of shape ``a`` to shape ``b``: "left of", "right of", "above" or "below".

        The dominant axis of the centre displacement decides (ties go to left / right); "above" means
        a smaller ``y`` (higher on screen).
        """
        sa, sb = self.shapes[a], self.shapes[b]
        if a == b:
            raise ValueError(f"a, b: expected two different shape indices, got {a} and {b}")
        dx, dy = sb.x - sa.x, sb.y - sa.y
        if abs(dx) >= abs(dy):
            return "left of" if dx > 0 else "right of"
        return "above" if dy > 0 else "below"

    @property
    def label_name(self) -> str | None:
        """``"colour shape"`` for single-shape scenes, ``None`` otherwise."""
        return self.shapes[0].name if len(self.shapes) == 1 else None


def _check_image_size(image_size) -> None:
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or not 16 <= image_size <= 448:
        raise ValueError(f"image_size: expected an int in [16, 448], got {image_size!r}")


def derive_caption(scene: Scene) -> str:
    """The caption of ``scene`` (its template filled from the record)."""
    if len(scene.shapes) == 1:
        s = scene.shapes[0]
        return SINGLE_TEMPLATES[scene.template].format(size=s.size, colour=s.colour, shape=s.shape)
    s0, s1 = scene.shapes
    return PAIR_TEMPLATES[scene.template].format(
        size0=s0.size, colour0=s0.colour, shape0=s0.shape,
        size1=s1.size, colour1=s1.colour, shape1=s1.shape,
        rel01=scene.relation(0, 1), rel10=scene.relation(1, 0),
    )


# ----------------------------------------------------------------------------------------------------
# Configuration and compositions
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapesConfig:
    """How scenes are sampled and drawn. Defaults are the training distribution."""

    image_size: int = 64  # square image side in pixels, 16..448
    p_single: float = 0.5  # probability that a (train / all) scene has one shape, else two; heldout is always 1
    background: str = "plain"  # "plain" (black, training) | "noise" | "gradient" | "stripes" (shift)
    texture: bool = False  # True: shapes are striped instead of flat (shift)
    radius_scale: float = 1.0  # multiplies every radius; != 1 gives sizes outside training (shift), words unchanged
    max_rotation: float = 0.0  # shapes rotated uniformly in [-max_rotation, max_rotation] degrees
    heldout: tuple[tuple[str, str], ...] = HELDOUT_PAIRS  # (colour, shape) pairs kept out of split="train"

    def __post_init__(self) -> None:
        _check_image_size(self.image_size)
        if not 0.0 <= self.p_single <= 1.0:
            raise ValueError(f"p_single: expected a probability in [0, 1], got {self.p_single!r}")
        _check_choice(self.background, BACKGROUNDS, "background")
        if not isinstance(self.texture, bool):
            raise TypeError(f"texture: expected a bool, got {type(self.texture).__name__}")
        if not 0.25 <= self.radius_scale <= 2.0:
            raise ValueError(f"radius_scale: expected a value in [0.25, 2.0], got {self.radius_scale!r}")
        if not 0.0 <= self.max_rotation <= 180.0:
            raise ValueError(f"max_rotation: expected degrees in [0, 180], got {self.max_rotation!r}")
        held = tuple(tuple(p) for p in self.heldout)
        for colour, shape in held:
            _check_choice(colour, COLOURS, "heldout colour")
            _check_choice(shape, SHAPES, "heldout shape")
        object.__setattr__(self, "heldout", held)
        train = compositions("train", held)
        for c in COLOURS:
            if not any(p[0] == c for p in train):
                raise ValueError(f"heldout: colour {c!r} would never be seen in training")
        for s in SHAPES:
            if not any(p[1] == s for p in train):
                raise ValueError(f"heldout: shape {s!r} would never be seen in training")


def compositions(split: str = "all", heldout=HELDOUT_PAIRS) -> tuple[tuple[str, str], ...]:
    """(colour, shape) pairs of a split, in a fixed colour-major order."""
    _check_choice(split, SPLITS, "split")
    held = set(tuple(p) for p in heldout)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    if split == "train":
        return tuple(p for p in pairs if p not in held)
    if split == "heldout":
        return tuple(p for p in pairs if p in held)
    return tuple(pairs)


def class_names(split: str = "all", heldout=HELDOUT_PAIRS) -> list[str]:
    """Class names of a split, e.g. ``["red square", ...]``; ``labels`` index into this list."""
    return [f"{c} {s}" for c, s in compositions(split, heldout)]


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------
_SPLIT_CODE = {"train": 0, "heldout": 1, "all": 2}


def _scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SPLIT_CODE[split], int(index)])


def sample_scene(rng: np.random.Generator, config: ShapesConfig = ShapesConfig(), split: str = "train") -> Scene:
    """Sample one scene record.

    The random draws (their number and order) do not depend on ``background``, ``texture``,
    ``radius_scale`` or ``max_rotation``, so those knobs change pixels but not captions.
    """
    _check_choice(split, SPLITS, "split")
    S = config.image_size
    pairs = compositions(split, config.heldout)
    single = True if split == "heldout" else bool(rng.random() < config.p_single)
    n = 1 if single else 2
    # compositions: distinct pairs, each uniform over the split's pairs
    idx = rng.choice(len(pairs), size=n, replace=False)
    sizes = [SIZES[int(k)] for k in rng.integers(0, len(SIZES), size=n)]
    u_radius = rng.random(n)
    u_rot = rng.uniform(-1.0, 1.0, n)
    u_pos = rng.random((n, 2))
    horizontal = bool(rng.random() < 0.5)  # two shapes: separated along x (else y)
    u_cross = rng.uniform(-1.0, 1.0)
    n_templates = len(SINGLE_TEMPLATES if single else PAIR_TEMPLATES)
    template = int(rng.integers(0, n_templates))
    style_seed = int(rng.integers(0, 2**31 - 1))

    radii = []
    for size, u in zip(sizes, u_radius):
        lo, hi = SIZE_RADIUS[size]
        radii.append((lo + (hi - lo) * float(u)) * S * config.radius_scale)

    if single:
        r = radii[0]
        xy = [tuple(_span(r, S - 1 - r, float(t)) for t in u_pos[0])]
    else:
        r0, r1 = radii
        # along the separating axis: shape 0 before shape 1 (ordering of the pair is random already)
        gap = 0.04 * S
        lo0, hi1 = r0, S - 1 - r1
        need = r0 + r1 + gap
        if hi1 - lo0 >= need:
            a0 = _span(lo0, hi1 - need, float(u_pos[0, 0]))
            a1 = _span(a0 + need, hi1, float(u_pos[1, 0]))
        else:  # shapes too large to separate (radius_scale shift): extremes, may overlap
            a0, a1 = lo0, max(hi1, lo0 + 1.0)
        # across: common mean, small offset so the separating axis dominates
        rmax = max(r0, r1)
        m = _span(rmax, S - 1 - rmax, float(u_pos[0, 1]))
        d = 0.5 * (a1 - a0) * u_cross
        c0 = min(max(m - d / 2, r0), S - 1 - r0)
        c1 = min(max(m + d / 2, r1), S - 1 - r1)
        xy = [(a0, c0), (a1, c1)] if horizontal else [(c0, a0), (c1, a1)]

    specs = tuple(
        ShapeSpec(shape=pairs[int(k)][1], colour=pairs[int(k)][0], size=sizes[i], radius=radii[i],
                  x=float(xy[i][0]), y=float(xy[i][1]), rotation=float(u_rot[i]) * config.max_rotation)
        for i, k in enumerate(idx)
    )
    return Scene(shapes=specs, image_size=S, background=config.background, texture=config.texture,
                 template=template, style_seed=style_seed)


def _span(lo: float, hi: float, u: float) -> float:
    return lo + (hi - lo) * u if hi > lo else 0.5 * (lo + hi)


# ----------------------------------------------------------------------------------------------------
# Rendering (numpy)
# ----------------------------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ax = np.arange(size, dtype=np.float32)
    return ax[None, :], ax[:, None]  # x: (1, w), y: (h, 1)


def _sd_box(px, py, bx, by):
    qx, qy = np.abs(px) - bx, np.abs(py) - by
    outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
    return outside + np.minimum(np.maximum(qx, qy), 0)


def _sd_triangle(px, py, r):
    """Equilateral triangle, point up, circumradius ``r``; ``py`` is y-up here."""
    k = math.sqrt(3.0)
    h = r * k / 2.0  # half side
    px = np.abs(px) - h
    py = py + h / k
    flip = px + k * py > 0
    nx = np.where(flip, (px - k * py) / 2, px)
    ny = np.where(flip, (-k * px - py) / 2, py)
    nx = nx - np.clip(nx, -2 * h, 0)
    return -np.sqrt(nx * nx + ny * ny) * np.sign(ny)


def _sd_star5(px, py, r, rf=0.45):
    """Five-pointed star, outer radius ``r``, inner/outer ratio ``rf``; ``py`` is y-up here."""
    k1x, k1y = 0.809016994375, -0.587785252292
    k2x, k2y = -k1x, k1y
    px = np.abs(px)
    d = 2 * np.maximum(k1x * px + k1y * py, 0)
    px, py = px - d * k1x, py - d * k1y
    d = 2 * np.maximum(k2x * px + k2y * py, 0)
    px, py = px - d * k2x, py - d * k2y
    px = np.abs(px)
    py = py - r
    bax, bay = rf * -k1y, rf * k1x - 1.0
    h = np.clip((px * bax + py * bay) / (bax * bax + bay * bay), 0.0, r)
    ex, ey = px - bax * h, py - bay * h
    return np.sqrt(ex * ex + ey * ey) * np.sign(py * bax - px * bay)


def _shape_sdf(spec: ShapeSpec, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Signed distance (pixels, negative inside) on centred coordinates ``px`` (1, w), ``py`` (h, 1); y down."""
    r = spec.radius
    if spec.shape == "circle":
        return np.sqrt(px * px + py * py) - r
    if spec.shape == "ring":
        return np.abs(np.sqrt(px * px + py * py) - 0.7 * r) - 0.3 * r
    if spec.rotation:
        t = math.radians(spec.rotation)
        c, s = math.cos(t), math.sin(t)
        # rotate the sample points by -t (screen counter-clockwise rotation of the shape); broadcast to (h, w)
        px, py = c * px - s * py, s * px + c * py
    if spec.shape == "square":
        return _sd_box(px, py, 0.78 * r, 0.78 * r)
    if spec.shape == "cross":
        return np.minimum(_sd_box(px, py, r, 0.32 * r), _sd_box(px, py, 0.32 * r, r))
    if spec.shape == "triangle":
        return _sd_triangle(px, -py - 0.15 * r, 1.15 * r)  # nudge down: centroid looks high otherwise
    if spec.shape == "star":
        return _sd_star5(px, -py, 1.1 * r)
    raise ValueError(f"shape: unknown shape {spec.shape!r}")  # pragma: no cover - ShapeSpec validates


def _background(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    S = scene.image_size
    kind = scene.background
    if kind == "plain":
        return np.zeros((S, S, 3), np.float32)
    if kind == "noise":
        return rng.random((S, S, 3), dtype=np.float32) * 150.0
    x, y = _grid(S)
    theta = rng.uniform(0, 2 * math.pi)
    proj = (x * math.cos(theta) + y * math.sin(theta)) / S  # (h, w), roughly in [-1.4, 1.4]
    if kind == "gradient":
        c0 = rng.uniform(0, 160, 3).astype(np.float32)
        c1 = rng.uniform(0, 160, 3).astype(np.float32)
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
        return c0 + (c1 - c0) * t[..., None]
    if kind == "stripes":
        period = rng.uniform(0.08, 0.2)
        c0 = rng.uniform(60, 180, 3).astype(np.float32)
        on = (np.floor(proj / period) % 2).astype(np.float32)
        return on[..., None] * c0
    raise ValueError(f"background: unknown kind {kind!r}")  # pragma: no cover - Scene validates


def render(scene: Scene) -> np.ndarray:
    """Draw ``scene`` as a uint8 RGB image ``(h, w, 3)``; a pure function of the record."""
    S = scene.image_size
    rng = np.random.default_rng(scene.style_seed)
    img = _background(scene, rng)  # (h, w, 3) float32 in [0, 255]
    xs, ys = _grid(S)
    for spec in scene.shapes:
        pad = spec.radius * 1.45 + 2  # bounding box (star / cross / rotations included)
        x0, x1 = max(int(spec.x - pad), 0), min(int(math.ceil(spec.x + pad)) + 1, S)
        y0, y1 = max(int(spec.y - pad), 0), min(int(math.ceil(spec.y + pad)) + 1, S)
        if x0 >= x1 or y0 >= y1:
            continue
        px = xs[:, x0:x1] - spec.x  # (1, w')
        py = ys[y0:y1, :] - spec.y  # (h', 1)
        sd = _shape_sdf(spec, px, py)
        alpha = np.clip(0.5 - sd, 0.0, 1.0)  # one-pixel anti-aliasing ramp
        alpha = np.broadcast_to(alpha, (y1 - y0, x1 - x0))[..., None]  # (h', w', 1)
        colour = np.asarray(COLOUR_RGB[spec.colour], np.float32)
        if scene.texture:
            theta = rng.uniform(0, math.pi)
            period = max(spec.radius * 0.6, 2.0)
            phase = (px * math.cos(theta) + py * math.sin(theta)) / period
            shade = np.where(np.floor(phase) % 2 == 0, 1.0, 0.45).astype(np.float32)
            paint = np.broadcast_to(shade, alpha.shape[:2])[..., None] * colour  # (h', w', 3)
        else:
            paint = colour
        patch = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = patch + (paint - patch) * alpha
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def to_pil(item_or_scene):
    """A PIL image of a dataset item (its ``scene``), a :class:`Scene`, or a normalised ``(3, h, w)`` tensor."""
    from PIL import Image

    if isinstance(item_or_scene, dict):
        item_or_scene = item_or_scene["scene"]
    if isinstance(item_or_scene, Scene):
        return Image.fromarray(render(item_or_scene))
    if isinstance(item_or_scene, torch.Tensor):
        from .transforms import to_uint8

        return Image.fromarray(to_uint8(item_or_scene))
    raise TypeError(f"item_or_scene: expected a dataset item, a Scene or a tensor, got {type(item_or_scene).__name__}")


# ----------------------------------------------------------------------------------------------------
# Text corpus (for training tokenizers that know every word of the world)
# ----------------------------------------------------------------------------------------------------
#: Words of questions and answers the VQA tasks will use, so a tokenizer trained now covers them.
QUESTION_TEXTS: tuple[str, ...] = (
    "what colour is the {shape}?",
    "what shape is the {colour} object?",
    "is there a {colour} {shape}?",
    "how many shapes are there?",
    "how many {colour} shapes are there?",
    "where is the {shape}?",
    "is the {colour0} {shape0} {rel} the {colour1} {shape1}?",
    "what size is the {shape}?",
    "yes", "no", "zero", "one", "two", "three", "0", "1", "2", "3", "left", "right", "top", "bottom",
)


def caption_corpus(include_questions: bool = True) -> list[str]:
    """A deterministic list of texts that covers every template, colour, shape, size and relation.

    All single-shape captions, and every pair template with every relation over a cyclic cover of the
    pairs of compositions (so each word appears many times in many contexts).
    """
    texts: list[str] = []
    for t in SINGLE_TEMPLATES:
        for c in COLOURS:
            for s in SHAPES:
                for z in SIZES:
                    texts.append(t.format(size=z, colour=c, shape=s))
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    P = len(pairs)
    for ti, t in enumerate(PAIR_TEMPLATES):
        for ri, rel in enumerate(RELATIONS):
            inv = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[rel]
            for k in range(P):
                (c0, s0), (c1, s1) = pairs[k], pairs[(k * 5 + ti + ri + 1) % P]
                texts.append(t.format(size0=SIZES[k % 2], colour0=c0, shape0=s0,
                                      size1=SIZES[(k // 2 + ri) % 2], colour1=c1, shape1=s1,
                                      rel01=rel, rel10=inv))
    if include_questions:
        for q in QUESTION_TEXTS:
            for k, (c, s) in enumerate(pairs):
                c1, s1 = pairs[(k * 7 + 3) % P]
                texts.append(q.format(shape=s, colour=c, colour0=c, shape0=s, colour1=c1, shape1=s1,
                                      rel=RELATIONS[k % 4]))
    return texts


# ----------------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------------
class ShapesDataset(Dataset):
    """Map-style dataset of shapes scenes, generated lazily per index.

    Items are dicts: ``pixel_values`` float32 ``(3, h, w)`` normalised with CLIP's mean / std,
    ``caption`` str, ``scene`` :class:`Scene`, ``labels`` int (index into ``self.class_names`` for
    single-shape scenes, else ``-1``).

    Args:
        split: "train" (no held-out composition), "heldout" (single-shape scenes of the held-out
            compositions: the zero-shot test set) or "all".
        n: number of items.
        seed: base seed; item ``i`` is generated from ``(seed, split, i)``.
        config: a :class:`ShapesConfig`; keyword overrides (``image_size=32``, ``background="noise"``,
            ...) are applied on top of it.

    Example::

        ds = ShapesDataset("train", n=1000, image_size=32)
        item = ds[0]; item["caption"]   # e.g. 'a small green circle left of a large blue star'
    """

    def __init__(self, split: str = "train", n: int = 1000, seed: int = 0,
                 config: ShapesConfig | None = None, **overrides) -> None:
        _check_choice(split, SPLITS, "split")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"n: expected a positive int number of items, got {n!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        config = config if config is not None else ShapesConfig()
        if not isinstance(config, ShapesConfig):
            raise TypeError(f"config: expected a ShapesConfig, got {type(config).__name__}")
        known = {f.name for f in dataclasses.fields(ShapesConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"ShapesDataset got unknown option(s) {unknown}; expected fields of ShapesConfig: {sorted(known)}")
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        self.split = split
        self.n = int(n)
        self.seed = int(seed)
        self.class_names = class_names(split, self.config.heldout)
        self._label_of = {name: i for i, name in enumerate(self.class_names)}

    def __len__(self) -> int:
        return self.n

    def scene(self, index: int) -> Scene:
        """The scene record of item ``index`` (no rendering)."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index: expected an int, got {type(index).__name__}")
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(f"index: {index} out of range for a dataset of {self.n} items")
        return sample_scene(_scene_rng(self.seed, self.split, index), self.config, self.split)

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        name = scene.label_name
        return {
            "pixel_values": to_tensor(render(scene)),
            "caption": derive_caption(scene),
            "scene": scene,
            "labels": self._label_of[name] if name is not None else -1,
        }

    def image(self, index: int) -> np.ndarray:
        """uint8 ``(h, w, 3)`` image of item ``index``, for display."""
        return render(self.scene(index))

    def __repr__(self) -> str:
        c = self.config
        return (f"ShapesDataset(split={self.split!r}, n={self.n}, seed={self.seed}, image_size={c.image_size}, "
                f"background={c.background!r}, texture={c.texture}, radius_scale={c.radius_scale})")
