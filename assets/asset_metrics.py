"""Re-measure the metric every toy checkpoint in assets/ records in its card, with the current code.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python assets/asset_metrics.py              # recorded vs measured
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python assets/asset_metrics.py --write coca-toy   # record them

A checkpoint is ``<dir>/model.safetensors`` with ``<dir>/card.json`` beside it, or ``<dir>/<name>.safetensors``
with ``<dir>/<name>.json`` (chapter01). The card's metrics are read from ``"metrics"`` (or ``"final"``, the
chapter-01 cards; or ``"val_perplexity"``, the LM card): nothing is hard-coded here, so regenerating a checkpoint
with its make script and card keeps ``tests/test_assets.py`` meaningful. Each model kind is measured on the
evaluation set its make script uses (same seeds, sizes and tokenizer):

- ``clip``          zero-shot top-1 on held-out compositions (``vlm_lab.train.recipes`` clip/toy evaluation);
- ``coca``          zero-shot top-1 on 180 synthetic H&E tiles (seed 2024, 20 per class), class synonyms x CONCH's
                    16 templates (``vlm_lab.data.pathology.zero_shot_prompts``): the training synonyms, and the
                    unseen ones (words never in a training caption: chance level for the toy, 1/9);
- ``causal_lm``     validation perplexity on 500 held-out captions (``assets/make_lm.py``);
- fusion / connector VQA models: accuracy per question type (``assets/make_chapter01.py``'s 1,000 questions);
- ``dual_encoder``  R@1 and relational foil accuracy (``make_chapter01.dual_metrics`` on its 500 scenes);
- ``llava``         closed accuracy / open recall on 40 held-out slides (``assets/make_llava_toy.py``'s evaluate);
- ``vilt``          held-out ITM and masked colour-word accuracy (``assets/make_vilt_toy.py``'s evaluate);
- ``vlmo``          held-out ITM accuracy and gallery R@1 of the dual / fusion encoders (``assets/make_vlmo_toy.py``'s
                    evaluate).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent
DEFAULT_TOLERANCE = 0.02  # absolute, for metrics in [0, 1]; metrics above 1 (R@1 in %, perplexity) use 2 % relative


@dataclass
class Asset:
    name: str  # e.g. "clip-toy", "chapter01/fusion_early"
    checkpoint: Path  # the .safetensors (for lm-toy: model.safetensors of a Hugging Face folder)
    card_path: Path

    @property
    def card(self) -> dict:
        return json.loads(self.card_path.read_text())


def find_assets(root: Path = ASSETS) -> list[Asset]:
    """Every checkpoint in ``root`` with the card that describes it (a missing card raises)."""
    found = []
    for ckpt in sorted(root.rglob("*.safetensors")):
        card = ckpt.parent / "card.json" if ckpt.name == "model.safetensors" else ckpt.with_suffix(".json")
        if not card.is_file() and (ckpt.parent / "card.json").is_file():
            card = ckpt.parent / "card.json"  # one card for several checkpoints (llava-toy: its "eval" per name)
        if not card.is_file():
            raise FileNotFoundError(f"{ckpt.relative_to(root)} has no card ({card.relative_to(root)})")
        rel = ckpt.parent.relative_to(root)
        name = str(rel) if ckpt.name == "model.safetensors" else str(rel / ckpt.stem)
        found.append(Asset(name, ckpt, card))
    return found


def recorded_metrics(card: dict, stem: str | None = None) -> dict[str, float]:
    """The numbers a card says its checkpoint reached (``stem``: the checkpoint's name in a shared card)."""
    source = card.get("metrics") or card.get("final")
    if source is None and stem is not None and isinstance(card.get("eval"), dict):
        source = card["eval"].get(stem)
    if source is None and "val_perplexity" in card:
        source = {"val_perplexity": card["val_perplexity"]}
    if not isinstance(source, dict):
        return {}
    return {k: float(v) for k, v in source.items() if isinstance(v, (int, float)) and not k.startswith("chance")}


def within(recorded: float, measured: float, tolerance: float | None = None) -> bool:
    if not math.isfinite(measured):
        return False
    if tolerance is not None:
        return abs(measured - recorded) <= tolerance
    if abs(recorded) <= 1.0:
        return abs(measured - recorded) <= DEFAULT_TOLERANCE
    return abs(measured - recorded) <= 0.02 * abs(recorded)


def _script(name: str):
    """Import one of the make scripts in assets/ as a module (its main() is not run)."""
    if f"assets_{name}" in sys.modules:
        return sys.modules[f"assets_{name}"]
    spec = importlib.util.spec_from_file_location(f"assets_{name}", ASSETS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up there
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def _qa_eval() -> tuple:
    from vlm_lab.data import shapes_tokenizer
    from vlm_lab.data.questions import QACollator, ShapesQADataset

    mk = _script("make_chapter01")
    tok = shapes_tokenizer()
    collate = QACollator(tok, max_length=16)
    test = ShapesQADataset("train", n=mk.N_EVAL, seed=1, image_size=mk.IMAGE_SIZE)
    return tuple(collate([test[i] for i in range(s, min(s + 250, mk.N_EVAL))]) for s in range(0, mk.N_EVAL, 250))


@functools.lru_cache(maxsize=None)
def _caption_eval() -> tuple:
    from vlm_lab.data import ImageTextCollator, ShapesDataset, shapes_tokenizer, tokenize_captions
    from vlm_lab.data.questions import relation_foil

    mk = _script("make_chapter01")
    tok = shapes_tokenizer()
    test = ShapesDataset("train", n=500, seed=1, image_size=mk.IMAGE_SIZE)
    items = [test[i] for i in range(len(test))]
    batch = ImageTextCollator(tok, max_length=24)(items)
    two = [it for it in items if len(it["scene"].shapes) == 2]
    pairs = [relation_foil(it["scene"]) for it in two]
    foils = {"pixel_values": torch.stack([it["pixel_values"] for it in two]),
             "true": tokenize_captions(tok, [p[0] for p in pairs], 24),
             "foil": tokenize_captions(tok, [p[1] for p in pairs], 24)}
    return mk, batch, foils


@torch.no_grad()
def _coca_zero_shot(model) -> dict[str, float]:
    from vlm_lab.data.pathology import CLASSES, PathologyTiles, zero_shot_prompts
    from vlm_lab.eval.zero_shot import encode_texts
    from vlm_lab.train.conch import pathology_tokenizer

    tok = pathology_tokenizer(model_max_length=model.config.context_length)
    tiles = PathologyTiles(180, size=model.config.image_size, seed=2024)
    items = [tiles[i] for i in range(len(tiles))]
    pixels = torch.stack([it["pixel_values"] for it in items])  # (N, 3, s, s)
    labels = torch.tensor([it["labels"] for it in items])  # (N,)
    image = torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1)  # (N, d)
    out = {}
    for synonyms in ("train", "unseen"):
        prompts = zero_shot_prompts(synonyms)
        weights = torch.stack([torch.nn.functional.normalize(encode_texts(model, tok, prompts[c]).mean(0), dim=-1)
                               for c in CLASSES])  # (C, d): synonyms x templates averaged per class
        predicted = (image @ weights.T).argmax(-1)
        out[f"zero_shot_top1_{synonyms}_synonyms"] = float((predicted == labels).float().mean())
    return out


@torch.no_grad()
def _lm_perplexity(path: Path) -> dict[str, float]:
    from vlm_lab.data.collate import tokenize_captions
    from vlm_lab.losses.captioning import build_lm_labels, lm_loss
    from vlm_lab.models.lm import load_toy_lm

    model, tokenizer = load_toy_lm(path.parent)
    model.eval()
    val_texts = _script("make_lm").corpus(500, seed=0 + 1000)
    total = 0.0
    for i in range(0, len(val_texts), 100):
        enc = tokenize_captions(tokenizer, val_texts[i:i + 100], max_length=32)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        total += lm_loss(logits, build_lm_labels(enc["input_ids"], enc["attention_mask"])).item()
    return {"val_perplexity": math.exp(total / 5)}


@functools.lru_cache(maxsize=None)
def _llava_scores(folder: Path, seed: int, n_slides: int) -> dict:
    """Every LLaVA checkpoint of ``folder`` scored in one call of the make script's ``evaluate`` (the held-out
    slides are built once); ``blind`` answers without its images, as it was trained."""
    from vlm_lab.train.llava import load_toy

    models = {}
    for ckpt in sorted(folder.glob("*.safetensors")):
        model, tok = load_toy(ckpt.stem, folder)
        models[ckpt.stem] = (model, ckpt.stem != "blind")
    return _script("make_llava_toy").evaluate(models, tok, seed, n_slides)


def read_kind(asset: Asset) -> str | None:
    """The registry name recorded in the checkpoint (else the card's ``model``)."""
    from vlm_lab.train.checkpoint import read_metadata

    meta = read_metadata(asset.checkpoint)
    return meta.get("model") if meta else asset.card.get("model")


def measure(asset: Asset) -> dict[str, float]:
    """Load the checkpoint with the current code and measure what its card records."""
    from vlm_lab.train.checkpoint import load_model

    kind = read_kind(asset)
    if kind == "causal_lm":
        return _lm_perplexity(asset.checkpoint)
    model = load_model(asset.checkpoint).eval()
    if kind == "clip":
        from vlm_lab.data.tokenizers import shapes_tokenizer
        from vlm_lab.train.recipes import get_recipe

        return get_recipe("clip").evaluate(model, shapes_tokenizer(model_max_length=model.config.context_length))
    if kind == "coca":
        return _coca_zero_shot(model)
    if kind in ("early_fusion", "intermediate_fusion", "late_fusion", "connector_vqa"):
        from vlm_lab.data.questions import QUESTION_TYPES
        from vlm_lab.eval.vqa import vqa_accuracy

        return {k: float(v) for k, v in vqa_accuracy(model, list(_qa_eval()), QUESTION_TYPES).items()}
    if kind == "llava":
        scores = _llava_scores(asset.checkpoint.parent, asset.card.get("seed", 0), asset.card.get("n_eval_slides", 40))
        return {k: float(v) for k, v in scores[asset.checkpoint.stem].items()}
    if kind == "vilt":
        from vlm_lab.data.collate import ImageTextCollator
        from vlm_lab.data.tokenizers import shapes_tokenizer

        tok = shapes_tokenizer()
        collate = ImageTextCollator(tok, max_length=model.config.max_text_len)
        return _script("make_vilt_toy").evaluate(model, tok, collate)
    if kind == "vlmo":
        from vlm_lab.data.collate import ImageTextCollator
        from vlm_lab.data.tokenizers import shapes_tokenizer

        return _script("make_vlmo_toy").evaluate(model, ImageTextCollator(shapes_tokenizer(),
                                                                          max_length=model.config.max_text_len))
    if kind == "dual_encoder":
        mk, batch, foils = _caption_eval()
        return mk.dual_metrics(model, batch, foils)
    raise ValueError(f"{asset.name}: no measurement defined for model kind {kind!r}")


def main(argv: list[str]) -> int:
    write = argv[1:] if argv[:1] == ["--write"] else []
    torch.set_num_threads(1)
    failed = False
    for asset in find_assets():
        if write and asset.name not in write:
            continue
        try:
            measured = measure(asset)
        except Exception as err:  # noqa: BLE001 - report every asset, then fail
            print(f"{asset.name:40s} ERROR {type(err).__name__}: {err}")
            failed = True
            continue
        if write:
            card = asset.card
            card["metrics"] = {k: round(v, 6) for k, v in measured.items()}
            card["metrics_eval"] = f"assets/asset_metrics.py, model kind {read_kind(asset)!r} (see its docstring)"
            card.setdefault("metrics_command", "HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python "
                                               f"assets/asset_metrics.py --write {asset.name}")
            asset.card_path.write_text(json.dumps(card, indent=2) + "\n")
        recorded = recorded_metrics(asset.card, asset.checkpoint.stem)
        for key, value in recorded.items():
            got = measured.get(key, float("nan"))
            ok = within(value, got, asset.card.get("tolerance"))
            print(f"{asset.name:40s} {key:34s} recorded {value:9.4f} measured {got:9.4f} {'ok' if ok else 'DIFFERS'}")
            failed |= not ok
    return int(failed)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
