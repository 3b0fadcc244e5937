"""svd-lightning next to the tools a user would run instead, on one machine, side by side:

- **scoring**: lm-eval's ``hf`` model on the run's warm-started peft model (plain, the way a user scores a PEFT
  model today) against our steered scoring (``SteeredModel.score``: both distributions, μ̄ applied) and our plain
  scoring (the warm model alone), on the run's TruthfulQA MC1 + MC2 test questions as local lm-eval tasks;
  seconds per question, and the plain MC2 of both per question (equal to 1e-6);
- **warm start**: the Hugging Face ``Trainer`` + peft LoRA against our ``SteeringLM`` under Lightning's
  ``Trainer``, on the same batches in the same order (the run's config: prompt, batch size, learning rate,
  precision), from the same adapter initialisation, for the same number of steps; seconds per step, peak
  memory, and the two loss curves;
- **generation**: ``transformers`` ``generate`` (plain) against our steered generation, greedy, tokens per
  second at batch 1 and 8.

Every side runs ``--repeats`` times, interleaved (repeat r of every side before repeat r + 1 of any), so machine
noise hits both alike; each figure is the median with its min and max, each ratio the ratio of medians. Model
loading, task indexing and data preparation are outside every timing.

    python -m benchmarks.peers --run-dir runs/truthfulqa-lora/version_0 --limit 40 --steps 20 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.cost import PeakMemory
from benchmarks.lm_eval_truthfulqa import write_tasks
from svd_lightning import SteeredModel, SteeringConfig, SteeringLM, steered_generate
from svd_lightning.batch import Tokenized, collate_choices
from svd_lightning.data import TruthfulQADataModule
from svd_lightning.experimental import score_choice_variants
from svd_lightning.files import portable_path, write_json
from svd_lightning.metrics import truthfulqa_per_question
from svd_lightning.models import apply_adapter, load_causal_lm, load_tokenizer
from svd_lightning.precision import describe_cpu

ROOT = Path(__file__).resolve().parent
TASKS = ("svd_truthfulqa_mc1", "svd_truthfulqa_mc2")


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(sides: dict, repeats: int, device: torch.device = torch.device("cpu")) -> dict[str, dict]:
    """Seconds of every side, ``repeats`` rounds, each round running every side once (the first round warms
    caches and allocators for all alike, and counts: a user runs it once)."""
    seconds = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: spread(values) for name, values in seconds.items()}


# -- scoring ---------------------------------------------------------------------------------------------
def our_plain_mc2(sm: SteeredModel, questions, scores: list[dict]) -> list[float]:
    """Per-question plain MC2 from ``SteeredModel.score``'s plain scores (our metric code)."""
    out = []
    for q, s in zip(questions, scores):
        n = len(q.choices)
        per_q = truthfulqa_per_question(torch.zeros(n, dtype=torch.long), torch.tensor(q.choice_sets),
                                        torch.arange(n), torch.tensor(q.is_true), torch.tensor(s["plain"]))
        out.append(float(per_q["mc2"][0]))
    return out


def scoring(sm: SteeredModel, questions, repeats: int, batch_size: int) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder = Path(tempfile.mkdtemp(prefix="svd_peers_"))
    write_tasks(folder, questions)
    tasks = TaskManager(include_path=str(folder), include_defaults=False)  # indexed once, outside the timing
    hf = HFLM(pretrained=sm.model, tokenizer=sm.tokenizer, batch_size=batch_size)  # lm-eval's plain `hf` model
    # The same rows on both sides: lm-eval keeps the last max_length + 1 tokens of context + continuation, so do we.
    sm.max_length = hf.max_length + 1
    prompts, choices = [q.prompt for q in questions], [q.choices for q in questions]
    batches = [{k: v.to(sm.device) for k, v in collate_choices(questions[i : i + batch_size],
                                                               Tokenized(sm.tokenizer, sm.max_length)).items()}
               for i in range(0, len(questions), batch_size)]
    got: dict = {}

    def lm_eval_plain():
        got["lm_eval"] = simple_evaluate(model=hf, tasks=list(TASKS), task_manager=tasks, log_samples=True,
                                         verbosity="ERROR")

    def ours_steered():
        got["ours"] = sm.score(prompts, choices, batch_size=batch_size)

    def ours_plain():
        with torch.no_grad():
            for batch in batches:
                score_choice_variants(sm.model, batch, {}, with_base=False, prefixes=sm.prefixes)

    seconds = interleaved({"lm_eval_hf_plain": lm_eval_plain, "ours_steered": ours_steered, "ours_plain": ours_plain},
                          repeats, sm.device)
    samples = {s["doc_id"]: s for s in got["lm_eval"]["samples"]["svd_truthfulqa_mc2"]}
    theirs = [samples[i]["mc2"] for i in range(len(questions))]
    mine = our_plain_mc2(sm, questions, got["ours"])
    ll_diff = 0.0  # every MC2 choice's plain log-likelihood, lm-eval's against ours
    for i, (q, s) in enumerate(zip(questions, got["ours"])):
        ours_ll = [x for x, cs in zip(s["plain"], q.choice_sets) if cs == 1]
        their_ll = [float(r[0] if isinstance(r, (list, tuple)) else r) for r in samples[i]["filtered_resps"]]
        if len(ours_ll) != len(their_ll):
            raise RuntimeError(f"question {i}: lm-eval scored {len(their_ll)} MC2 choices, we scored {len(ours_ll)}")
        ll_diff = max(ll_diff, *(abs(a - b) for a, b in zip(ours_ll, their_ll)))
    n = len(questions)
    per_question = {name: {k: v / n for k, v in s.items() if k != "all"} | {"all": [v / n for v in s["all"]]}
                    for name, s in seconds.items()}
    return {"questions": n, "batch_size": batch_size, "seconds_per_question": per_question,
            "plain_mc2": {"lm_eval": sum(theirs) / n, "ours": sum(mine) / n,
                          "max_abs_diff_per_question": max(abs(a - b) for a, b in zip(theirs, mine)),
                          "loglikelihood_max_abs_diff": ll_diff},
            "scoring_vs_lm_eval_ratio": seconds["ours_steered"]["median"] / seconds["lm_eval_hf_plain"]["median"],
            "plain_scoring_vs_lm_eval_ratio": seconds["ours_plain"]["median"] / seconds["lm_eval_hf_plain"]["median"]}


# -- warm start ------------------------------------------------------------------------------------------
class _Batches(torch.utils.data.IterableDataset):
    """The recorded batches, in their order (an IterableDataset: the HF Trainer does not shuffle it)."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def _lightning_warm_start(config: dict, batches: list[dict], precision: str, device: torch.device
                          ) -> tuple[float, float, list[float]]:
    import lightning as L

    model_args = config["model"]
    module = SteeringLM(model=model_args.get("model"), adapter="lora", adapter_options=model_args.get("adapter_options"),
                        learning_rate=model_args.get("learning_rate", 5e-5), weight_decay=model_args.get("weight_decay", 0.0),
                        seed=model_args.get("seed", 0))
    losses: list[float] = []
    clock: dict[str, float] = {}

    class Record(L.Callback):  # the training loop's own time: from its start to its end, as on the HF side
        def on_train_start(self, trainer, pl_module):
            _sync(device)
            clock["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

        def on_train_end(self, trainer, pl_module):
            _sync(device)
            clock["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as root:  # SteeringLM writes a run of the adapter at the end (untimed)
        trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=len(batches),
                            precision=precision, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, callbacks=[Record()], default_root_dir=root)
        loader = torch.utils.data.DataLoader(_Batches(batches), batch_size=None)
        torch.manual_seed(model_args.get("seed", 0))  # the dropout masks from the seed the HF Trainer sets too
        with PeakMemory(device, release=True) as memory:  # each side its own peak: freed heap handed back first
            trainer.fit(module, train_dataloaders=loader)
    return clock["end"] - clock["start"], memory.extra_mb, losses


def _loop_clock(device: torch.device):
    from transformers import TrainerCallback

    class LoopClock(TrainerCallback):
        """The HF Trainer's training loop, from its start to its end."""

        def on_train_begin(self, args, state, control, **kwargs):
            _sync(device)
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            _sync(device)
            self.end = time.perf_counter()

    return LoopClock()


def _hf_trainer_warm_start(config: dict, batches: list[dict], precision: str, device: torch.device
                           ) -> tuple[float, float, list[float], float | None]:
    from transformers import Trainer, TrainingArguments

    model_args = config["model"]
    torch.manual_seed(model_args.get("seed", 0))  # the adapter's initialisation, as SteeringLM draws it
    model = apply_adapter(load_causal_lm(model_args.get("model")), "lora", **(model_args.get("adapter_options") or {}))
    model.train()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=1, max_steps=len(batches),
                                 learning_rate=model_args.get("learning_rate", 5e-5),
                                 weight_decay=model_args.get("weight_decay", 0.0), lr_scheduler_type="constant",
                                 max_grad_norm=0.0, optim="adamw_torch", logging_steps=1, save_strategy="no",
                                 report_to=[], use_cpu=device.type == "cpu", bf16=precision.startswith("bf16"),
                                 dataloader_num_workers=0, disable_tqdm=True, seed=model_args.get("seed", 0))
        clock = _loop_clock(device)
        trainer = Trainer(model=model, args=args, train_dataset=_Batches(batches), data_collator=lambda items: items[0],
                          callbacks=[clock])
        with PeakMemory(device, release=True) as memory:  # each side its own peak: freed heap handed back first
            trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    dropout = getattr(model.peft_config[model.active_adapter], "lora_dropout", None)
    return clock.end - clock.start, memory.extra_mb, losses, dropout


def warm_start(config: dict, steps: int, repeats: int, precision: str, device: torch.device) -> dict:
    data = dict(config["data"]["init_args"])
    dm = TruthfulQADataModule(**{**data, "limit_train": steps * int(data.get("train_batch_size") or 1)})
    dm.prepare_data()
    dm.tokenizer = load_tokenizer(config["model"].get("model"))
    dm.setup("fit")
    torch.manual_seed(config.get("seed_everything") or 0)
    batches = list(dm.train_dataloader())[:steps]
    runs = {"ours_lightning": [], "hf_trainer_peft": []}
    for _ in range(repeats):  # interleaved
        runs["ours_lightning"].append(_lightning_warm_start(config, batches, precision, device))
        runs["hf_trainer_peft"].append(_hf_trainer_warm_start(config, batches, precision, device))
    out = {"steps": len(batches), "batch_size": int(batches[0]["input_ids"].shape[0]), "precision": precision,
           "lora_dropout": runs["hf_trainer_peft"][0][3]}  # the adapter both sides built
    for name, results in runs.items():
        out[name] = {"seconds_per_step": spread([r[0] / len(batches) for r in results]),
                     "steps_per_second": spread([len(batches) / r[0] for r in results]),
                     "peak_extra_mb": spread([r[1] for r in results]), "losses": results[0][2]}
    a, b = out["ours_lightning"]["losses"], out["hf_trainer_peft"]["losses"]
    out["loss_max_abs_diff"] = max(abs(x - y) for x, y in zip(a, b)) if len(a) == len(b) else None
    out["warm_start_vs_trainer_ratio"] = (out["ours_lightning"]["seconds_per_step"]["median"]
                                          / out["hf_trainer_peft"]["seconds_per_step"]["median"])
    return out


# -- generation ------------------------------------------------------------------------------------------
def generation(sm: SteeredModel, prompts: list[str], new_tokens: int, repeats: int, batch_sizes=(1, 8)) -> dict:
    tok = sm.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    out = {"new_tokens": new_tokens}
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    try:
        for b in batch_sizes:
            enc = tok((prompts * b)[:b], return_tensors="pt", padding=True).to(sm.device)
            with torch.no_grad():
                seconds = interleaved({
                    "transformers_plain": lambda: sm.model.generate(**enc, **kw),
                    "ours_steered": lambda: steered_generate(sm.model, enc["input_ids"], enc["attention_mask"], sm.config,
                                                             **kw)}, repeats, sm.device)
            tokens = new_tokens * b
            out[f"batch_{b}"] = {name: {"tokens_per_second": spread([tokens / x for x in s["all"]])} for name, s in seconds.items()}
            out[f"generation_steered_vs_plain_ratio_b{b}"] = seconds["ours_steered"]["median"] / seconds["transformers_plain"]["median"]
    finally:
        tok.padding_side = side
    return out


def table(result: dict) -> str:
    s, w, g = result["scoring"], result["warm_start"], result["generation"]
    sec = s["seconds_per_question"]
    lines = [f"svd-lightning vs the tools a user would run instead -- {result['machine']}, {result['threads']} threads, "
             f"{result['repeats']} interleaved repeats (median [min, max])", "",
             "| comparison | theirs | ours | ratio (ours / theirs) |", "|---|---|---|---|"]

    def m(x, fmt="{:.3f}"):
        return f"{fmt.format(x['median'])} [{fmt.format(x['min'])}, {fmt.format(x['max'])}]"

    lines.append(f"| scoring, s/question ({s['questions']} q., batch {s['batch_size']}): lm-eval `hf` plain vs our steered | "
                 f"{m(sec['lm_eval_hf_plain'])} | {m(sec['ours_steered'])} | {s['scoring_vs_lm_eval_ratio']:.3f} |")
    lines.append(f"| scoring, s/question: lm-eval `hf` plain vs our plain | {m(sec['lm_eval_hf_plain'])} | "
                 f"{m(sec['ours_plain'])} | {s['plain_scoring_vs_lm_eval_ratio']:.3f} |")
    lines.append(f"| warm start, s/step ({w['steps']} steps, batch {w['batch_size']}, {w['precision']}): HF Trainer + peft vs "
                 f"ours | {m(w['hf_trainer_peft']['seconds_per_step'])} | {m(w['ours_lightning']['seconds_per_step'])} | "
                 f"{w['warm_start_vs_trainer_ratio']:.3f} |")
    lines.append(f"| warm start, peak extra MB | {m(w['hf_trainer_peft']['peak_extra_mb'], '{:.0f}')} | "
                 f"{m(w['ours_lightning']['peak_extra_mb'], '{:.0f}')} | |")
    for key in sorted(k for k in g if k.startswith("batch_")):
        b = key.removeprefix("batch_")
        lines.append(f"| generation, tokens/s (greedy, {g['new_tokens']} new, batch {b}): `generate` plain vs our steered | "
                     f"{m(g[key]['transformers_plain']['tokens_per_second'], '{:.1f}')} | "
                     f"{m(g[key]['ours_steered']['tokens_per_second'], '{:.1f}')} | "
                     f"{g[f'generation_steered_vs_plain_ratio_b{b}']:.3f} (time) |")
    p = s["plain_mc2"]
    dropout = f"LoRA dropout {w['lora_dropout']}" + (", drawn from the same seed on both sides" if w["lora_dropout"] else "")
    lines += ["", f"Plain MC2: lm-eval {p['lm_eval']:.6f}, ours {p['ours']:.6f}, largest per-question difference "
                  f"{p['max_abs_diff_per_question']:.1e}; every choice's log-likelihood equal to "
                  f"{p['loglikelihood_max_abs_diff']:.1e} nats. Warm-start losses: largest per-step difference "
                  f"{w['loss_max_abs_diff']:.2e} ({dropout})."]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="a run written by `svd-lightning fit` (its config.yaml gives the data)")
    ap.add_argument("--limit", type=int, default=40, help="test questions scored")
    ap.add_argument("--batch-size", type=int, default=1, help="scoring batch size, both sides")
    ap.add_argument("--steps", type=int, default=20, help="warm-start steps, both sides")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="32-true", help="the warm start's, both sides (scoring is fp32)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: every side runs there")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "peers.json")
    args = ap.parse_args(argv)
    config = yaml.safe_load((Path(args.run_dir) / "config.yaml").read_text())
    data = config["data"]["init_args"]
    dm = TruthfulQADataModule(**{**data, "limit_test": args.limit})
    dm.prepare_data()
    questions = list(dm.test_set)
    device = torch.device(args.device)
    sm = SteeredModel.from_run_dir(args.run_dir, device=device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else describe_cpu()
    result = {"run_dir": portable_path(args.run_dir), "machine": machine, "threads": torch.get_num_threads(),
              "repeats": args.repeats, "torch": torch.__version__,
              "scoring": scoring(sm, questions, args.repeats, args.batch_size),
              "generation": generation(sm, [q.prompt for q in questions], args.new_tokens, args.repeats),
              "warm_start": warm_start(config, args.steps, args.repeats, args.precision, device)}
    write_json(args.out, result)
    print(table(result))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
