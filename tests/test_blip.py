"""BLIP: parameter sharing between encoder and decoder, special tokens, prompt masking, parity with transformers'
BlipForImageTextRetrieval / BlipForConditionalGeneration (5.25), CapFilt end to end (model-facts expert test 14)."""

from __future__ import annotations

import pytest
import torch
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

from vlm_lab.losses.captioning import build_lm_labels, lm_loss
from vlm_lab.models.blip import BLIP, BLIPConfig, SHARED_DECODER_PARTS

TINY = dict(image_size=30, patch_size=10, vision_width=36, vision_layers=1, vision_heads=4, vision_mlp_dim=37,
            vocab_size=55, max_text_length=16, text_width=40, text_layers=2, text_heads=4, text_mlp_dim=41,
            pad_token_id=0, cls_token_id=2, sep_token_id=3, dec_token_id=53, enc_token_id=54, embed_dim=20,
            queue_size=8)


def _model(**kw) -> BLIP:
    torch.manual_seed(0)
    return BLIP(BLIPConfig(**{**TINY, **kw}))


def _batch(b: int = 4, n: int = 8, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 53, (b, n), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    ids[1, -3:], mask[1, -3:] = 0, 0
    ids[1, -4] = 3
    return {"pixel_values": torch.randn(b, 3, 30, 30, generator=g), "input_ids": ids, "attention_mask": mask}


def test_encoder_decoder_share_all_but_self_attention():
    model = _model()
    assert model.text_decoder.embeddings is model.text_encoder.embeddings
    for enc, dec in zip(model.text_encoder.layers, model.text_decoder.layers):
        for part in SHARED_DECODER_PARTS:
            assert getattr(dec, part) is getattr(enc, part)
        assert dec.self_attn is not enc.self_attn and dec.self_norm is not enc.self_norm
    assert model.lm_head.decoder.weight is model.text_encoder.embeddings.word_embeddings.weight
    # a gradient through the decoder reaches the shared FFN but not the encoder's self-attention
    b = _batch()
    logits = model.decode(b["input_ids"], b["attention_mask"], model.encode_image(b["pixel_values"]))
    logits.sum().backward()
    assert model.text_encoder.layers[0].mlp.fc1.weight.grad is not None
    assert model.text_encoder.layers[0].self_attn.q_proj.weight.grad is None
    assert model.text_decoder.layers[0].self_attn.q_proj.weight.grad is not None


def test_decoder_is_causal_encoder_is_not():
    model = _model().eval()
    b = _batch()
    ie = model.encode_image(b["pixel_values"])
    ids2 = b["input_ids"].clone()
    ids2[:, 5] = 7
    with torch.no_grad():
        d1, d2 = model.decode(b["input_ids"], None, ie), model.decode(ids2, None, ie)
        e1, e2 = model.fuse(b["input_ids"], None, ie), model.fuse(ids2, None, ie)
    torch.testing.assert_close(d1[:, :5], d2[:, :5])
    assert not torch.allclose(d1[:, 5:], d2[:, 5:])
    assert not torch.allclose(e1[:, :5], e2[:, :5])


def test_special_tokens_and_prompt_masking(monkeypatch):
    model = _model(use_momentum=False).train()
    seen = {}
    orig_decode, orig_fuse, orig_text = model.decode, model.fuse, model.encode_text
    monkeypatch.setattr(model, "decode", lambda ids, m, ie: seen.setdefault("dec", ids) is not None and orig_decode(ids, m, ie))
    monkeypatch.setattr(model, "fuse", lambda ids, m, ie: seen.setdefault("enc", ids) is not None and orig_fuse(ids, m, ie))
    monkeypatch.setattr(model, "encode_text", lambda ids, m, **k: seen.setdefault("cls", ids) is not None and orig_text(ids, m, **k))
    b = _batch()
    model(b)
    assert seen["cls"][:, 0].eq(2).all() and seen["enc"][:, 0].eq(54).all() and seen["dec"][:, 0].eq(53).all()
    # labels: [DEC] and the prompt never targets; label smoothing 0.1
    dec = b["input_ids"].clone()
    dec[:, 0] = 53
    labels = build_lm_labels(dec, b["attention_mask"], prompt_lengths=4)
    assert labels[:, :4].eq(-100).all() and labels[1, -3:].eq(-100).all() and labels[0, 4:].ne(-100).all()
    model.eval()
    with torch.no_grad():
        out = model({**b, "prompt_lengths": 4})
    logits = orig_decode(dec, b["attention_mask"], model.encode_image(b["pixel_values"])).detach()
    torch.testing.assert_close(out.loss_lm, lm_loss(logits, labels, label_smoothing=0.1))
    assert abs(float(out.loss_lm) - float(lm_loss(logits, build_lm_labels(dec, b["attention_mask"]),
                                                  label_smoothing=0.1))) > 1e-4


def test_forward_losses_momentum_and_queue():
    model = _model().train()
    out = model(_batch(), generator=torch.Generator().manual_seed(0))
    assert out.sim_i2t.shape == (4, 4 + 8) and out.itm_logits.shape == (12, 2)
    assert int(model.queue.ptr) == 4
    out.loss.backward()
    assert all(p.grad is None for p in model.text_encoder_m.parameters())
    assert all(torch.isfinite(t) for t in (out.loss_itc, out.loss_itm, out.loss_lm))
    assert not hasattr(_model(use_momentum=False), "queue")


def _hf_config(label_smoothing: float = 0.1) -> BlipConfig:
    cfg = BlipConfig(
        text_config=dict(vocab_size=99, hidden_size=36, encoder_hidden_size=48, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=24, bos_token_id=97,
                         eos_token_id=3, pad_token_id=0, sep_token_id=3, label_smoothing=label_smoothing),
        vision_config=dict(image_size=30, patch_size=10, hidden_size=48, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, layer_norm_eps=1e-6),
        projection_dim=20, image_text_hidden_size=20)
    cfg._attn_implementation = "eager"
    return cfg


def _hf_inputs():
    g = torch.Generator().manual_seed(2)
    px = torch.randn(3, 3, 30, 30, generator=g).double()
    ids = torch.randint(4, 97, (3, 9), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = 0, 0
    ids[1, 5] = 3
    return px, ids, mask


def test_parity_retrieval():
    torch.manual_seed(0)
    hf = BlipForImageTextRetrieval(_hf_config()).eval().double()
    lab = BLIP.from_hf(hf, enc_token_id=98).eval()
    px, ids, mask = _hf_inputs()
    with torch.no_grad():
        itm = hf(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=True).itm_score
        itc = hf(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False).itm_score
        ie = lab.encode_image(px)
        lab_itm = lab.itm_head(lab.fuse(ids, mask, ie)[:, 0])  # HF keeps [CLS] (no [ENC] substitution)
        lab_itc = lab.image_features(ie) @ lab.text_features(lab.encode_text(ids, mask)).T
    torch.testing.assert_close(lab_itm, itm, atol=1e-10, rtol=0)
    torch.testing.assert_close(lab_itc, itc, atol=1e-10, rtol=0)
    # the momentum encoders start as copies of the loaded weights
    assert torch.equal(lab.text_encoder_m.layers[0].mlp.fc1.weight, lab.text_encoder.layers[0].mlp.fc1.weight)
    # the original's [ENC] substitution changes the ITM score
    assert not torch.allclose(lab.itm_head(lab.fuse(lab._with_first(ids, 98), mask, ie)[:, 0]), itm)


def test_parity_captioning_logits_loss_and_decoding():
    torch.manual_seed(0)
    hf = BlipForConditionalGeneration(_hf_config()).eval().double()
    lab = BLIP.from_hf(hf).eval()
    assert lab.config.label_smoothing == 0.1 and lab.config.dec_token_id == 97
    px, ids, mask = _hf_inputs()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = hf(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels)
        logits = lab.decode(ids, mask, lab.encode_image(px))
    torch.testing.assert_close(logits, out.logits, atol=1e-10, rtol=0)
    torch.testing.assert_close(lm_loss(logits, labels, label_smoothing=0.1), out.loss.float(), atol=1e-6, rtol=0)
    greedy_hf = hf.generate(pixel_values=px, max_new_tokens=6, do_sample=False, num_beams=1)
    beam_hf = hf.generate(pixel_values=px, max_new_tokens=6, num_beams=3, early_stopping=True)
    assert torch.equal(lab.generate(px, method="greedy", max_new_tokens=6), greedy_hf[:, 1:])
    assert torch.equal(lab.generate(px, method="beam", num_beams=3, max_new_tokens=6), beam_hf[:, 1:])


def test_from_hf_rejects_other_models():
    with pytest.raises(TypeError, match="BLIP"):
        BLIP.from_hf(torch.nn.Linear(2, 2))


def test_capfilt_pipeline_end_to_end():
    """Filter (ITC + ITM) and captioner (LM) fine-tuned on a clean set, web captions filtered, synthetic captions
    sampled and filtered, the bootstrapped set assembled with its sources -- on a tiny set."""
    from vlm_lab.data.collate import ImageTextCollator
    from vlm_lab.data.shapes import ShapesDataset
    from vlm_lab.data.tokenizers import shapes_tokenizer
    from vlm_lab.train import TrainConfig
    from vlm_lab.train.capfilt import NoisyCaptions, capfilt

    tok = shapes_tokenizer()
    collate = ImageTextCollator(tok, max_length=32)
    web = NoisyCaptions(ShapesDataset("train", n=12, seed=1, image_size=32), wrong=0.5, vague=0.25, seed=0)
    kinds = [web[i]["noise"] for i in range(12)]
    assert kinds.count("wrong") == 6 and kinds.count("vague") == 3
    assert all(web[i]["caption"] != web[i]["clean_caption"] for i in range(12) if kinds[i] != "none")
    human = ShapesDataset("train", n=8, seed=2, image_size=32)
    torch.manual_seed(0)
    model = BLIP(BLIPConfig.toy(vision_layers=1, text_layers=1, use_momentum=False)).eval()
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, precision="fp32", collate_fn=collate, device="cpu",
                      progress=False, log_every=100)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = capfilt(model, web, human, tok, collate, cfg, batch_size=5, max_new_tokens=5, min_new_tokens=1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input model is untouched
    assert res.filter_model.config.lm_weight == 0 and res.captioner.config.itm_weight == 0
    sources = [it["source"] for it in res.items]
    assert sources.count("human") == 8 and sources.count("web") == res.kept_web <= 12
    assert sources.count("synthetic") == res.kept_synthetic <= 12
    assert all(isinstance(it["caption"], str) and it["caption"] for it in res.items)
    assert 0.0 <= res.stats["noisy_removed_rate"] <= 1.0 and res.stats["web_noise_rate"] == 0.75 and 0 <= res.stats["threshold"] <= 1
    strict = capfilt(model, web, human, tok, collate, cfg, threshold=1.0, batch_size=12, max_new_tokens=3)
    assert strict.kept_web == strict.kept_synthetic == 0


def test_bad_config():
    with pytest.raises(ValueError, match="enc_token_id"):
        BLIPConfig.toy(enc_token_id=500)
    with pytest.raises(ValueError, match="label_smoothing"):
        BLIPConfig.toy(label_smoothing=1.0)
    with pytest.raises(TypeError, match="BLIPConfig"):
        BLIP({"image_size": 32})


def test_inbatch_warm_start_with_momentum():
    import torch.nn.functional as F

    model = _model(inbatch_itc_steps=1, itm_weight=0.0, lm_weight=0.0).train()
    b = _batch()
    out = model(b)
    with torch.no_grad():
        ie = model.encode_image(b["pixel_values"])
        logits = (model.image_features(ie) @ model.text_features(model.encode_text(b["input_ids"],
                                                                                 b["attention_mask"])).T / model.temp)
    clip = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4))) / 2
    torch.testing.assert_close(out.loss_itc.detach(), clip, atol=1e-5, rtol=1e-5)
    assert int(model.queue.ptr) == 4 and out.sim_i2t.shape == (4, 12)
