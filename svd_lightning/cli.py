"""The ``svd-lightning`` command: LightningCLI over :class:`SteeringLM` and any DataModule."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any, Optional

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ProgressBar
from lightning.pytorch.cli import LightningCLI

from svd_lightning.callbacks import (
    CheckpointWeights,
    ContrastiveBaseline,
    LogProgressBar,
    ScoreWriter,
    StageTimes,
    SteeredValidation,
    SteeringExtraction,
    StrengthSolver,
    Weights,
)
from svd_lightning.data import ChoiceDataModule
from svd_lightning.log import InputError, say
from svd_lightning.logger import RunLogger, SaveRunConfig, finish_run, hold
from svd_lightning.module import SteeringLM
from svd_lightning.precision import resolve_precision
from svd_lightning.progress import stderr_is_terminal
from svd_lightning.recipes import packaged_configs


# The steering callbacks every command gets (LightningCLI's always-on callbacks): a config sets their
# options under these keys (`solver.strength: trimmed`) instead of repeating the callback list.
DEFAULT_CALLBACKS = {"extraction": SteeringExtraction, "solver": StrengthSolver,
                     "contrastive": ContrastiveBaseline, "report": SteeredValidation}


class FormerSolverKey:
    """``steering.*``: the strength solver's options under the key configs used before ``solver.*`` (run format
    3). Read into ``solver.*`` with a note; never a callback of its own."""

    def __init__(self, strength: Optional[str] = None, curvature: Optional[str] = None, trim: Optional[float] = None,
                 limit_batches: Optional[int] = None):
        pass


class SteeringCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Sanity validation would score before μ̄ exists; skip it unless asked for.
        parser.set_defaults({"trainer.num_sanity_val_steps": 0})
        for key, callback in DEFAULT_CALLBACKS.items():
            parser.add_lightning_class_args(callback, key)
        parser.add_class_arguments(FormerSolverKey, "steering", instantiate=False, help=argparse.SUPPRESS)
        parser.add_argument(
            "--contrastive_baseline", type=bool, default=True,
            help="also fit and score the contrastive baseline z_φ + γ(z_φ − z_θ) (the calibration pass then runs over the calib "
                 "choices; its options under `contrastive`)",
        )
        parser.add_argument(
            "--test_after_fit", type=bool, default=True,
            help="fit only: score the test split with the finished run (validation scores the val split)",
        )
        parser.add_argument(
            "--weights", type=Weights, default="best",
            help="fit only: the warm-start weights the run is calibrated on, written with and tested: best (a "
                 "ModelCheckpoint that monitors a metric: its best checkpoint; else the last) or last",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        former = {k: v for k, v in vars(config.get("steering") or {}).items() if v is not None}
        if former:
            say("steering.* is now solver.* (the strength solver's options): read as "
                + ", ".join(f"solver.{k}={v}" for k, v in former.items()))
            defaults = vars(self._parser(self.subcommand).get_defaults().get("solver"))
            for key, value in former.items():
                given = config.get(f"solver.{key}")
                if given != defaults.get(key) and given != value:
                    raise InputError(f"steering.{key}={value!r} (its former key) and solver.{key}={given!r} disagree: "
                                     f"give solver.{key} only")
                config[f"solver.{key}"] = value
        config.pop("steering", None)

    def before_fit(self) -> None:
        if self._get(self.config, "test_after_fit") and isinstance(self.datamodule, ChoiceDataModule):
            try:  # fit ends by scoring test: an empty test split fails now, not after training
                self.datamodule.check_splits("test")
            except InputError:  # the data itself (a missing file, a bad row): its own message says what fixes it
                raise
            except ValueError as err:
                raise ValueError(f"{err} (fit ends by scoring it; --test_after_fit false skips that)") from None

    def after_fit(self) -> None:
        # The number to report is test's (validation scores the val split, which selection may have used).
        if self._get(self.config, "test_after_fit") and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)  # our table is printed

    def _run_subcommand(self, subcommand: str) -> None:
        # One command, one run: fit's run stays open for the test after it, and is moved into
        # place only when the whole command has finished (svd_lightning.logger).
        hold(self.trainer)
        super()._run_subcommand(subcommand)
        if self.trainer.interrupted:
            raise SystemExit(1)
        times = next((c for c in self.trainer.callbacks if isinstance(c, StageTimes)), None)
        if times is not None and self.trainer.is_global_zero:
            print(f"stage times of this {subcommand} (also in the run's timings.json):\n{times.table()}")
        finish_run(self.trainer)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI fills the model's settings from ``--ckpt_path``'s hyperparameters, over what the
        config or command line says; a setting given both ways with different values is an error."""
        sub = self.config.get("subcommand")
        before = self.config[sub].get("model") if sub else None
        super()._parse_ckpt_path()
        after = self.config[sub].get("model") if sub else None
        if before is None or after is None or before == after:
            return
        given, defaults = _flat(before), _flat(self._parser(sub).get_defaults().get("model"))
        now = _flat(after)
        clashes = [k for k in given if given[k] != defaults.get(k) and now.get(k) != given[k]]
        if clashes:
            path = self.config[sub].get("ckpt_path")
            detail = "; ".join(f"model.{k}: given {given[k]!r}, checkpoint {now.get(k)!r}" for k in clashes)
            raise InputError(f"--ckpt_path {path} was written with other model settings ({detail}): leave them "
                             "unset to resume with the checkpoint's, or start a new run without --ckpt_path")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        # The run directory is <default_root_dir>/version_N, with CSV metrics in it, written whole -- whatever
        # loggers the user adds: theirs log beside ours (TensorBoard, W&B, ...), the run stays where it is.
        logger = config.get("logger")
        if logger is not False:
            theirs = [] if logger in (None, True) else list(logger) if isinstance(logger, (list, tuple)) else [logger]
            if not any(isinstance(lg, RunLogger) for lg in theirs):
                theirs.insert(0, RunLogger(save_dir=config.get("default_root_dir") or "runs", name=""))
            config["logger"] = theirs if len(theirs) > 1 else theirs[0]
        # `precision` left unset (null) means "what this machine runs fast"; an explicit value wins.
        precision, why = resolve_precision(config.get("precision"), config.get("accelerator"))
        say(f"precision {precision} ({why})")
        own = list(config.get("callbacks") or [])
        extra = []
        for cb in (self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys):
            if isinstance(cb, ContrastiveBaseline) and not self._get(self.config, "contrastive_baseline"):
                continue
            if any(isinstance(c, type(cb)) for c in own):  # the config's own list wins, class by class
                say(f"trainer.callbacks has its own {type(cb).__name__}: the default one is not added")
                continue
            extra.append(cb)
        if not any(isinstance(c, StageTimes) for c in own):  # first, so it sees each loop before the solvers
            own.insert(0, StageTimes(origin=_STARTED))
        callbacks = own + extra
        wants_bar = config.get("enable_progress_bar") is not False
        if wants_bar and not stderr_is_terminal() and not any(isinstance(c, ProgressBar) for c in callbacks):
            extra.append(LogProgressBar())
        if self.subcommand == "fit" and not any(isinstance(c, CheckpointWeights) for c in callbacks):
            extra.append(CheckpointWeights(self._get(self.config, "weights")))
        if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter) for c in callbacks):
            extra.append(ScoreWriter())  # predict writes its scores into the run directory
        return self._instantiate_trainer({**config, "precision": precision, "callbacks": own}, extra)


def main(args=None) -> None:
    """``svd-lightning fit|validate|test|predict`` (LightningCLI), ``svd-lightning generate`` (a run
    directory answers a JSONL of prompts, plain and steered; see :mod:`svd_lightning.generate`) and
    ``svd-lightning eval`` (lm-eval tasks with a run's SVDecode; see :mod:`svd_lightning.lm_eval`)."""
    # Returns None: the console script passes the return value to sys.exit.
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["generate"]:
        from svd_lightning.generate import main as generate

        generate(argv[1:], prog="svd-lightning generate")
        return
    if argv[:1] == ["eval"]:
        try:
            from svd_lightning.lm_eval import main as evaluate
        except ModuleNotFoundError as err:
            raise SystemExit(f"svd-lightning eval needs lm-eval: pip install -e '.[lm-eval]' ({err})") from None
        evaluate(argv[1:], prog="svd-lightning eval")
        return
    try:
        argv = [*argv[:1], *packaged_configs(argv[1:])]
    except InputError as err:
        say(f"error: {err}")
        raise SystemExit(2) from None
    if args is None:  # the console script: LightningCLI reads sys.argv (and warns when given both)
        sys.argv[1:] = argv
    global _STARTED
    _STARTED = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _terminated)  # Lightning keeps it in its own SIGTERM handler
    try:
        SteeringCLI(
            SteeringLM,
            LightningDataModule,
            subclass_mode_data=True,
            save_config_callback=SaveRunConfig,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"default_env": True, "epilog": "Generation from a run directory: svd-lightning generate "
                                                         "--help; lm-eval tasks: svd-lightning eval --help"},
            args=None if args is None else argv,
        )
    except InputError as err:
        say(f"error: {err}")
        raise SystemExit(2) from None
    except SystemExit as err:
        if err.code not in (0, None, 2):  # 2: the parser's own usage errors, already explained
            say(f"stopped (exit {err.code}): no run was written; the runs before it are unchanged")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


_STARTED: float | None = None  # when main() began: StageTimes counts the set-up from there


def _terminated(signum, frame) -> None:
    # SIGTERM (kill, Slurm, docker stop): stop now with the conventional non-zero code. Lightning's own
    # handler only sets a flag checked between batches, and its SIGTERMException exits with 0.
    raise SystemExit(128 + signum)


def _flat(namespace) -> dict:
    """A jsonargparse Namespace (or dict) as ``{dotted.key: value}``."""
    d = namespace.as_dict() if hasattr(namespace, "as_dict") else dict(namespace or {})
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("init_args", "dict_kwargs"):
            out.update(_flat(v))
        else:
            out[k] = v
    return out


if __name__ == "__main__":
    main()
