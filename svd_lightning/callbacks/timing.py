"""Wall-clock seconds of every stage of a command (``timings.json``)."""

from __future__ import annotations

import time

import lightning as L

from svd_lightning.logger import run_writer
from svd_lightning.run import TIMINGS_FILE


class StageTimes(L.Callback):
    """Wall-clock seconds of every stage of a command, written to the run as ``timings.json``.

    Put it first among the callbacks (the CLI does): its ``on_validation_start`` / ``on_test_start``
    then run before the strength solvers, so the time from there to the first scored batch is the
    calibration (the one pass, μ̄ and the contrastive γ), and the rest of the loop is scoring. ``origin``: when the
    command started (default: when this callback was built), so that set-up (model and data
    loading) is counted too; ``other`` is what no stage accounts for.
    """

    def __init__(self, origin: float | None = None):
        self.origin = time.perf_counter() if origin is None else origin
        self.stages: dict[str, float] = {}
        self._marks: dict[str, float] = {}
        self._started = False

    def _add(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds

    def _mark(self, key: str) -> None:
        now = time.perf_counter()
        if not self._started:  # the first work of the command ends its set-up
            self._started = True
            self._add("set-up", now - self.origin)
        self._marks[key] = now

    def _since(self, key: str) -> float:
        return time.perf_counter() - self._marks.pop(key, time.perf_counter())

    # warm start: the training batches themselves (forward, backward, optimizer step)
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._mark("batch")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._add("warm start", self._since("batch"))

    def on_train_epoch_end(self, trainer, pl_module):  # solvers run here when no validation did
        self._mark("epoch end")

    def on_train_end(self, trainer, pl_module):
        self._add("calibration", self._since("epoch end"))
        self._mark("run")

    def _loop_start(self, trainer, pl_module, stage):
        if not trainer.sanity_checking:
            self._mark(stage)

    def _first_batch(self, trainer, pl_module, stage, batch_idx, dataloader_idx):
        if not trainer.sanity_checking and batch_idx == 0 and dataloader_idx == 0 and stage in self._marks:
            self._add("calibration", self._since(stage))  # the one pass and every solve before scoring
            self._mark(f"{stage} scoring")

    def _loop_end(self, trainer, stage):
        if not trainer.sanity_checking and f"{stage} scoring" in self._marks:
            self._add(f"{stage} scoring", self._since(f"{stage} scoring"))
        self._marks.pop(stage, None)

    def on_validation_start(self, trainer, pl_module):
        self._loop_start(trainer, pl_module, "validation")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._first_batch(trainer, pl_module, "validation", batch_idx, dataloader_idx)

    def on_validation_end(self, trainer, pl_module):
        self._loop_end(trainer, "validation")

    def on_test_start(self, trainer, pl_module):
        self._loop_start(trainer, pl_module, "test")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._first_batch(trainer, pl_module, "test", batch_idx, dataloader_idx)

    def on_test_end(self, trainer, pl_module):
        self._loop_end(trainer, "test")

    def on_predict_start(self, trainer, pl_module):
        self._loop_start(trainer, pl_module, "predict")

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._first_batch(trainer, pl_module, "predict", batch_idx, dataloader_idx)

    def on_predict_end(self, trainer, pl_module):
        self._loop_end(trainer, "predict")

    def teardown(self, trainer, pl_module, stage):
        if "run" in self._marks:  # the adapter and steering.json, written at the end of fit
            self._add("run writing", self._since("run"))
        writer = run_writer(trainer)
        if writer is not None and writer.committed is None:
            writer.write_json(TIMINGS_FILE, self.record())

    def record(self) -> dict:
        total = time.perf_counter() - self.origin
        return {"seconds": dict(self.stages), "other": total - sum(self.stages.values()), "total": total}

    def table(self) -> str:
        rec = self.record()
        rows = [*rec["seconds"].items(), ("other", rec["other"]), ("total", rec["total"])]
        return "\n".join(f"{name:<28}{seconds:>9.1f} s" for name, seconds in rows)

