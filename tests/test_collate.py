"""ImageTextCollator: batch contract, right padding, end token position, no silent truncation."""
import pytest
import torch
from torch.utils.data import DataLoader

from vlm_lab.data.collate import ImageTextCollator, tokenize_captions
from vlm_lab.data.shapes import ShapesDataset
from vlm_lab.data.tokenizers import shapes_tokenizer, train_bpe


@pytest.fixture(scope="module")
def tok():
    return shapes_tokenizer()


def _items(captions, size=18):
    return [{"pixel_values": torch.randn(3, size, size), "caption": c, "labels": i} for i, c in enumerate(captions)]


def test_batch_contract_padding_and_eos(tok):
    caps = ["a red circle", "a small blue square left of a large green star", "a star"]
    batch = ImageTextCollator(tok, max_length=16)(_items(caps))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert batch["pixel_values"].shape == (3, 3, 18, 18) and batch["pixel_values"].dtype == torch.float32
    assert ids.dtype == torch.int64 and mask.dtype == torch.int64 and ids.shape == mask.shape
    assert ids.shape[1] == 12  # longest caption: 10 words + [CLS] + [SEP]
    assert batch["labels"].tolist() == [0, 1, 2] and batch["labels"].dtype == torch.int64
    assert batch["caption"] == caps
    lengths = mask.sum(1)
    assert lengths.tolist() == [5, 12, 4]
    for i, n in enumerate(lengths.tolist()):
        assert mask[i, :n].all() and not mask[i, n:].any()  # right padding
        assert (ids[i, n:] == tok.pad_token_id).all()
        assert ids[i, 0] == tok.cls_token_id
        assert ids[i, n - 1] == tok.eos_token_id
        assert (ids[i] == tok.eos_token_id).nonzero()[0].item() == n - 1  # the first eos ends the caption


def test_empty_captions_raise(tok):
    collate = ImageTextCollator(tok)
    with pytest.raises(ValueError, match="captions"):
        collate(_items(["a red circle", ""]))
    with pytest.raises(ValueError, match="captions"):
        collate(_items(["   "]))
    with pytest.raises(ValueError, match="captions"):
        collate([])
    with pytest.raises(ValueError, match="captions"):
        tokenize_captions(tok, [])


def test_long_caption_raises_unless_truncation(tok):
    cap = "a small red circle left of a large blue square"  # 10 words -> 12 tokens
    with pytest.raises(ValueError, match=r"captions: item 1 is 12 tokens.*max_length=8"):
        ImageTextCollator(tok, max_length=8)(_items(["a star", cap]))
    batch = ImageTextCollator(tok, max_length=8, truncation=True)(_items(["a star", cap]))
    ids = batch["input_ids"]
    assert ids.shape == (2, 8)
    assert tok.convert_ids_to_tokens(ids[1].tolist()) == ["[CLS]", "a", "small", "red", "circle", "left", "of", "[SEP]"]
    assert batch["attention_mask"][1].all()


def test_padding_max_length_and_bpe_tokenizer():
    bpe = train_bpe(["a red circle", "a blue square above a green star"] * 4, vocab_size=300)
    batch = ImageTextCollator(bpe, max_length=20, padding="max_length")(_items(["a red circle", "a blue star"]))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (2, 20)
    for i in range(2):
        n = int(mask[i].sum())
        assert ids[i, 0] == bpe.bos_token_id and ids[i, n - 1] == bpe.eos_token_id
        assert (ids[i, n:] == bpe.pad_token_id).all()
    long = " ".join(["circle"] * 30)
    trunc = ImageTextCollator(bpe, max_length=6, truncation=True)(_items([long]))["input_ids"]
    assert trunc.shape == (1, 6) and trunc[0, -1] == bpe.eos_token_id


def test_bad_batches_raise(tok):
    collate = ImageTextCollator(tok)
    items = _items(["a red circle", "a blue star"])
    items[1]["pixel_values"] = torch.randn(3, 20, 20)
    with pytest.raises(ValueError, match="pixel_values"):
        collate(items)
    with pytest.raises(ValueError, match="caption"):
        collate([{"pixel_values": torch.randn(3, 4, 4)}])
    with pytest.raises(ValueError, match="max_length"):
        ImageTextCollator(tok, max_length=1)
    with pytest.raises(ValueError, match="padding"):
        ImageTextCollator(tok, padding="left")
    no_labels = [{"pixel_values": torch.randn(3, 4, 4), "caption": "a star"}]
    assert "labels" not in collate(no_labels)


def test_dataloader_over_shapes(tok):
    ds = ShapesDataset("all", n=24, image_size=30, seed=0)
    loader = DataLoader(ds, batch_size=8, collate_fn=ImageTextCollator(tok, max_length=24))
    batches = list(loader)
    assert len(batches) == 3
    b = batches[0]
    assert b["pixel_values"].shape == (8, 3, 30, 30)
    assert b["labels"].shape == (8,) and len(b["scene"]) == 8 and len(b["caption"]) == 8
    assert not (b["input_ids"] == tok.unk_token_id).any()
