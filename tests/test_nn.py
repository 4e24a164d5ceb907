"""Unit tests for vlm_lab.nn: attention masks, blocks, embeddings, pooling, projectors, ViT."""

import pytest
import torch

from vlm_lab import nn as vnn


def test_attention_matches_manual_softmax_with_masks():
    torch.manual_seed(0)
    att = vnn.Attention(36, 4, kv_dim=20).eval()
    x, ctx = torch.randn(3, 5, 36), torch.randn(3, 7, 20)
    kpm = torch.ones(3, 7, dtype=torch.long)
    kpm[0, 4:] = 0
    out = att(x, ctx, key_padding_mask=kpm)
    q = att.q_proj(x).view(3, 5, 4, 9).transpose(1, 2)
    k = att.k_proj(ctx).view(3, 7, 4, 9).transpose(1, 2)
    v = att.v_proj(ctx).view(3, 7, 4, 9).transpose(1, 2)
    s = (q @ k.transpose(-1, -2)) / 3.0
    s = s.masked_fill(kpm[:, None, None, :] == 0, float("-inf"))
    ref = att.out_proj((s.softmax(-1) @ v).transpose(1, 2).reshape(3, 5, 36))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_causal_attention_ignores_the_future_and_padding():
    torch.manual_seed(0)
    att = vnn.Attention(16, 2).eval()
    x = torch.randn(1, 6, 16)
    y = x.clone()
    y[:, 4:] = torch.randn(1, 2, 16)
    a, b = att(x, is_causal=True), att(y, is_causal=True)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])
    # padded keys never influence real positions
    m = torch.tensor([[1, 1, 1, 1, 0, 0]])
    torch.testing.assert_close(att(x, key_padding_mask=m)[:, :4], att(y, key_padding_mask=m)[:, :4])


def test_weights_hook_gives_same_output_and_rows_sum_to_one():
    att = vnn.Attention(16, 2).eval()
    x = torch.randn(2, 5, 16)
    fast = att(x, is_causal=True)
    seen = []
    att.weights_hook = seen.append
    slow = att(x, is_causal=True)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)
    w = seen[0]
    assert w.shape == (2, 2, 5, 5)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 5))
    assert torch.all(w.triu(1) == 0)


def test_attention_mask_errors():
    att = vnn.Attention(16, 2)
    with pytest.raises(ValueError, match="divisible"):
        vnn.Attention(15, 2)
    with pytest.raises(ValueError, match="key_padding_mask"):
        att(torch.randn(2, 5, 16), key_padding_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="boolean or integer"):
        att(torch.randn(2, 5, 16), key_padding_mask=torch.ones(2, 5, dtype=torch.float))
    with pytest.raises(ValueError, match="x must have shape"):
        att(torch.randn(2, 5, 17))


def test_block_cross_attention_and_layer_scale():
    blk = vnn.TransformerBlock(36, 4, 37, cross_attention=True, context_dim=20, layer_scale=0.1)
    y = blk(torch.randn(2, 5, 36), torch.randn(2, 3, 20))
    assert y.shape == (2, 5, 36)
    with pytest.raises(ValueError, match="context"):
        blk(torch.randn(2, 5, 36))
    plain = vnn.TransformerBlock(36, 4, 37)
    with pytest.raises(ValueError, match="without cross_attention"):
        plain(torch.randn(2, 5, 36), torch.randn(2, 3, 36))


def test_encoder_cross_attention_every_other_block():
    enc = vnn.Encoder(32, 5, 4, 37, cross_attention_every=2, context_dim=24)
    assert [b.cross_attn is not None for b in enc.blocks] == [True, False, True, False, True]
    assert enc(torch.randn(2, 4, 32), torch.randn(2, 6, 24)).shape == (2, 4, 32)


def test_patch_embed_and_token_embedding_checks():
    pe = vnn.PatchEmbed(30, 6, 36)
    assert pe(torch.randn(2, 3, 30, 30)).shape == (2, 25, 36)
    with pytest.raises(ValueError, match="30x30"):
        pe(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="channels"):
        pe(torch.randn(2, 1, 30, 30))
    with pytest.raises(TypeError, match="floating-point"):
        pe(torch.zeros(2, 3, 30, 30, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        pe(torch.full((1, 3, 30, 30), float("nan")))
    te = vnn.TokenEmbedding(50, 8, 6)
    assert te(torch.tensor([[1, 2, 3]])).shape == (1, 3, 8)
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        te(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match="at most 6"):
        te(torch.ones(1, 7, dtype=torch.long))


def test_pooling():
    x = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    ids = torch.tensor([[5, 9, 2, 0], [5, 6, 7, 2]])
    torch.testing.assert_close(vnn.eot_pool(x, ids, 2), torch.stack([x[0, 2], x[1, 3]]))
    torch.testing.assert_close(vnn.eot_pool(x, ids, None), torch.stack([x[0, 1], x[1, 2]]))  # argmax rule
    with pytest.raises(ValueError, match="no end-of-text"):
        vnn.eot_pool(x, torch.tensor([[5, 9, 3, 0], [5, 6, 7, 2]]), 2)
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(vnn.mean_pool(x, m)[0], x[0, :2].mean(0))
    pool = vnn.AttentionPooler(16, 5, 4, context_dim=12)
    assert pool(torch.randn(2, 7, 12)).shape == (2, 5, 16)


def test_projectors_and_adapter_identity_at_init():
    x = torch.randn(3, 7, 36)
    assert vnn.LinearProjector(36, 20)(x).shape == (3, 7, 20)
    assert vnn.MLPProjector(36, 20)(x).shape == (3, 7, 20)
    torch.testing.assert_close(vnn.Adapter(36, 5)(x), x)


def test_vit_shapes_and_hidden_states():
    vit = vnn.ViT(vnn.ViTConfig(image_size=30, patch_size=6, width=36, layers=2, heads=4, mlp_dim=37))
    px = torch.randn(2, 3, 30, 30)
    tokens = vit(px)
    assert tokens.shape == (2, 26, 36) and vit.pool(tokens).shape == (2, 36)
    hs = vit.hidden_states(px)
    assert len(hs) == 3
    torch.testing.assert_close(hs[-1], tokens)
    with pytest.raises(ValueError, match="divisible"):
        vnn.ViTConfig(image_size=30, patch_size=7)


def test_timm_backbone_builds_offline():
    tb = vnn.TimmBackbone("vit_tiny_patch16_224", image_size=32)
    tok = tb(torch.randn(2, 3, 32, 32))
    assert tok.shape == (2, 5, 192) and tb.pool(tok).shape == (2, 192)
    with pytest.raises(ValueError, match="unknown timm model"):
        vnn.TimmBackbone("no_such_model_xyz", image_size=32)
