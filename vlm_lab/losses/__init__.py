"""Training objectives as pure functions, one file per objective (imports nothing else from vlm_lab)."""

from .contrastive import clip_loss, clip_logits, gather_with_grad, siglip_loss
from .captioning import build_lm_labels, lm_loss
from .momentum import (FeatureQueue, alpha_at, distillation_targets, momentum_itc_loss, momentum_update,
                       soft_cross_entropy)
from .alignment import cosine_cost, ipot, transport_distance, wpa_loss
from .masked import IGNORE_INDEX, mask_tokens, mlm_loss, wordpiece_word_starts
from .matching import hard_negatives, itm_accuracy, itm_loss, random_negatives

__all__ = ["clip_logits", "clip_loss", "gather_with_grad", "siglip_loss"]
__all__ += ["IGNORE_INDEX", "cosine_cost", "hard_negatives", "ipot", "itm_accuracy", "itm_loss", "mask_tokens",
            "mlm_loss", "random_negatives", "transport_distance", "wordpiece_word_starts", "wpa_loss"]
__all__ += ["FeatureQueue", "alpha_at", "build_lm_labels", "distillation_targets", "lm_loss", "momentum_itc_loss",
            "momentum_update", "soft_cross_entropy"]
