"""Tests of vlm_lab.train.checkpoint: round trips, atomic writes, refusal of files that are not safetensors
checkpoints (pickles, random bytes, truncated files, wrong shapes, missing / unexpected keys), and rebuilding a
model through the registry.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys
import types

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from vlm_lab.train import checkpoint as C
from vlm_lab.train.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, load_model, read_metadata,
                                      save_checkpoint)


@dataclasses.dataclass
class TinyConfig:
    d_in: int = 5
    hidden: int = 7
    tie: bool = False


class Tiny(nn.Module):
    def __init__(self, config: TinyConfig | None = None) -> None:
        super().__init__()
        self.config = config or TinyConfig()
        self.fc1 = nn.Linear(self.config.d_in, self.config.hidden)
        self.norm = nn.LayerNorm(self.config.hidden)
        self.fc2 = nn.Linear(self.config.hidden, self.config.hidden)
        if self.config.tie:
            self.fc2.weight = self.fc1.weight if self.config.d_in == self.config.hidden else self.fc2.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.fc1(x))).pow(2).mean()


def trained(seed: int = 0, steps: int = 3):
    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 5)).backward()
        opt.step()
        sched.step()
    return model, opt, sched


def test_round_trip_model_optimizer_scheduler_and_state(tmp_path):
    model, opt, sched = trained()
    rng = torch.get_rng_state()
    path = save_checkpoint(tmp_path / "c.safetensors", model, opt, sched, {"step": 3, "note": [1, 2.5]},
                           rng_tensors={"torch": rng})
    model2, opt2, sched2 = trained(seed=1, steps=1)
    state = load_checkpoint(path, model2, opt2, sched2)
    assert state["step"] == 3 and state["note"] == [1, 2.5]
    assert state["rng_tensors"]["torch"].dtype == torch.uint8 and torch.equal(state["rng_tensors"]["torch"], rng)
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for name, v in s1["state"][i].items():
            assert torch.equal(s2["state"][i][name], v), (i, name)
    assert sched2.state_dict() == sched.state_dict()
    # the next step is identical for the original and the restored pair
    x = torch.randn(4, 5)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).backward()
        o.step()
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v)


def test_metadata_and_tied_weights_stored_once(tmp_path):
    model = Tiny(TinyConfig(d_in=7, hidden=7, tie=True))
    assert model.fc1.weight is model.fc2.weight
    path = save_checkpoint(tmp_path / "tied.safetensors", model, state={"model": "tiny"})
    meta = read_metadata(path)
    assert meta["model"] == "tiny" and meta["config"] == {"d_in": 7, "hidden": 7, "tie": True}
    assert meta["aliases"] == {"fc2.weight": "fc1.weight"}
    fresh = Tiny(TinyConfig(d_in=7, hidden=7, tie=True))
    load_checkpoint(path, fresh)
    assert torch.equal(fresh.fc2.weight, model.fc1.weight)


def test_load_model_rebuilds_through_the_registry(tmp_path, monkeypatch):
    registry = types.ModuleType("vlm_lab.models.registry")
    registry.model_from_dict = lambda name, cfg: {"tiny": Tiny}[name](TinyConfig(**cfg))
    registry.MODELS = {"tiny": (Tiny, TinyConfig)}
    monkeypatch.setitem(sys.modules, "vlm_lab.models.registry", registry)
    model = Tiny(TinyConfig(hidden=9))
    path = save_checkpoint(tmp_path / "m.safetensors", model)  # name found in MODELS by class
    rebuilt = load_model(path)
    assert isinstance(rebuilt, Tiny) and rebuilt.config.hidden == 9 and not rebuilt.training
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v)
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain))
    with pytest.raises(CheckpointError, match="registry model name"):
        load_model(plain)


def test_plain_safetensors_weights_load(tmp_path):
    model = Tiny()
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain))
    other = Tiny()
    state = load_checkpoint(plain, other)
    assert state["model_name"] is None and torch.equal(other.fc1.weight, model.fc1.weight)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(plain, other, optimizer=torch.optim.AdamW(other.parameters()))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors", Tiny())


def test_pickle_and_garbage_are_refused_without_unpickling(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("torch.load / pickle.load must never be called")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    zipped = tmp_path / "model.safetensors"  # a torch.save file with a misleading name
    with open(zipped, "wb") as f:
        torch.save(Tiny().state_dict(), f)
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(zipped, Tiny())
    raw_pickle = tmp_path / "p.safetensors"
    raw_pickle.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(raw_pickle, Tiny())
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(junk, Tiny())
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(tiny, Tiny())


def test_truncated_file_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", Tiny())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(CheckpointError):
        load_checkpoint(path, Tiny())


def test_wrong_shape_names_key_and_both_shapes_and_leaves_model_untouched(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", Tiny(TinyConfig(hidden=9)))
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"'fc1.weight': checkpoint has shape \(9, 5\), model expects \(7, 5\)"):
        load_checkpoint(path, model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_missing_and_unexpected_keys(tmp_path):
    model = Tiny()
    model.extra = nn.Linear(2, 3)
    path = save_checkpoint(tmp_path / "c.safetensors", model)
    other = Tiny()
    other.head = nn.Linear(3, 3)
    with pytest.raises(CheckpointError, match=r"missing keys.*'head.weight'.*unexpected keys.*'extra.weight'"):
        load_checkpoint(path, other)
    state = load_checkpoint(path, other, strict=False)
    assert set(state["missing_keys"]) == {"head.weight", "head.bias"}
    assert set(state["unexpected_keys"]) == {"extra.weight", "extra.bias"}
    assert torch.equal(other.fc1.weight, model.fc1.weight)


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_crash_mid_write_leaves_the_old_checkpoint(tmp_path, monkeypatch, where):
    old = Tiny()
    path = save_checkpoint(tmp_path / "c.safetensors", old)
    new = Tiny()

    if where == "write":
        def half_write(tensors, tmp, metadata):
            save_file(tensors, tmp, metadata=metadata)
            with open(tmp, "r+b") as f:  # the disk fills up half-way through
                f.truncate(os.path.getsize(tmp) // 2)
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(C, "_write_tensors", half_write)
    else:
        def failing_fsync(fd):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(C.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        save_checkpoint(path, new)
    monkeypatch.undo()
    restored = Tiny()
    load_checkpoint(path, restored)
    assert torch.equal(restored.fc1.weight, old.fc1.weight)
    assert not torch.equal(restored.fc1.weight, new.fc1.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]  # no temp file left behind


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    for step in (2, 10, 9):
        save_checkpoint(C.checkpoint_path(tmp_path, step), Tiny())
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / ".step_00000099.safetensors.abc.tmp").write_bytes(b"")
    assert latest_checkpoint(tmp_path).name == "step_00000010.safetensors"


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="model"):
        save_checkpoint(tmp_path / "x.safetensors", {"not": "a module"})
    with pytest.raises(TypeError, match="state"):
        save_checkpoint(tmp_path / "x.safetensors", Tiny(), state=[1, 2])
