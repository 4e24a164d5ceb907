"""Chapter 01 exercise checker: FLOPs of a transformer block, measured vs the learner's count."""
from __future__ import annotations

from vlm_lab.exercises import check_block_flops
from vlm_lab.exercises.fusion import block_flops_mistakes


def right(n: int, d: int, m: int) -> int:
    return 8 * n * d * d + 4 * n * n * d + 4 * n * d * m


def test_the_right_count_passes():
    result = check_block_flops(right)
    assert result.passed and bool(result), result


def test_each_typical_mistake_fails_with_its_hint():
    for hint in block_flops_mistakes(3, 8, 16):
        def wrong(n, d, m, hint=hint):
            return block_flops_mistakes(n, d, m)[hint]
        result = check_block_flops(wrong)
        assert not result.passed and hint in result.message, (hint, result.message)


def test_other_wrong_answers_fail_without_a_made_up_hint():
    for fn in (lambda n, d, m: 0, lambda n, d, m: right(n, d, m) + 1):
        result = check_block_flops(fn)
        assert not result.passed and "expected" in result.message and "Hint" not in result.message
    assert "None" in check_block_flops(lambda n, d, m: None).message

    def todo(n, d, m):
        raise NotImplementedError

    assert "not implemented" in check_block_flops(todo).message
