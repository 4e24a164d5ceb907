"""Process-group helpers for data-parallel training (DDP) on raw ``torch.distributed``.

Everything here also works when nothing is initialised (one process): ``rank() == 0``, ``world_size() == 1``,
``is_main_process()`` is True, and ``setup()`` does nothing unless the process was started by ``torchrun``
(the environment variables ``RANK`` and ``WORLD_SIZE`` are set, with ``WORLD_SIZE > 1``).

A training script in the nanoGPT style::

    from vlm_lab.train import distributed, fit

    def main():
        with distributed.session():           # init_process_group under torchrun, destroy at exit
            fit(model, dataset, config)      # fit wraps the model in DDP when the group is initialised

    if __name__ == "__main__":
        main()

    # one process:   python train_script.py
    # two processes: torchrun --standalone --nproc_per_node=2 train_script.py

``spawn(fn, nprocs)`` starts ``nprocs`` local processes with an initialised gloo (CPU) group and runs
``fn(rank, *args)`` in each, which is how the tests check DDP against a single process (as the Annotated
Transformer launches workers with ``mp.spawn``). The contrastive gather-with-gradient lives in
``vlm_lab.losses.contrastive``; this module only manages processes.

Backends: ``nccl`` when CUDA is available, otherwise ``gloo`` (the one that runs on CPU and in CI).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "is_distributed", "rank", "world_size", "local_rank", "is_main_process", "launched_by_torchrun",
    "setup", "cleanup", "session", "unwrap", "barrier", "all_reduce_mean", "spawn", "default_backend",
]


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised (any world size)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Rank on this machine (``LOCAL_RANK`` set by torchrun; 0 otherwise); picks the CUDA device."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0; logging, progress bars and checkpoint writing happen only there."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when ``RANK`` and ``WORLD_SIZE`` are in the environment with ``WORLD_SIZE > 1``."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def default_backend() -> str:
    """``"nccl"`` when CUDA is available, otherwise ``"gloo"``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def setup(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Initialise the default process group from torchrun's environment, if there is one to initialise.

    Returns True when this call initialised the group (so the caller knows it should ``cleanup()``), False
    when the group was already initialised or the process was not launched by torchrun. On CUDA the current
    device is set to ``LOCAL_RANK``.
    """
    if is_distributed() or not launched_by_torchrun():
        return False
    if not dist.is_available():
        raise RuntimeError("setup: torch.distributed is not available in this PyTorch build")
    backend = backend or default_backend()
    if backend not in ("gloo", "nccl", "mpi", "ucc"):
        raise ValueError(f"backend: expected 'gloo', 'nccl', 'mpi' or 'ucc', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def cleanup() -> None:
    """Destroy the default process group if one is initialised (safe to call when none is)."""
    if is_distributed():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(backend: str | None = None) -> Iterator[None]:
    """``with session(): ...`` initialises the group under torchrun and destroys it on exit (if it made it)."""
    created = setup(backend)
    try:
        yield
        if created:
            dist.barrier()  # leave together (see _spawn_entry)
    finally:
        if created:
            cleanup()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / ``torch.compile`` / fit's forwarding wrapper (idempotent)."""
    seen = 0
    while seen < 10:
        seen += 1
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        elif getattr(model, "_vlm_lab_wrapper", False):  # fit's _Forward adapter
            model = model.model
        else:
            break
    return model


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (returns ``t`` itself when not distributed); the input is not modified."""
    if not is_distributed() or world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


# ------------------------------------------------------------------------------------------------ spawn


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(proc: int, fn: Callable[..., Any], nprocs: int, port: int, backend: str, args: tuple) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(proc),
                       "LOCAL_RANK": str(proc), "WORLD_SIZE": str(nprocs)})
    dist.init_process_group(backend=backend, rank=proc, world_size=nprocs,
                            timeout=datetime.timedelta(seconds=120))
    try:
        fn(proc, *args)
        # every rank leaves together: a rank that tears its gloo connections down while another is still inside
        # a collective (or flushing DDP's last bucket) makes the other abort ("terminate called without an
        # active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], nprocs: int = 2, args: tuple = (), backend: str = "gloo") -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` fresh local processes that share an initialised process group.

    ``fn`` must be importable (defined at module level), as ``torch.multiprocessing.spawn`` requires. An
    exception in any process is re-raised here. Binds only to 127.0.0.1.
    """
    if not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs: expected a positive integer, got {nprocs!r}")
    import torch.multiprocessing as mp

    mp.spawn(_spawn_entry, args=(fn, nprocs, _free_port(), backend, tuple(args)), nprocs=nprocs, join=True)
