"""Evaluation: zero-shot classification with prompt ensembling, retrieval Recall@K."""

from .retrieval import retrieval_metrics
from .zero_shot import (BARE_TEMPLATES, SIMPLE_TEMPLATES, encode_images, encode_texts, topk_accuracy,
                        zero_shot_accuracy, zero_shot_classifier, zero_shot_logits)

__all__ = ["BARE_TEMPLATES", "SIMPLE_TEMPLATES", "encode_images", "encode_texts", "retrieval_metrics",
           "topk_accuracy", "zero_shot_accuracy", "zero_shot_classifier", "zero_shot_logits"]
