"""Train the chapter-01 toy models and write their checkpoints + result cards into assets/chapter01/.

    HF_HUB_OFFLINE=1 TQDM_DISABLE=1 .venv/bin/python assets/make_chapter01.py fusion early intermediate late late_product
    HF_HUB_OFFLINE=1 TQDM_DISABLE=1 .venv/bin/python assets/make_chapter01.py fusion_rel intermediate late early
    HF_HUB_OFFLINE=1 TQDM_DISABLE=1 .venv/bin/python assets/make_chapter01.py dual contrastive matching captioning
    HF_HUB_OFFLINE=1 TQDM_DISABLE=1 .venv/bin/python assets/make_chapter01.py dual connector_linear connector_mlp \
        connector_adapter connector_linear_random

Each model is trained on one CPU thread (tiny models run fastest that way) with the recipe in ``RECIPE`` and
saved as ``assets/chapter01/<name>.safetensors`` (vlm_lab checkpoint: registry name + config, weights only) and
``<name>.json`` (its card: registry name, preset, config, data, seed, recipe, the command that regenerates it,
training time, the metrics it reached under ``final``; fusion cards add per-type accuracy every 250 steps). Every
run also refreshes ``card.json``, the index of all cards in the folder. The notebook ``01_fusion_and_alignment``
loads the checkpoints when present and retrains them at ``VLM_LAB_SCALE=full``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from vlm_lab.data import shapes_tokenizer
from vlm_lab.data.questions import QACollator, QUESTION_TYPES, ShapesQADataset
from vlm_lab.eval.vqa import vqa_accuracy
from vlm_lab.models.fusion import (ConnectorConfig, ConnectorVQA, DualEncoder, DualEncoderConfig, EarlyFusion,
                                   FusionConfig, IntermediateFusion, LateFusion)
from vlm_lab.train import TrainConfig, fit
from vlm_lab.train.checkpoint import save_checkpoint

OUT = Path(__file__).resolve().parent / "chapter01"
RECIPE = dict(steps=1200, batch_size=64, lr=1e-3, warmup_steps=120, weight_decay=0.05, grad_clip=1.0, seed=0)
N_TRAIN, N_EVAL, IMAGE_SIZE = 64 * RECIPE["steps"], 1000, 32
EVAL_EVERY = 250
# relational-only training (notebook 01, section 3b): the same models and recipe on "where is A from B?" questions
# alone, long enough for the sign of the direction (an XOR of word order and layout) to be found
REL_RECIPE = dict(steps=4000, batch_size=64, lr=1e-3, warmup_steps=200, weight_decay=0.05, grad_clip=1.0, seed=0)
REL_EVAL_EVERY = 500
REGISTRY = {"EarlyFusion": "early_fusion", "IntermediateFusion": "intermediate_fusion", "LateFusion": "late_fusion",
            "ConnectorVQA": "connector_vqa", "DualEncoder": "dual_encoder"}
QA_DATA = {"dataset": "vlm_lab.data.questions.ShapesQADataset", "split": "train", "image_size": IMAGE_SIZE,
           "train_seed": 0, "eval": f"{N_EVAL} questions, seed 1 (types in turn)", "tokenizer": "shapes_tokenizer()"}


def write_card(name: str, model: torch.nn.Module, card: dict, command: str) -> None:
    """Save the checkpoint and its card (the fields the asset tests read: model, preset, data, seed, command, final)."""
    card = {"name": name, "model": REGISTRY[type(model).__name__], "class": type(model).__name__, "preset": "toy",
            "config": {k: v for k, v in vars(model.config).items()}, "seed": 0, "threads": 1,
            "command": f"HF_HUB_OFFLINE=1 TQDM_DISABLE=1 .venv/bin/python assets/make_chapter01.py {command}",
            "parameters": sum(p.numel() for p in model.parameters()), **card}
    save_checkpoint(OUT / f"{name}.safetensors", model, state={"card": card})
    (OUT / f"{name}.json").write_text(json.dumps(card, indent=1))
    index = {p.stem: json.loads(p.read_text()) for p in sorted(OUT.glob("*.json")) if p.name != "card.json"}
    (OUT / "card.json").write_text(json.dumps({
        "about": "toy checkpoints of notebook 01 (fusion and alignment); one card per <name>.safetensors",
        "cards": {k: {f: c.get(f) for f in ("model", "preset", "seed", "command", "train_seconds", "final")}
                  for k, c in index.items()}}, indent=1))


def fusion_model(kind: str, vocab_size: int) -> torch.nn.Module:
    c = FusionConfig.toy(vocab_size=vocab_size, image_size=IMAGE_SIZE,
                         combine="product" if kind == "late_product" else "concat")
    return {"early": EarlyFusion, "intermediate": IntermediateFusion, "late": LateFusion,
            "late_product": LateFusion}[kind](c)


def main(group: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    tok = shapes_tokenizer()
    if group == "dual":
        return dual_and_connectors(tok, names)
    if group not in ("fusion", "fusion_rel"):
        raise SystemExit(f"unknown group {group!r}")
    collate = QACollator(tok, max_length=16)
    rel = group == "fusion_rel"
    recipe = REL_RECIPE if rel else RECIPE
    n_train = 64 * recipe["steps"]
    train = ShapesQADataset("train", n=n_train, seed=0, image_size=IMAGE_SIZE,
                            types=("relational",) if rel else QUESTION_TYPES)
    test = ShapesQADataset("train", n=N_EVAL, seed=1, image_size=IMAGE_SIZE)  # the same mixed set for both groups
    test_batches = [collate([test[i] for i in range(s, min(s + 250, N_EVAL))]) for s in range(0, N_EVAL, 250)]
    for name in names:
        torch.manual_seed(0)
        model = fusion_model(name, len(tok))
        curve = []
        def eval_fn(m):
            acc = vqa_accuracy(m, test_batches, QUESTION_TYPES)
            curve.append(acc)
            return acc
        t0 = time.time()
        res = fit(model, train, TrainConfig(**recipe, collate_fn=collate, precision="fp32", device="cpu", progress=False,
                                            eval_every=REL_EVAL_EVERY if rel else EVAL_EVERY, shuffle=False),
                  eval_fn=eval_fn)
        data = {**QA_DATA, "n_train": n_train, "train_types": ["relational"] if rel else list(QUESTION_TYPES)}
        card = {"recipe": recipe, "data": data, "train_seconds": round(time.time() - t0, 1),
                "eval_steps": [h["step"] for h in res.history if "eval_all" in h], "curve": curve,
                "final": curve[-1], "final_loss": res.final_loss}
        if rel:
            card["note"] = "trained on relational questions only: only 'relational' in the accuracies is meaningful"
        write_card(f"{group}_{name}", model, card, f"{group} {name}")
        print(name, card["train_seconds"], card["final"], flush=True)


DUAL_RECIPE = dict(steps=1500, batch_size=64, lr=1e-3, warmup_steps=100, weight_decay=0.05, grad_clip=1.0, seed=0)
CONNECTOR_RECIPE = dict(steps=500, batch_size=64, lr=1e-3, warmup_steps=50, weight_decay=0.05, grad_clip=1.0, seed=0)


@torch.no_grad()
def dual_metrics(model: DualEncoder, batch: dict, foils: dict) -> dict:
    """Retrieval R@1 (ITC) on ``batch`` and relational accuracy on caption-vs-foil pairs (ITC; ITM and LM if any)."""
    from vlm_lab.eval import retrieval_metrics

    model.eval()
    img = model.encode_image(batch["pixel_values"])
    txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
    out = {k: float(v) for k, v in retrieval_metrics(img @ txt.T, range(txt.shape[0]), ks=(1,)).items()}
    fi = model.encode_image(foils["pixel_values"])
    t_true = model.encode_text(foils["true"]["input_ids"], foils["true"]["attention_mask"])
    t_foil = model.encode_text(foils["foil"]["input_ids"], foils["foil"]["attention_mask"])
    out["relational_itc"] = float(((fi * t_true).sum(-1) > (fi * t_foil).sum(-1)).float().mean())
    if model.config.matching:
        p_true = model.match_score(foils["pixel_values"], **foils["true"])
        p_foil = model.match_score(foils["pixel_values"], **foils["foil"])
        out["relational_itm"] = float((p_true > p_foil).float().mean())
    if model.config.captioning:
        l_true = model.caption_log_likelihood(foils["pixel_values"], **foils["true"])
        l_foil = model.caption_log_likelihood(foils["pixel_values"], **foils["foil"])
        out["relational_lm"] = float((l_true > l_foil).float().mean())
    return out


def dual_and_connectors(tok, names: list[str]) -> None:
    """ITC vs ITC + ITM vs ITC + ITM + LM on captions; then connectors on the frozen ITC image encoder (VQA)."""
    from vlm_lab.data import ImageTextCollator, ShapesDataset, tokenize_captions
    from vlm_lab.data.questions import relation_foil

    cap_collate = ImageTextCollator(tok, max_length=24)
    train = ShapesDataset("train", n=64 * 1500, seed=0, image_size=IMAGE_SIZE)
    test = ShapesDataset("train", n=500, seed=1, image_size=IMAGE_SIZE)
    test_batch = cap_collate([test[i] for i in range(len(test))])
    two = [test[i] for i in range(len(test)) if len(test[i]["scene"].shapes) == 2]
    pairs = [relation_foil(it["scene"]) for it in two]
    foils = {"pixel_values": torch.stack([it["pixel_values"] for it in two]),
             "true": tokenize_captions(tok, [p[0] for p in pairs], 24),
             "foil": tokenize_captions(tok, [p[1] for p in pairs], 24)}
    vision_state = None
    cap_data = {"dataset": "vlm_lab.data.ShapesDataset (captions)", "split": "train", "image_size": IMAGE_SIZE,
                "train_seed": 0, "n_train": 64 * DUAL_RECIPE["steps"],
                "eval": "500 scenes, seed 1 (R@1 in %); relational_*: true caption vs its relation foil, two-shape scenes"}
    for name in [n for n in names if n in ("contrastive", "matching", "captioning")]:
        torch.manual_seed(0)
        model = DualEncoder(DualEncoderConfig.toy(vocab_size=len(tok), matching=name != "contrastive",
                                                  captioning=name == "captioning"))
        t0 = time.time()
        res = fit(model, train, TrainConfig(**DUAL_RECIPE, collate_fn=cap_collate, precision="fp32", device="cpu",
                                            progress=False, shuffle=False))
        card = {"recipe": DUAL_RECIPE, "data": cap_data, "train_seconds": round(time.time() - t0, 1),
                "final_loss": res.final_loss, "final": dual_metrics(model, test_batch, foils), "n_foils": len(pairs)}
        write_card(f"dual_{name}", model, card, f"dual {name}")
        print(name, card["train_seconds"], card["final"], flush=True)
        if name == "contrastive":
            vision_state = model.vision.state_dict()
    if vision_state is None and (OUT / "dual_contrastive.safetensors").exists():
        from vlm_lab.train.checkpoint import load_model
        vision_state = load_model(OUT / "dual_contrastive.safetensors").vision.state_dict()
    collate = QACollator(tok, max_length=16)
    qa_train = ShapesQADataset("train", n=64 * 800, seed=0, image_size=IMAGE_SIZE)
    qa_test = ShapesQADataset("train", n=N_EVAL, seed=1, image_size=IMAGE_SIZE)
    test_batches = [collate([qa_test[i] for i in range(s, min(s + 250, N_EVAL))]) for s in range(0, N_EVAL, 250)]
    for name in [n for n in names if n.startswith("connector_")]:
        kind, _, init = name.removeprefix("connector_").partition("_")  # e.g. connector_linear, connector_linear_random
        torch.manual_seed(0)
        model = ConnectorVQA(ConnectorConfig.toy(connector=kind, vocab_size=len(tok)))
        if init != "random":
            model.image_encoder.load_state_dict(vision_state)
        t0 = time.time()
        res = fit(model, qa_train, TrainConfig(**CONNECTOR_RECIPE, collate_fn=collate, precision="fp32",
                                               device="cpu", progress=False, shuffle=False))
        card = {"connector": kind, "image_encoder": "random (frozen)" if init == "random" else
                "ITC-pretrained toy ViT of dual_contrastive (frozen)", "recipe": CONNECTOR_RECIPE,
                "data": {**QA_DATA, "n_train": 64 * CONNECTOR_RECIPE["steps"]},
                "train_seconds": round(time.time() - t0, 1),
                "connector_parameters": sum(p.numel() for p in model.connector.parameters()),
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "final": vqa_accuracy(model, test_batches, QUESTION_TYPES), "final_loss": res.final_loss}
        write_card(name, model, card, f"dual {name}")
        print(name, card["train_seconds"], card["final"], flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
