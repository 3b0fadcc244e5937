"""How far steered scores move when the model runs in a lower precision, as a function of |μ|.

Steered logits add μ·δz, and δz is a difference of two nearly equal distributions: the rounding of a
low-precision forward pass is amplified by |μ|. This measures it on SmolLM2-135M with a LoRA warm start,
TruthfulQA multiple choice (zero-shot prompt), against the same computation with fp64 weights:

* the error of each row's steered score (nats): median and max over rows, per |μ|;
* how many questions' MC1 outcome changes (right ↔ wrong) against fp64;
* the same for the plain (warm) score, for scale. (No timings: this measures accuracy.)

Variants: fp32 weights; bf16 weights; bf16 weights with the final norm and the LM head in fp32; bf16
autocast over fp32 weights; fp16 weights. Scoring is the package's own (``score_choice_variants``, one
forward for every μ). The table it writes (``results/precision.{json,md}``) is where the package's
precision policy (:mod:`svd_lightning.precision`) takes its numbers from.

    python -m benchmarks.precision                         # 16 questions, a 40-step LoRA warm start
    python -m benchmarks.precision --adapter RUN/adapter   # a trained adapter instead
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
from pathlib import Path

import numpy as np
import torch

from svd_lightning.config import SteeringConfig
from svd_lightning.data import PAPER_SPLIT, TruthfulQADataModule
from svd_lightning.forward.prefix import PrefixCache
from svd_lightning.scoring import score_choice_variants
from svd_lightning.metrics import truthfulqa_per_question
from svd_lightning.models import apply_adapter, load_causal_lm, load_tokenizer
from svd_lightning.precision import describe_cpu
from svd_lightning.files import atomic_write_text

ROOT = Path(__file__).resolve().parent
MUS = (1.0, 3.0, 10.0, 30.0, 100.0)  # |μ|; steered at −|μ|, the sign SVDecode's μ̄ usually has
TABLE = ("question_index", "choice_set", "choice_index", "is_true", "num_chars")


def warm_start(model, dm, steps: int, seed: int):
    """A short seeded LoRA warm start (LR 5e-4, batch 1): an adapter whose δz is a real one."""
    torch.manual_seed(seed)
    peft_model = apply_adapter(model, "lora")
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-4)
    peft_model.train()
    for step, batch in zip(range(steps), dm.train_dataloader()):
        loss = peft_model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return peft_model.eval()


def with_adapter(model, adapter: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter, is_trainable=False).eval()


def _upcast_inputs(module, args):
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def head_in_fp32(model):
    """bf16 weights, but the final norm and the LM head in fp32 (their inputs upcast)."""
    base = model.get_base_model()
    base.model.norm.float().register_forward_pre_hook(_upcast_inputs)
    # an fp32 copy of the head: SmolLM2 ties it to the input embeddings, which stay bf16
    base.lm_head.weight = torch.nn.Parameter(base.lm_head.weight.detach().float().clone(), requires_grad=False)
    base.lm_head.register_forward_pre_hook(_upcast_inputs)
    return model


VARIANTS = {  # name -> (weights dtype, autocast dtype or None, after-cast hook)
    "fp32 weights": (torch.float32, None, None),
    "bf16 weights": (torch.bfloat16, None, None),
    "bf16 weights, final norm + LM head fp32": (torch.bfloat16, None, head_in_fp32),
    "bf16 autocast over fp32 weights": (torch.float32, torch.bfloat16, None),
    "fp16 weights": (torch.float16, None, None),
}


def score_all(model, batches, mus, autocast) -> dict[str, np.ndarray]:
    """Per-row plain and steered scores (one forward per batch serves every μ), fp64 numpy."""
    configs = {f"mu{m:g}": SteeringConfig(mu=-m) for m in mus}
    prefixes = PrefixCache()  # one model per call: its primer encoded once, as the CLI's scoring does
    out: dict[str, list] = {}
    ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with ctx, torch.no_grad():
        for batch in batches:
            scores = score_choice_variants(model, batch, configs, prefixes=prefixes)
            for k, v in scores.items():
                out.setdefault(k, []).append(v.double().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def mc1(batches, score: np.ndarray) -> np.ndarray:
    table = {k: torch.cat([b[k] for b in batches]) for k in TABLE}
    return truthfulqa_per_question(**table, score=torch.from_numpy(score))["mc1"].numpy()


def measure(args) -> dict:
    tokenizer = load_tokenizer(args.model)
    dm = TruthfulQADataModule(few_shot=False, instruction=False, seed=0, limit_train=args.steps, limit_test=args.questions,
                              max_length=256, batch_size=4, split=PAPER_SPLIT)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    batches = list(dm.test_dataloader())
    base = load_causal_lm(args.model)
    model = with_adapter(base, args.adapter) if args.adapter else warm_start(base, dm, args.steps, args.seed)
    reference = score_all(copy.deepcopy(model).double(), batches, args.mus, None)
    ref_mc1 = {k: mc1(batches, v) for k, v in reference.items()}
    rows = []
    for name, (dtype, autocast, hook) in VARIANTS.items():
        print(f"scoring: {name}", flush=True)
        m = copy.deepcopy(model).to(dtype)
        if hook:
            m = hook(m)
        got = score_all(m, batches, args.mus, autocast)
        for key in ["plain", *[f"mu{x:g}" for x in args.mus]]:
            err = np.abs(got[key] - reference[key])
            rows.append({"variant": name, "score": key, "mu_abs": None if key == "plain" else float(key[2:]),
                         "median_error": float(np.median(err)), "max_error": float(err.max()),
                         "mc1_changed": int((mc1(batches, got[key]) != ref_mc1[key]).sum()),
                         "steered_minus_plain_median": float(np.median(np.abs(reference[key] - reference["plain"])))})
        del m
    return {"model": args.model, "adapter": args.adapter or f"LoRA, {args.steps}-step warm start (seed {args.seed}, LR 5e-4)",
            "questions": args.questions, "rows_scored": int(len(reference["plain"])), "alpha": SteeringConfig().alpha,
            "scoring_policy": SteeringConfig().scoring_policy, "cpu": describe_cpu(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "rows": rows}


def markdown(d: dict) -> str:
    mus = sorted({r["mu_abs"] for r in d["rows"] if r["mu_abs"] is not None})
    lines = [f"# Steered-score error against fp64 weights (`benchmarks/precision.py`)", "",
             f"{d['model']}, {d['adapter']}; {d['questions']} TruthfulQA questions ({d['rows_scored']} rows), α = {d['alpha']}, "
             f"policy {d['scoring_policy']}, μ = −|μ|; {d['cpu']}, {d['threads']} threads, torch {d['torch']}. Each cell: median / max "
             "error of a row's summed log-prob (nats) [questions whose MC1 outcome changed].", "",
             "| variant | plain | " + " | ".join(f"steered, \\|μ\\| = {m:g}" for m in mus) + " |",
             "|---|---|" + "---|" * len(mus)]
    for name in VARIANTS:
        cells = {r["score"]: r for r in d["rows"] if r["variant"] == name}
        fmt = lambda r: f"{r['median_error']:.2g} / {r['max_error']:.2g} [{r['mc1_changed']}]"  # noqa: E731
        lines.append(f"| {name} | {fmt(cells['plain'])} | " + " | ".join(fmt(cells[f'mu{m:g}']) for m in mus) + " |")
    scale = {r["mu_abs"]: r["steered_minus_plain_median"] for r in d["rows"] if r["variant"] == "fp32 weights" and r["mu_abs"]}
    lines += ["", "For scale, the median |steered − plain| of a row (fp64): "
              + ", ".join(f"|μ| = {m:g}: {scale[m]:.2g}" for m in mus) + " nats."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--adapter", help="a peft adapter folder (default: a short seeded LoRA warm start)")
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40, help="warm-start steps without --adapter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mus", type=float, nargs="+", default=list(MUS))
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args(argv)
    d = measure(args)
    md = markdown(d)
    atomic_write_text(args.out / "precision.json", json.dumps(d, indent=1) + "\n")
    atomic_write_text(args.out / "precision.md", md)
    print(md)
    print(f"wrote {args.out / 'precision.json'}, {args.out / 'precision.md'}")


if __name__ == "__main__":
    main()
