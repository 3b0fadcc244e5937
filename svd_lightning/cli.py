"""The ``svd-lightning`` command: LightningCLI over :class:`SteeringLM` and any DataModule."""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from svd_lightning.callbacks import ScoreWriter
from svd_lightning.data import ChoiceDataModule
from svd_lightning.module import SteeringLM
from svd_lightning.precision import resolve_precision
from svd_lightning.progress import LogProgressBar, say, stderr_is_terminal


class SteeringCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Sanity validation would score before μ̄ exists; skip it unless asked for.
        parser.set_defaults({"trainer.num_sanity_val_steps": 0})
        parser.add_argument(
            "--test_after_fit", type=bool, default=True,
            help="fit only: score the test split with the finished run (validation scores the calib split)",
        )

    def before_fit(self) -> None:
        if self._get(self.config, "test_after_fit") and isinstance(self.datamodule, ChoiceDataModule):
            try:  # fit ends by scoring test: an empty test split fails now, not after training
                self.datamodule.check_splits("test")
            except ValueError as err:
                raise ValueError(f"{err} (fit ends by scoring it; --test_after_fit false skips that)") from None

    def after_fit(self) -> None:
        # Validation scores the calib split, which μ̄ was solved on; the number to report is test's.
        if self._get(self.config, "test_after_fit") and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)  # our table is printed

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if config.get("logger") in (None, True):
            # The run directory is <default_root_dir>/version_N, with CSV metrics in it.
            config["logger"] = CSVLogger(save_dir=config.get("default_root_dir") or "runs", name="")
        # `precision` left unset (null) means "what this machine runs fast"; an explicit value wins.
        precision, why = resolve_precision(config.get("precision"), config.get("accelerator"))
        say(f"precision {precision} ({why})")
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        callbacks = list(config.get("callbacks") or []) + extra
        wants_bar = config.get("enable_progress_bar") is not False
        if wants_bar and not stderr_is_terminal() and not any(isinstance(c, ProgressBar) for c in callbacks):
            extra.append(LogProgressBar())
        if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter) for c in callbacks):
            extra.append(ScoreWriter())  # predict writes its scores into the run directory
        return self._instantiate_trainer({**config, "precision": precision}, extra)


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
    SteeringCLI(
        SteeringLM,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": True, "epilog": "Generation from a run directory: svd-lightning generate --help; "
                                                     "lm-eval tasks: svd-lightning eval --help"},
        args=args,
    )


if __name__ == "__main__":
    main()
