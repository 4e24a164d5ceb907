"""CoCa / CONCH: poolers, masks, [CLS], loss weights, exact accumulation features, generation, recipe, transform.

Model-facts expert tests 7 (zero-shot ensemble order), 16 (Recall@K with several captions) and 19 (CoCa decoder
and poolers). Tiny odd-sized configs (widths 36 / 40, MLP 37, image 30, patch 6).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlm_lab.eval import retrieval_metrics, zero_shot_classifier
from vlm_lab.inspect import trace
from vlm_lab.losses import clip_loss
from vlm_lab.losses.captioning import build_lm_labels, lm_loss
from vlm_lab.models.coca import CoCa, CoCaConfig, cls_attention_mask
from vlm_lab.models.registry import build_model, model_from_dict, model_record

V = 53


def tiny(**kw) -> CoCaConfig:
    base = dict(embed_dim=40, image_size=30, patch_size=6, vision_width=36, vision_layers=1, vision_heads=3,
                vision_mlp_dim=37, caption_queries=5, pooler_heads=4, vocab_size=V, context_length=11, text_width=36,
                text_layers=2, text_heads=3, text_mlp_dim=37, decoder_layers=2, decoder_heads=2)
    return CoCaConfig(**{**base, **kw})


def make_batch(b: int = 3, n: int = 9, seed: int = 0, lengths=(9, 6, 4)) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (b, n), generator=g)
    mask = torch.zeros(b, n, dtype=torch.long)
    for i, length in enumerate(lengths[:b]):
        mask[i, :length] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return {"pixel_values": torch.randn(b, 3, 30, 30, generator=g), "input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def model() -> CoCa:
    torch.manual_seed(0)
    return CoCa(tiny()).eval()


# --- poolers -------------------------------------------------------------------------------------------------
def test_pooler_shapes_parallel_and_single(model):
    x = torch.randn(2, 3, 30, 30)
    pooled, cap = model.image_features(x)
    assert pooled.shape == (2, 40) and cap.shape == (2, 5, 36)
    assert model.encode_image(x).shape == (2, 40)
    assert torch.allclose(model.encode_image(x).norm(dim=-1), torch.ones(2), atol=1e-5)
    single = CoCa(tiny(pooler_mode="single", pooler_heads=3)).eval()
    assert single.pool_contrast is None and single.pool_caption.query.shape == (1 + 5, 36)
    pooled, cap = single.image_features(x)
    assert pooled.shape == (2, 36) and cap.shape == (2, 5, 36)  # query 0 contrastive, 5 caption tokens


def test_contrastive_query_sees_every_token(model):
    x = torch.randn(2, 3, 30, 30)
    with trace(model, attention=True) as t:
        model.image_features(x)
    w = t.attention("pool_contrast.attn")  # (b, h, 1, 1 + g*g)
    assert w.shape == (2, 4, 1, 1 + 25)
    assert (w > 0).all()  # no token is masked out
    # every patch matters: changing one patch changes the contrastive embedding
    y = x.clone()
    y[:, :, 24:, 24:] += 1.0  # last patch only
    assert not torch.allclose(model.encode_image(x), model.encode_image(y), atol=1e-6)


def test_caption_queries_independent_of_contrastive_pooler():
    torch.manual_seed(1)
    m = CoCa(tiny()).eval()
    x = torch.randn(2, 3, 30, 30)
    emb0, (_, cap0) = m.encode_image(x), m.image_features(x)
    with torch.no_grad():
        # (random, not a constant: the query is LayerNorm'd, so a constant shift is a no-op)
        m.pool_contrast.query.add_(torch.randn_like(m.pool_contrast.query))
    _, cap1 = m.image_features(x)
    assert torch.equal(cap0, cap1)  # caption tokens do not depend on the contrastive query
    assert not torch.allclose(emb0, m.encode_image(x))
    # and the contrastive embedding comes from its own 1-query pooler, not from caption token 0 (open_clip default)
    emb1 = m.encode_image(x)
    with torch.no_grad():
        m.pool_caption.query[0].add_(torch.randn_like(m.pool_caption.query[0]))
    assert torch.equal(emb1, m.encode_image(x))


# --- text encoder: causality, [CLS] position and padding -------------------------------------------------------
def test_text_and_decoder_are_causal(model):
    b = make_batch(lengths=(9, 9, 9))
    ids2 = b["input_ids"].clone()
    ids2[:, 5:] = (ids2[:, 5:] + 7) % (V - 5) + 5  # change tokens after position 4
    tok1, _ = model.text(b["input_ids"], b["attention_mask"])
    tok2, _ = model.text(ids2, b["attention_mask"])
    assert torch.allclose(tok1[:, :5], tok2[:, :5], atol=1e-6)
    assert not torch.allclose(tok1[:, 5:], tok2[:, 5:], atol=1e-4)
    l1 = model.caption_logits(b["pixel_values"], b["input_ids"])
    l2 = model.caption_logits(b["pixel_values"], ids2)
    assert torch.allclose(l1[:, :5], l2[:, :5], atol=1e-5)
    assert not torch.allclose(l1[:, 5:], l2[:, 5:], atol=1e-4)
    # the text rows never see [CLS]: with and without it they are identical
    no_cls, _ = model.text(b["input_ids"], b["attention_mask"], with_cls=False)
    assert torch.allclose(no_cls, tok1, atol=1e-5)


def test_cls_appended_last_attends_to_every_real_token(model):
    b = make_batch()
    with trace(model, attention=True) as t:
        model.encode_text(b["input_ids"], b["attention_mask"])
    w = t.attention("text.encoder.blocks.0.attn")  # (b, h, n + 1, n + 1)
    cls_row = w[:, :, -1]  # (b, h, n + 1)
    valid = torch.cat([b["attention_mask"].bool(), torch.ones(3, 1, dtype=torch.bool)], dim=1)  # itself too
    assert (cls_row[valid[:, None].expand_as(cls_row)] > 0).all()
    assert (cls_row[~valid[:, None].expand_as(cls_row)] == 0).all()
    # pad tokens do not change the embedding; a real token does
    e = model.encode_text(b["input_ids"], b["attention_mask"])
    ids = b["input_ids"].clone()
    ids[2, 6] = 17  # row 2 has 4 real tokens: position 6 is padding
    assert torch.allclose(model.encode_text(ids, b["attention_mask"]), e, atol=1e-6)
    ids[2, 1] = 18 if ids[2, 1] != 18 else 19
    assert not torch.allclose(model.encode_text(ids, b["attention_mask"])[2], e[2], atol=1e-5)


def test_legacy_cls_mask_reproduces_open_clip_off_by_one():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    n = mask.shape[1]
    # open_clip legacy build_cls_mask: pad the validity vector (1 at the front, n rows on top), AND the causal mask
    legacy_ref = F.pad((mask != 0).unsqueeze(1), (1, 0, n, 0), value=True)  # (b, n + 1, n + 1)
    causal = torch.ones(n + 1, n + 1, dtype=torch.bool).tril()
    assert torch.equal(cls_attention_mask(mask, legacy=True), legacy_ref & causal)
    correct = cls_attention_mask(mask)
    assert correct[0, -1].tolist() == [True, True, True, False, False, True]  # real tokens + itself
    assert cls_attention_mask(mask, legacy=True)[0, -1].tolist() == [True, True, True, True, False, False]
    assert torch.equal(correct[1], cls_attention_mask(mask, legacy=True)[1])  # no padding: no difference
    assert torch.equal(correct[:, :n, :n], causal[:n, :n].expand(2, n, n))  # text rows: causal
    # the switch reaches the model: same weights, different [CLS] embedding for a padded row only
    torch.manual_seed(2)
    a = CoCa(tiny()).eval()
    b_ = CoCa(tiny(legacy_cls_mask=True)).eval()
    b_.load_state_dict(a.state_dict())
    batch = make_batch()
    ea, eb = a.encode_text(batch["input_ids"], batch["attention_mask"]), b_.encode_text(batch["input_ids"],
                                                                                          batch["attention_mask"])
    assert torch.allclose(ea[0], eb[0], atol=1e-6) and not torch.allclose(ea[1], eb[1], atol=1e-5)


# --- loss -------------------------------------------------------------------------------------------------------
def test_loss_terms_and_weights():
    torch.manual_seed(3)
    m = CoCa(tiny()).eval()
    b = make_batch()
    out = m(b)
    labels = build_lm_labels(b["input_ids"], b["attention_mask"])
    assert torch.allclose(out.loss_caption, lm_loss(out.logits, labels), atol=1e-5)  # shifted, pad ignored
    assert torch.allclose(out.loss_contrastive, clip_loss(out.image_embeds, out.text_embeds, m.logit_scale.exp()))
    assert torch.allclose(out.loss, 1.0 * out.loss_contrastive + 2.0 * out.loss_caption)  # CoCa: 1 : 2
    m.config = dataclasses.replace(m.config, caption_loss_weight=1.0, contrastive_loss_weight=0.5)
    out2 = m(b)
    assert torch.allclose(out2.loss, 0.5 * out2.loss_contrastive + 1.0 * out2.loss_caption)
    assert out.logits.shape == (3, 9, V) and out.logits_per_image.shape == (3, 3)
    assert math.isclose(m.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)


def test_accumulated_features_give_the_full_batch_loss():
    torch.manual_seed(4)
    m = CoCa(tiny()).eval()
    full = make_batch(b=4, lengths=(9, 6, 4, 7), seed=5)
    halves = [{k: v[i:i + 2] for k, v in full.items()} for i in (0, 2)]
    feats = [m.contrastive_features(h) for h in halves]
    cat = {k: torch.cat([f[k] for f in feats]) for k in feats[0]}
    assert all(v.shape[0] == 4 for v in cat.values())
    terms = m.contrastive_loss(cat)
    out = m(full)
    assert torch.allclose(terms["loss"], out.loss, atol=1e-5)
    # the caption term is a token mean over the whole batch, not a mean of per-half means
    per_half = sum(m.contrastive_loss(f)["loss_caption"] for f in feats) / 2
    assert not torch.allclose(per_half, out.loss_caption, atol=1e-4)


def test_post_step_clamps_temperature(model):
    m = CoCa(tiny())
    with torch.no_grad():
        m.logit_scale.fill_(5.0)
    m.post_step()
    assert math.isclose(m.logit_scale.item(), math.log(100), rel_tol=1e-6)


def test_training_reduces_both_terms():
    torch.manual_seed(6)
    m = CoCa(tiny())
    b = make_batch(b=6, lengths=(9, 8, 7, 6, 5, 4), seed=7)
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3)
    first = m(b)
    for _ in range(15):
        loss = m(b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = m(b)
    assert last.loss_caption < 0.5 * first.loss_caption
    assert last.loss_contrastive < first.loss_contrastive


# --- generation -------------------------------------------------------------------------------------------------
def test_greedy_generation_is_consistent_with_teacher_forcing(model):
    x = torch.randn(2, 3, 30, 30)
    out = model.generate(x, bos_token_id=2, eos_token_id=3, max_new_tokens=7)
    assert out.shape[0] == 2 and out.shape[1] <= 8 and (out[:, 0] == 2).all()
    for row in range(2):
        ids = out[row:row + 1]
        end = (ids[0] == 3).nonzero()
        n = int(end[0]) + 1 if len(end) else ids.shape[1]
        logits = model.caption_logits(x[row:row + 1], ids[:, :n - 1])  # (1, n - 1, V)
        assert torch.equal(logits.argmax(-1)[0], ids[0, 1:n])
        assert (ids[0, n:] == model.config.pad_token_id).all()
    beams = model.generate(x, bos_token_id=2, eos_token_id=3, max_new_tokens=5, method="beam", num_beams=1)
    assert torch.equal(beams, model.generate(x, bos_token_id=2, eos_token_id=3, max_new_tokens=5))


# --- config, registry, bad input ----------------------------------------------------------------------------------
def test_presets_and_registry():
    p = CoCaConfig.paper()
    assert (p.image_size, p.patch_size, p.vision_width, p.vision_layers, p.vision_heads, p.vision_mlp_dim) == \
        (448, 16, 768, 12, 12, 3072)
    assert (p.text_layers, p.decoder_layers, p.text_width, p.caption_queries, p.embed_dim) == (12, 12, 768, 256, 512)
    assert p.pooler_mode == "parallel" and (p.caption_loss_weight, p.contrastive_loss_weight) == (2.0, 1.0)
    m = build_model("coca", "toy", vocab_size=97)
    rec = model_record(m)
    assert rec["model"] == "coca"
    again = model_from_dict("coca", rec["config"])
    assert again.config == m.config
    with torch.device("meta"):  # paper size without allocating memory
        big = CoCa(CoCaConfig.paper())
    n = sum(q.numel() for q in big.parameters())
    # ViT-B/16 (86 M) + text encoder (12 x 7.1 M) + decoder (12 x 9.4 M, with cross-attention) + token table and
    # LM head (2 x 32,007 x 768 = 49 M) + poolers: ~339 M (CoCa-Base, with a 64 k vocabulary, is 383 M)
    assert 330e6 < n < 345e6, n


def test_bad_input_raises(model):
    with pytest.raises(ValueError, match="pooler_mode"):
        tiny(pooler_mode="cascade")
    with pytest.raises(ValueError, match="pooler_heads"):
        tiny(pooler_heads=7)
    b = make_batch()
    with pytest.raises(ValueError, match="captions"):
        model({**b, "pixel_values": b["pixel_values"][:2]})
    with pytest.raises(ValueError, match="input_ids"):
        model.encode_text(torch.full((1, 4), V + 1))
    with pytest.raises(ValueError, match="at most"):
        model.encode_text(torch.ones(1, 12, dtype=torch.long))  # longer than context_length = 11
    with pytest.raises(KeyError, match="input_ids"):
        model({"pixel_values": b["pixel_values"]})
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(b["pixel_values"], bos_token_id=2, eos_token_id=3, max_new_tokens=11)


# --- expert tests 7 and 16 (CONCH zero-shot and retrieval) ----------------------------------------------------------
class _Table:
    """A 'tokenizer + text encoder' whose embedding of a prompt is a fixed vector with a prompt-specific norm."""

    def __init__(self, prompts, d=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = {p: i for i, p in enumerate(prompts)}
        self.vec = torch.randn(len(prompts), d, generator=g) * torch.linspace(0.2, 5, len(prompts))[:, None]

    def __call__(self, texts, **kw):
        ids = torch.tensor([[self.ids[t]] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class _Encoder(torch.nn.Module):
    def __init__(self, table):
        super().__init__()
        self.table = table
        self.p = torch.nn.Parameter(torch.zeros(1))

    def encode_text(self, ids, mask):
        return self.table.vec[ids[:, 0]]


def test_zero_shot_ensemble_order_over_synonyms_and_templates():
    synonyms = {"TUM": ["tumour", "carcinoma"], "STR": ["stroma", "desmoplasia", "collagen"]}
    templates = ["{}.", "an image of {}.", "{}, H&E stain."]
    prompts = [t.format(s) for syn in synonyms.values() for s in syn for t in templates]
    table = _Table(prompts)
    W = zero_shot_classifier(_Encoder(table), table, synonyms, templates)
    for c, (cls, syn) in enumerate(synonyms.items()):
        rows = table.vec[[table.ids[t.format(s)] for s in syn for t in templates]]  # synonyms x templates
        ref = F.normalize(F.normalize(rows, dim=-1).mean(0), dim=-1)
        naive = F.normalize(rows.mean(0), dim=-1)
        assert torch.allclose(W[c], ref, atol=1e-6)
        assert not torch.allclose(W[c], naive, atol=1e-3)  # averaging unnormalised prompts differs
    x = F.normalize(torch.randn(20, 6), dim=-1)
    assert torch.equal((x @ W.T).argmax(1), (100 * x @ W.T).argmax(1))  # scale does not change accuracy


def test_retrieval_best_rank_over_several_captions():
    # 2 images, 4 captions; captions 0, 1 describe image 0, captions 2, 3 image 1
    scores = torch.tensor([[0.1, 0.9, 0.95, 0.2],   # image 0: its best caption (1) is rank 2 -> i2t R@1 miss
                           [0.0, 0.3, 0.8, 0.1]])   # image 1: caption 2 at rank 1 -> hit
    m = retrieval_metrics(scores, [0, 0, 1, 1], ks=(1, 2))
    assert m["i2t_R@1"] == 50.0 and m["i2t_R@2"] == 100.0
    # t2i: caption 0 -> image 0 (0.1 > 0.0 hit), 1 -> 0 (hit), 2 -> 1 (0.8 < 0.95 miss), 3 -> 1 (0.1 < 0.2 miss)
    assert m["t2i_R@1"] == 50.0 and m["t2i_R@2"] == 100.0


# --- the training recipe and CONCH's image transform -----------------------------------------------------------------
def test_recipe_arithmetic_and_train_config():
    from vlm_lab.train import TrainConfig
    from vlm_lab.train.conch import CoCaRecipe

    r = CoCaRecipe.paper()
    assert r.global_batch == 1536 == 48 * 8 * 4
    assert r.steps_per_epoch(1_170_000) == 1_170_000 // 1536
    cfg = r.train_config(world_size=8)
    assert isinstance(cfg, TrainConfig)
    assert (cfg.batch_size, cfg.grad_accum, cfg.epochs, cfg.accum_mode) == (48, 4, 40, "cache_features")
    assert cfg.batch_size * cfg.grad_accum * 8 == r.global_batch
    with pytest.raises(ValueError, match="world_size"):
        r.train_config(world_size=1)
    assert r.train_config(world_size=8, steps=10).steps == 10
    toy = CoCaRecipe.toy()
    assert toy.global_batch == 32 and toy.train_config().grad_accum == 1
    with pytest.raises(ValueError, match="per_device_batch"):
        CoCaRecipe(per_device_batch=0)


def test_resize_center_crop_pad():
    from vlm_lab.data.transforms import resize_center_crop_pad

    big = np.zeros((600, 900, 3), np.uint8)
    big[:, 450:] = 200  # right half bright
    out = resize_center_crop_pad(big, 448)
    assert out.shape == (448, 448, 3)  # short side 600 -> 448, long side 672 centre-cropped
    assert out[:, :100].max() == 0 and out[:, -100:].min() == 200
    small = np.full((100, 60, 3), 77, np.uint8)
    out = resize_center_crop_pad(small, 448)  # zero-padded, not upsampled, centred
    assert out.shape == (448, 448, 3) and (out == 77).all(-1).sum() == 100 * 60
    assert out[0, 0].tolist() == [0, 0, 0] and out[224, 224].tolist() == [77, 77, 77]
    mixed = np.full((300, 1000, 3), 5, np.uint8)  # short side below size: crop the long side, pad the short one
    out = resize_center_crop_pad(mixed, 448)
    assert (out == 5).all(-1).sum() == 300 * 448
    with pytest.raises(ValueError, match="img"):
        resize_center_crop_pad(np.zeros((10, 10), np.uint8))
