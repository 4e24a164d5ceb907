"""Scaling switches of `fit`: activation checkpointing per block, `torch.compile` per block, FSDP2 sharding, and
full-state safetensors checkpoints of a sharded model.

Chapter 10 of the course. The references are PyTorch's own: ``torch.utils.checkpoint.checkpoint`` (non-reentrant),
``torch.distributed.fsdp.fully_shard`` (FSDP2: every parameter becomes a DTensor sharded on dim 0; blocks are
sharded bottom-up, then the root; the optimizer is built after sharding; only the root's ``__call__`` unshards the
root's own parameters) and ``torch.distributed.checkpoint.state_dict`` (``get_model_state_dict`` /
``set_optimizer_state_dict`` with ``full_state_dict=True``). The per-block pattern is torchtitan's
(``apply_ac`` -> ``apply_compile`` -> ``apply_fsdp``).

What a "block" is: every outermost module whose class is one of `BLOCK_CLASS_NAMES` (the lab's pre-LN
``TransformerBlock``, BERT / Q-Former layers, VLMo's MoME block) — the repeated unit whose activations dominate
memory and whose parameters are the natural unit to all-gather.

Activation checkpointing replaces each block's ``forward`` on the *instance* (state-dict keys do not change, unlike
``checkpoint_wrapper``): the forward runs under ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``,
which keeps only the block's inputs and recomputes the inside during backward (the RNG state is replayed, so
dropout masks agree). Memory per block drops from ~all intermediate tensors to the block input; the price is one
more forward per block (~+33 % FLOPs for a training step).

Checkpoints of a sharded model are *full-state* safetensors files written by rank 0, in exactly the layout of
``vlm_lab.train.checkpoint`` (index-keyed optimizer state, the parameter order of ``param_groups(model)``): the
parameters and the AdamW moments are gathered to rank 0 (``cpu_offload``), so a run saved by 2 FSDP ranks resumes
on 1 process, on 4 DDP ranks, or on 3 FSDP ranks alike. This is the lab's "no pickle" rule applied to FSDP; at
LLaVA scale one would switch to ``torch.distributed.checkpoint`` (DCP) sharded files, which resave without a
gather but are a folder of per-rank files plus a pickled metadata file.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["BLOCK_CLASS_NAMES", "blocks", "apply_activation_checkpointing", "compile_blocks", "shard_fsdp",
           "broadcast_from_rank0", "average_replicated_grads", "gather_full_state", "load_sharded_optimizer",
           "is_sharded"]

# Classes treated as "a block" (the repeated transformer layer of each lab model).
BLOCK_CLASS_NAMES = ("TransformerBlock", "BertLayer", "QFormerLayer", "MoMEBlock", "DecoderLayer", "LMBlock")


def _is_block(module: nn.Module, names: Iterable[str]) -> bool:
    return any(cls.__name__ in names for cls in type(module).__mro__)


def blocks(model: nn.Module, class_names: Iterable[str] = BLOCK_CLASS_NAMES) -> list[nn.Module]:
    """The outermost block modules of ``model`` in registration order (a block inside a block is not listed)."""
    names = tuple(class_names)
    found: list[nn.Module] = []
    inside: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        if _is_block(module, names):
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def _checkpointed_forward(inner: Any, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():  # eval / no_grad forwards: nothing to save, nothing to recompute
        return inner(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module, class_names: Iterable[str] = BLOCK_CLASS_NAMES) -> int:
    """Recompute every block's activations in backward instead of storing them; returns the number of blocks.

    Idempotent. Raises ValueError when the model has no block to checkpoint.
    """
    found = blocks(model, class_names)
    if not found:
        raise ValueError(f"activation_checkpointing: {type(model).__name__} has no block of the classes "
                         f"{tuple(class_names)} to checkpoint")
    for block in found:
        if getattr(block, "_vlm_lab_ac", False):
            continue
        block.forward = functools.partial(_checkpointed_forward, block.forward)  # instance attribute, same keys
        block._vlm_lab_ac = True
    return len(found)


def compile_blocks(model: nn.Module, backend: str = "inductor",
                   class_names: Iterable[str] = BLOCK_CLASS_NAMES) -> int:
    """``torch.compile`` each block in place (``nn.Module.compile``: keys and parameters unchanged); returns the count.

    Per-block compilation (torchtitan's choice) keeps graphs small and composes with FSDP2 and activation
    checkpointing; the glue around the blocks (embeddings, pooling, the loss) stays eager.
    """
    found = blocks(model, class_names)
    if not found:
        raise ValueError(f"compile: {type(model).__name__} has no block of the classes {tuple(class_names)}")
    for block in found:
        block.compile(backend=backend)
    return len(found)


def broadcast_from_rank0(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (DDP does this itself; FSDP2 does not)."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def shard_fsdp(root: nn.Module, model: nn.Module, *, class_names: Iterable[str] = BLOCK_CLASS_NAMES,
               reshard_after_forward: bool = True) -> tuple[int, list[nn.Parameter]]:
    """FSDP2: ``fully_shard`` each block of ``model``, then ``root`` (the module whose ``__call__`` runs the step).

    Every rank first receives rank 0's weights (``broadcast_from_rank0``), so the sharded model is the one rank 0
    built. FSDP2 cannot shard 0-dim parameters (CLIP's ``logit_scale``); those stay replicated on every rank and
    their gradients must be averaged with ``average_replicated_grads`` before the optimizer step (fit does).
    Returns ``(number of blocks sharded, replicated parameters)``.
    """
    from torch.distributed.fsdp import fully_shard

    broadcast_from_rank0(model)
    replicated = [p for p in model.parameters() if p.ndim == 0]
    ignored = set(replicated)
    found = blocks(model, class_names)
    for block in found:
        fully_shard(block, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    fully_shard(root, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    return len(found), replicated


def average_replicated_grads(params: Iterable[nn.Parameter]) -> None:
    """All-reduce-mean the gradients of parameters FSDP2 left replicated (what DDP would do for them)."""
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(dist.get_world_size())


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is a DTensor (FSDP2 / tensor parallel)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


class _StateView(nn.Module):
    """What ``save_checkpoint`` needs from a model: ``state_dict()`` and ``config`` — here a gathered full state."""

    def __init__(self, state: dict[str, torch.Tensor], config: Any) -> None:
        super().__init__()
        object.__setattr__(self, "_state", state)
        object.__setattr__(self, "config", config)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self._state


class _OptimizerView:
    """What ``save_checkpoint`` needs from an optimizer: ``state_dict()`` in torch's index-keyed layout."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def gather_full_state(root: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
                      prefix: str = "model.") -> tuple[nn.Module | None, Any]:
    """Gather a sharded model's weights and optimizer state to rank 0 (a collective: call on every rank).

    Returns ``(model_view, optimizer_view)`` on rank 0 — objects ``save_checkpoint`` accepts in place of the
    model and the optimizer, holding full CPU tensors in the single-process layout — and ``(None, None)`` on the
    other ranks. ``prefix`` is the name of ``model`` inside ``root``.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(root, options=opts)
    osd = get_optimizer_state_dict(root, optimizer, options=opts)
    if dist.get_rank() != 0:
        return None, None
    weights = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in msd.items()}
    # FQN-keyed -> torch's index-keyed layout, in the optimizer's parameter order (= param_groups(model) order)
    state: dict[int, dict] = {}
    groups = []
    index = 0
    for live, saved in zip(optimizer.param_groups, osd["param_groups"]):
        ids = []
        for name in live["names"]:
            fqn = prefix + name
            if fqn in osd["state"]:
                state[index] = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                                for k, v in osd["state"][fqn].items()}
            ids.append(index)
            index += 1
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "names": list(live["names"]),
                       "params": ids})
    return _StateView(weights, getattr(model, "config", None)), _OptimizerView({"state": state,
                                                                                "param_groups": groups})


def load_sharded_optimizer(path: Any, root: nn.Module, optimizer: torch.optim.Optimizer,
                           prefix: str = "model.") -> None:
    """Load the optimizer state of a full-state checkpoint into the optimizer of a sharded ``root`` (every rank
    reads the file and keeps its own shard)."""
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from vlm_lab.train.checkpoint import CheckpointError, read_metadata

    meta = read_metadata(path)
    om = meta.get("optimizer") if meta else None
    if om is None:
        raise CheckpointError(f"checkpoint: {path} has no optimizer state (saved without an optimizer)")
    fqns = [prefix + n for g in optimizer.param_groups for n in g["names"]]
    state: dict[str, dict] = {}
    with safe_open(str(path), framework="pt") as f:
        for idx, plain in om["state"].items():
            state.setdefault(fqns[int(idx)], {}).update(plain)
        for key in f.keys():
            if key.startswith("optim/"):
                idx, name = key[len("optim/"):].split("/", 1)
                if int(idx) >= len(fqns):
                    raise CheckpointError(f"checkpoint: {path} has optimizer state for parameter {idx}, but the "
                                          f"optimizer has {len(fqns)} parameters")
                state.setdefault(fqns[int(idx)], {})[name] = f.get_tensor(key)
    if len(om["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(f"checkpoint: {path} has {len(om['param_groups'])} optimizer parameter groups, the "
                              f"optimizer {len(optimizer.param_groups)}")
    groups = []
    start = 0
    for saved, live in zip(om["param_groups"], optimizer.param_groups):
        n = len(live["params"])
        g = {k: (tuple(v) if k == "betas" and isinstance(v, list) else v) for k, v in saved.items()}
        g["params"] = fqns[start:start + n]
        start += n
        groups.append(g)
    set_optimizer_state_dict(root, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))
