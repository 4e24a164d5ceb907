"""Real image-text data: CSV / JSONL manifests, class folders and MedMNIST ``.npz`` files.

Every loader checks its inputs up front and keeps a :class:`LoadReport` of every problem (missing, corrupt or
unreadable image, empty caption, bad row, label out of range) with the path or row and the reason. The caller
picks the policy: ``on_error="raise"`` (default) raises :class:`DataError` carrying the full report;
``on_error="skip"`` leaves the bad entries out and keeps the report on ``dataset.report`` — nothing is dropped
silently.

Items follow the lab's contract (``vlm_lab.data`` datasets): ``pixel_values`` float32 ``(3, h, w)`` normalised
with ``vlm_lab.data.transforms`` (CLIP mean / std), ``caption`` (str), ``labels`` (int, when known), and
``path`` (str, the source of the image).

MedMNIST layout (Yang et al. 2023, Sci Data; ``medmnist`` ``INFO``): one ``.npz`` with ``{split}_images``
(uint8 ``(n, h, w)`` or ``(n, h, w, 3)``) and ``{split}_labels`` (``(n, 1)``) for split in train / val / test.
PathMNIST's nine labels are NCT-CRC-HE-100K's classes in the same order (``PATHMNIST_CLASSES``).
Files are read with ``allow_pickle=False``: an ``.npz`` can never execute code here.
"""
from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np
from torch.utils.data import Dataset

__all__ = [
    "LoadIssue", "LoadReport", "DataError", "ImageTextDataset", "from_csv", "from_jsonl", "from_folder",
    "NpzImageText", "PATHMNIST_CLASSES", "IMAGE_EXTENSIONS",
]

#: PathMNIST label names, index = label (same order as NCT-CRC-HE-100K's ADI ... TUM).
PATHMNIST_CLASSES: tuple[str, ...] = (
    "adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
    "cancer-associated stroma", "colorectal adenocarcinoma epithelium",
)
#: File extensions :func:`from_folder` treats as images.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")

OnError = Literal["raise", "skip"]


@dataclass(frozen=True)
class LoadIssue:
    """One problem found while loading."""

    where: str        # image path, or "<manifest>:<row>" for a row without a usable path
    reason: str       # short kind: missing image, corrupt image, empty caption, bad row, bad label, ...
    detail: str = ""  # the underlying message


@dataclass
class LoadReport:
    """What a loader saw: rows read, items kept, and every issue (path + reason)."""

    source: str                                       # manifest / folder / npz file
    n_rows: int = 0                                   # entries read
    n_kept: int = 0                                   # entries in the dataset
    issues: list[LoadIssue] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return self.n_rows - self.n_kept

    def counts(self) -> dict[str, int]:
        """Issue count per reason."""
        out: dict[str, int] = {}
        for i in self.issues:
            out[i.reason] = out.get(i.reason, 0) + 1
        return out

    def summary(self) -> str:
        head = f"{self.source}: {self.n_rows} rows, {self.n_kept} kept, {self.n_skipped} skipped"
        lines = [f"  {i.reason}: {i.where}" + (f" ({i.detail})" if i.detail else "") for i in self.issues[:20]]
        if len(self.issues) > 20:
            lines.append(f"  ... and {len(self.issues) - 20} more")
        return "\n".join([head] + lines)

    def __str__(self) -> str:
        return self.summary()


class DataError(ValueError):
    """Raised under ``on_error="raise"``; ``.report`` holds every issue found."""

    def __init__(self, report: LoadReport) -> None:
        self.report = report
        super().__init__(f"found {len(report.issues)} problem(s) while loading; pass on_error='skip' to leave "
                         f"them out (they stay listed in dataset.report)\n{report.summary()}")


def _check_policy(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")


def _open_rgb(path: str | Path, image_size: int | None):
    from PIL import Image
    with Image.open(path) as im:
        im.load()  # full decode: truncated / corrupt files fail here, not mid-training
        im = im.convert("RGB")
    if image_size is not None and im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.BICUBIC)
    return np.asarray(im)


def _check_image(path: Path, decode: bool) -> LoadIssue | None:
    if not path.exists():
        return LoadIssue(str(path), "missing image")
    if not path.is_file():
        return LoadIssue(str(path), "unreadable image", "not a regular file")
    try:
        from PIL import Image
        with Image.open(path) as im:
            if decode:
                im.load()
            else:
                im.verify()
    except OSError as exc:
        if not os.access(path, os.R_OK):
            return LoadIssue(str(path), "unreadable image", str(exc))
        return LoadIssue(str(path), "corrupt image", str(exc))
    except Exception as exc:  # PIL raises a zoo of errors on garbage (SyntaxError, ValueError, ...)
        return LoadIssue(str(path), "corrupt image", f"{type(exc).__name__}: {exc}")
    return None


class ImageTextDataset(Dataset):
    """Map-style dataset of (image file, captions, optional label) records, checked at construction.

    Args:
        records: ``(path, captions, label_or_None)`` triples.
        image_size: resize every image to a square of this side (bicubic); ``None`` keeps native sizes.
        on_error: ``"raise"`` or ``"skip"`` (see the module docstring).
        check: ``"decode"`` fully decodes every image up front (slow for huge sets, catches truncation),
            ``"verify"`` runs PIL's cheap header check, ``"none"`` only checks existence.
        pick: which caption an item returns when a record has several: ``"first"`` or ``"random"``
            (seeded by ``seed``, the index and :meth:`set_epoch`).
        transform: uint8 ``(h, w, 3)`` -> tensor; default ``vlm_lab.data.transforms.to_tensor``.
        source: name used in the report.
    """

    def __init__(self, records: Iterable[tuple[str | Path, Sequence[str], int | None]], *,
                 image_size: int | None = None, on_error: OnError = "raise",
                 check: Literal["decode", "verify", "none"] = "decode", pick: Literal["first", "random"] = "first",
                 transform: Callable[[np.ndarray], Any] | None = None, seed: int = 0, source: str = "records",
                 report: LoadReport | None = None) -> None:
        _check_policy(on_error)
        if check not in ("decode", "verify", "none"):
            raise ValueError(f"check: expected 'decode', 'verify' or 'none', got {check!r}")
        if pick not in ("first", "random"):
            raise ValueError(f"pick: expected 'first' or 'random', got {pick!r}")
        if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
            raise ValueError(f"image_size: expected a positive int or None, got {image_size!r}")
        self.report = report or LoadReport(source)
        self.image_size, self.pick, self.seed, self.epoch = image_size, pick, seed, 0
        self.transform = transform
        self.records: list[tuple[str, list[str], int | None]] = []
        for path, caps, label in records:
            self.report.n_rows += 1
            path = Path(path)
            caps = [c.strip() for c in caps if isinstance(c, str)]
            good = [c for c in caps if c]
            problem = None
            if not good:
                problem = LoadIssue(str(path), "empty caption")
            elif check == "none":
                problem = None if path.exists() else LoadIssue(str(path), "missing image")
            else:
                problem = _check_image(path, decode=check == "decode")
            if problem is not None:
                self.report.issues.append(problem)
                continue
            self.records.append((str(path), good, label))
        self.report.n_kept = len(self.records)
        if self.report.issues and on_error == "raise":
            raise DataError(self.report)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Change which caption ``pick="random"`` returns (call once per epoch)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        path, caps, label = self.records[index]
        try:
            img = _open_rgb(path, self.image_size)
        except Exception as exc:  # changed on disk since construction: fail loudly with the path
            raise OSError(f"image {path!r} could not be read: {exc}") from exc
        if self.transform is None:
            from vlm_lab.data.transforms import to_tensor
            pv = to_tensor(img)
        else:
            pv = self.transform(img)
        cap = caps[0] if self.pick == "first" else random.Random(hash((self.seed, index, self.epoch))).choice(caps)
        item = {"pixel_values": pv, "caption": cap, "path": path}
        if label is not None:
            item["labels"] = int(label)
        return item


def _resolve(p: str, base: Path) -> Path:
    q = Path(p)
    return q if q.is_absolute() else base / q


def from_csv(path: str | Path, *, image_col: str = "image", caption_cols: str | Sequence[str] = "caption",
             label_col: str | None = None, root: str | Path | None = None, on_error: OnError = "raise",
             **kwargs) -> ImageTextDataset:
    """Dataset from a CSV manifest with a header row.

    ``caption_cols`` names one or more caption columns (all non-empty ones are kept); image paths are relative
    to ``root`` (default: the manifest's folder). Rows with a missing image column, a bad label or no caption are
    reported.
    """
    _check_policy(on_error)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: CSV manifest {str(path)!r} does not exist")
    base = Path(root) if root is not None else path.parent
    cols = [caption_cols] if isinstance(caption_cols, str) else list(caption_cols)
    report = LoadReport(str(path))
    recs = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in [image_col, *cols] + ([label_col] if label_col else []) if c not in header]
        if missing:
            raise ValueError(f"path: CSV {str(path)!r} lacks column(s) {missing}; its header is {header}")
        for i, row in enumerate(reader, start=2):
            img = (row.get(image_col) or "").strip()
            if not img:
                report.n_rows += 1
                report.issues.append(LoadIssue(f"{path}:{i}", "bad row", f"empty {image_col!r}"))
                continue
            label = None
            if label_col:
                try:
                    label = int(row[label_col])
                except (TypeError, ValueError):
                    report.n_rows += 1
                    report.issues.append(LoadIssue(f"{path}:{i}", "bad label", repr(row[label_col])))
                    continue
            recs.append((_resolve(img, base), [row.get(c) or "" for c in cols], label))
    return ImageTextDataset(recs, on_error=on_error, source=str(path), report=report, **kwargs)


def from_jsonl(path: str | Path, *, image_key: str = "image", caption_key: str = "caption",
               label_key: str | None = None, root: str | Path | None = None, on_error: OnError = "raise",
               **kwargs) -> ImageTextDataset:
    """Dataset from a JSON-lines manifest: one object per line, ``caption`` a string or a list of strings."""
    _check_policy(on_error)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: JSONL manifest {str(path)!r} does not exist")
    base = Path(root) if root is not None else path.parent
    report = LoadReport(str(path))
    recs = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                report.n_rows += 1
                report.issues.append(LoadIssue(where, "bad row", f"invalid JSON: {exc.msg}"))
                continue
            img = obj.get(image_key) if isinstance(obj, dict) else None
            if not isinstance(img, str) or not img.strip():
                report.n_rows += 1
                report.issues.append(LoadIssue(where, "bad row", f"no string {image_key!r}"))
                continue
            caps = obj.get(caption_key)
            caps = [caps] if isinstance(caps, str) else (list(caps) if isinstance(caps, list) else [])
            label = obj.get(label_key) if label_key else None
            if label_key and not isinstance(label, int):
                report.n_rows += 1
                report.issues.append(LoadIssue(where, "bad label", repr(label)))
                continue
            recs.append((_resolve(img, base), caps, label))
    return ImageTextDataset(recs, on_error=on_error, source=str(path), report=report, **kwargs)


def from_folder(root: str | Path, *, template: str = "an H&E image of {}.",
                class_names: dict[str, str] | None = None, on_error: OnError = "raise",
                **kwargs) -> ImageTextDataset:
    """Dataset from class folders ``root/<class>/<image>``: label = index of the sorted class folder, caption =
    ``template.format(class_names.get(folder, folder))``. Non-image files are reported, not ignored."""
    _check_policy(on_error)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root: folder {str(root)!r} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"root: {str(root)!r} has no class sub-folders")
    names = class_names or {}
    report = LoadReport(str(root))
    recs = []
    for li, c in enumerate(classes):
        for p in sorted((root / c).iterdir()):
            if p.name.startswith("."):
                continue
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                report.n_rows += 1
                report.issues.append(LoadIssue(str(p), "not an image", f"extension {p.suffix or '(none)'}"))
                continue
            recs.append((p, [template.format(names.get(c, c))], li))
    ds = ImageTextDataset(recs, on_error=on_error, source=str(root), report=report, **kwargs)
    ds.classes = classes
    return ds


class NpzImageText(Dataset):
    """MedMNIST-format ``.npz`` as an image-text dataset (PathMNIST by default).

    Args:
        path: the ``.npz`` file (e.g. ``pathmnist.npz`` or ``pathmnist_224.npz``).
        split: ``"train"``, ``"val"`` or ``"test"`` (keys ``{split}_images`` / ``{split}_labels``).
        class_names: label -> name (default ``PATHMNIST_CLASSES``); labels outside the range are reported.
        template: caption template, ``{}`` gets the class name; or ``captions`` a callable ``label -> str``.
        on_error: ``"raise"`` or ``"skip"`` for bad labels.
        image_size: resize (bicubic) to a square of this side; ``None`` keeps the stored size.
    """

    def __init__(self, path: str | Path, split: str = "train", *,
                 class_names: Sequence[str] = PATHMNIST_CLASSES, template: str = "an H&E image of {}.",
                 captions: Callable[[int], str] | None = None, on_error: OnError = "raise",
                 image_size: int | None = None, transform: Callable[[np.ndarray], Any] | None = None) -> None:
        _check_policy(on_error)
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: {str(path)!r} does not exist")
        try:
            data = np.load(path, allow_pickle=False)
            keys = list(data.keys())
        except Exception as exc:
            raise ValueError(f"path: {str(path)!r} is not a readable .npz file ({type(exc).__name__}: {exc})") from exc
        ik, lk = f"{split}_images", f"{split}_labels"
        if ik not in keys or lk not in keys:
            raise ValueError(f"split: {str(path)!r} has no {ik!r} / {lk!r}; its keys are {keys}")
        try:
            images, labels = data[ik], data[lk]
        except Exception as exc:
            raise ValueError(f"path: {str(path)!r}: arrays {ik!r} / {lk!r} could not be read ({exc})") from exc
        bad_channels = images.ndim == 4 and images.shape[-1] not in (1, 3)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or bad_channels:
            raise ValueError(f"{ik}: expected uint8 (n, h, w) or (n, h, w, 3), got {images.dtype} {images.shape}")
        labels = labels.reshape(len(labels), -1)
        if len(labels) != len(images) or labels.shape[1] != 1:
            raise ValueError(f"{lk}: expected shape ({len(images)}, 1) to match {ik}, got {data[lk].shape}")
        labels = labels[:, 0].astype(np.int64)
        self.report = LoadReport(f"{path}[{split}]", n_rows=len(images))
        ok = (labels >= 0) & (labels < len(class_names))
        for i in np.flatnonzero(~ok):
            self.report.issues.append(LoadIssue(f"{path}[{split}][{i}]", "bad label", f"{labels[i]} not in "
                                                f"[0, {len(class_names)})"))
        keep = np.flatnonzero(ok)
        self.report.n_kept = len(keep)
        if self.report.issues and on_error == "raise":
            raise DataError(self.report)
        self.images, self.labels, self.index = images, labels, keep
        self.class_names = tuple(class_names)
        self.captions = captions or (lambda y: template.format(self.class_names[y]))
        self.image_size, self.transform, self.path, self.split = image_size, transform, str(path), split

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        j = int(self.index[i])
        img = self.images[j]
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, -1)          # (h, w) -> (h, w, 3)
        elif img.shape[-1] == 1:
            img = np.repeat(img, 3, -1)                      # (h, w, 1) -> (h, w, 3)
        if self.image_size is not None and img.shape[:2] != (self.image_size, self.image_size):
            from PIL import Image
            img = np.asarray(Image.fromarray(img).resize((self.image_size, self.image_size), Image.BICUBIC))
        if self.transform is None:
            from vlm_lab.data.transforms import to_tensor
            pv = to_tensor(np.ascontiguousarray(img))
        else:
            pv = self.transform(img)
        y = int(self.labels[j])
        return {"pixel_values": pv, "caption": self.captions(y), "labels": y, "path": f"{self.path}[{self.split}][{j}]"}
