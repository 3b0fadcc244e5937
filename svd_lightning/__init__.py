"""svd-lightning: Steering Vector Decoding (SVDecode) for PyTorch Lightning.

The public API is the twenty names below (``docs/api.md`` documents each); everything else lives in its
module (``svd_lightning.callbacks``, ``svd_lightning.data``, ``svd_lightning.run``, ...), and the research
options and the statistics behind the results pages in :mod:`svd_lightning.experimental`. The names load on
first use, so ``from svd_lightning import SteeredModel`` (a finished run in plain PyTorch) does not import
Lightning; ``SteeringLM``, the callbacks and the DataModules do.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # a finished run, no Trainer
    "SteeredModel": "svd_lightning.api",
    "SteeringConfig": "svd_lightning.config",
    "SteeringRun": "svd_lightning.run",
    "RunError": "svd_lightning.run",
    "load_run": "svd_lightning.run",
    # scoring, generation and calibration as plain functions
    "score_choices": "svd_lightning.scoring",
    "steered_generate": "svd_lightning.generation",
    "generate_answers": "svd_lightning.generation",
    "SteeringLogitsProcessor": "svd_lightning.generation",
    "calibrate": "svd_lightning.calibration",
    "calibrate_pass": "svd_lightning.calibration",
    "CalibrationNeeds": "svd_lightning.calibration",
    # the math
    "steering_vector": "svd_lightning.steering",
    "steered_log_probs": "svd_lightning.steering",
    # Lightning
    "SteeringLM": "svd_lightning.module",
    "SteeringExtraction": "svd_lightning.callbacks",
    "StrengthSolver": "svd_lightning.callbacks",
    "SteeredValidation": "svd_lightning.callbacks",
    "TruthfulQADataModule": "svd_lightning.data",
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
