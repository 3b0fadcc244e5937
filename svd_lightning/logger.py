"""Where a Lightning run's files go: :class:`RunLogger` makes the logger's version directory an
svd-lightning run (:class:`svd_lightning.run.RunWriter`), built in a hidden sibling and renamed
into place whole when the stage finishes.

    trainer = L.Trainer(logger=RunLogger("runs"), ...)   # the run: runs/version_N
    trainer.fit(SteeringLM(...), datamodule)             # committed at the end of fit
    SteeringRun.load(trainer.log_dir)

Everything Lightning writes into its log directory (``metrics.csv``, ``hparams.yaml``, the CLI's
``config.yaml``, checkpoints) and everything svd-lightning writes (:func:`run_writer`) lands in
the staging directory, so a run killed at any moment leaves nothing at ``runs/version_N``. Each
stage of a trainer (``fit``, ``validate``, ``test``, ``predict``) is a run of its own, committed
when it ends; :func:`hold` keeps one run open across stages (the CLI's ``fit`` and the ``test``
after it are one run).
A pinned ``version`` that already holds a run is never written into: the run takes the next free
version and says so. With another logger (or none) the run is built the same way under
``<default_root_dir>/runs``; another logger whose own directory is a finished run is refused before the
stage writes anything (Lightning's loggers replace what their version directory holds).
"""

from __future__ import annotations

import weakref
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from svd_lightning.log import InputError, say
from svd_lightning.run import METRICS_FILE, RUN_FILE, TIMINGS_FILE, RunWriter, is_taken, next_free, next_version


class RunLogger(CSVLogger):
    """Lightning's ``CSVLogger`` whose version directory is an svd-lightning run, written whole.

    Args:
        save_dir: the folder of the runs (default ``runs``).
        name: a sub-folder of ``save_dir`` (default none: ``save_dir/version_N``).
        version: pin the run's name (an int: ``version_<n>``; a string: that name). One that exists
            already is not written into: the run takes the next free name.
    """

    def __init__(self, save_dir: str = "runs", name: str | None = "", version: int | str | None = None,
                 prefix: str = "", flush_logs_every_n_steps: int = 100):
        super().__init__(save_dir, name=name, version=None, prefix=prefix, flush_logs_every_n_steps=flush_logs_every_n_steps)
        self.pinned = version
        self._run: RunWriter | None = None

    @property
    def run(self) -> RunWriter:
        """The run being built (its target resolved on first use)."""
        if self._run is None:
            parent = Path(self.root_dir)  # save_dir/name
            if self.pinned is None:
                target = next_version(parent)
            else:
                target = parent / (self.pinned if isinstance(self.pinned, str) else f"version_{self.pinned}")
                if is_taken(target):
                    new = next_free(target)
                    say(f"{target} already holds a run, which is never written into: this run is {new}")
                    target = new
            self._run = RunWriter(target)
        return self._run

    @property
    def version(self) -> str:
        """The staging directory's name while the run is built, the run's own name once it is committed."""
        run = self.run
        return (run.committed or run.path).name

    @property
    def experiment(self):
        # Lightning creates the experiment at every stage's setup, before any hook: a stage after a
        # committed run starts the next run here, so its metrics.csv never lands in the finished one.
        self.new_run()
        return super().experiment

    def new_run(self) -> None:
        """Start another run after a committed one (the next stage of the same trainer)."""
        if self._run is not None and self._run.committed is not None:
            self._run, self._experiment = None, None

    def commit(self) -> Path:
        """Flush the metrics into the run, then move it into place. Returns the run's directory."""
        if self._experiment is not None:
            self.save()
            self._experiment = None  # a later finalize() must not write metrics.csv into the finished run
        return self.run.commit()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        # Lightning finalizes with "success" after every stage; "failed" leaves the run unwritten.
        if status == "success" and self._run is not None and self._run.committed is None and not self._run.hold:
            finish_run(self)


_OTHER_LOGGERS: "weakref.WeakKeyDictionary[L.Trainer, RunWriter]" = weakref.WeakKeyDictionary()


def _run_logger(trainer: L.Trainer) -> RunLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, RunLogger)), None)


def run_writer(trainer: L.Trainer) -> RunWriter | None:
    """The run this trainer is building, on global rank zero (None on the other ranks). No collective."""
    if not trainer.is_global_zero:
        return None
    logger = _run_logger(trainer)
    if logger is not None:
        return logger.run
    writer = _OTHER_LOGGERS.get(trainer)
    if writer is None or writer.committed is not None:
        writer = RunWriter(next_version(Path(trainer.default_root_dir) / "runs"))
        _OTHER_LOGGERS[trainer] = writer
        kind = type(trainer.loggers[0]).__name__ if trainer.loggers else "no logger"
        say(f"the trainer has {kind}, not svd_lightning.RunLogger: the run is {writer.target} "
            "(pass logger=RunLogger(save_dir) to choose where)")
    return writer


RUN_MARKERS = (RUN_FILE, METRICS_FILE, TIMINGS_FILE)  # files every finished run holds at least one of


def check_loggers(trainer: L.Trainer) -> None:
    """Refuse a logger of the user's (CSVLogger, TensorBoardLogger, ...) whose log directory is a finished
    run: it would replace that run's files (Lightning deletes a version's old logs when it saves new ones)."""
    for logger in trainer.loggers:
        if isinstance(logger, RunLogger):
            continue
        log_dir = getattr(logger, "log_dir", None)
        if log_dir and any((Path(log_dir) / name).is_file() for name in RUN_MARKERS):
            raise InputError(f"{type(logger).__name__} would write into {log_dir}, a finished run whose files it would "
                             "replace: give the logger another version (or none, for the next free one), or log with "
                             "svd_lightning.RunLogger, which never writes into a finished run")


def start_run(trainer: L.Trainer) -> RunWriter | None:
    """A new run for this stage when the trainer's last one was committed; returns it (rank zero)."""
    logger = _run_logger(trainer)
    if logger is not None:
        logger.new_run()
    return run_writer(trainer)


def finish_run(logger_or_trainer) -> Path | None:
    """Finish the run: Lightning's metrics flushed into it, then renamed into place (rank zero)."""
    if isinstance(logger_or_trainer, RunLogger):
        path = logger_or_trainer.commit()
    else:
        trainer = logger_or_trainer
        if not trainer.is_global_zero:
            return None
        logger = _run_logger(trainer)
        writer = logger.run if logger is not None else _OTHER_LOGGERS.get(trainer)
        if writer is None or writer.committed is not None:
            return None if writer is None else writer.committed
        if logger is None and not writer.path.is_dir():  # the stage wrote nothing: no empty run directory
            _OTHER_LOGGERS.pop(trainer, None)
            return None
        path = logger.commit() if logger is not None else writer.commit()
    say(f"run written to {path.resolve()}")
    return path


def hold(trainer: L.Trainer, value: bool = True) -> None:
    """Keep the trainer's run open across stages (the CLI's fit, then test); :func:`finish_run` ends it."""
    writer = run_writer(trainer)
    if writer is not None:
        writer.hold = value


class SaveRunConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml``, written through the run like every other file of it."""

    def setup(self, trainer, pl_module, stage) -> None:
        if self.already_saved:
            return
        writer = start_run(trainer)
        if writer is not None:
            writer.write_text(self.config_filename, self.parser.dump(self.config, skip_none=False))
            self.save_config(trainer, pl_module, stage)
        self.already_saved = True
