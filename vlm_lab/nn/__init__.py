"""Building blocks every lab model is assembled from (imports nothing else from vlm_lab)."""

from .adapters import Adapter, LinearProjector, MLPProjector
from .attention import Attention, build_attention_mask
from .blocks import MLP, Encoder, LayerScale, TransformerBlock, get_activation, quick_gelu
from .experts import MoMEBlock
from .embed import ModalityTypeEmbedding, PatchEmbed, TokenEmbedding, check_pixel_values, check_token_ids
from .pooling import AttentionPooler, cls_pool, eot_pool, eot_positions, mean_pool
from .vision import TimmBackbone, ViT, ViTConfig

__all__ = [
    "Adapter", "Attention", "AttentionPooler", "Encoder", "LayerScale", "LinearProjector", "MLP", "MLPProjector",
    "ModalityTypeEmbedding", "PatchEmbed", "TimmBackbone", "TokenEmbedding", "TransformerBlock", "ViT", "ViTConfig",
    "build_attention_mask", "check_pixel_values", "check_token_ids", "cls_pool", "eot_pool", "eot_positions",
    "get_activation", "mean_pool", "quick_gelu",
]
__all__ += ["MoMEBlock"]
