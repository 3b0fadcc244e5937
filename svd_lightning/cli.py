"""The ``svd-lightning`` command: LightningCLI over :class:`SteeringLM` and any DataModule."""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch import LightningDataModule

from svd_lightning.module import SteeringLM


class SteeringCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Sanity validation would score before μ̄ exists; skip it unless asked for.
        parser.set_defaults({"trainer.num_sanity_val_steps": 0})


def main(args=None) -> None:
    """``svd-lightning fit|validate|test|predict`` (LightningCLI) and ``svd-lightning generate`` (a run
    directory answers a JSONL of prompts, plain and steered; see :mod:`svd_lightning.generate`)."""
    # Returns None: the console script passes the return value to sys.exit.
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["generate"]:
        from svd_lightning.generate import main as generate

        generate(argv[1:], prog="svd-lightning generate")
        return
    SteeringCLI(
        SteeringLM,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": True, "epilog": "Generation from a run directory: svd-lightning generate --help"},
        args=args,
    )


if __name__ == "__main__":
    main()
