"""`python -m vlm_lab.train CONFIG`: one config file (TOML or JSON) -> one training run, on 1 process or under
torchrun (DDP or FSDP2), the way nanoGPT's ``train.py`` runs from a laptop to a cluster — but with a typed config
instead of ``exec``'d globals.

    # one CPU process, the built-in toy config (or a file of your own)
    python -m vlm_lab.train clip-toy
    python -m vlm_lab.train my_run.toml --set train.steps=50 --set train.batch_size=32
    # two CPU processes (gloo) or 8 GPUs of one node (nccl), same code:
    torchrun --standalone --nproc_per_node=2 -m vlm_lab.train clip-toy --set train.parallel=fsdp
    # several nodes: torchrun --nnodes=2 --node_rank=R --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 ...
    vlm-lab train my_run.toml        # the same through the console script

A config names a model that has a data recipe (`vlm_lab.train.recipes`), a model preset, overrides of the model's
config dataclass, and any `TrainConfig` field::

    model = "clip"                 # registry name with a recipe (this release: clip)
    preset = "paper"               # toy | small | paper (the model's config preset)
    out_dir = "runs/clip-b16"      # checkpoints, metrics.json, tokenizer/ (rank 0 writes)
    seed = 0
    evaluate = true                # the recipe's evaluation at the end (zero-shot on held-out compositions)
    [model_config]                 # fields of the model config (CLIPConfig), e.g. the ViT-B/16 variant
    variant = "ViT-B/16"
    [train]                        # TrainConfig fields
    steps = 1000
    batch_size = 256               # per process; global batch = batch_size * grad_accum * world size
    parallel = "ddp"               # or "fsdp"
    precision = "bf16"
    activation_checkpointing = true

The data of every preset is the synthetic shapes world rendered at the model's image size (offline; enough to
measure memory and throughput at paper size, not to reproduce the paper's accuracy — that needs LAION-scale pairs,
see benchmarks/RUN_CARDS.md). Rank 0 alone logs and writes; checkpoints are full-state safetensors files, so a run
resumes (``--set train.resume=true``) on any number of processes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["CONFIGS", "load_config", "run", "main"]

# Built-in configs, usable by name instead of a file.
CONFIGS: dict[str, dict[str, Any]] = {
    "clip-toy": {"model": "clip", "preset": "toy", "out_dir": "runs/clip-toy", "evaluate": True,
                 "train": {"steps": 1000, "batch_size": 64, "lr": 2e-3, "checkpoint_every": 100,
                           "precision": "fp32"}},
    "clip-vit-b16": {"model": "clip", "preset": "paper", "model_config": {"variant": "ViT-B/16"},
                     "out_dir": "runs/clip-vit-b16", "evaluate": False,
                     "train": {"steps": 1000, "batch_size": 256, "lr": 5e-4, "warmup_steps": 100, "weight_decay": 0.2,
                               "checkpoint_every": 500, "precision": "bf16", "grad_clip": 1.0}},
}

_TOP = {"model", "preset", "out_dir", "seed", "evaluate", "model_config", "train"}


def load_config(source: str | Path | dict) -> dict[str, Any]:
    """A run config from a built-in name (`CONFIGS`), a ``.toml`` / ``.json`` file, or a dict; unknown keys raise."""
    if isinstance(source, dict):
        cfg = json.loads(json.dumps(source))
    elif str(source) in CONFIGS:
        cfg = json.loads(json.dumps(CONFIGS[str(source)]))
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"config: {source!r} is neither a file nor a built-in config "
                                    f"({', '.join(sorted(CONFIGS))})")
        if path.suffix == ".toml":
            import tomllib

            cfg = tomllib.loads(path.read_text())
        elif path.suffix == ".json":
            cfg = json.loads(path.read_text())
        else:
            raise ValueError(f"config: expected a .toml or .json file, got {path.name}")
    unknown = sorted(set(cfg) - _TOP)
    if unknown:
        raise ValueError(f"config: unknown key(s) {unknown}; expected some of {sorted(_TOP)}")
    if "model" not in cfg:
        raise ValueError("config: 'model' is required (a registry name with a recipe, e.g. 'clip')")
    for table in ("model_config", "train"):
        if not isinstance(cfg.get(table, {}), dict):
            raise ValueError(f"config: [{table}] must be a table of field = value")
    return cfg


def _parse_set(items: Sequence[str], cfg: dict[str, Any]) -> dict[str, Any]:
    """``--set train.steps=50`` / ``--set preset=small``: the value is parsed as JSON when it can be (numbers,
    true/false, lists), else kept as a string."""
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set: expected key=value (e.g. train.steps=50), got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        parts = key.split(".")
        if len(parts) > 2 or parts[0] not in _TOP:
            raise ValueError(f"--set: unknown key {key!r}; expected one of {sorted(_TOP)} or train.<field> / "
                             "model_config.<field>")
        if len(parts) == 2:
            cfg.setdefault(parts[0], {})[parts[1]] = value
        else:
            cfg[key] = value
    return cfg


def _build(cfg: dict[str, Any]) -> tuple:
    """(model, train_set, collate_fn, tokenizer, recipe) for the config's model, preset and overrides."""
    import torch

    from vlm_lab.train.recipes import get_recipe

    name, preset = cfg["model"], cfg.get("preset", "toy")
    recipe = get_recipe(name)
    seed = int(cfg.get("seed", 0))
    overrides = dict(cfg.get("model_config", {}))
    torch.manual_seed(seed)
    if preset in recipe.presets and not overrides:
        model, train_set, collate_fn, tokenizer = recipe.build(preset, seed=seed)
        return model, train_set, collate_fn, tokenizer, recipe
    if name != "clip":
        raise ValueError(f"model: {name} has no data recipe for preset {preset!r} with overrides in this release")
    from vlm_lab.data.collate import ImageTextCollator
    from vlm_lab.data.shapes import ShapesDataset
    from vlm_lab.data.tokenizers import shapes_tokenizer
    from vlm_lab.models.clip import CLIPConfig
    from vlm_lab.models.registry import build_model

    if preset not in ("toy", "small", "paper"):
        raise ValueError(f"preset: expected 'toy', 'small' or 'paper', got {preset!r}")
    probe = getattr(CLIPConfig, preset)(**overrides)  # validates the overrides without building the model
    tokenizer = shapes_tokenizer(model_max_length=probe.context_length)
    eot = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    extra = {} if preset != "toy" else {"vocab_size": len(tokenizer)}
    torch.manual_seed(seed)
    model = build_model("clip", preset, **{**extra, **overrides, "eot_token_id": eot})
    train_set = ShapesDataset("train", n=8192, seed=seed, image_size=model.config.image_size)
    collate_fn = ImageTextCollator(tokenizer, max_length=model.config.context_length)
    return model, train_set, collate_fn, tokenizer, recipe


def run(config: str | Path | dict, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train as the config says (under torchrun: on every rank) and return ``{"history", "metrics", "checkpoint"}``
    on every rank (metrics only on rank 0)."""
    cfg = _parse_set(overrides, load_config(config))
    from vlm_lab.train import PrintLogger, TrainConfig, fit
    from vlm_lab.train import distributed as D
    from vlm_lab.train.checkpoint import load_model

    with D.session():
        model, train_set, collate_fn, tokenizer, recipe = _build(cfg)
        preset = cfg.get("preset", "toy")
        defaults = recipe.train_defaults.get(preset, recipe.train_defaults.get("toy", {}))
        out_dir = cfg.get("out_dir")
        train = {**defaults, **cfg.get("train", {}), "collate_fn": collate_fn, "seed": int(cfg.get("seed", 0)),
                 "progress": False}
        if out_dir is not None:
            train["out_dir"] = out_dir
        steps = train.get("steps")
        explicit_warmup = "warmup_steps" in cfg.get("train", {})
        if isinstance(steps, int) and not explicit_warmup and train.get("warmup_steps", 0) > steps:
            train["warmup_steps"] = steps // 10  # a shortened run keeps a 10 % warmup (as recipes do)
        try:
            tc = TrainConfig(**train)
        except TypeError as err:
            raise ValueError(f"[train]: {err}") from None
        if D.is_main_process() and out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            tokenizer.save_pretrained(str(Path(out_dir) / "tokenizer"))
            print(f"VLM Lab: {cfg['model']} ({preset}) on {D.world_size()} process(es), parallel={tc.parallel}, "
                  f"precision={tc.precision}, global batch {tc.batch_size * tc.grad_accum * D.world_size()} "
                  f"-> {out_dir}", flush=True)
        result = fit(model, train_set, tc, callbacks=[PrintLogger()])
        metrics: dict[str, float] = {}
        if cfg.get("evaluate", False) and D.is_main_process():
            if result.checkpoint is not None:  # the saved full state: the same path for DDP and FSDP
                model = load_model(result.checkpoint)
            metrics = recipe.evaluate(model, tokenizer, "toy")
            if out_dir is not None:
                (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
            for k, v in metrics.items():
                print(f"{k}  {v:.4f}", flush=True)
        D.barrier()
    return {"history": result.history, "metrics": metrics, "checkpoint": result.checkpoint}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_lab.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help=f"a .toml / .json run config, or a built-in one: {', '.join(sorted(CONFIGS))}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=50 --set train.parallel=fsdp")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    try:
        if args.print_config:
            print(json.dumps(_parse_set(args.set, load_config(args.config)), indent=2))
            return 0
        run(args.config, args.set)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"python -m vlm_lab.train: error: {err}", file=sys.stderr)
        return 2
    return 0
