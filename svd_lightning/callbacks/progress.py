"""Lightning's progress bar for logs: the lines of :mod:`svd_lightning.progress` for train/val/test/predict."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.callbacks import ProgressBar

from svd_lightning.progress import PlainProgress


class LogProgressBar(ProgressBar):
    """Lightning's progress bar for logs: plain lines with rate and ETA for train/val/test/predict.

    :class:`svd_lightning.cli.SteeringCLI` installs it instead of tqdm when stderr is not a terminal.
    """

    def __init__(self, interval: float | None = None):
        super().__init__()
        self.interval = interval
        self._enabled = True
        self._bar: PlainProgress | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _start(self, desc: str, total) -> None:
        total = int(total) if isinstance(total, (int, float)) and total != float("inf") else None
        self._bar = PlainProgress(desc, total, "batch", self.interval, enabled=self._enabled and self.is_enabled_rank)

    @property
    def is_enabled_rank(self) -> bool:
        return self.trainer is None or self.trainer.is_global_zero

    def _step(self, trainer: L.Trainer) -> None:
        if self._bar is not None:
            self._bar.update()

    def _end(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._start(f"Warm start, epoch {trainer.current_epoch}", self.total_train_batches)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._bar is not None:
            loss = trainer.callback_metrics.get("train/loss")
            self._bar.desc = f"Warm start, epoch {trainer.current_epoch}" + (f" (loss {float(loss):.4f})" if loss is not None else "")
        self._step(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self._end()

    def _eval_start(self, name: str, trainer) -> None:
        if trainer.sanity_checking:
            return
        totals = self.total_val_batches if name == "Validation" else sum(
            trainer.num_test_batches if name == "Test" else trainer.num_predict_batches)
        self._eval_bar_parent = self._bar  # training continues after validation
        self._eval_began = time.monotonic()
        self._start(name, totals)

    def _eval_end(self) -> None:
        self._end()
        self._bar = getattr(self, "_eval_bar_parent", None)
        if self._bar is not None:  # the warm start's rate and ETA leave the validation time out
            paused = time.monotonic() - self._eval_began
            self._bar.start += paused
            self._bar.last += paused

    def on_validation_start(self, trainer, pl_module):
        self._eval_start("Validation", trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self._step(trainer)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._eval_end()

    def on_test_start(self, trainer, pl_module):
        self._eval_start("Test", trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._step(trainer)

    def on_test_end(self, trainer, pl_module):
        self._eval_end()

    def on_predict_start(self, trainer, pl_module):
        self._eval_start("Predict", trainer)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._step(trainer)

    def on_predict_end(self, trainer, pl_module):
        self._eval_end()
