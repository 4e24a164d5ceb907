"""Decoding: beam search with one beam equals greedy, EOS / padding / min length, nucleus keeps the nucleus."""

from __future__ import annotations

import pytest
import torch

from vlm_lab.models.decoding import beam_search, generate, greedy, nucleus

V, EOS, PAD = 11, 2, 0


def _toy_lm(seed: int = 0):
    """A fixed random 'language model': logits depend on the last token and the row's 'image'."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V, V, generator=g) * 3
    image = torch.randn(4, V, generator=g)

    def next_logits(ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return table[ids[:, -1]] + image[rows] + 0.1 * ids.shape[1]

    return next_logits


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=PAD)


@pytest.mark.parametrize("seed", range(6))
def test_beam_of_one_equals_greedy(seed):
    fn = _toy_lm(seed)
    start = torch.tensor([[1], [1], [5], [7]])
    g = greedy(fn, start, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
    b = beam_search(fn, start, num_beams=1, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
    w = max(g.shape[1], b.shape[1])
    assert torch.equal(_pad_to(g, w), _pad_to(b, w))


def test_greedy_stops_at_eos_and_pads():
    def fn(ids, rows):
        logits = torch.zeros(ids.shape[0], V)
        step = ids.shape[1]
        logits[:, 5] = 1.0
        logits[rows == 0, EOS] = 2.0 if step >= 2 else -1.0  # row 0 ends after 2 new tokens
        return logits

    out = greedy(fn, torch.tensor([[1], [1]]), max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD)
    assert out.tolist() == [[1, 5, EOS, PAD, PAD], [1, 5, 5, 5, 5]]
    out = greedy(fn, torch.tensor([[1], [1]]), max_new_tokens=4, min_new_tokens=3, eos_token_id=EOS)
    assert out[0].tolist()[:4] == [1, 5, 5, 5]


def test_beam_search_finds_better_sequence_than_greedy():
    # greedy takes token 3 (p=0.5) then a flat distribution; beam finds 4 (p=0.4) then EOS (p~1)
    def fn(ids, rows):
        logits = torch.full((ids.shape[0], V), -20.0)
        last = ids[:, -1]
        logits[last == 1, 3] = 0.0
        logits[last == 1, 4] = -0.22
        logits[last == 3] = 0.0
        logits[last == 4, EOS] = 5.0
        logits[last == EOS, EOS] = 0.0
        return logits

    start = torch.tensor([[1]])
    g = greedy(fn, start, max_new_tokens=3, eos_token_id=EOS)
    b = beam_search(fn, start, num_beams=2, max_new_tokens=3, eos_token_id=EOS)
    assert g[0, 1].item() == 3
    assert b[0].tolist()[:3] == [1, 4, EOS]


def test_nucleus_samples_only_inside_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * (V - 4))
    logits = probs.clamp(min=1e-12).log()

    def fn(ids, rows):
        return logits.expand(ids.shape[0], V)

    g = torch.Generator().manual_seed(0)
    out = nucleus(fn, torch.ones(2000, 1, dtype=torch.long), top_p=0.75, max_new_tokens=1, generator=g)
    tokens = out[:, 1]
    assert set(tokens.tolist()) <= {0, 1}  # 0.5 + 0.3 >= 0.75: the nucleus is {0, 1}
    assert 0.55 < (tokens == 0).float().mean() < 0.70  # renormalised: 0.5 / 0.8 = 0.625
    out = nucleus(fn, torch.ones(50, 1, dtype=torch.long), top_p=1e-6, max_new_tokens=1, generator=g)
    assert out[:, 1].eq(0).all()  # the top token always survives


def test_repetition_penalty_and_errors():
    def fn(ids, rows):
        logits = torch.zeros(ids.shape[0], V)
        logits[:, 5] = 1.0
        logits[:, 6] = 0.95
        return logits

    out = greedy(fn, torch.tensor([[1]]), max_new_tokens=3, repetition_penalty=1.2)
    assert out[0].tolist() == [1, 5, 6, 5]  # both seen: 1 / 1.2 > 0.95 / 1.2
    with pytest.raises(ValueError, match="method"):
        generate(fn, torch.tensor([[1]]), method="topk")
    with pytest.raises(ValueError, match="top_p"):
        nucleus(fn, torch.tensor([[1]]), top_p=0.0)
    with pytest.raises(ValueError, match="start_ids"):
        greedy(fn, torch.tensor([1]))
