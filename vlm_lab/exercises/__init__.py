"""Checkers for the notebooks' exercises: run the learner's function and ours on the same inputs and answer with a
hint, never the solution. ``check`` is the generic helper; each chapter has its own module (``clip``, ...)."""

from .clip import check_clip_loss, check_zero_shot_classifier
from .core import CheckResult, check

__all__ = ["CheckResult", "check", "check_clip_loss", "check_zero_shot_classifier"]
