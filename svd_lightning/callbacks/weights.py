"""Which warm-start weights a fit's run carries: the best checkpoint's or the last."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from svd_lightning.callbacks.solvers import ContrastiveBaseline, StrengthSolver


Weights = Literal["best", "last"]


def monitoring_checkpoint(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The ``ModelCheckpoint`` that ranks checkpoints by a monitored metric, if the trainer has one."""
    return next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)


class CheckpointWeights(L.Callback):
    """Which warm-start weights a fit's run is calibrated on, written with and tested: ``best`` (the
    default) takes the best checkpoint of a ``ModelCheckpoint`` that monitors a metric -- what
    ``trainer.test(ckpt_path="best")`` would score -- and the last weights where there is none (or it
    saved nothing); ``last`` always takes the last (e.g. after EarlyStopping's patience ran out).

    At the end of ``fit`` it loads that checkpoint's weights into the module and solves μ̄ (and γ) on them
    again (one calibration pass: the run's record is the calibration of those weights), before the module
    writes the run. ``steering.json`` records the choice under ``weights``.
    """

    def __init__(self, weights: Weights = "best"):
        if weights not in ("best", "last"):
            raise ValueError(f"weights must be 'best' or 'last', got {weights!r}")
        self.weights = weights
        self.chosen: dict = {"from": "last"}

    def on_train_end(self, trainer, pl_module):  # before the module's on_train_end writes the run
        checkpoint = monitoring_checkpoint(trainer)
        self.chosen = {"from": "last", "global_step": trainer.global_step}
        best = checkpoint.best_model_path if checkpoint is not None and self.weights == "best" else ""
        if best:
            saved = trainer.strategy.load_checkpoint(best)
            self.chosen = {"from": "best", "checkpoint": Path(best).name, "monitor": checkpoint.monitor,
                           "mode": checkpoint.mode, "score": float(checkpoint.best_model_score),
                           "global_step": int(saved["global_step"])}
            if self.chosen["global_step"] != trainer.global_step:
                trainer.strategy.load_model_state_dict(saved)
                rank_zero_info(f"the run takes the best checkpoint's weights ({checkpoint.monitor} = "
                               f"{self.chosen['score']:.4f}, step {self.chosen['global_step']} of {trainer.global_step}; "
                               "weights: last keeps the last)")
                self._solve_again(trainer, pl_module)
        state = pl_module.steering_state
        if state.run is not None:
            state.run = dataclasses.replace(state.run, weights=dict(self.chosen),
                                            global_step=self.chosen["global_step"])

    @staticmethod
    def _solve_again(trainer, pl_module) -> None:
        state = pl_module.steering_state
        state.calibration, state.run, state.contrastive, state.fit_ended = None, None, None, True
        pl_module.steering_strength.fill_(float("nan"))
        pl_module.contrastive_gamma.fill_(float("nan"))
        for kind in (StrengthSolver, ContrastiveBaseline):  # μ̄, then γ, as validation solves them
            for solver in (c for c in trainer.callbacks if isinstance(c, kind)):
                solver.solve(trainer, pl_module)

    def state_dict(self):
        return {"chosen": self.chosen}
