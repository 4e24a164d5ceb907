"""Regenerate the toy "frozen LLM" of chapter 07 (BLIP-2) and 09 (LLaVA): ``assets/lm-toy/``.

    HF_HUB_OFFLINE=1 python assets/make_lm.py assets/lm-toy          # ~1 minute on 2 CPU cores

1. Text: every caption template of the shapes world (``caption_corpus``) plus 6,000 captions of random
   scenes (``split="all"``), so word order and relations follow the world's real distribution.
2. Tokenizer: byte-level BPE, vocabulary 384 (``vlm_lab.data.tokenizers.train_bpe``; ``<pad>=0 <s>=1 </s>=2
   <unk>=3 <image>=4``).
3. Model: ``CausalLMConfig.toy()`` (OPT architecture, width 96, 3 layers), AdamW, next-token loss with padding
   masked (-100), fixed seed. Each training sequence packs 1-3 captions ``<s> c1 </s><s> c2 </s>...`` (as LLM
   pre-training packs documents), so the model predicts captions at any position -- BLIP-2 later puts a visual
   prefix in front of the caption.
4. Writes ``model.safetensors``, ``card.json`` (config, data, steps, final loss, held-out perplexity) and
   ``tokenizer/`` with ``vlm_lab.models.lm.save_lm``.
"""
from __future__ import annotations

import argparse
import math
import random
import time

import torch

from vlm_lab.data.collate import tokenize_captions
from vlm_lab.data.shapes import ShapesConfig, _scene_rng, caption_corpus, derive_caption, sample_scene
from vlm_lab.data.tokenizers import train_bpe
from vlm_lab.losses.captioning import build_lm_labels, lm_loss
from vlm_lab.models.lm import CausalLMConfig, build_causal_lm, save_lm


def corpus(n_scenes: int, seed: int, split: str = "all") -> list[str]:
    cfg = ShapesConfig(image_size=32)
    return [derive_caption(sample_scene(_scene_rng(seed, split, i), cfg, split)) for i in range(n_scenes)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", help="folder to write (e.g. assets/lm-toy)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(1)  # deterministic, and fastest for a model this small

    texts = caption_corpus(include_questions=False) + corpus(6000, seed=args.seed)
    val_texts = corpus(500, seed=args.seed + 1000)
    tokenizer = train_bpe(texts, vocab_size=384, model_max_length=64)
    config = CausalLMConfig.toy()
    if len(tokenizer) > config.vocab_size:
        raise SystemExit(f"tokenizer has {len(tokenizer)} tokens > vocab_size {config.vocab_size}")
    model = build_causal_lm(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))

    def loss_of(batch_texts: list[str], pack: bool = False) -> torch.Tensor:
        if pack:  # 1-3 captions per sequence, concatenated
            seqs = []
            for t in batch_texts:
                group = [t] + random.sample(texts, random.choice([0, 1, 2]))
                seqs.append([i for g in group for i in tokenizer(g)["input_ids"]])
            n = max(len(q) for q in seqs)
            ids = torch.full((len(seqs), n), tokenizer.pad_token_id, dtype=torch.long)  # (b, n)
            mask = torch.zeros((len(seqs), n), dtype=torch.long)  # (b, n)
            for i, q in enumerate(seqs):
                ids[i, : len(q)] = torch.tensor(q)
                mask[i, : len(q)] = 1
            enc = {"input_ids": ids, "attention_mask": mask}
        else:
            enc = tokenize_captions(tokenizer, batch_texts, max_length=32)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        return lm_loss(logits, build_lm_labels(enc["input_ids"], enc["attention_mask"]))

    t0 = time.perf_counter()
    model.train()
    for step in range(args.steps):
        loss = loss_of(random.sample(texts, args.batch_size), pack=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    model.eval()
    with torch.no_grad():
        val = sum(loss_of(val_texts[i:i + 100]).item() for i in range(0, len(val_texts), 100)) / 5
    seconds = time.perf_counter() - t0
    card = {"data": "shapes-world captions: caption_corpus(include_questions=False) + 6000 random scenes "
                    "(split='all', seed 0); 1-3 captions packed per sequence",
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
            "final_train_loss": round(loss.item(), 4), "val_loss": round(val, 4),
            "val_perplexity": round(math.exp(val), 3), "train_seconds": round(seconds, 1),
            "command": f"python assets/make_lm.py {args.out_dir}"}
    save_lm(model, config, args.out_dir, tokenizer=tokenizer, card=card)
    print(f"val loss {val:.4f} (perplexity {math.exp(val):.2f}); {seconds:.0f} s; wrote {args.out_dir}")


if __name__ == "__main__":
    main()
