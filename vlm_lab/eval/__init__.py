"""Evaluation: zero-shot classification with prompt ensembling, retrieval Recall@K, captioning (BLEU / CIDEr-D),
VQA accuracy per question type, Quilt-VQA scoring (closed accuracy, open recall, a judge interface), zero-shot
segmentation."""

from .captioning import bleu, caption_scores, cider_d
from .retrieval import retrieval_metrics
from .segmentation import dice_scores, pixel_accuracy, segmentation_metrics, zero_shot_segmentation
from .vqa import (InstructionItem, JudgeVerdict, closed_correct, instruction_test_split, judge_answers,
                  normalize_answer, open_recall, rule_based_judge, score_vqa, vqa_accuracy, vqa_predictions)
from .zero_shot import (BARE_TEMPLATES, SIMPLE_TEMPLATES, encode_images, encode_texts, topk_accuracy,
                        zero_shot_accuracy, zero_shot_classifier, zero_shot_logits)

__all__ = ["BARE_TEMPLATES", "SIMPLE_TEMPLATES", "encode_images", "encode_texts", "retrieval_metrics",
           "topk_accuracy", "zero_shot_accuracy", "zero_shot_classifier", "zero_shot_logits"]
__all__ += ["bleu", "caption_scores", "cider_d", "dice_scores", "pixel_accuracy", "segmentation_metrics",
            "vqa_accuracy", "vqa_predictions", "zero_shot_segmentation"]
__all__ += ["InstructionItem", "JudgeVerdict", "closed_correct", "instruction_test_split", "judge_answers",
            "normalize_answer", "open_recall", "rule_based_judge", "score_vqa"]
