"""Bad input across the public API and the demo functions: every case must raise a clear error (ValueError /
TypeError naming the argument) and leave the model's weights and the files on disk unchanged; plus property-based
tests (hypothesis) over the tokenizers and the shape checks.

The app-level cases (uploads through the launched server) are in tests/test_demos.py; checkpoint files that are
not safetensors or do not fit are in tests/test_faults.py.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm_lab.data.tokenizers import shapes_tokenizer
from vlm_lab.data.transforms import check_image_tensor
from vlm_lab.demos import app as A
from vlm_lab.demos.images import ImageError, ImageLimits, check_image, load_image, to_model_input
from vlm_lab.eval.zero_shot import encode_texts, zero_shot_classifier
from vlm_lab.models.registry import build_model, model_from_dict
from vlm_lab.nn.embed import check_pixel_values, check_token_ids

HYPO = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def _png(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """A PNG whose header claims width x height (valid CRCs), with a tiny IDAT: a decompression-bomb header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _encoded(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


SCENE = (np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
PNG = _encoded(SCENE, "PNG")
JPEG = _encoded(SCENE, "JPEG", quality=90)

# ------------------------------------------------------------------------------------------- uploaded files

BAD_FILES = {
    "empty file": (b"", "empty"),
    "text with an image name": (b"hello, not an image\n" * 20, "not a readable image"),
    "truncated PNG": (PNG[: len(PNG) // 2], "truncated or corrupt"),
    "truncated JPEG": (JPEG[: len(JPEG) // 2], "truncated or corrupt"),
    "PNG header only": (PNG[:40], "truncated or corrupt|not a readable image"),
    "decompression bomb 30000 x 30000": (_png(30_000, 30_000), "too large|pixels|decompression"),
    "bomb under Pillow's limit, 5000 x 5000": (_png(5_000, 5_000), "more than the"),
    "tiny 2 x 2": (_encoded(SCENE[:2, :2], "PNG"), "too small"),
    "SVG": (b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>',
            "not a readable image"),
    "TIFF (format not accepted)": (_encoded(SCENE, "TIFF"), "not a readable image"),
    "16-bit grey PNG": (_encoded(np.full((32, 32), 40_000, np.uint16), "PNG"), "mode"),
    "random bytes with a PNG signature": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "not a readable image|corrupt"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_image_files_are_refused(case, tmp_path):
    data, message = BAD_FILES[case]
    path = tmp_path / "upload.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=message):
        load_image(path)
    with pytest.raises(ImageError, match=message):
        load_image(data)
    assert path.read_bytes() == data  # the upload is never modified


def test_file_size_cap(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(PNG)
    with pytest.raises(ImageError, match="MiB"):
        load_image(path, ImageLimits(max_bytes=len(PNG) - 1))
    with pytest.raises(TypeError, match="source"):
        load_image(12345)


def test_good_files_of_every_accepted_kind():
    rgba = np.dstack([SCENE, np.full(SCENE.shape[:2], 128, np.uint8)])
    for data in (PNG, JPEG, _encoded(SCENE, "WEBP"), _encoded(SCENE, "BMP"), _encoded(SCENE, "GIF"),
                 _encoded(rgba, "PNG"), _encoded(SCENE[..., 0], "PNG"), _encoded(SCENE, "PNG", bits=4)):
        img = load_image(data)
        assert img.mode == "RGB" and img.size == (48, 40)


# -------------------------------------------------------------------------------------- in-memory images

BAD_ARRAYS = {
    "NaN float image": (np.full((32, 32, 3), np.nan, np.float32), ImageError, "NaN"),
    "float image outside [0, 1]": (np.full((32, 32, 3), 3.0, np.float32), ImageError, r"\[0, 1\]"),
    "int64 image": (np.zeros((32, 32, 3), np.int64), TypeError, "dtype"),
    "two channels": (np.zeros((32, 32, 2), np.uint8), ImageError, "shape"),
    "4-d batch": (np.zeros((2, 32, 32, 3), np.uint8), ImageError, "shape"),
    "1-d": (np.zeros(99, np.uint8), ImageError, "shape"),
    "too small": (np.zeros((4, 32, 3), np.uint8), ImageError, "too small"),
    "too many pixels": (np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (5000, 4000, 3)), ImageError, "pixels"),
    "a torch tensor": (torch.zeros(3, 32, 32), TypeError, "PIL image or a numpy"),
    "a list": ([[0, 1], [2, 3]], TypeError, "PIL image or a numpy"),
    "16-bit PIL image": (Image.fromarray(np.zeros((32, 32), np.uint16)), ImageError, "mode"),
}


@pytest.mark.parametrize("case", list(BAD_ARRAYS))
def test_bad_in_memory_images_are_refused(case):
    value, error, message = BAD_ARRAYS[case]
    copy = value.copy() if isinstance(value, np.ndarray) and value.flags.writeable else None
    with pytest.raises(error, match=message):
        check_image(value)
    if copy is not None:
        np.testing.assert_array_equal(value, copy)  # the caller's array is not modified


def test_to_model_input_checks_its_arguments():
    img = check_image(SCENE)
    assert tuple(to_model_input(img, 17).shape) == (1, 3, 17, 17)
    with pytest.raises(TypeError, match="RGB PIL image"):
        to_model_input(SCENE, 32)
    with pytest.raises(ValueError, match="size"):
        to_model_input(img, 0)


# --------------------------------------------------------------------------------------------- models

@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return build_model("clip", "toy", vocab_size=200, context_length=17).eval()


BAD_PIXELS = {
    "wrong size": (lambda s: torch.randn(1, 3, s - 1, s - 1), ValueError, "pixels"),
    "one channel": (lambda s: torch.randn(1, 1, s, s), ValueError, "channels"),
    "channels last": (lambda s: torch.randn(1, s, s, 3), ValueError, "channels|pixels"),
    "uint8": (lambda s: torch.zeros(1, 3, s, s, dtype=torch.uint8), TypeError, "floating-point"),
    "float64 into a float32 model": (lambda s: torch.randn(1, 3, s, s, dtype=torch.float64), TypeError, "dtype"),
    "no batch dim": (lambda s: torch.randn(3, s, s), ValueError, "shape"),
    "empty batch": (lambda s: torch.randn(0, 3, s, s), ValueError, "empty"),
    "NaN": (lambda s: torch.full((1, 3, s, s), float("nan")), ValueError, "NaN"),
    "Inf": (lambda s: torch.full((1, 3, s, s), float("inf")), ValueError, "NaN or inf"),
    "numpy array": (lambda s: np.zeros((1, 3, s, s), np.float32), TypeError, "torch.Tensor"),
}


@functools.lru_cache(maxsize=None)
def _toy(model_name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(model_name, "toy").eval()


@pytest.mark.parametrize("model_name", ["clip", "coca", "blip2"])
@pytest.mark.parametrize("case", list(BAD_PIXELS))
def test_bad_pixel_values_leave_the_model_unchanged(model_name, case):
    model = _toy(model_name)
    before = _state(model)
    make, error, message = BAD_PIXELS[case]
    with pytest.raises(error, match=message):
        model.encode_image(make(model.config.image_size))
    assert _same(model, before)


BAD_IDS = {
    "id beyond the vocabulary": (lambda v, n: torch.tensor([[1, v + 5]]), ValueError, "vocabulary"),
    "negative id": (lambda v, n: torch.tensor([[1, -1]]), ValueError, "lie in"),
    "float ids": (lambda v, n: torch.ones(1, 4), TypeError, "integer"),
    "no tokens": (lambda v, n: torch.zeros(1, 0, dtype=torch.long), ValueError, "empty"),
    "longer than the context": (lambda v, n: torch.ones(1, n + 3, dtype=torch.long), ValueError, "at most"),
    "1-d ids": (lambda v, n: torch.ones(5, dtype=torch.long), ValueError, "shape"),
}


@pytest.mark.parametrize("case", list(BAD_IDS))
def test_bad_token_ids_leave_the_model_unchanged(clip, case):
    before = _state(clip)
    make, error, message = BAD_IDS[case]
    ids = make(clip.config.vocab_size, clip.config.context_length)
    with pytest.raises(error, match=message):
        clip.encode_text(ids, torch.ones_like(ids, dtype=torch.long) if ids.dim() == 2 else None)
    assert _same(clip, before)


BAD_MASKS = {
    "all padding": (torch.zeros(1, 5, dtype=torch.long), "mask out every token"),
    "values other than 0 / 1": (torch.full((1, 5), 7), "only 0"),
    "shape of other ids": (torch.ones(1, 6, dtype=torch.long), "shape of input_ids"),
    "not a tensor": ([[1, 1, 1, 1, 1]], "torch.Tensor"),
}


@pytest.mark.parametrize("model_name", ["clip", "coca"])
@pytest.mark.parametrize("case", list(BAD_MASKS))
def test_bad_attention_masks_are_refused(model_name, case):
    model = _toy(model_name)
    before = _state(model)
    mask, message = BAD_MASKS[case]
    with pytest.raises((ValueError, TypeError), match=message):
        model.encode_text(torch.ones(1, 5, dtype=torch.long), mask)
    assert _same(model, before)


def test_bad_decoding_settings_in_the_model_api():
    coca = _toy("coca")
    px = torch.zeros(1, 3, 32, 32)
    for kwargs, message in (({"method": "nucleus", "temperature": float("nan")}, "temperature"),
                            ({"method": "nucleus", "temperature": 0.0}, "temperature"),
                            ({"method": "nucleus", "top_p": float("nan")}, "top_p"),
                            ({"method": "beam", "num_beams": 0}, "num_beams"),
                            ({"method": "topk"}, "method"), ({"max_new_tokens": 0}, "max_new_tokens"),
                            ({"bos_token_id": -1}, "bos_token_id")):
        kwargs = {"bos_token_id": 2, "eos_token_id": 3, **kwargs}
        with pytest.raises(ValueError, match=message):
            coca.generate(px, **kwargs)


def test_unknown_presets_models_and_config_keys():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        build_model("clip", "huge")
    with pytest.raises(ValueError, match="unknown model 'clop'"):
        build_model("clop")
    with pytest.raises(ValueError, match="widht"):
        model_from_dict("clip", {"widht": 3})
    with pytest.raises(TypeError, match="config"):
        model_from_dict("clip", [1, 2])
    with pytest.raises(ValueError, match="finite"):
        build_model("clip", "toy", logit_scale_init=float("nan"))
    with pytest.raises(ValueError, match="positive"):
        build_model("clip", "toy", embed_dim=-3)
    from vlm_lab.train.recipes import get_recipe

    with pytest.raises(KeyError, match="no recipe"):
        get_recipe("nope")
    with pytest.raises(ValueError, match="preset"):
        get_recipe("clip").build("paper")


def test_empty_and_overlong_text_in_the_eval_api(clip):
    tok = shapes_tokenizer(model_max_length=17)
    before = _state(clip)
    for texts, message in (([], "non-empty"), ("a red circle", "non-empty"), (["a red circle", "  "], "empty"),
                           (None, "list of strings"), ([1, 2], "strings only")):
        with pytest.raises((ValueError, TypeError), match=message):
            encode_texts(clip, tok, texts)
    with pytest.raises(ValueError, match="at most 17"):  # no silent truncation: the model refuses 30 tokens
        encode_texts(clip, tok, ["a red circle " * 10])
    with pytest.raises(ValueError, match="templates"):
        zero_shot_classifier(clip, tok, ["red circle"], templates=["no slot"])
    with pytest.raises(ValueError, match="class_names"):
        zero_shot_classifier(clip, tok, [])
    assert _same(clip, before)


# ------------------------------------------------------------------------------------------ demo functions

@pytest.fixture(scope="module")
def demo_models(clip):
    return A.DemoModels(clip=clip, clip_tokenizer=shapes_tokenizer(model_max_length=17))


def test_demo_functions_refuse_bad_requests(demo_models):
    img = A._sample_image("shapes")
    before = _state(demo_models.clip)
    cases = [
        (lambda: A.zero_shot(demo_models, img, "imagenet", "a\nb", "{}"), "world"),
        (lambda: A.zero_shot(demo_models, img, A.WORLDS[0], "red circle\nred circle", "a {}"), "duplicates"),
        (lambda: A.zero_shot(demo_models, img, A.WORLDS[0], "red {x}\nblue", "a {}"), "stray"),
        (lambda: A.zero_shot(demo_models, img, A.WORLDS[0], "red\nblue", "a {} {}"), "exactly once"),
        (lambda: A.zero_shot(demo_models, img, A.WORLDS[0], "\n".join(f"c{i}" for i in range(99)), "{}"), "at most"),
        (lambda: A.zero_shot(demo_models, img, A.WORLDS[0], "red circle\nblue " + "big " * 30, "a {}"), "tokens"),
        (lambda: A.zero_shot(demo_models, None, A.WORLDS[0], "red\nblue", "a {}"), "no image"),
        (lambda: A.zero_shot(demo_models, img, A.WORLDS[0], None, "a {}"), "expected text"),
        (lambda: A.retrieve_images(demo_models, "", 3), "empty"),
        (lambda: A.retrieve_images(demo_models, "x" * 500, 3), "at most"),
        (lambda: A.retrieve_images(demo_models, "a red circle", 0), "k:"),
        (lambda: A.retrieve_images(demo_models, "a red circle", float("nan")), "k:"),
        (lambda: A.retrieve_texts(demo_models, np.full((32, 32, 3), np.nan), 3), "NaN"),
    ]
    for call, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            call()
    assert _same(demo_models.clip, before)


def test_caption_refuses_bad_decoding_settings():
    torch.manual_seed(0)
    coca = build_model("coca", "toy", vocab_size=238).eval()
    from vlm_lab.train.conch import pathology_tokenizer

    models = A.DemoModels(coca=coca, coca_tokenizer=pathology_tokenizer())
    before = _state(coca)
    tile = A._sample_image("pathology")
    for kwargs, message in (({"method": "sampling"}, "method"), ({"num_beams": 0}, "num_beams"),
                            ({"max_new_tokens": 400}, "max_new_tokens"), ({"top_p": 0.0}, "top_p"),
                            ({"temperature": float("nan")}, "temperature"), ({"seed": -1}, "seed")):
        with pytest.raises(ValueError, match=message):
            A.caption(models, tile, **kwargs)
    assert _same(coca, before)
    with pytest.raises(ValueError, match="layer"):
        A.qformer_trace(A.DemoModels(), A._sample_image("shapes"), "qformer.layers.1.cross_attn")


# ------------------------------------------------------------------------------------ property-based tests

WORDS = st.sampled_from(["a", "red", "blue", "circle", "square", "left", "of", "the", "small", "star", "zebra",
                         "Ünïcode", "日本", "🙂", "?", ",", "-", "42"])


@HYPO
@given(st.lists(WORDS, min_size=1, max_size=40))
def test_shapes_tokenizer_ids_are_in_range_and_lossless_on_known_words(words):
    tok = _shapes_tokenizer(64)
    text = " ".join(words)
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert all(0 <= i < len(tok) for i in ids)
    known = [w for w in words if w in ("a", "red", "blue", "circle", "square", "left", "of", "the", "small", "star")]
    if len(known) == len(words):  # every word in the shapes vocabulary: one token per word, decodes back
        assert len(ids) == len(words) + 2
        assert tok.decode(ids, skip_special_tokens=True) == text
        check_token_ids(torch.tensor([ids]), len(tok), 64)


@HYPO
@given(st.text(min_size=0, max_size=300))
def test_shapes_tokenizer_never_crashes_and_model_refuses_overlong(text):
    tok = _shapes_tokenizer(17)
    ids = tok(text)["input_ids"]
    assert all(0 <= i < len(tok) for i in ids)
    t = torch.tensor([ids])
    if len(ids) > 17:
        with pytest.raises(ValueError, match="at most 17"):
            check_token_ids(t, len(tok), 17)
    else:
        check_token_ids(t, len(tok), 17)


@functools.lru_cache(maxsize=None)
def _shapes_tokenizer(length: int):
    return shapes_tokenizer(model_max_length=length)


@functools.lru_cache(maxsize=1)
def _pathology_tokenizer():
    from vlm_lab.train.conch import pathology_tokenizer

    return pathology_tokenizer()


@HYPO
@given(st.text(min_size=0, max_size=200))
def test_pathology_tokenizer_ids_in_range(text):
    tok = _pathology_tokenizer()
    ids = tok(text)["input_ids"]
    assert all(0 <= i < len(tok) for i in ids) and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id


DTYPES = st.sampled_from([torch.float32, torch.float16, torch.float64, torch.uint8, torch.int64, torch.bool])


@HYPO
@given(st.lists(st.integers(0, 6), min_size=0, max_size=5), DTYPES, st.sampled_from([None, 4, 5]),
       st.booleans())
def test_pixel_checks_accept_exactly_the_valid_tensors(shape, dtype, image_size, poison):
    x = torch.zeros(shape, dtype=dtype)
    if poison and x.numel() and dtype.is_floating_point:
        x.view(-1)[0] = float("nan")
    valid = (len(shape) == 4 and dtype.is_floating_point and shape[1] == 3 and shape[0] > 0
             and (image_size is None or shape[2:] == [image_size, image_size]) and not (poison and x.numel()))
    if valid:
        check_pixel_values(x, image_size)
    else:
        with pytest.raises((ValueError, TypeError), match="pixel_values"):
            check_pixel_values(x, image_size)
    # the data-side validator agrees on the shape and dtype rules (it accepts empty batches)
    data_valid = (len(shape) == 4 and dtype.is_floating_point and shape[1] == 3
                  and (image_size is None or shape[2:] == [image_size, image_size]) and not (poison and x.numel()))
    if data_valid:
        check_image_tensor(x, image_size)
    else:
        with pytest.raises((ValueError, TypeError), match="pixel_values"):
            check_image_tensor(x, image_size)


@HYPO
@given(st.integers(1, 64), st.integers(1, 64), st.sampled_from([1, 3, 4]), st.sampled_from(["uint8", "float"]))
def test_check_image_property(h, w, c, kind):
    rng = np.random.default_rng(h * 100 + w)
    arr = rng.random((h, w, c)) if kind == "float" else rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    if min(h, w) < 8:
        with pytest.raises(ImageError, match="too small"):
            check_image(arr)
        return
    img = check_image(arr)
    assert img.mode == "RGB" and img.size == (w, h)
    x = to_model_input(img, 8)
    assert tuple(x.shape) == (1, 3, 8, 8) and torch.isfinite(x).all()


@HYPO
@given(st.lists(st.integers(0, 5), min_size=1, max_size=3), st.sampled_from([torch.long, torch.int32, torch.float32,
                                                                              torch.bool]),
       st.integers(-3, 12), st.integers(-3, 12), st.sampled_from([None, 3, 4]))
def test_token_id_checks_accept_exactly_the_valid_tensors(shape, dtype, lo, hi, max_length):
    vocab = 10
    lo, hi = min(lo, hi), max(lo, hi)
    ids = torch.zeros(shape, dtype=torch.long)
    if ids.numel():
        ids.view(-1)[0], ids.view(-1)[-1] = lo, hi
    in_range = not ids.numel() or (int(ids.min()) >= 0 and int(ids.max()) < vocab)  # (one element: only hi)
    ids = ids.to(dtype)
    valid = (len(shape) == 2 and dtype in (torch.long, torch.int32) and shape[0] > 0 and shape[1] > 0
             and (max_length is None or shape[1] <= max_length) and in_range)
    if valid:
        check_token_ids(ids, vocab, max_length)
    else:
        with pytest.raises((ValueError, TypeError), match="input_ids"):
            check_token_ids(ids, vocab, max_length)


@HYPO
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 2), st.booleans())
def test_attention_mask_checks(b, n, fill, reshape):
    from vlm_lab.nn.embed import check_attention_mask

    ids = torch.ones(b, n, dtype=torch.long)
    mask = torch.full((b, n + int(reshape)), fill, dtype=torch.long)
    if not reshape and fill == 1:
        check_attention_mask(mask, ids)
        mask[0, 1:] = 0  # padding after the first token is fine
        check_attention_mask(mask, ids)
    else:
        with pytest.raises(ValueError, match="attention_mask"):
            check_attention_mask(mask, ids)
