"""Safetensors checkpoints: model weights, optimizer / scheduler state and RNG state, written atomically.

One checkpoint is one ``.safetensors`` file (huggingface/safetensors: an 8-byte header length, a JSON header,
raw tensor bytes; no code, so loading can never execute anything). Nothing here unpickles: ``torch.load`` is
never called, and a pickle / ``torch.save`` file is refused with a message.

File layout::

    tensors   "model/<state_dict key>"          model weights (tied tensors stored once, see "aliases")
              "optim/<param index>/<name>"      optimizer state tensors (AdamW: step, exp_avg, exp_avg_sq)
              "rng/torch"                       torch CPU generator state (uint8)
              "rng/cuda/<device>"               CUDA generator states (uint8), when CUDA is in use
    metadata  "format"  = "vlm_lab.checkpoint"
              "format_version" = "1"
              "vlm_lab" = JSON: {"model": registry name or null, "config": model config dict or null,
                                 "aliases": {key: key stored}, "optimizer": {"param_groups": [...],
                                 "state": {index: {non-tensor entries}}}, "scheduler": state dict,
                                 "state": the caller's dict (step, data position, numpy / python RNG, ...)}

``save_checkpoint`` writes a temp file in the destination folder, flushes and fsyncs it, then ``os.replace``s it
over the destination, so a crash mid-write leaves the previous checkpoint intact (the same recipe as
``torch.save``-free trainers such as nanoGPT's ``ckpt.pt`` swap, made crash-safe). ``load_model(path)`` rebuilds
a model through ``vlm_lab.models.registry.model_from_dict`` from the metadata and loads its weights.

A plain weights file written with ``safetensors.torch.save_file(model.state_dict(), path)`` (no vlm_lab
metadata) can be loaded with ``load_checkpoint(path, model)`` too: its keys are taken as state-dict keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_model", "read_metadata",
           "latest_checkpoint", "checkpoint_path", "FORMAT", "FORMAT_VERSION"]

FORMAT = "vlm_lab.checkpoint"
FORMAT_VERSION = "1"
_MODEL, _OPTIM, _RNG = "model/", "optim/", "rng/"
_STEP_RE = re.compile(r"^step_(\d+)\.safetensors$")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own header cap


class CheckpointError(ValueError):
    """A checkpoint file is missing pieces, malformed, or does not fit the model it is loaded into."""


# ---------------------------------------------------------------------------------------------- helpers


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    """The file name ``fit`` uses for the checkpoint after ``step`` optimizer steps: ``step_00000123.safetensors``."""
    return Path(out_dir) / f"step_{int(step):08d}.safetensors"


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The ``step_*.safetensors`` file with the highest step in ``out_dir``, or None when there is none."""
    out = Path(out_dir)
    if not out.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_file()]
    return max(found)[1] if found else None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    return repr(obj)  # last resort: keep a readable trace rather than failing the save


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=_json_default, allow_nan=True)


def _registry_name(model: nn.Module) -> str | None:
    name = getattr(model, "registry_name", None)
    if isinstance(name, str):
        return name
    try:  # the lead's registry; optional so that checkpoints of any nn.Module work
        from vlm_lab.models.registry import MODELS
    except Exception:  # noqa: BLE001 - registry missing or broken: record no name
        return None
    for key, entry in MODELS.items():
        cls = entry[0] if isinstance(entry, tuple) else entry  # {name: (model class, config class)} or {name: class}
        if type(model) is cls:
            return key
    return None


def _model_config(model: nn.Module) -> dict | None:
    cfg = getattr(model, "config", None)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return json.loads(_dumps(dataclasses.asdict(cfg)))
    return None


def _unwrap(model: nn.Module) -> nn.Module:
    from vlm_lab.train.distributed import unwrap

    return unwrap(model)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows: directories cannot be opened; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_tensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write the safetensors payload to ``path`` (a separate function so tests can make it fail midway)."""
    save_file(tensors, path, metadata=metadata)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _write_tensors(tensors, tmp, metadata)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


# ------------------------------------------------------------------------------------------------- save


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    state: dict | None = None,
    *,
    rng_tensors: dict[str, torch.Tensor] | None = None,
    model_name: str | None = None,
) -> Path:
    """Write ``model`` (and optionally optimizer, scheduler, state) to one safetensors file, atomically.

    Args:
        path: destination ``.safetensors`` file; its folder is created.
        model: the module (DDP / compiled wrappers are unwrapped); its ``config`` dataclass, if any, is stored.
        optimizer: its state tensors are flattened into ``optim/<index>/<name>``, the rest into JSON.
        scheduler: anything with a JSON-serialisable ``state_dict()`` (e.g. ``LambdaLR``).
        state: JSON-serialisable training state (step, data position, python / numpy RNG, ...). A ``"model"``
            string in it is taken as the registry name (the CLI passes ``state={"model": "clip", ...}``).
        rng_tensors: extra uint8 RNG-state tensors stored under ``rng/<name>`` (``fit`` passes torch's).
        model_name: the registry name for ``load_model``; default: ``state["model"]``, ``model.registry_name``,
            or the key of ``type(model)`` in ``vlm_lab.models.registry.MODELS``.
    Returns:
        the path written.
    """
    path = Path(path)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if state is not None and not isinstance(state, dict):
        raise TypeError(f"state: expected a dict, got {type(state).__name__}")
    model = _unwrap(model)
    state = dict(state or {})
    if model_name is None and isinstance(state.get("model"), str):
        model_name = state["model"]
    model_name = model_name or _registry_name(model)

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        t = t.detach()
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                 t.dtype) if t.numel() else None
        if ident is not None and ident in seen:  # a tied weight: store once
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[_MODEL + key] = t.cpu().contiguous()

    optim_meta = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        optim_meta = {"param_groups": sd["param_groups"], "state": {}}
        for idx, entries in sd["state"].items():
            plain = {}
            for name, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{_OPTIM}{idx}/{name}"] = value.detach().cpu().contiguous()
                else:
                    plain[name] = value
            optim_meta["state"][str(idx)] = plain
    for name, t in (rng_tensors or {}).items():
        tensors[_RNG + name] = t.detach().cpu().contiguous()

    payload = {
        "model": model_name,
        "config": _model_config(model),
        "aliases": aliases,
        "optimizer": optim_meta,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "state": state,
    }
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "vlm_lab": _dumps(payload)}
    _atomic_save(tensors, path, metadata)
    return path


# ------------------------------------------------------------------------------------------------- load


def _check_file(path: Path) -> None:
    """Refuse anything that is not a well-formed safetensors file, before any parser touches it."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {path} is not a file (expected a .safetensors file)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    hint = ""
    if head[:4] == b"PK\x03\x04":
        hint = " It looks like a torch.save / zip-pickle file; vlm_lab never unpickles checkpoints."
    elif head[:1] == b"\x80":
        hint = " It looks like a Python pickle; vlm_lab never unpickles checkpoints."
    if size < 10:
        raise CheckpointError(f"checkpoint: {path} is not a safetensors file (only {size} bytes).{hint}")
    (n,) = struct.unpack("<Q", head[:8])
    if n > _MAX_HEADER or 8 + n > size or head[8:9] != b"{":
        raise CheckpointError(f"checkpoint: {path} is not a safetensors file (bad header).{hint}")


def read_metadata(path: str | os.PathLike) -> dict:
    """The vlm_lab metadata of a checkpoint (``{}`` for a plain safetensors weights file), without its tensors."""
    path = Path(path)
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"checkpoint: {path} is not a valid safetensors file: {err}") from None
    if meta.get("format") != FORMAT:
        return {}
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint: {path} has format version {meta.get('format_version')!r}; "
                              f"this vlm_lab reads version {FORMAT_VERSION!r}")
    try:
        return json.loads(meta["vlm_lab"])
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint: {path} has corrupt vlm_lab metadata ({err})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"checkpoint: {path} is not a valid safetensors file: {err}") from None


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _list(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    strict: bool = True,
) -> dict:
    """Load a checkpoint written by ``save_checkpoint`` into ``model`` (and optimizer / scheduler if given).

    Every shape is checked before anything is copied, so a refused file leaves the model untouched.

    Returns:
        the saved ``state`` dict, plus ``"model_name"``, ``"model_config"``, ``"rng_tensors"`` (name -> uint8
        tensor), ``"missing_keys"`` and ``"unexpected_keys"`` (empty under ``strict``).
    Raises:
        FileNotFoundError: no such file.
        CheckpointError (a ValueError): not a safetensors file (a pickle, random bytes), a tensor whose shape
            differs from the model's (names the key and both shapes), or, with ``strict``, missing / unexpected
            keys; an optimizer was asked for but the file has none.
    """
    path = Path(path)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    meta = read_metadata(path)
    tensors = _read_tensors(path)
    model = _unwrap(model)

    if meta:
        weights = {k[len(_MODEL):]: v for k, v in tensors.items() if k.startswith(_MODEL)}
        for key, target in meta.get("aliases", {}).items():
            if target in weights:
                weights[key] = weights[target]
    else:  # a plain weights file
        weights = dict(tensors)

    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    bad = [f"{k!r}: checkpoint has shape {_shape(weights[k])}, model expects {_shape(own[k])}"
           for k in own if k in weights and _shape(weights[k]) != _shape(own[k])]
    if bad:
        raise CheckpointError(f"checkpoint: {path} does not fit the model; tensors of the wrong shape: "
                              + "; ".join(bad[:10]) + (f" ... (+{len(bad) - 10} more)" if len(bad) > 10 else ""))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys (in the model, not in the file): {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys (in the file, not in the model): {_list(unexpected)}")
        raise CheckpointError(f"checkpoint: {path} does not match the model; " + "; ".join(parts)
                              + " (pass strict=False to load the overlap)")
    model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)

    if optimizer is not None:
        om = meta.get("optimizer") if meta else None
        if om is None:
            raise CheckpointError(f"checkpoint: {path} has no optimizer state (saved without an optimizer)")
        state: dict[int, dict] = {int(i): dict(v) for i, v in om["state"].items()}
        for k, v in tensors.items():
            if k.startswith(_OPTIM):
                idx, name = k[len(_OPTIM):].split("/", 1)
                state.setdefault(int(idx), {})[name] = v
        groups = []
        for g in om["param_groups"]:
            g = dict(g)
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
            groups.append(g)
        try:
            optimizer.load_state_dict({"state": state, "param_groups": groups})
        except ValueError as err:
            raise CheckpointError(f"checkpoint: {path}: optimizer state does not fit this optimizer: {err}") from None

    if scheduler is not None:
        sd = meta.get("scheduler") if meta else None
        if sd is None:
            raise CheckpointError(f"checkpoint: {path} has no scheduler state (saved without a scheduler)")
        scheduler.load_state_dict(sd)

    out = dict(meta.get("state", {})) if meta else {}
    out.update({
        "model_name": meta.get("model") if meta else None,
        "model_config": meta.get("config") if meta else None,
        "rng_tensors": {k[len(_RNG):]: v for k, v in tensors.items() if k.startswith(_RNG)},
        "missing_keys": missing,
        "unexpected_keys": unexpected,
    })
    return out


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model recorded in a checkpoint's metadata and load its weights (returned in eval mode).

    Uses ``vlm_lab.models.registry.model_from_dict(name, config)``; the checkpoint must have been saved from a
    registry model (``save_checkpoint`` records the name and ``dataclasses.asdict(model.config)``).
    """
    path = Path(path)
    meta = read_metadata(path)
    if not meta or not meta.get("model") or meta.get("config") is None:
        raise CheckpointError(f"checkpoint: {path} does not record a registry model name and config, so the "
                              "model cannot be rebuilt; build the model yourself and call load_checkpoint(path, model)")
    from vlm_lab.models.registry import model_from_dict  # lazy: train sits above models

    model = model_from_dict(meta["model"], meta["config"])
    load_checkpoint(path, model, strict=True)
    return model.to(device).eval()
