"""The VLM Lab demo app: one Gradio Blocks app with a tab per capability, safe by default.

    from vlm_lab.demos import build_app, launch, show
    app, url = launch(prevent_thread_lock=True)        # every tab, http://127.0.0.1:<free port>/
    show("zero_shot", model=my_clip, tokenizer=tok)     # one tab inline in a notebook (closes the previous one)
    vlm-lab demo [--tab zero_shot --tab captioning] [--port 7860]

Tabs (``TABS``), each on the toy checkpoints shipped in ``assets/`` so the app works offline at once, or on a
model the learner passes in:

- ``zero_shot``  CLIP toy (shapes world, ``assets/clip-toy``) or CoCa toy (pathology tiles, ``assets/coca-toy``):
  editable class names and prompt templates, prompt ensembling on / off (``vlm_lab.eval.zero_shot``);
- ``retrieval``  a gallery of shapes-world scenes encoded by the CLIP toy: text -> images and image -> captions;
- ``captioning`` CoCa toy on pathology tiles with the decoding controls of ``vlm_lab.models.decoding``
  (greedy / beam / nucleus, beams, top-p, temperature, length);
- ``qformer``    a BLIP-2 toy (stage 2, built from ``BLIP2Config.toy`` with a fixed seed: the *dimensions* are the
  lesson; pass a trained one with ``show("qformer", model=...)``): the shapes table from image to LLM input
  (``vlm_lab.inspect.trace``) and each learned query's cross-attention map over the image patches;
- ``vqa``        pathology VQA chat with the toy Quilt-LLaVA (``assets/llava-toy``, ``vlm_lab.train.llava.chat``).

Secure defaults (``SAFE_LAUNCH``; ``ecosystem-facts.md`` section 3): bound to 127.0.0.1, ``share=False`` unless
asked explicitly, analytics / monitoring / MCP / PWA off, ``strict_cors``, no extra ``allowed_paths``, uploads capped
at ``LIMITS.max_bytes``; image inputs only (``gr.Image``, upload and clipboard: no webcam, no URL or file-path
text boxes), every upload decoded and checked by ``vlm_lab.demos.images.load_image`` (format, size, pixel count
before decoding, mode); text inputs have length caps and are tokenised without silent truncation; a bounded
queue (``QUEUE_SIZE`` waiting events, one at a time per event: right for a CPU model).

Shape letters: C classes, d embedding width, N gallery scenes, M gallery captions, s the model's image side,
q queries, p image tokens (1 + g*g), g patches per side, h heads.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no usage pings

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from .images import LIMITS, ImageError, check_image, load_image, to_model_input  # noqa: E402

__all__ = ["TABS", "SAFE_LAUNCH", "QUEUE_SIZE", "DemoModels", "build_app", "launch", "show", "close_all",
           "free_port", "assets_dir", "zero_shot", "retrieve_images", "retrieve_texts", "caption", "qformer_trace",
           "vqa_answer", "vqa_chat", "DemoError"]

TABS: tuple[str, ...] = ("zero_shot", "retrieval", "captioning", "qformer", "vqa")
TAB_TITLES = {"zero_shot": "Zero-shot", "retrieval": "Retrieval", "captioning": "Captioning",
              "qformer": "Q-Former trace", "vqa": "Pathology VQA"}
QUEUE_SIZE = 16  # events waiting in the queue at most; more are refused ("queue is full")
MAX_CLASSES = 64  # class names per zero-shot query
MAX_TEMPLATES = 32  # prompt templates per zero-shot query
MAX_TEXT_CHARS = 200  # one class name, template, query or question
GALLERY_SIZE = 48  # shapes-world scenes in the retrieval gallery
WORLDS = ("shapes (CLIP toy)", "pathology (CoCa toy)")

#: ``Blocks.launch`` keyword arguments every launch uses (``launch(share=True)`` is the one explicit opt-out).
SAFE_LAUNCH: dict[str, Any] = dict(
    server_name="127.0.0.1",
    share=False,
    max_file_size=LIMITS.max_bytes,
    allowed_paths=[],
    enable_monitoring=False,
    strict_cors=True,
    show_error=False,  # raw exception text stays in the server log; our own checks raise gr.Error (always shown)
    ssr_mode=False,
    mcp_server=False,
    pwa=False,
)


class DemoError(ValueError):
    """A request the demo refuses (bad text, unknown option, a tab without its model)."""


def assets_dir() -> Path:
    """``$VLM_LAB_ASSETS``, else the checkout's ``assets/`` (the same rule as ``vlm-lab doctor``)."""
    override = os.environ.get("VLM_LAB_ASSETS")
    return Path(override).expanduser() if override else Path(__file__).resolve().parents[2] / "assets"


# ------------------------------------------------------------------------------------------------------- models


def _load_toy(folder: str, script: str, what: str) -> nn.Module:
    """The shipped toy checkpoint ``assets/<folder>/model.safetensors``, in eval mode."""
    from vlm_lab.train.checkpoint import load_model

    path = assets_dir() / folder / "model.safetensors"
    if not path.is_file():
        raise DemoError(f"the {what} toy checkpoint {path} is missing; regenerate it with "
                        f"`.venv/bin/python assets/{script} assets/{folder}` or pass model=... to show()")
    return load_model(path).eval()


@dataclass
class DemoModels:
    """The models behind the tabs, loaded lazily on first use (or given by the caller)."""

    clip: nn.Module | None = None  # shapes-world CLIP (encode_image / encode_text)
    clip_tokenizer: Any = None
    coca: nn.Module | None = None  # pathology CoCa (zero-shot + captioning)
    coca_tokenizer: Any = None
    blip2: nn.Module | None = None  # BLIP-2 for the Q-Former trace
    llava: nn.Module | None = None  # LLaVA for the VQA chat
    llava_tokenizer: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _gallery: dict | None = field(default=None, repr=False)

    def get_clip(self) -> tuple[nn.Module, Any]:
        with self._lock:
            if self.clip is None:
                self.clip = _load_toy("clip-toy", "make_clip_toy.py", "CLIP")
            if self.clip_tokenizer is None:
                from vlm_lab.data.tokenizers import shapes_tokenizer

                self.clip_tokenizer = shapes_tokenizer(model_max_length=getattr(self.clip.config, "context_length", 32))
            return self.clip, self.clip_tokenizer

    def get_coca(self) -> tuple[nn.Module, Any]:
        with self._lock:
            if self.coca is None:
                self.coca = _load_toy("coca-toy", "make_coca_toy.py", "CoCa")
            if self.coca_tokenizer is None:
                from vlm_lab.train.conch import pathology_tokenizer

                self.coca_tokenizer = pathology_tokenizer(model_max_length=self.coca.config.context_length)
            return self.coca, self.coca_tokenizer

    def get_blip2(self) -> nn.Module:
        with self._lock:
            if self.blip2 is None:
                from vlm_lab.models.registry import build_model

                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    self.blip2 = build_model("blip2", "toy", stage=2).eval()
            return self.blip2

    def get_llava(self) -> tuple[nn.Module, Any, Callable]:
        try:
            from vlm_lab.train.llava import chat, load_toy
        except ImportError:
            raise DemoError("the VQA tab needs vlm_lab.train.llava (chapter 09), which this checkout lacks") from None
        with self._lock:
            if self.llava is None:
                try:
                    self.llava, self.llava_tokenizer = load_toy("stage2", assets_dir() / "llava-toy")
                except FileNotFoundError as err:
                    raise DemoError(f"no LLaVA toy checkpoint: {err}; or pass one with "
                                    "show('vqa', model=..., tokenizer=...)") from None
            if self.llava_tokenizer is None:
                raise DemoError("the VQA tab needs the LLaVA model's tokenizer: show('vqa', model=..., tokenizer=...)")
            return self.llava, self.llava_tokenizer, chat


def _image_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "image_size", None)
    if not isinstance(size, int):
        raise DemoError(f"{type(model).__name__} has no config.image_size; the demos need a lab model")
    return size


def _as_image(image: Any) -> Any:
    """A Gradio upload (a file path in Gradio's cache) or an in-memory image -> checked RGB PIL image."""
    if image is None:
        raise ImageError("image: no image given; upload a PNG, JPEG, WebP, BMP or GIF picture")
    if isinstance(image, (str, os.PathLike, bytes)):
        return load_image(image)
    if isinstance(image, dict) and "path" in image:  # Gradio FileData passed through
        return load_image(image["path"])
    return check_image(image)


def _split_lines(text: Any, name: str, limit: int, sep: str = "\n,") -> list[str]:
    if not isinstance(text, str):
        raise DemoError(f"{name}: expected text, got {type(text).__name__}")
    items = [text]
    for s in sep:
        items = [part for item in items for part in item.split(s)]
    items = [i.strip() for i in items if i.strip()]
    if not items:
        raise DemoError(f"{name}: empty; give at least one (one per line)")
    if len(items) > limit:
        raise DemoError(f"{name}: {len(items)} given, at most {limit} are accepted")
    long = [i for i in items if len(i) > MAX_TEXT_CHARS]
    if long:
        raise DemoError(f"{name}: {long[0][:40]!r}... is longer than {MAX_TEXT_CHARS} characters")
    if len(set(items)) != len(items):
        raise DemoError(f"{name}: contains duplicates")
    return items


def _check_query(text: Any, name: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise DemoError(f"{name}: empty; type some text")
    if len(text) > MAX_TEXT_CHARS:
        raise DemoError(f"{name}: {len(text)} characters, at most {MAX_TEXT_CHARS} are accepted")
    return text.strip()


def _check_fits(tokenizer: Any, texts: list[str], limit: int, name: str) -> list[str]:
    """Refuse texts longer than the model's context (no silent truncation); return words the tokenizer lacks."""
    unknown: list[str] = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for t in texts:
        ids = tokenizer(t)["input_ids"]
        if len(ids) > limit:
            raise DemoError(f"{name}: {t[:40]!r} is {len(ids)} tokens; the model reads at most {limit}")
        if unk is not None and unk in ids:
            unknown += [w for w in t.split() if unk in tokenizer(w, add_special_tokens=False)["input_ids"]]
    return sorted(set(unknown))


# ----------------------------------------------------------------------------------------------- tab functions


def _zero_shot_defaults(world: str) -> tuple[str, str]:
    if world == WORLDS[1]:
        from vlm_lab.data.pathology import CLASS_NAMES, PROMPT_TEMPLATES

        return "\n".join(CLASS_NAMES.values()), "\n".join(PROMPT_TEMPLATES[:6])
    from vlm_lab.data.shapes import class_names
    from vlm_lab.train.recipes import CLIP_TEMPLATES

    return "\n".join(class_names("heldout")), "\n".join(CLIP_TEMPLATES)


@torch.no_grad()
def zero_shot(models: DemoModels, image: Any, world: str, classes: str, templates: str,
              ensemble: bool = True) -> tuple[dict[str, float], str]:
    """Class probabilities for ``image`` from prompts ``template.format(class)``; ``ensemble`` averages over
    every template (else only the first is used). Returns ``({class: probability}, note)``."""
    from vlm_lab.eval.zero_shot import zero_shot_classifier

    if world not in WORLDS:
        raise DemoError(f"world: expected one of {list(WORLDS)}, got {world!r}")
    model, tokenizer = models.get_coca() if world == WORLDS[1] else models.get_clip()
    names = _split_lines(classes, "classes", MAX_CLASSES)
    if len(names) < 2:
        raise DemoError("classes: give at least two class names")
    temps = _split_lines(templates, "templates", MAX_TEMPLATES, sep="\n")
    bad = [t for t in temps if t.count("{}") != 1]
    if bad:
        raise DemoError(f"templates: each must contain '{{}}' exactly once (where the class name goes), got {bad[0]!r}")
    if "{" in "".join(t.replace("{}", "") for t in temps) or any("{" in n or "}" in n for n in names):
        raise DemoError("templates / classes: stray '{' or '}' (only one '{}' per template is allowed)")
    used = temps if ensemble else temps[:1]
    context = getattr(model.config, "context_length", 32)
    unknown = _check_fits(tokenizer, [t.format(n) for n in names for t in used], context, "prompts")
    pixels = to_model_input(_as_image(image), _image_size(model))  # (1, 3, s, s)
    weights = zero_shot_classifier(model, tokenizer, names, used)  # (C, d)
    image_embed = F.normalize(model.encode_image(pixels).float(), dim=-1)  # (1, d)
    probs = (100.0 * image_embed @ weights.T).softmax(dim=-1)[0]  # (C,)
    note = f"{len(used)} template(s) x {len(names)} classes; " + (
        "prompt ensemble: normalised embeddings averaged per class." if ensemble and len(used) > 1
        else "single template.")
    if unknown:
        note += f" Words the toy tokenizer does not know (read as [UNK]): {', '.join(unknown)}."
    return {n: float(p) for n, p in zip(names, probs)}, note


def _gallery(models: DemoModels) -> dict:
    model, tokenizer = models.get_clip()
    with models._lock:
        if models._gallery is None:
            from vlm_lab.data.shapes import ShapesDataset

            ds = ShapesDataset("all", n=GALLERY_SIZE, seed=4242, image_size=_image_size(model))
            items = [ds[i] for i in range(len(ds))]
            with torch.no_grad():
                pixels = torch.stack([it["pixel_values"] for it in items])  # (N, 3, s, s)
                embeds = F.normalize(model.encode_image(pixels).float(), dim=-1)  # (N, d)
            models._gallery = {"images": [ds.image(i) for i in range(len(ds))],
                               "captions": [it["caption"] for it in items], "embeds": embeds}
        return models._gallery


def _upscale(img: np.ndarray, factor: int = 4) -> np.ndarray:
    return img.repeat(factor, axis=0).repeat(factor, axis=1)  # (h, w, 3) -> (h*f, w*f, 3): crisp pixels


def _check_k(k: Any) -> int:
    if isinstance(k, float) and k.is_integer():
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= GALLERY_SIZE:
        raise DemoError(f"k: expected an integer in [1, {GALLERY_SIZE}], got {k!r}")
    return k


@torch.no_grad()
def retrieve_images(models: DemoModels, query: str, k: int = 6) -> list[tuple[np.ndarray, str]]:
    """The ``k`` gallery scenes closest to the text ``query``: ``[(image, "score | caption"), ...]``."""
    query, k = _check_query(query, "query"), _check_k(k)
    model, tokenizer = models.get_clip()
    _check_fits(tokenizer, [query], model.config.context_length, "query")
    g = _gallery(models)
    enc = tokenizer([query], return_tensors="pt", padding=True)
    text = F.normalize(model.encode_text(enc["input_ids"], enc["attention_mask"]).float(), dim=-1)  # (1, d)
    scores = (g["embeds"] @ text.T)[:, 0]  # (N,)
    top = scores.topk(k)
    return [(_upscale(g["images"][i]), f"{s:.3f} | {g['captions'][i]}") for s, i in zip(top.values.tolist(),
                                                                                       top.indices.tolist())]


@torch.no_grad()
def retrieve_texts(models: DemoModels, image: Any, k: int = 5) -> dict[str, float]:
    """The ``k`` gallery captions closest to ``image``: ``{caption: cosine similarity}``."""
    k = _check_k(k)
    model, tokenizer = models.get_clip()
    g = _gallery(models)
    pixels = to_model_input(_as_image(image), _image_size(model))
    img = F.normalize(model.encode_image(pixels).float(), dim=-1)  # (1, d)
    captions = sorted(set(g["captions"]))
    enc = tokenizer(captions, return_tensors="pt", padding=True)
    text = F.normalize(model.encode_text(enc["input_ids"], enc["attention_mask"]).float(), dim=-1)  # (M, d)
    scores = (text @ img.T)[:, 0]  # (M,)
    top = scores.topk(min(k, len(captions)))
    return {captions[i]: float(s) for s, i in zip(top.values.tolist(), top.indices.tolist())}


@torch.no_grad()
def caption(models: DemoModels, image: Any, method: str = "greedy", num_beams: int = 3, top_p: float = 0.9,
            temperature: float = 1.0, max_new_tokens: int = 30, seed: int = 0) -> str:
    """A CoCa caption of ``image`` with the chosen decoding (``vlm_lab.models.decoding``)."""
    from vlm_lab.models.decoding import METHODS

    if method not in METHODS:
        raise DemoError(f"method: expected one of {list(METHODS)}, got {method!r}")
    model, tokenizer = models.get_coca()
    limit = model.config.context_length - 1
    checks = (("num_beams", num_beams, 1, 8), ("max_new_tokens", max_new_tokens, 1, limit), ("seed", seed, 0, 2**31 - 1))
    for name, value, lo, hi in checks:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise DemoError(f"{name}: expected an integer in [{lo}, {hi}], got {value!r}")
    for name, value, lo, hi in (("top_p", top_p, 0.0, 1.0), ("temperature", temperature, 0.0, 10.0)):
        if not isinstance(value, (int, float)) or not np.isfinite(value) or not lo < value <= hi:
            raise DemoError(f"{name}: expected a number in ({lo}, {hi}], got {value!r}")
    pixels = to_model_input(_as_image(image), _image_size(model))
    kwargs: dict[str, Any] = {}
    if method == "beam":
        kwargs["num_beams"] = int(num_beams)
    elif method == "nucleus":
        kwargs.update(top_p=float(top_p), temperature=float(temperature),
                      generator=torch.Generator().manual_seed(int(seed)))
    ids = model.generate(pixels, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                         max_new_tokens=int(max_new_tokens), method=method, **kwargs)  # (1, 1 + t)
    return tokenizer.decode(ids[0], skip_special_tokens=True).strip()


@torch.no_grad()
def qformer_trace(models: DemoModels, image: Any, layer: str | None = None) -> tuple[str, np.ndarray]:
    """The BLIP-2 shapes table from image to the LLM's input, and each query's cross-attention map.

    Returns ``(markdown table, (rows*cell, cols*cell, 3) uint8 grid of per-query maps)``.
    """
    from vlm_lab.inspect import trace

    model = models.get_blip2()
    pixels = to_model_input(_as_image(image), _image_size(model))
    with trace(model, attention=True) as t:
        if getattr(model.config, "stage", 1) == 2:
            model.visual_prompt(pixels)  # (1, q, D)
        else:
            model.encode_queries(model.encode_image(pixels))  # (1, q, d)
    cross = [name for name in t.attention_weights if name.endswith("cross_attn")]
    if not cross:
        raise DemoError("the model recorded no Q-Former cross-attention")
    layer = layer or cross[0]
    if layer not in cross:
        raise DemoError(f"layer: expected one of {cross}, got {layer!r}")
    table = "```\n" + t.table(max_depth=3) + "\n```"
    weights = t.attention(layer)[0].mean(dim=0)  # (h, q, p) -> (q, p), averaged over heads
    g = model.config.image_size // model.config.patch_size
    maps = weights[:, 1:].reshape(-1, g, g)  # drop the [CLS] column: (q, g * g) -> (q, g, g)
    return table, _heatmap_grid(maps)


def _heatmap_grid(maps: torch.Tensor, cell: int = 64, cols: int = 4) -> np.ndarray:
    """``(q, g, g)`` attention maps -> one uint8 RGB image, a cell per query, each map scaled to its own max."""
    from matplotlib import colormaps

    q = maps.shape[0]
    rows = -(-q // cols)
    norm = maps / maps.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]  # (q, g, g) in [0, 1]
    up = F.interpolate(norm[:, None], size=(cell, cell), mode="nearest")[:, 0]  # (q, g, g) -> (q, cell, cell)
    colored = colormaps["viridis"](up.numpy())[..., :3]  # (q, cell, cell, 3)
    out = np.full((rows * (cell + 4), cols * (cell + 4), 3), 255, np.uint8)
    for i in range(q):
        r, c = divmod(i, cols)
        out[r * (cell + 4):r * (cell + 4) + cell, c * (cell + 4):c * (cell + 4) + cell] = (colored[i] * 255).astype(np.uint8)
    return out


@torch.no_grad()
def vqa_answer(models: DemoModels, image: Any, question: str) -> str:
    """One answer of the LLaVA chat (``vlm_lab.train.llava.chat``, greedy) about ``image``."""
    question = _check_query(question, "question")
    model, tokenizer, chat = models.get_llava()
    picture = np.asarray(_as_image(image), dtype=np.uint8)  # checked RGB -> (h, w, 3)
    return str(chat(model, tokenizer, picture, question)).strip()


def vqa_chat(models: DemoModels, image: Any, question: str, history: list | None) -> tuple[list, str]:
    """The chat tab: append the question and the model's answer to ``history`` (messages format); clear the box.

    Each answer is conditioned on the image and the current question only (the toy was trained on single turns).
    """
    if history is not None and not isinstance(history, list):
        raise DemoError(f"history: expected a list of messages, got {type(history).__name__}")
    answer = vqa_answer(models, image, question)
    turns = list(history or [])[-40:]  # keep the visible history bounded
    return turns + [{"role": "user", "content": question.strip()}, {"role": "assistant", "content": answer}], ""


# ----------------------------------------------------------------------------------------------------- the app


def _ui(fn: Callable) -> Callable:
    """Run a tab function for the UI: refused input becomes a ``gr.Error`` message; nothing else is exposed."""
    import gradio as gr

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        try:
            return fn(*args)
        except (ImageError, DemoError) as err:
            raise gr.Error(str(err)) from None
        except (ValueError, TypeError) as err:  # a library check (vlm_lab raises these with the argument's name)
            raise gr.Error(f"refused: {err}") from None

    return wrapper


def _sample_image(world: str) -> np.ndarray:
    if world == "pathology":
        from vlm_lab.data.pathology import render_tile

        return _upscale(render_tile("TUM", size=32, seed=7)[0], 4)
    from vlm_lab.data.shapes import ShapesDataset

    return _upscale(ShapesDataset("heldout", n=1, seed=3, image_size=32).image(0), 4)


def _raw_upload(payload: Any) -> str | bytes | None:
    """Replaces ``gr.Image.preprocess`` on our image inputs: the upload reaches the tab function undecoded -- the
    path of the file in Gradio's upload cache, or the bytes of a pasted data URL -- so that ``load_image`` is the only
    code that parses it and every refusal gets its message. (An instance attribute, not a subclass: Gradio writes a
    ``.pyi`` stub next to the source file of every component subclass.)"""
    import base64

    if payload is None:
        return None
    url = getattr(payload, "url", None) or ""
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if ";base64" not in header or len(data) > LIMITS.max_bytes * 4 // 3 + 4:
            return b""  # refused by load_image: "the file is empty"
        try:
            return base64.b64decode(data, validate=True)
        except ValueError:
            return b""
    path = getattr(payload, "path", None)
    return None if path is None else str(path)


def _image_input(label: str) -> Any:
    import gradio as gr

    image = gr.Image(label=label, type="filepath", sources=["upload", "clipboard"], height=220)
    image.preprocess = _raw_upload  # see _raw_upload
    return image


def build_app(tabs: tuple[str, ...] | list[str] = TABS, models: DemoModels | None = None) -> Any:
    """The Gradio ``Blocks`` app with the given tabs (not launched; see ``launch``)."""
    import gradio as gr

    tabs = tuple(tabs)
    unknown = [t for t in tabs if t not in TABS]
    if unknown or not tabs:
        raise ValueError(f"tabs: expected a non-empty subset of {list(TABS)}, got {list(tabs)}")
    models = models or DemoModels()
    bind = lambda fn: _ui(functools.partial(fn, models))  # noqa: E731

    with gr.Blocks(title="VLM Lab demos", analytics_enabled=False) as app:
        gr.Markdown("# VLM Lab demos\nToy models trained on the lab's synthetic worlds, running on this machine "
                    "(127.0.0.1). Upload PNG / JPEG / WebP / BMP / GIF images up to "
                    f"{LIMITS.max_bytes // 2**20} MiB and {LIMITS.max_pixels / 1e6:.0f} megapixels.")
        for tab in tabs:
            with gr.Tab(TAB_TITLES[tab], id=tab):
                if tab == "zero_shot":
                    world0 = WORLDS[1] if models.coca is not None and models.clip is None else WORLDS[0]
                    classes0, templates0 = _zero_shot_defaults(world0)
                    with gr.Row():
                        with gr.Column():
                            zs_image = _image_input("image")
                            zs_sample = gr.Button("Load a sample scene")
                            zs_world = gr.Radio(list(WORLDS), value=world0, label="model / world")
                        with gr.Column():
                            zs_classes = gr.Textbox(classes0, lines=6, label="class names (one per line)",
                                                    max_length=MAX_CLASSES * (MAX_TEXT_CHARS + 1))
                            zs_templates = gr.Textbox(templates0, lines=4, label="prompt templates ({} = class)",
                                                      max_length=MAX_TEMPLATES * (MAX_TEXT_CHARS + 1))
                            zs_ensemble = gr.Checkbox(True, label="ensemble the templates")
                            zs_run = gr.Button("Classify", variant="primary")
                        with gr.Column():
                            zs_label = gr.Label(num_top_classes=5, label="zero-shot prediction", elem_id="zs-label")
                            zs_note = gr.Markdown()
                    zs_world.change(lambda w: _zero_shot_defaults(w), zs_world, [zs_classes, zs_templates],
                                    api_name=False)
                    zs_sample.click(lambda w: _sample_image("pathology" if w == WORLDS[1] else "shapes"), zs_world,
                                    zs_image, api_name="sample_image")
                    zs_run.click(bind(zero_shot), [zs_image, zs_world, zs_classes, zs_templates, zs_ensemble],
                                 [zs_label, zs_note], api_name="zero_shot")
                elif tab == "retrieval":
                    with gr.Row():
                        with gr.Column():
                            rt_query = gr.Textbox("a red circle", label="text query", max_length=MAX_TEXT_CHARS)
                            rt_k = gr.Slider(1, 12, value=6, step=1, label="k")
                            rt_run = gr.Button("Find images", variant="primary")
                            rt_gallery = gr.Gallery(label="closest gallery scenes", columns=6, height=260)
                        with gr.Column():
                            rt_image = _image_input("image query")
                            rt_run2 = gr.Button("Find captions")
                            rt_texts = gr.Label(num_top_classes=5, label="closest captions")
                    rt_run.click(bind(retrieve_images), [rt_query, rt_k], rt_gallery, api_name="retrieve_images")
                    rt_run2.click(bind(retrieve_texts), [rt_image, rt_k], rt_texts, api_name="retrieve_texts")
                elif tab == "captioning":
                    with gr.Row():
                        with gr.Column():
                            cp_image = _image_input("H&E tile")
                            cp_sample = gr.Button("Load a sample tile")
                        with gr.Column():
                            cp_method = gr.Radio(["greedy", "beam", "nucleus"], value="greedy", label="decoding")
                            cp_beams = gr.Slider(1, 8, value=3, step=1, label="beams (beam search)")
                            cp_top_p = gr.Slider(0.05, 1.0, value=0.9, label="top-p (nucleus)")
                            cp_temp = gr.Slider(0.1, 2.0, value=1.0, label="temperature (nucleus)")
                            cp_len = gr.Slider(1, 39, value=30, step=1, label="max new tokens")
                            cp_seed = gr.Number(0, precision=0, label="seed (nucleus)")
                            cp_run = gr.Button("Caption", variant="primary")
                            cp_out = gr.Textbox(label="caption", interactive=False)
                    cp_sample.click(lambda: _sample_image("pathology"), None, cp_image, api_name=False)
                    cp_run.click(bind(caption), [cp_image, cp_method, cp_beams, cp_top_p, cp_temp, cp_len, cp_seed],
                                 cp_out, api_name="caption")
                elif tab == "qformer":
                    gr.Markdown("BLIP-2 toy: frozen ViT -> Q-Former (learned queries cross-attend to the patches) -> "
                                "projection into the LLM's width. Untrained unless you pass your own model: read the "
                                "shapes, and how each query spreads its attention over the 4 x 4 patches.")
                    with gr.Row():
                        with gr.Column():
                            qf_image = _image_input("image")
                            qf_sample = gr.Button("Load a sample scene")
                            qf_layer = gr.Dropdown(["qformer.layers.0.cross_attn", "qformer.layers.2.cross_attn"],
                                                   value="qformer.layers.0.cross_attn", label="cross-attention layer",
                                                   allow_custom_value=False)
                            qf_run = gr.Button("Trace", variant="primary")
                        with gr.Column():
                            qf_maps = gr.Image(label="query attention maps (one cell per query)", type="numpy",
                                               interactive=False)
                    qf_table = gr.Markdown()
                    qf_sample.click(lambda: _sample_image("shapes"), None, qf_image, api_name=False)
                    qf_run.click(bind(qformer_trace), [qf_image, qf_layer], [qf_table, qf_maps],
                                 api_name="qformer_trace")
                elif tab == "vqa":
                    gr.Markdown("Ask about a pathology image (toy Quilt-LLaVA of chapter 09, `assets/llava-toy`: "
                                "trained on synthetic H&E tiles and slides, so it answers in that small world).")
                    with gr.Row():
                        with gr.Column():
                            vq_image = _image_input("H&E image")
                            vq_sample = gr.Button("Load a sample tile")
                        with gr.Column():
                            vq_chat = gr.Chatbot(label="chat", height=300)
                            vq_question = gr.Textbox("What type of tissue is shown in this patch?",
                                                     label="question", max_length=MAX_TEXT_CHARS)
                            with gr.Row():
                                vq_run = gr.Button("Ask", variant="primary")
                                vq_clear = gr.Button("Clear")
                    vq_sample.click(lambda: _sample_image("pathology"), None, vq_image, api_name=False)
                    vq_run.click(bind(vqa_chat), [vq_image, vq_question, vq_chat], [vq_chat, vq_question],
                                 api_name="vqa_chat")
                    vq_question.submit(bind(vqa_chat), [vq_image, vq_question, vq_chat], [vq_chat, vq_question],
                                       api_name=False)
                    vq_clear.click(lambda: [], None, vq_chat, api_name=False)
                    vq_answer = gr.Textbox(visible=False)  # API-only endpoint /vqa: one answer, no history
                    gr.Button(visible=False).click(bind(vqa_answer), [vq_image, vq_question], vq_answer,
                                                   api_name="vqa")
    app.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return app


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch(app: Any = None, *, tabs: tuple[str, ...] | list[str] = TABS, models: DemoModels | None = None,
           port: int | None = None, share: bool = False, inline: bool | None = None,
           prevent_thread_lock: bool = False, quiet: bool = False, height: int = 600) -> tuple[Any, str]:
    """Launch ``app`` (default: ``build_app(tabs, models)``) with ``SAFE_LAUNCH``; returns ``(app, local_url)``.

    ``share=True`` opens a public gradio.live tunnel: only when asked explicitly (and it needs the network).
    """
    if not isinstance(share, bool):
        raise TypeError(f"share: expected True or False, got {share!r}")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
        raise ValueError(f"port: expected an int in 1..65535, got {port!r}")
    app = app if app is not None else build_app(tabs, models)
    kwargs = dict(SAFE_LAUNCH, share=share)
    _, url, _ = app.launch(server_port=port or free_port(), inline=inline, prevent_thread_lock=prevent_thread_lock,
                           quiet=quiet, height=height, **kwargs)
    return app, url


_RUNNING: dict[str, Any] = {}
_RUNNING_LOCK = threading.Lock()


def show(tab: str = "zero_shot", model: nn.Module | None = None, tokenizer: Any = None, *,
         port: int | None = None, height: int = 560) -> Any:
    """Show one tab inline (in a notebook: an iframe; elsewhere: a background server) and return the app.

    ``model`` / ``tokenizer`` replace the tab's default toy model (CLIP or CoCa for ``zero_shot`` -- CoCa when the
    model has a ``generate`` method --, CLIP for ``retrieval``, CoCa for ``captioning``, BLIP-2 for ``qformer``,
    LLaVA for ``vqa``). Calling ``show`` again for the same tab closes the previous app first, so re-running a
    notebook cell never leaves servers behind.
    """
    if tab not in TABS:
        raise ValueError(f"tab: expected one of {list(TABS)}, got {tab!r}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    models = DemoModels()
    if model is not None:
        model.eval()
        if tab == "qformer":
            models.blip2 = model
        elif tab == "vqa":
            models.llava, models.llava_tokenizer = model, tokenizer
        elif tab == "captioning" or (tab == "zero_shot" and hasattr(model, "generate")):
            models.coca, models.coca_tokenizer = model, tokenizer
        else:
            models.clip, models.clip_tokenizer = model, tokenizer
    with _RUNNING_LOCK:
        previous = _RUNNING.pop(tab, None)
        if previous is not None:
            previous.close()
        app, _ = launch(tabs=(tab,), models=models, port=port, inline=None, prevent_thread_lock=True, quiet=True,
                        height=height)
        _RUNNING[tab] = app
    return app


def close_all() -> int:
    """Close every app ``show`` started; returns how many were closed."""
    with _RUNNING_LOCK:
        apps = list(_RUNNING.values())
        _RUNNING.clear()
    for app in apps:
        app.close()
    return len(apps)
