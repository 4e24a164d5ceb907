"""Chapter 03 / 05 exercise checkers: the right answer passes, typical mistakes fail with their own hint."""

from __future__ import annotations

import torch

from vlm_lab.exercises.vilt import check_mask_tokens
from vlm_lab.exercises.vlmo import check_route
from vlm_lab.losses import mask_tokens
from vlm_lab.nn import MoMEBlock

V, MASK, SPECIALS = 53, 4, (0, 1, 2, 3, 4)  # [PAD] [UNK] [CLS] [SEP] [MASK], as the shapes tokenizer


def reference(ids, am):
    return mask_tokens(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIALS, attention_mask=am)


def run(fn):
    return check_mask_tokens(fn, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIALS)


def test_mask_checker_passes_the_reference_and_a_hand_written_rule():
    for seed in range(3):  # the checker's tolerances are > 7 standard deviations at its sample size (~3,100 chosen)
        torch.manual_seed(seed)
        assert run(reference).passed

    def by_hand(ids, am):
        maskable = am.bool() & ~torch.isin(ids, torch.tensor(SPECIALS))
        chosen = (torch.rand(ids.shape) < 0.15) & maskable
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        u = torch.rand(ids.shape)
        out = ids.clone()
        out[chosen & (u < 0.8)] = MASK
        rnd = chosen & (u >= 0.8) & (u < 0.9)
        out[rnd] = torch.randint(5, V, (int(rnd.sum()),))
        return out, labels

    assert run(by_hand).passed


def test_mask_checker_names_the_typical_mistakes():
    def with_specials(ids, am):  # draws over [CLS] / [SEP] too
        return mask_tokens(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=(0,), attention_mask=am)

    def masked_labels(ids, am):  # labels hold the masked ids
        m, lab = reference(ids, am)
        return m, torch.where(lab != -100, m, lab)

    def all_mask(ids, am):  # 100 % [MASK], no random / unchanged
        m, lab = reference(ids, am)
        return torch.where(lab != -100, torch.full_like(m, MASK), m), lab

    def fixed(ids, am):  # the same positions every call
        g = torch.Generator().manual_seed(0)
        return mask_tokens(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIALS, attention_mask=am,
                           generator=g)

    def thirty(ids, am):
        return mask_tokens(ids, mask_token_id=MASK, vocab_size=V, special_token_ids=SPECIALS, attention_mask=am,
                           mlm_probability=0.3)

    def not_implemented(ids, am):
        raise NotImplementedError

    for fn, words in [(with_specials, "special tokens"), (masked_labels, "ORIGINAL"), (all_mask, "random token"),
                      (fixed, "same positions"), (thirty, "expected 15 %"), (not_implemented, "not implemented")]:
        r = run(fn)
        assert not r.passed and words in r.message, (fn.__name__, r.message)


def test_route_checker():
    def right(block, vl_start, modality):
        return MoMEBlock(8, 2, 16, with_vl_expert=block >= vl_start).route(modality)

    assert check_route(right, depth=4, vl_start=2).passed
    assert not check_route(lambda b, s, m: "vl" if m == "vl" else m, depth=4, vl_start=2).passed
    wrong = check_route(lambda b, s, m: "vl" if b >= s else ("split" if m == "vl" else m), depth=4, vl_start=2)
    assert not wrong.passed and "never uses the vision-language expert" in wrong.message
    assert not check_route(lambda b, s, m: "vl" if (m == "vl" and b > s) else ("split" if m == "vl" else m)).passed
