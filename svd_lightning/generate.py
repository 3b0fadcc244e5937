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
import os
from pathlib import Path

from svd_lightning.config import add_override_arguments
from svd_lightning.files import atomic_write_text, unique_keys
from svd_lightning.generation import MODES, decoding_kwargs, generate_answers
from svd_lightning.log import InputError, say
from svd_lightning.run import SteeringRun, load_run

def read_prompts(path: str | os.PathLike) -> list[str]:
    """The ``prompt`` of every non-blank JSONL line; errors name the file and line."""
    prompts = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=unique_keys)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
        except ValueError as err:
            raise ValueError(f"{path}:{lineno}: {err}") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}:{lineno}: expected an object with a non-empty string 'prompt'")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    """The rows, one JSON object a line, written whole (readers never see a partial file)."""
    try:
        return atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    except OSError as err:
        raise InputError(f"could not write {path} ({err.strerror or err}); nothing was written there: the answers "
                         "are lost, free space or choose another --out") from err


def check_output(path: str | os.PathLike) -> None:
    """Fail before any generation if ``path`` cannot be written as a file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--out {path} is a directory; give a file name, e.g. {path / 'answers.jsonl'}")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"--out {path}: {parent} is not a writable directory")


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
    parser.add_argument("--temperature", type=float, help="--mode sample only; > 0")
    parser.add_argument("--top-k", type=int, help="--mode sample only; ≥ 1")
    parser.add_argument("--top-p", type=float, help="--mode sample only; in (0, 1]")
    add_override_arguments(parser)  # --mu, --method (its answer is the `steered` one), --forward-mode, --base-model
    parser.add_argument("--batch-size", type=_positive, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    options = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    try:  # fail on bad input before loading any model
        prompts = read_prompts(args.prompts)
        decoding_kwargs(args.mode, **options)
        check_output(args.out)
        run = SteeringRun.load(args.run_dir)
        config = run.steering.replace(**({} if args.mu is None else {"mu": args.mu}))
        config = config.method(args.method, run.contrastive_gamma)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    say(f"reading run {Path(args.run_dir).resolve()}")
    model, tokenizer, _ = load_run(args.run_dir, args.base_model)
    rows = generate_answers(model, tokenizer, prompts, config, args.mode, batch_size=args.batch_size,
                            seed=args.seed, forward_mode=args.forward_mode, **options)
    write_jsonl(args.out, rows)
    print(f"wrote {len(rows)} answers to {args.out} (mode={args.mode}, method={args.method}, mu={config.mu:+.4g}, "
          f"alpha={config.alpha})")


if __name__ == "__main__":
    main()
