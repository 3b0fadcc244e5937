"""Cost of steered vs plain multiple-choice scoring on SmolLM2-135M: time (same process, same
questions, interleaved repeats) and peak RSS (each mode in its own fresh process).

    python benchmarks/scoring_cost.py                      # 20 TruthfulQA test questions, bf16 autocast
    python benchmarks/scoring_cost.py --questions 40 --repeats 3

Plain = the warm model's log-likelihoods (one forward pass). Steered = what SteeringLM scores:
warm pass + pre-trained pass (the same weights with the adapter disabled) + the steering math.
A second model copy would show up as ~0.5 GB (fp32 SmolLM2) more peak RSS in the steered process.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


def _setup(model_name: str, questions: int):
    from svd_lightning.data import TruthfulQADataModule
    from svd_lightning.models import apply_adapter, load_causal_lm, load_tokenizer

    tok = load_tokenizer(model_name)
    model = apply_adapter(load_causal_lm(model_name), "lora").eval()
    dm = TruthfulQADataModule(limit_test=questions)
    dm.tokenizer = tok
    dm.setup()
    return model, list(dm.test_dataloader())


@torch.no_grad()
def score(model, batches, mode: str) -> float:
    from svd_lightning.decoding import SharedPrompts, score_choices
    from svd_lightning.steering import log_probs

    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for b in batches:
            if mode == "steered":
                score_choices(model, b, mu=-0.1)
            else:
                shared = SharedPrompts(b["input_ids"], b["attention_mask"], b["labels"])
                logits = shared.label_logits(model)
                log_probs(logits)
    return time.perf_counter() - start


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    model, batches = _setup(args.model, args.questions)
    load_peak = _status_mb("VmHWM")
    # Loading the checkpoint peaks above steady state; reset the high-water mark (Linux) so the
    # peak below is the scoring's own.
    Path("/proc/self/clear_refs").write_text("5")
    rss_before = _status_mb("VmRSS")
    seconds = score(model, batches, args.child)
    print(json.dumps({"mode": args.child, "seconds": seconds, "peak_rss_mb": _status_mb("VmHWM"),
                      "rss_before_scoring_mb": rss_before, "load_peak_mb": load_peak}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results" / "scoring_cost.json"))
    ap.add_argument("--child", choices=("plain", "steered"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    model, batches = _setup(args.model, args.questions)
    score(model, batches[:1], "steered")  # warm-up
    times = {"plain": [], "steered": []}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both modes
        for mode in times:
            times[mode].append(score(model, batches, mode))
    rows = sum(b["input_ids"].shape[0] for b in batches)
    rss = {}
    for mode in ("plain", "steered"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--model", args.model, "--questions", str(args.questions)],
                             capture_output=True, text=True, check=True)
        rss[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    result = {
        "model": args.model, "questions": args.questions, "rows": rows, "repeats": args.repeats, "precision": "bf16 autocast",
        "threads": torch.get_num_threads(),
        "seconds": {m: statistics.median(v) for m, v in times.items()},
        "all_seconds": times,
        "time_ratio_steered_over_plain": statistics.median(times["steered"]) / statistics.median(times["plain"]),
        "peak_rss_mb": {m: rss[m]["peak_rss_mb"] for m in rss},
        "rss_before_scoring_mb": {m: rss[m]["rss_before_scoring_mb"] for m in rss},
        "load_peak_mb": {m: rss[m]["load_peak_mb"] for m in rss},
        "peak_rss_extra_mb_steered": rss["steered"]["peak_rss_mb"] - rss["plain"]["peak_rss_mb"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out)
    print(f"{'mode':<9}{'seconds':>9}{'RSS before MB':>15}{'peak RSS MB':>13}")
    for m in ("plain", "steered"):
        print(f"{m:<9}{result['seconds'][m]:>9.1f}{result['rss_before_scoring_mb'][m]:>15.0f}{result['peak_rss_mb'][m]:>13.0f}")
    print(f"steered / plain time ×{result['time_ratio_steered_over_plain']:.2f}; extra peak RSS "
          f"{result['peak_rss_extra_mb_steered']:+.0f} MB ({args.questions} TruthfulQA questions, {rows} rows) -> {args.out}")


if __name__ == "__main__":
    main()
