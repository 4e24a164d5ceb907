"""Offline tokenizers: special tokens, the shapes vocabulary, save / load round trips, bad input."""
import json
import os
import subprocess
import sys

import pytest

from vlm_lab.data.shapes import ShapesDataset, caption_corpus, derive_caption
from vlm_lab.data.tokenizers import load_tokenizer, shapes_tokenizer, train_bpe, train_wordpiece

TEXTS = ["a small red circle left of a blue square", "the quick brown fox jumps over the lazy dog",
         "vision language models align images and text", "a large green triangle"] * 5


@pytest.fixture(scope="module")
def wp():
    return shapes_tokenizer(model_max_length=24)


def test_wordpiece_special_tokens(wp):
    assert [wp.pad_token_id, wp.unk_token_id, wp.cls_token_id, wp.sep_token_id, wp.mask_token_id] == [0, 1, 2, 3, 4]
    assert wp.bos_token_id == wp.cls_token_id and wp.eos_token_id == wp.sep_token_id
    assert wp.model_max_length == 24
    ids = wp("A Small RED circle").input_ids
    assert ids[0] == wp.cls_token_id and ids[-1] == wp.sep_token_id
    assert wp.convert_ids_to_tokens(ids[1:-1]) == ["a", "small", "red", "circle"]  # lowercased, one token per word
    assert wp.decode(ids, skip_special_tokens=True) == "a small red circle"


def test_no_unk_on_any_shapes_caption(wp):
    texts = caption_corpus()
    for split in ("train", "heldout", "all"):
        ds = ShapesDataset(split, n=300, seed=1)
        texts += [derive_caption(ds.scene(i)) for i in range(len(ds))]
    enc = wp(texts).input_ids
    assert all(wp.unk_token_id not in ids for ids in enc)
    # every word of the world is a single token
    for ids, text in zip(enc[:200], texts[:200]):
        assert len(ids) - 2 == len(text.replace(":", " :").replace("?", " ?").split())


def test_shapes_tokenizer_deterministic_across_processes(wp):
    code = ("import json; from vlm_lab.data.tokenizers import shapes_tokenizer; "
            "print(json.dumps(sorted(shapes_tokenizer().get_vocab().items())))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert [tuple(x) for x in json.loads(out.strip().splitlines()[-1])] == sorted(wp.get_vocab().items())


def test_wordpiece_save_load_round_trip(wp, tmp_path):
    wp.save_pretrained(tmp_path / "wp")
    loaded = load_tokenizer(tmp_path / "wp")
    texts = caption_corpus()[::50]
    assert loaded(texts).input_ids == wp(texts).input_ids
    assert loaded.eos_token_id == wp.eos_token_id == 3 and loaded.bos_token_id == 2
    assert loaded.pad_token_id == 0 and loaded.mask_token == "[MASK]" and loaded.model_max_length == 24


def test_train_wordpiece_generic_text():
    tok = train_wordpiece(TEXTS, vocab_size=120, model_max_length=16)
    assert len(tok) <= 120
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    ids = tok("the lazy fox").input_ids
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "the lazy fox"
    assert tok.unk_token_id in tok("ßüñ €").input_ids  # unseen characters are unknown, not dropped
    cased = train_wordpiece(TEXTS, vocab_size=120, lowercase=False)
    assert cased.decode(cased("Red").input_ids, skip_special_tokens=True) != "red"


def test_bpe_special_tokens_and_round_trip(tmp_path):
    tok = train_bpe(TEXTS, vocab_size=300, model_max_length=20)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.image_token == "<image>" and tok.convert_tokens_to_ids("<image>") == 4
    ids = tok("<image> a red circle").input_ids
    assert ids[0] == 1 and ids[-1] == 2 and ids[1] == 4  # <image> is never split
    assert tok.decode(tok("ünïcode ✓ text").input_ids, skip_special_tokens=True) == "ünïcode ✓ text"  # byte-level
    tok.save_pretrained(tmp_path / "bpe")
    loaded = load_tokenizer(tmp_path / "bpe")
    assert loaded(TEXTS).input_ids == tok(TEXTS).input_ids
    assert loaded.eos_token_id == 2 and loaded.convert_tokens_to_ids("<image>") == 4
    extra = train_bpe(TEXTS, vocab_size=300, extra_special_tokens=("<image>", "<region>"))
    assert extra.convert_tokens_to_ids("<region>") == 5


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="path"):
        load_tokenizer("bert-base-uncased")  # a hub id is not fetched
    (tmp_path / "empty").mkdir()
    with pytest.raises((ValueError, OSError)):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(TypeError, match="path"):
        load_tokenizer(3)


def test_training_bad_inputs():
    with pytest.raises(ValueError, match="texts"):
        train_wordpiece([])
    with pytest.raises(TypeError, match="texts"):
        train_wordpiece("a single string")
    with pytest.raises(ValueError, match="texts"):
        train_bpe(["", "  "])
    with pytest.raises(ValueError, match="vocab_size"):
        train_wordpiece(TEXTS, vocab_size=3)
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(TEXTS, vocab_size=100)  # below the 256 bytes
    with pytest.raises(ValueError, match="extra_special_tokens"):
        train_bpe(TEXTS, extra_special_tokens=("<s>",))
