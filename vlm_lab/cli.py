"""The `vlm-lab` command line: doctor, lab, demo, train, eval.

    vlm-lab doctor [--no-network-check] [--json]     versions, device, threads, offline or not, where assets live
    vlm-lab lab [--port 8888]                        JupyterLab on notebooks/, bound to 127.0.0.1, prints the URL
    vlm-lab demo [--tab zero_shot ...] [--port P]    the Gradio demo app (vlm_lab.demos), bound to 127.0.0.1
    vlm-lab train clip --preset toy [--out DIR] [--steps N] [--batch-size B] [--seed S] [--resume]
    vlm-lab train CONFIG.toml [--set train.steps=50 ...]   (a run config; see vlm_lab.train.run)
    vlm-lab eval clip --checkpoint DIR/model.safetensors

`train` and `eval` look the model up in `vlm_lab.train.recipes` (which pairs a registry model with its data world,
tokenizer and evaluation), train it with `vlm_lab.train.fit`, and write into `--out`:
`model.safetensors` (weights + the metadata `vlm_lab.train.checkpoint.load_model` rebuilds the model from),
`tokenizer/` (Hugging Face `save_pretrained` layout) and `metrics.json`. `eval` reloads both from there.

Exit codes: 0 success, 1 a failure while running, 2 a usage error (unknown command, model or preset, bad value,
missing checkpoint), as argparse does. This is the one module of the package that prints.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import vlm_lab

PROG = "vlm-lab"

# Distributions whose versions `doctor` reports (distribution name on PyPI, label printed).
_VERSIONED = (
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("transformers", "transformers"),
    ("tokenizers", "tokenizers"),
    ("timm", "timm"),
    ("safetensors", "safetensors"),
    ("huggingface-hub", "huggingface_hub"),
    ("gradio", "gradio"),
    ("jupyterlab", "jupyterlab"),
    ("nbval", "nbval"),
)

# Host `doctor` tries to reach (TCP 443) to tell whether this machine is online. Never used for anything else.
_HUB_HOST = "huggingface.co"


class UsageError(Exception):
    """A problem with what the user asked for (exit code 2), as opposed to a failure while running it."""


# --------------------------------------------------------------------------------------------------- locations


def repo_root() -> Path:
    """The source checkout this package was imported from (the folder above `vlm_lab/`)."""
    return Path(vlm_lab.__file__).resolve().parent.parent


def assets_dir() -> Path:
    """Where figures, sample images, toy checkpoints and tokenizers live: `$VLM_LAB_ASSETS`, else `<repo>/assets`."""
    override = os.environ.get("VLM_LAB_ASSETS")
    return Path(override).expanduser() if override else repo_root() / "assets"


def notebooks_dir() -> Path:
    """The course notebooks: `<repo>/notebooks`."""
    return repo_root() / "notebooks"


# ------------------------------------------------------------------------------------------------------ doctor


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def network_check(host: str = _HUB_HOST, port: int = 443, timeout: float = 1.0) -> str:
    """Try one TCP connection to `host:port`; return "reachable" or "unreachable (<reason>)".

    Runs in a daemon thread and gives up after `timeout` seconds even if name resolution hangs (getaddrinfo
    ignores socket timeouts), so it never blocks the caller for long.
    """
    result: list[str] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append("reachable")
        except Exception as err:  # DNS failure, refused, unreachable network, timeout, a test's network guard
            result.append(f"unreachable ({type(err).__name__}: {err})")

    thread = threading.Thread(target=probe, name="vlm-lab-network-check", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"unreachable (no answer within {timeout:.1f} s)"


def doctor_report(network: bool = True) -> dict[str, Any]:
    """Everything `vlm-lab doctor` prints, as a dictionary (also used by the tests)."""
    report: dict[str, Any] = {
        "vlm_lab": vlm_lab.__version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
    }
    for dist, label in _VERSIONED:
        report[label] = _version(dist) or "not installed"

    try:
        import torch
    except ImportError:  # doctor must still say something useful when torch is missing
        report["device"] = "unknown (torch is not installed)"
    else:
        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            report["device"] = f"cuda ({', '.join(names)})"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            report["device"] = "mps"
        else:
            report["device"] = "cpu (no GPU found; toy scale is the default and runs fine here)"
        report["torch_threads"] = torch.get_num_threads()
        report["torch_hub_dir"] = torch.hub.get_dir()
    try:
        report["cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        report["cpus_usable"] = os.cpu_count()

    offline_vars = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if k in os.environ}
    report["offline_env"] = ", ".join(f"{k}={v}" for k, v in offline_vars.items()) or "not set (HF_HUB_OFFLINE=1 recommended)"
    report["network"] = network_check() if network else "not checked (--no-network-check)"
    hub_offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if hub_offline:
        report["offline"] = "yes (HF_HUB_OFFLINE is set: nothing is downloaded)"
    elif report["network"].startswith("unreachable"):
        report["offline"] = "yes (no network; set HF_HUB_OFFLINE=1 to fail fast instead of retrying)"
    elif report["network"] == "reachable":
        report["offline"] = "no (the hub is reachable; only `full`-scale cells download anything)"
    else:
        report["offline"] = "unknown (HF_HUB_OFFLINE not set, network not checked)"

    assets = assets_dir()
    report["assets"] = f"{assets}" + ("" if assets.is_dir() else " (missing: set VLM_LAB_ASSETS to a checkout's assets/)")
    report["notebooks"] = str(notebooks_dir())
    report["scale"] = os.environ.get("VLM_LAB_SCALE", "toy") + " (VLM_LAB_SCALE=toy|full)"
    try:
        from huggingface_hub import constants as hub_constants

        report["hf_cache"] = str(hub_constants.HF_HUB_CACHE)
    except ImportError:
        report["hf_cache"] = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    return report


def cmd_doctor(args: argparse.Namespace) -> int:
    report = doctor_report(network=not args.no_network_check)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(len(k) for k in report)
        for key, value in report.items():
            print(f"{key:<{width}}  {value}")
    return 0


# --------------------------------------------------------------------------------------------------------- lab


def lab_command(port: int, notebook_dir: Path, token: str) -> list[str]:
    """The JupyterLab command line `vlm-lab lab` runs (bound to 127.0.0.1, no browser, fixed port and token)."""
    jupyter_lab = Path(sys.executable).with_name("jupyter-lab")
    cmd = [str(jupyter_lab)] if jupyter_lab.exists() else [sys.executable, "-m", "jupyterlab"]
    cmd += [
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",  # fail clearly if the port is taken, so the printed URL is right
        f"--ServerApp.root_dir={notebook_dir}",
        f"--IdentityProvider.token={token}",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # JupyterLab refuses to start as root without it (containers, CI machines)
    return cmd


def cmd_lab(args: argparse.Namespace) -> int:
    notebook_dir = Path(args.notebook_dir) if args.notebook_dir else notebooks_dir()
    if not notebook_dir.is_dir():
        raise UsageError(f"--notebook-dir: {notebook_dir} is not a folder (expected the course's notebooks/)")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port: expected 1..65535, got {args.port}")
    token = secrets.token_hex(16)
    cmd = lab_command(args.port, notebook_dir, token)
    url = f"http://127.0.0.1:{args.port}/lab?token={token}"
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    print(f"VLM Lab: starting JupyterLab on {notebook_dir}", flush=True)
    print(f"VLM Lab: open {url}   (Ctrl+C to stop)", flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


# -------------------------------------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from vlm_lab.demos.app import SAFE_LAUNCH, TABS

    tabs = tuple(args.tab) if args.tab else TABS
    unknown = [t for t in tabs if t not in TABS]
    if unknown:
        raise UsageError(f"--tab: unknown tab(s) {unknown}; expected some of {', '.join(TABS)}")
    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"--port: expected 1..65535, got {args.port}")
    settings = {**SAFE_LAUNCH, "share": bool(args.share)}
    if args.dry_run:
        print(json.dumps({"tabs": list(tabs), "port": args.port, **settings}, indent=2, default=str))
        return 0
    from vlm_lab.demos.app import build_app, launch

    if args.share:
        print("VLM Lab: --share opens a PUBLIC gradio.live link to this app (and needs the network)", flush=True)
    app = build_app(tabs)
    print(f"VLM Lab: demo tabs {', '.join(tabs)}; Ctrl+C to stop", flush=True)
    try:
        launch(app, port=args.port, share=args.share, inline=False, prevent_thread_lock=False)
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0


# ------------------------------------------------------------------------------------------------ train / eval


def _recipe(name: str, preset: str | None = None):
    from vlm_lab.train.recipes import get_recipe

    try:
        recipe = get_recipe(name)
    except KeyError as err:
        raise UsageError(str(err.args[0]) if err.args else f"unknown model {name!r}") from None
    if preset is not None and preset not in recipe.presets:
        raise UsageError(
            f"--preset: {name} has no preset {preset!r} in this release; expected one of {', '.join(recipe.presets)}"
        )
    return recipe


def _print_metrics(metrics: dict[str, float]) -> None:
    width = max((len(k) for k in metrics), default=0)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")


def cmd_train(args: argparse.Namespace) -> int:
    from vlm_lab.train.run import CONFIGS

    if args.model in CONFIGS or args.model.endswith((".toml", ".json")):  # a run config (chapter 10)
        from vlm_lab.train.run import main as run_main

        return run_main([args.model] + [f"--set={s}" for s in (args.set or [])])
    if args.set:
        raise UsageError("--set: only with a run config (vlm-lab train CONFIG.toml --set train.steps=50)")
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag}: expected a positive integer, got {value}")
    recipe = _recipe(args.model, args.preset)
    out = Path(args.out) if args.out else Path("runs") / f"{args.model}-{args.preset}"
    if args.resume and not out.is_dir():
        raise UsageError(f"--resume: nothing to resume in {out} (the folder does not exist)")
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from vlm_lab.train import PrintLogger, fit
    from vlm_lab.train.checkpoint import save_checkpoint

    torch.manual_seed(args.seed)
    model, dataset, collate_fn, tokenizer = recipe.build(args.preset, seed=args.seed)
    try:
        config = recipe.train_config(
            args.preset,
            out_dir=out,
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            resume=args.resume,
            collate_fn=collate_fn,
            progress=False,  # PrintLogger's lines instead of a progress bar in a terminal
        )
    except ValueError as err:  # TrainConfig names the offending field
        raise UsageError(str(err)) from None
    tokenizer.save_pretrained(str(out / "tokenizer"))  # before training, so a resumed run finds it too
    print(f"VLM Lab: training {args.model} ({args.preset}) -> {out}", flush=True)
    result = fit(model, dataset, config, callbacks=[PrintLogger()])
    print(f"VLM Lab: {result.step} steps, final loss {result.final_loss:.4f}, {result.elapsed:.1f} s", flush=True)
    checkpoint = out / "model.safetensors"
    save_checkpoint(checkpoint, model, state={"model": args.model, "preset": args.preset, "seed": args.seed})
    metrics = recipe.evaluate(model, tokenizer, args.preset)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _print_metrics(metrics)
    print(f"VLM Lab: saved {checkpoint} and {out / 'tokenizer'}; evaluate again with:")
    print(f"  {PROG} eval {args.model} --checkpoint {checkpoint}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    recipe = _recipe(args.model, args.preset)
    checkpoint = Path(args.checkpoint)
    if checkpoint.is_dir():
        checkpoint = checkpoint / "model.safetensors"
    if not checkpoint.is_file():
        raise UsageError(f"--checkpoint: {checkpoint} does not exist (expected a .safetensors file written by train)")
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else checkpoint.parent / "tokenizer"
    if not tokenizer_dir.is_dir():
        raise UsageError(f"--tokenizer: {tokenizer_dir} does not exist (train saves it next to the checkpoint)")

    from vlm_lab.data.tokenizers import load_tokenizer
    from vlm_lab.train.checkpoint import load_model

    try:
        model = load_model(checkpoint)
    except ValueError as err:  # CheckpointError: not safetensors, corrupt, or not a registry model
        raise UsageError(f"--checkpoint: {err}") from None
    model.eval()
    tokenizer = load_tokenizer(tokenizer_dir)
    metrics = recipe.evaluate(model, tokenizer, args.preset)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        _print_metrics(metrics)
    return 0


# ------------------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="VLM Lab: a course and workbench on vision-language models.")
    parser.add_argument("--version", action="version", version=f"{PROG} {vlm_lab.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("doctor", help="print versions, device, threads, offline status and where assets live")
    p.add_argument("--no-network-check", action="store_true", help="do not try to reach the model hub (1 s at most)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("lab", help="start JupyterLab on the course notebooks (127.0.0.1 only) and print the URL")
    p.add_argument("--port", type=int, default=8888, help="port to serve on (default 8888)")
    p.add_argument("--notebook-dir", help="folder to open (default: the repository's notebooks/)")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.set_defaults(func=cmd_lab)

    p = sub.add_parser("demo", help="start the Gradio demo app (127.0.0.1 only) and print its URL")
    p.add_argument("--tab", action="append", help="a tab to show (repeatable; default: all): "
                   "zero_shot, retrieval, captioning, qformer, vqa")
    p.add_argument("--port", type=int, help="port to serve on (default: a free one)")
    p.add_argument("--share", action="store_true", help="ALSO open a public gradio.live link (off by default)")
    p.add_argument("--dry-run", action="store_true", help="print the tabs and launch settings instead of starting")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a model on its data world and evaluate it")
    p.add_argument("model", help="registry name, e.g. clip; or a run config (.toml / .json, or clip-toy): "
                                 "python -m vlm_lab.train CONFIG, also under torchrun")
    p.add_argument("--preset", default="toy", help="model/data size preset (default: toy)")
    p.add_argument("--out", help="output folder (default: runs/MODEL-PRESET)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="with a run config (MODEL = a .toml/.json file or a built-in name such as clip-toy): "
                        "override a value, e.g. --set train.parallel=fsdp")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained checkpoint")
    p.add_argument("model", help="registry name, e.g. clip")
    p.add_argument("--checkpoint", required=True, help="model.safetensors written by `vlm-lab train` (or its folder)")
    p.add_argument("--preset", default="toy", help="preset whose evaluation set to use (default: toy)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: tokenizer/ next to the checkpoint)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `vlm-lab` and `python -m vlm_lab`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        parser.exit(2, f"{PROG} {args.command}: error: {err}\n")
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
