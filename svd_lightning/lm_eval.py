"""lm-evaluation-harness backend: any lm-eval task, scored and generated with a run's SVDecode.

    import svd_lightning.lm_eval  # registers the model name "svd"
    lm_eval.simple_evaluate(model="svd", model_args="run_dir=runs/truthfulqa-lora/version_0", tasks=[...])

    svd-lightning eval --run-dir RUN --tasks truthfulqa_mc1 [--include-path DIR] [--limit N] \\
        [--num_fewshot K] [--output_path DIR [--log_samples]] [--seed S]

Log-likelihood requests are scored under the steered distribution of the run's scoring policy
(:func:`svd_lightning.steering.steered_log_probs`, from the warm and pre-trained logits of the same
tokens); ``generate_until`` goes through the steering logits processor. ``model_args``: ``run_dir``
(required), ``mu`` (override μ̄; ``mu=0`` gives the warm model under the default policy), ``method``
(``svdecode``, or ``contrastive``: the run's γ), ``forward_mode``,
``batch_size``, ``device``, ``max_length``. Needs the ``lm-eval`` extra: ``pip install -e ".[lm-eval]"``.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from svd_lightning.api import SteeredModel
from svd_lightning.config import FORWARD_MODES, METHODS
from svd_lightning.decoding import paired_logits, steered_generate
from svd_lightning.precision import check_steering_precision
from svd_lightning.steering import steered_log_probs
from svd_lightning.progress import say


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

    def __init__(self, run_dir: str, mu: float | None = None, forward_mode: str = "auto", method: str = "svdecode",
                 device: str | None = None, batch_size: int | str = 1, max_length: int | None = None, **kwargs):
        unknown = sorted(set(kwargs) - HFLM_OPTIONS)
        if unknown:  # HFLM would ignore them: `muu=1` must not silently mean "the run's μ̄"
            raise ValueError(f"model_args: unknown option(s) {unknown} for the svd backend; it takes run_dir, mu, "
                             f"forward_mode, method, device, batch_size, max_length and HFLM's {sorted(HFLM_OPTIONS)}")
        if mu is not None:
            mu = _number(mu, "mu")
        overrides = {"forward_mode": forward_mode} | ({} if mu is None else {"mu": float(mu)})
        self.steered = SteeredModel.from_run_dir(run_dir, device=device, **overrides)
        self.steering_config = self.steered.config.method(method)  # what every request is scored and generated with
        self._first_scored = 0  # see _loglikelihood_tokens
        super().__init__(pretrained=self.steered.model, tokenizer=self.steered.tokenizer, batch_size=batch_size,
                         max_length=max_length, **kwargs)
        check_steering_precision(self.steered.model, self.steering_config.mu, f"lm-eval svd backend ({run_dir})",
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
        (:func:`svd_lightning.decoding.split_prefix`); its positions, which no request scores, are
        not returned (``T' < T``: lm-eval aligns the logits by their length).
        """
        c = self.steering_config
        with torch.autocast(self.device.type, dtype=self.mixed_precision_dtype,
                            enabled=self.mixed_precision_dtype is not None):
            warm, base = paired_logits(self.steered.model, inps, c.forward_mode, skip=self._first_scored)
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
                                    stopping_criteria=stopping,
                                    pad_token_id=self.tokenizer.pad_token_id, use_cache=True, **generation_kwargs)

    def get_model_info(self) -> dict:
        return {"svd_run_dir": self.steered.run_dir, **{f"svd_{k}": v for k, v in self.steering_config.to_dict().items()},
                "model_num_parameters": sum(p.numel() for p in self.steered.model.parameters())}


def evaluate(run_dir: str, tasks: list[str], include_path: str | None = None, limit: int | None = None,
             batch_size: int = 8, mu: float | None = None, forward_mode: str = "auto", method: str = "svdecode",
             **kwargs) -> dict:
    """``lm_eval.simple_evaluate(model="svd", model_args={"run_dir": run_dir, ...})``: lm-eval builds the backend
    itself, and its results record the model and its arguments as for any other."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = {"run_dir": str(run_dir), "forward_mode": forward_mode, "method": method} | ({} if mu is None else {"mu": mu})
    manager = TaskManager(include_path=include_path) if include_path else None
    return lm_eval.simple_evaluate(model="svd", model_args=model_args, batch_size=batch_size, tasks=tasks,
                                   task_manager=manager, limit=limit, **kwargs)


def run_name(run_dir: str | Path) -> str:
    """What lm-eval's results folder is named after (it would draw a random name: ``run_dir`` is no key it
    knows): the run's root and version, e.g. ``truthfulqa-lora/version_0`` (sanitized to ``__`` by lm-eval)."""
    path = Path(run_dir).resolve()
    return f"{path.parent.name}/{path.name}"


def _seeds(value: str) -> list[int | None]:
    """lm-eval's ``--seed``: one integer for all four seeds, or four comma-separated (``None`` leaves one unset)."""
    items = [None if v.strip().lower() == "none" else int(v) for v in value.split(",")]
    if len(items) == 1:
        return items * 4
    if len(items) != 4:
        raise argparse.ArgumentTypeError(f"--seed takes 1 or 4 comma-separated values, got {value!r}")
    return items


def main(argv: list[str] | None = None, prog: str = "svd-lightning eval") -> None:
    parser = argparse.ArgumentParser(prog=prog, description="Run lm-eval tasks with a run's SVDecode. Flags as "
                                     "lm-eval's own (`lm-eval run`) where they mean the same.")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include-path", "--include_path", help="folder of extra task YAMLs")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--batch-size", "--batch_size", type=int, default=8)
    parser.add_argument("--num_fewshot", "--num-fewshot", type=int, help="few-shot examples per prompt (lm-eval's)")
    parser.add_argument("--output_path", "--output-path", help="write lm-eval's own results files here "
                        "(<output_path>/<model>/results_<time>.json, and samples_<task>_<time>.jsonl with --log_samples)")
    parser.add_argument("--log_samples", "--log-samples", action="store_true",
                        help="keep every request's inputs and outputs (needs --output_path)")
    parser.add_argument("--seed", type=_seeds, default=_seeds("0,1234,1234,1234"),
                        help="python, numpy, torch and few-shot seeds as lm-eval takes them (default 0,1234,1234,1234)")
    parser.add_argument("--mu", type=float, help="override μ̄ (finite)")
    parser.add_argument("--forward-mode", choices=FORWARD_MODES, default="auto")
    parser.add_argument("--method", choices=METHODS, default="svdecode",
                        help="svdecode, or contrastive: z_φ + γ(z_φ − z_θ) with the run's γ")
    parser.add_argument("--out", help="also write a compact JSON (the metrics table and lm-eval's config) here")
    args = parser.parse_args(argv)
    if args.log_samples and not args.output_path:
        parser.error("--log_samples needs --output_path (where lm-eval writes the samples)")
    from lm_eval.loggers import EvaluationTracker

    say(f"reading run {Path(args.run_dir).resolve()}")
    tracker = EvaluationTracker(output_path=args.output_path) if args.output_path else None
    python_seed, numpy_seed, torch_seed, fewshot_seed = args.seed
    results = evaluate(args.run_dir, args.tasks.split(","), args.include_path, args.limit, args.batch_size,
                       args.mu, args.forward_mode, args.method, num_fewshot=args.num_fewshot,
                       log_samples=args.log_samples, evaluation_tracker=tracker, random_seed=python_seed,
                       numpy_random_seed=numpy_seed, torch_random_seed=torch_seed, fewshot_random_seed=fewshot_seed)
    samples = results.pop("samples", None)
    if tracker is not None:
        from lm_eval.utils import sanitize_model_name

        names = tracker.general_config_tracker
        names.model_name = run_name(args.run_dir)
        names.model_name_sanitized = sanitize_model_name(names.model_name)
        tracker.save_results_aggregated(results=results, samples=samples if args.log_samples else None)
        if args.log_samples:
            for task_name in results["configs"]:
                tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
        say(f"lm-eval results written under {Path(args.output_path).resolve() / names.model_name_sanitized}")
    from lm_eval.utils import make_table

    table = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
             for task, metrics in results["results"].items()}
    print(make_table(results))  # lm-eval's own table, as `lm_eval` prints it
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.out:
        from svd_lightning.run import atomic_write_text

        atomic_write_text(args.out, json.dumps({"results": table, "config": results.get("config", {})}, indent=1,
                                               default=str))


if __name__ == "__main__":
    # `python -m svd_lightning.lm_eval run --model svd --model_args run_dir=RUN --tasks ...`: lm-eval's own
    # command line (its flags, table and results files), with the `svd` model registered by this module.
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
