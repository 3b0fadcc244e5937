"""The ``svd-lightning`` command: LightningCLI over :class:`SteeringLM` and any DataModule."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch import LightningDataModule

from svd_lightning.module import SteeringLM


class SteeringCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Sanity validation would score before μ̄ exists; skip it unless asked for.
        parser.set_defaults({"trainer.num_sanity_val_steps": 0})


def main(args=None) -> None:
    # Returns None: the console script passes the return value to sys.exit.
    SteeringCLI(
        SteeringLM,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": True},
        args=args,
    )


if __name__ == "__main__":
    main()
