"""Gradio demos of the lab's models: one app with a tab per capability (`vlm-lab demo`), embeddable per tab
in the notebooks with ``show(tab, model=...)``. See ``vlm_lab.demos.app`` (the app and its safe launch settings),
``vlm_lab.demos.images`` (the one gate every uploaded image goes through) and ``vlm_lab.demos.widgets`` (ipywidgets
versions of the zero-shot and Q-Former tabs, for hubs where an iframe cannot reach a local server)."""

from .app import (SAFE_LAUNCH, TABS, DemoError, DemoModels, build_app, caption, close_all, launch, qformer_trace,
                  retrieve_images, retrieve_texts, show, vqa_answer, vqa_chat, zero_shot)
from .images import LIMITS, ImageError, ImageLimits, check_image, load_image, to_model_input

__all__ = ["TABS", "SAFE_LAUNCH", "DemoError", "DemoModels", "build_app", "launch", "show", "close_all", "zero_shot",
           "retrieve_images", "retrieve_texts", "caption", "qformer_trace", "vqa_answer", "vqa_chat", "LIMITS", "ImageError",
           "ImageLimits", "check_image", "load_image", "to_model_input"]
