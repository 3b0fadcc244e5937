"""Standalone worker for tests/test_ddp.py: one full SVDecode fit on the tiny model, 1 or N CPU ranks.

Lightning's ``ddp`` strategy on CPU re-launches *this script* once per extra rank (subprocess
launcher), which only works when the script is ``__main__`` -- hence a file of its own rather than
a Trainer started inside pytest. Rank 0 writes a JSON with μ̄, every solver aggregate, the
calibration diagnostics, the per-rank calibration token counts, the validation metrics and the
deduplicated validation score tables.

    python tests/ddp_worker.py --data mc.json --root runs --out out.json --devices 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package, when the worker is started from anywhere

import lightning as L  # noqa: E402
import torch  # noqa: E402

from svd_lightning.callbacks import ContrastiveBaseline, SteeredValidation, SteeringExtraction, StrengthSolver  # noqa: E402
from svd_lightning.data import TruthfulQADataModule  # noqa: E402
from svd_lightning.logger import RunLogger  # noqa: E402
from svd_lightning.module import SteeringLM  # noqa: E402


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
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--train-batch-size", type=int, default=2)
    p.add_argument("--strength", default="choice_nll", help="choice_nll also reports exact and every token aggregate")
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # same kernels (and summation order) in every run, and light on the CPU
    L.seed_everything(0, verbose=False)
    dm = TruthfulQADataModule(
        path=args.data, instruction=False, batch_size=args.batch_size, train_batch_size=args.train_batch_size,
        calib_batch_size=args.train_batch_size,
        max_length=128, limit_train=args.limit_train, limit_calib=args.limit_calib, limit_test=args.limit_test,
    )
    module = SteeringLM("tiny-random", adapter=args.adapter, learning_rate=args.learning_rate)
    extraction, solver, report = SteeringExtraction(), StrengthSolver(args.strength), SteeredValidation(print_table=False)
    tables = ScoreTables()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=1,
        logger=RunLogger(args.root, name="ddp", version=0),
        callbacks=[extraction, solver, ContrastiveBaseline(), report, tables],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, dm)

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
        }
        Path(args.out).write_text(json.dumps(payload, indent=2))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        trainer.strategy.barrier()
        torch.distributed.destroy_process_group()  # a clean gloo shutdown before the interpreter exits


if __name__ == "__main__":
    main()
