"""`fit()`: the one training loop of VLM Lab, from a notebook cell on a laptop CPU to torchrun on GPUs.

    # a notebook cell / one CPU process
    result = fit(model, dataset, TrainConfig(steps=300, batch_size=64, lr=1e-3, collate_fn=collate))

    # a script (see vlm_lab.train.distributed for the main() pattern), one process:
    python my_train.py
    # the same script on 8 GPUs of one machine (DDP, nccl); on CPU torchrun uses gloo:
    torchrun --standalone --nproc_per_node=8 my_train.py

What one optimizer step does (nanoGPT's loop, open_clip's accumulation):

1. take ``grad_accum`` micro-batches of ``batch_size`` from the data stream (every Tensor moved to the device);
2. ``accum_mode="mean"``: per micro-batch ``loss = model(batch).loss``, ``backward(loss / grad_accum)``. Exact
   for losses that are means over examples (cross-entropy, MSE). Wrong for contrastive losses: each micro-batch
   only sees its own negatives (model-facts expert test 5).
   ``accum_mode="cache_features"`` (open_clip ``--accum-freq``): run the k micro-batches under ``no_grad`` and
   cache ``model.contrastive_features(batch)``; then for each micro-batch j recompute its features with grad,
   concatenate them with the *cached* features of the others (``cat(cached[:j] + [fresh] + cached[j+1:])``),
   compute the FULL-batch ``model.contrastive_loss(features)`` and ``backward()`` without dividing by k. The sum
   over j of the gradients through chunk j is the full-batch gradient. Exact when both forwards agree (no
   dropout, no BatchNorm statistics). One deliberate difference from open_clip: parameters the loss uses
   directly (``logit_scale``, ``logit_bias``) would receive the full-batch gradient k times (once per backward;
   harmless under Adam's scale invariance, but it inflates the norm seen by clipping); fit subtracts the k - 1
   extra copies with one more backward of ``-(k - 1) * loss(all cached features)``, so every gradient equals
   the big-batch gradient (tests/test_train.py checks this against a single batch of k * m);
3. optional gradient clipping (global L2 norm), ``AdamW.step()`` (through a GradScaler under fp16),
   ``LambdaLR.step()`` (linear warmup then cosine), then ``model.post_step()`` if the model has one (CLIP clamps
   ``logit_scale`` to [0, ln 100] there, after the step, as open_clip does).

Under DDP (torchrun, or an initialised process group) the model is wrapped in DistributedDataParallel, each rank
reads its shard through a DistributedSampler, gradients are synchronised only on the last micro-batch
(``no_sync`` on the others, in both accumulation modes), and only rank 0 shows progress, calls loggers and writes
checkpoints. The logged loss is the mean over ranks.

``parallel="fsdp"`` uses FSDP2 instead (`vlm_lab.train.parallel`): ``fully_shard`` on every transformer block and on
fit's forwarding wrapper (so the loss, and the cached-feature loss, run inside the root's ``__call__``); 0-dim
parameters (``logit_scale``) stay replicated with their gradients averaged by hand; gradient sync only on the
last micro-batch (``set_requires_gradient_sync``); checkpoints are gathered to rank 0 and written in the same
full-state safetensors layout, so any checkpoint resumes on any number of processes under either plan.
``activation_checkpointing=True`` recomputes each block in backward, ``compile=True`` compiles each block; both are
applied before sharding (torchtitan's order). ``eval_fn`` is not supported with FSDP (evaluate the checkpoint), and
after an FSDP fit the model's parameters stay DTensor shards: rebuild it from the checkpoint (``load_model``).

Resume is exact on one process: a checkpoint stores weights, optimizer, scheduler, GradScaler, the step, the
RNG states (torch as a uint8 tensor, numpy / python as JSON) and the data position (epoch + batch index in the
epoch, whose order is a pure function of (seed, epoch)), so stopping after step 5 and resuming gives the same
per-step losses as an uninterrupted run (tests/test_train.py). Exactness holds for map-style Datasets; for other
iterables fit re-iterates and skips the batches already used, which is exact only if their order does not
depend on the global RNG. Under DDP ranks > 0 are re-seeded from (seed, rank, step) on resume.

Shape letters: k = grad_accum micro-batches per step, m = batch_size (examples per micro-batch).

Step numbering: ``history[i]["step"]`` counts optimizer steps done (1 = the first); ``lr`` is the learning rate
that step used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from vlm_lab.train import distributed as D
from vlm_lab.train.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint
from vlm_lab.train.config import TrainConfig

__all__ = ["fit", "FitResult", "TrainState", "Callback", "PrintLogger", "LivePlot", "lr_factor", "param_groups",
           "seed_everything", "resolve_device", "ResumableSampler"]


# ------------------------------------------------------------------------------------------ results / state


@dataclass
class FitResult:
    """What `fit` returns."""

    history: list[dict[str, float]]      # one record per optimizer step run by this call (step, loss, loss_*, lr, time, ...)
    metrics: dict[str, float]            # the last eval_fn result ({} without eval_fn)
    step: int                            # optimizer steps done in total (including those before a resume)
    checkpoint: Path | None = None       # the last checkpoint written (None without out_dir)
    elapsed: float = 0.0                 # wall seconds of this call

    @property
    def final_loss(self) -> float:
        """The loss of the last step run (nan when no step ran)."""
        return self.history[-1]["loss"] if self.history else float("nan")


@dataclass
class TrainState:
    """What callbacks see. Setting ``should_stop = True`` ends the run after this step (a checkpoint is written)."""

    step: int                            # optimizer steps done
    total_steps: int                     # the run's length
    epoch: int                           # epoch of the next micro-batch
    record: dict[str, float]             # this step's history record
    history: list[dict[str, float]]      # all records of this call
    model: nn.Module                     # the unwrapped model
    optimizer: torch.optim.Optimizer
    scheduler: Any
    config: TrainConfig
    is_main: bool                        # rank 0 (callbacks that print or plot act only there)
    metrics: dict[str, float] = field(default_factory=dict)  # last eval_fn result
    should_stop: bool = False


class Callback:
    """Protocol of fit's callbacks; subclass and override what you need (both are no-ops here)."""

    def on_step_end(self, state: TrainState) -> None:
        """After every optimizer step (on every rank; check ``state.is_main`` before printing)."""

    def on_fit_end(self, state: TrainState) -> None:
        """Once, after the last step."""


class PrintLogger(Callback):
    """Prints one line every ``every`` steps (default: ``config.log_every``) on rank 0."""

    def __init__(self, every: int | None = None, file: Any = None) -> None:
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every: expected a positive integer or None, got {every!r}")
        self.every, self.file = every, file

    def _line(self, state: TrainState) -> str:
        r = state.record
        parts = [f"step {r['step']:>{len(str(state.total_steps))}}/{state.total_steps}", f"loss {r['loss']:.4f}"]
        parts += [f"{k} {v:.4f}" for k, v in r.items() if k.startswith(("loss_", "eval_"))]
        parts += [f"lr {r['lr']:.2e}", f"{r['time'] * 1000:.0f} ms/step"]
        return " | ".join(parts)

    def on_step_end(self, state: TrainState) -> None:
        every = self.every or state.config.log_every
        if state.is_main and (state.step % every == 0 or state.step == state.total_steps):
            print(self._line(state), file=self.file or sys.stdout, flush=True)


class LivePlot(Callback):
    """A live loss / learning-rate figure in a Jupyter notebook, redrawn in place every ``every`` steps.

    Uses one display handle (``IPython.display.display(..., display_id=True)`` then ``handle.update``), so the
    output cell holds one figure, not hundreds. Outside a Jupyter kernel (a script, the tests, a rank other than
    0) it only collects the history; ``figure()`` still draws it. ``backend``: "matplotlib" (a PNG, no pyplot
    state touched) or "plotly".
    """

    def __init__(self, every: int = 10, keys: Sequence[str] | None = None, backend: str = "matplotlib",
                 logy: bool = False) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected a positive integer, got {every!r}")
        if backend not in ("matplotlib", "plotly"):
            raise ValueError(f"backend: expected 'matplotlib' or 'plotly', got {backend!r}")
        self.every, self.keys, self.backend, self.logy = every, keys, backend, logy
        self.history: list[dict[str, float]] = []
        self._handle = None
        self._active: bool | None = None

    @staticmethod
    def _in_kernel() -> bool:
        try:
            from IPython import get_ipython
        except ImportError:
            return False
        ip = get_ipython()
        return ip is not None and getattr(ip, "kernel", None) is not None

    def _series(self) -> dict[str, tuple[list, list]]:
        keys = self.keys or sorted({k for r in self.history for k in r if k == "loss" or k.startswith(("loss_", "eval_"))})
        return {k: ([r["step"] for r in self.history if k in r], [r[k] for r in self.history if k in r]) for k in keys}

    def figure(self) -> Any:
        """The current figure (matplotlib ``Figure`` or plotly ``Figure``): losses left, learning rate right."""
        series = self._series()
        lr = ([r["step"] for r in self.history], [r["lr"] for r in self.history])
        if self.backend == "plotly":
            from plotly.subplots import make_subplots
            import plotly.graph_objects as go

            fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "learning rate"))
            for k, (x, y) in series.items():
                fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=k), row=1, col=1)
            fig.add_trace(go.Scatter(x=lr[0], y=lr[1], mode="lines", name="lr"), row=1, col=2)
            fig.update_xaxes(title_text="step")
            if self.logy:
                fig.update_yaxes(type="log", row=1, col=1)
            fig.update_layout(height=320, margin=dict(l=40, r=20, t=40, b=40))
            return fig
        from matplotlib.figure import Figure

        fig = Figure(figsize=(9, 3.2), layout="constrained")
        ax, ax_lr = fig.subplots(1, 2)
        for k, (x, y) in series.items():
            ax.plot(x, y, label=k)
        ax.set(xlabel="step", title="loss", yscale="log" if self.logy else "linear")
        if series:
            ax.legend(fontsize=8)
        ax_lr.plot(*lr)
        ax_lr.set(xlabel="step", title="learning rate")
        return fig

    def _render(self) -> Any:
        fig = self.figure()
        if self.backend == "plotly":
            return fig
        import io

        from IPython.display import Image
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        buf = io.BytesIO()
        FigureCanvasAgg(fig).print_png(buf)
        return Image(data=buf.getvalue(), format="png")

    def _draw(self) -> None:
        from IPython.display import display

        obj = self._render()
        if self._handle is None:
            self._handle = display(obj, display_id=True)
        else:
            self._handle.update(obj)

    def on_step_end(self, state: TrainState) -> None:
        if not state.is_main:
            return
        self.history.append(dict(state.record))
        if self._active is None:
            self._active = self._in_kernel()
        if self._active and (state.step % self.every == 0 or state.step == state.total_steps):
            self._draw()

    def on_fit_end(self, state: TrainState) -> None:
        if state.is_main and self._active and self.history:
            self._draw()


# ----------------------------------------------------------------------------------- schedule / optimizer


def lr_factor(step: int, *, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr used by optimizer step ``step`` (0-based), as open_clip's ``cosine_lr``.

    ``step < warmup``: ``(step + 1) / warmup``. After warmup, "cosine":
    ``r + (1 - r) * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))`` with ``r = min_lr_ratio``;
    "constant": 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"schedule: expected 'cosine' or 'constant', got {schedule!r}")
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


_NO_DECAY_TAGS = ("bias", "embed", "token", "logit", "norm")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on weight matrices only.

    No decay for: parameters with ndim < 2 (biases, norm scales, ``logit_scale``), parameters of
    ``nn.Embedding`` / norm layers, and parameters whose own name contains "bias", "embed", "token", "logit" or
    "norm" (position / class embeddings, learned query tokens, ``logit_bias``). Frozen parameters are left out.
    Each group carries a ``"names"`` list for inspection (the optimizer ignores it).
    """
    decay, no_decay, names_d, names_n, seen = [], [], [], [], set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            skip = (p.ndim < 2 or isinstance(module, (nn.Embedding, nn.EmbeddingBag))
                    or "Norm" in type(module).__name__ or any(t in pname.lower() for t in _NO_DECAY_TAGS))
            (no_decay if skip else decay).append(p)
            (names_n if skip else names_d).append(full)
    if not decay and not no_decay:
        raise ValueError("model: has no parameters that require grad; nothing to train")
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "names": names_d})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "names": names_n})
    return groups


# ----------------------------------------------------------------------------------------- environment


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"``: ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; anything else is parsed as given."""
    if name == "auto":
        return torch.device(f"cuda:{D.local_rank()}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} asked for, but CUDA is not available (use 'cpu' or 'auto')")
    return device


def _precision(name: str, device: torch.device) -> torch.dtype | None:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _rng_snapshot() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = s
    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    return tensors, plain


def _rng_restore(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    if "torch" in tensors:
        torch.set_rng_state(tensors["torch"])
    cuda = sorted((int(k.split("/")[1]), v) for k, v in tensors.items() if k.startswith("cuda/"))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([v for _, v in cuda])
    if "numpy" in plain:
        name, keys, pos, has_gauss, cached = plain["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "python" in plain:
        version, internal, gauss = plain["python"]
        random.setstate((version, tuple(internal), gauss))


# ----------------------------------------------------------------------------------------------- data


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (order = permutation seeded by seed + epoch, rank-strided) that can start mid-epoch.

    ``start`` is the number of this rank's indices to skip in the current epoch; with one process it is an
    ordinary seeded shuffler (``num_replicas=1, rank=0``, no process group needed).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


class _Stream:
    """An endless stream of micro-batches over epochs that knows its position (epoch, index in epoch)."""

    def __init__(self, data: Any, config: TrainConfig, rank: int, world: int) -> None:
        self.epoch, self.index, self._it = 0, 0, None
        self.cfg = config
        self.is_dataset = isinstance(data, Dataset) and not isinstance(data, IterableDataset) \
            and hasattr(data, "__len__") and hasattr(data, "__getitem__")
        if self.is_dataset:
            n = len(data)
            if n == 0:
                raise ValueError("data: the dataset is empty")
            self.sampler = ResumableSampler(data, num_replicas=world, rank=rank, shuffle=config.shuffle,
                                            seed=config.seed, drop_last=config.drop_last and world > 1)
            per_rank = self.sampler.num_samples
            self.per_epoch = per_rank // config.batch_size if config.drop_last else math.ceil(per_rank / config.batch_size)
            if self.per_epoch == 0:
                raise ValueError(f"batch_size: {config.batch_size} is larger than the {per_rank} examples each of the "
                                 f"{world} process(es) gets per epoch, and drop_last=True leaves no batch")
            self.generator = torch.Generator()
            self.loader = DataLoader(data, batch_size=config.batch_size, sampler=self.sampler,
                                     collate_fn=config.collate_fn, num_workers=config.num_workers,
                                     drop_last=config.drop_last, generator=self.generator,
                                     pin_memory=False)
        else:
            if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
                raise TypeError("data: expected a map-style torch Dataset (with collate_fn in the config) or an "
                                f"iterable of batch dicts such as a DataLoader, got {type(data).__name__}")
            self.loader = data
            self.one_shot = isinstance(data, Iterator)  # a generator / iterator cannot be restarted
            try:
                self.per_epoch = len(data)
            except TypeError:
                self.per_epoch = None

    def _start_epoch(self) -> None:
        if self.is_dataset:
            self.sampler.set_epoch(self.epoch)
            self.sampler.start = self.index * self.cfg.batch_size
            self.generator.manual_seed(self.cfg.seed * 1_000_003 + self.epoch)  # worker seeds, not the global RNG
            self._it = iter(self.loader)
            return
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        self._it = iter(self.loader)
        for _ in range(self.index):  # resuming an iterable: skip what was used
            next(self._it)

    def next(self) -> Any:
        if self._it is None:
            self._start_epoch()
        try:
            batch = next(self._it)
        except StopIteration:
            if not self.is_dataset and self.one_shot:
                raise RuntimeError(f"data: the iterator ran out after {self.index} batches; pass a re-iterable "
                                   "(a DataLoader, a list, a Dataset) or ask for fewer steps") from None
            self.epoch, self.index = self.epoch + 1, 0
            self._start_epoch()
            try:
                batch = next(self._it)
            except StopIteration:
                raise RuntimeError("data: an epoch yielded no batches") from None
        self.index += 1
        return batch


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and any(isinstance(v, (torch.Tensor, Mapping)) for v in batch):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


# ---------------------------------------------------------------------------------------------- model


class _Forward(nn.Module):
    """Routes ``forward(batch, method)`` to the model, so DDP hooks run for contrastive_features too."""

    _vlm_lab_wrapper = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any, method: str = "forward", cached: list | None = None, j: int = 0) -> Any:
        if method == "forward":
            return _no_view(self.model(batch))
        if method == "accumulated_loss":  # features of micro-batch j with grad, the others from the cache
            fresh = _check_features(self.model.contrastive_features(batch), "cache_features")
            if cached:
                if set(fresh) != set(cached[j]):
                    raise ValueError("cache_features: contrastive_features returned different keys with and "
                                     f"without grad: {sorted(fresh)} vs {sorted(cached[j])}")
                fresh = {key: torch.cat([fresh[key] if i == j else c[key] for i, c in enumerate(cached)])
                         for key in fresh}  # (k m, ...) full accumulated batch, grad through chunk j
            return _no_view(self.model.contrastive_loss(fresh))
        return _no_view(getattr(self.model, method)(batch))


def _no_view(out: Any) -> Any:
    """A loss or feature tensor that is a view is cloned (FSDP2 warns that in-place ops on a root output's view
    would drop its pre-backward hook; fit never does that, and a copy of a loss or of b x d features is cheap)."""
    if isinstance(out, Mapping):
        return {k: _no_view(v) for k, v in out.items()}
    if dataclasses.is_dataclass(out) and not isinstance(out, type):  # a model output (loss, logits, ...)
        views = {f.name: _no_view(getattr(out, f.name)) for f in dataclasses.fields(out)
                 if isinstance(getattr(out, f.name), torch.Tensor) and getattr(out, f.name)._base is not None}
        try:
            return dataclasses.replace(out, **views) if views else out
        except (TypeError, ValueError):  # a dataclass with init=False fields: leave it as it is
            return out
    return out.clone() if isinstance(out, torch.Tensor) and out._base is not None else out


def _loss_terms(out: Any, where: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, {"loss_*": scalar}) from a Tensor, a Mapping or an output object with a ``.loss``."""
    if isinstance(out, torch.Tensor):
        loss, items = out, {}
    elif isinstance(out, Mapping):
        loss, items = out.get("loss"), dict(out)
    else:
        loss = getattr(out, "loss", None)
        items = ({f.name: getattr(out, f.name) for f in dataclasses.fields(out)} if dataclasses.is_dataclass(out)
                 else dict(vars(out)) if hasattr(out, "__dict__") else {})
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"{where} must give a scalar loss tensor (a Tensor, or an output with .loss / ['loss']), "
                         f"got {type(loss).__name__ if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}")
    terms = {}
    for k, v in items.items():
        if k.startswith("loss_") and v is not None:
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                terms[k] = v.detach().float().reshape(())
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                terms[k] = torch.tensor(float(v))
    return loss.reshape(()), terms


def _check_features(feats: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(feats, Mapping) or not feats or not all(isinstance(v, torch.Tensor) for v in feats.values()):
        raise ValueError(f"{where}: model.contrastive_features(batch) must return a non-empty dict of tensors with the "
                         f"batch dimension first, got {type(feats).__name__}")
    return dict(feats)


# ------------------------------------------------------------------------------------------------ fit


def fit(model: nn.Module, data: Any, config: TrainConfig, *, callbacks: Sequence[Callback] = (),
        eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None) -> FitResult:
    """Train ``model`` on ``data`` as ``config`` says; see the module docstring for what a step does.

    Args:
        model: an ``nn.Module`` whose ``forward(batch)`` returns a scalar loss or an output with ``.loss`` (and
            optional ``loss_*`` terms, which are logged). For ``accum_mode="cache_features"`` it must also have
            ``contrastive_features(batch) -> dict`` and ``contrastive_loss(features) -> loss``. Moved to the
            device in place.
        data: a map-style ``torch.utils.data.Dataset`` (batched with ``config.batch_size`` and
            ``config.collate_fn``, shuffled by a seeded, resumable, distributed-aware sampler), or any
            re-iterable of ready batches (a DataLoader, a list of batch dicts).
        config: a ``TrainConfig``.
        callbacks: ``Callback`` objects (``PrintLogger()``, ``LivePlot()``, your own).
        eval_fn: ``eval_fn(model) -> {name: float}``, called in eval mode under ``no_grad`` every
            ``config.eval_every`` steps and at the end, on every rank (so it may use collectives); its values
            are logged as ``eval_<name>``.
    Returns:
        a ``FitResult`` (per-step history, final eval metrics, last checkpoint).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a vlm_lab.train.TrainConfig, got {type(config).__name__}")
    callbacks = list(callbacks)
    for cb in callbacks:
        if not (hasattr(cb, "on_step_end") or hasattr(cb, "on_fit_end")):
            raise TypeError(f"callbacks: {cb!r} has neither on_step_end nor on_fit_end")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"eval_fn: expected a callable or None, got {type(eval_fn).__name__}")
    raw = D.unwrap(model)
    cache_mode = config.accum_mode == "cache_features"
    if cache_mode and not (callable(getattr(raw, "contrastive_features", None))
                           and callable(getattr(raw, "contrastive_loss", None))):
        raise ValueError("accum_mode: 'cache_features' needs a model with contrastive_features(batch) and "
                         f"contrastive_loss(features); {type(raw).__name__} lacks them (use accum_mode='mean')")

    created_group = False
    if config.ddp in ("auto", True) and not D.is_distributed() and D.launched_by_torchrun():
        created_group = D.setup()
    if config.ddp is True and not (D.is_distributed() and D.world_size() > 1):
        raise RuntimeError("ddp: True, but no torch.distributed group with more than one process is initialised "
                           "(launch with torchrun, or call vlm_lab.train.distributed.setup())")
    try:
        return _fit(raw, data, config, callbacks, eval_fn, cache_mode)
    finally:
        if created_group:
            D.cleanup()


def _fit(raw: nn.Module, data: Any, cfg: TrainConfig, callbacks: list, eval_fn: Any, cache_mode: bool) -> FitResult:
    t_start = time.perf_counter()
    rank, world = D.rank(), D.world_size()
    is_main = rank == 0
    use_dist = cfg.ddp is not False and D.is_distributed() and world > 1
    use_ddp = use_dist and cfg.parallel == "ddp"
    use_fsdp = use_dist and cfg.parallel == "fsdp"
    if use_fsdp and eval_fn is not None:
        raise ValueError("eval_fn: not supported with parallel='fsdp' (the weights are sharded); evaluate the saved "
                         "checkpoint with load_model / load_checkpoint instead")
    device = resolve_device(cfg.device)
    amp_dtype = _precision(cfg.precision, device)
    seed_everything(cfg.seed + rank)

    raw.to(device)
    raw.train()
    from vlm_lab.train import parallel as P
    from vlm_lab.train.checkpoint import _registry_name

    model_name = _registry_name(raw)  # before FSDP2 swaps the class for FSDP<Class>
    if cfg.activation_checkpointing:
        P.apply_activation_checkpointing(raw)
    if cfg.compile:
        P.compile_blocks(raw, backend="inductor" if cfg.compile is True else cfg.compile)
    stream = _Stream(data, cfg, rank, world)
    k = cfg.grad_accum
    if cfg.steps is not None:
        total = cfg.steps
    else:
        if stream.per_epoch is None:
            raise ValueError("epochs: the data has no length, so epochs cannot be turned into steps; give steps")
        total = int(cfg.epochs * stream.per_epoch) // k
        if total < 1:
            raise ValueError(f"epochs: {cfg.epochs} epoch(s) of {stream.per_epoch} micro-batches with grad_accum={k} "
                             "is less than one optimizer step")
        if cfg.warmup_steps > total:
            raise ValueError(f"warmup_steps: {cfg.warmup_steps} is more than the {total} steps of {cfg.epochs} epoch(s)")

    resume_from = None
    if isinstance(cfg.resume, (str, os.PathLike)) and not isinstance(cfg.resume, bool):
        resume_from = Path(cfg.resume)
        if not resume_from.is_file():
            raise FileNotFoundError(f"resume: checkpoint {resume_from} does not exist")
    elif cfg.resume is True:
        if is_main and cfg.out_dir is not None:  # partial writes of a run killed mid-checkpoint (never loadable)
            for stale in Path(cfg.out_dir).glob(".step_*.safetensors.*.tmp"):
                with contextlib.suppress(OSError):
                    stale.unlink()
        resume_from = latest_checkpoint(cfg.out_dir)
        if resume_from is None:
            warnings.warn(f"resume: no step_*.safetensors checkpoint in {cfg.out_dir}; starting from scratch",
                          stacklevel=3)

    fwd: nn.Module = _Forward(raw)
    if use_fsdp:
        if resume_from is not None:  # full weights into the unsharded model; sharding then keeps each rank's part
            load_checkpoint(resume_from, raw)
        # blocks, then the root wrapper (its __call__ unshards the root's own parameters)
        _, replicated = P.shard_fsdp(fwd, raw)
    optimizer = torch.optim.AdamW(param_groups(raw, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    schedule = dict(total_steps=total, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule,
                    min_lr_ratio=cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, **schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    step, last_saved, last_ckpt = 0, -1, None
    if resume_from is not None:
        if use_fsdp:
            from vlm_lab.train.checkpoint import _read_tensors, read_metadata

            meta = read_metadata(resume_from)
            P.load_sharded_optimizer(resume_from, fwd, optimizer)
            if meta.get("scheduler") is None:
                raise ValueError(f"resume: {resume_from} has no scheduler state")
            scheduler.load_state_dict(meta["scheduler"])
            st = dict(meta.get("state", {}))
            st["rng_tensors"] = {k[len("rng/"):]: v for k, v in _read_tensors(resume_from).items()
                                 if k.startswith("rng/")} if rank == 0 else {}
        else:
            st = load_checkpoint(resume_from, raw, optimizer, scheduler)
        if "step" not in st or "data_epoch" not in st:
            raise ValueError(f"resume: {resume_from} is a weights-only checkpoint (no training state); load it with "
                             "load_checkpoint(path, model) and start a new run instead")
        step, last_saved, last_ckpt = int(st["step"]), int(st["step"]), resume_from
        stream.epoch, stream.index = int(st["data_epoch"]), int(st["data_index"])
        saved_cfg = st.get("train_config", {})
        for name, now in (("batch_size", cfg.batch_size), ("grad_accum", k)):
            if saved_cfg.get(name, now) != now:
                warnings.warn(f"resume: {name} was {saved_cfg[name]} in {resume_from}, now {now}; the data position "
                              "and the learning-rate schedule will not continue exactly", stacklevel=3)
        if st.get("world_size", world) != world:
            warnings.warn(f"resume: the checkpoint was written with {st['world_size']} process(es), now {world}; the "
                          "data order will not continue exactly", stacklevel=3)
        if st.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(st["scaler"])
        if rank == 0:
            _rng_restore(st["rng_tensors"], st.get("rng", {}))
        else:
            seed_everything((cfg.seed + 1_000_003 * rank + 7919 * step) % 2**63)

    if use_ddp:
        fwd = nn.parallel.DistributedDataParallel(
            fwd, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters)

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    def sync_context(j: int):
        if use_fsdp:  # FSDP2: accumulate unsharded gradients, reduce-scatter on the last micro-batch only
            fwd.set_requires_gradient_sync(j == k - 1)
        return fwd.no_sync() if use_ddp and j < k - 1 else contextlib.nullcontext()

    def save(at: int) -> Path | None:
        if cfg.out_dir is None:
            return None
        model_out, optim_out = raw, optimizer
        if use_fsdp:  # a collective: every rank sends its shards, rank 0 receives the full state
            model_out, optim_out = P.gather_full_state(fwd, raw, optimizer)
        if not is_main:
            return None
        rng_tensors, rng_plain = _rng_snapshot()
        state = {"step": at, "data_epoch": stream.epoch, "data_index": stream.index, "rng": rng_plain,
                 "train_config": cfg.to_dict(), "world_size": world, "parallel": cfg.parallel if use_dist else None,
                 "scaler": scaler.state_dict() if scaler.is_enabled() else None}
        path = save_checkpoint(checkpoint_path(cfg.out_dir, at), model_out, optim_out, scheduler, state,
                               rng_tensors=rng_tensors, model_name=model_name)
        if cfg.keep_last is not None:
            old = sorted(p for p in Path(cfg.out_dir).glob("step_*.safetensors") if p != path)
            for p in old[:max(0, len(old) - (cfg.keep_last - 1))]:
                with contextlib.suppress(OSError):
                    p.unlink()
        return path

    def evaluate() -> dict[str, float]:
        raw.eval()
        try:
            with torch.no_grad():
                metrics = eval_fn(raw)
        finally:
            raw.train()
        if not isinstance(metrics, Mapping):
            raise TypeError(f"eval_fn: must return a dict of name -> float, got {type(metrics).__name__}")
        return {str(name): float(v) for name, v in metrics.items()}

    history: list[dict[str, float]] = []
    metrics: dict[str, float] = {}
    state = TrainState(step=step, total_steps=total, epoch=stream.epoch, record={}, history=history, model=raw,
                       optimizer=optimizer, scheduler=scheduler, config=cfg, is_main=is_main)
    bar = None
    if cfg.progress and is_main and step < total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc="fit", dynamic_ncols=True, leave=True)
    try:
        while step < total:
            t0 = time.perf_counter()
            lr_now = optimizer.param_groups[0]["lr"]
            micro = [_to_device(stream.next(), device) for _ in range(k)]
            optimizer.zero_grad(set_to_none=True)
            logged_loss = torch.zeros((), device=device)
            logged_terms: dict[str, torch.Tensor] = {}
            if cache_mode:
                cached: list[dict[str, torch.Tensor]] = []
                if k > 1:
                    with torch.no_grad(), autocast():
                        cached = [_check_features(fwd(b, "contrastive_features"), "cache_features") for b in micro]
                    # Parameters the loss uses directly (logit_scale) get the full-batch gradient from every one
                    # of the k backward passes below; remove the k - 1 extra copies up front (open_clip keeps them).
                    with sync_context(0):
                        with autocast():
                            full = {key: torch.cat([c[key] for c in cached]) for key in cached[0]}  # (k m, ...)
                            direct, _ = _loss_terms(fwd(full, "contrastive_loss"), "model.contrastive_loss(features)")
                        if direct.requires_grad:
                            scaler.scale(direct * -(k - 1)).backward()
                for j, batch in enumerate(micro):
                    with sync_context(j):
                        with autocast():  # the loss runs inside the wrapper's forward (FSDP2 needs the root call)
                            loss, terms = _loss_terms(fwd(batch, "accumulated_loss", cached, j),
                                                      "model.contrastive_loss(features)")
                        scaler.scale(loss).backward()
                    logged_loss, logged_terms = loss.detach().float(), terms  # same full-batch value for every j
            else:
                for j, batch in enumerate(micro):
                    with sync_context(j):
                        with autocast():
                            loss, terms = _loss_terms(fwd(batch), "model(batch)")
                        scaler.scale(loss / k).backward()
                    logged_loss = logged_loss + loss.detach().float() / k
                    for name, v in terms.items():
                        logged_terms[name] = logged_terms.get(name, 0.0) + v.to(device) / k

            if use_fsdp:
                P.average_replicated_grads(replicated)  # 0-dim parameters (logit_scale) FSDP2 cannot shard
            # Check the loss BEFORE the optimizer step, so a non-finite loss leaves the weights in memory (and the
            # checkpoints on disk) as they were after the last good step.
            names = sorted(logged_terms)
            vec = torch.stack([logged_loss] + [logged_terms[n].to(device).reshape(()) for n in names])
            vec = D.all_reduce_mean(vec).tolist()
            if not math.isfinite(vec[0]):
                optimizer.zero_grad(set_to_none=True)
                raise FloatingPointError(f"loss is {vec[0]} at step {step + 1}; the weights are left as after step "
                                         f"{step}. Lower lr, enable grad_clip, or use precision='fp32'/'bf16' "
                                         "instead of 'fp16'")
            grad_norm = None
            if cfg.grad_clip is not None:
                scaler.unscale_(optimizer)
                params = [p for g in optimizer.param_groups for p in g["params"]]
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
                    grad_norm = grad_norm.full_tensor()
            scaler.step(optimizer)
            scaler.update()
            with warnings.catch_warnings():  # fp16: a step the GradScaler skipped (inf/nan grads) still advances the
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")  # schedule
                scheduler.step()
            if callable(getattr(raw, "post_step", None)):
                raw.post_step()
            step += 1

            record: dict[str, float] = {"step": step, "epoch": stream.epoch, "loss": vec[0]}
            record.update(dict(zip(names, vec[1:])))
            record["lr"] = lr_now
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            if eval_fn is not None and cfg.eval_every is not None and step % cfg.eval_every == 0 and step < total:
                metrics = evaluate()
                record.update({f"eval_{n}": v for n, v in metrics.items()})
            record["time"] = time.perf_counter() - t0
            history.append(record)

            state.step, state.epoch, state.record, state.metrics = step, stream.epoch, record, metrics
            for cb in callbacks:
                if hasattr(cb, "on_step_end"):
                    cb.on_step_end(state)
            stop = state.should_stop
            if use_dist:  # every rank must agree to stop, or the others would wait forever
                flag = torch.tensor([1.0 if stop else 0.0], device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                stop = bool(flag.item() > 0)
            if bar is not None:
                bar.update(1)
                if step % cfg.log_every == 0 or step == total:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr_now:.2e}", refresh=False)
            if cfg.checkpoint_every is not None and step % cfg.checkpoint_every == 0 and step < total and not stop:
                last_ckpt, last_saved = save(step) or last_ckpt, step
            if stop:
                break
    finally:
        if bar is not None:
            bar.close()

    if eval_fn is not None:
        metrics = evaluate()
        if history:
            history[-1].update({f"eval_{n}": v for n, v in metrics.items()})
    if cfg.out_dir is not None and step != last_saved:
        last_ckpt = save(step) or last_ckpt
    D.barrier()
    state.metrics = metrics
    for cb in callbacks:
        if hasattr(cb, "on_fit_end"):
            cb.on_fit_end(state)
    return FitResult(history=history, metrics=metrics, step=step, checkpoint=last_ckpt,
                     elapsed=time.perf_counter() - t_start)
