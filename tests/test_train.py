"""Tests of vlm_lab.train.fit: convergence, schedule, both accumulation modes (expert test 5), clipping, the
post-step hook (expert test 3's clamp), exact resume, config validation, and DDP on two gloo processes.

The models are tiny and defined here, so these tests do not depend on vlm_lab.models:
`Regressor` (an MLP with an MSE loss, optional dropout) and `ToyCLIP` (two Linear towers, a learned
logit_scale, a symmetric InfoNCE written out below, the feature-cache protocol and a post_step clamp).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from vlm_lab.train import Callback, PrintLogger, LivePlot, TrainConfig, fit, lr_factor, param_groups
from vlm_lab.train import distributed as D
from vlm_lab.train.checkpoint import latest_checkpoint


# ------------------------------------------------------------------------------------------ toy models


@dataclass
class Out:
    loss: torch.Tensor
    loss_mse: torch.Tensor | None = None


class Regressor(nn.Module):
    def __init__(self, d_in: int = 5, hidden: int = 7, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(d_in, hidden), nn.Linear(hidden, 1), nn.Dropout(dropout)

    def forward(self, batch: dict) -> Out:
        pred = self.fc2(self.drop(torch.tanh(self.fc1(batch["x"])))).squeeze(-1)  # (B,)
        mse = F.mse_loss(pred, batch["y"])
        return Out(loss=mse, loss_mse=mse)


def info_nce(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    logits = scale * img @ txt.T  # (B, B)
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class ToyCLIP(nn.Module):
    def __init__(self, d_img: int = 6, d_txt: int = 4, d: int = 5, use_lab_loss: bool = False) -> None:
        super().__init__()
        self.image_tower, self.text_tower = nn.Linear(d_img, d), nn.Linear(d_txt, d)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.use_lab_loss, self.post_step_calls = use_lab_loss, 0

    def contrastive_features(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"image_embeds": F.normalize(self.image_tower(batch["image"]), dim=-1),
                "text_embeds": F.normalize(self.text_tower(batch["text"]), dim=-1)}

    def contrastive_loss(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.use_lab_loss:  # the lead's loss: gathers across ranks with gradient under torch.distributed
            from vlm_lab.losses.contrastive import clip_loss

            return clip_loss(f["image_embeds"], f["text_embeds"], self.logit_scale.exp())
        return info_nce(f["image_embeds"], f["text_embeds"], self.logit_scale.exp())

    def forward(self, batch: dict) -> Out:
        return Out(loss=self.contrastive_loss(self.contrastive_features(batch)))

    def post_step(self) -> None:
        self.post_step_calls += 1
        with torch.no_grad():
            self.logit_scale.clamp_(0, math.log(100))


class DictDataset(Dataset):
    """Map-style dataset of dict items; `noise` adds numpy and python randomness to test RNG restore."""

    def __init__(self, n: int, kind: str = "regression", noise: bool = False, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.kind, self.noise = kind, noise
        if kind == "regression":
            self.x = torch.randn(n, 5, generator=g)
            self.y = self.x @ torch.linspace(-1, 1, 5) + 0.3
        else:
            self.image, self.text = torch.randn(n, 6, generator=g), torch.randn(n, 4, generator=g)

    def __len__(self) -> int:
        return len(self.x) if self.kind == "regression" else len(self.image)

    def __getitem__(self, i: int) -> dict:
        if self.kind == "regression":
            x = self.x[i]
            if self.noise:
                x = x + float(np.random.normal()) * 0.01 + (random.random() - 0.5) * 0.01
            return {"x": x, "y": self.y[i]}
        return {"image": self.image[i], "text": self.text[i]}


def cfg(**kw) -> TrainConfig:
    base = dict(steps=5, batch_size=8, lr=1e-2, weight_decay=0.0, progress=False, device="cpu", precision="fp32",
                shuffle=False)
    base.update(kw)
    return TrainConfig(**base)


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class GradSnapshot(Callback):
    """Records every parameter's gradient after the first optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_step_end(self, state) -> None:
        if state.step == 1:
            self.grads = {n: p.grad.detach().clone() for n, p in state.model.named_parameters()}


# ------------------------------------------------------------------------------------------ basics


def test_overfits_one_batch_and_logs_terms():
    torch.manual_seed(0)
    model = Regressor()
    ds = DictDataset(16)
    batch = {"x": ds.x, "y": ds.y}
    result = fit(model, [batch], cfg(steps=150, lr=3e-2, schedule="constant"))
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < 0.02 * losses[0]
    assert set(result.history[0]) >= {"step", "loss", "loss_mse", "lr", "time", "epoch"}
    assert result.history[0]["loss_mse"] == pytest.approx(result.history[0]["loss"])
    assert [r["step"] for r in result.history] == list(range(1, 151))


def test_contrastive_loss_decreases():
    torch.manual_seed(0)
    model = ToyCLIP()
    result = fit(model, DictDataset(16, kind="pairs"), cfg(steps=60, batch_size=16, lr=5e-2, schedule="constant"))
    assert result.history[-1]["loss"] < 0.5 * result.history[0]["loss"]


def test_lr_warmup_then_cosine():
    kw = dict(total_steps=10, warmup_steps=4, min_lr_ratio=0.1)
    assert lr_factor(0, **kw) == pytest.approx(0.25)
    assert lr_factor(3, **kw) == pytest.approx(1.0)
    assert lr_factor(4, **kw) == pytest.approx(1.0)          # cosine starts at its peak
    assert lr_factor(7, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert lr_factor(10, **kw) == pytest.approx(0.1)
    assert lr_factor(7, **kw, schedule="constant") == 1.0
    torch.manual_seed(0)
    result = fit(Regressor(), DictDataset(16), cfg(steps=10, warmup_steps=4, min_lr_ratio=0.1, lr=2.0, batch_size=4))
    lrs = [r["lr"] for r in result.history]
    expected = [2.0 * lr_factor(s, **kw) for s in range(10)]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_weight_decay_groups():
    model = ToyCLIP()
    model.norm = nn.LayerNorm(5)
    model.embed = nn.Embedding(3, 5)
    groups = param_groups(model, 0.1)
    decayed = set(groups[0]["names"])
    assert decayed == {"image_tower.weight", "text_tower.weight"}
    assert {"logit_scale", "image_tower.bias", "norm.weight", "embed.weight"} <= set(groups[1]["names"])
    assert groups[1]["weight_decay"] == 0.0


def test_grad_accum_mean_equals_big_batch_for_per_sample_loss():
    ds = DictDataset(48)
    torch.manual_seed(0)
    a = Regressor()
    b = Regressor()
    b.load_state_dict(a.state_dict())
    ra = fit(a, ds, cfg(steps=3, batch_size=8, grad_accum=3))
    rb = fit(b, ds, cfg(steps=3, batch_size=24, grad_accum=1))
    for k, v in params(a).items():
        torch.testing.assert_close(v, params(b)[k], atol=1e-6, rtol=1e-5)
    assert [r["loss"] for r in ra.history] == pytest.approx([r["loss"] for r in rb.history], abs=1e-6)


def _one_step_grads(model: nn.Module, batch_size: int, grad_accum: int, mode: str) -> tuple[dict, float]:
    snap = GradSnapshot()
    result = fit(model, DictDataset(12, kind="pairs"),
                 cfg(steps=1, batch_size=batch_size, grad_accum=grad_accum, accum_mode=mode), callbacks=[snap])
    return snap.grads, result.history[0]["loss"]


def test_cache_features_accumulation_equals_big_batch_and_mean_does_not():
    """Expert test 5: feature caching over k=3 micro-batches of 4 == one batch of 12; naive averaging differs."""
    torch.manual_seed(0)
    base = ToyCLIP()

    def clone() -> ToyCLIP:
        m = ToyCLIP()
        m.load_state_dict(base.state_dict())
        return m

    big_model, cache_model, mean_model = clone(), clone(), clone()
    g_big, loss_big = _one_step_grads(big_model, 12, 1, "mean")
    g_cache, loss_cache = _one_step_grads(cache_model, 4, 3, "cache_features")
    g_mean, loss_mean = _one_step_grads(mean_model, 4, 3, "mean")
    assert loss_cache == pytest.approx(loss_big, abs=1e-6)
    for name in g_big:  # logit_scale included: its gradient is counted once, not k times
        torch.testing.assert_close(g_cache[name], g_big[name], atol=1e-6, rtol=1e-5)
    for k, v in params(cache_model).items():
        torch.testing.assert_close(v, params(big_model)[k], atol=1e-6, rtol=1e-5)
    assert abs(loss_mean - loss_big) > 1e-3  # fewer negatives per micro-batch: a smaller loss
    assert max((g_mean[n] - g_big[n]).abs().max().item() for n in g_big) > 1e-3


def test_cache_features_needs_the_protocol():
    with pytest.raises(ValueError, match="contrastive_features"):
        fit(Regressor(), DictDataset(16), cfg(accum_mode="cache_features", grad_accum=2))


def test_grad_clip_limits_the_global_norm():
    class Norm(Callback):
        def on_step_end(self, state):
            self.after = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in state.model.parameters()])).item()
            self.before = state.record["grad_norm"]

    torch.manual_seed(0)
    probe = Norm()
    ds = DictDataset(16)
    ds.y = ds.y * 100  # big residuals, big gradients
    fit(Regressor(), ds, cfg(steps=1, grad_clip=0.5), callbacks=[probe])
    assert probe.before > 0.5
    assert probe.after == pytest.approx(0.5, rel=1e-4)


def test_post_step_is_called_after_every_step_and_clamps():
    """Expert test 3: an optimizer step pushing logit_scale past ln(100) is undone by the post-step clamp."""
    torch.manual_seed(0)
    model = ToyCLIP()
    with torch.no_grad():
        model.logit_scale.fill_(5.0)
    class Scale(Callback):
        values: list = []

        def on_step_end(self, state):
            self.values.append(state.model.logit_scale.item())

    probe = Scale()
    fit(model, DictDataset(16, kind="pairs"), cfg(steps=3, batch_size=8), callbacks=[probe])
    assert model.post_step_calls == 3
    assert probe.values[0] == pytest.approx(math.log(100))  # the step left it near 4.99; the clamp caps it
    assert all(v <= math.log(100) + 1e-6 for v in probe.values)


def test_callbacks_stop_and_loggers(capsys):
    class StopAt(Callback):
        def on_step_end(self, state):
            state.should_stop = state.step == 3

    torch.manual_seed(0)
    plot = LivePlot(every=1)
    result = fit(Regressor(), DictDataset(16), cfg(steps=10, batch_size=4, log_every=2),
                 callbacks=[StopAt(), PrintLogger(), plot])
    assert result.step == 3 and len(result.history) == 3
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("step  2/10 | loss")
    assert plot._handle is None and len(plot.history) == 3  # not in a kernel: no display, history kept
    fig = plot.figure()
    assert len(fig.axes) == 2


def test_resume_reproduces_the_uninterrupted_run_exactly(run_dir):
    """10 steps straight == 5 steps, stop, resume into a differently initialised model, 5 more (bitwise)."""
    ds = DictDataset(48, noise=True)  # 6 micro-batches per epoch: step 5 stops mid-epoch, step 7 is in epoch 1
    config = dict(steps=10, batch_size=8, shuffle=True, warmup_steps=2, weight_decay=0.05, seed=3)

    torch.manual_seed(0)
    straight = fit(Regressor(dropout=0.3), ds, cfg(**config))

    class StopAt5(Callback):
        def on_step_end(self, state):
            state.should_stop = state.step == 5

    torch.manual_seed(0)
    first = fit(Regressor(dropout=0.3), ds, cfg(**config, out_dir=run_dir, checkpoint_every=5), callbacks=[StopAt5()])
    assert first.step == 5 and latest_checkpoint(run_dir).name == "step_00000005.safetensors"
    random.random(), np.random.rand(), torch.rand(3)  # disturb every global RNG before resuming

    torch.manual_seed(123)
    model = Regressor(dropout=0.3)
    resumed = fit(model, ds, cfg(**config, out_dir=run_dir, checkpoint_every=5, resume=True))
    assert [r["step"] for r in resumed.history] == list(range(6, 11))
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history[5:]]
    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in straight.history[5:]]
    assert resumed.checkpoint.name == "step_00000010.safetensors"


def test_resume_options(run_dir):
    with pytest.warns(UserWarning, match="starting from scratch"):
        fit(Regressor(), DictDataset(16), cfg(steps=2, out_dir=run_dir, resume=True))
    assert sorted(p.name for p in run_dir.iterdir()) == ["step_00000002.safetensors"]
    with pytest.raises(FileNotFoundError, match="resume"):
        fit(Regressor(), DictDataset(16), cfg(resume=run_dir / "nope.safetensors"))
    # keep_last prunes older step checkpoints
    fit(Regressor(), DictDataset(16), cfg(steps=6, out_dir=run_dir / "k", checkpoint_every=1, keep_last=2))
    assert sorted(p.name for p in (run_dir / "k").iterdir()) == ["step_00000005.safetensors",
                                                                  "step_00000006.safetensors"]


@pytest.mark.parametrize("field,value,match", [
    ("steps", 0, "steps"), ("lr", -1.0, "lr"), ("accum_mode", "sum", "accum_mode"), ("precision", "fp8", "precision"),
    ("schedule", "linear", "schedule"), ("grad_accum", 0, "grad_accum"), ("betas", (0.9, 1.5), "betas"),
    ("grad_clip", 0.0, "grad_clip"), ("ddp", "yes", "ddp"), ("warmup_steps", 9, "warmup_steps"),
])
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"steps": 5, field: value})


def test_config_needs_exactly_one_length_and_data_errors():
    with pytest.raises(ValueError, match="exactly one"):
        TrainConfig()
    with pytest.raises(ValueError, match="out_dir"):
        TrainConfig(steps=1, resume=True)
    with pytest.raises(ValueError, match="batch_size"):
        fit(Regressor(), DictDataset(4), cfg(batch_size=8))
    with pytest.raises(RuntimeError, match="ran out"):
        fit(Regressor(), iter([{"x": torch.randn(4, 5), "y": torch.randn(4)}]), cfg(steps=3))
    result = fit(Regressor(), DictDataset(16), cfg(steps=None, epochs=2, batch_size=4, grad_accum=2))
    assert result.step == 4 and result.history[-1]["epoch"] == 1


# ------------------------------------------------------------------------------------------ DDP (2 gloo ranks)


def _ddp_worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Regressor()
    fit(model, DictDataset(32), cfg(steps=3, batch_size=4, grad_accum=2))
    torch.manual_seed(0)
    clip = ToyCLIP(use_lab_loss=True)
    fit(clip, DictDataset(32, kind="pairs"), cfg(steps=2, batch_size=4, grad_accum=2, accum_mode="cache_features"))
    if rank == 0:
        save_file({f"reg.{k}": v.contiguous() for k, v in model.state_dict().items()}
                  | {f"clip.{k}": v.contiguous() for k, v in clip.state_dict().items()}, f"{out_dir}/rank0.safetensors")


def test_ddp_two_processes_match_one_process_on_the_concatenated_batch(tmp_path):
    """2 ranks x (4 x 2 accumulated) == 1 process x (8 x 2): DDP averaging, DistributedSampler sharding,
    no_sync accumulation, and cache_features through the lab's gather-with-grad clip_loss."""
    D.spawn(_ddp_worker, nprocs=2, args=(str(tmp_path),))
    got = load_file(str(tmp_path / "rank0.safetensors"))

    torch.manual_seed(0)
    model = Regressor()
    fit(model, DictDataset(32), cfg(steps=3, batch_size=8, grad_accum=2))
    torch.manual_seed(0)
    clip = ToyCLIP(use_lab_loss=True)
    fit(clip, DictDataset(32, kind="pairs"), cfg(steps=2, batch_size=8, grad_accum=2, accum_mode="cache_features"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[f"reg.{k}"], v, atol=1e-5, rtol=1e-5)
    for k, v in clip.state_dict().items():
        torch.testing.assert_close(got[f"clip.{k}"], v, atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    assert not torch.allclose(got["clip.image_tower.weight"], ToyCLIP().image_tower.weight)  # it did train


def test_liveplot_updates_one_display_handle_in_a_kernel(monkeypatch):
    import IPython.display

    shown, updates = [], []

    class Handle:
        def update(self, obj):
            updates.append(obj)

    def fake_display(obj, display_id=False):
        shown.append(obj)
        return Handle()

    monkeypatch.setattr(IPython.display, "display", fake_display)
    monkeypatch.setattr(LivePlot, "_in_kernel", staticmethod(lambda: True))
    torch.manual_seed(0)
    plot = LivePlot(every=2)
    fit(Regressor(), DictDataset(16), cfg(steps=5, batch_size=4), callbacks=[plot])
    assert len(shown) == 1 and len(updates) == 3  # drawn at steps 2, 4, 5 and at the end: one output, updated
    assert shown[0].data[:8] == b"\x89PNG\r\n\x1a\n"
    fig = LivePlot(backend="plotly")
    fig.history = plot.history
    assert {t.name for t in fig.figure().data} == {"loss", "loss_mse", "lr"}


def test_eval_fn_runs_in_eval_mode_every_n_steps_and_at_the_end():
    calls = []

    def eval_fn(model):
        calls.append((model.training, torch.is_grad_enabled()))
        return {"acc": float(len(calls))}

    torch.manual_seed(0)
    result = fit(Regressor(), DictDataset(16), cfg(steps=5, batch_size=4, eval_every=2), eval_fn=eval_fn)
    assert calls == [(False, False)] * 3  # steps 2, 4 and the end
    assert result.metrics == {"acc": 3.0}
    assert result.history[1]["eval_acc"] == 1.0 and result.history[-1]["eval_acc"] == 3.0
    with pytest.raises(TypeError, match="eval_fn"):
        fit(Regressor(), DictDataset(16), cfg(steps=1, batch_size=4), eval_fn=lambda m: 0.5)
