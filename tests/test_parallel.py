"""Chapter 10 on two gloo processes: FSDP2 and DDP give the single-process losses and gradients, the cached-feature
accumulation equals the large batch across ranks, and a full-state checkpoint saved by 2 FSDP ranks resumes on 1
process (tests/test_train.py covers DDP with the Regressor and the 1-process resume).

The model is a tiny two-tower contrastive model built from the lab's `TransformerBlock`s (so FSDP2 shards per
block and activation checkpointing has blocks to recompute), defined here so the test does not depend on a paper
model. Odd sizes (token width 10, MLP 13, 3 and 5 tokens) flush out shape bugs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from vlm_lab.nn.blocks import TransformerBlock
from vlm_lab.train import Callback, TrainConfig, fit
from vlm_lab.train import distributed as D
from vlm_lab.train import parallel as P
from vlm_lab.train.checkpoint import latest_checkpoint


class BlockCLIP(nn.Module):
    """Two towers of TransformerBlocks over (b, n, d_in) token sets, mean-pooled, projected, InfoNCE via clip_loss."""

    def __init__(self, d: int = 10, mlp: int = 13, layers: int = 2) -> None:
        super().__init__()
        self.image_in, self.text_in = nn.Linear(6, d), nn.Linear(4, d)
        self.image_blocks = nn.ModuleList(TransformerBlock(d, 2, mlp) for _ in range(layers))
        self.text_blocks = nn.ModuleList(TransformerBlock(d, 2, mlp) for _ in range(layers))
        self.image_proj, self.text_proj = nn.Linear(d, 7), nn.Linear(d, 7)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def contrastive_features(self, batch: dict) -> dict[str, torch.Tensor]:
        x, t = self.image_in(batch["image"]), self.text_in(batch["text"])  # (b, 3, d), (b, 5, d)
        for blk in self.image_blocks:
            x = blk(x)
        for blk in self.text_blocks:
            t = blk(t)
        return {"image_embeds": F.normalize(self.image_proj(x.mean(1)), dim=-1),
                "text_embeds": F.normalize(self.text_proj(t.mean(1)), dim=-1)}

    def contrastive_loss(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        from vlm_lab.losses.contrastive import clip_loss

        return clip_loss(f["image_embeds"], f["text_embeds"], self.logit_scale.exp())

    def forward(self, batch: dict) -> torch.Tensor:
        return self.contrastive_loss(self.contrastive_features(batch))


class Pairs(Dataset):
    def __init__(self, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.image, self.text = torch.randn(n, 3, 6, generator=g), torch.randn(n, 5, 4, generator=g)

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.image[i], "text": self.text[i]}


class FirstGrads(Callback):
    """Full (gathered) gradients after the first optimizer step, as numpy arrays."""

    def __init__(self) -> None:
        self.grads: dict[str, np.ndarray] = {}
        self.losses: list[float] = []

    def on_step_end(self, state) -> None:
        self.losses.append(state.record["loss"])
        if state.step == 1:
            for name, p in state.model.named_parameters():
                g = p.grad
                if hasattr(g, "full_tensor"):
                    g = g.full_tensor()
                self.grads[name] = g.detach().clone().numpy()


def cfg(**kw) -> TrainConfig:
    base = dict(steps=3, batch_size=8, lr=1e-2, weight_decay=0.0, progress=False, device="cpu", precision="fp32",
                shuffle=True, grad_accum=2, accum_mode="cache_features", checkpoint_every=2, keep_last=None)
    base.update(kw)
    return TrainConfig(**base)


def _worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    for parallel in ("fsdp", "ddp"):
        torch.manual_seed(0 if rank == 0 else 1)  # a different init on rank 1: both engines must use rank 0's
        model = BlockCLIP()
        probe = FirstGrads()
        fit(model, Pairs(), cfg(batch_size=4, parallel=parallel, out_dir=f"{out}/{parallel}"), callbacks=[probe])
        if rank == 0:
            save_file({f"grad.{k}": torch.from_numpy(v) for k, v in probe.grads.items()}
                      | {"losses": torch.tensor(probe.losses)}, f"{out}/{parallel}_rank0.safetensors")
    # resume the FSDP step-2 checkpoint on 2 FSDP ranks (full-state file -> sharded weights and AdamW state)
    torch.manual_seed(7 + rank)
    model = BlockCLIP()
    fit(model, Pairs(), cfg(batch_size=4, parallel="fsdp", out_dir=f"{out}/fsdp-resumed",
                            resume=f"{out}/fsdp/step_00000002.safetensors"))


def _compare_weights(got: dict, want: dict, prefix: str = "") -> None:
    """Weights after Adam steps. The key biases are skipped: their exact gradient is 0 (softmax(q . (k + b)) does not
    depend on b), so Adam turns ~1e-9 float noise, which differs with the summation order, into lr-sized steps."""
    compared = 0
    for k, v in want.items():
        if k.endswith("attn.k_proj.bias"):
            continue
        torch.testing.assert_close(got[prefix + k], v, atol=1e-5, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
        compared += 1
    assert compared > 10


def test_fsdp_and_ddp_on_two_processes_match_one_process_and_resume_on_one(tmp_path):
    """2 ranks x (4 x 2 cached micro-batches) == 1 process x (8 x 2), for FSDP2 and DDP: per-step losses,
    first-step gradients (not hidden by Adam's scale invariance) and final weights; then the step-2 checkpoint of
    the 2-rank FSDP run resumes on 2 FSDP ranks and on 1 process, and both reach the uninterrupted weights."""
    D.spawn(_worker, nprocs=2, args=(str(tmp_path),))
    torch.manual_seed(0)
    model = BlockCLIP()
    ref = FirstGrads()
    fit(model, Pairs(), cfg(), callbacks=[ref])
    ref_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert np.abs(ref.grads["image_blocks.0.mlp.fc1.weight"]).sum() > 0
    for parallel in ("fsdp", "ddp"):
        got = load_file(str(tmp_path / f"{parallel}_rank0.safetensors"))
        np.testing.assert_allclose(got["losses"].numpy(), ref.losses, rtol=1e-5, atol=1e-6, err_msg=parallel)
        assert set(ref.grads) == {k[len("grad."):] for k in got if k.startswith("grad.")}
        for name, g in ref.grads.items():
            np.testing.assert_allclose(got[f"grad.{name}"].numpy(), g, rtol=1e-4, atol=1e-6,
                                       err_msg=f"{parallel} {name}")
        final = latest_checkpoint(tmp_path / parallel)
        assert final is not None and final.name == "step_00000003.safetensors"
        _compare_weights(load_file(str(final)), ref_weights, prefix="model/")

    resumed = load_file(str(tmp_path / "fsdp-resumed" / "step_00000003.safetensors"))
    _compare_weights(resumed, ref_weights, prefix="model/")  # resumed on 2 FSDP ranks

    # resume the 2-rank FSDP step-2 checkpoint on one process (batch 8 = 2 x 4: the same examples per step)
    torch.manual_seed(123)
    model = BlockCLIP()
    with pytest.warns(UserWarning, match="process"):
        fit(model, Pairs(), cfg(resume=str(tmp_path / "fsdp" / "step_00000002.safetensors")))
    _compare_weights(model.state_dict(), ref_weights)


def test_blocks_and_activation_checkpointing_keep_keys():
    model = BlockCLIP()
    assert len(P.blocks(model)) == 4
    keys = list(model.state_dict())
    assert P.apply_activation_checkpointing(model) == 4
    assert list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="activation_checkpointing"):
        P.apply_activation_checkpointing(nn.Linear(3, 3))
