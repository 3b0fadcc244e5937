"""svd-lightning: Steering Vector Decoding (SVDecode) for PyTorch Lightning."""

from svd_lightning.steering import (
    ExactStrengthCache,
    StrengthStats,
    steer,
    steered_log_probs,
    steering_vector,
    token_strengths,
)

__all__ = [
    "ExactStrengthCache",
    "StrengthStats",
    "steer",
    "steered_log_probs",
    "steering_vector",
    "token_strengths",
]
__version__ = "0.1.0"
