"""Download the openly licensed pathology datasets the course can swap in for the synthetic world.

``fetch(name, root)`` returns the local path of a dataset, downloading it only when it is not there yet, and
writes ``<file>.source.json`` next to it with the source URL, licence, citation and SHA-256 of what was saved.

Never called by tests or toy paths. It refuses to touch the network when ``HF_HUB_OFFLINE=1`` or
``VLM_LAB_OFFLINE=1`` is set and raises :class:`OfflineError` explaining where to get the file by hand when the
network is unreachable.

Sources (both CC BY 4.0):

* PathMNIST — MedMNIST v2, Yang et al. 2023, Sci Data 10:41; 28 px (and 64/128/224 px) downsampled
  NCT-CRC-HE-100K / CRC-VAL-HE-7K tiles, Zenodo record 10519652.
* NCT-CRC-HE-100K — Kather, Halama & Marx 2018, "100,000 histological images of human colorectal cancer and
  healthy tissue", Zenodo record 1214456 (the 224 px, 0.5 um/px, Macenko-normalised training tiles).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

__all__ = ["DatasetSource", "SOURCES", "OfflineError", "fetch"]


@dataclass(frozen=True)
class DatasetSource:
    name: str          # key for fetch()
    url: str           # direct download URL
    filename: str      # file saved under root
    licence: str       # SPDX-style licence name
    citation: str      # who to cite
    homepage: str      # human-readable landing page
    extract: bool      # unzip after download


SOURCES: dict[str, DatasetSource] = {
    "pathmnist": DatasetSource(
        "pathmnist", "https://zenodo.org/records/10519652/files/pathmnist.npz?download=1", "pathmnist.npz",
        "CC BY 4.0", "Yang et al., MedMNIST v2, Scientific Data 10:41 (2023); Kather et al., PLoS Med 16(1) (2019)",
        "https://medmnist.com/", False),
    "nct-crc-he-100k": DatasetSource(
        "nct-crc-he-100k", "https://zenodo.org/records/1214456/files/NCT-CRC-HE-100K.zip?download=1",
        "NCT-CRC-HE-100K.zip", "CC BY 4.0",
        "Kather, Halama & Marx, 100,000 histological images of human colorectal cancer and healthy tissue, "
        "Zenodo 10.5281/zenodo.1214456 (2018)", "https://zenodo.org/records/1214456", True),
}


class OfflineError(RuntimeError):
    """The dataset is not on disk and cannot be downloaded (offline mode or no network)."""


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "VLM_LAB_OFFLINE"))


def _download(url: str, dest: Path) -> None:
    """Stream ``url`` to ``dest`` (via a temp file + rename, so a broken download leaves nothing behind)."""
    import urllib.request
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, os.fdopen(fd, "wb") as f:  # noqa: S310 (fixed URLs)
            shutil.copyfileobj(r, f, length=1 << 20)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safe_extract(zpath: Path, root: Path) -> Path:
    with zipfile.ZipFile(zpath) as z:
        for m in z.namelist():
            target = (root / m).resolve()
            if not str(target).startswith(str(root.resolve())):
                raise ValueError(f"refusing to extract {m!r} from {zpath}: it points outside {root}")
        z.extractall(root)
        top = {m.split("/")[0] for m in z.namelist() if m.strip("/")}
    return root / top.pop() if len(top) == 1 else root


def _manual_hint(src: DatasetSource, root: Path) -> str:
    return (f"Download it by hand from {src.url} (landing page {src.homepage}; licence {src.licence}) and save it "
            f"as {root / src.filename}; fetch() will then use the local copy.")


def fetch(name: str, root: str | Path, *, downloader: Callable[[str, Path], None] | None = None) -> Path:
    """Local path of dataset ``name`` (a key of ``SOURCES``) under ``root``, downloading it if needed.

    Returns the ``.npz`` file (PathMNIST) or the extracted folder (NCT-CRC-HE-100K). Raises
    :class:`OfflineError` when the data is missing and offline mode is on or the download fails.
    """
    key = name.lower()
    if key not in SOURCES:
        raise ValueError(f"name: expected one of {sorted(SOURCES)}, got {name!r}")
    src = SOURCES[key]
    root = Path(root).expanduser()
    dest = root / src.filename
    if not dest.exists():
        if _offline():
            raise OfflineError(f"{src.name} is not in {root} and offline mode is on (HF_HUB_OFFLINE / "
                               f"VLM_LAB_OFFLINE); nothing was downloaded. {_manual_hint(src, root)}")
        root.mkdir(parents=True, exist_ok=True)
        try:
            (downloader or _download)(src.url, dest)
        except OSError as exc:  # URLError, timeouts and DNS failures are OSErrors
            raise OfflineError(f"could not download {src.name} from {src.url}: {exc}. The network may be "
                               f"unavailable. {_manual_hint(src, root)}") from exc
        meta = {**asdict(src), "sha256": _sha256(dest),
                "downloaded": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        dest.with_name(dest.name + ".source.json").write_text(json.dumps(meta, indent=2))
    if src.extract:
        out = root / src.filename.removesuffix(".zip")
        return out if out.is_dir() else _safe_extract(dest, root)
    return dest
