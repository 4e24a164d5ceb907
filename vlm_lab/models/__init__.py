"""One file per paper. Models use ``vlm_lab.nn``, ``vlm_lab.losses`` and ``vlm_lab.interop`` only."""

from .albef import ALBEF, ALBEFConfig
from .blip import BLIP, BLIPConfig
from .blip2 import BLIP2, BLIP2Config
from .clip import CLIP, CLIPConfig, CLIPOutput
from .coca import CoCa, CoCaConfig
from .llava import LLaVA, LLaVAConfig
from .vilt import ViLT, ViLTConfig
from .vlmo import VLMo, VLMoConfig
from .registry import MODELS, build_model, model_from_dict, model_name, model_record

__all__ = ["ALBEF", "ALBEFConfig", "BLIP", "BLIP2", "BLIP2Config", "BLIPConfig", "CoCa", "CoCaConfig", "ViLT",
           "ViLTConfig", "LLaVA", "LLaVAConfig", "VLMo", "VLMoConfig", "CLIP", "CLIPConfig", "CLIPOutput", "MODELS", "build_model", "model_from_dict", "model_name",
           "model_record"]
