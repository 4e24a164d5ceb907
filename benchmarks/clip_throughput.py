"""CLIP throughput: the lab's CLIP against transformers' CLIPModel (and open_clip when installed), same weights.

    python benchmarks/clip_throughput.py                 # toy and small configs, CPU, ~2 minutes
    python benchmarks/clip_throughput.py --configs small --batch 64 --repeats 10

For each config the reference models are built first, the lab's CLIP is loaded from transformers' weights with
``CLIP.from_hf`` (so both compute the same function), and then the implementations are timed *interleaved*
(A, B, A, B, ...) so that machine noise hits both alike. Reported: median milliseconds per training step
(forward + backward + AdamW step) and per inference forward (no_grad), images per second, the ratio
reference / ours (> 1 means ours is faster), and the achieved fraction of this machine's fp32 matmul rate
measured in the same run (FLOPs counted with torch's flop counter).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from vlm_lab.inspect import count_flops  # noqa: E402
from vlm_lab.models import CLIP  # noqa: E402

CONFIGS = {
    # name: (vision: image, patch, width, layers, heads) (text: width, layers, heads, context), embed, batch
    "toy": dict(image=32, patch=8, vw=96, vl=3, vh=4, tw=96, tl=2, th=4, ctx=24, embed=64, vocab=512, batch=64),
    "small": dict(image=64, patch=8, vw=256, vl=6, vh=8, tw=256, tl=6, th=8, ctx=32, embed=256, vocab=8192, batch=32),
}


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def build_hf(c: dict):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(vocab_size=c["vocab"], hidden_size=c["tw"], intermediate_size=4 * c["tw"],
                         num_hidden_layers=c["tl"], num_attention_heads=c["th"], max_position_embeddings=c["ctx"],
                         eos_token_id=3, bos_token_id=2, pad_token_id=0, hidden_act="gelu"),
        vision_config=dict(image_size=c["image"], patch_size=c["patch"], hidden_size=c["vw"],
                           intermediate_size=4 * c["vw"], num_hidden_layers=c["vl"], num_attention_heads=c["vh"],
                           hidden_act="gelu"),
        projection_dim=c["embed"])
    return CLIPModel(cfg)


def build_open_clip(c: dict):
    try:
        import open_clip
    except ImportError:
        return None
    return open_clip.CLIP(embed_dim=c["embed"],
                          vision_cfg=dict(image_size=c["image"], layers=c["vl"], width=c["vw"], patch_size=c["patch"],
                                          head_width=c["vw"] // c["vh"]),
                          text_cfg=dict(context_length=c["ctx"], vocab_size=c["vocab"], width=c["tw"],
                                        heads=c["th"], layers=c["tl"]))


def make_batch(c: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, n = c["batch"], c["ctx"] - 4
    ids = torch.randint(5, c["vocab"], (b, n), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    return {"pixel_values": torch.randn(b, 3, c["image"], c["image"], generator=g), "input_ids": ids,
            "attention_mask": torch.ones(b, n, dtype=torch.long)}


def steps(name: str, model, batch: dict):
    """(train_step, infer) closures for one implementation."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if name == "lab":
        fwd = lambda: model(batch).loss  # noqa: E731
    elif name == "transformers":
        fwd = lambda: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],  # noqa: E731
                            pixel_values=batch["pixel_values"], return_loss=True).loss
    else:  # open_clip
        import torch.nn.functional as F

        def fwd():
            img, txt, scale = model(batch["pixel_values"], batch["input_ids"])[:3]
            logits = scale * img @ txt.T
            y = torch.arange(len(img))
            return (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2

    def train_step():
        model.train()
        loss = fwd()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer():
        model.eval()
        with torch.no_grad():
            fwd()

    return train_step, infer, fwd


def bench(fns: dict, repeats: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():  # interleaved
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["toy", "small"], choices=sorted(CONFIGS))
    ap.add_argument("--batch", type=int, default=None, help="override the batch size")
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    peak = matmul_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 matmul rate {peak:.1f} GFLOP/s "
          "(2048x2048, best of 5)\n")
    header = f"{'config':<7}{'impl':<14}{'train ms':>10}{'img/s':>9}{'infer ms':>10}{'img/s':>9}" \
             f"{'train %peak':>13}{'ref/ours train':>16}{'ref/ours infer':>16}"
    print(header)
    print("-" * len(header))
    for cname in args.configs:
        c = dict(CONFIGS[cname])
        if args.batch:
            c["batch"] = args.batch
        batch = make_batch(c)
        impls = {"transformers": build_hf(c)}
        impls["lab"] = CLIP.from_hf(impls["transformers"])
        oc = build_open_clip(c)
        if oc is not None:
            impls["open_clip"] = oc
        fns = {k: steps(k, m, batch) for k, m in impls.items()}
        train = bench({k: f[0] for k, f in fns.items()}, args.repeats)
        infer = bench({k: f[1] for k, f in fns.items()}, args.repeats)
        fwd_flops = count_flops(fns["lab"][2])
        train_flops = 3 * fwd_flops  # backward ~ 2x forward
        for k in impls:
            ratio_t = "" if k == "lab" else f"{train[k] / train['lab']:.2f}x"
            ratio_i = "" if k == "lab" else f"{infer[k] / infer['lab']:.2f}x"
            util = train_flops / (train[k] / 1000) / 1e9 / peak
            print(f"{cname:<7}{k:<14}{train[k]:>10.1f}{c['batch'] / train[k] * 1000:>9.0f}{infer[k]:>10.1f}"
                  f"{c['batch'] / infer[k] * 1000:>9.0f}{util:>12.0%}{ratio_t:>16}{ratio_i:>16}")
        print(f"{'':<7}(batch {c['batch']}, forward {fwd_flops / 1e9:.2f} GFLOP, train step ~{train_flops / 1e9:.2f} "
              "GFLOP)")
    print("\nref/ours > 1 means the lab's CLIP is faster than that reference.")


if __name__ == "__main__":
    main()
