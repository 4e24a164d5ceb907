"""Checkers for the notebooks' exercises: run the learner's function and ours on the same inputs and answer with a
hint, never the solution. ``check`` is the generic helper; each chapter has its own module (``clip``, ...)."""

from .clip import check_clip_loss, check_zero_shot_classifier
from .core import CheckResult, check
from .fusion import check_block_flops

__all__ = ["CheckResult", "check", "check_block_flops", "check_clip_loss", "check_zero_shot_classifier"]
