"""LLaVA: splicing (one / several / no images), padding and batching, label masking and its guard, stage
freezing, generation, and parity with transformers' LlavaForConditionalGeneration (transformers 5.x)."""

import pytest
import torch

from vlm_lab.models.lm import CausalLMConfig
from vlm_lab.models.llava import (IGNORE_INDEX, LLaVA, LLaVAConfig, ConversationTemplate, MaskingMismatchError,
                                  collate_conversations, tokenize_conversation, tokenize_conversations)

IMG = 6  # <image> id of the tiny test vocabulary


def tiny(**kw) -> LLaVA:
    torch.manual_seed(0)
    lm = CausalLMConfig.toy(vocab_size=41, width=24, layers=2, heads=2, mlp_dim=37, max_positions=96)
    cfg = LLaVAConfig.toy(image_size=15, patch_size=5, vision_width=18, vision_layers=3, vision_heads=3,
                          vision_mlp_dim=29, lm=lm, image_token_id=IMG, **kw)
    return LLaVA(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    from vlm_lab.data.tokenizers import train_bpe

    texts = ["USER: What tissue is this? ASSISTANT: adipose tissue with thin membranes",
             "USER: Does this patch show mucus? ASSISTANT: Yes. USER: Describe it ASSISTANT: pale mucin pools",
             "ASSISTANT: ASSISTANT: ASSISTANT: USER: USER:"] * 3
    return train_bpe(texts, vocab_size=300, model_max_length=128)


def test_config_presets_and_errors():
    assert LLaVAConfig.toy().num_image_tokens == 16
    p = LLaVAConfig.paper()
    assert (p.num_image_tokens, p.vision_width, p.lm.width, p.lm.vocab_size, p.image_token_id) == (576, 1024, 4096,
                                                                                                  32064, 32000)
    assert LLaVAConfig.from_dict(__import__("dataclasses").asdict(LLaVAConfig.toy())) == LLaVAConfig.toy()
    with pytest.raises(ValueError, match="vision_feature_select"):
        LLaVAConfig.toy(vision_feature_select="cls")
    with pytest.raises(ValueError, match="image_token_id"):
        LLaVAConfig.toy(image_token_id=5000)


def test_image_features_are_penultimate_layer_without_cls():
    m = tiny()
    px = torch.randn(2, 3, 15, 15)
    states = m.vision_tower.hidden_states(px)  # [emb, b1, b2, b3]
    torch.testing.assert_close(m.image_features(px), states[-2][:, 1:])
    assert m.encode_images(px).shape == (2, 9, 24)
    full = tiny(vision_feature_select="full")
    assert full.image_features(px).shape == (2, 10, 18)


def test_splice_one_and_several_images():
    m = tiny()
    px = torch.randn(3, 3, 15, 15)
    emb = m.encode_images(px)  # (3, 9, 24)
    ids = torch.tensor([[1, 7, IMG, 8, 9, 0, 0],      # one image, two pads
                        [1, IMG, 10, IMG, 11, 12, 2]])  # two images
    mask = (torch.arange(7) < torch.tensor([[5], [7]])).long()
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    e, am, lab = m.splice(ids, mask, labels, emb)
    table = m.language_model.get_input_embeddings()
    assert e.shape == (2, 7 + 2 * 8, 24) and am.sum(1).tolist() == [5 + 8, 7 + 16]
    torch.testing.assert_close(e[0, :2], table(ids[0, :2]))
    torch.testing.assert_close(e[0, 2:11], emb[0])  # first image, first row
    torch.testing.assert_close(e[0, 11:13], table(ids[0, 3:5]))
    torch.testing.assert_close(e[1, 1:10], emb[1])  # second row: images 1 and 2 in reading order
    torch.testing.assert_close(e[1, 10], table.weight[10])
    torch.testing.assert_close(e[1, 11:20], emb[2])
    assert (lab[0, 2:11] == IGNORE_INDEX).all() and (lab[0, 13:] == IGNORE_INDEX).all() and lab[0, 11] == 8
    assert am[0, 13:].sum() == 0  # right padding
    e_left, am_left, _ = m.splice(ids, mask, None, emb, padding_side="left")
    torch.testing.assert_close(e_left[0, -13:], e[0, :13])
    assert am_left[0, :10].sum() == 0
    with pytest.raises(ValueError, match="3 .*placeholders but 2 images"):
        m.splice(ids, mask, None, emb[:2])


def test_padding_does_not_change_logits():
    """A conversation alone and inside a padded batch (right and left padding) gives the same logits."""
    m = tiny()
    px = torch.randn(3, 3, 15, 15)
    a = {"input_ids": [1, IMG, 7, 8, 9], "labels": [IGNORE_INDEX] * 3 + [8, 9]}
    b = {"input_ids": [1, IMG, 10, IMG, 11, 12, 13, 2], "labels": [IGNORE_INDEX] * 6 + [13, 2]}
    alone = m({**collate_conversations([a], 0), "pixel_values": px[:1]})
    batch = m({**collate_conversations([a, b], 0), "pixel_values": px})
    n = alone.logits.shape[1]
    torch.testing.assert_close(batch.logits[0, :n], alone.logits[0], atol=1e-5, rtol=1e-5)
    assert batch.labels.shape == batch.logits.shape[:2]
    # a text-only conversation (no image) batches with image ones
    c = {"input_ids": [1, 7, 8], "labels": [IGNORE_INDEX, 8, 8]}
    out = m({**collate_conversations([c, a], 0), "pixel_values": px[:1]})
    assert out.loss is not None and torch.isfinite(out.loss)
    left = collate_conversations([a, b], 0, padding_side="left")
    assert left["attention_mask"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]


def test_label_masking_decodes_exactly_the_answers(tok):
    turns = [("<image>\nDoes this patch show mucus?", "Yes."), ("Describe it", "pale mucin pools")]
    enc = tokenize_conversation(turns, tok)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels) and ids[0] == tok.bos_token_id
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 1
    learned = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(learned) == " Yes.</s> pale mucin pools</s>"
    assert tok.decode(ids) == "<s>" + ConversationTemplate.toy().render(turns)
    # a generation prompt ends with "ASSISTANT:" and learns nothing
    p = tokenize_conversation([("hi", None)], tok)
    assert all(x == IGNORE_INDEX for x in p["labels"]) and tok.decode(p["input_ids"]).endswith("ASSISTANT:")
    with pytest.raises(ValueError, match="only the last turn"):
        tokenize_conversation([("a", None), ("b", "c")], tok)


class _SplitMidWord(ConversationTemplate):
    """A broken template: the learned piece starts in the middle of the word "ASSISTANT"."""

    def pieces(self, turns, eos):
        q, a = turns[0]
        return [(f"USER: {q} ASSIST", False), (f"ANT: {a}{eos}", True)]


def test_masking_guard_reports_instead_of_zeroing(tok):
    turns = [("What tissue is this?", "adipose tissue")]
    with pytest.raises(MaskingMismatchError, match="sample 3"):
        tokenize_conversation(turns, tok, _SplitMidWord(), index=3)
    encs, report = tokenize_conversations([turns, turns], tok, _SplitMidWord(), on_mismatch="report")
    assert encs == [] and len(report) == 2 and "sample 1" in report[1]
    encs, report = tokenize_conversations([turns], tok)
    assert len(encs) == 1 and report == []


def test_stage_freezing_gradients():
    m = tiny()
    batch = {**collate_conversations([{"input_ids": [1, IMG, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8]}],
                                     0), "pixel_values": torch.randn(1, 3, 15, 15)}
    for stage, lm_grads in ((1, False), (2, True)):
        m.configure_stage(stage).train()
        m.zero_grad(set_to_none=True)
        m(batch).loss.backward()
        got = {n.split(".")[0] for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert got == ({"projector", "language_model"} if lm_grads else {"projector"}), (stage, got)
        assert not m.vision_tower.training and m.projector.training
        assert m.language_model.training == lm_grads
        assert all(not p.requires_grad for p in m.vision_tower.parameters())
    with pytest.raises(ValueError, match="stage"):
        m.configure_stage(3)


def test_generate_and_answer(tok):
    m = tiny()
    # the test tokenizer's ids must fit the tiny vocabulary only for the parts used: use ids directly
    ids = torch.tensor([[1, IMG, 7, 8], [0, 1, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    out = m.generate(ids, mask, torch.randn(1, 3, 15, 15), max_new_tokens=3, min_new_tokens=3)
    assert out.shape == (2, 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(ids, mask, torch.randn(1, 3, 15, 15), max_new_tokens=200)


def test_registry_builds_llava():
    from vlm_lab.models.registry import model_from_dict, model_record

    m = tiny()
    rec = model_record(m)
    assert rec["model"] == "llava"
    m2 = model_from_dict("llava", rec["config"])
    assert isinstance(m2, LLaVA) and m2.config == m.config


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_from_hf_parity(arch):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, OPTConfig

    torch.manual_seed(0)
    v = CLIPVisionConfig(hidden_size=24, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2,
                         image_size=30, patch_size=6, projection_dim=8)
    common = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":  # untied lm_head, as Vicuna
        t = LlamaConfig(intermediate_size=37, num_key_value_heads=4, tie_word_embeddings=False, **common)
    else:
        t = OPTConfig(ffn_dim=37, word_embed_proj_dim=32, tie_word_embeddings=False, **common)
    hf = LlavaForConditionalGeneration(LlavaConfig(vision_config=v, text_config=t, image_token_id=98,
                                                   image_seq_length=25)).eval()
    m = LLaVA.from_hf(hf).eval()
    assert m.config.num_image_tokens == 25 and m.config.vision_act == "quick_gelu"
    ids = torch.tensor([[1, 5, 98, 7, 8, 98, 9, 10]])
    px = torch.randn(2, 3, 30, 30)
    expanded = torch.cat([ids[0, :2], torch.full((25,), 98), ids[0, 3:5], torch.full((25,), 98), ids[0, 6:]])[None]
    with torch.no_grad():
        ref = hf(input_ids=expanded, pixel_values=px).logits
        got = m({"input_ids": ids, "pixel_values": px}).logits
    assert got.shape == ref.shape == (1, 56, 99)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    # the image matters: another image changes the logits after the placeholder
    with torch.no_grad():
        other = m({"input_ids": ids, "pixel_values": torch.randn(2, 3, 30, 30)}).logits
    assert (other[0, 30:] - got[0, 30:]).abs().max() > 1e-3


def test_toy_recipe_data_and_collate():
    from vlm_lab.data import pathology as P
    from vlm_lab.train import llava as L

    _, tok = L.load_toy("stage2")
    slides = P.make_narrated_slides(2, seed=0, prefix="train", **L.SLIDE_KWARGS)
    s2 = L.stage2_samples(slides, seed=0, n_tiles=3)
    kinds = {s.kind for s in s2}
    assert {"independent", "reasoning", "closed", "open", "general"} <= kinds
    for s in s2:  # one placeholder per image
        assert s.turns[0][0].count("<image>") == len(s.images)
    assert all(not s.images and "<image>" not in s.turns[0][0] for s in L.blind(s2))
    items = L.encode_samples(s2[:5], tok)
    batch = L.LLaVACollator(tok.pad_token_id)(items)
    assert batch["pixel_values"].shape == (sum(len(s.images) for s in s2[:5]), 3, 32, 32)
    assert int((batch["input_ids"] == 4).sum()) == batch["pixel_values"].shape[0]


def test_shipped_toy_answers_from_the_image():
    """Regression on the shipped checkpoints: stage 2 names the tissue of held-out tiles; the blind model cannot."""
    from vlm_lab.data import pathology as P
    from vlm_lab.train import llava as L

    model, tok = L.load_toy("stage2")
    blind_model, _ = L.load_toy("blind")
    tiles = P.PathologyTiles(18, size=32, seed=4242, return_image=True)
    samples = [L.Sample([("<image>\nWhat tissue type is shown in this patch?", P.CLASS_NAMES[P.CLASSES[t["labels"]]])],
                        [t["image"]], "open") for t in (tiles[i] for i in range(18))]
    refs = [s.turns[0][1] for s in samples]
    seen = sum(p.strip(". ") == r for p, r in zip(L.answer_items(model, tok, samples), refs))
    blind = sum(p.strip(". ") == r for p, r in zip(L.answer_items(blind_model, tok, samples, use_images=False), refs))
    assert seen >= 12 and blind <= 4, (seen, blind)
    reply = L.chat(model, tok, tiles[0]["image"], "What tissue type is shown in this patch?")
    assert isinstance(reply, str) and reply
    with pytest.raises(ValueError, match="image"):
        L.chat(model, tok, tiles[0]["image"].astype("float32"), "What is this?")
