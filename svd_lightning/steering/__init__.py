"""Steering Vector Decoding (SVDecode) as pure tensor functions: torch only, no model, no Lightning.

* :mod:`.vector` -- the steering vector δz (or the logit difference), the confidence mask and the
  steered distribution under each scoring policy: the paper's equations;
* :mod:`.strengths` -- per-token strengths μ* and their aggregates μ̄;
* :mod:`.contrastive` -- the contrastive baseline and its γ → ±∞ limit;
* :mod:`.labels` -- many configs scored from one pair of log-softmaxes (:class:`PairedLabels`);
* :mod:`.choices` -- the multiple-choice loss of choice sets.
"""

from svd_lightning.steering.choices import choice_set_nll, segment_logsumexp
from svd_lightning.steering.contrastive import (
    GAMMA_GRID,
    ContrastiveLimit,
    contrastive_limit_terms,
    contrastive_log_probs,
    contrastive_logits,
    limit_choice_scores,
)
from svd_lightning.steering.labels import PairedLabels
from svd_lightning.steering.strengths import StrengthStats, StrengthTerms, strength_terms, token_strengths
from svd_lightning.steering.vector import (
    EPS,
    LOGPROB_FLOOR,
    compact_label_log_probs,
    confidence_mask,
    direction_from_log_probs,
    kl_divergence,
    kl_from_log_probs,
    log_probs,
    log_ratio,
    masked_delta,
    policy_log_probs,
    steer,
    steered_log_probs,
    steering_direction,
    steering_vector,
)

__all__ = [
    "EPS", "GAMMA_GRID", "LOGPROB_FLOOR", "ContrastiveLimit", "PairedLabels", "StrengthStats", "StrengthTerms",
    "choice_set_nll", "compact_label_log_probs", "confidence_mask", "contrastive_limit_terms", "contrastive_log_probs",
    "contrastive_logits", "direction_from_log_probs", "kl_divergence", "kl_from_log_probs", "limit_choice_scores",
    "log_probs", "log_ratio", "masked_delta", "policy_log_probs", "segment_logsumexp", "steer", "steered_log_probs",
    "steering_direction", "steering_vector", "strength_terms", "token_strengths",
]
