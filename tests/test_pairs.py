"""Real-data loaders (CSV / JSONL / folders / MedMNIST .npz) with corrupt files and bad rows; fetch's offline
error path (no network is attempted); the scikit-image IHC sample, tiling and H/E/DAB deconvolution."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_lab.data import fetch as fetch_mod
from vlm_lab.data import samples
from vlm_lab.data.pairs import (
    PATHMNIST_CLASSES, DataError, NpzImageText, from_csv, from_folder, from_jsonl,
)
from vlm_lab.data.transforms import to_uint8


def _png(path, value=100, size=(12, 10)):
    arr = np.full((size[1], size[0], 3), value, np.uint8)
    arr[0, 0] = (255, 0, 0)
    Image.fromarray(arr).save(path)
    return arr


@pytest.fixture
def files(tmp_path):
    good = _png(tmp_path / "good.png", 100)
    _png(tmp_path / "good2.png", 50)
    full = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(full[: len(full) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image at all")
    return tmp_path, good


def test_csv_raise_lists_every_problem(files):
    root, _ = files
    (root / "m.csv").write_text(
        "image,caption,caption_2,label\n"
        "good.png,a tile,another view,1\n"
        "good2.png,,second caption only,2\n"
        "missing.png,gone,,0\n"
        "truncated.png,cut,,0\n"
        "garbage.jpg,junk,,0\n"
        "good.png,  ,,0\n"
        ",no image,,0\n"
        "good.png,bad label,,x\n")
    with pytest.raises(DataError) as ei:
        from_csv(root / "m.csv", caption_cols=["caption", "caption_2"], label_col="label")
    rep = ei.value.report
    assert rep.counts() == {"missing image": 1, "corrupt image": 2, "empty caption": 1, "bad row": 1, "bad label": 1}
    assert rep.n_rows == 8 and rep.n_kept == 2 and rep.n_skipped == 6
    msg = str(ei.value)
    assert "missing.png" in msg and "truncated.png" in msg and "on_error='skip'" in msg


def test_csv_skip_keeps_good_rows_and_reports(files):
    root, good = files
    (root / "m.csv").write_text("image,caption,caption_2\ngood.png,a tile,another view\n"
                                "good2.png,,second only\nmissing.png,gone,\n")
    ds = from_csv(root / "m.csv", caption_cols=["caption", "caption_2"], on_error="skip")
    assert len(ds) == 2 and ds.report.n_skipped == 1
    assert [i.reason for i in ds.report.issues] == ["missing image"]
    assert ds.report.issues[0].where.endswith("missing.png")
    it = ds[0]
    assert it["caption"] == "a tile" and it["pixel_values"].shape == (3, 10, 12)
    assert np.array_equal(to_uint8(it["pixel_values"]), good)   # normalised with the shared mean / std
    assert ds[1]["caption"] == "second only"
    # several captions: "random" picks among them, reproducibly, and varies across epochs
    ds2 = from_csv(root / "m.csv", caption_cols=["caption", "caption_2"], on_error="skip", pick="random",
                   image_size=16)
    seen = set()
    for e in range(12):
        ds2.set_epoch(e)
        seen.add(ds2[0]["caption"])
    assert seen == {"a tile", "another view"} and ds2[0]["pixel_values"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="lacks column"):
        from_csv(root / "m.csv", caption_cols="text")
    with pytest.raises(ValueError, match="on_error"):
        from_csv(root / "m.csv", on_error="ignore")


def test_jsonl_with_lists_bad_json_and_labels(files):
    root, _ = files
    lines = [json.dumps({"image": "good.png", "caption": ["one", "two"], "y": 3}),
             "{not json",
             json.dumps({"caption": "no image"}),
             json.dumps({"image": "good2.png", "caption": "", "y": 1}),
             json.dumps({"image": "garbage.jpg", "caption": "junk", "y": 1}),
             json.dumps({"image": "good2.png", "caption": "ok", "y": "three"}),
             ""]
    (root / "m.jsonl").write_text("\n".join(lines))
    ds = from_jsonl(root / "m.jsonl", label_key="y", on_error="skip")
    assert len(ds) == 1 and ds[0]["labels"] == 3 and ds[0]["caption"] == "one"
    assert ds.report.counts() == {"bad row": 2, "empty caption": 1, "corrupt image": 1, "bad label": 1}
    assert ds.report.n_rows == 6
    with pytest.raises(DataError):
        from_jsonl(root / "m.jsonl")
    with pytest.raises(FileNotFoundError, match="path"):
        from_jsonl(root / "nope.jsonl")


def test_class_folders(tmp_path):
    for c, v in (("ADI", 240), ("TUM", 80)):
        (tmp_path / c).mkdir()
        _png(tmp_path / c / "a.png", v)
    (tmp_path / "TUM" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="not an image"):
        from_folder(tmp_path)
    ds = from_folder(tmp_path, class_names={"ADI": "adipose tissue"}, on_error="skip")
    assert ds.classes == ["ADI", "TUM"] and len(ds) == 2
    assert ds[0]["caption"] == "an H&E image of adipose tissue." and ds[0]["labels"] == 0
    assert ds[1]["caption"] == "an H&E image of TUM." and ds[1]["labels"] == 1
    assert ds.report.counts() == {"not an image": 1}


def test_medmnist_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (7, 28, 28, 3), dtype=np.uint8)
    y = np.array([[0], [8], [3], [9], [1], [-1], [4]])
    np.savez(tmp_path / "pathmnist.npz", train_images=x, train_labels=y, val_images=x[:2], val_labels=y[:2],
             test_images=x[:, :, :, 0], test_labels=y % 9)
    with pytest.raises(DataError) as ei:
        NpzImageText(tmp_path / "pathmnist.npz")
    assert ei.value.report.counts() == {"bad label": 2}
    ds = NpzImageText(tmp_path / "pathmnist.npz", on_error="skip")
    assert len(ds) == 5 and ds.report.n_skipped == 2
    it = ds[1]
    assert it["labels"] == 8 and it["caption"] == f"an H&E image of {PATHMNIST_CLASSES[8]}."
    assert np.array_equal(to_uint8(it["pixel_values"]), x[1])
    gray = NpzImageText(tmp_path / "pathmnist.npz", split="test", image_size=32)
    assert gray[0]["pixel_values"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="split"):
        NpzImageText(tmp_path / "pathmnist.npz", split="holdout")
    np.savez(tmp_path / "bad.npz", train_images=x.astype(np.float32), train_labels=y)
    with pytest.raises(ValueError, match="uint8"):
        NpzImageText(tmp_path / "bad.npz")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(ValueError, match="npz"):
        NpzImageText(tmp_path / "corrupt.npz")
    # object arrays are refused (allow_pickle=False): an .npz cannot run code here
    np.savez(tmp_path / "obj.npz", train_images=np.array([object()], dtype=object), train_labels=y[:1])
    with pytest.raises(ValueError):
        NpzImageText(tmp_path / "obj.npz")
    # works with the collator-style consumer: stackable
    assert torch.stack([ds[i]["pixel_values"] for i in range(len(ds))]).shape == (5, 3, 28, 28)


def test_fetch_offline_never_touches_the_network(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fetch_mod, "_download", lambda url, dest: calls.append(url))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(fetch_mod.OfflineError, match="offline") as ei:
        fetch_mod.fetch("pathmnist", tmp_path)
    assert "zenodo.org" in str(ei.value) and "CC BY 4.0" in str(ei.value) and calls == []
    # online but unreachable: the downloader's OSError becomes a clear OfflineError
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("VLM_LAB_OFFLINE", raising=False)

    def unreachable(url, dest):
        calls.append(url)
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(fetch_mod, "_download", unreachable)
    with pytest.raises(fetch_mod.OfflineError, match="network may be unavailable"):
        fetch_mod.fetch("NCT-CRC-HE-100K", tmp_path)
    assert len(calls) == 1 and not (tmp_path / "NCT-CRC-HE-100K.zip").exists()
    # a file already on disk is returned without any download
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "pathmnist.npz").write_bytes(b"x")
    assert fetch_mod.fetch("pathmnist", tmp_path) == tmp_path / "pathmnist.npz"
    with pytest.raises(ValueError, match="name"):
        fetch_mod.fetch("imagenet", tmp_path)
    for src in fetch_mod.SOURCES.values():
        assert src.licence == "CC BY 4.0" and src.url.startswith("https://")


def test_fetch_records_provenance(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("VLM_LAB_OFFLINE", raising=False)
    p = fetch_mod.fetch("pathmnist", tmp_path, downloader=lambda url, dest: dest.write_bytes(b"npz bytes"))
    meta = json.loads((tmp_path / "pathmnist.npz.source.json").read_text())
    assert p.read_bytes() == b"npz bytes" and meta["licence"] == "CC BY 4.0" and meta["url"].startswith("https://")
    assert len(meta["sha256"]) == 64


def test_ihc_sample_tiles_and_deconvolution():
    img = samples.ihc_sample()
    assert img.shape == (512, 512, 3) and img.dtype == np.uint8
    assert "CMMI" in samples.IHC_PROVENANCE["acquired_at"]
    tiles, coords = samples.tile_image(img, 200)
    assert tiles.shape == (4, 200, 200, 3) and coords[1] == (200, 0)
    assert np.array_equal(tiles[3], img[200:400, 200:400])
    tiles2, coords2 = samples.tile_image(img, 200, drop_last=False)
    assert len(coords2) == 9 and coords2[-1] == (312, 312)
    ch = samples.hed_channels(img)
    # DAB (brown) marks a minority of pixels; haematoxylin is everywhere in the counterstain
    dab, h = ch["DAB"], ch["H"]
    assert dab.shape == (512, 512)
    hi = dab > np.percentile(dab, 90)
    rgb = img.astype(float)
    assert rgb[hi][:, 0].mean() - rgb[hi][:, 2].mean() > rgb[~hi][:, 0].mean() - rgb[~hi][:, 2].mean()  # browner
    assert h.mean() > 0
    views = samples.hed_views(img[:64, :64])
    assert set(views) == {"H", "E", "DAB"} and views["H"].dtype == np.uint8
    with pytest.raises(ValueError, match="tile"):
        samples.tile_image(img, 1000)
