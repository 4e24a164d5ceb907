"""Training objectives as pure functions, one file per objective (imports nothing else from vlm_lab)."""

from .contrastive import clip_loss, clip_logits, gather_with_grad, siglip_loss

__all__ = ["clip_logits", "clip_loss", "gather_with_grad", "siglip_loss"]
