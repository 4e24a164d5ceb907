"""ViLT: shapes and masks on odd-sized configs, modality types, patch sampling, objectives, HF parity.

Parity holds for transformers 5.25.0 (``ViltModel``, ``ViltForMaskedLM``, ``ViltForImageAndTextRetrieval``
built from a tiny random ``ViltConfig`` with ``max_image_length=-1`` and an explicit ``pixel_mask``).
"""

import pytest
import torch

from vlm_lab.models import build_model, model_from_dict, model_record
from vlm_lab.models.vilt import ViLT, ViLTConfig

transformers = pytest.importorskip("transformers")


def _cfg(**kw) -> ViLTConfig:
    base = dict(vocab_size=61, max_text_len=13, image_size=40, patch_size=8, width=36, depth=2, heads=3,
                mlp_dim=37, mask_token_id=4, special_token_ids=(0, 1, 2, 3, 4))
    return ViLTConfig(**{**base, **kw})


def _batch(b=3, m=9, size=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 61, (b, m), generator=g)
    am = torch.ones_like(ids)
    ids[:, 0] = 2
    for i, length in enumerate([m, m - 3, m - 5][:b]):
        ids[i, length - 1] = 3
        ids[i, length:] = 0
        am[i, length:] = 0
    return {"input_ids": ids, "attention_mask": am, "pixel_values": torch.randn(b, 3, size, size, generator=g)}


def test_shapes_pooling_and_padding_never_attends():
    torch.manual_seed(0)
    model = ViLT(_cfg()).eval()
    batch = _batch()
    f = model.fuse(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    assert f.hidden.shape == (3, 9 + 1 + 25, 36)
    assert f.text_feats.shape == (3, 9, 36) and f.image_feats.shape == (3, 26, 36)
    assert f.pooled.shape == (3, 36) and f.patch_index.shape == (3, 25, 2)
    assert torch.allclose(f.pooled, torch.tanh(model.pooler(f.hidden[:, 0])))  # pooler = text [CLS]
    # changing padded token ids changes nothing on real positions
    ids2 = batch["input_ids"].clone()
    ids2[batch["attention_mask"] == 0] = 17
    f2 = model.fuse(ids2, batch["pixel_values"], batch["attention_mask"])
    assert torch.allclose(f.pooled, f2.pooled, atol=1e-6)
    assert torch.allclose(f.image_feats, f2.image_feats, atol=1e-6)


def test_modality_types_matter():
    torch.manual_seed(0)
    model = ViLT(_cfg(num_modality_types=3)).eval()
    b = _batch()
    a = model.fuse(b["input_ids"], b["pixel_values"], b["attention_mask"]).pooled
    with torch.no_grad():  # swap rows 0 and 1 of the modality-type table
        w = model.modality.embedding.weight
        w[[0, 1]] = w[[1, 0]]
    swapped = model.fuse(b["input_ids"], b["pixel_values"], b["attention_mask"]).pooled
    assert not torch.allclose(a, swapped, atol=1e-4)
    with torch.no_grad():
        w[[0, 1]] = w[[1, 0]]
        w[2] = w[1]  # NLVR2: row 2 starts as a copy of row 1
    row2 = model.fuse(b["input_ids"], b["pixel_values"], b["attention_mask"], image_token_type_idx=2).pooled
    assert torch.allclose(a, row2, atol=1e-6)


def test_patch_sampling_keeps_k_patches_and_moves_positions():
    torch.manual_seed(0)
    model = ViLT(_cfg(max_image_len=7))
    px = torch.randn(2, 3, 40, 40)
    model.train()
    x, mask, idx = model.visual_embed(px)
    assert x.shape == (2, 1 + 7, 36) and mask.shape == (2, 8) and idx.shape == (2, 7, 2)
    assert len({tuple(r) for r in idx[0].tolist()}) == 7  # without replacement
    # each kept token = its patch projection + the position of *its* grid cell
    proj = model.patch_proj(px).flatten(2).transpose(1, 2)  # (2, 25, 36)
    pos = model.position_embeddings[0, 1:]
    flat = idx[..., 0] * 5 + idx[..., 1]
    assert torch.allclose(x[:, 1:], proj.gather(1, flat[..., None].expand(-1, -1, 36)) + pos[flat], atol=1e-6)
    model.eval()  # eval keeps every patch, in raster order
    x, mask, idx = model.visual_embed(px)
    assert x.shape[1] == 26 and torch.equal(idx[0, :, 0] * 5 + idx[0, :, 1], torch.arange(25))
    # fewer valid patches than K: padding patches fill up and are masked out
    model.train()
    pm = torch.zeros(2, 40, 40, dtype=torch.long)
    pm[0, :24, :24] = 1  # 3 x 3 valid patches: 7 of them are sampled
    pm[1, :16, :16] = 1  # 2 x 2 valid patches: all 4, plus 3 masked padding patches
    _, mask, idx = model.visual_embed(px, pm, max_image_len=7)
    assert mask.shape == (2, 8) and mask[:, 1:].sum(1).tolist() == [7, 4]
    assert (idx[0] < 3).all()


def test_pixel_mask_padding_does_not_leak():
    torch.manual_seed(0)
    model = ViLT(_cfg()).eval()
    b = _batch(b=1)
    pm = torch.zeros(1, 40, 40, dtype=torch.long)
    pm[:, :24, :32] = 1
    px2 = b["pixel_values"].clone()
    px2[:, :, 24:, :] = 5.0  # change only padded pixels
    px2[:, :, :, 32:] = -5.0
    f1 = model.fuse(b["input_ids"], b["pixel_values"], pixel_mask=pm)
    f2 = model.fuse(b["input_ids"], px2, pixel_mask=pm)
    assert torch.allclose(f1.pooled, f2.pooled, atol=1e-6)


def test_forward_losses_and_gradients():
    torch.manual_seed(0)
    model = ViLT(_cfg()).train()
    out = model(_batch(b=3))
    assert out.itm_logits.shape == (3, 2) and out.mlm_logits.shape == (3, 9, 61)
    assert out.itm_labels.sum().item() == 2  # b // 2 = 1 negative
    assert torch.allclose(out.loss, out.loss_itm + out.loss_mlm + out.loss_wpa)
    out.loss.backward()
    assert model.itm_head.weight.grad.abs().sum() > 0 and model.mlm_head.decoder.weight.grad.abs().sum() > 0
    assert model.patch_proj.weight.grad.abs().sum() > 0


def test_mlm_weight_zero_skips_the_mlm_pass():
    torch.manual_seed(0)
    model = ViLT(_cfg(mlm_weight=0.0)).train()
    out = model(_batch(b=4))
    assert out.mlm_logits is None and out.mlm_labels is None and float(out.loss_mlm) == 0.0
    assert torch.allclose(out.loss, out.loss_itm + out.loss_wpa)
    out.loss.backward()
    assert model.mlm_head.decoder.weight.grad is None  # the MLM head was not used
    assert model.itm_head.weight.grad.abs().sum() > 0


def test_shipped_toy_checkpoint_matches_above_chance():
    """assets/vilt-toy (assets/make_vilt_toy.py): held-out ITM clearly above chance; a fresh model is at chance."""
    from pathlib import Path

    from vlm_lab.data.collate import ImageTextCollator
    from vlm_lab.data.shapes import ShapesDataset
    from vlm_lab.data.tokenizers import shapes_tokenizer
    from vlm_lab.train.checkpoint import load_model

    path = Path(__file__).resolve().parents[1] / "assets" / "vilt-toy" / "model.safetensors"
    if not path.is_file():
        pytest.skip("assets/vilt-toy is missing (run assets/make_vilt_toy.py)")
    tok = shapes_tokenizer()
    collate = ImageTextCollator(tok, max_length=24)
    b = collate([ShapesDataset("train", n=128, image_size=32, seed=7)[i] for i in range(128)])

    def accuracy(model):
        with torch.no_grad():
            pos = model.itm_scores(b["input_ids"], b["pixel_values"], b["attention_mask"])
            neg = model.itm_scores(b["input_ids"], b["pixel_values"].roll(1, 0), b["attention_mask"])
        return 0.5 * float((pos > 0).float().mean() + (neg < 0).float().mean())

    model = load_model(path).eval()
    assert isinstance(model, ViLT)
    torch.manual_seed(0)
    fresh = ViLT(model.config).eval()
    assert accuracy(model) > 0.7 and abs(accuracy(fresh) - 0.5) < 0.1


def test_registry_round_trip_and_bad_input():
    model = build_model("vilt", "toy")
    again = model_from_dict("vilt", model_record(model)["config"])
    assert again.config == model.config
    with pytest.raises(ValueError, match="input_ids"):
        model.fuse(torch.full((1, 4), 500), torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="patch_size"):
        model.fuse(torch.full((1, 4), 5), torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="max_image_len"):
        ViLTConfig.toy(max_image_len=0)


def _hf_config():
    return transformers.ViltConfig(
        vocab_size=61, hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=37,
        image_size=48, patch_size=8, max_position_embeddings=13, modality_type_vocab_size=2,
        max_image_length=-1, num_images=-1)


def _hf_inputs():
    b = _batch(b=3, size=48)
    px = torch.randn(3, 3, 48, 40)  # not square, and not the config size: position table is resized
    pm = torch.ones(3, 48, 40, dtype=torch.long)
    pm[1, 32:, :] = 0
    pm[2, :, 24:] = 0
    return b["input_ids"], b["attention_mask"], px, pm


@pytest.mark.parametrize("cls_name", ["ViltModel", "ViltForMaskedLM", "ViltForImageAndTextRetrieval"])
def test_parity_with_transformers(cls_name):
    torch.manual_seed(0)
    hf = getattr(transformers, cls_name)(_hf_config()).eval()
    ours = ViLT.from_hf(hf).eval()
    ids, am, px, pm = _hf_inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=am, pixel_values=px, pixel_mask=pm)
        f = ours.fuse(ids, px, am, pixel_mask=pm)
    if cls_name == "ViltModel":
        assert torch.allclose(ref.pooler_output, f.pooled, atol=1e-5)
        assert torch.allclose(ref.last_hidden_state[:, :9], f.text_feats, atol=1e-5)
    elif cls_name == "ViltForMaskedLM":
        assert torch.allclose(ref.logits, ours.mlm_head(f.text_feats), atol=1e-5)
    else:
        assert torch.allclose(ref.logits, ours.rank_head(f.pooled), atol=1e-5)


def test_parity_image_tokens_after_sorting_by_patch_index():
    torch.manual_seed(0)
    hf = transformers.ViltModel(_hf_config()).eval()
    ours = ViLT.from_hf(hf).eval()
    ids, am, px, pm = _hf_inputs()
    pooled = []
    for seed in (1, 2):  # HF shuffles patches with the global RNG; the pooled output must not care
        torch.manual_seed(seed)
        with torch.no_grad():
            _, _, (hf_index, _) = hf.embeddings.visual_embed(px, pm, max_image_length=-1)
        torch.manual_seed(seed)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=am, pixel_values=px, pixel_mask=pm)
        pooled.append(ref.pooler_output)
        f = ours.fuse(ids, px, am, pixel_mask=pm)
        g_w = px.shape[-1] // 8
        hf_img = ref.last_hidden_state[:, 10:]  # 9 text tokens + image [CLS]
        ours_img = f.image_feats[:, 1:]
        hf_key = hf_index[..., 0] * g_w + hf_index[..., 1]
        our_key = f.patch_index[..., 0] * g_w + f.patch_index[..., 1]
        cell_valid = torch.nn.functional.interpolate(pm[:, None].float(), size=(6, 5)).flatten(1).bool()
        for i in range(3):  # compare real patches (HF fills padding slots with random invalid cells)
            hk, ok = hf_key[i], our_key[i]
            hs, os_ = cell_valid[i][hk], cell_valid[i][ok]
            a = hf_img[i][hs][hk[hs].argsort()]
            o = ours_img[i][os_][ok[os_].argsort()]
            assert a.shape == o.shape and torch.allclose(a, o, atol=1e-5)
        assert torch.allclose(ref.last_hidden_state[:, 9], f.image_feats[:, 0], atol=1e-5)
    assert torch.allclose(pooled[0], pooled[1], atol=1e-5)
