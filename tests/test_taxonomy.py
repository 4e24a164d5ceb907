"""VE / TE / MI split of parameters and FLOPs, against counts worked out by hand on tiny configs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vlm_lab.inspect import count_flops
from vlm_lab.inspect.taxonomy import register_taxonomy_rules, taxonomy_split
from vlm_lab.models.clip import CLIP, CLIPConfig
from vlm_lab.models.fusion import EarlyFusion, FusionConfig, LateFusion

b, n = 2, 5  # batch, question tokens
C = FusionConfig(image_size=16, patch_size=8, vocab_size=20, max_length=6, num_answers=5, width=8, heads=2, mlp_dim=12,
                 early_layers=1, vision_layers=1, text_layers=1, fusion_layers=1, late_text_layers=1)
d, m, a, p, ps = C.width, C.mlp_dim, C.num_answers, 4, C.patch_size  # p = (16 / 8)^2 patches


def batch() -> dict:
    return {"pixel_values": torch.randn(b, 3, 16, 16), "input_ids": torch.randint(0, 20, (b, n)),
            "attention_mask": torch.ones(b, n, dtype=torch.long)}


def block_params(width: int, mlp: int) -> int:
    return 4 * (width * width + width) + (width * mlp + mlp) + (mlp * width + width) + 2 * 2 * width


def block_flops(tokens: int) -> int:  # per image: q, k, v, out projections; QK^T and AV; the MLP
    return 2 * tokens * d * d * 4 + 2 * 2 * tokens * tokens * d + 2 * 2 * tokens * d * m


def test_early_fusion_by_hand():
    s = taxonomy_split(EarlyFusion(C), batch())
    ve = (3 * ps * ps * d + d) + p * d  # patch projection (conv + bias) + patch positions
    te = 20 * d + 6 * d  # token table + position table
    head = 2 * d + (d * d + d) + (d * a + a)  # LayerNorm + two linears
    mi = 2 * d + block_params(d, m) + 2 * d  # type embeddings + the joint block + final norm
    assert s.params == {"visual_embedding": ve, "textual_embedding": te, "modality_interaction": mi, "head": head}
    assert s.flops["visual_embedding"] == b * 2 * (3 * ps * ps) * d * p  # the patch convolution
    assert s.flops["textual_embedding"] == 0  # look-ups are free for the counter
    assert s.flops["modality_interaction"] == b * block_flops(n + p)
    assert s.flops["head"] == b * 2 * (d * d + d * a)
    assert s.total_params == sum(q.numel() for q in EarlyFusion(C).parameters())


def test_late_fusion_head_split_and_totals():
    model = LateFusion(C)
    x = batch()
    s = taxonomy_split(model, x)
    # the first layer of the MLP over [v; u] is where the modalities meet; the last one maps to answers
    assert s.flops["modality_interaction"] == b * 2 * (2 * d) * (2 * d)
    assert s.flops["head"] == b * 2 * (2 * d) * a
    assert s.params["modality_interaction"] == 2 * (2 * d) + (2 * d) * (2 * d) + 2 * d
    # both count PyTorch's CPU attention kernel (QK^T and AV: 4 n^2 d per image and layer) with the same formula
    attention = b * 4 * d * ((1 + p) ** 2 + n**2)  # one ViT block over [CLS] + 4 patches, one text block over 5 words
    assert s.total_flops == count_flops(lambda: model.eval()(x))
    assert attention > 0 and s.total_flops > attention
    assert abs(sum(s.share("flops").values()) - 1) < 1e-9


def test_clip_interaction_is_a_dot_product():
    c = CLIPConfig.toy(vision_layers=1, text_layers=1, vocab_size=50, context_length=8, embed_dim=16)
    model = CLIP(c)
    x = {"pixel_values": torch.randn(3, 3, 32, 32), "input_ids": torch.randint(0, 50, (3, 6))}
    s = taxonomy_split(model, x)
    assert s.params["modality_interaction"] == 1  # logit_scale
    # the (b, b) similarity, computed in forward and again inside clip_loss
    assert s.flops["modality_interaction"] == 2 * (2 * 3 * 3 * 16)
    assert s.params["visual_embedding"] == sum(q.numel() for q in model.visual.parameters()) + 96 * 16
    assert s.share("flops")["modality_interaction"] < 1e-3


def test_unknown_models_and_rules():
    class Mystery(nn.Module):
        def __init__(self):
            super().__init__()
            self.eye = nn.Linear(3, 4)
            self.ear = nn.Linear(3, 4)

        def forward(self, x):
            return self.eye(x) @ self.ear(x).T

    with pytest.raises(ValueError, match="register_taxonomy_rules"):
        taxonomy_split(Mystery())
    with pytest.raises(ValueError, match="category"):
        register_taxonomy_rules("Mystery", [(r"^eye", "vision")])
    register_taxonomy_rules("Mystery", [(r"^eye", "visual_embedding"), (r"^ear", "textual_embedding")])
    s = taxonomy_split(Mystery(), torch.randn(2, 3))
    assert s.params["visual_embedding"] == 16 and s.params["textual_embedding"] == 16
    assert s.flops == {"visual_embedding": 2 * 2 * 3 * 4, "textual_embedding": 2 * 2 * 3 * 4,
                       "modality_interaction": 2 * 2 * 2 * 4, "head": 0}


def test_a_custom_forward_still_splits_by_module():
    # regression: a forward that calls a method (not model(...)) used to land every FLOP in the default category
    c = CLIPConfig.toy(vision_layers=1, text_layers=1, vocab_size=50, context_length=8, embed_dim=16)
    model = CLIP(c)
    x = {"pixel_values": torch.randn(3, 3, 32, 32), "input_ids": torch.randint(0, 50, (3, 6))}
    s = taxonomy_split(model, x, forward=lambda m, bb: m.encode_image(bb["pixel_values"]))
    with torch.no_grad():
        assert s.flops["visual_embedding"] == count_flops(lambda: model.encode_image(x["pixel_values"])) > 0
    assert s.flops["textual_embedding"] == 0 and s.flops["modality_interaction"] == 0
    assert "forward" not in model.__dict__  # the class's forward is back


LATER = ["vilt", "albef", "vlmo", "blip", "blip2", "coca", "llava"]


def _pair_batch(model) -> dict:
    c = model.config
    vocab = getattr(c, "vocab_size", None) or c.lm.vocab_size
    ids = torch.randint(5, min(vocab, 100), (1, 10))
    if type(model).__name__ == "LLaVA":
        ids[0, 0] = c.image_token_id
    return {"pixel_values": torch.randn(1, 3, 32, 32), "input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("name", LATER)
def test_every_later_chapter_model_has_rules_and_a_pair_pass(name):
    from vlm_lab.inspect.taxonomy import pair_forward
    from vlm_lab.models.registry import build_model

    torch.manual_seed(0)
    model = build_model(name, "toy")
    s = taxonomy_split(model, _pair_batch(model), forward=pair_forward)
    trained_copies = sum(q.numel() for k, q in model.named_parameters() if k.split(".")[0].endswith("_m"))
    assert s.total_params == sum(q.numel() for q in model.parameters()) - trained_copies
    assert trained_copies == 0 or name in ("albef", "blip")
    assert s.flops["visual_embedding"] > 0 and s.flops["modality_interaction"] > 0  # an image tower and an interaction
    share = s.share("flops")
    if name in ("vilt", "vlmo"):  # single-stream fusion: interaction dominates (ViLT's point)
        assert share["modality_interaction"] > 0.6
    if name in ("albef", "coca"):  # two towers before the fusion layers: text has FLOPs of its own
        assert share["textual_embedding"] > 0.1


def test_blip2_stage2_pair_pass_and_grad_flags_restored():
    from vlm_lab.inspect.taxonomy import pair_forward
    from vlm_lab.models.blip2 import BLIP2, BLIP2Config

    model = BLIP2(BLIP2Config.toy(stage=2))
    flags = [q.requires_grad for q in model.parameters()]
    ids = torch.randint(5, 100, (1, 10))
    s = taxonomy_split(model, {"pixel_values": torch.randn(1, 3, 32, 32), "input_ids": ids}, forward=pair_forward)
    assert [q.requires_grad for q in model.parameters()] == flags and not all(flags)  # frozen ViT / LLM stay frozen
    assert s.params["textual_embedding"] == model.language_model.get_input_embeddings().weight.numel() + sum(
        q.numel() for k, q in model.language_model.named_parameters() if "embed_positions" in k)
    assert s.flops["visual_embedding"] > 0 and s.share()["modality_interaction"] > 0.5  # Q-Former + LLM


def test_albef_fusion_layers_are_interaction_and_text_layers_are_text():
    from vlm_lab.models.albef import ALBEF, ALBEFConfig

    model = ALBEF(ALBEFConfig.toy(text_layers=2, fusion_layers=1))
    s = taxonomy_split(model)
    layer = [sum(q.numel() for q in model.text.layers[i].parameters()) for i in range(3)]
    emb, proj = (sum(q.numel() for q in mod.parameters()) for mod in (model.text.embeddings, model.text_proj))
    assert s.params["textual_embedding"] == emb + layer[0] + layer[1] + proj
    assert s.params["modality_interaction"] == layer[2] + 1  # the fusion layer + the temperature
    register_taxonomy_rules("Mystery2", [(r"^x", "skip")])  # "skip" is a valid category for training-only parts
    with pytest.raises(ValueError, match="skip"):
        register_taxonomy_rules("Mystery2", [(r"^x", "nothing")])
