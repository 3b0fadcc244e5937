"""Research options and the machinery behind the results pages: stable enough to use, not the product's
surface. ``research/`` reaches the package through these names and the public ones.

The options this namespace stands for are settings of :class:`~svd_lightning.config.SteeringConfig` and the
solvers that the paper does not define, kept for comparison: the strength aggregates beyond the mean and the
exact solve (``median``, ``trimmed``, ``pooled``), the ``fisher`` curvature and ``trim``, the ``choice_nll``
fit, the ``logit_difference`` direction, the ``floor`` and ``mask`` scoring policies and the contrastive
baseline's γ → ±∞ limits. The names below score, solve and compare them.
"""

from svd_lightning.calibration import (
    CalibrationPass,
    CalibrationResult,
    ChoiceStrengthCache,
    ExactStrengthCache,
    calibrate_choice_grid,
    calibrate_choices,
    strength_grid,
)
from svd_lightning.forward.prefix import PrefixCache
from svd_lightning.scoring import paired_label_logits, score_choice_variants
from svd_lightning.statistics import (
    hierarchical_ci,
    in_sample_picks,
    loso_picks,
    paired_bootstrap,
    pick,
    picked_gains,
    seed_t_interval,
    selection_ci,
)
from svd_lightning.steering import GAMMA_GRID, ContrastiveLimit, PairedLabels, StrengthStats, steer, token_strengths

__all__ = [
    "GAMMA_GRID", "CalibrationPass", "CalibrationResult", "ChoiceStrengthCache", "ContrastiveLimit",
    "ExactStrengthCache", "PairedLabels", "PrefixCache", "StrengthStats", "calibrate_choice_grid", "calibrate_choices",
    "hierarchical_ci", "in_sample_picks", "loso_picks", "paired_bootstrap", "paired_label_logits", "pick",
    "picked_gains", "score_choice_variants", "seed_t_interval", "selection_ci", "steer", "strength_grid",
    "token_strengths",
]
