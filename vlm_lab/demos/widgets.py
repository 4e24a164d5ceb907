"""ipywidgets versions of the zero-shot and Q-Former tabs, for notebooks where an iframe cannot reach a local server
(Binder / JupyterHub without jupyter-server-proxy: the browser cannot open 127.0.0.1 of the kernel's machine).

    from vlm_lab.demos.widgets import zero_shot_widget, qformer_widget
    zero_shot_widget(model, tokenizer)        # or no arguments: the shipped toy CLIP of the shapes world
    qformer_widget()                          # the BLIP-2 toy's shapes table and query attention maps

They call the same functions as the Gradio tabs (``vlm_lab.demos.app.zero_shot`` / ``qformer_trace``), and an upload
goes through the same gate (``vlm_lab.demos.images.load_image``: size cap, header check before decoding, mode);
refusals are shown in the widget as a message. Each function returns the widget box (display it, or let the cell
show it); its parts are reachable as ``box.parts`` (a dict) for tests and for learners who want to script them.
"""

from __future__ import annotations

import html
import io
from typing import Any

from torch import nn

from .app import WORLDS, DemoError, DemoModels, _sample_image, _zero_shot_defaults, qformer_trace, zero_shot
from .images import LIMITS, ImageError

__all__ = ["zero_shot_widget", "qformer_widget"]


def _upload_bytes(upload: Any) -> bytes | None:
    value = upload.value
    if not value:
        return None
    item = value[0] if isinstance(value, (list, tuple)) else next(iter(value.values()))  # ipywidgets 8 / 7
    content = item["content"] if isinstance(item, dict) else item.content
    return bytes(content)


def _png(array: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _bars(probs: dict[str, float], top: int = 8) -> str:
    rows = sorted(probs.items(), key=lambda kv: -kv[1])[:top]
    cells = "".join(f"<tr><td style='padding-right:8px'>{html.escape(name)}</td><td><div style='background:#e8590c;"
                    f"height:12px;width:{max(1, round(200 * p))}px'></div></td><td>{100 * p:.1f}%</td></tr>"
                    for name, p in rows)
    return f"<table>{cells}</table>"


def zero_shot_widget(model: nn.Module | None = None, tokenizer: Any = None) -> Any:
    """Upload an image (or take a sample), edit class names and templates, classify; ``model`` replaces the toy."""
    import ipywidgets as w

    models = DemoModels()
    world = WORLDS[0]
    if model is not None:
        if hasattr(model, "generate"):  # a CoCa: the pathology world
            models.coca, models.coca_tokenizer, world = model.eval(), tokenizer, WORLDS[1]
        else:
            models.clip, models.clip_tokenizer = model.eval(), tokenizer
    classes, templates = _zero_shot_defaults(world)
    upload = w.FileUpload(accept="image/png,image/jpeg,image/webp,image/bmp,image/gif", multiple=False,
                          description="image")
    sample = w.Button(description="sample")
    preview = w.Image(format="png", width=128)
    class_box = w.Textarea(classes, description="classes", rows=6)
    template_box = w.Textarea(templates, description="templates", rows=4)
    ensemble = w.Checkbox(True, description="ensemble the templates")
    run = w.Button(description="Classify", button_style="primary")
    result = w.HTML()
    state: dict[str, Any] = {"image": None}

    def take_upload(_: Any = None) -> None:
        data = _upload_bytes(upload)
        if data is None:
            return
        if len(data) > LIMITS.max_bytes:
            result.value = f"<b>refused:</b> the file is over {LIMITS.max_bytes // 2**20} MiB"
            return
        state["image"] = data
        preview.value = data if data[:8] == b"\x89PNG\r\n\x1a\n" else b""

    def take_sample(_: Any = None) -> None:
        state["image"] = _sample_image("pathology" if world == WORLDS[1] else "shapes")
        preview.value = _png(state["image"])

    def classify(_: Any = None) -> None:
        try:
            probs, note = zero_shot(models, state["image"], world, class_box.value, template_box.value, ensemble.value)
        except (ImageError, DemoError, ValueError, TypeError) as err:
            result.value = f"<b>refused:</b> {html.escape(str(err))}"
            return
        result.value = _bars(probs) + f"<p>{html.escape(note)}</p>"

    upload.observe(take_upload, names="value")
    sample.on_click(take_sample)
    run.on_click(classify)
    box = w.HBox([w.VBox([upload, sample, preview]), w.VBox([class_box, template_box, ensemble, run]), result])
    box.parts = {"upload": upload, "sample": sample, "classes": class_box, "templates": template_box,
                 "ensemble": ensemble, "run": run, "result": result, "state": state}
    return box


def qformer_widget(model: nn.Module | None = None) -> Any:
    """The Q-Former dimension trace and per-query cross-attention maps of a BLIP-2 (default: the toy)."""
    import ipywidgets as w

    models = DemoModels(blip2=model.eval() if model is not None else None)
    upload = w.FileUpload(accept="image/png,image/jpeg,image/webp,image/bmp,image/gif", multiple=False,
                          description="image")
    sample = w.Button(description="sample")
    layers = w.Dropdown(options=["qformer.layers.0.cross_attn", "qformer.layers.2.cross_attn"],
                        description="layer")
    run = w.Button(description="Trace", button_style="primary")
    maps = w.Image(format="png")
    table = w.HTML()
    state: dict[str, Any] = {"image": None}

    def take_upload(_: Any = None) -> None:
        state["image"] = _upload_bytes(upload)

    def take_sample(_: Any = None) -> None:
        state["image"] = _sample_image("shapes")

    def trace(_: Any = None) -> None:
        try:
            text, grid = qformer_trace(models, state["image"], layers.value)
        except (ImageError, DemoError, ValueError, TypeError) as err:
            table.value = f"<b>refused:</b> {html.escape(str(err))}"
            return
        table.value = "<pre>" + html.escape(text.strip("`\n")) + "</pre>"
        maps.value = _png(grid)

    upload.observe(take_upload, names="value")
    sample.on_click(take_sample)
    run.on_click(trace)
    box = w.VBox([w.HBox([upload, sample, layers, run]), maps, table])
    box.parts = {"upload": upload, "sample": sample, "layer": layers, "run": run, "maps": maps, "table": table,
                 "state": state}
    return box
