"""`TrainConfig`: every knob of `vlm_lab.train.fit`, one typed dataclass (no globals, no exec'd config files).

Batch sizes: ``batch_size`` is the *micro-batch* one process feeds through one forward pass. One optimizer step
sees ``batch_size * grad_accum * world_size`` examples (open_clip's "effective batch = k * m * num_gpus").

Learning rate: linear warmup then cosine decay to ``lr * min_lr_ratio`` (see ``vlm_lab.train.fit.lr_factor``),
applied through ``torch.optim.lr_scheduler.LambdaLR``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["TrainConfig"]

_SCHEDULES = ("cosine", "constant")
_ACCUM_MODES = ("mean", "cache_features")
_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_PARALLEL = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """Settings of one `fit` run. Every field is checked when the config is made (errors name the field)."""

    # --- length of the run (give exactly one of steps / epochs)
    steps: int | None = None          # total optimizer steps (each step = grad_accum micro-batches)
    epochs: float | None = None       # or: passes over the data; steps = floor(epochs * batches per epoch / grad_accum)
    # --- batch and optimizer (AdamW)
    batch_size: int = 32              # micro-batch per process per forward (ignored when data yields ready batches)
    lr: float = 1e-3                  # peak learning rate, reached at the end of warmup
    weight_decay: float = 0.1         # decoupled decay on matrices only: no decay on biases, norms, embeddings,
                                      # logit_scale / logit_bias and other parameters with ndim < 2
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas (CLIP used 0.9, 0.98)
    eps: float = 1e-6                 # AdamW epsilon (CLIP used 1e-6)
    # --- learning-rate schedule
    warmup_steps: int = 0             # linear warmup: step s < warmup uses lr * (s + 1) / warmup_steps
    schedule: str = "cosine"          # "cosine" (decay to lr * min_lr_ratio at the last step) or "constant"
    min_lr_ratio: float = 0.0         # floor of the cosine as a fraction of lr
    # --- gradient accumulation
    grad_accum: int = 1               # micro-batches per optimizer step
    accum_mode: str = "mean"          # "mean": backward(loss / grad_accum) per micro-batch (exact for per-sample
                                      # losses); "cache_features": open_clip --accum-freq, exact for contrastive
                                      # losses (needs model.contrastive_features / model.contrastive_loss)
    grad_clip: float | None = None    # clip the global gradient L2 norm to this value (None = no clipping)
    # --- numerics and placement
    precision: str = "auto"           # "fp32" | "bf16" | "fp16" autocast (fp16 adds a GradScaler);
                                      # "auto" = bf16 on CUDA with bf16 support, else fp32 (always fp32 on CPU)
    seed: int = 0                     # seeds torch / numpy / random (+ rank) and the data order
    device: str = "auto"              # "auto" (cuda:LOCAL_RANK if available, else cpu), "cpu", "cuda", "cuda:1", ...
    # --- checkpoints
    out_dir: str | os.PathLike | None = None  # folder for step_XXXXXXXX.safetensors checkpoints (None = none written)
    checkpoint_every: int | None = 1000  # write a checkpoint every N steps (the last step is always written)
    keep_last: int | None = 2         # keep only the newest N step checkpoints in out_dir (None = keep all)
    resume: bool | str | os.PathLike = False  # True: continue from the latest checkpoint in out_dir (start fresh,
                                      # with a warning, if there is none); a path: continue from that file
    # --- logging
    log_every: int = 10               # PrintLogger / progress-bar update period in steps (history has every step)
    progress: bool = True             # tqdm.auto progress bar on rank 0 (TQDM_DISABLE=1 turns it off too)
    eval_every: int | None = None     # call eval_fn every N steps (it is always called at the end when given)
    # --- data loading (used when `data` is a map-style Dataset)
    num_workers: int = 0              # DataLoader worker processes
    collate_fn: Callable[[list], Any] | None = None  # turns a list of items into a batch dict (None = default_collate)
    shuffle: bool = True              # reshuffle every epoch with a generator seeded by (seed, epoch)
    drop_last: bool = True            # drop the last incomplete micro-batch of each epoch (keeps batch shapes fixed)
    # --- distributed
    ddp: bool | str = "auto"          # "auto": DDP when torch.distributed is initialised or under torchrun with
                                      # WORLD_SIZE > 1; True: require it; False: never wrap
    find_unused_parameters: bool = False  # passed to DistributedDataParallel (models with unused heads need True)
    parallel: str = "ddp"             # engine when distributed: "ddp" (a full replica per rank, gradients all-reduced)
                                      # or "fsdp" (FSDP2 fully_shard per block + root: parameters, gradients and
                                      # AdamW state sharded over ranks; see vlm_lab.train.parallel)
    # --- memory / speed switches (each keeps the fp32 loss within a stated tolerance, tests/test_scaling.py)
    activation_checkpointing: bool = False  # recompute each transformer block's activations in backward
    compile: bool | str = False       # torch.compile each block: True = "inductor", or a backend name ("aot_eager")

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer{' or None' if allow_none else ''}, got {value!r}")

        def number(name: str, value: Any, lo: float = 0.0, hi: float = math.inf, lo_open: bool = False) -> None:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
            if not ok:
                bound = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi != math.inf else "")
                raise ValueError(f"{name}: expected a finite number {bound}, got {value!r}")

        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"steps / epochs: give exactly one of them, got steps={self.steps!r}, epochs={self.epochs!r}")
        positive_int("steps", self.steps, allow_none=True)
        if self.epochs is not None:
            number("epochs", self.epochs, lo=0.0, lo_open=True)
        positive_int("batch_size", self.batch_size)
        number("lr", self.lr, lo=0.0, lo_open=True)
        number("weight_decay", self.weight_decay)
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2
                and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.betas)):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {self.betas!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        number("eps", self.eps, lo=0.0, lo_open=True)
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected an integer >= 0, got {self.warmup_steps!r}")
        if self.steps is not None and self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps: {self.warmup_steps} is more than steps={self.steps}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"schedule: expected one of {_SCHEDULES}, got {self.schedule!r}")
        number("min_lr_ratio", self.min_lr_ratio, hi=1.0)
        positive_int("grad_accum", self.grad_accum)
        if self.accum_mode not in _ACCUM_MODES:
            raise ValueError(f"accum_mode: expected one of {_ACCUM_MODES}, got {self.accum_mode!r}")
        if self.grad_clip is not None:
            number("grad_clip", self.grad_clip, lo=0.0, lo_open=True)
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision: expected one of {_PRECISIONS}, got {self.precision!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {self.seed!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}") from None
        if self.out_dir is not None and not isinstance(self.out_dir, (str, os.PathLike)):
            raise ValueError(f"out_dir: expected a folder path or None, got {self.out_dir!r}")
        positive_int("checkpoint_every", self.checkpoint_every, allow_none=True)
        positive_int("keep_last", self.keep_last, allow_none=True)
        if not isinstance(self.resume, (bool, str, os.PathLike)):
            raise ValueError(f"resume: expected True/False or a checkpoint path, got {self.resume!r}")
        if self.resume is True and self.out_dir is None:
            raise ValueError("resume: True means 'the latest checkpoint in out_dir', but out_dir is None")
        positive_int("log_every", self.log_every)
        positive_int("eval_every", self.eval_every, allow_none=True)
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers: expected an integer >= 0, got {self.num_workers!r}")
        if self.collate_fn is not None and not callable(self.collate_fn):
            raise ValueError(f"collate_fn: expected a callable or None, got {self.collate_fn!r}")
        if self.ddp not in ("auto", True, False):
            raise ValueError(f"ddp: expected 'auto', True or False, got {self.ddp!r}")
        if self.parallel not in _PARALLEL:
            raise ValueError(f"parallel: expected one of {_PARALLEL}, got {self.parallel!r}")
        if self.parallel == "fsdp" and self.precision == "fp16":
            raise ValueError("precision: 'fp16' with parallel='fsdp' is not supported (the GradScaler would need "
                             "a sharded inf check); use 'bf16'")
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError(f"activation_checkpointing: expected True or False, got {self.activation_checkpointing!r}")
        if not (isinstance(self.compile, bool) or (isinstance(self.compile, str) and self.compile)):
            raise ValueError(f"compile: expected True/False or a torch.compile backend name, got {self.compile!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (callables and paths as strings), stored in checkpoints."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if callable(v):
                v = getattr(v, "__qualname__", type(v).__qualname__)
            elif isinstance(v, os.PathLike):
                v = os.fspath(v)
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out
