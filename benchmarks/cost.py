"""What steering costs: plain vs steered scoring and generation, calibration vs a warm-start epoch.

Every measurement runs in this one process, interleaved (each repeat runs every variant once, in
the same order), so drift on a shared machine hits all variants alike. Ratios are taken within a
repeat and reported as median [min, max] over repeats. Steered variants run both paths:
``two_pass`` (a second forward with the adapter disabled) and ``one_forward`` (warm and base rows
in one batch; LoRA only). Peak memory is the extra over the state before each call: CUDA's
allocator peak on GPU, the process's resettable RSS high-water mark on CPU (Linux).

    python -m benchmarks.cost                                   # SmolLM2-135M, the machine's precision
    python -m benchmarks.cost --model tiny-random --repeats 3   # seconds; a smoke test
    python -m benchmarks.cost --device cuda                     # on a GPU (bf16 where it has it)
    python -m benchmarks.cost --demo-run runs/truthfulqa-lora/version_0 --demo-only   # a demo run's stages

Scoring and calibration use the demo's TruthfulQA prompt (instruction + six-shot primer) and batch
sizes; generation uses zero-shot prompts (``Q: …\\nA:``), greedy, exactly ``--new-tokens`` tokens.
Calibration vs warm start is extrapolated to the demo's split sizes (490 train questions at batch 1,
163 calibration questions) from the measured time per question of each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from svd_lightning.batch import collate_lm
from svd_lightning.calibration import calibrate
from svd_lightning.config import SteeringConfig
from svd_lightning.data import PAPER_SPLIT, TruthfulQADataModule
from svd_lightning.generation import steered_generate
from svd_lightning.forward.prefix import PrefixCache
from svd_lightning.scoring import paired_label_logits, score_choices
from svd_lightning.models import apply_adapter, load_causal_lm, load_tokenizer
from svd_lightning.precision import describe_cpu, resolve_precision
from svd_lightning.files import portable_path
from svd_lightning.steering import log_probs

ROOT = Path(__file__).resolve().parent
DEMO_TRAIN, DEMO_CALIB = 490, 163  # the demo's 60/20 split of 817 TruthfulQA questions
PATHS = ("two_pass", "one_forward")


def release_free_heap() -> None:
    """glibc's ``malloc_trim(0)``: freed heap pages back to the OS, so RSS is the memory in use."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS keeps the allocator's cache
        pass


class PeakMemory:
    """Extra peak memory (MB) of the code inside the ``with`` block.

    CPU: Linux's resettable RSS high-water mark (``/proc/self/clear_refs``), read before and after,
    with no sampling thread (a third thread on 2 cores would slow the very code it measures).
    ``release``: hand free heap memory back to the OS first (glibc's ``malloc_trim``); without it,
    memory an earlier call freed but the allocator kept is reused without raising the mark (the
    figure is then a lower bound), with it the call pays page faults (time it separately).
    """

    def __init__(self, device: torch.device, release: bool = False):
        self.device, self.extra_mb, self.release = device, float("nan"), release

    @staticmethod
    def status_mb(field: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        raise OSError(f"no {field} in /proc/self/status")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated() / 2**20
            return self
        if self.release:
            release_free_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the high-water mark to the current RSS
            self.before = self.status_mb("VmRSS")
        except OSError:
            self.before = None  # not Linux, or not allowed: no memory figure
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.extra_mb = torch.cuda.max_memory_allocated() / 2**20 - self.before
        elif self.before is not None:
            self.extra_mb = self.status_mb("VmHWM") - self.before


def timed(device, fn) -> tuple[float, float]:
    """(seconds, extra peak MB) of ``fn()``."""
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return seconds, mem.extra_mb


def build(args):
    device = torch.device(args.device)
    precision, why = resolve_precision(args.precision, "gpu" if device.type == "cuda" else "cpu")
    tok = load_tokenizer(args.model)
    model = apply_adapter(load_causal_lm(args.model), "lora").to(device)
    with torch.no_grad():  # a trained-looking adapter: B = 0 would make warm == base
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.01)
    dm = TruthfulQADataModule(batch_size=1, train_batch_size=1, calib_batch_size=args.calib_batch_size, max_length=512,
                              limit_train=args.train_steps, limit_calib=args.calib_questions, limit_test=args.score_questions, split=PAPER_SPLIT)
    dm.tokenizer = tok
    dm.setup()
    zero_shot = [f"Q: {ex.prompt.rsplit('Q: ', 1)[-1]}" for ex in dm.test_set + dm.calib_set + dm.train_set]
    return device, precision, why, tok, model, dm, zero_shot


def autocast(device, precision):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def run(args) -> dict:
    device, precision, why, tok, model, dm, zero_shot = build(args)
    print(f"precision {precision} ({why}); device {device}; {describe_cpu()}; threads {torch.get_num_threads()}", flush=True)
    to_dev = lambda b: {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}  # noqa: E731
    score_batches = [to_dev(b) for b in dm.test_dataloader()]
    calib_batches = {bs: [to_dev(collate_lm(dm.calib_set[i : i + bs], dm.tokenized)) for i in range(0, len(dm.calib_set), bs)]
                     for bs in sorted({1, args.calib_batch_size})}
    train_batches = [to_dev(b) for b in dm.train_dataloader()]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5)
    prefixes = PrefixCache()  # the model's primer encoded once per weights, as the CLI's stages share it

    @torch.no_grad()
    def score(variant):
        for b in score_batches:
            if variant == "plain":
                warm, _, y, _ = paired_label_logits(model, b, with_base=False, prefixes=prefixes)
                log_probs(warm).gather(-1, y[:, None])
            else:
                score_choices(model, b, SteeringConfig(mu=-1.0), forward_mode=variant, prefixes=prefixes)

    def generate(variant, bs):
        prompts = zero_shot[:bs]
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True).to(device)
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        with torch.no_grad():
            if variant == "plain":
                model.generate(**enc, **kw)
            else:
                steered_generate(model, enc["input_ids"], enc["attention_mask"], SteeringConfig(mu=-1.0), forward_mode=variant,
                                 **kw)

    def train_epoch():
        model.train()
        for b in train_batches:
            with autocast(device, precision):  # the warm start's precision; scoring is fp32, as the CLI scores
                loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()

    def calibration(variant, bs):
        calibrate(model, calib_batches[bs], SteeringConfig(), forward_mode=variant, progress=False, prefixes=prefixes)

    jobs = {("score", v): (lambda v=v: score(v)) for v in ("plain", *PATHS)}
    for bs in args.gen_batch_sizes:
        jobs.update({(f"generate_b{bs}", v): (lambda v=v, bs=bs: generate(v, bs)) for v in ("plain", *PATHS)})
    jobs[("warm_start", "train")] = train_epoch
    for bs in calib_batches:
        jobs.update({(f"calibration_b{bs}", v): (lambda v=v, bs=bs: calibration(v, bs)) for v in PATHS})

    model.eval()
    for key, fn in jobs.items():  # warm-up: first calls allocate caches and pick kernels
        if key[0] not in ("warm_start",):
            print(f"warm-up {key[0]} {key[1]}: {timed(device, fn)[0]:.2f} s", flush=True)
    samples = {key: [] for key in jobs}
    for r in range(args.repeats):
        for key, fn in jobs.items():
            samples[key].append(timed(device, fn))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k[0]}/{k[1]} {v[-1][0]:.2f}s" for k, v in samples.items()),
              flush=True)
    return summarise(args, samples, device, precision, why, dm)


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def summarise(args, samples, device, precision, why, dm) -> dict:
    rows = []
    for (task, variant), runs in samples.items():
        seconds = [s for s, _ in runs]
        row = {"task": task, "variant": variant, "seconds": _spread(seconds), "peak_extra_mb": max(m for _, m in runs)}  # NaN where unmeasurable
        if variant in PATHS and (task, "plain") in samples:
            plain = [s for s, _ in samples[(task, "plain")]]
            row["ratio_vs_plain"] = _spread([s / p for s, p in zip(seconds, plain)])
        if task.startswith("calibration"):
            train = [s for s, _ in samples[("warm_start", "train")]]
            per_q_calib = [s / len(dm.calib_set) for s in seconds]
            per_q_train = [s / len(dm.train_set) for s in train]
            row["ratio_vs_demo_epoch"] = _spread([c * DEMO_CALIB / (t * DEMO_TRAIN) for c, t in zip(per_q_calib, per_q_train)])
        rows.append(row)
    return {
        "model": args.model, "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else describe_cpu(),
        "platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "precision": precision, "precision_reason": why, "repeats": args.repeats,
        "sizes": {"score_questions": len(dm.test_set), "score_rows": sum(len(ex.choices) for ex in dm.test_set),
                  "calib_questions": len(dm.calib_set), "train_steps": len(dm.train_set), "new_tokens": args.new_tokens,
                  "gen_batch_sizes": args.gen_batch_sizes, "calib_batch_size": args.calib_batch_size},
        "rows": rows,
    }


def demo_stages(run_dir: Path) -> dict:
    """A ``fit`` run's stage seconds (its ``timings.json``) and what everything after the warm start costs
    relative to it: the demo's own breakdown, next to the micro-benchmarks above."""
    from svd_lightning.callbacks import TIMINGS_FILE

    path = Path(run_dir) / TIMINGS_FILE
    try:
        record = json.loads(path.read_text())
        stages, total = record["seconds"], record["total"]
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"{path}: not a run's stage timings ({err}); give --demo-run a finished fit run") from None
    warm = stages.get("warm start")
    if not warm:
        raise SystemExit(f"{path}: the run has no warm-start stage (a validate/test run?)")
    after = sum(v for k, v in stages.items() if k not in ("set-up", "warm start"))
    return {"run_dir": portable_path(run_dir), "seconds": stages, "other": record["other"], "total": total,
            "after_warm_start": after, "after_warm_start_ratio": after / warm, "device_name": describe_cpu()}


def demo_table(demo: dict) -> str:
    lines = [f"demo run {demo['run_dir']} (timed on the machine that ran it; this one: {demo['device_name']})"]
    lines += [f"  {name:<26}{seconds:>9.1f} s" for name, seconds in [*demo["seconds"].items(), ("other", demo["other"]),
                                                                      ("total", demo["total"])]]
    lines.append(f"  after the warm start ÷ warm start: {demo['after_warm_start_ratio']:.2f} "
                 f"({demo['after_warm_start']:.1f} s ÷ {demo['seconds']['warm start']:.1f} s)")
    return "\n".join(lines)


def table(result: dict) -> str:
    fmt = lambda d: f"{d['median']:.2f} [{d['min']:.2f}, {d['max']:.2f}]"  # noqa: E731
    lines = [f"{result['model']} on {result['device_name']}, {result['precision']}, {result['threads']} threads, "
             f"{result['repeats']} repeats: median [min, max]",
             f"{'task':<16}{'variant':<13}{'seconds':>24}{'× plain':>24}{'× demo epoch':>24}{'peak +MB':>10}"]
    for r in result["rows"]:
        ratio = fmt(r["ratio_vs_plain"]) if "ratio_vs_plain" in r else "-"
        epoch = fmt(r["ratio_vs_demo_epoch"]) if "ratio_vs_demo_epoch" in r else "-"
        lines.append(f"{r['task']:<16}{r['variant']:<13}{fmt(r['seconds']):>24}{ratio:>24}{epoch:>24}{r['peak_extra_mb']:>10.0f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="auto", help="auto (what the machine runs fast), 32-true or bf16-mixed")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--score-questions", type=int, default=8)
    ap.add_argument("--calib-questions", type=int, default=16)
    ap.add_argument("--calib-batch-size", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=16, help="warm-start questions timed (batch 1)")
    ap.add_argument("--gen-batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None, help="JSON path (default: results/cost_<model>_<device>.json)")
    ap.add_argument("--demo-run", help="a finished `fit` run (e.g. of scripts/demo.sh): report its stage times too")
    ap.add_argument("--demo-only", action="store_true", help="with --demo-run: only its stages (adds them to the "
                    "existing JSON, no micro-benchmarks)")
    args = ap.parse_args(argv)
    out = Path(args.out or ROOT / "results" / f"cost_{args.model}_{torch.device(args.device).type}.json")
    demo = demo_stages(Path(args.demo_run)) if args.demo_run else None
    if args.demo_only:
        if demo is None:
            raise SystemExit("--demo-only needs --demo-run RUN")
        result = json.loads(out.read_text()) if out.exists() else {}
        result["demo"] = demo
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out)
        print(demo_table(demo))
        print(f"-> {out}")
        return
    result = run(args)
    if demo is not None:
        result["demo"] = demo
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(table(result))
    if demo is not None:
        print(demo_table(demo))
    print(f"-> {out}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
