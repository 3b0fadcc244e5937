"""The steering vector and the steered distribution: the paper's equations (Hu et al., NeurIPS 2025).

The one file to read to check them. No Lightning, no transformers: every function takes logits
``[..., V]`` and works over any leading dims.

Notation (per next-token position, over the vocabulary):
    p_φ = softmax(z_φ)   warm-started model (adapter on)
    p_θ = softmax(z_θ)   pre-trained model (adapter off)
    r   = log p_φ − log p_θ,   KL = Σ p_φ r = KL(p_φ ‖ p_θ)
    δz  = p_φ ⊙ (KL − r)  = −∇_{z_φ} KL(p_φ‖p_θ) = J·(−(r+1)),  J = diag(p_φ) − p_φ p_φᵀ
    keep(y) ⇔ p_φ(y) ≥ α · max p_φ              (confidence mask)
    δ̂   = δz with masked entries set to 0         (the only finite reading of the paper's −∞)
    ẑ   = z_φ + μ·δz on kept tokens, −∞ on masked ones

``direction="logit_difference"`` replaces δz by ``z_φ − z_θ`` (the contrastive / proxy-tuning
direction, taken as ``r``: see :func:`steering_direction`); mask, scoring policies and every strength
solver stay the same.

All probabilities come from ``log_softmax`` in at least fp32 (fp64 inputs stay fp64).
"""

from __future__ import annotations

import math

import torch

from svd_lightning.config import DIRECTIONS, Direction, ScoringPolicy

EPS = 1e-12
# log-probs are floored here before taking differences: a token with p_θ = 0 (−inf logit) then
# contributes a large but finite r. e^-1000 is exactly 0 in fp64, so no representable p changes.
LOGPROB_FLOOR = -1000.0


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in fp32 (or fp64), the only way this package turns logits into probabilities."""
    return torch.log_softmax(logits.to(compute_dtype(logits)), dim=-1)


def confidence_mask(warm_logprobs: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """keep(y) ⇔ p_φ(y) ≥ α·max p_φ, compared in log space so tiny probabilities don't underflow."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    top = warm_logprobs.max(dim=-1, keepdim=True).values
    return warm_logprobs >= top + math.log(alpha)


def check_direction(direction: str) -> str:
    """``direction`` if it is one of :data:`DIRECTIONS`, else a ValueError naming the options."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return direction


def steering_direction(
    warm_logits: torch.Tensor, base_logits: torch.Tensor, direction: Direction = "kl_gradient"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The steering direction before any mask, with the warm and base log-probs it was built from.

    * ``kl_gradient`` (SVDecode): ``δz = p_φ ⊙ (KL − r) = −∇_{z_φ} KL(p_φ‖p_θ)``. It points back
      toward p_θ: a useful μ is usually negative.
    * ``logit_difference`` (contrastive / proxy tuning): ``z_φ − z_θ``, computed as
      ``r = log p_φ − log p_θ``, which differs from it by one constant per position. Softmax ignores
      that constant wherever the whole vector is added (``log_softmax(z_φ + μ r) =
      log_softmax(z_φ + μ(z_φ − z_θ))``, i.e. :func:`contrastive_logits` at γ = μ); where only the
      kept entries are added (policy ``mask_generation_only``) ``r`` does not depend on the
      arbitrary offset a model's raw logits carry, and it stays finite where p_θ underflows
      (same floor as the KL). It points away from p_θ: a useful μ is usually positive.

    Neither is normalised: the method scales δz by μ as it is (δ̂ only zeroes masked entries), so
    the logit difference is not normalised either and μ = γ is literal.

    O(V) per position; the V×V softmax Jacobian is never built. Returns ``(delta, lp_warm, lp_base)``
    in fp32 (fp64 for fp64 inputs), for callers that also need the log-probs or several masks.
    """
    check_direction(direction)
    if warm_logits.shape != base_logits.shape:
        raise ValueError(f"warm {tuple(warm_logits.shape)} and base {tuple(base_logits.shape)} logits differ in shape")
    lp_warm = log_probs(warm_logits)
    lp_base = log_probs(base_logits).to(lp_warm.dtype)
    return direction_from_log_probs(lp_warm, log_ratio(lp_warm, lp_base), direction), lp_warm, lp_base


def direction_from_log_probs(lp_warm: torch.Tensor, r: torch.Tensor, direction: Direction = "kl_gradient") -> torch.Tensor:
    """:func:`steering_direction` from the warm log-probs and ``r = log p_φ − log p_θ`` already computed."""
    check_direction(direction)
    if direction == "logit_difference":
        return r
    p = lp_warm.exp()
    kl = (p * r).sum(dim=-1, keepdim=True)
    return p * (kl - r)


def log_ratio(lp_warm: torch.Tensor, lp_base: torch.Tensor) -> torch.Tensor:
    """``r = log p_φ − log p_θ``, each floored at :data:`LOGPROB_FLOOR` so it stays finite."""
    return lp_warm.clamp_min(LOGPROB_FLOOR) - lp_base.clamp_min(LOGPROB_FLOOR)


def steering_vector(
    warm_logits: torch.Tensor, base_logits: torch.Tensor, alpha: float = 0.1, *, direction: Direction = "kl_gradient"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit-space steering vector (``δz = p_φ ⊙ (KL − r)``, or the logit difference: see
    :func:`steering_direction`) and the confidence mask ``keep``.

    Returns ``(delta, keep)`` with ``delta`` in fp32 (fp64 for fp64 inputs) and ``keep`` boolean,
    both shaped like the logits.
    """
    delta, lp_warm, _ = steering_direction(warm_logits, base_logits, direction)
    return delta, confidence_mask(lp_warm, alpha)


def kl_divergence(warm_logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_φ ‖ p_θ) per position (same flooring as :func:`steering_vector`)."""
    return kl_from_log_probs(log_probs(warm_logits), log_probs(base_logits))


def kl_from_log_probs(lp_warm: torch.Tensor, lp_base: torch.Tensor) -> torch.Tensor:
    """KL(p_φ ‖ p_θ) from log-probs already computed (e.g. by :func:`steering_direction`)."""
    return (lp_warm.exp() * log_ratio(lp_warm, lp_base.to(lp_warm.dtype))).sum(-1)


def masked_delta(delta: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """δ̂: the steering vector with masked entries set to 0."""
    return delta.masked_fill(~keep, 0.0)


def steer(
    warm_logits: torch.Tensor,
    base_logits: torch.Tensor,
    mu: float | torch.Tensor,
    alpha: float = 0.1,
    mask_value: float = float("-inf"),
    *,
    direction: Direction = "kl_gradient",
) -> torch.Tensor:
    """Steered logits ``z_φ + μ·δz`` on kept tokens, ``mask_value`` (−∞) on masked ones.

    The mask is applied after scaling, so a negative μ never meets −∞. With μ = 0 the kept logits
    are the warm logits exactly. ``direction``: see :func:`steering_direction`.
    """
    delta, keep = steering_vector(warm_logits, base_logits, alpha, direction=direction)
    steered = warm_logits.to(delta.dtype) + mu * delta
    return steered.masked_fill(~keep, mask_value)


def steered_log_probs(
    warm_logits: torch.Tensor,
    base_logits: torch.Tensor,
    mu: float | torch.Tensor,
    alpha: float = 0.1,
    policy: ScoringPolicy = "mask_generation_only",
    floor: float = -20.0,
    *,
    direction: Direction = "kl_gradient",
) -> torch.Tensor:
    """Log-probabilities of the steered distribution for teacher-forced scoring.

    The paper sets masked tokens to −∞, which gives a label token outside the keep set a score of
    −∞ (open in the paper). Policies:

    * ``mask_generation_only``: ``log_softmax(z_φ + μ·δ̂)`` over the whole vocabulary -- masked
      tokens keep their warm logits, nothing is −∞; generation keeps the paper's mask.
    * ``none``: no mask anywhere: ``log_softmax(z_φ + μ·δz)`` with the full steering vector.
    * ``floor``: the paper's masked distribution renormalised over kept tokens; a masked token
      gets the fixed log-prob ``floor``.
    * ``mask``: the paper verbatim (masked tokens −∞); sums over a continuation may be −∞.

    With μ = 0 and α → 0 every policy reproduces the warm model's log-probs. ``direction``: the
    steering vector (see :func:`steering_direction`); every policy applies to either.
    """
    delta, keep = steering_vector(warm_logits, base_logits, alpha, direction=direction)
    return policy_log_probs(warm_logits, delta, keep, mu, policy, floor)


def policy_log_probs(
    warm_logits: torch.Tensor,
    delta: torch.Tensor,
    keep: torch.Tensor,
    mu: float | torch.Tensor,
    policy: ScoringPolicy = "mask_generation_only",
    floor: float = -20.0,
) -> torch.Tensor:
    """:func:`steered_log_probs` from a steering vector and mask already computed (several μ, one pass);
    policy ``none`` uses no mask (``keep`` may be None)."""
    if policy == "none":
        return torch.log_softmax(warm_logits.to(delta.dtype) + mu * delta, dim=-1)
    shifted = warm_logits.to(delta.dtype) + mu * masked_delta(delta, keep)
    if policy == "mask_generation_only":
        return torch.log_softmax(shifted, dim=-1)
    if policy not in ("floor", "mask"):
        raise ValueError(f"unknown scoring policy {policy!r}")
    lp = torch.log_softmax(shifted.masked_fill(~keep, float("-inf")), dim=-1)
    fill = floor if policy == "floor" else float("-inf")
    return lp.masked_fill(~keep, fill)


def compact_label_log_probs(label: torch.Tensor, kept_lse: torch.Tensor, rest_lse: torch.Tensor,
                            label_kept: torch.Tensor, policy: ScoringPolicy = "mask_generation_only",
                            floor: float = -20.0) -> torch.Tensor:
    """The label token's steered log-prob from its compact form: the scoring policies of
    :func:`policy_log_probs` for one token, given the (steered) label logit, the log-sum-exp of the
    steered kept logits and of the unmoved masked ones. ``none`` reads the compact form as
    ``mask_generation_only`` (a cache built with the :data:`NO_MASK_ALPHA` mask)."""
    if policy in ("mask_generation_only", "none"):
        return label - torch.logaddexp(kept_lse, rest_lse)
    if policy not in ("floor", "mask"):
        raise ValueError(f"unknown scoring policy {policy!r}")
    fill = floor if policy == "floor" else float("-inf")
    return torch.where(label_kept, label - kept_lse, torch.full_like(label, fill))
