"""DataModules yielding the batches of ``svd_lightning.batch``."""

from svd_lightning.data.base import DEFAULT_SPLIT, PAPER_SPLIT, ChoiceDataModule
from svd_lightning.data.commonsense import CommonsenseDataModule
from svd_lightning.data.generic import GenericChoiceDataModule
from svd_lightning.data.protocol import SteeringDataModule, check_datamodule
from svd_lightning.data.sources import DataError
from svd_lightning.data.truthfulqa import TruthfulQADataModule

__all__ = [
    "DEFAULT_SPLIT",
    "PAPER_SPLIT",
    "ChoiceDataModule",
    "CommonsenseDataModule",
    "DataError",
    "GenericChoiceDataModule",
    "SteeringDataModule",
    "TruthfulQADataModule",
    "check_datamodule",
]
