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


@pytest.mark.parametrize("name", ["early", "intermediate", "late_concat"])
def test_overfits_a_batch_of_direction_questions(name):
    """The four-way relational question ("where is the red shape from the blue shape?") on real rendered scenes."""
    from vlm_lab.data import shapes_tokenizer
    from vlm_lab.data.questions import ANSWERS, QACollator, ShapesQADataset

    tok = shapes_tokenizer()
    ds = ShapesQADataset("train", n=12, seed=2, image_size=24, types=("relational",))
    x = QACollator(tok, max_length=16)([ds[i] for i in range(len(ds))])
    assert set(x["answer"]) <= {"left", "right", "above", "below"} and len(set(x["answer"])) >= 3
    torch.manual_seed(0)
    c = cfg(vocab_size=len(tok), max_length=16, num_answers=len(ANSWERS))
    model = {"early": EarlyFusion, "intermediate": IntermediateFusion, "late_concat": LateFusion}[name](c)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        loss = model(x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, loss.item()
    assert (model.eval()(x).logits.argmax(-1) == x["labels"]).all()


def test_dual_encoder_captioning_term():
    torch.manual_seed(0)
    c = DualEncoderConfig(image_size=24, patch_size=8, width=36, heads=3, mlp_dim=37, vision_layers=1, text_layers=1,
                          vocab_size=V, max_length=L, embed_dim=11, matching=True, captioning=True)
    model = DualEncoder(c).eval()
    x = batch()
    out = model(x)
    assert out.loss_lm is not None and out.loss_lm > 0
    torch.testing.assert_close(out.loss, out.loss_itc + out.loss_itm + out.loss_lm)
    _, ih = model.encode_image(x["pixel_values"], tokens=True)
    logits = model.caption_logits(x["input_ids"], ih)
    assert logits.shape == (4, 5, V)
    # causal: changing the last token changes no earlier position's prediction
    changed = x["input_ids"].clone()
    changed[:, -1] = (changed[:, -1] + 1) % V
    torch.testing.assert_close(model.caption_logits(changed, ih)[:, :-1], logits[:, :-1])
    # the log-likelihood sums log p over real tokens after the first (row 0 has 3 real tokens)
    ll = model.caption_log_likelihood(x["pixel_values"], x["input_ids"], x["attention_mask"])
    logp = logits[0, :2].log_softmax(-1).gather(-1, x["input_ids"][0, 1:3, None]).sum()
    assert ll.shape == (4,) and torch.allclose(ll[0], logp, atol=1e-5)
    # the decoder sees the image: another image changes the caption scores
    other = torch.randn_like(x["pixel_values"])
    assert not torch.allclose(model.caption_log_likelihood(other, x["input_ids"], x["attention_mask"]), ll)
    plain = DualEncoder(DualEncoderConfig(**{**c.__dict__, "captioning": False}))
    assert plain(x).loss_lm is None and not hasattr(plain, "decoder")
    with pytest.raises(ValueError, match="captioning"):
        plain.caption_logits(x["input_ids"], ih)
    with pytest.raises(ValueError, match="lm_weight"):
        DualEncoderConfig(lm_weight=-1.0)


def test_sincos_position_start():
    from vlm_lab.models.fusion import sincos_2d

    table = sincos_2d(3, 8)
    assert table.shape == (9, 8)
    # row-major patches: the x half depends on the column only, the y half on the row only
    torch.testing.assert_close(table[0, :4], table[3, :4])
    torch.testing.assert_close(table[0, 4:], table[1, 4:])
    assert torch.cdist(table, table).add(torch.eye(9)).min() > 0.1  # every patch has its own code
    early = EarlyFusion(cfg())
    torch.testing.assert_close(early.image_position.detach(), sincos_2d(3, 36))
    late = LateFusion(cfg())
    torch.testing.assert_close(late.vision.position_embedding[1:].detach(), sincos_2d(3, 36))
    assert EarlyFusion(cfg(position_init="random")).image_position.std() < 0.05
    with pytest.raises(ValueError, match="position_init"):
        cfg(position_init="rope")
    with pytest.raises(ValueError, match="multiple of 4"):
        cfg(width=6, heads=3)
