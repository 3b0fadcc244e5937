"""svd-lightning: Steering Vector Decoding (SVDecode) for PyTorch Lightning."""

from svd_lightning.api import SteeredModel
from svd_lightning.calibration import CalibrationResult, calibrate, calibrate_choices

from svd_lightning.steering import (
    ChoiceStrengthCache,
    ExactStrengthCache,
    StrengthStats,
    steer,
    steered_log_probs,
    steering_vector,
    token_strengths,
)

__all__ = [
    "CalibrationResult",
    "SteeredModel",
    "calibrate",
    "calibrate_choices",
    "ChoiceStrengthCache",
    "ExactStrengthCache",
    "StrengthStats",
    "steer",
    "steered_log_probs",
    "steering_vector",
    "token_strengths",
]
__version__ = "0.1.0"
