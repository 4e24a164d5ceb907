"""VLMo: modality-expert routing, zero gradient to unused experts, stage-wise freezing, the three uses."""

import pytest
import torch

from vlm_lab.models import build_model, model_from_dict, model_record
from vlm_lab.models.vlmo import VLMo, VLMoConfig
from vlm_lab.nn import MoMEBlock


def _cfg(**kw) -> VLMoConfig:
    base = dict(vocab_size=61, max_text_len=13, image_size=24, patch_size=8, width=36, depth=3, heads=3,
                mlp_dim=37, vl_start=2, embed_dim=20, mask_token_id=4, special_token_ids=(0, 1, 2, 3, 4))
    return VLMoConfig(**{**base, **kw})


def _batch(b=4, m=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 61, (b, m), generator=g)
    ids[:, 0] = 2
    am = torch.ones_like(ids)
    am[1, 5:] = 0
    ids[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": am, "pixel_values": torch.randn(b, 3, 24, 24, generator=g)}


def _grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_structure_vl_experts_only_on_top_and_own_norms():
    model = VLMo(_cfg())
    assert [b.with_vl_expert for b in model.blocks] == [False, False, True]
    blk = model.blocks[2]
    norms = [blk.norm2_image, blk.norm2_text, blk.norm2_vl]
    assert len({id(n) for n in norms}) == 3
    assert blk.attn.k_proj.bias is None and blk.attn.q_proj.bias is not None  # BEiT-style qkv
    assert torch.allclose(blk.ls1.gamma, torch.full((36,), 0.1))


@pytest.mark.parametrize("use,unused", [("text", ("mlp_image", "norm2_image", "mlp_vl", "norm2_vl")),
                                        ("image", ("mlp_text", "norm2_text", "mlp_vl", "norm2_vl"))])
def test_unimodal_forward_gives_zero_gradient_to_other_experts(use, unused):
    torch.manual_seed(0)
    model = VLMo(_cfg())
    b = _batch()
    out = model.text_tokens(b["input_ids"], b["attention_mask"]) if use == "text" else model.image_tokens(b["pixel_values"])
    out.sum().backward()
    for blk in model.blocks:
        for name in unused:
            if hasattr(blk, name):
                assert _grad_norm(getattr(blk, name)) == 0.0
        assert _grad_norm(getattr(blk, f"mlp_{use}")) > 0
        assert _grad_norm(blk.attn) > 0  # the attention is shared


def test_fused_routing_split_below_vl_start_then_vl_expert():
    torch.manual_seed(0)
    blk = MoMEBlock(36, 3, 37, with_vl_expert=False)
    x = torch.randn(2, 10, 36)
    out = blk(x, "vl", num_text_tokens=4)
    h = x + blk.ls1(blk.attn(blk.norm1(x)))
    expected = torch.cat([h[:, :4] + blk.ls2(blk.mlp_text(blk.norm2_text(h[:, :4]))),
                          h[:, 4:] + blk.ls2(blk.mlp_image(blk.norm2_image(h[:, 4:])))], 1)
    assert torch.allclose(out, expected, atol=1e-6)
    top = MoMEBlock(36, 3, 37, with_vl_expert=True)
    out = top(x, "vl", num_text_tokens=4)
    h = x + top.ls1(top.attn(top.norm1(x)))
    assert torch.allclose(out, h + top.ls2(top.mlp_vl(top.norm2_vl(h))), atol=1e-6)
    out.sum().backward()
    assert _grad_norm(top.mlp_text) == 0 and _grad_norm(top.mlp_image) == 0 and _grad_norm(top.mlp_vl) > 0
    with pytest.raises(ValueError, match="num_text_tokens"):
        blk(x, "vl")
    with pytest.raises(ValueError, match="modality"):
        blk(x, "audio")


def test_stage_freezing():
    torch.manual_seed(0)
    model = VLMo(_cfg())
    model.set_stage("text")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n in trainable:
        assert (n.startswith(("word_embeddings", "text_position", "text_norm", "modality.", "mlm_head.", "norm."))
                or ".mlp_text." in n or ".norm2_text." in n), n
    assert "blocks.0.mlp_text.fc1.weight" in trainable and "norm.weight" in trainable
    assert not any(".attn." in n or "norm1" in n or "mlp_image" in n or "patch_embed" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(_batch())
    assert out.loss_mlm > 0 and out.loss_itc == 0
    out.loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        if n not in trainable:
            assert not changed and p.grad is None, n
    assert not torch.equal(model.blocks[0].mlp_text.fc1.weight, before["blocks.0.mlp_text.fc1.weight"])
    model.set_stage("image")
    out = model(_batch())
    assert out.loss_mim > 0 and all(p.requires_grad for p in model.parameters())
    model.set_stage("vl")
    out = model(_batch())
    assert out.itm_logits.shape == (12, 2) and out.itm_labels.tolist() == [1] * 4 + [0] * 8
    assert torch.allclose(out.loss, out.loss_itc + out.loss_itm + 0.25 * out.loss_mlm)
    with pytest.raises(ValueError, match="stage"):
        model.set_stage("audio")


def test_dual_and_fusion_uses_shapes_and_padding():
    torch.manual_seed(0)
    model = VLMo(_cfg()).eval()
    b = _batch()
    img, txt = model.encode_image(b["pixel_values"]), model.encode_text(b["input_ids"], b["attention_mask"])
    assert img.shape == (4, 20) and txt.shape == (4, 20)
    assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
    fused = model.fuse(b["input_ids"], b["pixel_values"], b["attention_mask"])
    assert fused.shape == (4, 7 + 1 + 9, 36)
    ids2 = b["input_ids"].clone()
    ids2[1, 5:] = 9  # padded tokens never attended
    assert torch.allclose(model.itm_scores(ids2, b["pixel_values"], b["attention_mask"]),
                          model.itm_scores(b["input_ids"], b["pixel_values"], b["attention_mask"]), atol=1e-5)


def test_registry_and_bad_config():
    model = build_model("vlmo", "toy")
    assert model_from_dict("vlmo", model_record(model)["config"]).config == model.config
    with pytest.raises(ValueError, match="vl_start"):
        VLMoConfig.toy(vl_start=9)
