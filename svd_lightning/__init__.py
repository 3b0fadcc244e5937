"""svd-lightning: Steering Vector Decoding (SVDecode) for PyTorch Lightning.

Every public name is importable from here. They load on first use, so
``from svd_lightning import SteeredModel`` (a finished run in plain PyTorch) does not import
Lightning; ``SteeringLM``, the callbacks, ``RunLogger`` and the DataModules do.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # a finished run, no Trainer
    "SteeredModel": "svd_lightning.api",
    "SteeringConfig": "svd_lightning.config",
    "SteeringRun": "svd_lightning.run",
    "RunWriter": "svd_lightning.run",
    "RunError": "svd_lightning.run",
    "load_run": "svd_lightning.run",
    "write_run": "svd_lightning.run",
    "model_card": "svd_lightning.card",
    # decoding and calibration as plain functions
    "score_choices": "svd_lightning.scoring",
    "steered_generate": "svd_lightning.generation",
    "generate_answers": "svd_lightning.generation",
    "SteeringLogitsProcessor": "svd_lightning.generation",
    "steering_decoding_loop": "svd_lightning.generation",
    "paired_label_logits": "svd_lightning.scoring",
    "calibrate": "svd_lightning.calibration",
    "calibrate_pass": "svd_lightning.calibration",
    "CalibrationNeeds": "svd_lightning.calibration",
    "CalibrationPass": "svd_lightning.calibration",
    "calibrate_choices": "svd_lightning.calibration",
    "calibrate_choice_grid": "svd_lightning.calibration",
    "CalibrationResult": "svd_lightning.calibration",
    # the statistics of every reported interval
    "paired_bootstrap": "svd_lightning.statistics",
    "hierarchical_ci": "svd_lightning.statistics",
    "selection_ci": "svd_lightning.statistics",
    # the math
    "steering_vector": "svd_lightning.steering",
    "steered_log_probs": "svd_lightning.steering",
    "steer": "svd_lightning.steering",
    "token_strengths": "svd_lightning.steering",
    "StrengthStats": "svd_lightning.steering",
    "ExactStrengthCache": "svd_lightning.calibration",
    "ChoiceStrengthCache": "svd_lightning.calibration",
    # Lightning
    "SteeringLM": "svd_lightning.module",
    "RunLogger": "svd_lightning.logger",
    "SteeringExtraction": "svd_lightning.callbacks",
    "StrengthSolver": "svd_lightning.callbacks",
    "ContrastiveBaseline": "svd_lightning.callbacks",
    "SteeredValidation": "svd_lightning.callbacks",
    "LogitSnapshot": "svd_lightning.callbacks",
    "ScoreWriter": "svd_lightning.callbacks",
    "ChoiceDataModule": "svd_lightning.data",
    "TruthfulQADataModule": "svd_lightning.data",
    "CommonsenseDataModule": "svd_lightning.data",
    "GenericChoiceDataModule": "svd_lightning.data",
    "ChoiceExample": "svd_lightning.batch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'svd_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
