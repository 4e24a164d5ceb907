"""A synthetic H&E world: tiles, captions, slides, narrated cursor traces, instruction Q/A and figure panels.

Everything the pathology chapters (CONCH, Quilt-LLaVA) need, generated offline and deterministically by seed,
with every caption and every answer derivable from a recorded ground truth.

What it imitates:

* **Tiles** — the nine tissue classes of NCT-CRC-HE-100K (Kather et al. 2019, PLoS Med; 224 px at 0.5 um/px,
  so one tile is a 112 um field of view): ADI adipose, BACK background, DEB debris, LYM lymphocytes, MUC mucus,
  MUS smooth muscle, NORM normal colon mucosa, STR cancer-associated stroma, TUM colorectal adenocarcinoma
  epithelium. A tile is drawn as haematoxylin and eosin *concentration maps* (nuclei, fibres, vacuoles, glands)
  mixed by the Beer-Lambert law with (jittered) stain optical-density vectors (Ruifrok & Johnston 2001), then
  blurred and noised like a scanner. The field of view is fixed, so a 28 px tile is a PathMNIST-like thumbnail
  of the same tissue a 224 px tile shows.
* **Captions** — attribute-grounded sentences with class synonyms and varied phrasing. ``CLASS_SYNONYMS`` are
  split into ``TRAIN_SYNONYMS`` (used in captions) and ``UNSEEN_SYNONYMS`` (never used in captions) so that
  zero-shot with synonyms x ``PROMPT_TEMPLATES`` (CONCH, Lu et al. 2024, Nat Med; templates from its
  supplementary prompt list) can test what language pretraining buys.
* **Slides and narratives** — a canvas of tissue regions with a diagnosis that follows from the region classes
  (:func:`diagnose`); a simulated narrator who moves a cursor and talks about regions (Quilt-1M's localized
  narratives, Ikezogwo et al. 2023); DBSCAN-style spatio-temporal clustering of the trace (the step
  Quilt-LLaVA, Seyfioglu et al. 2024, uses to ground narrative text in image regions).
* **Instruction data** — :func:`generate_qa` (Quilt-Instruct-style independent and reasoning Q/A, template or
  any callable LLM) and :func:`make_vqa_eval` (Quilt-VQA-style closed / open, image-dependent / general
  knowledge) on slides disjoint from the training slides.
* **CONCH curation in miniature** — multi-panel figures with one "(A) ... (B) ..." caption;
  :func:`detect_subimages`, :func:`split_caption` and :func:`align_subcaptions` are separate, replaceable steps.

Shape legend: ``h`` height, ``w`` width, ``n`` nuclei, ``s`` stamp side, ``t`` cursor samples, ``g`` glands.
Pixel arrays are uint8 ``(h, w, 3)``; region maps are int ``(h, w)``; cursor traces are float ``(t, 3)`` rows of
``(time_s, x_px, y_px)``.
"""
from __future__ import annotations

import math
import re
import zlib
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from torch.utils.data import Dataset

__all__ = [
    "CLASSES", "CLASS_NAMES", "CLASS_SYNONYMS", "TRAIN_SYNONYMS", "UNSEEN_SYNONYMS", "PROMPT_TEMPLATES",
    "DIAGNOSES", "StainParams", "TileAttributes", "sample_attributes", "render_tile", "render_attributes",
    "caption_from_attributes", "PathologyTiles", "zero_shot_prompts",
    "Region", "Slide", "make_slide", "diagnose", "Utterance", "Narrative", "narrate", "cluster_trace",
    "cluster_agreement", "NarrativePatch", "narrative_patches", "NarratedSlide", "make_narrated_slides",
    "QAPair", "generate_qa", "VQAItem", "make_vqa_eval", "make_instruction_splits",
    "Panel", "make_panel", "detect_subimages", "split_caption", "PrototypeSimilarity", "align_subcaptions",
    "evaluate_curation",
]

# ----------------------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------------------

#: The nine NCT-CRC-HE-100K class codes, in the dataset's (alphabetical) label order 0..8.
CLASSES: tuple[str, ...] = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")

#: A canonical readable name per class.
CLASS_NAMES: dict[str, str] = {
    "ADI": "adipose tissue", "BACK": "background", "DEB": "debris", "LYM": "lymphocytes", "MUC": "mucus",
    "MUS": "smooth muscle", "NORM": "normal colon mucosa", "STR": "cancer-associated stroma",
    "TUM": "colorectal adenocarcinoma epithelium",
}

#: Synonyms used in training captions (the canonical name first).
TRAIN_SYNONYMS: dict[str, tuple[str, ...]] = {
    "ADI": ("adipose tissue", "adipocytes", "adipose lobules"),
    "BACK": ("background", "blank area", "empty background"),
    "DEB": ("debris", "necrotic debris", "karyorrhectic debris"),
    "LYM": ("lymphocytes", "lymphoid aggregate", "lymphocytic infiltrate"),
    "MUC": ("mucus", "mucin pools", "extracellular mucin"),
    "MUS": ("smooth muscle", "muscularis propria", "smooth muscle bundles"),
    "NORM": ("normal colon mucosa", "benign colonic glands", "normal colonic crypts"),
    "STR": ("cancer-associated stroma", "desmoplastic stroma", "tumour stroma"),
    "TUM": ("colorectal adenocarcinoma epithelium", "adenocarcinoma", "tumour epithelium"),
}
#: Synonyms that never appear in any generated caption (lexically disjoint from the training ones), for
#: testing zero-shot transfer of language knowledge.
UNSEEN_SYNONYMS: dict[str, tuple[str, ...]] = {
    "ADI": ("fat", "fatty tissue"),
    "BACK": ("glass slide", "no tissue"),
    "DEB": ("dead cells", "cell remnants"),
    "LYM": ("immune cells", "white blood cells"),
    "MUC": ("slime", "gel-like secretion"),
    "MUS": ("contractile tissue", "myocytes"),
    "NORM": ("healthy intestinal lining", "healthy bowel tissue"),
    "STR": ("connective tissue", "fibrous tissue"),
    "TUM": ("cancer cells", "malignant growth"),
}
#: All synonyms per class: training ones then unseen ones.
CLASS_SYNONYMS: dict[str, tuple[str, ...]] = {c: TRAIN_SYNONYMS[c] + UNSEEN_SYNONYMS[c] for c in CLASSES}

#: CONCH-style zero-shot prompt templates; ``{}`` is replaced by a class synonym.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "{}.", "a photomicrograph showing {}.", "a photomicrograph of {}.", "an image of {}.",
    "an image showing {}.", "an example of {}.", "{} is shown.", "this is {}.", "there is {}.",
    "a histopathological image showing {}.", "a histopathological image of {}.", "presence of {}.",
    "{} is present.", "an H&E stained image of {}.", "an H&E image showing {}.", "{}, H&E stain.",
)

#: Diagnoses a slide can carry, with the rule :func:`diagnose` applies to its region classes.
DIAGNOSES: dict[str, str] = {
    "mucinous adenocarcinoma": "tumour epithelium together with pools of extracellular mucin",
    "adenocarcinoma": "tumour epithelium without extracellular mucin",
    "lymphoid hyperplasia": "no tumour, with a dense lymphoid aggregate",
    "normal colonic mucosa": "no tumour and no lymphoid aggregate",
}


def zero_shot_prompts(synonyms: str | dict[str, Sequence[str]] = "unseen",
                      templates: Sequence[str] = PROMPT_TEMPLATES) -> dict[str, list[str]]:
    """Class code -> list of prompts (synonyms x templates), for prompt-ensembled zero-shot classification.

    ``synonyms`` is ``"train"``, ``"unseen"``, ``"all"``, ``"names"`` (canonical name only) or an explicit dict.
    """
    table = _synonym_table(synonyms)
    return {c: [t.format(s) for s in table[c] for t in templates] for c in CLASSES}


def _synonym_table(synonyms: str | dict[str, Sequence[str]]) -> dict[str, Sequence[str]]:
    if isinstance(synonyms, dict):
        missing = [c for c in CLASSES if c not in synonyms]
        if missing:
            raise ValueError(f"synonyms: dict is missing classes {missing}")
        return synonyms
    options = {"train": TRAIN_SYNONYMS, "unseen": UNSEEN_SYNONYMS, "all": CLASS_SYNONYMS,
               "names": {c: (CLASS_NAMES[c],) for c in CLASSES}}
    if synonyms not in options:
        raise ValueError(f"synonyms: expected one of {sorted(options)} or a dict, got {synonyms!r}")
    return options[synonyms]


# ----------------------------------------------------------------------------------------------------------
# Attributes
# ----------------------------------------------------------------------------------------------------------

# Ruifrok & Johnston optical-density vectors (skimage.color.hed_from_rgb rows), made unit length.
_H_OD = np.array([0.65, 0.70, 0.29])
_E_OD = np.array([0.10, 0.92, 0.33])
_REF = 224.0  # reference tile side: a tile always shows a 224 px @ 0.5 um/px field of view


@dataclass(frozen=True)
class StainParams:
    """Stain and scanner variation of one tile or slide (numbers are what the renderer uses)."""

    h_od: tuple[float, float, float]  # haematoxylin RGB optical-density vector (unit length)
    e_od: tuple[float, float, float]  # eosin RGB optical-density vector (unit length)
    h_gain: float                     # multiplier on haematoxylin concentration (staining strength)
    e_gain: float                     # multiplier on eosin concentration
    white: float                      # scanner white level in (0, 1]
    blur_ref: float                   # scanner blur sigma in reference (224-tile) pixels
    noise: float                      # sensor noise std on the [0, 1] intensity scale


def _sample_stain(rng: np.random.Generator, variation: float) -> StainParams:
    v = float(variation)
    h = _H_OD + v * 0.12 * rng.standard_normal(3)
    e = _E_OD + v * 0.12 * rng.standard_normal(3)
    h, e = np.abs(h) / np.linalg.norm(h), np.abs(e) / np.linalg.norm(e)
    return StainParams(
        h_od=tuple(round(float(x), 4) for x in h), e_od=tuple(round(float(x), 4) for x in e),
        h_gain=round(float(np.exp(v * 0.3 * rng.standard_normal())), 4),
        e_gain=round(float(np.exp(v * 0.3 * rng.standard_normal())), 4),
        white=round(float(1.0 - v * 0.12 * rng.random()), 4),
        blur_ref=round(float(0.4 + v * 1.2 * rng.random()), 4),
        noise=round(float(0.005 + v * 0.02 * rng.random()), 4),
    )


@dataclass(frozen=True)
class TileAttributes:
    """The recorded ground truth of one tile: categorical findings (what captions say) and render numbers.

    ``sample_attributes(label, seed, size, stain_variation)`` regenerates it exactly; ``render_attributes``
    redraws the same pixels; ``caption_from_attributes`` rewrites the same caption.
    """

    label: str                 # class code, one of CLASSES
    seed: int                  # seed every random choice of this tile derives from
    size: int                  # tile side in pixels (field of view is fixed: 112 um)
    stain_variation: float     # amount of stain / scanner variation in [0, 1]
    density: str               # nuclear density: absent, sparse, moderate, dense, crowded
    nucleus_size: str          # none, tiny, small, medium, large
    nucleus_shape: str         # none, round, oval, spindle, flattened, irregular, fragmented
    pleomorphism: str          # none, mild, marked
    fibres: str                # none, wavy, parallel
    vacuoles: str              # none, goblet, large
    glands: str                # none, regular, irregular, solid
    eosin: str                 # pale, pink, deep pink
    mucin: bool                # extracellular mucin present
    necrosis: bool             # necrotic debris present
    stain: StainParams         # stain / scanner numbers
    params: dict[str, float] = field(default_factory=dict)  # numeric render parameters (counts, radii, angles)

    @property
    def label_id(self) -> int:
        return CLASSES.index(self.label)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_EOSIN_LEVEL = {"pale": 0.28, "pink": 0.45, "deep pink": 0.68}


def _choice(rng: np.random.Generator, options: Sequence, p: Sequence[float] | None = None):
    return options[int(rng.choice(len(options), p=p))]


def _check_label(label: str) -> str:
    if label not in CLASSES:
        raise ValueError(f"label: expected one of {CLASSES}, got {label!r}")
    return label


def _check_size(size: int, name: str = "size", lo: int = 28, hi: int = 448) -> int:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool):
        raise TypeError(f"{name}: expected an int, got {type(size).__name__}")
    if not lo <= size <= hi:
        raise ValueError(f"{name}: expected {lo} <= {name} <= {hi}, got {size}")
    return int(size)


def sample_attributes(label: str, seed: int, size: int = 224, stain_variation: float = 0.5) -> TileAttributes:
    """Draw the ground-truth attributes of one tile of class ``label`` (deterministic in all arguments)."""
    _check_label(label)
    size = _check_size(size)
    if not 0.0 <= float(stain_variation) <= 1.0:
        raise ValueError(f"stain_variation: expected a float in [0, 1], got {stain_variation}")
    rng = np.random.default_rng([int(seed), CLASSES.index(label), 1])
    stain = _sample_stain(rng, stain_variation)
    u = lambda a, b: round(float(rng.uniform(a, b)), 3)  # noqa: E731
    a: dict[str, Any] = dict(density="absent", nucleus_size="none", nucleus_shape="none", pleomorphism="none",
                             fibres="none", vacuoles="none", glands="none", eosin="pink", mucin=False,
                             necrosis=False)
    p: dict[str, float] = {}
    if label == "ADI":
        a.update(density="sparse", nucleus_size="small", nucleus_shape="flattened", vacuoles="large",
                 eosin=_choice(rng, ["pale", "pink"]))
        p.update(n_cells=u(5, 13), membrane=u(1.2, 2.6), n_nuclei=int(rng.integers(3, 10)))
    elif label == "BACK":
        a.update(eosin="pale")
        p.update(tint=u(0.0, 0.06), n_specks=int(rng.integers(0, 6)), haze=u(0.0, 0.05))
    elif label == "DEB":
        a.update(density=_choice(rng, ["moderate", "dense"]), nucleus_size="tiny", nucleus_shape="fragmented",
                 necrosis=True, mucin=bool(rng.random() < 0.3), eosin=_choice(rng, ["pink", "deep pink"]))
        p.update(n_fragments=int(rng.integers(110, 170) if a["density"] == "moderate" else rng.integers(190, 280)),
                 n_nuclei=int(rng.integers(4, 16)), empty=u(0.05, 0.3))
    elif label == "LYM":
        a.update(density=_choice(rng, ["dense", "crowded"]), nucleus_size="small", nucleus_shape="round",
                 eosin="pale")
        p.update(n_nuclei=int(rng.integers(150, 200) if a["density"] == "dense" else rng.integers(220, 290)),
                 radius=u(5.0, 6.2))
    elif label == "MUC":
        a.update(density=_choice(rng, ["absent", "sparse"]), mucin=True, eosin="pale",
                 nucleus_shape="round", nucleus_size="small")
        if a["density"] == "absent":
            a.update(nucleus_shape="none", nucleus_size="none")
        p.update(n_nuclei=0 if a["density"] == "absent" else int(rng.integers(2, 8)), wisp=u(0.3, 0.8),
                 angle=u(0, math.pi))
    elif label == "MUS":
        a.update(density=_choice(rng, ["sparse", "moderate"]), nucleus_size="medium", nucleus_shape="spindle",
                 fibres="parallel", eosin=_choice(rng, ["pink", "deep pink"], p=[0.3, 0.7]))
        p.update(n_nuclei=int(rng.integers(18, 32) if a["density"] == "sparse" else rng.integers(36, 55)),
                 angle=u(0, math.pi), period=u(5.0, 8.0))
    elif label == "NORM":
        a.update(density="moderate", nucleus_size="small", nucleus_shape="oval", pleomorphism="none",
                 vacuoles="goblet", glands="regular", eosin=_choice(rng, ["pale", "pink"]))
        p.update(n_glands=int(rng.integers(2, 4)), gland_radius=u(38, 52), n_lp=int(rng.integers(15, 40)))
    elif label == "STR":
        a.update(density="sparse", nucleus_size="medium", nucleus_shape="spindle", fibres="wavy",
                 eosin=_choice(rng, ["pale", "pink"], p=[0.4, 0.6]))
        p.update(n_nuclei=int(rng.integers(8, 24)), angle=u(0, math.pi), period=u(8.0, 13.0), wave=u(0.6, 1.5))
    elif label == "TUM":
        a.update(density="crowded", nucleus_size="large", nucleus_shape="irregular",
                 pleomorphism=_choice(rng, ["mild", "marked"], p=[0.35, 0.65]),
                 glands=_choice(rng, ["irregular", "solid"], p=[0.7, 0.3]), necrosis=bool(rng.random() < 0.3),
                 eosin=_choice(rng, ["pink", "deep pink"]))
        p.update(n_nuclei=int(rng.integers(150, 230)), n_glands=int(rng.integers(2, 5)), gland_radius=u(50, 75),
                 irregularity=0.12 if a["pleomorphism"] == "mild" else 0.3)
    return TileAttributes(label=label, seed=int(seed), size=size, stain_variation=float(stain_variation),
                          stain=stain, params=p, **a)


# ----------------------------------------------------------------------------------------------------------
# Rendering: concentration maps -> RGB
# ----------------------------------------------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, h: int, w: int, feature_px: float) -> np.ndarray:
    """Zero-mean unit-std noise with features about ``feature_px`` pixels across, float32 (h, w)."""
    f = max(float(feature_px), 1.0)
    gh, gw = int(math.ceil(h / f)) + 3, int(math.ceil(w / f)) + 3
    coarse = rng.standard_normal((gh, gw))
    if f >= 8:  # cubic to a quarter resolution, then bilinear: smooth curves at ~1/10 of the cost
        up = ndimage.zoom(ndimage.zoom(coarse, f / 4, order=3, prefilter=False), 4, order=1)[:h, :w]
    else:
        up = ndimage.zoom(coarse, f, order=3, prefilter=False)[:h, :w]
    if up.shape != (h, w):  # zoom rounds; pad by edge values if a pixel short
        up = np.pad(up, ((0, h - up.shape[0]), (0, w - up.shape[1])), mode="edge")
    up = up - up.mean()
    return (up / (up.std() + 1e-6)).astype(np.float32)


def _stamp_nuclei(hmap: np.ndarray, cx, cy, a, b, theta, dark, irregular, rng: np.random.Generator,
                  soft: float) -> None:
    """Draw ``n`` elliptical nuclei into the haematoxylin map (in place, max-compositing), vectorised.

    cx, cy centre (px); a, b semi-axes (px); theta orientation; dark peak concentration; irregular outline
    perturbation amplitude. All arrays ``(n,)``.
    """
    n = len(cx)
    if n == 0:
        return
    h, w = hmap.shape
    r = int(math.ceil(float(np.max(a)) * (1 + float(np.max(irregular))) + 2 * soft + 1))
    off = np.arange(-r, r + 1)
    dy, dx = np.meshgrid(off, off, indexing="ij")                       # (s, s)
    ix = np.floor(cx).astype(np.int64)[:, None, None] + dx[None]         # (n, s, s)
    iy = np.floor(cy).astype(np.int64)[:, None, None] + dy[None]         # (n, s, s)
    fx = ix + 0.5 - cx[:, None, None]
    fy = iy + 0.5 - cy[:, None, None]
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u = (fx * c + fy * s) / a[:, None, None]
    v = (-fx * s + fy * c) / b[:, None, None]
    rad = np.sqrt(u * u + v * v)
    phi = np.arctan2(v, u)
    ph = rng.uniform(0, 2 * math.pi, size=(n, 2))
    wobble = 1 + irregular[:, None, None] * (0.6 * np.cos(2 * phi + ph[:, 0, None, None])
                                             + 0.4 * np.cos(3 * phi + ph[:, 1, None, None]))
    edge_px = (rad / wobble - 1.0) * b[:, None, None]                    # ~signed distance to outline in px
    val = dark[:, None, None] / (1.0 + np.exp(np.clip(edge_px / soft, -30, 30)))
    val = val * (0.85 + 0.15 * rng.random(val.shape))                    # chromatin granularity
    ok = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h) & (val > 0.02)
    np.maximum.at(hmap, (iy[ok], ix[ok]), val[ok].astype(hmap.dtype))


def _fibres(rng, h, w, scale, angle, period_ref, wave, sharp=2.0) -> np.ndarray:
    """Oriented (optionally wavy) fibre texture in [0, 1], float32 (h, w)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    across = -xx * math.sin(angle) + yy * math.cos(angle)
    period = period_ref * scale
    warp = wave * period * _smooth_noise(rng, h, w, 40 * scale)
    f = 0.5 + 0.5 * np.cos(2 * math.pi * (across + warp) / period)
    breaks = 0.75 + 0.25 * np.cos(2 * math.pi * along / (60 * scale) + 3 * _smooth_noise(rng, h, w, 25 * scale))
    return (f ** sharp * breaks).astype(np.float32)


def _nuclei_args(rng, n, a_ref, b_ref, scale, jitter=0.12):
    a = np.asarray(a_ref, float) * scale * np.exp(jitter * rng.standard_normal(n))
    b = np.asarray(b_ref, float) * scale * np.exp(jitter * rng.standard_normal(n))
    return a, np.minimum(a, b)


def _area_factor(h: int, w: int, scale: float) -> float:
    """How many reference-tile fields of view an (h, w) canvas at ``scale`` covers."""
    return (h * w) / (scale * scale * _REF * _REF)


def _draw_layers(at: TileAttributes, h: int, w: int, scale: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin concentration maps, float32 (h, w) each, for attributes ``at``."""
    p, lab = at.params, at.label
    H = np.zeros((h, w), np.float32)
    E = np.full((h, w), _EOSIN_LEVEL[at.eosin], np.float32)
    E *= 1 + 0.15 * _smooth_noise(rng, h, w, 30 * scale)
    area = _area_factor(h, w, scale)
    soft = max(0.6 * scale, 0.45)
    count = lambda k: int(round(k * area))  # noqa: E731
    ones = lambda n, v: np.full(n, v, float)  # noqa: E731
    if lab == "ADI":
        n_cells = max(count(p["n_cells"]), 1)
        pts = rng.uniform(0, 1, (n_cells, 2)) * (w, h)
        yy, xx = np.mgrid[0:h, 0:w]
        d, _ = cKDTree(pts).query(np.stack([xx.ravel(), yy.ravel()], 1), k=2)
        gap = (d[:, 1] - d[:, 0]).reshape(h, w)                                # (h*w,) -> (h, w)
        memb = np.exp(-(gap / (p["membrane"] * scale + 0.3)) ** 2)
        E = (E * 0.9 * memb).astype(np.float32)
        n = count(p["n_nuclei"])
        if n:
            # nuclei sit on membranes: push random points onto the nearest membrane by picking high-memb pixels
            idx = rng.choice(h * w, size=n, p=(memb.ravel() ** 4) / (memb.ravel() ** 4).sum())
            a, b = _nuclei_args(rng, n, 7.0, 2.0, scale)
            _stamp_nuclei(H, idx % w + 0.5, idx // w + 0.5, a, b, rng.uniform(0, math.pi, n), ones(n, 0.8),
                          ones(n, 0.05), rng, soft)
    elif lab == "BACK":
        E = (p["tint"] + p["haze"] * np.clip(_smooth_noise(rng, h, w, 60 * scale), 0, None)).astype(np.float32)
        H += 0.3 * p["tint"]
        n = count(p["n_specks"])
        if n:
            a, b = _nuclei_args(rng, n, 2.5, 1.5, scale, 0.4)
            _stamp_nuclei(H, rng.uniform(0, w, n), rng.uniform(0, h, n), a, b, rng.uniform(0, math.pi, n),
                          ones(n, 0.35), ones(n, 0.3), rng, soft)
    elif lab == "DEB":
        mott = _smooth_noise(rng, h, w, 6 * scale)
        E = E * np.clip(1 + 0.45 * mott, 0.2, None)
        E = E * (_smooth_noise(rng, h, w, 35 * scale) > (1.6 - 3.2 * p["empty"]) * -1)  # holes
        H += 0.12 * np.clip(_smooth_noise(rng, h, w, 4 * scale), 0, None)               # smudgy basophilia
        if at.mucin:
            E = E * 0.6
            H += 0.08
        n = count(p["n_fragments"])
        a, b = _nuclei_args(rng, n, 2.2, 1.6, scale, 0.35)
        _stamp_nuclei(H, rng.uniform(0, w, n), rng.uniform(0, h, n), a, b, rng.uniform(0, math.pi, n),
                      rng.uniform(0.7, 1.3, n), ones(n, 0.4), rng, soft)
        n = count(p["n_nuclei"])
        a, b = _nuclei_args(rng, n, 5.0, 4.0, scale)
        _stamp_nuclei(H, rng.uniform(0, w, n), rng.uniform(0, h, n), a, b, rng.uniform(0, math.pi, n),
                      ones(n, 0.9), ones(n, 0.2), rng, soft)
    elif lab == "LYM":
        n = count(p["n_nuclei"])
        a, b = _nuclei_args(rng, n, p["radius"], p["radius"] * 0.92, scale, 0.08)
        _stamp_nuclei(H, rng.uniform(0, w, n), rng.uniform(0, h, n), a, b, rng.uniform(0, math.pi, n),
                      rng.uniform(1.0, 1.3, n), ones(n, 0.05), rng, soft)
    elif lab == "MUC":
        wisp = _fibres(rng, h, w, scale, p["angle"], 30.0, 1.5, sharp=1.0)
        E = (0.10 + 0.1 * p["wisp"] * wisp + 0.04 * _smooth_noise(rng, h, w, 20 * scale)).astype(np.float32)
        H += (0.16 + 0.12 * p["wisp"] * wisp).astype(np.float32)
        n = count(p["n_nuclei"])
        if n:
            a, b = _nuclei_args(rng, n, 5.0, 4.0, scale)
            _stamp_nuclei(H, rng.uniform(0, w, n), rng.uniform(0, h, n), a, b, rng.uniform(0, math.pi, n),
                          ones(n, 0.7), ones(n, 0.1), rng, soft)
    elif lab in ("MUS", "STR"):
        wave = 0.08 if lab == "MUS" else p["wave"]
        fib = _fibres(rng, h, w, scale, p["angle"], p["period"], wave, sharp=1.5 if lab == "MUS" else 2.0)
        if lab == "STR":  # collagen: broken, uneven bundles
            fib = fib * np.clip(0.7 + 0.5 * _smooth_noise(rng, h, w, 12 * scale), 0, 1.2)
        E = E * (0.55 + 0.6 * fib) if lab == "MUS" else E * (0.25 + 1.1 * fib)
        n = count(p["n_nuclei"])
        a, b = _nuclei_args(rng, n, 12.0 if lab == "MUS" else 10.0, 2.8 if lab == "MUS" else 2.2, scale, 0.15)
        spread = 0.08 if lab == "MUS" else 0.5
        _stamp_nuclei(H, rng.uniform(0, w, n), rng.uniform(0, h, n), a, b,
                      p["angle"] + spread * rng.standard_normal(n), rng.uniform(0.7, 1.0, n), ones(n, 0.05),
                      rng, soft)
    elif lab in ("NORM", "TUM"):
        ng = max(count(p["n_glands"]), 1)
        rad = p["gland_radius"] * scale * np.exp(0.12 * rng.standard_normal(ng))    # (g,)
        cen = rng.uniform(0, 1, (ng, 2)) * (w, h)                                     # (g, 2)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        dxg = xx[None] - cen[:, 0, None, None]                                        # (g, h, w)
        dyg = yy[None] - cen[:, 1, None, None]
        irr = p.get("irregularity", 0.03)
        ang = np.arctan2(dyg, dxg)
        ph = rng.uniform(0, 2 * math.pi, (ng, 3))
        wob = 1 + irr * (np.cos(3 * ang + ph[:, 0, None, None]) + np.cos(5 * ang + ph[:, 1, None, None]))
        rn = np.sqrt(dxg ** 2 + dyg ** 2) / (rad[:, None, None] * wob)               # normalised radius
        rmin = rn.min(0)                                                               # (h, w)
        lumen, epi = rmin < 0.5, (rmin >= 0.5) & (rmin < 1.0)
        if lab == "NORM":
            E = np.where(lumen, 0.03, np.where(epi, E * 0.8, E * 0.75)).astype(np.float32)
            # goblet cells: clear round vacuoles in the epithelial ring
            per = 12
            t = rng.uniform(0, 2 * math.pi, (ng, per))
            gx = (cen[:, 0, None] + 0.68 * rad[:, None] * np.cos(t)).ravel()
            gy = (cen[:, 1, None] + 0.68 * rad[:, None] * np.sin(t)).ravel()
            gob = np.zeros((h, w), np.float32)
            ga, gb = _nuclei_args(rng, gx.size, 4.5, 3.8, scale)
            _stamp_nuclei(gob, gx, gy, ga, gb, t.ravel(), np.ones(gx.size), np.full(gx.size, 0.05), rng, soft)
            E = E * (1 - 0.9 * gob)
            H += 0.1 * gob  # faint mucin tint in goblets
            per = 34
            t = (np.arange(per) / per * 2 * math.pi)[None] + rng.uniform(0, 1, (ng, 1)) + \
                0.03 * rng.standard_normal((ng, per))
            nx = (cen[:, 0, None] + 0.9 * rad[:, None] * np.cos(t)).ravel()
            ny = (cen[:, 1, None] + 0.9 * rad[:, None] * np.sin(t)).ravel()
            a, b = _nuclei_args(rng, nx.size, 5.5, 3.0, scale, 0.08)
            _stamp_nuclei(H, nx, ny, a, b, t.ravel(), np.full(nx.size, 0.9), np.full(nx.size, 0.04), rng, soft)
            n = count(p["n_lp"])  # lamina propria: scattered lymphocytes / plasma cells outside the crypts
            cx, cy = rng.uniform(0, w, n), rng.uniform(0, h, n)
            keep = rmin[np.clip(cy.astype(int), 0, h - 1), np.clip(cx.astype(int), 0, w - 1)] > 1.05
            a, b = _nuclei_args(rng, int(keep.sum()), 4.5, 4.2, scale, 0.08)
            _stamp_nuclei(H, cx[keep], cy[keep], a, b, np.zeros(int(keep.sum())), np.full(int(keep.sum()), 0.95),
                          np.full(int(keep.sum()), 0.05), rng, soft)
        else:  # TUM: crowded, enlarged, pleomorphic nuclei; irregular glands or solid sheets; dirty necrosis
            solid = at.glands == "solid"
            epi_mask = ~lumen if solid else (rmin < 1.25) & ~lumen
            if solid:
                lumen = np.zeros_like(lumen)
            E = np.where(lumen, 0.05, np.where(epi_mask, E * 0.9, E * 0.7)).astype(np.float32)
            if at.necrosis:
                nec = lumen & (_smooth_noise(rng, h, w, 5 * scale) > 0)
                E = np.where(nec, 0.55, E).astype(np.float32)
                H += np.where(nec, 0.15, 0.0).astype(np.float32)
            n = count(p["n_nuclei"])
            cand = np.flatnonzero(epi_mask.ravel())
            if cand.size and n:
                idx = rng.choice(cand, size=n)
                pl = 0.12 if at.pleomorphism == "mild" else 0.3
                a, b = _nuclei_args(rng, n, 9.0, 6.0, scale, pl)
                _stamp_nuclei(H, idx % w + rng.uniform(0, 1, n), idx // w + rng.uniform(0, 1, n), a, b,
                              rng.uniform(0, math.pi, n), rng.uniform(0.75, 1.25 if pl > 0.2 else 1.0, n),
                              np.full(n, p["irregularity"]), rng, soft)
    return H, E


def _to_rgb(H: np.ndarray, E: np.ndarray, st: StainParams, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Beer-Lambert mix of concentration maps -> uint8 (h, w, 3), then scanner blur and noise."""
    od = (H[..., None] * (st.h_gain * 1.6) * np.asarray(st.h_od, np.float32)
          + E[..., None] * (st.e_gain * 1.3) * np.asarray(st.e_od, np.float32))       # (h, w, 3)
    img = st.white * np.exp(-od)
    sigma = st.blur_ref * scale
    if sigma > 0.25:
        img = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0))
    img = img + st.noise * rng.standard_normal(img.shape).astype(np.float32)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def render_attributes(attrs: TileAttributes) -> np.ndarray:
    """Draw the tile recorded in ``attrs``: uint8 (size, size, 3). Same attributes, same pixels."""
    if not isinstance(attrs, TileAttributes):
        raise TypeError(f"attrs: expected TileAttributes, got {type(attrs).__name__}")
    rng = np.random.default_rng([attrs.seed, attrs.label_id, 2])
    scale = attrs.size / _REF
    H, E = _draw_layers(attrs, attrs.size, attrs.size, scale, rng)
    return _to_rgb(H, E, attrs.stain, scale, rng)


def render_tile(label: str, size: int = 224, seed: int = 0,
                stain_variation: float = 0.5) -> tuple[np.ndarray, TileAttributes]:
    """Render one tile of class ``label``: ``(uint8 image (size, size, 3), TileAttributes)``."""
    attrs = sample_attributes(label, seed, size, stain_variation)
    return render_attributes(attrs), attrs


# ----------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------

_WORDS = {  # attribute value -> interchangeable phrasings
    "crowded": ("crowded", "tightly packed", "densely crowded"),
    "dense": ("dense", "numerous", "closely set"),
    "moderate": ("moderately cellular", "evenly spaced"),
    "sparse": ("sparse", "scattered", "few"),
    "tiny": ("tiny",), "small": ("small",), "medium": ("medium-sized",), "large": ("large", "enlarged"),
    "round": ("round", "regular round"), "oval": ("oval", "basally located oval"),
    "spindle": ("spindle-shaped", "elongated", "cigar-shaped"), "flattened": ("flattened", "compressed"),
    "irregular": ("irregular", "hyperchromatic", "vesicular"), "fragmented": ("fragmented", "karyorrhectic"),
    "mild": ("mild",), "marked": ("marked", "severe"),
}


def _w(rng: np.random.Generator, key: str) -> str:
    return _choice(rng, _WORDS.get(key, (key,)))


def _findings(at: TileAttributes, rng: np.random.Generator) -> list[str]:
    """Attribute-grounded finding phrases (each phrase derives from one or two recorded attributes)."""
    out: list[str] = []
    if at.nucleus_shape != "none" and at.label != "BACK":
        nuc = f"{_w(rng, at.density)} {_w(rng, at.nucleus_size)} {_w(rng, at.nucleus_shape)} nuclei"
        extra = []
        if at.label in ("LYM", "TUM") and rng.random() < 0.5:
            extra.append("scant cytoplasm")
        if at.pleomorphism != "none":
            extra.append(f"{_w(rng, at.pleomorphism)} pleomorphism")
        out.append(nuc + (f" with {_join(extra)}" if extra else ""))
    if at.fibres == "parallel":
        out.append(_choice(rng, ["parallel bundles of eosinophilic fibres", "long parallel fascicles"]))
    elif at.fibres == "wavy":
        out.append(_choice(rng, ["wavy collagen fibres", "loose wavy collagen bands"]))
    if at.vacuoles == "large":
        out.append(_choice(rng, ["large empty vacuoles", "large clear cells with thin membranes"]))
    elif at.vacuoles == "goblet":
        out.append(_choice(rng, ["goblet cells", "mucin-filled goblet cells"]))
    if at.glands == "regular":
        out.append(_choice(rng, ["regular round crypts", "evenly spaced test-tube crypts"]))
    elif at.glands == "irregular":
        out.append(_choice(rng, ["irregular, angulated glands", "distorted, back-to-back glands"]))
    elif at.glands == "solid":
        out.append(_choice(rng, ["solid sheets of cells without lumina", "solid nests"]))
    if at.mucin:
        out.append(_choice(rng, ["pale basophilic mucin", "wispy pale-blue mucin"]))
    if at.necrosis:
        out.append(_choice(rng, ["dirty necrosis", "granular necrotic material"]))
    if at.label == "BACK":
        out.append(_choice(rng, ["no cells", "no cellular material", "an empty field"]))
    out.append(f"{at.eosin} eosin staining" if at.label != "BACK" else "a pale, nearly colourless field")
    return out


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


_CAPTION_TEMPLATES = (
    "{Findings}, consistent with {name}.",
    "H&E section showing {name}: {findings}.",
    "{Name} with {findings}.",
    "This tile shows {name}, with {findings}.",
    "Photomicrograph of {name}; {findings}.",
)


def caption_from_attributes(attrs: TileAttributes, variant: int = 0,
                            synonyms: str | dict[str, Sequence[str]] = "train") -> str:
    """A descriptive caption derived only from ``attrs`` (``variant`` picks synonym and phrasing)."""
    table = _synonym_table(synonyms)
    rng = np.random.default_rng([attrs.seed, attrs.label_id, 3, int(variant)])
    name = _choice(rng, list(table[attrs.label]))
    findings = _findings(attrs, rng)
    order = rng.permutation(len(findings) - 1) if len(findings) > 2 else np.arange(len(findings) - 1)
    fs = _join([findings[i] for i in order] + [findings[-1]])
    tpl = _choice(rng, _CAPTION_TEMPLATES)
    cap = tpl.format(name=name, Name=name[0].upper() + name[1:], findings=fs, Findings=fs[0].upper() + fs[1:])
    return cap


# ----------------------------------------------------------------------------------------------------------
# Tile dataset
# ----------------------------------------------------------------------------------------------------------

def _tile_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


class PathologyTiles(Dataset):
    """Map-style dataset of synthetic H&E tiles, exactly class-balanced (item ``i`` has class ``i % 9``).

    Items are dicts: ``pixel_values`` float32 (3, size, size) normalised with ``vlm_lab.data.transforms``
    (CLIP mean / std), ``caption`` (str), ``labels`` (int, index into ``CLASSES``), ``attributes``
    (:class:`TileAttributes`), and ``image`` (uint8 (size, size, 3)) when ``return_image=True``.

    Args:
        n: number of tiles.
        size: tile side in pixels, 28..448.
        seed: dataset seed; tile ``i`` uses seed ``SeedSequence([seed, i])``.
        stain_variation: stain / scanner variation in [0, 1].
        synonyms: which synonyms captions draw from ("train" keeps UNSEEN_SYNONYMS out of every caption).
        classes: subset of class codes to draw (default all nine).
        caption_variants: number of phrasings to cycle through; tile ``i`` uses variant
            ``(i // n_classes) % caption_variants`` (1 = the same phrasing style for every tile seed).
        cache: keep rendered items in memory (tiles are cheap; caching pays off for many epochs).
    """

    def __init__(self, n: int, size: int = 64, seed: int = 0, stain_variation: float = 0.5,
                 synonyms: str | dict[str, Sequence[str]] = "train", classes: Sequence[str] | None = None,
                 caption_variants: int = 1, return_image: bool = False, cache: bool = False) -> None:
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n: expected a positive int, got {n!r}")
        self.n, self.size, self.seed = int(n), _check_size(size), int(seed)
        self.stain_variation = float(stain_variation)
        if not 0.0 <= self.stain_variation <= 1.0:
            raise ValueError(f"stain_variation: expected a float in [0, 1], got {stain_variation}")
        self.classes = tuple(CLASSES if classes is None else classes)
        for c in self.classes:
            _check_label(c)
        _synonym_table(synonyms)
        self.synonyms = synonyms
        self.caption_variants = max(int(caption_variants), 1)
        self.return_image = return_image
        self._cache: dict[int, dict] | None = {} if cache else None

    def __len__(self) -> int:
        return self.n

    def attributes(self, index: int) -> TileAttributes:
        label = self.classes[index % len(self.classes)]
        return sample_attributes(label, _tile_seed(self.seed, index), self.size, self.stain_variation)

    def __getitem__(self, index: int) -> dict:
        if not -self.n <= index < self.n:
            raise IndexError(f"index: expected in [0, {self.n}), got {index}")
        index = index % self.n
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        from vlm_lab.data.transforms import to_tensor
        at = self.attributes(index)
        img = render_attributes(at)
        variant = (index // len(self.classes)) % self.caption_variants
        item = {"pixel_values": to_tensor(img), "caption": caption_from_attributes(at, variant, self.synonyms),
                "labels": CLASSES.index(at.label), "attributes": at}
        if self.return_image:
            item["image"] = img
        if self._cache is not None:
            self._cache[index] = item
        return item


# ----------------------------------------------------------------------------------------------------------
# Slides
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Region:
    """One tissue region of a slide."""

    id: int                          # index into Slide.regions; value in Slide.region_map
    label: str                       # class code
    attributes: TileAttributes       # findings used to render (and describe) this region
    centroid: tuple[float, float]    # (x, y) in pixels
    area: int                        # pixels


@dataclass
class Slide:
    """A whole-slide-like canvas of regions with a ground-truth diagnosis."""

    slide_id: str
    image: np.ndarray                # uint8 (h, w, 3)
    region_map: np.ndarray           # int (h, w), values are Region.id
    regions: list[Region]
    diagnosis: str                   # key of DIAGNOSES, = diagnose(region labels)
    scale: float                     # pixels per reference pixel (tile_px / 224)


_DIAG_CLASSES = {  # required classes, optional classes
    "mucinous adenocarcinoma": (("TUM", "MUC"), ("STR", "DEB", "MUS", "ADI")),
    "adenocarcinoma": (("TUM", "STR"), ("DEB", "MUS", "NORM", "ADI")),
    "lymphoid hyperplasia": (("LYM", "NORM"), ("MUS", "ADI", "STR")),
    "normal colonic mucosa": (("NORM",), ("MUS", "ADI", "STR")),
}


def diagnose(labels: Iterable[str]) -> str:
    """The ground-truth rule from region classes to diagnosis (see ``DIAGNOSES``)."""
    s = set(labels)
    if "TUM" in s:
        return "mucinous adenocarcinoma" if "MUC" in s else "adenocarcinoma"
    return "lymphoid hyperplasia" if "LYM" in s else "normal colonic mucosa"


def make_slide(seed: int, height: int = 256, width: int = 384, tile_px: int = 96,
               diagnosis: str | None = None, n_regions: int | None = None, stain_variation: float = 0.3,
               slide_id: str | None = None) -> Slide:
    """Compose a slide of ``n_regions`` Voronoi-like regions (wobbly borders) whose classes imply ``diagnosis``.

    ``tile_px`` sets magnification: a 224-px NCT-CRC field of view spans ``tile_px`` pixels of the canvas.
    """
    _check_size(height, "height", 64, 4096)
    _check_size(width, "width", 64, 4096)
    rng = np.random.default_rng([int(seed), 7])
    if diagnosis is None:
        diagnosis = _choice(rng, list(_DIAG_CLASSES))
    if diagnosis not in _DIAG_CLASSES:
        raise ValueError(f"diagnosis: expected one of {list(_DIAG_CLASSES)}, got {diagnosis!r}")
    required, optional = _DIAG_CLASSES[diagnosis]
    k = n_regions or int(rng.integers(len(required) + 2, len(required) + 4))
    if k < len(required):
        raise ValueError(f"n_regions: diagnosis {diagnosis!r} needs at least {len(required)} regions, got {k}")
    extra = [optional[i] for i in rng.integers(0, len(optional), k - len(required))]
    labels = list(required) + extra
    rng.shuffle(labels)
    # region seeds on a jittered grid so regions are reasonably sized
    cols = int(math.ceil(math.sqrt(k * width / height)))
    rows = int(math.ceil(k / cols))
    cells = rng.permutation(rows * cols)[:k]
    pts = np.stack([(cells % cols + rng.uniform(0.25, 0.75, k)) * width / cols,
                    (cells // cols + rng.uniform(0.25, 0.75, k)) * height / rows], 1)   # (k, 2) x, y
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    amp = 0.08 * min(height, width)
    wx = xx + amp * _smooth_noise(rng, height, width, min(height, width) / 4)
    wy = yy + amp * _smooth_noise(rng, height, width, min(height, width) / 4)
    _, rmap = cKDTree(pts).query(np.stack([wx.ravel(), wy.ravel()], 1))
    rmap = rmap.reshape(height, width).astype(np.int32)                                  # (h*w,) -> (h, w)
    scale = tile_px / _REF
    img = np.zeros((height, width, 3), np.uint8)
    regions: list[Region] = []
    stain = None
    for rid, lab in enumerate(labels):
        at = sample_attributes(lab, int(rng.integers(2**31)), 224, stain_variation)
        if stain is None:
            stain = at.stain  # one slide, one staining run and scanner
        at = replace(at, stain=stain)
        mask = rmap == rid
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        rr = np.random.default_rng([int(seed), 8, rid])
        H, E = _draw_layers(at, int(y1 - y0), int(x1 - x0), scale, rr)
        patch = _to_rgb(H, E, stain, scale, rr)
        sub = mask[y0:y1, x0:x1]
        img[y0:y1, x0:x1][sub] = patch[sub]
        regions.append(Region(rid, lab, at, (float(xs.mean()), float(ys.mean())), int(mask.sum())))
    present = [r.label for r in regions]
    return Slide(slide_id or f"slide-{seed}", img, rmap, regions, diagnose(present), scale)


# ----------------------------------------------------------------------------------------------------------
# Narrator and cursor clustering
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Utterance:
    start: float          # seconds
    end: float            # seconds
    text: str
    region_id: int        # region talked about; -1 for the closing summary


@dataclass
class Narrative:
    """What the simulated narrator said and where the cursor was."""

    slide_id: str
    trace: np.ndarray             # float (t, 3): time_s, x_px, y_px
    segment: np.ndarray           # int (t,): index of the talked-about dwell each sample belongs to, -1 transit
    utterances: list[Utterance]
    talked_regions: list[int]     # region ids in the order they were discussed


_OPENERS = ("Here we see {}", "In this area there is {}", "Looking at this part, this is {}",
            "Now moving over here, we have {}", "This region shows {}")


def narrate(slide: Slide, seed: int = 0, n_talk: int | None = None, hz: float = 10.0,
            hesitate: float = 0.3) -> Narrative:
    """Simulate a pathologist narrating ``slide``: dwell on regions (cursor jitter) and sweep between them.

    With probability ``hesitate`` per sweep the cursor pauses silently on the way (a distractor that
    clustering may pick up, as real traces do).

    Every region carrying a diagnostic class is discussed; the narration ends with a summary stating the
    diagnosis. Utterances are derived from the discussed region's attributes.
    """
    rng = np.random.default_rng([int(seed), 11, zlib.crc32(slide.slide_id.encode())])
    key = {"TUM", "MUC", "LYM", "NORM"}
    ids = [r.id for r in slide.regions]
    must = [r.id for r in slide.regions if r.label in key]
    rest = [i for i in ids if i not in must]
    rng.shuffle(rest)
    k = len(must) + (int(rng.integers(0, len(rest) + 1)) if n_talk is None else max(n_talk - len(must), 0))
    k = min(max(k, 2), len(ids))  # always at least two regions, so there is something to reason across
    talk = list(must) + rest[: max(k - len(must), 0)]
    rng.shuffle(talk)
    by_id = {r.id: r for r in slide.regions}
    h, w = slide.region_map.shape
    t, rows, seg, utt = 0.0, [], [], []
    pos = np.array([w / 2, h / 2])
    dt = 1.0 / hz
    for si, rid in enumerate(talk):
        mask = slide.region_map == rid
        dist = ndimage.distance_transform_edt(mask)
        ys, xs = np.nonzero(dist >= 0.6 * dist.max())
        j = int(rng.integers(len(xs)))
        anchor = np.array([xs[j], ys[j]], float)
        # transit: a quick straight sweep (few, widely spaced samples)
        n_tr = int(rng.integers(3, 7))
        stop = int(rng.integers(1, n_tr + 1)) if rng.random() < hesitate else -1
        for k, f in enumerate(np.linspace(0, 1, n_tr + 2)[1:-1]):
            p = pos + f * (anchor - pos)
            rows.append((t, *p)); seg.append(-1); t += dt
            if k + 1 == stop:  # the narrator hesitates mid-sweep without talking: a distractor cluster
                for q in rng.standard_normal((int(rng.integers(6, 12)), 2)) * 2.0:
                    rows.append((t, *(p + q))); seg.append(-1); t += dt
        # dwell: slow jitter around the anchor, clipped to the region's safe radius
        dur = float(rng.uniform(3.0, 6.0))
        n = int(dur * hz)
        r = max(2.0, 0.35 * float(dist.max()))
        walk = np.cumsum(rng.standard_normal((n, 2)) * 1.2, 0)
        walk = walk - walk.mean(0)
        norm = np.linalg.norm(walk, axis=1, keepdims=True)
        walk = np.where(norm > r, walk / norm * r, walk)
        start = t
        for q in walk:
            rows.append((t, *(anchor + q))); seg.append(si); t += dt
        reg = by_id[rid]
        name = _choice(rng, list(TRAIN_SYNONYMS[reg.label]))
        fs = _join(_findings(reg.attributes, rng))
        utt.append(Utterance(round(start, 3), round(t, 3), f"{_choice(rng, _OPENERS).format(name)}, with {fs}.",
                             rid))
        pos = anchor
        t += float(rng.uniform(0.3, 1.0))
    summary = (f"Putting this together, the findings are in keeping with {slide.diagnosis}, "
               f"since there is {DIAGNOSES[slide.diagnosis]}.")
    utt.append(Utterance(round(t, 3), round(t + 3.0, 3), summary, -1))
    trace = np.asarray(rows, float).reshape(-1, 3)
    return Narrative(slide.slide_id, trace, np.asarray(seg, int), utt, talk)


def cluster_trace(trace: np.ndarray, eps_px: float = 20.0, eps_s: float = 1.0,
                  min_samples: int = 5) -> np.ndarray:
    """DBSCAN on (x/eps_px, y/eps_px, t/eps_s): cluster id per cursor sample, -1 for noise.

    Points within unit distance in the scaled space are neighbours; points with >= ``min_samples`` neighbours
    (themselves included) are core; clusters are connected components of core points, plus border points
    attached to a core neighbour (Ester et al. 1996).
    """
    trace = np.asarray(trace, float)
    if trace.ndim != 2 or trace.shape[1] != 3:
        raise ValueError(f"trace: expected shape (T, 3) of (time_s, x_px, y_px), got {trace.shape}")
    if eps_px <= 0 or eps_s <= 0:
        raise ValueError(f"eps_px, eps_s: expected positive values, got {eps_px}, {eps_s}")
    n = len(trace)
    if n == 0:
        return np.zeros(0, int)
    z = np.stack([trace[:, 1] / eps_px, trace[:, 2] / eps_px, trace[:, 0] / eps_s], 1)   # (t, 3)
    pairs = cKDTree(z).query_pairs(1.0, output_type="ndarray")                           # (p, 2)
    deg = np.bincount(pairs.ravel(), minlength=n) + 1
    core = deg >= min_samples
    cp = pairs[core[pairs[:, 0]] & core[pairs[:, 1]]]
    adj = coo_matrix((np.ones(len(cp)), (cp[:, 0], cp[:, 1])), shape=(n, n))
    _, comp = connected_components(adj, directed=False)
    labels = np.full(n, -1)
    ids = {c: i for i, c in enumerate(dict.fromkeys(comp[core]))}
    labels[core] = [ids[c] for c in comp[core]]
    for i, j in pairs:  # border points
        if core[i] and not core[j] and labels[j] < 0:
            labels[j] = labels[i]
        elif core[j] and not core[i] and labels[i] < 0:
            labels[i] = labels[j]
    return labels


def _ari(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985) between two labelings."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    m = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(m, (ai, bi), 1)
    c2 = lambda x: (x * (x - 1) / 2).sum()  # noqa: E731
    s, sa, sb, tot = c2(m), c2(m.sum(1)), c2(m.sum(0)), c2(np.array([len(a)], float))
    exp = sa * sb / tot if tot else 0.0
    den = 0.5 * (sa + sb) - exp
    return float((s - exp) / den) if den else 1.0


def cluster_agreement(slide: Slide, narrative: Narrative, labels: np.ndarray) -> dict[str, float]:
    """How well cursor clusters recover the talked-about regions.

    ``region_recall``: fraction of talked regions that the majority region of some talk-matched cluster hits;
    ``cluster_precision``: fraction of clusters whose samples are mostly from a talked dwell (not transit or a
    silent hesitation); ``purity``: mean fraction of a cluster's samples inside its majority region;
    ``ari``: adjusted Rand index between clusters and the narrator's true dwell segments (transit = -1).
    """
    labels = np.asarray(labels)
    if labels.shape != (len(narrative.trace),):
        raise ValueError(f"labels: expected shape ({len(narrative.trace)},), got {labels.shape}")
    xy = np.round(narrative.trace[:, 1:]).astype(int)
    h, w = slide.region_map.shape
    reg = slide.region_map[np.clip(xy[:, 1], 0, h - 1), np.clip(xy[:, 0], 0, w - 1)]
    found, pur, hits = set(), [], 0
    cl = [c for c in np.unique(labels) if c >= 0]
    for c in cl:
        r, sg = reg[labels == c], narrative.segment[labels == c]
        vals, cnt = np.unique(r, return_counts=True)
        pur.append(cnt.max() / cnt.sum())
        svals, scnt = np.unique(sg, return_counts=True)
        seg = int(svals[scnt.argmax()])
        if seg >= 0:
            hits += 1
            if int(vals[cnt.argmax()]) == narrative.talked_regions[seg]:
                found.add(narrative.talked_regions[seg])
    talked = set(narrative.talked_regions)
    return {"region_recall": len(found & talked) / max(len(talked), 1),
            "cluster_precision": hits / max(len(cl), 1), "purity": float(np.mean(pur)) if pur else 0.0,
            "ari": _ari(labels, narrative.segment), "n_clusters": float(len(cl)), "n_talked": float(len(talked))}


@dataclass
class NarrativePatch:
    """A patch grounded by a cursor cluster, with the narration spoken while the cursor was there."""

    slide_id: str
    cluster: int
    box: tuple[int, int, int, int]   # x0, y0, x1, y1 (pixels, exclusive end)
    text: str                        # utterances overlapping the cluster's time span
    label: str                       # ground-truth class of the majority region under the cluster
    region_id: int
    image: np.ndarray                # uint8 (box h, box w, 3)


def narrative_patches(slide: Slide, narrative: Narrative, labels: np.ndarray, patch_px: int = 64,
                      require_text: bool = True) -> list[NarrativePatch]:
    """One patch per cursor cluster: a ``patch_px`` box centred on the cluster, with the narration spoken
    while the cursor was there. Clusters during which nothing was said (silent hesitations) are dropped
    unless ``require_text=False``, as Quilt-LLaVA keeps only traces that ground some text."""
    h, w = slide.region_map.shape
    out = []
    for c in sorted(c for c in np.unique(labels) if c >= 0):
        pts = narrative.trace[labels == c]
        t0, t1 = pts[:, 0].min(), pts[:, 0].max()
        cx, cy = np.median(pts[:, 1]), np.median(pts[:, 2])
        x0 = int(np.clip(round(cx - patch_px / 2), 0, max(w - patch_px, 0)))
        y0 = int(np.clip(round(cy - patch_px / 2), 0, max(h - patch_px, 0)))
        box = (x0, y0, min(x0 + patch_px, w), min(y0 + patch_px, h))
        text = " ".join(u.text for u in narrative.utterances if u.region_id >= 0 and u.start <= t1 and u.end >= t0)
        if require_text and not text:
            continue
        xy = np.round(pts[:, 1:]).astype(int)
        reg = slide.region_map[np.clip(xy[:, 1], 0, h - 1), np.clip(xy[:, 0], 0, w - 1)]
        vals, cnt = np.unique(reg, return_counts=True)
        rid = int(vals[cnt.argmax()])
        out.append(NarrativePatch(slide.slide_id, int(c), box, text, slide.regions[_region_index(slide, rid)].label,
                                  rid, slide.image[box[1]:box[3], box[0]:box[2]].copy()))
    return out


def _region_index(slide: Slide, rid: int) -> int:
    for i, r in enumerate(slide.regions):
        if r.id == rid:
            return i
    raise KeyError(rid)


@dataclass
class NarratedSlide:
    slide: Slide
    narrative: Narrative
    clusters: np.ndarray              # int (t,), from cluster_trace
    patches: list[NarrativePatch]


def make_narrated_slides(n: int, seed: int = 0, prefix: str = "slide", **slide_kwargs) -> list[NarratedSlide]:
    """``n`` slides with diagnoses cycling through ``DIAGNOSES``, each narrated, clustered and patched."""
    out = []
    diags = list(_DIAG_CLASSES)
    for i in range(n):
        s = _tile_seed(seed, i)
        sl = make_slide(s, diagnosis=diags[i % len(diags)], slide_id=f"{prefix}-{seed}-{i}", **slide_kwargs)
        nar = narrate(sl, seed=s)
        lab = cluster_trace(nar.trace)
        out.append(NarratedSlide(sl, nar, lab, narrative_patches(sl, nar, lab)))
    return out


# ----------------------------------------------------------------------------------------------------------
# Instruction data (Quilt-Instruct-style) and VQA evaluation (Quilt-VQA-style)
# ----------------------------------------------------------------------------------------------------------

@dataclass
class QAPair:
    slide_id: str
    kind: str                               # "independent" (one patch) or "reasoning" (several -> diagnosis)
    boxes: list[tuple[int, int, int, int]]  # patches the question is about
    question: str
    answer: str
    evidence: list[str]                     # ground-truth class codes of the patches
    diagnosis: str                          # slide ground truth
    source: str = "template"                # "template" or "llm"


_IND_Q = ("What type of tissue is shown in this patch?", "Describe the histological features in this region.",
          "What do you see in this image patch?", "Which tissue component is visible here?")
_REA_Q = ("Based on these regions of the slide, what is the most likely diagnosis?",
          "Considering all highlighted areas together, what would you diagnose, and why?",
          "What diagnosis do these findings support? Explain your reasoning.")


def _llm_prompt(kind: str, question: str, context: str, truth: str) -> str:
    return (f"You are a pathology educator. Write the answer to a {kind} question about an H&E image.\n"
            f"Narration: {context}\nGround truth (must be respected): {truth}\nQuestion: {question}\nAnswer:")


def generate_qa(narratives: Sequence[NarratedSlide], llm: Callable[[str], str] | None = None,
                seed: int = 0) -> list[QAPair]:
    """Quilt-Instruct-style Q/A from narrated slides.

    Independent prompts: one per grounded patch, answered from the patch's region attributes.
    Reasoning prompts: one per slide with >= 2 patches, walking the patches' findings to the diagnosis.
    With ``llm`` (any callable ``str -> str``), the answer is ``llm(prompt)`` where the prompt carries the
    narration and the ground truth; the template answer is used otherwise (and if the llm returns no text).
    """
    if llm is not None and not callable(llm):
        raise TypeError(f"llm: expected a callable str -> str or None, got {type(llm).__name__}")
    rng = np.random.default_rng([int(seed), 13])
    out: list[QAPair] = []
    for ns in narratives:
        sl = ns.slide
        for p in ns.patches:
            at = sl.regions[_region_index(sl, p.region_id)].attributes
            q = _choice(rng, _IND_Q)
            name = _choice(rng, list(TRAIN_SYNONYMS[p.label]))
            ans = f"This patch shows {name}, with {_join(_findings(at, rng))}."
            out.append(_finish(QAPair(sl.slide_id, "independent", [p.box], q, ans, [p.label], sl.diagnosis),
                               llm, p.text, f"the patch shows {CLASS_NAMES[p.label]}"))
        if len(ns.patches) >= 2:
            q = _choice(rng, _REA_Q)
            steps = [f"region {i + 1} shows {_choice(rng, list(TRAIN_SYNONYMS[p.label]))}"
                     for i, p in enumerate(ns.patches)]
            ans = (f"{_join(steps)[0].upper() + _join(steps)[1:]}. Together this indicates "
                   f"{DIAGNOSES[sl.diagnosis]}, so the most likely diagnosis is {sl.diagnosis}.")
            ctx = " ".join(p.text for p in ns.patches)
            out.append(_finish(QAPair(sl.slide_id, "reasoning", [p.box for p in ns.patches], q, ans,
                                      [p.label for p in ns.patches], sl.diagnosis),
                               llm, ctx, f"the diagnosis is {sl.diagnosis}"))
    return out


def _finish(qa: QAPair, llm, context: str, truth: str) -> QAPair:
    if llm is None:
        return qa
    text = llm(_llm_prompt(qa.kind, qa.question, context, truth))
    if isinstance(text, str) and text.strip():
        qa.answer, qa.source = text.strip(), "llm"
    return qa


@dataclass
class VQAItem:
    slide_id: str
    box: tuple[int, int, int, int] | None   # patch the question is about (None: whole slide / no image)
    question: str
    answer: str
    closed: bool                            # yes/no question
    image_dependent: bool                   # False for general-knowledge questions


_GENERAL = (
    ("Which stain colours nuclei blue-purple in an H&E section?", "haematoxylin"),
    ("Which stain colours cytoplasm and collagen pink in an H&E section?", "eosin"),
    ("Is extracellular mucin a feature of mucinous adenocarcinoma?", "yes"),
    ("Are lymphocyte nuclei typically larger than tumour cell nuclei?", "no"),
    ("What type of cells line normal colonic crypts besides absorptive cells?", "goblet cells"),
    ("Is smooth muscle composed of spindle-shaped cells?", "yes"),
)


def make_vqa_eval(narratives: Sequence[NarratedSlide], seed: int = 0) -> list[VQAItem]:
    """Quilt-VQA-style evaluation items: per patch one closed (balanced yes/no) and one open question, per
    slide a closed and an open diagnosis question, plus general-knowledge questions (no image needed)."""
    rng = np.random.default_rng([int(seed), 17])
    out: list[VQAItem] = []
    for ns in narratives:
        sid = ns.slide.slide_id
        for p in ns.patches:
            ask = p.label if rng.random() < 0.5 else _choice(rng, [c for c in CLASSES if c != p.label])
            out.append(VQAItem(sid, p.box, f"Does this patch show {CLASS_NAMES[ask]}?",
                               "yes" if ask == p.label else "no", True, True))
            out.append(VQAItem(sid, p.box, "What tissue type is shown in this patch?", CLASS_NAMES[p.label],
                               False, True))
        d = ns.slide.diagnosis
        ask = d if rng.random() < 0.5 else _choice(rng, [x for x in DIAGNOSES if x != d])
        out.append(VQAItem(sid, None, f"Is this slide consistent with {ask}?", "yes" if ask == d else "no",
                           True, True))
        out.append(VQAItem(sid, None, "What is the most likely diagnosis for this slide?", d, False, True))
    for q, a in _GENERAL:
        out.append(VQAItem("", None, q, a, a in ("yes", "no"), False))
    return out


def make_instruction_splits(n_train: int = 8, n_eval: int = 4, seed: int = 0, llm=None, **slide_kwargs):
    """Training slides + Q/A and disjoint evaluation slides + VQA items.

    Returns ``(train_slides, train_qa, eval_slides, eval_vqa)``; training and evaluation slides come from
    different seed streams and carry different id prefixes, so no slide is in both.
    """
    tr = make_narrated_slides(n_train, seed=seed, prefix="train", **slide_kwargs)
    ev = make_narrated_slides(n_eval, seed=seed + 1_000_003, prefix="eval", **slide_kwargs)
    return tr, generate_qa(tr, llm=llm, seed=seed), ev, make_vqa_eval(ev, seed=seed)


# ----------------------------------------------------------------------------------------------------------
# CONCH-style figure curation in miniature
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Panel:
    """A multi-panel figure: sub-images on a white page with one combined caption."""

    image: np.ndarray                           # uint8 (h, w, 3)
    boxes: list[tuple[int, int, int, int]]      # ground-truth sub-image boxes (x0, y0, x1, y1), letter order
    labels: list[str]                           # class code per sub-image, letter order
    subcaptions: list[str]                      # ground-truth sub-caption per sub-image, letter order
    caption: str                                # "(A) ... (B) ..."


_LETTERS = "ABCDEFGH"


def make_panel(seed: int, n_sub: int | None = None, tile_px: int = 64, gutter: int = 10,
               stain_variation: float = 0.3) -> Panel:
    """A figure of 2-6 tiles (no BACK: a blank tile is indistinguishable from the page) in a grid, letters in
    reading order, each sub-caption derived from its tile's attributes."""
    rng = np.random.default_rng([int(seed), 19])
    n = n_sub or int(rng.integers(2, 7))
    if not 1 <= n <= len(_LETTERS):
        raise ValueError(f"n_sub: expected 1..{len(_LETTERS)}, got {n}")
    cols = int(rng.integers(max(1, math.ceil(n / 2)), n + 1)) if n > 1 else 1
    rows = math.ceil(n / cols)
    cell = tile_px + gutter
    h, w = rows * cell + gutter, cols * cell + gutter
    img = np.full((h, w, 3), 255, np.uint8)
    pool = [c for c in CLASSES if c != "BACK"]
    labs = [pool[i] for i in rng.permutation(len(pool))[:n]]
    boxes, subs = [], []
    for i, lab in enumerate(labs):
        r, c = divmod(i, cols)
        sz = int(tile_px - rng.integers(0, tile_px // 4))
        x0 = gutter + c * cell + int(rng.integers(0, tile_px - sz + 1))
        y0 = gutter + r * cell + int(rng.integers(0, tile_px - sz + 1))
        tile, at = render_tile(lab, max(sz, 28), int(rng.integers(2**31)), stain_variation)
        img[y0:y0 + sz, x0:x0 + sz] = tile[:sz, :sz]
        boxes.append((x0, y0, x0 + sz, y0 + sz))
        subs.append(caption_from_attributes(at, int(rng.integers(5))))
    caption = " ".join(f"({_LETTERS[i]}) {s}" for i, s in enumerate(subs))
    return Panel(img, boxes, labs, subs, caption)


def detect_subimages(image: np.ndarray, white: int = 235, min_side: int = 12) -> list[tuple[int, int, int, int]]:
    """Sub-image boxes (x0, y0, x1, y1) in reading order: non-white pixels, closed to bridge pale tissue
    (fat vacuoles, lumina), split into connected components; components smaller than ``min_side`` dropped."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected (H, W, 3), got {image.shape}")
    ink = (image < white).any(-1)
    ink = ndimage.binary_closing(ink, np.ones((5, 5), bool))
    ink = ndimage.binary_fill_holes(ink)
    lab, _ = ndimage.label(ink)
    boxes = []
    for sl in ndimage.find_objects(lab):
        if sl is None:
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        if min(y1 - y0, x1 - x0) >= min_side:
            boxes.append((x0, y0, x1, y1))
    # reading order: a box starts a new row when its centre lies below the current row's first box
    boxes.sort(key=lambda b: (b[1] + b[3]) / 2)
    rows: list[list[tuple[int, int, int, int]]] = []
    for b in boxes:
        if rows and (b[1] + b[3]) / 2 < rows[-1][0][3]:
            rows[-1].append(b)
        else:
            rows.append([b])
    return [b for row in rows for b in sorted(row, key=lambda z: z[0])]


def split_caption(caption: str) -> list[tuple[str, str]]:
    """"(A) foo. (B) bar." -> [("A", "foo."), ("B", "bar.")]. Raises if there are no "(X)" markers."""
    parts = re.split(r"\(([A-H])\)\s*", caption)
    if len(parts) < 3:
        raise ValueError(f"caption: expected '(A) ... (B) ...' markers, got {caption[:60]!r}")
    return [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts), 2)]


def _image_features(img: np.ndarray) -> np.ndarray:
    """Small hand-made descriptor: mean / std RGB, white and dark fractions, gradient energy, H and E means."""
    x = img.astype(np.float32) / 255.0
    od = -np.log(np.clip(x, 1 / 255, 1))
    g = x.mean(-1)
    gy, gx = np.gradient(g)
    hvec, evec = _H_OD / np.linalg.norm(_H_OD), _E_OD / np.linalg.norm(_E_OD)
    return np.concatenate([x.mean((0, 1)), x.std((0, 1)), [(g > 0.85).mean(), (g < 0.45).mean(),
                           np.sqrt(gx ** 2 + gy ** 2).mean() * 10, (od @ hvec).mean(), (od @ evec).mean()]])


class PrototypeSimilarity:
    """A default image-text similarity for panel alignment: the text names a class (synonym match), the image
    is scored by negative standardised distance of its features to that class's prototype (mean features of
    rendered reference tiles). Any callable ``(images, texts) -> (n_images, n_texts)`` can replace it (e.g.
    cosine similarity of a trained CLIP's embeddings)."""

    def __init__(self, size: int = 64, n_per_class: int = 12, seed: int = 12345, stain_variation: float = 0.3):
        feats = {c: np.stack([_image_features(render_tile(c, size, seed + i, stain_variation)[0])
                              for i in range(n_per_class)]) for c in CLASSES}
        allf = np.concatenate(list(feats.values()))
        self.mu, self.sd = allf.mean(0), allf.std(0) + 1e-6
        self.proto = {c: ((f - self.mu) / self.sd).mean(0) for c, f in feats.items()}

    @staticmethod
    def text_class(text: str) -> str | None:
        t = text.lower()
        best, blen = None, 0
        for c in CLASSES:
            for s in CLASS_SYNONYMS[c]:
                if s.lower() in t and len(s) > blen:
                    best, blen = c, len(s)
        return best

    def __call__(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> np.ndarray:
        f = np.stack([(_image_features(im) - self.mu) / self.sd for im in images])         # (i, d)
        sim = np.zeros((len(images), len(texts)))
        for j, t in enumerate(texts):
            c = self.text_class(t)
            sim[:, j] = -np.linalg.norm(f - self.proto[c], axis=1) if c else -1e3
        return sim


def align_subcaptions(images: Sequence[np.ndarray], subcaptions: Sequence[str],
                      similarity: Callable[[Sequence[np.ndarray], Sequence[str]], np.ndarray]) -> list[int]:
    """Optimal one-to-one assignment (Hungarian, scipy) maximising total similarity; returns, for each image,
    the index of its sub-caption (-1 if there are more images than captions)."""
    s = np.asarray(similarity(images, subcaptions), float)
    if s.shape != (len(images), len(subcaptions)):
        raise ValueError(f"similarity: expected a ({len(images)}, {len(subcaptions)}) matrix, got {s.shape}")
    r, c = linear_sum_assignment(-s)
    out = [-1] * len(images)
    for i, j in zip(r, c):
        out[i] = int(j)
    return out


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda z: (z[2] - z[0]) * (z[3] - z[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter) if inter else 0.0


def evaluate_curation(panels: Sequence[Panel], detect=detect_subimages, split=split_caption,
                      similarity: Callable | None = None, iou: float = 0.8) -> dict[str, float]:
    """Accuracy of each curation step on panels with known ground truth.

    ``detection_recall``: ground-truth sub-images matched by a detected box with IoU >= ``iou``;
    ``detection_precision``: detected boxes that match one; ``split_accuracy``: panels whose caption split
    gives exactly the ground-truth sub-captions; ``alignment_accuracy``: matched sub-images assigned their own
    sub-caption by ``similarity`` + optimal assignment (shuffled caption order, so letters give nothing away);
    ``chance``: expected alignment accuracy of a random assignment.
    """
    similarity = similarity or PrototypeSimilarity()
    rng = np.random.default_rng(0)
    tp = nd = ngt = split_ok = aligned = n_al = 0
    for p in panels:
        det = detect(p.image)
        nd += len(det)
        ngt += len(p.boxes)
        match = {}
        for gi, g in enumerate(p.boxes):
            best = max(range(len(det)), key=lambda k: _iou(det[k], g), default=None)
            if best is not None and _iou(det[best], g) >= iou:
                match[gi] = best
        tp += len(match)
        subs = [s for _, s in split(p.caption)]
        split_ok += subs == p.subcaptions
        perm = rng.permutation(len(subs))
        shuffled = [subs[k] for k in perm]
        gis = sorted(match)
        crops = [p.image[det[match[g]][1]:det[match[g]][3], det[match[g]][0]:det[match[g]][2]] for g in gis]
        if crops:
            a = align_subcaptions(crops, shuffled, similarity)
            for g, j in zip(gis, a):
                aligned += j >= 0 and perm[j] == g
            n_al += len(gis)
    return {"detection_recall": tp / max(ngt, 1), "detection_precision": tp / max(nd, 1),
            "split_accuracy": split_ok / max(len(panels), 1), "alignment_accuracy": float(aligned / max(n_al, 1)),
            "chance": float(np.mean([1 / len(p.boxes) for p in panels])) if panels else 0.0}
