"""The toy "frozen LLM" (vlm_lab.models.lm + assets/lm-toy) and the captioning loss (vlm_lab.losses.captioning)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from vlm_lab.losses.captioning import build_lm_labels, lm_loss
from vlm_lab.models.lm import (TOY_LM_DIR, CausalLMConfig, build_causal_lm, freeze, load_lm, load_pretrained_lm,
                               load_toy_lm, save_lm)


# ------------------------------------------------------------------------------------------ captioning loss
def test_lm_loss_shifts_and_ignores_masked_positions() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.tensor([[3, 4, 5, 6, -100], [-100, -100, 7, 8, 9]])
    manual = []
    for b in range(2):
        for t in range(4):
            if labels[b, t + 1] != -100:
                manual.append(-logits[b, t].log_softmax(-1)[labels[b, t + 1]])
    assert torch.allclose(lm_loss(logits, labels), torch.stack(manual).mean())
    assert torch.allclose(lm_loss(logits, labels, reduction="sum"), torch.stack(manual).sum())
    aligned = lm_loss(logits, labels, shift=False)
    assert torch.allclose(aligned, F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1)))
    smooth = lm_loss(logits, labels, label_smoothing=0.1)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), label_smoothing=0.1)
    assert torch.allclose(smooth, ref) and not torch.allclose(smooth, lm_loss(logits, labels))


def test_lm_loss_no_supervised_token_is_zero_not_nan() -> None:
    logits = torch.randn(1, 3, 7, requires_grad=True)
    loss = lm_loss(logits, torch.full((1, 3), -100))
    assert loss.item() == 0.0
    loss.backward()


def test_lm_loss_token_mean_allows_exact_accumulation() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, 9, generator=g)
    labels = torch.randint(0, 9, (4, 6), generator=g)
    labels[:2, 2:] = -100  # micro-batch 1 has far fewer supervised tokens
    full = lm_loss(logits, labels)
    n = (labels[:, 1:] != -100).sum()
    summed = (lm_loss(logits[:2], labels[:2], reduction="sum") + lm_loss(logits[2:], labels[2:], reduction="sum")) / n
    naive = (lm_loss(logits[:2], labels[:2]) + lm_loss(logits[2:], labels[2:])) / 2
    assert torch.allclose(summed, full) and not torch.allclose(naive, full)


def test_build_lm_labels() -> None:
    ids = torch.tensor([[1, 10, 11, 12, 2], [1, 20, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = build_lm_labels(ids, mask, prompt_lengths=[2, 1], num_prefix=3)
    assert labels.shape == (2, 8)
    assert labels.tolist() == [[-100] * 3 + [-100, -100, 11, 12, 2], [-100] * 3 + [-100, 20, 2, -100, -100]]
    with pytest.raises(ValueError, match="prompt_lengths"):
        build_lm_labels(ids, mask, prompt_lengths=9)
    with pytest.raises(ValueError, match="labels"):
        lm_loss(torch.randn(2, 5, 7), ids)  # id 20 >= vocab 7
    with pytest.raises(ValueError, match="labels must have shape"):
        lm_loss(torch.randn(2, 4, 7), ids)


# ------------------------------------------------------------------------------------------------- configs
def test_configs_build_opt_and_llama() -> None:
    for arch in ("opt", "llama"):
        cfg = CausalLMConfig(arch=arch, vocab_size=51, width=40, layers=1, heads=4, mlp_dim=37, max_positions=16,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = build_causal_lm(cfg)
        assert type(model).__name__ == ("OPTForCausalLM" if arch == "opt" else "LlamaForCausalLM")
        assert model(input_ids=torch.tensor([[1, 5, 6]])).logits.shape == (1, 3, 51)
    assert CausalLMConfig.paper("opt-2.7b").width == 2560 and CausalLMConfig.paper("llama-7b").width == 4096
    with pytest.raises(ValueError, match="arch"):
        CausalLMConfig(arch="gpt5")
    with pytest.raises(ValueError, match="divisible"):
        CausalLMConfig.toy(width=97)
    with pytest.raises(ValueError, match="even head width"):
        CausalLMConfig.toy(arch="llama", width=36)
    with pytest.raises(ValueError, match="variant"):
        CausalLMConfig.paper("opt-175b")


def test_save_load_round_trip(tmp_path) -> None:
    cfg = CausalLMConfig.toy(vocab_size=64, width=32, layers=1, mlp_dim=33)
    torch.manual_seed(0)
    model = build_causal_lm(cfg).eval()
    save_lm(model, cfg, tmp_path / "lm", card={"note": "test"})
    again, tok, card = load_lm(tmp_path / "lm")
    ids = torch.tensor([[1, 5, 9, 2]])
    assert tok is None and card["note"] == "test" and card["config"]["width"] == 32
    assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(FileNotFoundError, match="make_lm"):
        load_lm(tmp_path / "missing")


# ----------------------------------------------------------------------------------------- the shipped asset
def test_toy_asset_is_small_documented_and_loads_offline() -> None:
    files = [p for p in TOY_LM_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 5 * 2**20
    card = json.loads((TOY_LM_DIR / "card.json").read_text())
    assert card["model"] == "causal_lm" and "make_lm.py" in card["command"]
    readme = (TOY_LM_DIR.parent / "README.md").read_text()
    assert "make_lm.py" in readme and "lm-toy" in readme
    model, tok = load_toy_lm()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2) and len(tok) <= 384
    assert CausalLMConfig.from_dict(card["config"]) == CausalLMConfig.toy()


def test_toy_lm_speaks_shapes() -> None:
    """The asset was pre-trained: a shapes caption is far more likely than the same words shuffled."""
    model, tok = load_toy_lm()

    def nll(text: str) -> float:
        enc = tok([text], return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits
        return lm_loss(logits, build_lm_labels(enc.input_ids, enc.attention_mask)).item()

    good = nll("a small red circle left of a large blue star")
    shuffled = nll("star left small a blue of circle a large red")
    assert good < 1.5 < shuffled and math.isfinite(good)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([[tok.bos_token_id]]), max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert any(s in text for s in ("circle", "square", "triangle", "star", "cross", "ring")), text


def test_pretrained_lm_is_opt_in(monkeypatch) -> None:
    with pytest.raises(OSError, match="allow_download"):
        load_pretrained_lm("facebook/opt-does-not-exist-here")
    with pytest.raises(ValueError, match="name_or_path"):
        load_pretrained_lm("")
    m = freeze(torch.nn.Linear(2, 2))
    assert not m.weight.requires_grad and not m.training
