"""CLIP: parity with transformers' CLIPModel, the expert tests of model-facts.md, and bad input."""

import math

import pytest
import torch

from vlm_lab.models import CLIP, CLIPConfig, build_model, model_from_dict, model_record

ODD = dict(embed_dim=24, image_size=30, patch_size=6, vision_width=36, vision_layers=2, vision_heads=4,
           vision_mlp_dim=37, vocab_size=101, context_length=13, text_width=32, text_layers=2, text_heads=4,
           text_mlp_dim=37, eot_token_id=3)


def _hf_clip(eos_token_id, act="quick_gelu", seed=0):
    from transformers import CLIPConfig as HFConfig, CLIPModel
    torch.manual_seed(seed)
    cfg = HFConfig(
        text_config=dict(vocab_size=101, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=13, eos_token_id=eos_token_id,
                         bos_token_id=1, pad_token_id=0, hidden_act=act),
        vision_config=dict(image_size=30, patch_size=6, hidden_size=36, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, hidden_act=act),
        projection_dim=24)
    return CLIPModel(cfg).eval()


def _ids_with_eos_then_padding(eos):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 99, (3, 11), generator=g)
    ids[:, 0] = 1
    ids[0, 5], ids[0, 6:] = eos, 0  # EOS followed by padding
    ids[1, 10] = eos  # EOS at the very end
    ids[2, 3], ids[2, 4:] = eos, 0
    mask = (torch.arange(11)[None] <= (ids == eos).int().argmax(-1)[:, None]).long()
    return ids, mask


@pytest.mark.parametrize("eos,act", [(3, "quick_gelu"), (2, "quick_gelu"), (3, "gelu")])
def test_parity_with_transformers_clip(eos, act):
    hf = _hf_clip(eos, act)
    ours = CLIP.from_hf(hf).eval()
    # eos_token_id == 2 is HF's legacy "argmax of ids" rule: the EOT must then carry the largest id
    marker = 100 if eos == 2 else eos
    ids, mask = _ids_with_eos_then_padding(marker)
    px = torch.randn(3, 3, 30, 30)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px, return_loss=True)
        out = ours({"pixel_values": px, "input_ids": ids, "attention_mask": mask})
    for name in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text", "loss"):
        diff = (getattr(ref, name) - getattr(out, name)).abs().max().item()
        assert diff <= 1e-5, f"{name}: max abs difference {diff}"
    assert ours.config.eot_token_id == (None if eos == 2 else eos)


def test_from_hf_rejects_other_models():
    with pytest.raises(TypeError, match="CLIPModel"):
        CLIP.from_hf(torch.nn.Linear(2, 2))


def test_presets_and_registry():
    assert CLIPConfig.paper("ViT-B/16").patch_size == 16
    p = CLIPConfig.paper()
    assert (p.vision_width, p.vision_layers, p.text_width, p.text_layers, p.context_length) == (768, 12, 512, 12, 77)
    with pytest.raises(ValueError, match="variant"):
        CLIPConfig.paper("ViT-H/14")
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("clip", "huge")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("dalle", "toy")
    m = build_model("clip", "toy", **ODD)
    rec = model_record(m)
    m2 = model_from_dict(rec["model"], rec["config"])
    assert m2.config == m.config


def test_logit_scale_init_and_clamp_after_step():
    m = CLIP(CLIPConfig(**ODD))
    assert math.isclose(m.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    with torch.no_grad():
        m.logit_scale.fill_(5.0)
    m.post_step()
    assert math.isclose(m.logit_scale.item(), math.log(100), rel_tol=1e-6)


def _batch(b=4, n=9, eot=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 101, (b, n), generator=g)
    ids[:, -1] = eot
    return {"pixel_values": torch.randn(b, 3, 30, 30, generator=g), "input_ids": ids,
            "attention_mask": torch.ones(b, n, dtype=torch.long)}


def test_text_tower_is_causal_and_ignores_padding_after_eot():
    m = CLIP(CLIPConfig(**ODD)).eval()
    ids = torch.tensor([[1, 10, 11, 12, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    other = ids.clone()
    other[0, 5:] = torch.tensor([55, 66])
    with torch.no_grad():
        a = m.encode_text(ids, mask)
        b = m.encode_text(other, torch.ones_like(mask))  # changed tokens after EOT, even unmasked
        h1 = m.text(ids, mask)
        h2 = m.text(torch.tensor([[1, 10, 11, 99, 3, 0, 0]]), mask)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(h1[:, :3], h2[:, :3])
    assert not torch.allclose(h1[:, 3], h2[:, 3])


def test_overfit_one_batch():
    torch.manual_seed(0)
    m = CLIP(CLIPConfig(**ODD))
    batch = _batch(6)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = m(batch).loss.item()
    for _ in range(60):
        loss = m(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.post_step()
    assert first > 1.0 and loss.item() < 0.05
    out = m(batch)
    assert (out.logits_per_image.argmax(1) == torch.arange(6)).all()


def test_feature_protocol_equals_forward():
    m = CLIP(CLIPConfig(**ODD)).eval()
    batch = _batch()
    feats = m.contrastive_features(batch)
    torch.testing.assert_close(m.contrastive_loss(feats), m(batch).loss)


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b.update(pixel_values=torch.randn(4, 3, 32, 32)), "30x30"),
    (lambda b: b.update(pixel_values=torch.randn(4, 1, 30, 30)), "channels"),
    (lambda b: b.update(pixel_values=torch.randn(4, 30, 30, 3)), "channels"),
    (lambda b: b.update(input_ids=b["input_ids"] + 200), r"\[0, 101\)"),
    (lambda b: b.update(input_ids=torch.zeros(0, 5, dtype=torch.long)), "empty"),
    (lambda b: b.update(input_ids=torch.full((4, 20), 3)), "at most 13"),
    (lambda b: b.update(pixel_values=torch.randn(3, 3, 30, 30)), "3 images but 4 captions"),
    (lambda b: b.pop("input_ids"), "missing"),
    (lambda b: b.update(input_ids=torch.full((4, 9), 7)), "no end-of-text"),
    (lambda b: b.update(attention_mask=torch.ones(4, 3, dtype=torch.long)), "attention_mask"),
])
def test_bad_input_names_the_argument(mutate, match):
    m = CLIP(CLIPConfig(**ODD))
    batch = _batch()
    mutate(batch)
    with pytest.raises((ValueError, TypeError, KeyError), match=match):
        m(batch)


def test_bad_config():
    with pytest.raises(ValueError, match="eot_token_id"):
        CLIPConfig(**{**ODD, "eot_token_id": 500})
    with pytest.raises(ValueError, match="logit_scale_init"):
        CLIPConfig(**{**ODD, "logit_scale_init": float("nan")})
    with pytest.raises(ValueError, match="vision_backbone"):
        CLIPConfig(**{**ODD, "vision_backbone": "resnet"})
    with pytest.raises(ValueError, match="unknown CLIPConfig fields"):
        CLIPConfig.from_dict({**ODD, "colour": 1})


def test_timm_vision_tower():
    m = CLIP(CLIPConfig(**{**ODD, "image_size": 32, "vision_backbone": "timm:vit_tiny_patch16_224"}))
    b = _batch()
    b["pixel_values"] = torch.randn(4, 3, 32, 32)
    out = m(b)
    assert out.image_embeds.shape == (4, 24) and torch.isfinite(out.loss)
