"""The lab's offline real pathology sample, tiling, and colour deconvolution into H / E / DAB.

``ihc_sample()`` is ``skimage.data.immunohistochemistry()``, an image shipped inside the scikit-image wheel, so it
needs no network. Provenance (from scikit-image's docstring): immunohistochemical (IHC) staining with
haematoxylin counterstaining of colonic glands, where the expression of the FHL2 protein is revealed with DAB;
acquired at the Center for Microscopy And Molecular Imaging (CMMI); "No known copyright restrictions".
512 x 512 RGB uint8.

Colour deconvolution follows Ruifrok & Johnston 2001 (Anal Quant Cytol Histol 23:291) as implemented by
``skimage.color.rgb2hed`` / ``hed2rgb``.

Shape legend: ``h`` height, ``w`` width, ``n`` tiles, ``t`` tile side.
"""
from __future__ import annotations

import numpy as np

__all__ = ["IHC_PROVENANCE", "ihc_sample", "tile_image", "hed_channels", "hed_views"]

IHC_PROVENANCE: dict[str, str] = {
    "source": "skimage.data.immunohistochemistry() (file ihc.png inside the scikit-image package)",
    "content": "IHC staining with haematoxylin counterstain; colonic glands; FHL2 protein revealed with DAB",
    "acquired_at": "Center for Microscopy And Molecular Imaging (CMMI)",
    "licence": "No known copyright restrictions (per scikit-image's docstring)",
}


def ihc_sample() -> np.ndarray:
    """The scikit-image immunohistochemistry image: uint8 ``(512, 512, 3)`` (see ``IHC_PROVENANCE``)."""
    from skimage import data
    return np.ascontiguousarray(data.immunohistochemistry())


def tile_image(image: np.ndarray, tile: int, stride: int | None = None,
               drop_last: bool = True) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Cut ``image`` (h, w, c) into square tiles: ``(tiles (n, t, t, c), [(x, y) top-left per tile])``.

    ``stride`` defaults to ``tile`` (no overlap). With ``drop_last=False`` the last row / column is shifted
    back to end at the border instead of being dropped (tiles then overlap a little).
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3:
        raise ValueError(f"image: expected an array (H, W, C), got {getattr(image, 'shape', type(image).__name__)}")
    h, w = image.shape[:2]
    stride = tile if stride is None else stride
    if not isinstance(tile, int) or not 1 <= tile <= min(h, w):
        raise ValueError(f"tile: expected an int in [1, {min(h, w)}] for an image of {h}x{w}, got {tile!r}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride: expected a positive int, got {stride!r}")

    def starts(n: int) -> list[int]:
        s = list(range(0, n - tile + 1, stride))
        if not drop_last and s[-1] + tile < n:
            s.append(n - tile)
        return s

    coords = [(x, y) for y in starts(h) for x in starts(w)]
    tiles = np.stack([image[y:y + tile, x:x + tile] for x, y in coords])     # (n, t, t, c)
    return tiles, coords


def hed_channels(image: np.ndarray) -> dict[str, np.ndarray]:
    """Stain concentrations (optical-density units, float (h, w)) for haematoxylin ``"H"``, eosin ``"E"`` and
    ``"DAB"`` by Ruifrok-Johnston colour deconvolution (``skimage.color.rgb2hed``)."""
    from skimage.color import rgb2hed
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected an RGB array (H, W, 3), got {getattr(image, 'shape', None)}")
    hed = rgb2hed(image)                                                      # (h, w, 3)
    return {"H": hed[..., 0], "E": hed[..., 1], "DAB": hed[..., 2]}


def hed_views(image: np.ndarray) -> dict[str, np.ndarray]:
    """Each stain alone, re-rendered as an RGB uint8 ``(h, w, 3)`` image (for side-by-side display)."""
    from skimage.color import hed2rgb
    ch = hed_channels(image)
    out = {}
    for k, i in (("H", 0), ("E", 1), ("DAB", 2)):
        hed = np.zeros(image.shape, float)
        hed[..., i] = ch[k]
        out[k] = (np.clip(hed2rgb(hed), 0, 1) * 255 + 0.5).astype(np.uint8)
    return out
