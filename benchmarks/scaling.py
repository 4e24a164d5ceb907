"""Scaling benchmark (chapter 10): data-parallel throughput of `fit` on 1 and 2 CPU processes, and on a GPU the
CLIP paper preset in bf16 with its model-FLOP utilisation (MFU).

    python benchmarks/scaling.py                       # CPU: toy CLIP, 1 process vs 2 (DDP, FSDP2), ~1 minute
    python benchmarks/scaling.py --steps 30 --batch 128
    python benchmarks/scaling.py --gpu                 # + the GPU part (needs CUDA): ViT-B/16 CLIP, bf16
    python benchmarks/scaling.py --gpu --variant ViT-B/32 --gpu-batch 256 --compile --checkpointing

CPU part: the same global batch and the same number of steps through `fit` on 1 process and on 2 gloo processes
(``parallel="ddp"`` and ``"fsdp"``), each process with one intra-op thread, so 2 processes use 2 cores where 1
process uses one: the ideal speed-up is 2x, and what is lost goes to the all-reduce / all-gathers over loopback
gloo and to Python. The first 3 steps (warm-up) are not timed. The final losses must agree between the three runs
(they train the same model on the same global batches).

GPU part: the bf16 matmul rate actually reached on this device (8192^3 GEMMs) is measured first; then the CLIP
paper preset runs training steps (bf16 autocast, AdamW, fused where available) on synthetic tensors; FLOPs per step
come from `vlm_lab.inspect.budget` (the forward counted by torch's flop counter, x3 for training). MFU is reported
against the measured matmul rate (the goal in issue 10: >= 45 %) and against the vendor's dense bf16 peak. Peak
memory (``torch.cuda.max_memory_allocated``) is printed next to budget()'s estimate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from vlm_lab.train import Callback, TrainConfig, fit  # noqa: E402
from vlm_lab.train import distributed as D  # noqa: E402


class _Timer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []

    def on_step_end(self, state) -> None:
        self.times.append(state.record["time"])
        self.losses.append(state.record["loss"])


def _cpu_run(rank: int, parallel: str, steps: int, global_batch: int, out: str) -> None:
    """One data-parallel run of the toy CLIP (also the body of each spawned process)."""
    from vlm_lab.train.recipes import get_recipe

    torch.set_num_threads(1)
    world = D.world_size()
    recipe = get_recipe("clip")
    torch.manual_seed(0)
    model, train_set, collate, _ = recipe.build("toy", seed=0)
    timer = _Timer()
    cfg = TrainConfig(steps=steps, batch_size=global_batch // world, lr=2e-3, warmup_steps=0, precision="fp32",
                      device="cpu", progress=False, collate_fn=collate, parallel=parallel)
    fit(model, train_set, cfg, callbacks=[timer])
    if rank == 0:
        with open(out, "w") as f:
            f.write(" ".join(map(str, timer.times)) + "\n" + " ".join(map(str, timer.losses)) + "\n")


def cpu_part(steps: int, batch: int) -> list[dict]:
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for nprocs, parallel in ((1, "ddp"), (2, "ddp"), (2, "fsdp")):
            out = os.path.join(tmp, f"{nprocs}-{parallel}.txt")
            t0 = time.perf_counter()
            if nprocs == 1:
                _cpu_run(0, parallel, steps, batch, out)
            else:
                D.spawn(_cpu_run, nprocs=nprocs, args=(parallel, steps, batch, out))
            wall = time.perf_counter() - t0
            times, losses = (list(map(float, line.split())) for line in open(out).read().splitlines())
            step_s = statistics.median(times[3:]) if len(times) > 3 else statistics.median(times)
            rows.append({"processes": nprocs, "plan": parallel if nprocs > 1 else "-", "global_batch": batch,
                         "ms_per_step": 1000 * step_s, "samples_per_s": batch / step_s, "final_loss": losses[-1],
                         "wall_s": wall})
    return rows


def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16, repeats: int = 20) -> float:
    """The bf16 GEMM rate this GPU reaches (best of ``repeats`` timed n^3 products)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    return 2 * n**3 / best / 1e12


def gpu_part(variant: str, batch: int, steps: int, compile_: bool, checkpointing: bool) -> dict:
    from vlm_lab.inspect.budget import ACCELERATORS, budget
    from vlm_lab.models.clip import CLIP, CLIPConfig
    from vlm_lab.train import parallel as P

    rate = matmul_tflops()
    torch.manual_seed(0)
    model = CLIP(CLIPConfig.paper(variant)).cuda().train()
    if checkpointing:
        P.apply_activation_checkpointing(model)
    if compile_:
        P.compile_blocks(model)
    c = model.config
    batch_t = {"pixel_values": torch.randn(batch, 3, c.image_size, c.image_size, device="cuda"),
               "input_ids": torch.randint(1, c.vocab_size - 1, (batch, c.context_length), device="cuda")}
    batch_t["input_ids"][:, -1] = c.vocab_size - 1  # [EOT] = the largest id (OpenAI's argmax pooling)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(batch_t).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5 if compile_ else 3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    est = budget("clip", "paper", overrides={"variant": variant}, batch_size=batch, precision="bf16",
                 activation_checkpointing=checkpointing)
    achieved = est.flops_per_step / step_s / 1e12
    name = torch.cuda.get_device_name()
    spec = next((v for k, v in ACCELERATORS.items() if k.split("-")[0] in name), None)
    return {"device": name, "variant": variant, "batch": batch, "ms_per_step": 1000 * step_s,
            "images_per_s": batch / step_s, "model_tflops": achieved, "matmul_tflops": rate,
            "mfu_vs_matmul": achieved / rate, "mfu_vs_spec": achieved / (spec / 1e12) if spec else None,
            "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30, "budget_peak_gib": est.peak / 2**30,
            "compile": compile_, "checkpointing": checkpointing}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15, help="CPU steps per run (3 warm-up steps not timed)")
    parser.add_argument("--batch", type=int, default=64, help="CPU global batch (split over the processes)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU part")
    parser.add_argument("--gpu", action="store_true", help="run the GPU part (needs CUDA)")
    parser.add_argument("--variant", default="ViT-B/16", choices=["ViT-B/16", "ViT-B/32"])
    parser.add_argument("--gpu-batch", type=int, default=128, help="GPU micro-batch")
    parser.add_argument("--gpu-steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (GPU part)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing (GPU part)")
    args = parser.parse_args(argv)
    if not args.no_cpu:
        print(f"CPU: toy CLIP, global batch {args.batch}, {args.steps} steps, 1 thread per process "
              f"({os.cpu_count()} cores here)")
        rows = cpu_part(args.steps, args.batch)
        print(f"{'processes':>9} {'plan':>5} {'ms/step':>9} {'samples/s':>10} {'speed-up':>9} {'final loss':>11} "
              f"{'wall s':>7}")
        for r in rows:
            print(f"{r['processes']:>9} {r['plan']:>5} {r['ms_per_step']:>9.1f} {r['samples_per_s']:>10.1f} "
                  f"{r['samples_per_s'] / rows[0]['samples_per_s']:>8.2f}x {r['final_loss']:>11.4f} "
                  f"{r['wall_s']:>7.1f}")
    if args.gpu:
        if not torch.cuda.is_available():
            print("GPU part: CUDA is not available on this machine; not measured", file=sys.stderr)
            return 1
        r = gpu_part(args.variant, args.gpu_batch, args.gpu_steps, args.compile, args.checkpointing)
        print(f"GPU: {r['device']}, CLIP {r['variant']}, bf16, batch {r['batch']}"
              + (", compiled" if r["compile"] else "") + (", checkpointing" if r["checkpointing"] else ""))
        print(f"  {r['ms_per_step']:.1f} ms/step, {r['images_per_s']:,.0f} images/s, "
              f"{r['model_tflops']:.0f} model TFLOP/s")
        print(f"  measured bf16 matmul rate {r['matmul_tflops']:.0f} TFLOP/s -> MFU {r['mfu_vs_matmul']:.1%} "
              f"(goal >= 45 %)" + (f"; vs spec peak {r['mfu_vs_spec']:.1%}" if r["mfu_vs_spec"] else ""))
        print(f"  peak memory {r['max_allocated_gib']:.1f} GiB (budget estimate {r['budget_peak_gib']:.1f} GiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
