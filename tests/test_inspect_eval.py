"""vlm_lab.inspect.trace and vlm_lab.eval (zero-shot ensembling order, Recall@K definitions)."""

import pytest
import torch
import torch.nn.functional as F

from vlm_lab.eval import retrieval_metrics, topk_accuracy, zero_shot_classifier, zero_shot_logits
from vlm_lab.inspect import count_flops, count_parameters, trace
from vlm_lab.models import CLIP, CLIPConfig


def test_trace_records_shapes_in_call_order_and_restores_the_model():
    m = CLIP(CLIPConfig.toy(eot_token_id=3))
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": torch.tensor([[2, 9, 3], [2, 3, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    with trace(m, attention=True) as t:
        m(batch)
    names = [r.name for r in t.records]
    assert names[0] == "" and names.index("visual") < names.index("visual.patch_embed")
    assert t.output_shape("visual") == (2, 17, 96)
    assert t.output_shape("visual.patch_embed") == (2, 16, 96)
    assert t.output_shape("text") == (2, 3, 96)
    w = t.attention("text.encoder.blocks.0.attn")
    assert w.shape == (2, 4, 3, 3) and torch.all(w[1, :, :, 2] == 0)  # padded key gets no weight
    assert "visual.patch_embed" in t.table() and "params" in t.table()
    assert t.record("").params == count_parameters(m)
    # hooks are gone and attention is back on the fused path
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())
    assert all(getattr(mod, "weights_hook", None) is None for mod in m.modules())
    with pytest.raises(KeyError, match="was not traced"):
        t.record("nope")


def test_trace_paper_clip_on_meta_device_without_memory():
    with torch.device("meta"):
        m = CLIP(CLIPConfig.paper("ViT-B/16"))
    px = torch.empty(1, 3, 224, 224, device="meta")
    with trace(m, max_depth=1) as t:
        m.encode_image(px)
    assert t.output_shape("visual") == (1, 197, 768)
    assert t.output_shape("visual_projection") == (1, 512)
    flops = count_flops(lambda: m.encode_image(px))
    assert 33e9 < flops < 36e9  # ViT-B/16 at 224 px: ~17.5 GMACs


def test_count_flops_counts_attention_on_cpu_as_on_meta():
    from vlm_lab.nn import Attention
    att = Attention(64, 4)
    cpu = count_flops(lambda: att(torch.randn(2, 50, 64)))
    with torch.device("meta"):
        meta_att = Attention(64, 4)
    meta = count_flops(lambda: meta_att(torch.empty(2, 50, 64, device="meta")))
    projections = 4 * 2 * (2 * 50 * 64 * 64)  # q, k, v, out: 2 FLOPs per multiply-add
    core = 2 * (2 * 2 * 50 * 50 * 64)  # scores and weighted values
    assert cpu == meta == projections + core


def test_zero_shot_ensembling_normalises_each_prompt_before_averaging():
    class Fake(torch.nn.Module):
        """encode_text returns a fixed, unnormalised vector per prompt id; normalisation happens in eval."""
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.tensor([[10.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 3.0]]))

        def encode_text(self, ids, mask):
            return self.table[ids[:, 0]]

    class Tok:
        def __call__(self, texts, **kw):
            ids = torch.tensor([[int(t.split()[-1])] for t in texts])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    # class "a" = prompts 0 and 1 -> normalised mean of e1 and e2 = (1,1)/sqrt2; unnormalised would be ~(1,0)
    w = zero_shot_classifier(Fake(), Tok(), {"a": ["0", "1"], "b": ["2"]}, templates=["p {}"])
    torch.testing.assert_close(w[0], F.normalize(torch.tensor([1.0, 1.0]), dim=0))
    torch.testing.assert_close(w[1], F.normalize(torch.tensor([1.0, 1.0]), dim=0))
    with pytest.raises(ValueError, match="templates"):
        zero_shot_classifier(Fake(), Tok(), ["a"], templates=["no placeholder"])


def test_topk_and_scale_invariance():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    labels = torch.tensor([1, 2])
    assert topk_accuracy(logits, labels, ks=(1, 2)) == {"top1": 0.5, "top2": 0.5}
    img = F.normalize(torch.randn(5, 4), dim=-1)
    cls = F.normalize(torch.randn(3, 4), dim=-1)
    assert torch.equal(zero_shot_logits(img, cls, 1.0).argmax(1), zero_shot_logits(img, cls, 100.0).argmax(1))


def test_recall_at_k_with_several_captions_per_image():
    # 2 images, 4 texts; texts 0,1 -> image 0; texts 2,3 -> image 1
    scores = torch.tensor([[0.1, 0.9, 0.8, 0.0],    # image 0: best text is 1 (a GT) -> rank 0
                           [0.9, 0.1, 0.2, 0.3]])   # image 1: order 0,3,2,1 -> best GT (3) at rank 1
    m = retrieval_metrics(scores, [0, 0, 1, 1], ks=(1, 2))
    assert m["i2t_R@1"] == 50.0 and m["i2t_R@2"] == 100.0
    # t2i: text0 -> best image 1 (wrong), text1 -> 0 (right), text2 -> 0 (wrong), text3 -> 1 (right)
    assert m["t2i_R@1"] == 50.0 and m["t2i_R@2"] == 100.0
    assert m["r_mean"] == 75.0
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_metrics(scores, [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.full((2, 2), float("nan")), [0, 1])
