"""lm-evaluation-harness backend: any lm-eval task, scored and generated with a run's SVDecode.

    import svd_lightning.lm_eval  # registers the model name "svd"
    lm_eval.simple_evaluate(model="svd", model_args="pretrained=runs/truthfulqa-lora/version_0", tasks=[...])

    svd-lightning eval --run-dir RUN --tasks truthfulqa_mc1 [any other flag of `lm-eval run`]

Log-likelihood requests are scored under the steered distribution of the run's scoring policy
(:func:`svd_lightning.steering.steered_log_probs`, from the warm and pre-trained logits of the same
tokens); ``generate_until`` goes through the steering logits processor. ``model_args``: ``pretrained`` (the run: a
directory or a Hub repo id of one, as ``SteeredModel.from_pretrained`` takes it, at ``revision``; ``run_dir``
is the same), ``base_model`` (the base model, where the run names a local path), ``mu`` (override μ̄; ``mu=0``
gives the warm model under the default policy), ``method`` (``svdecode``, or ``contrastive``: the run's γ),
``forward_mode``, ``batch_size``, ``device``, ``max_length``. Needs the ``lm-eval`` extra: ``pip install -e ".[lm-eval]"``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from svd_lightning.api import SteeredModel
from svd_lightning.config import add_override_arguments
from svd_lightning.generation import steered_generate
from svd_lightning.log import InputError, say
from svd_lightning.scoring import paired_logits
from svd_lightning.precision import check_steering_precision
from svd_lightning.steering import steered_log_probs


# HFLM's own options that still mean something when the model object is ours.
HFLM_OPTIONS = set(inspect.signature(HFLM.__init__).parameters) - {
    "self", "kwargs", "pretrained", "tokenizer", "backend", "revision", "subfolder", "peft", "delta", "autogptq",
    "gptqmodel", "gguf_file", "parallelize", "max_memory_per_gpu", "max_cpu_memory", "offload_folder", "tp_plan",
    "trust_remote_code", "use_fast_tokenizer", "device", "batch_size", "max_length"}


def _number(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"model_args: {name} must be a number, got {value!r}") from None


@register_model("svd")
class SteeredHFLM(HFLM):
    """lm-eval's ``HFLM`` whose logits are SVDecode's steered log-probabilities."""

    def __init__(self, pretrained: str | None = None, run_dir: str | None = None, revision: str | None = None,
                 base_model: str | None = None, mu: float | None = None, forward_mode: str = "auto", method: str = "svdecode",
                 device: str | None = None, batch_size: int | str = 1, max_length: int | None = None, **kwargs):
        unknown = sorted(set(kwargs) - HFLM_OPTIONS)
        if unknown:  # HFLM would ignore them: `muu=1` must not silently mean "the run's μ̄"
            raise ValueError(f"model_args: unknown option(s) {unknown} for the svd backend; it takes run_dir, base_model, "
                             f"mu, forward_mode, method, device, batch_size, max_length and HFLM's {sorted(HFLM_OPTIONS)}")
        if (pretrained is None) == (run_dir is None):
            raise ValueError("model_args: give the run as pretrained=RUN (a run directory or a Hub repo id of one); "
                             f"got pretrained={pretrained!r}, run_dir={run_dir!r}")
        source = str(pretrained or run_dir)
        if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
            say(f"device {device!r} (lm-eval's default) is not available here: the run's model stays where it loads")
            device = None  # as HFLM does: the device there is
        if mu is not None:
            mu = _number(mu, "mu")
        overrides = {} if mu is None else {"mu": float(mu)}
        self.steered = SteeredModel.from_pretrained(source, revision=revision, base_model=base_model, device=device,
                                                    forward_mode=forward_mode, **overrides)
        # what every request is scored and generated with
        self.steering_config = self.steered.config.method(method, self.steered.gamma)
        self._first_scored = 0  # see _loglikelihood_tokens
        super().__init__(pretrained=self.steered.model, tokenizer=self.steered.tokenizer, batch_size=batch_size,
                         max_length=max_length, **kwargs)
        check_steering_precision(self.steered.model, self.steering_config.mu, f"lm-eval svd backend ({source})",
                                 autocast=self.mixed_precision_dtype)

    def _loglikelihood_tokens(self, requests, *args, **kwargs):
        # Identical (context, continuation) tokens are scored once: TruthfulQA's MC1 choices recur in
        # MC2, and lm-eval hands every task's requests over together.
        first: dict[tuple, tuple] = {}
        for req in requests:
            first.setdefault((tuple(req[1]), tuple(req[2])), req)
        distinct = list(first.values()) if len(first) < len(requests) else requests
        index = {key: i for i, key in enumerate(first)}
        # The first scored position over all requests: lm-eval reads logits from each row's context
        # end on, and places them by the returned length, so positions before it need not be returned.
        self._first_scored = min((min(len(ctx) + len(cont), self.max_length + 1) - 1 - len(cont)
                                  for _, ctx, cont in distinct), default=0)
        try:
            scores = super()._loglikelihood_tokens(distinct, *args, **kwargs)
        finally:
            self._first_scored = 0
        if distinct is requests:
            return scores
        return [scores[index[(tuple(ctx), tuple(cont))]] for _, ctx, cont in requests]

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Steered log-probs ``[B, T', V]`` for right-padded ``inps`` (padding never precedes a real token).

        A prompt prefix that every request shares (TruthfulQA's primer) is encoded once per run
        (:class:`svd_lightning.forward.prefix.PrefixCache`); its positions, which no request scores, are
        not returned (``T' < T``: lm-eval aligns the logits by their length).
        """
        c = self.steering_config
        with torch.autocast(self.device.type, dtype=self.mixed_precision_dtype,
                            enabled=self.mixed_precision_dtype is not None):
            warm, base = paired_logits(self.steered.model, inps, self.steered.forward_mode, skip=self._first_scored,
                                       prefixes=self.steered.prefixes)
        return steered_log_probs(warm, base, c.mu, c.alpha, c.scoring_policy, c.floor, direction=c.direction)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        from lm_eval.models.utils_hf import stop_sequences_criteria

        mask = generation_kwargs.pop("attention_mask", None)
        if mask is None:  # left padded: real tokens start at the first non-pad one
            mask = ((context != self.tokenizer.pad_token_id).long().cumsum(-1) > 0).long()
        generation_kwargs.setdefault("do_sample", False)
        if not generation_kwargs["do_sample"]:
            generation_kwargs.pop("temperature", None)
        stopping = stop_sequences_criteria(self.tokenizer, stop, context.shape[1], context.shape[0])
        with torch.autocast(self.device.type, dtype=self.mixed_precision_dtype,
                            enabled=self.mixed_precision_dtype is not None):
            return steered_generate(self.steered.model, context, mask, self.steering_config, max_length=max_length,
                                    forward_mode=self.steered.forward_mode, stopping_criteria=stopping,
                                    pad_token_id=self.tokenizer.pad_token_id, use_cache=True, **generation_kwargs)

    def get_model_info(self) -> dict:
        return {"svd_run_dir": self.steered.run_dir, **{f"svd_{k}": v for k, v in self.steering_config.to_dict().items()},
                "svd_forward_mode": self.steered.forward_mode,
                "model_num_parameters": sum(p.numel() for p in self.steered.model.parameters())}


def evaluate(run_dir: str, tasks: list[str], include_path: str | None = None, limit: int | None = None,
             batch_size: int = 8, mu: float | None = None, forward_mode: str = "auto", method: str = "svdecode",
             **kwargs) -> dict:
    """``lm_eval.simple_evaluate(model="svd", model_args={"pretrained": run_dir, ...})``: lm-eval builds the backend
    itself, and its results record the model and its arguments as for any other."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = {"pretrained": str(run_dir), "forward_mode": forward_mode, "method": method} | ({} if mu is None else {"mu": mu})
    manager = TaskManager(include_path=include_path) if include_path else None
    return lm_eval.simple_evaluate(model="svd", model_args=model_args, batch_size=batch_size, tasks=tasks,
                                   task_manager=manager, limit=limit, **kwargs)


def _known_flags(flags: list[str]) -> argparse.Namespace:
    """The lm-eval flags whose meaning we check (the rest pass to lm-eval as they are)."""
    known = argparse.ArgumentParser(add_help=False)
    for names in (("--num_fewshot", "-f"), ("--limit", "-L"), ("--output_path", "-o"), ("--include_path",), ("--seed", "-s")):
        known.add_argument(*names)
    return known.parse_known_args(flags)[0]


def lm_eval_flag_problem(flags: list[str]) -> str | None:
    """What is wrong with the lm-eval flags we know the meaning of (lm-eval reads some silently: a negative
    ``--num_fewshot`` as zero-shot, an ``--output_path`` it cannot write as done), or None."""
    args = _known_flags(flags)
    if args.num_fewshot is not None and not (args.num_fewshot.isdigit()):
        return f"--num_fewshot must be an integer ≥ 0, got {args.num_fewshot!r}"
    if args.limit is not None:
        try:
            limit = float(args.limit)
        except ValueError:
            limit = float("nan")
        if not limit > 0 or limit == float("inf") or (limit > 1 and not limit.is_integer()):
            return f"--limit must be a number of examples ≥ 1 or a fraction in (0, 1], got {args.limit!r}"
    if args.output_path is not None:
        out = Path(args.output_path).expanduser()
        if not args.output_path.strip():
            return "--output_path is empty: name the folder the results go to"
        if out.exists() and not out.is_dir():
            return f"--output_path {out} is a file: lm-eval writes a folder of results there"
        existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
        if not os.access(existing, os.W_OK):
            return f"--output_path {out} cannot be written ({existing} is not writable)"
    if args.include_path is not None and not Path(args.include_path).expanduser().exists():
        return f"--include_path {args.include_path} does not exist"
    if args.seed is not None and not all(s.strip().isdigit() or s.strip() == "None" for s in args.seed.split(",")):
        return f"--seed must be an integer ≥ 0 (or lm-eval's four, comma-separated), got {args.seed!r}"
    return None


def main(argv: list[str] | None = None, prog: str = "svd-lightning eval") -> None:
    """``lm-eval run`` with the run as the model: ``--run-dir RUN`` (and ``--mu``, ``--method``,
    ``--forward-mode``) become ``--model svd --model_args pretrained=RUN,...``; every other flag is lm-eval's
    own, and lm-eval prints its table and writes its results files (under ``<output_path>/<the run's path>/``)."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Run lm-eval tasks with a run's SVDecode: lm-eval's own `run` command with the svd model.",
        epilog="Every other flag is lm-eval's own (lm-eval run --help): --tasks, --include_path, --num_fewshot, --limit, "
               "--batch_size, --device, --gen_kwargs, --apply_chat_template, --output_path, --log_samples, --seed, ...")
    parser.add_argument("--run-dir", "--run_dir", required=True, help="a run directory, or a Hub repo id of one")
    add_override_arguments(parser)  # --mu, --method, --forward-mode, --base-model
    ours, theirs = parser.parse_known_args(argv)
    if any(a in ("--model", "-M") or a.startswith("--model=") for a in theirs):
        parser.error("the model is the run: give --run-dir (extra backend options go in --model_args)")
    problem = lm_eval_flag_problem(theirs)  # before any model loads or task runs
    if problem:
        parser.error(problem)
    model_args = {"pretrained": ours.run_dir, "base_model": ours.base_model, "mu": ours.mu, "forward_mode": ours.forward_mode,
                  "method": ours.method}
    model_args = ",".join(f"{k}={v}" for k, v in model_args.items() if v is not None)
    say(f"reading run {ours.run_dir}")
    from lm_eval.__main__ import cli_evaluate

    saved, sys.argv = sys.argv, [prog, "run", "--model", "svd", "--model_args", model_args, *theirs]
    try:
        cli_evaluate()
    except InputError as err:  # the run, its model or a setting: the message says what fixes it
        parser.error(str(err))
    except ValueError as err:
        if "Sample larger than population" not in str(err):  # random.sample in lm-eval's few-shot sampler
            raise
        parser.error(f"--num_fewshot {_known_flags(theirs).num_fewshot}: a task has fewer examples than that to draw "
                     "its few-shot examples from; give a smaller --num_fewshot")
    finally:
        sys.argv = saved


if __name__ == "__main__":
    # `python -m svd_lightning.lm_eval run --model svd --model_args run_dir=RUN --tasks ...`: lm-eval's own
    # command line (its flags, table and results files), with the `svd` model registered by this module.
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
