"""BLIP-2: the Q-Former's three masks (by perturbation), ITG cache route, stage-1 / stage-2 losses, freezing,
meta-device tracing of the paper config, and parity with transformers' BLIP-2 (model-facts expert tests 17, 18)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from vlm_lab.inspect import trace
from vlm_lab.losses.captioning import build_lm_labels, lm_loss
from vlm_lab.models.blip2 import (BLIP2, BLIP2Config, itc_similarity, qformer_mask, sample_hard_negatives)
from vlm_lab.models.lm import CausalLMConfig
from vlm_lab.models.registry import build_model, model_from_dict, model_record

# tiny odd sizes flush out shape bugs: 30 px / patch 6 -> 26 tokens x 36; 5 queries x 40; 3 Q-Former blocks
TINY = dict(image_size=30, patch_size=6, vision_width=36, vision_layers=2, vision_heads=4, vision_mlp_dim=37,
            num_query_tokens=5, qformer_width=40, qformer_layers=3, qformer_heads=4, qformer_mlp_dim=41,
            vocab_size=99, max_text_length=24, dec_token_id=98, embed_dim=20)
TINY_LM = CausalLMConfig(arch="opt", vocab_size=101, width=44, layers=2, heads=4, mlp_dim=45, max_positions=64,
                         pad_token_id=1, bos_token_id=2, eos_token_id=2)


def _model(stage: int = 1, **kw) -> BLIP2:
    torch.manual_seed(0)
    extra = {"lm": TINY_LM} if stage == 2 else {}
    return BLIP2(BLIP2Config(stage=stage, **{**TINY, **extra, **kw})).eval()


def _batch(b: int = 3, n: int = 7, vocab: int = 97, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, n), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(b, n, dtype=torch.long)
    if b > 1:
        mask[1, n - 2:] = 0
        ids[1, n - 2:] = 0
    return {"pixel_values": torch.randn(b, 3, 30, 30, generator=g), "input_ids": ids, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------------- masks
def test_mask_matrices() -> None:
    text = torch.tensor([[1, 1, 1, 0]])
    itc, itm, itg = (qformer_mask(m, 2, text)[0] for m in ("itc", "itm", "itg"))
    assert itc[:2, 2:].sum() == 0 and itc[2:, :2].sum() == 0 and itc[:2, :2].all()  # no query<->text
    assert itm[:, :5].all() and not itm[:, 5].any()  # all see all real tokens; pad never attended
    assert not itg[:2, 2:].any() and itg[2:, :2].all()  # queries never see text; text sees every query
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    causal[:, 3] = False  # the padded key
    assert torch.equal(itg[2:, 2:], causal)  # causal text over real tokens
    with pytest.raises(ValueError, match="mode"):
        qformer_mask("bidirectional", 2, text)


@pytest.mark.parametrize("mode", ["itc", "itm", "itg"])
def test_masks_by_perturbation(mode: str) -> None:
    model = _model()
    batch = _batch()
    q = model.config.num_query_tokens
    with torch.no_grad():
        image = model.encode_image(batch["pixel_values"])
        ids = batch["input_ids"]
        out = model.fuse(image, ids, batch["attention_mask"], mode=mode)
        changed = ids.clone()
        changed[:, 3] = (changed[:, 3] + 7) % 90 + 5  # perturb text token 3 only
        out2 = model.fuse(image, changed, batch["attention_mask"], mode=mode)
        other_image = model.encode_image(torch.randn_like(batch["pixel_values"]))
        out3 = model.fuse(other_image, ids, batch["attention_mask"], mode=mode)
    query_moved = not torch.allclose(out[:, :q], out2[:, :q], atol=1e-6)
    assert query_moved == (mode == "itm")  # only ITM lets the queries see the text
    text_sees_image = not torch.allclose(out[:, q:], out3[:, q:], atol=1e-6)
    assert text_sees_image == (mode != "itc")  # ITC text never sees the queries (hence the image)
    if mode == "itg":  # causal: text before position 3 unchanged, from 3 on changed
        assert torch.allclose(out[:, q:q + 3], out2[:, q:q + 3], atol=1e-6)
        assert not torch.allclose(out[:, q + 3:q + 4], out2[:, q + 3:q + 4], atol=1e-6)
    if mode == "itc":  # the one-pass block-diagonal mask equals the two separate passes
        assert torch.allclose(out[:, :q], model.encode_queries(image), atol=1e-5)
        assert torch.allclose(out[:, q:], model.encode_text(ids, batch["attention_mask"]), atol=1e-5)


def test_itg_cached_route_equals_one_pass() -> None:
    model = _model()
    batch = _batch()
    q = model.config.num_query_tokens
    with torch.no_grad():
        image = model.encode_image(batch["pixel_values"])
        _, cache = model.encode_queries(image, return_layer_inputs=True)
        cached = model.itg_decode(cache, batch["input_ids"], batch["attention_mask"], image)
        dec = batch["input_ids"].clone()
        dec[:, 0] = model.config.dec_token_id
        one_pass = model.itg_head(model.fuse(image, dec, batch["attention_mask"], mode="itg")[:, q:])
    assert torch.allclose(cached, one_pass, atol=1e-5)
    assert cached.shape == (3, 7, model.config.vocab_size)


# ------------------------------------------------------------------------------------------------ structure
def test_qformer_structure() -> None:
    model = _model()
    layers = model.qformer.layers
    assert [layer.cross_attn is not None for layer in layers] == [True, False, True]
    assert layers[0].cross_attn.k_proj.in_features == 36  # keys / values come from the ViT width
    for layer in layers:  # query FFN initialised as a copy of the text FFN (LAVIS)
        assert torch.equal(layer.query_mlp.fc1.weight, layer.text_mlp.fc1.weight)
        assert layer.query_mlp.fc1.weight is not layer.text_mlp.fc1.weight
    s2 = _model(stage=2)
    assert all(layer.text_mlp is None for layer in s2.qformer.layers) and not hasattr(s2, "word_embeddings")


def test_itc_is_max_over_queries_and_itm_mean_over_queries() -> None:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(2, 4, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    sim = itc_similarity(img, txt)
    assert sim.shape == (2, 3)
    assert torch.allclose(sim[1, 2], max(img[1, k] @ txt[2] for k in range(4)))
    model = _model()
    fused = torch.randn(2, 5 + 3, 40)
    manual = torch.stack([model.itm_head(fused[:, k]) for k in range(5)]).mean(0)
    assert torch.allclose(model.itm_logits(fused), manual, atol=1e-6)


# ----------------------------------------------------------------------------------------------- stage 1
def test_stage1_losses_and_gradients() -> None:
    model = _model().train()
    out = model(_batch(), generator=torch.Generator().manual_seed(0))
    assert out.sim_i2t.shape == (3, 3) and out.itm_logits.shape == (9, 2) and out.query_output.shape == (3, 5, 40)
    assert torch.allclose(out.loss, out.loss_itc + out.loss_itm + out.loss_itg)
    assert all(torch.isfinite(t) and t > 0 for t in (out.loss_itc, out.loss_itm, out.loss_itg))
    out.loss.backward()
    assert model.query_tokens.grad.abs().sum() > 0 and model.temp.grad is not None
    assert model.itg_head.decoder.weight.grad.abs().sum() > 0
    assert model.visual.encoder.blocks[0].attn.q_proj.weight.grad is None  # frozen ViT
    assert model.visual.ln_post.weight.grad is not None  # ln_vision trains (LAVIS)
    assert not model.visual.training  # the frozen ViT stays in eval mode under model.train()


def test_itc_loss_value_with_label_smoothing() -> None:
    model = _model()
    out = model(_batch())
    s = out.sim_i2t
    t = torch.arange(3)
    manual = (F.cross_entropy(s, t, label_smoothing=0.1) + F.cross_entropy(s.T, t, label_smoothing=0.1)) / 2
    assert torch.allclose(out.loss_itc, manual)
    # temperature divides the cosine similarities, with no clamp
    with torch.no_grad():
        model.temp.fill_(0.5)
    assert torch.allclose(model(_batch()).sim_i2t * 0.5, s * 0.07, atol=1e-5)


def test_batch_of_one_works() -> None:
    out = _model()(_batch(b=1))
    assert out.sim_i2t.shape == (1, 1) and out.loss_itm.item() == 0 and torch.isfinite(out.loss)
    out2 = _model(stage=2)(_batch(b=1, vocab=100))
    assert out2.logits.shape == (1, 5 + 7, 101)


def test_hard_negative_sampler() -> None:
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 6, generator=g) * 3
    same = torch.zeros(6, 6, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True  # items 0 and 1 share a caption
    counts = torch.zeros(6, 6)
    for _ in range(400):
        neg_img, neg_txt = sample_hard_negatives(sim, same, generator=g)
        assert (neg_img != torch.arange(6)).all() and (neg_txt != torch.arange(6)).all()
        assert neg_img[0] != 1 and neg_img[1] != 0 and neg_txt[0] != 1
        counts[torch.arange(6), neg_txt] += 1
    expected = sim.masked_fill(torch.eye(6, dtype=torch.bool) | same, -1e4).softmax(1) * 400
    assert (counts - expected).abs().max() < 45  # frequencies follow softmax(sim) without the positives
    half = sample_hard_negatives(sim.half())  # fp16 input: sampled in fp32, no NaN
    assert all(torch.isfinite(h.float()).all() for h in half)


# ----------------------------------------------------------------------------------------------- stage 2
def test_stage2_label_masking_and_loss() -> None:
    model = _model(stage=2)
    batch = _batch(vocab=100)
    batch["prompt_lengths"] = 2
    out = model(batch)
    labels = build_lm_labels(batch["input_ids"], batch["attention_mask"], prompt_lengths=2, num_prefix=5)
    assert (labels[:, :5 + 2] == -100).all() and (labels[1, -2:] == -100).all()
    assert torch.equal(labels[0, 7:], batch["input_ids"][0, 2:])
    assert torch.allclose(out.loss, lm_loss(out.logits, labels))
    assert out.language_model_inputs.shape == (3, 5, 44) and out.logits.shape == (3, 12, 101)


def test_stage2_freezing_bit_identical_after_a_step() -> None:
    model = _model(stage=2).train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("language_model.", "visual."))
              and not k.startswith("visual.ln_post.")}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("query_tokens", "qformer.", "language_projection.", "visual.ln_post."))
                             for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    before = model.language_projection.weight.clone()
    model(_batch(vocab=100)).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert not torch.equal(model.language_projection.weight, before)
    assert not model.language_model.training


def test_generate_and_from_stage1() -> None:
    s1 = _model()
    s2 = BLIP2.from_stage1(s1, lm_config=TINY_LM)
    assert torch.equal(s2.query_tokens, s1.query_tokens)
    assert torch.equal(s2.qformer.layers[0].cross_attn.q_proj.weight, s1.qformer.layers[0].cross_attn.q_proj.weight)
    px = _batch()["pixel_values"]
    ids = s2.generate(px, max_new_tokens=4)
    assert ids.shape[0] == 3 and 1 <= ids.shape[1] <= 4
    ids2 = s2.generate(px, torch.tensor([2, 17]), max_new_tokens=4)
    assert ids2.shape[0] == 3
    with pytest.raises(RuntimeError, match="stage-2"):
        s1.generate(px)


# ----------------------------------------------------------------------------------------- paper config / meta
def test_paper_config_on_meta_device() -> None:
    config = BLIP2Config.paper(stage=2)
    assert config.num_image_tokens == 257 and config.lm.width == 2560
    with torch.device("meta"):
        model = BLIP2(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    px = torch.empty(1, 3, 224, 224, device="meta")
    with trace(model, max_depth=2) as t, torch.no_grad():
        prompt = model.visual_prompt(px)
    assert t.output_shape("visual.ln_post") == (1, 257, 1408)
    assert t.output_shape("qformer") == (1, 32, 768)  # (out, no layer cache)
    assert tuple(prompt.shape) == (1, 32, 2560) and prompt.device.type == "meta"
    crosses = [i for i, layer in enumerate(model.qformer.layers) if layer.cross_attn is not None]
    assert crosses == [0, 2, 4, 6, 8, 10]


# ----------------------------------------------------------------------------------------- registry / errors
def test_registry_and_config_round_trip() -> None:
    for stage in (1, 2):
        model = build_model("blip2", "toy", stage=stage)
        again = model_from_dict("blip2", model_record(model)["config"])
        assert again.config == model.config
    assert BLIP2Config.toy(stage=2).lm == CausalLMConfig.toy()


def test_bad_input_is_named() -> None:
    model = _model()
    batch = _batch()
    with pytest.raises(ValueError, match="pixel_values"):
        model({**batch, "pixel_values": torch.randn(3, 3, 32, 32)})
    with pytest.raises(ValueError, match="input_ids"):
        model({**batch, "input_ids": batch["input_ids"] + 200})
    with pytest.raises(ValueError, match="captions"):
        model({**batch, "input_ids": batch["input_ids"][:2], "attention_mask": batch["attention_mask"][:2]})
    with pytest.raises(KeyError, match="input_ids"):
        model({"pixel_values": batch["pixel_values"]})
    with pytest.raises(ValueError, match="stage"):
        BLIP2Config(stage=3)
    with pytest.raises(ValueError, match="lm"):
        BLIP2Config(stage=2)
    with pytest.raises(ValueError, match="dec_token_id"):
        BLIP2Config(vocab_size=10, dec_token_id=10)


# ---------------------------------------------------------------------------------------------- HF parity
def _randomise(module: torch.nn.Module) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():  # HF zero-initialises query tokens and biases: make every weight count
            p.normal_(0.0, 0.2)


def _hf_configs():
    from transformers import Blip2Config, OPTConfig

    vision = dict(image_size=30, patch_size=6, hidden_size=36, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4)
    qf = dict(vocab_size=99, hidden_size=40, num_hidden_layers=3, num_attention_heads=4, intermediate_size=41,
              encoder_hidden_size=36, max_position_embeddings=24)
    opt = OPTConfig(vocab_size=101, hidden_size=44, num_hidden_layers=2, ffn_dim=45, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=44, bos_token_id=2, eos_token_id=2,
                    pad_token_id=1).to_dict()
    retrieval = Blip2Config(vision_config=vision, qformer_config={**qf, "use_qformer_text_input": True},
                            num_query_tokens=5, image_text_hidden_size=20, text_config=opt)
    generation = Blip2Config(vision_config=vision, qformer_config=qf, num_query_tokens=5, image_token_index=100,
                             text_config=opt)
    return retrieval, generation


def test_parity_with_transformers_retrieval() -> None:
    from transformers import Blip2ForImageTextRetrieval

    cfg, _ = _hf_configs()
    hf = Blip2ForImageTextRetrieval(cfg).eval()
    _randomise(hf)
    lab = BLIP2.from_hf(hf).eval()
    b = _batch(vocab=97)
    px, ids, am = b["pixel_values"], b["input_ids"], b["attention_mask"]
    with torch.no_grad():
        itc = hf(pixel_values=px, input_ids=ids, attention_mask=am, use_image_text_matching_head=False)
        itm = hf(pixel_values=px, input_ids=ids, attention_mask=am, use_image_text_matching_head=True)
        assert torch.allclose(lab.itc_scores(px, ids, am), itc.logits_per_image, atol=1e-5)
        assert torch.allclose(lab.itm_scores(px, ids, am), itm.logits_per_image, atol=1e-5)
        img = lab.image_features(lab.encode_queries(lab.encode_image(px)))
        assert torch.allclose(img, itc.image_embeds, atol=1e-5)
        wrong = BLIP2.from_hf(hf)
        wrong.qformer.layers[1].query_norm.weight.data += 0.1  # the comparison can fail
        assert not torch.allclose(wrong.itm_scores(px, ids, am), itm.logits_per_image, atol=1e-5)


def test_parity_with_transformers_generation() -> None:
    from transformers import Blip2ForConditionalGeneration

    _, cfg = _hf_configs()
    hf = Blip2ForConditionalGeneration(cfg).eval()
    _randomise(hf)
    lab = BLIP2.from_hf(hf).eval()
    assert lab.config.stage == 2 and lab.config.lm.width == 44
    b = _batch(vocab=100)
    px, txt, tm = b["pixel_values"], b["input_ids"], b["attention_mask"]
    q = 5
    hf_ids = torch.cat([torch.full((3, q), 100), txt], 1)  # transformers 5: q <image> placeholders in input_ids
    hf_mask = torch.cat([torch.ones(3, q, dtype=torch.long), tm], 1)
    labels = build_lm_labels(txt, tm, num_prefix=q)
    with torch.no_grad():
        ref = hf(pixel_values=px, input_ids=hf_ids, attention_mask=hf_mask, labels=labels)
        out = lab(b)
        ref_q = hf.get_image_features(pixel_values=px).pooler_output
    assert torch.allclose(out.language_model_inputs, ref_q, atol=1e-5)
    assert torch.allclose(out.logits, ref.logits, atol=1e-4)
    assert torch.allclose(out.loss, ref.loss, atol=1e-5)
    with torch.no_grad():
        ref_gen = hf.generate(pixel_values=px, input_ids=torch.cat([torch.full((3, q), 100), txt[:, :1]], 1),
                              max_new_tokens=5, do_sample=False)
    assert torch.equal(lab.generate(px, txt[:, :1], max_new_tokens=5), ref_gen[:, q + 1:])


def test_load_vision_encoder_from_a_clip_tower() -> None:
    from vlm_lab.models.clip import CLIP, CLIPConfig

    clip = CLIP(CLIPConfig.toy())
    cfg = BLIP2Config.toy(vision_width=96, vision_layers=3, vision_heads=4, vision_mlp_dim=384, vision_ln_pre=True,
                          vision_patch_bias=False, vision_ln_eps=1e-5)
    model = BLIP2(cfg).load_vision_encoder(clip.visual)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_image(px), clip.visual.ln_post(clip.visual(px)))
    assert not model.visual.patch_embed.proj.weight.requires_grad  # still frozen after loading
    with pytest.raises(ValueError, match="ln_pre"):
        BLIP2(BLIP2Config.toy(vision_width=96, vision_layers=3, vision_heads=4, vision_mlp_dim=384,
                              vision_ln_eps=1e-5)).load_vision_encoder(clip.visual)
