"""Loading weights from Hugging Face transformers, timm and open_clip (imports nothing else from vlm_lab)."""

from .weights import WeightLoadingError, fuse_qkv, load_converted, rename_keys, split_qkv

__all__ = ["WeightLoadingError", "fuse_qkv", "load_converted", "rename_keys", "split_qkv"]
