"""Answer a JSONL file of prompts with the warm model (plain) and with SVDecode (steered).

    svd-lightning generate --run-dir RUN --prompts prompts.jsonl --out answers.jsonl [--mode beam]
    python -m svd_lightning.generate ...   (the same)

The base model is ``steering.json``'s ``model``, the adapter is ``RUN/adapter`` and μ̄, α and the
steering direction come from ``RUN/steering.json`` (``--mu`` overrides μ̄; the direction has no flag,
since μ̄ was solved for the run's direction). Each input row needs a non-empty ``prompt``; each
output row is ``{prompt, plain, steered, mu, mode}``, with the same decoding settings for both
answers (a run calibrated with ``scoring_policy: none`` steers without the confidence mask, as that
policy specifies). Sampling reseeds with ``seed + index of the batch's first prompt`` before each answer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch

from svd_lightning.decoding import FORWARD_MODES, ForwardMode, steered_generate
from svd_lightning.models import load_causal_lm, load_tokenizer
from svd_lightning.progress import progress_bar, say
from svd_lightning.run import ADAPTER_DIR, SteeringRun
from svd_lightning.steering import Direction

MODES = ("greedy", "sample", "beam")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The ``prompt`` of every non-blank JSONL line; errors name the file and line."""
    prompts = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}:{lineno}: expected an object with a non-empty string 'prompt'")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def decoding_kwargs(mode: str = "greedy", max_new_tokens: int = 64, num_beams: int = 4,
                    temperature: float | None = None, top_k: int | None = None, top_p: float | None = None) -> dict:
    """``generate`` options for ``mode``; sampling options are refused outside ``sample``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    warpers = {k: v for k, v in dict(temperature=temperature, top_k=top_k, top_p=top_p).items() if v is not None}
    if warpers and mode != "sample":
        raise ValueError(f"sampling options ({', '.join(warpers)}) only apply to mode 'sample', not {mode!r}")
    beams = num_beams if mode == "beam" else 1
    return dict(max_new_tokens=max_new_tokens, do_sample=mode == "sample", num_beams=beams, **warpers)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], mu: float, alpha: float, mode: str = "greedy", *,
                     batch_size: int = 8, seed: int = 0, mask: bool = True, progress: bool = True,
                     forward_mode: ForwardMode = "auto", with_plain: bool = True, direction: Direction = "kl_gradient",
                     **kw) -> list[dict]:
    """Plain and steered continuations of ``prompts`` (left-padded batches); ``kw`` go to :func:`decoding_kwargs`.

    ``with_plain=False`` skips the warm model's own answer (``plain`` is then None).
    """
    gen = dict(decoding_kwargs(mode, **kw), pad_token_id=tokenizer.pad_token_id)
    rows, side = [], tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right: real tokens must end every row
    try:
        with progress_bar(f"{mode} decoding", len(prompts), "prompt", enabled=progress) as bar:
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=True).to(model.device)
                torch.manual_seed(seed + start)
                plain = model.generate(**enc, **gen) if with_plain else None
                torch.manual_seed(seed + start)
                steered = steered_generate(model, enc["input_ids"], enc["attention_mask"], mu, alpha, mask,
                                           forward_mode=forward_mode, direction=direction, **gen)
                n = enc["input_ids"].shape[1]
                decode = lambda out: tokenizer.batch_decode(out[:, n:], skip_special_tokens=True)  # noqa: E731
                for p, a, b in zip(chunk, decode(plain) if with_plain else [None] * len(chunk), decode(steered)):
                    rows.append({"prompt": p, "plain": a, "steered": b, "mu": float(mu), "mode": mode})
                bar.update(len(chunk))
    finally:
        tokenizer.padding_side = side
    return rows


def load_run(run_dir: str | os.PathLike):
    """``(peft model, tokenizer, SteeringRun)`` of a finished run directory (validated; see :mod:`svd_lightning.run`)."""
    from peft import PeftModel

    from svd_lightning.module import check_tokenizer

    run = SteeringRun.load(run_dir)
    tokenizer = load_tokenizer(run.model)
    check_tokenizer(run, tokenizer, run_dir)
    base = load_causal_lm(run.model)
    model = PeftModel.from_pretrained(base, Path(run_dir) / ADAPTER_DIR, is_trainable=False).eval()
    return model, tokenizer, run


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write ``path.tmp`` then rename it over ``path``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None, prog: str = "python -m svd_lightning.generate") -> None:
    parser = argparse.ArgumentParser(prog=prog,
                                     description="Plain and SVDecode-steered answers for a JSONL file of prompts.")
    parser.add_argument("--run-dir", required=True, help="run directory with adapter/ and steering.json")
    parser.add_argument("--prompts", required=True, help="JSONL file, one {\"prompt\": ...} object per line")
    parser.add_argument("--out", required=True, help="output JSONL: {prompt, plain, steered, mu, mode} per line")
    parser.add_argument("--mode", choices=MODES, default="greedy")
    parser.add_argument("--max-new-tokens", type=_positive, default=64)
    parser.add_argument("--num-beams", type=_positive, default=4, help="beams for --mode beam")
    parser.add_argument("--temperature", type=float, help="--mode sample only")
    parser.add_argument("--top-k", type=int, help="--mode sample only")
    parser.add_argument("--top-p", type=float, help="--mode sample only")
    parser.add_argument("--mu", type=_finite, help="steering strength (default: μ̄ from steering.json)")
    parser.add_argument("--batch-size", type=_positive, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--forward-mode", choices=FORWARD_MODES, default="auto",
                        help="auto: warm and pre-trained rows in one forward pass where the adapter allows (LoRA)")
    args = parser.parse_args(argv)
    options = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    try:  # fail on bad input before loading any model
        prompts = read_prompts(args.prompts)
        decoding_kwargs(args.mode, **options)
        SteeringRun.load(args.run_dir)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    say(f"reading run {Path(args.run_dir).resolve()}")
    model, tokenizer, run = load_run(args.run_dir)
    mu = run.mu if args.mu is None else args.mu
    rows = generate_answers(model, tokenizer, prompts, mu, run.alpha, args.mode, batch_size=args.batch_size,
                            seed=args.seed, mask=run.scoring_policy != "none",
                            forward_mode=args.forward_mode, direction=run.direction, **options)
    write_jsonl(args.out, rows)
    print(f"wrote {len(rows)} answers to {args.out} (mode={args.mode}, mu={mu:+.4g}, alpha={run.alpha})")


if __name__ == "__main__":
    main()
