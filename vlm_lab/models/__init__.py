"""One file per paper. Models use ``vlm_lab.nn``, ``vlm_lab.losses`` and ``vlm_lab.interop`` only."""

from .clip import CLIP, CLIPConfig, CLIPOutput
from .registry import MODELS, build_model, model_from_dict, model_name, model_record

__all__ = ["CLIP", "CLIPConfig", "CLIPOutput", "MODELS", "build_model", "model_from_dict", "model_name",
           "model_record"]
