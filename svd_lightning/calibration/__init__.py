"""Calibration with no Trainer: the pass over the calibration questions (:mod:`.passes`), what it is asked
for and gives (:mod:`.results`), and the solvers beyond an average of token strengths (:mod:`.solvers`).
The Lightning callbacks (:mod:`svd_lightning.callbacks`) are thin wrappers over these."""

from svd_lightning.calibration.passes import calibrate, calibrate_choice_grid, calibrate_choices, calibrate_pass
from svd_lightning.calibration.results import (
    CHOICE_NLL,
    CalibrationNeeds,
    CalibrationPass,
    CalibrationResult,
    ChoiceCalibration,
    ChoiceGridCalibration,
)
from svd_lightning.calibration.solvers import ChoiceStrengthCache, ExactStrengthCache, best_grid_point, strength_grid

__all__ = ["CHOICE_NLL", "CalibrationNeeds", "CalibrationPass", "CalibrationResult", "ChoiceCalibration",
           "ChoiceGridCalibration", "ChoiceStrengthCache", "ExactStrengthCache", "best_grid_point", "calibrate",
           "calibrate_choice_grid", "calibrate_choices", "calibrate_pass", "strength_grid"]
