"""vlm_lab.losses.contrastive: CLIP InfoNCE and SigLIP against references, and across two gloo processes."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vlm_lab.losses import clip_loss, siglip_loss


def _emb(b=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(b, d, generator=g), dim=-1), F.normalize(torch.randn(b, d, generator=g), dim=-1))


def _numpy_clip_loss(i, t, scale):
    """The paper's pseudocode in NumPy, written independently of the package."""
    logits = i @ t.T * scale
    def ce(lg):  # rows are predictions, target = diagonal
        lg = lg - lg.max(1, keepdims=True)
        return -(np.diag(lg) - np.log(np.exp(lg).sum(1))).mean()
    return (ce(logits) + ce(logits.T)) / 2


def test_clip_loss_matches_pseudocode_and_hf():
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss as hf_clip_loss
    i, t = _emb()
    ours = clip_loss(i, t, 14.0)
    assert abs(ours.item() - _numpy_clip_loss(i.double().numpy(), t.double().numpy(), 14.0)) < 1e-5
    torch.testing.assert_close(ours, hf_clip_loss(14.0 * t @ i.T))


def test_clip_loss_is_low_for_aligned_pairs_and_symmetric():
    i, _ = _emb()
    assert clip_loss(i, i, 100.0) < 0.05
    i, t = _emb()
    torch.testing.assert_close(clip_loss(i, t, 5.0), clip_loss(t, i, 5.0))


def test_siglip_matches_reference_formula_and_hf():
    from transformers import SiglipConfig, SiglipModel
    i, t = _emb()
    logits = 10.0 * i @ t.T - 10.0
    labels = 2 * torch.eye(6) - 1
    ref = -F.logsigmoid(labels * logits).sum() / 6
    torch.testing.assert_close(siglip_loss(i, t, 10.0, -10.0), ref)
    # HF computes the same quantity as mean over rows of the per-row sums
    nll = -F.logsigmoid(labels * (10.0 * t @ i.T - 10.0)).sum(-1)
    torch.testing.assert_close(siglip_loss(i, t, 10.0, -10.0), nll.mean())
    assert SiglipConfig  # the import above proves the reference is available in this transformers


@pytest.mark.parametrize("bad", [
    dict(image_emb=torch.zeros(0, 4), text_emb=torch.zeros(0, 4)),
    dict(image_emb=torch.zeros(3, 4), text_emb=torch.zeros(2, 4)),
    dict(image_emb=torch.zeros(3), text_emb=torch.zeros(3)),
])
def test_clip_loss_bad_shapes(bad):
    with pytest.raises(ValueError, match="image_emb|text_emb"):
        clip_loss(bad["image_emb"], bad["text_emb"], 1.0)


def test_nonfinite_temperature_is_refused():
    i, t = _emb()
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        clip_loss(i, t, torch.tensor(float("inf")))
    with pytest.raises(ValueError, match="logit_bias"):
        siglip_loss(i, t, 1.0, float("nan"))


# --- two processes -----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, kind, inputs, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        img_all, txt_all, scale = inputs
        b = img_all.shape[0] // world
        img = img_all[rank * b:(rank + 1) * b].clone().requires_grad_(True)
        txt = txt_all[rank * b:(rank + 1) * b].clone().requires_grad_(True)
        s = torch.tensor(scale, requires_grad=True)
        loss = clip_loss(img, txt, s) if kind == "clip" else siglip_loss(img, txt, s, torch.tensor(-2.0))
        loss.backward()
        # DDP averages gradients over ranks; emulate it for the inputs' gradients (each rank owns its rows,
        # so rows are summed as DDP's all-reduce then divided by W) and for the shared scale
        grads = torch.cat([img.grad, txt.grad], 1)
        s_grad = s.grad.clone()
        dist.all_reduce(s_grad)
        # send numpy (pickled by value): a torch tensor would be shared through a file descriptor that
        # disappears when this process exits, racing the parent's unpickling
        queue.put((rank, loss.item(), grads.numpy(), (s_grad / world).item()))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_two_process_loss_and_gradients_equal_single_process(kind):
    world, b = 2, 3
    img, txt = _emb(world * b, 8, seed=1)
    scale = 7.0
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, kind, (img, txt, scale), queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=120) for _ in range(world)), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # single process on the concatenated batch
    i1, t1 = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    s1 = torch.tensor(scale, requires_grad=True)
    ref = clip_loss(i1, t1, s1) if kind == "clip" else siglip_loss(i1, t1, s1, torch.tensor(-2.0))
    ref.backward()
    mean_loss = sum(r[1] for r in results) / world
    assert math.isclose(mean_loss, ref.item(), rel_tol=1e-5, abs_tol=1e-6)
    # per-rank input gradients / W (what DDP's averaging produces for a parameter owned by one rank) == reference
    grads = torch.cat([torch.from_numpy(r[2]) for r in results]) / world
    torch.testing.assert_close(grads, torch.cat([i1.grad, t1.grad], 1), atol=1e-6, rtol=1e-5)
    assert math.isclose(results[0][3], s1.grad.item(), rel_tol=1e-5, abs_tol=1e-7)
