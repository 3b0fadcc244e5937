"""Standalone worker for tests/test_ddp.py and tests/test_sharding.py: one full SVDecode fit on the
tiny model, 1 or N CPU ranks, under ``ddp`` or ``fsdp2`` (FSDP2, the model sharded across ranks).

Lightning's multi-process strategies on CPU re-launch *this script* once per extra rank (subprocess
launcher), which only works when the script is ``__main__`` -- hence a file of its own rather than
a Trainer started inside pytest. Rank 0 writes a JSON with μ̄, every solver aggregate, the
calibration diagnostics, the per-rank calibration token counts, the validation metrics, the
deduplicated validation score tables, the run directory, each rank's peak memory and parameter
bytes and (``--generate``) the greedy plain and steered answers of a few prompts, which the ranks
share out unevenly.

    python tests/ddp_worker.py --data mc.json --root runs --out out.json --devices 2 [--strategy fsdp2]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package, when the worker is started from anywhere

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DistributedSampler  # noqa: E402

from svd_lightning.batch import collate_lm  # noqa: E402
from svd_lightning.callbacks import (CheckpointWeights, ContrastiveBaseline, SteeredValidation, SteeringExtraction,  # noqa: E402
                                     StrengthSolver)
from svd_lightning.data import TruthfulQADataModule  # noqa: E402
from svd_lightning.data.base import ResumableLoader  # noqa: E402
from svd_lightning.generation import generate_answers  # noqa: E402
from svd_lightning.logger import RunLogger  # noqa: E402
from svd_lightning.module import SteeringLM  # noqa: E402
from svd_lightning.sharding import local_bytes  # noqa: E402

PROMPTS = ["Q: What happens in case 3?\nA:", "Q: What is the capital of France?\nA:", "Q: Yes or No?\nA:",
           "Q: What happens if you eat a pomegranate?\nA:", "Q:"]


class ScoreTables(L.Callback):
    """The deduplicated, rank-merged score table of each variant, read before the module resets it.

    Callback hooks run before the LightningModule's ``on_validation_epoch_end``; ``table()`` syncs
    (a collective), so every rank calls it.
    """

    def __init__(self):
        self.tables: dict[str, dict[str, list]] = {}

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        for v in ("plain", "base", "steered"):
            metric = pl_module.metrics[f"val_{v}"]
            if metric.update_count:
                t = metric.table()
                self.tables[v] = {k: t[k].tolist() for k in ("question_index", "choice_set", "choice_index", "score")}
        rows = torch.tensor([float(sum(len(x) for x in pl_module.metrics["val_plain"].score))])
        self.local_rows = trainer.strategy.all_gather(rows).reshape(-1).tolist() if trainer.world_size > 1 else [rows.item()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--root", required=True, help="log dir of the run")
    p.add_argument("--out", required=True, help="JSON written by rank 0")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--adapter", default="prompt_tuning")
    p.add_argument("--learning-rate", type=float, default=0.0)
    p.add_argument("--limit-train", type=int, default=4)
    p.add_argument("--limit-calib", type=int, default=5)
    p.add_argument("--limit-test", type=int, default=7)
    p.add_argument("--split", type=float, nargs="+", default=[0.4, 0.2, 0.2, 0.2], help="train/calib/val/test")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--train-batch-size", type=int, default=2)
    p.add_argument("--strength", default="choice_nll", help="choice_nll also reports exact and every token aggregate")
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp2"], help="with --devices > 1")
    p.add_argument("--adapter-options", type=json.loads, default=None, help="JSON, e.g. {\"lora_dropout\": 0}")
    p.add_argument("--forward-mode", default="auto")
    p.add_argument("--generate", type=int, default=0, help="greedy new tokens for the test prompts (0: none)")
    p.add_argument("--max-steps", type=int, default=-1, help="stop the warm start early, with a checkpoint")
    p.add_argument("--best-of-epochs", type=int, default=0,
                   help="train this many epochs; a ModelCheckpoint ranks the first best and CheckpointWeights takes it")
    p.add_argument("--ckpt-path", default=None, help="resume the fit from this checkpoint")
    p.add_argument("--in-order", action="store_true",
                   help="train in file order: batch k of one process holds the questions of step k of N ranks")
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # same kernels (and summation order) in every run, and light on the CPU
    L.seed_everything(0, verbose=False)
    dm = TruthfulQADataModule(
        path=args.data, instruction=False, batch_size=args.batch_size, train_batch_size=args.train_batch_size,
        calib_batch_size=args.train_batch_size,
        max_length=128, limit_train=args.limit_train, limit_calib=args.limit_calib, limit_test=args.limit_test,
        split=tuple(args.split),
    )
    if args.in_order:  # Lightning's own DistributedSampler always shuffles the training set
        def in_order():
            ranks = torch.distributed.is_available() and torch.distributed.is_initialized()
            return ResumableLoader(dm.train_set, batch_size=dm.train_batch_size, collate_fn=partial(collate_lm, tok=dm.tokenized),
                                   sampler=DistributedSampler(dm.train_set, shuffle=False) if ranks else None)
        dm.train_dataloader = in_order
    module = SteeringLM("tiny-random", adapter=args.adapter, learning_rate=args.learning_rate,
                        adapter_options=args.adapter_options, forward_mode=args.forward_mode)
    extraction, solver, report = SteeringExtraction(), StrengthSolver(args.strength), SteeredValidation(print_table=False)
    tables = ScoreTables()
    checkpoints = [L.pytorch.callbacks.ModelCheckpoint(Path(args.root) / "checkpoints", every_n_train_steps=1,
                                                       save_top_k=-1)] if args.max_steps > 0 else []
    best = [L.pytorch.callbacks.ModelCheckpoint(Path(args.root) / "best", monitor="step", mode="min", save_top_k=1),
            CheckpointWeights()] if args.best_of_epochs else []
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy if args.devices > 1 else "auto",
        max_epochs=max(1, args.best_of_epochs),
        max_steps=args.max_steps,
        logger=RunLogger(args.root, name="ddp", version=0),
        # an interrupted warm start (--max-steps) is only its checkpoints: a half-trained adapter need not solve
        callbacks=checkpoints or [extraction, solver, ContrastiveBaseline(), report, tables, *best],
        enable_checkpointing=bool(checkpoints or best),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, dm, ckpt_path=args.ckpt_path)
    gather = (lambda x: _gather_objects(x, trainer.world_size)) if trainer.world_size > 1 else (lambda x: [x])
    if args.max_steps > 0:  # an interrupted warm start: its checkpoints are the result
        if trainer.is_global_zero:
            saved = sorted(str(c) for c in (Path(args.root) / "checkpoints").iterdir())
            Path(args.out).write_text(json.dumps({"checkpoints": saved, "global_step": trainer.global_step}))
        _shutdown(trainer)
        return
    answers = []
    if args.generate:
        module.model.eval()
        mine = PROMPTS[trainer.global_rank :: trainer.world_size]  # uneven on purpose: 3 and 2 prompts
        rows = generate_answers(module.model, module.tokenizer, mine, module.steering_config, batch_size=1,
                                progress=False, forward_mode=args.forward_mode, max_new_tokens=args.generate)
        answers = sorted((r for part in gather(rows) for r in part), key=lambda r: PROMPTS.index(r["prompt"]))
    own_bytes, all_bytes = local_bytes(module.model)
    memory = gather({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                     "param_bytes": own_bytes, "all_param_bytes": all_bytes})

    # Per-rank view of the calibration pass (before the cross-rank merge), gathered to rank 0.
    local = torch.tensor([float(extraction.result.cache.count)], dtype=torch.float64)
    per_rank = trainer.strategy.all_gather(local).reshape(-1).tolist() if trainer.world_size > 1 else [local.item()]
    if trainer.is_global_zero:
        sol = solver.solution
        payload = {
            "world_size": trainer.world_size,
            "mu": sol["steering"]["mu"],
            "module_mu": module.mu,
            "gamma": module.gamma,
            "contrastive_losses": module.steering_state.contrastive["losses"],
            "calibration_passes": module.steering_state.calibration_passes,
            "weights": module.steering_state.run.weights if module.steering_state.run else None,
            "global_step": trainer.global_step,
            "aggregates": sol["aggregates"],
            "diagnostics": sol["diagnostics"],
            "stats_count": extraction.result.stats.count,
            "cache_count_per_rank": per_rank,
            "metrics": dict(module.steering_state.metrics),
            "history": report.history,
            "score_tables": tables.tables,
            "val_rows_per_rank": tables.local_rows,  # before dedup: DistributedSampler pads
            "calib_questions": len(dm.calib_set),
            "test_questions": len(dm.test_set),
            "run_dir": str(trainer.logger.run.committed or ""),
            "answers": answers,
            "memory_per_rank": memory,
        }
        Path(args.out).write_text(json.dumps(payload, indent=2))
    _shutdown(trainer)


def _gather_objects(obj, world: int) -> list:
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _shutdown(trainer) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        trainer.strategy.barrier()
        torch.distributed.destroy_process_group()  # a clean gloo shutdown before the interpreter exits


if __name__ == "__main__":
    main()
