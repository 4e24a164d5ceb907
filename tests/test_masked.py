"""MLM masking (BERT recipe) and the MLM loss: statistics, never-masked tokens, whole-word masking."""

import pytest
import torch
import torch.nn.functional as F

from vlm_lab.losses import IGNORE_INDEX, mask_tokens, mlm_loss, wordpiece_word_starts

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = (PAD, UNK, CLS, SEP, MASK)
V = 50


def _batch(b: int = 400, n: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (b, n), generator=g)
    lengths = torch.randint(5, n + 1, (b,), generator=g)
    am = (torch.arange(n)[None] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(b), lengths - 1] = SEP
    ids[am == 0] = PAD
    return ids, am


def test_statistics_15_percent_and_80_10_10():
    ids, am = _batch()
    masked, labels = mask_tokens(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIALS,
                                 attention_mask=am, generator=torch.Generator().manual_seed(1))
    maskable = (am == 1) & (ids != CLS) & (ids != SEP)
    chosen = labels != IGNORE_INDEX
    assert abs(chosen.sum().item() / maskable.sum().item() - 0.15) < 0.01
    n = chosen.sum().item()
    as_mask = (masked[chosen] == MASK).sum().item() / n
    unchanged = (masked[chosen] == ids[chosen]).sum().item() / n
    random = 1 - as_mask - unchanged
    assert abs(as_mask - 0.8) < 0.02
    assert abs(unchanged - 0.1) < 0.02 + 1 / V  # a random draw can hit the same id
    assert abs(random - 0.1) < 0.02
    # labels hold the original ids exactly where chosen; unchosen tokens are untouched
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_specials_and_padding_never_chosen_and_random_ids_never_special():
    ids, am = _batch()
    am_special = ids.clone()
    am_special[:, 3] = UNK  # an [UNK] inside the text: also never masked
    masked, labels = mask_tokens(am_special, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIALS,
                                 attention_mask=am, mlm_probability=0.9, generator=torch.Generator().manual_seed(2))
    chosen = labels != IGNORE_INDEX
    assert not chosen[torch.isin(am_special, torch.tensor(SPECIALS))].any()
    assert not chosen[am == 0].any()
    replaced = chosen & (masked != MASK) & (masked != am_special)
    assert replaced.any()
    assert not torch.isin(masked[replaced], torch.tensor(SPECIALS)).any()


def test_padding_respected_even_when_pad_id_is_not_special():
    ids = torch.full((64, 10), 7)
    am = torch.ones_like(ids)
    am[:, 5:] = 0
    _, labels = mask_tokens(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=(), attention_mask=am,
                            mlm_probability=1.0)
    assert (labels[:, :5] == 7).all() and (labels[:, 5:] == IGNORE_INDEX).all()


def test_whole_word_masking_masks_all_pieces_together():
    cont = torch.zeros(V, dtype=torch.bool)
    cont[30:] = True  # ids >= 30 are '##' continuations
    g = torch.Generator().manual_seed(3)
    words = torch.randint(5, 30, (300, 12), generator=g)
    pieces = torch.randint(30, V, (300, 12), generator=g)
    ids = torch.stack([words, pieces, pieces], -1).reshape(300, 36)  # every word = start + 2 continuations
    ids = torch.cat([torch.full((300, 1), CLS), ids, torch.full((300, 1), SEP)], 1)
    starts = wordpiece_word_starts(ids, cont)
    _, labels = mask_tokens(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIALS,
                            word_starts=starts, generator=torch.Generator().manual_seed(4))
    chosen = (labels != IGNORE_INDEX)[:, 1:-1].reshape(300, 12, 3)
    assert torch.equal(chosen[..., 0], chosen[..., 1]) and torch.equal(chosen[..., 0], chosen[..., 2])
    assert abs(chosen[..., 0].float().mean().item() - 0.15) < 0.02
    # per-token masking does NOT keep the pieces together
    _, lab2 = mask_tokens(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIALS,
                          generator=torch.Generator().manual_seed(4))
    ch2 = (lab2 != IGNORE_INDEX)[:, 1:-1].reshape(300, 12, 3)
    assert not torch.equal(ch2[..., 0], ch2[..., 1])


def test_mlm_loss_averages_over_chosen_positions_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, V, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 1], labels[1, 3] = 7, 9
    loss = mlm_loss(logits, labels)
    ref = (F.cross_entropy(logits[0, 1], torch.tensor(7)) + F.cross_entropy(logits[1, 3], torch.tensor(9))) / 2
    assert torch.allclose(loss, ref)
    loss.backward()
    assert logits.grad[0, 0].abs().sum() == 0  # unlabelled positions get no gradient
    # distillation: alpha = 0 is plain CE, alpha = 1 is the soft CE
    soft = torch.softmax(torch.randn(2, 5, V), -1)
    assert torch.allclose(mlm_loss(logits, labels, soft_targets=soft, alpha=0.0), ref)
    soft_ce = -(soft[0, 1] * logits[0, 1].log_softmax(-1)).sum() / 2 - (soft[1, 3] * logits[1, 3].log_softmax(-1)).sum() / 2
    assert torch.allclose(mlm_loss(logits, labels, soft_targets=soft, alpha=1.0), soft_ce)
    assert mlm_loss(logits, torch.full((2, 5), IGNORE_INDEX)).item() == 0.0


def test_bad_input_raises():
    ids, am = _batch(4, 8)
    with pytest.raises(ValueError, match="mlm_probability"):
        mask_tokens(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIALS, mlm_probability=1.5)
    with pytest.raises(ValueError, match="attention_mask"):
        mask_tokens(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIALS, attention_mask=am[:, :3])
    with pytest.raises(ValueError, match="input_ids"):
        mask_tokens(ids.float(), mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIALS)
