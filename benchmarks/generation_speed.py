"""Steered vs plain greedy generation time (same run, same prompts, interleaved repeats).

    python benchmarks/generation_speed.py --model tiny-random --model smollm2-135m

Writes benchmarks/results/generation_speed.json and prints a table. The adapter is a LoRA with
random B matrices (warm ≠ base), so the steered path does its full work; timing does not depend
on the adapter having been trained.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from svd_lightning.artifacts import write_json
from svd_lightning.decoding import steered_generate
from svd_lightning.models import apply_adapter, load_causal_lm, load_tokenizer

PROMPTS = [
    "Q: What happens if you eat a pomegranate?\nA:",
    "Q: What is the capital of France?\nA:",
    "Q: Why do veins appear blue?\nA:",
    "Q: What is the spiciest part of a chili pepper?\nA:",
]


def _inputs(tokenizer, batch_size):
    tokenizer.padding_side = "left"
    return tokenizer(PROMPTS[:batch_size], return_tensors="pt", padding=True)


def measure(source: str, new_tokens: int, repeats: int, batch_size: int) -> dict:
    tok = load_tokenizer(source)
    model = apply_adapter(load_causal_lm(source), "lora")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.eval()
    enc = _inputs(tok, batch_size)
    # Force exactly `new_tokens` steps for both (no early EOS), so the ratio compares equal work.
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    runs = {"plain": lambda: model.generate(**enc, **kw),
            "steered": lambda: steered_generate(model, enc["input_ids"], enc["attention_mask"], mu=-1.0, **kw)}
    for fn in runs.values():  # warm-up
        fn()
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            t = time.perf_counter()
            out = fn()
            times[k].append(time.perf_counter() - t)
            assert out.shape[1] == enc["input_ids"].shape[1] + new_tokens
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": source,
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "plain_s": med["plain"],
        "steered_s": med["steered"],
        "ratio": med["steered"] / med["plain"],
        "plain_tok_per_s": batch_size * new_tokens / med["plain"],
        "steered_tok_per_s": batch_size * new_tokens / med["steered"],
        "all_times": times,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="model source (repeatable)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generation_speed.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [measure(m, args.new_tokens, args.repeats, args.batch_size) for m in (args.model or ["tiny-random"])]
    print(f"{'model':<16}{'batch':>6}{'tokens':>8}{'plain s':>10}{'steered s':>11}{'ratio':>8}")
    for r in rows:
        print(f"{r['model']:<16}{r['batch_size']:>6}{r['new_tokens']:>8}{r['plain_s']:>10.3f}{r['steered_s']:>11.3f}{r['ratio']:>8.2f}")
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()}
    write_json(args.out, {"results": rows, "environment": env})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
