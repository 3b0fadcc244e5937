"""Progress that shows up in log files, not only on terminals.

tqdm redraws one line with carriage returns: piped to a file, a 40-minute run shows nothing useful
until it ends. When stderr is not a terminal we print a plain line (count, rate, ETA) at most every
``SVD_PROGRESS_SECONDS`` seconds (default 30) instead; on a terminal tqdm is used as usual.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from tqdm.auto import tqdm

from svd_lightning.log import say  # noqa: F401 -- re-exported: callers import it from here

T = TypeVar("T")


def interval_seconds() -> float:
    """``SVD_PROGRESS_SECONDS`` (default 30; 0: every update), else an error naming the variable."""
    text = os.environ.get("SVD_PROGRESS_SECONDS", "30")
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise ValueError(f"SVD_PROGRESS_SECONDS must be a number of seconds ≥ 0, got {text!r} "
                         "(unset it for the default of 30)")
    return value


def stderr_is_terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def progress_line(desc: str, done: int, total: int | None, elapsed: float, unit: str = "it") -> str:
    """``desc: 40/163 batch (24.5%) | 1.23 batch/s | elapsed 0:32 | ETA 1:40``."""
    rate = done / elapsed if elapsed > 0 else 0.0
    count = f"{done}/{total} {unit} ({100 * done / total:.1f}%)" if total else f"{done} {unit}"
    line = f"{desc}: {count} | {rate:.3g} {unit}/s | elapsed {_clock(elapsed)}"
    if total and rate > 0:
        line += f" | ETA {_clock((total - done) / rate)}"
    return line


class PlainProgress:
    """Counts work and prints :func:`progress_line` every ``interval`` seconds and at the end."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", interval: float | None = None,
                 enabled: bool = True, stream=None):
        self.desc, self.total, self.unit, self.enabled = desc, total, unit, enabled
        self.interval = interval_seconds() if interval is None else interval
        self.stream = stream
        self.done = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            self.emit()

    def emit(self) -> None:
        print(progress_line(self.desc, self.done, self.total, time.monotonic() - self.start, self.unit),
              file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.done:
            self.emit()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(desc: str, total: int | None = None, unit: str = "it", enabled: bool = True):
    """tqdm on a terminal, :class:`PlainProgress` lines otherwise; both have ``update``/``close``."""
    if stderr_is_terminal():
        return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not enabled)
    return PlainProgress(desc, total, unit, enabled=enabled)


def track(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it", enabled: bool = True) -> Iterator[T]:
    """Iterate with :func:`progress_bar`; an item counts as done once the loop body has run."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with progress_bar(desc, total, unit, enabled) as bar:
        for item in iterable:
            yield item
            bar.update()


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
