"""Zero-shot segmentation of a slide, as CONCH reports it (Lu et al., 2024, "Zero-shot segmentation").

No pixel labels are ever trained on: the slide is cut into tiles, every tile is classified zero-shot with the
text classifier (class synonyms x prompt templates, ``vlm_lab.eval.zero_shot_classifier``), and each tile's class
probabilities are painted back onto the pixels it covers. Where tiles overlap (``stride < tile``) a pixel gets
the mean of the probabilities of every tile covering it (a smoother map than CONCH's one-label-per-tile;
``stride=tile`` is CONCH's setting). The map is scored against the ground truth with pixel accuracy and the
Dice coefficient per class, ``Dice_c = 2 |P_c & G_c| / (|P_c| + |G_c|)``, averaged over the classes present in
the ground truth (macro Dice, the summary CONCH reports).

Works with any model with ``encode_image`` (CLIP, LiT, CoCa) and a ``(C, d)`` classifier.

Shape letters: h / w slide height / width, n tiles, t tile side, s model input side, C classes, d embedding width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["SegmentationResult", "zero_shot_segmentation", "slide_class_map", "dice_scores", "pixel_accuracy",
           "segmentation_metrics"]


@dataclass
class SegmentationResult:
    """What :func:`zero_shot_segmentation` returns."""

    class_map: np.ndarray  # int (h, w): predicted class index per pixel
    prob_map: np.ndarray  # float32 (h, w, C): mean class probabilities of the tiles covering each pixel
    tile_probs: np.ndarray  # float32 (n, C): per-tile class probabilities
    coords: list[tuple[int, int]]  # (x, y) top-left corner of each tile
    tile: int  # tile side in slide pixels


def _resize_tiles(tiles: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``(n, t, t, 3)`` -> ``(n, s, s, 3)`` (bilinear; no-op when t == s)."""
    if tiles.shape[1] == size:
        return tiles
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(t).resize((size, size), Image.BILINEAR)) for t in tiles])


@torch.no_grad()
def zero_shot_segmentation(model: nn.Module, image: np.ndarray, classifier: Tensor, *, tile: int,
                           stride: int | None = None, image_size: int | None = None, scale: float = 100.0,
                           batch_size: int = 128) -> SegmentationResult:
    """Tile ``image`` (uint8 ``(h, w, 3)``), classify every tile zero-shot, assemble the class map.

    Args:
        model: has ``encode_image(pixel_values) -> (b, d)`` L2-normalised embeddings.
        image: the slide.
        classifier: ``(C, d)`` class embeddings (``zero_shot_classifier``).
        tile: tile side in slide pixels (choose the field of view the model was trained at).
        stride: step between tiles (default ``tile``: no overlap). The last row / column is shifted back to end at
            the border, so every pixel is covered.
        image_size: side the tiles are resized to (default ``model.config.image_size``).
        scale: logit multiplier before the softmax (CLIP / CONCH use 100; the argmax does not depend on it).
    """
    from vlm_lab.data.samples import tile_image
    from vlm_lab.data.transforms import to_tensor

    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected a uint8 array (H, W, 3), got {getattr(image, 'dtype', type(image))} "
                         f"{getattr(image, 'shape', '')}")
    if not isinstance(classifier, Tensor) or classifier.dim() != 2:
        raise ValueError("classifier: expected a (classes, dim) tensor, "
                         f"got {getattr(classifier, 'shape', classifier)}")
    if image_size is None:
        image_size = getattr(getattr(model, "config", None), "image_size", None)
        if image_size is None:
            raise ValueError("image_size: the model has no config.image_size; pass image_size explicitly")
    tiles, coords = tile_image(image, tile, stride, drop_last=False)  # (n, t, t, 3)
    pixels = torch.stack([to_tensor(t) for t in _resize_tiles(tiles, image_size)])  # (n, 3, s, s)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        emb = torch.cat([model.encode_image(chunk.to(device)).float().cpu()
                         for chunk in pixels.split(batch_size)])  # (n, d)
    finally:
        model.train(was_training)
    if emb.shape[1] != classifier.shape[1]:
        raise ValueError(f"classifier: width {classifier.shape[1]} != image embedding width {emb.shape[1]}")
    probs = (scale * emb @ classifier.float().cpu().T).softmax(dim=-1).numpy()  # (n, C)
    h, w = image.shape[:2]
    total = np.zeros((h, w, probs.shape[1]), np.float32)
    count = np.zeros((h, w, 1), np.float32)
    for (x, y), p in zip(coords, probs):
        total[y:y + tile, x:x + tile] += p
        count[y:y + tile, x:x + tile] += 1
    prob_map = total / np.maximum(count, 1)  # (h, w, C)
    return SegmentationResult(prob_map.argmax(-1), prob_map, probs.astype(np.float32), coords, tile)


def slide_class_map(slide, classes: Sequence[str] | None = None) -> np.ndarray:
    """Ground-truth class index per pixel ``(h, w)`` of a ``vlm_lab.data.pathology.Slide``."""
    from vlm_lab.data.pathology import CLASSES

    classes = list(CLASSES if classes is None else classes)
    lut = np.full(int(slide.region_map.max()) + 1, -1, np.int64)
    for r in slide.regions:
        if r.label not in classes:
            raise ValueError(f"classes: the slide has a region of class {r.label!r}, not in {classes}")
        lut[r.id] = classes.index(r.label)
    return lut[slide.region_map]


def _check_pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"pred and target must be 2-D maps of one shape, got {pred.shape} and {target.shape}")
    return pred, target


def pixel_accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """Fraction of pixels whose predicted class equals the ground truth."""
    pred, target = _check_pair(pred, target)
    return float((pred == target).mean())


def dice_scores(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice per class ``(C,)``; NaN for a class absent from both maps."""
    pred, target = _check_pair(pred, target)
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        p, g = pred == c, target == c
        denom = p.sum() + g.sum()
        if denom:
            out[c] = 2.0 * (p & g).sum() / denom
    return out


def segmentation_metrics(pred: np.ndarray, target: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """``pixel_accuracy``, ``mean_dice`` (over classes present in ``target``) and ``dice/<class>`` for those."""
    dice = dice_scores(pred, target, len(class_names))
    present = [c for c in range(len(class_names)) if (np.asarray(target) == c).any()]
    out = {"pixel_accuracy": pixel_accuracy(pred, target),
           "mean_dice": float(np.mean([dice[c] for c in present])) if present else float("nan")}
    out.update({f"dice/{class_names[c]}": float(dice[c]) for c in present})
    return out
