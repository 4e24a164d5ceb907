"""Fusion toys: output shapes, padding masks, overfitting one batch, frozen encoders, registry, bad input."""
from __future__ import annotations

import pytest
import torch

from vlm_lab.models.fusion import (ConnectorConfig, ConnectorVQA, DualEncoder, DualEncoderConfig, EarlyFusion,
                                   FusionConfig, IntermediateFusion, LateFusion)
from vlm_lab.models.registry import build_model, model_from_dict, model_record

V, L, A = 23, 7, 5  # vocabulary, max question length, answers (odd sizes flush out shape bugs)


def cfg(**kw) -> FusionConfig:
    base = dict(image_size=24, patch_size=8, vocab_size=V, max_length=L, num_answers=A, width=36, heads=3, mlp_dim=37,
                early_layers=2, vision_layers=1, text_layers=1, fusion_layers=1, late_text_layers=1)
    return FusionConfig(**{**base, **kw})


def conn(kind: str) -> ConnectorConfig:
    return ConnectorConfig(connector=kind, image_size=24, patch_size=8, vision_width=36, vision_layers=1, vision_heads=3,
                           vision_mlp_dim=37, vocab_size=V, max_length=L, text_width=36, text_layers=1, text_heads=3,
                           text_mlp_dim=37, num_answers=A, adapter_bottleneck=5)


MODELS = {
    "early": lambda: EarlyFusion(cfg()),
    "intermediate": lambda: IntermediateFusion(cfg()),
    "late_concat": lambda: LateFusion(cfg()),
    "late_product": lambda: LateFusion(cfg(combine="product")),
    "connector_linear": lambda: ConnectorVQA(conn("linear")),
    "connector_mlp": lambda: ConnectorVQA(conn("mlp")),
    "connector_adapter": lambda: ConnectorVQA(conn("adapter")),
}


def batch(b: int = 4, n: int = 5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[0, 3:] = 0  # one padded question
    return {"pixel_values": torch.randn(b, 3, 24, 24, generator=g), "input_ids": torch.randint(0, V, (b, n), generator=g),
            "attention_mask": mask, "labels": torch.randint(0, A, (b,), generator=g)}


@pytest.mark.parametrize("name", list(MODELS))
def test_shapes_and_padding_mask(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = batch()
    out = model(x)
    assert out.logits.shape == (4, A) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    # extra padding (mask 0, any id) must not change a single logit
    padded = dict(x)
    padded["input_ids"] = torch.cat([x["input_ids"], torch.randint(0, V, (4, 2))], 1)
    padded["attention_mask"] = torch.cat([x["attention_mask"], torch.zeros(4, 2, dtype=torch.long)], 1)
    torch.testing.assert_close(model(padded).logits, out.logits, atol=1e-5, rtol=1e-5)
    # without labels there is no loss
    assert model({k: v for k, v in x.items() if k != "labels"}).loss is None


@pytest.mark.parametrize("name", ["early", "intermediate", "late_concat", "late_product", "connector_mlp"])
def test_overfits_one_batch(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    x = batch(b=8, seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(80):
        loss = model(x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()
    assert (model.eval()(x).logits.argmax(-1) == x["labels"]).all()


def test_late_fusion_sees_the_image_only_through_one_vector():
    torch.manual_seed(0)
    model = LateFusion(cfg()).eval()
    x = batch()
    v = model.vision.pool(model.vision(x["pixel_values"]))
    u = model.text.pool(model.text(x["input_ids"], x["attention_mask"]))
    torch.testing.assert_close(model(x).logits, model.head(torch.cat([v, u], -1)))


def test_connector_freezes_the_image_encoder_and_adapter_starts_as_identity():
    torch.manual_seed(0)
    model = ConnectorVQA(conn("adapter")).train()
    assert not model.image_encoder.training
    model(batch()).loss.backward()
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert all(p.grad is not None for p in model.connector.parameters())
    tokens = torch.randn(2, 10, 36)
    torch.testing.assert_close(model.connector(tokens), tokens)  # zero-initialised up-projection
    with pytest.raises(ValueError, match="vision_width"):
        ConnectorConfig(connector="adapter", vision_width=32, text_width=48)


def test_dual_encoder_itc_and_itm():
    torch.manual_seed(0)
    c = DualEncoderConfig(image_size=24, patch_size=8, width=36, heads=3, mlp_dim=37, vision_layers=1, text_layers=1,
                          vocab_size=V, max_length=L, embed_dim=11, matching=True)
    model = DualEncoder(c)
    x = batch()
    out = model(x)
    assert out.logits_per_image.shape == (4, 4) and out.image_embeds.shape == (4, 11)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(4))
    assert out.loss_itm is not None and torch.allclose(out.loss, out.loss_itc + out.loss_itm)
    x_same = dict(x, input_ids=x["input_ids"][:1].repeat(4, 1), attention_mask=torch.ones(4, 5, dtype=torch.long))
    assert torch.isfinite(model(x_same).loss)  # every caption identical: no valid negative, still finite
    assert model.match_score(x["pixel_values"], x["input_ids"], x["attention_mask"]).shape == (4,)
    plain = DualEncoder(DualEncoderConfig(**{**c.__dict__, "matching": False}))
    assert plain(x).loss_itm is None and not hasattr(plain, "fusion")


def test_registry_and_bad_input():
    for name in ("early_fusion", "intermediate_fusion", "late_fusion", "connector_vqa", "dual_encoder"):
        model = build_model(name, "toy")
        rebuilt = model_from_dict(name, model_record(model)["config"])
        assert type(rebuilt) is type(model)
    model = EarlyFusion(cfg())
    with pytest.raises(KeyError, match="pixel_values"):
        model({"input_ids": torch.zeros(2, 3, dtype=torch.long)})
    x = batch()
    with pytest.raises(ValueError, match="images"):
        model(dict(x, pixel_values=x["pixel_values"][:2]))
    with pytest.raises(ValueError, match="labels"):
        model(dict(x, labels=torch.full((4,), A)))
    with pytest.raises(ValueError, match="combine"):
        cfg(combine="sum")
    with pytest.raises(ValueError, match="divisible"):
        cfg(width=35)
