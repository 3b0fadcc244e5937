"""Steering Vector Decoding (SVDecode) as pure tensor functions.

The one file to read to check the paper's equations (Hu et al., NeurIPS 2025). No Lightning, no
transformers: every function takes logits ``[..., V]`` and works over any leading dims.

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
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from svd_lightning.batch import IGNORE_INDEX
from svd_lightning.config import DIRECTIONS, NO_MASK_ALPHA, Curvature, Direction, ScoringPolicy, SteeringConfig  # noqa: F401

Aggregate = Literal["mean", "median", "trimmed", "pooled", "exact"]

EPS = 1e-12
# log-probs are floored here before taking differences: a token with p_θ = 0 (−inf logit) then
# contributes a large but finite r. e^-1000 is exactly 0 in fp64, so no representable p changes.
LOGPROB_FLOOR = -1000.0
# NO_MASK_ALPHA (svd_lightning.config): policy `none` (no confidence mask) keeps tokens with
# p_φ ≥ 1e-8·max p_φ in the compact strength caches: every token below moves its logit by
# |μ·δz| ≤ |μ|·1e-8·|KL − r| -- nothing measurable -- while keeping the exact solve's cache to the
# tokens that carry probability. That bound is for the KL gradient (δz ∝ p_φ); the logit difference
# is not small there, so under direction logit_difference + policy none the strength solves treat
# those tokens as unsteered: an approximation of the unmasked objective (a μ large enough to lift
# them into the top is rare).


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in fp32 (or fp64), the only way this package turns logits into probabilities."""
    return torch.log_softmax(logits.to(_compute_dtype(logits)), dim=-1)


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


@dataclass
class StrengthTerms:
    """Per-position pieces of the one-step Newton strength ``μ* = num / den``.

    ``num = ⟨e_y − p_φ, δ̂⟩``; ``den_identity = ‖δ̂‖²`` (the paper); ``den_fisher = δ̂ᵀ J δ̂``
    (the exact curvature of the token NLL at μ = 0). ``valid`` drops ignored labels and ‖δ̂‖ < 1e-12.
    """

    num: torch.Tensor
    den_identity: torch.Tensor
    den_fisher: torch.Tensor
    valid: torch.Tensor

    def strengths(self, curvature: Curvature = "identity") -> torch.Tensor:
        den = _pick_curvature(self, curvature)
        mu = self.num / (den + EPS)
        return mu.masked_fill(~self.valid, float("nan"))


def _pick_curvature(terms, curvature: str) -> torch.Tensor:
    if curvature == "identity":
        return terms.den_identity
    if curvature == "fisher":
        return terms.den_fisher
    raise ValueError(f"curvature must be 'identity' or 'fisher', got {curvature!r}")


def strength_terms(
    warm_logits: torch.Tensor, delta: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor
) -> StrengthTerms:
    """Numerators and both curvatures of the per-token strength, for labels ``[...]`` (−100 ignored)."""
    p = log_probs(warm_logits).exp().to(delta.dtype)
    d = masked_delta(delta, keep)
    ignored = labels == IGNORE_INDEX
    y = labels.masked_fill(ignored, 0).unsqueeze(-1)
    p_dot_d = (p * d).sum(-1)
    num = d.gather(-1, y).squeeze(-1) - p_dot_d
    den_identity = (d * d).sum(-1)
    # δ̂ᵀJδ̂ = Σ p δ̂² − (Σ p δ̂)² is a variance under p_φ: clamp the rounding below zero.
    den_fisher = ((p * d * d).sum(-1) - p_dot_d**2).clamp_min(0.0)
    valid = ~ignored & (den_identity.sqrt() >= EPS)
    return StrengthTerms(num, den_identity, den_fisher, valid)


def token_strengths(
    warm_logits: torch.Tensor,
    delta: torch.Tensor,
    keep: torch.Tensor,
    labels: torch.Tensor,
    curvature: Curvature = "identity",
) -> torch.Tensor:
    """Per-position optimal strength μ* (one Newton step on ``KL(e_y ‖ softmax(z_φ + μ δ̂))`` at μ = 0).

    ``identity`` is the paper's Gauss–Newton step ``⟨e_y − p_φ, δ̂⟩ / ‖δ̂‖²``; ``fisher`` divides by
    ``δ̂ᵀJδ̂`` instead, the exact second derivative. NaN where the label is −100 or ‖δ̂‖ < 1e-12.
    """
    return strength_terms(warm_logits, delta, keep, labels).strengths(curvature)


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




class PairedLabels:
    """Warm and pre-trained logits at labelled positions, log-softmaxed once, scored under any config.

    Every direction, mask and steered label log-prob of a batch comes from the one pair of
    log-softmaxes (memoised per direction, α and (direction, α)), so scoring many configs or
    solvers from one forward costs one softmax per *policy-none* strength and nothing per masked
    one: under a mask only the kept tokens move, so a masked config's label log-prob needs the
    kept logits (one top-k) and one log-sum-exp of the rest -- exact, not an approximation.
    """

    def __init__(self, warm: torch.Tensor, base: torch.Tensor, labels: torch.Tensor):
        self.lp_warm = log_probs(warm)
        self.lp_base = log_probs(base).to(self.lp_warm.dtype)
        self.warm = warm.to(self.lp_warm.dtype)
        self.labels = labels
        self.r = log_ratio(self.lp_warm, self.lp_base)
        self._directions: dict[str, torch.Tensor] = {}
        self._masks: dict[float, torch.Tensor] = {}
        self._kept: dict[tuple[str, float], tuple[torch.Tensor, ...]] = {}

    def _label(self, t: torch.Tensor) -> torch.Tensor:
        return t.gather(-1, self.labels.unsqueeze(-1)).squeeze(-1)

    def direction(self, name: Direction) -> torch.Tensor:
        if name not in self._directions:
            self._directions[name] = direction_from_log_probs(self.lp_warm, self.r, name)
        return self._directions[name]

    def mask(self, alpha: float) -> torch.Tensor:
        if alpha not in self._masks:
            self._masks[alpha] = confidence_mask(self.lp_warm, alpha)
        return self._masks[alpha]

    def plain(self) -> torch.Tensor:
        """The warm model's log-prob of each label ``[M]``."""
        return self._label(self.lp_warm)

    def base(self) -> torch.Tensor:
        """The pre-trained model's log-prob of each label ``[M]``."""
        return self._label(self.lp_base)

    def _kept_tokens(self, direction: Direction, alpha: float) -> tuple[torch.Tensor, ...]:
        key = (direction, alpha)
        if key not in self._kept:
            keep, delta = self.mask(alpha), self.direction(direction)
            # keep ⇔ z_φ ≥ max z_φ + log α: the kept set is the top of z_φ, so one top-k finds it. Its size
            # is data (not bounded by α): one host sync per (direction, α) and chunk of positions.
            k = max(int(keep.sum(-1).max()), 1) if keep.numel() else 1
            values, index = self.warm.topk(min(k, self.warm.shape[-1]), dim=-1)
            kept = keep.gather(-1, index)
            self._kept[key] = (
                values.masked_fill(~kept, float("-inf")),  # kept logits (padding: -inf, no mass)
                delta.gather(-1, index).masked_fill(~kept, 0.0),  # their δ
                torch.logsumexp(self.warm.masked_fill(keep, float("-inf")), dim=-1),  # the unmoved rest
                self._label(keep),
                self._label(self.warm),
                self._label(delta).masked_fill(~self._label(keep), 0.0),  # δ̂ at the label
            )
        return self._kept[key]

    def limit_terms(self, limit: ContrastiveLimit) -> tuple[torch.Tensor, torch.Tensor]:
        """Each label's ``(slope, offset)`` ``[M]`` under the contrastive limit (:class:`ContrastiveLimit`)."""
        return contrastive_limit_terms(self.lp_warm, self.r, self.labels, limit.sign)

    def log_probs(self, config: SteeringConfig) -> torch.Tensor:
        """Each label's log-prob ``[M]`` under ``config`` (μ, α, policy, floor, direction), as
        :func:`policy_log_probs` gives it; ``config.mu`` None (not solved) is an error."""
        if config.mu is None:
            raise ValueError("PairedLabels.log_probs: the config has no strength (mu is None)")
        mu, delta = config.mu, self.direction(config.direction)
        if config.scoring_policy == "none":  # no mask: every token moves, one softmax per position
            shifted = self.warm + mu * delta
            return self._label(shifted) - torch.logsumexp(shifted, -1)
        kept_logit, kept_delta, rest_lse, label_kept, label_logit, label_delta = self._kept_tokens(
            config.direction, config.alpha)
        kept_lse = torch.logsumexp(kept_logit + mu * kept_delta, dim=-1)
        return compact_label_log_probs(label_logit + mu * label_delta, kept_lse, rest_lse, label_kept,
                                       config.scoring_policy, config.floor)


# The contrastive baseline's γ grid (0 = the warm start): the benchmark grid's variants and
# :class:`svd_lightning.callbacks.ContrastiveBaseline` choose γ on it.
GAMMA_GRID = (0.0,) + tuple(sign * g for g in (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0) for sign in (-1, 1))


def contrastive_log_probs(warm_logits: torch.Tensor, base_logits: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    """The contrastive baseline as steering: the logit-difference direction at μ = γ with no mask,
    i.e. ``log_softmax(z_φ + γ(z_φ − z_θ))`` (= :func:`contrastive_logits`, normalised)."""
    return steered_log_probs(warm_logits, base_logits, gamma, policy="none", direction="logit_difference")


def contrastive_logits(warm_logits: torch.Tensor, base_logits: torch.Tensor, gamma: float) -> torch.Tensor:
    """Equal-cost baseline (proxy-tuning / contrastive style): ``z_φ + γ(z_φ − z_θ)``."""
    dtype = _compute_dtype(warm_logits)
    return warm_logits.to(dtype) + gamma * (warm_logits.to(dtype) - base_logits.to(dtype))


@dataclass(frozen=True)
class ContrastiveLimit:
    """The contrastive baseline in its limit γ → ``sign``·∞, which closes any γ grid.

    With ``d = s·r`` (s = ``sign``), a label token's log-prob ``log_softmax(z_φ + γ r)(y)`` is
    ``|γ|·slope + offset + o(1)``: ``slope = d(y) − max d ≤ 0`` and ``offset = z_φ(y) −
    logsumexp(z_φ over the tokens at max d)``. A choice's score sums both; as |γ| grows, the
    choices of largest slope take all of their set's mass, shared by ``softmax(offset)``
    (:func:`limit_choice_scores`): the ranking by the logit difference alone.
    """

    sign: int = 1

    def __post_init__(self) -> None:
        if self.sign not in (1, -1):
            raise ValueError(f"ContrastiveLimit: sign must be +1 or -1, got {self.sign!r}")

    @property
    def gamma(self) -> float:
        return math.copysign(math.inf, self.sign)


def contrastive_limit_terms(lp_warm: torch.Tensor, r: torch.Tensor, labels: torch.Tensor, sign: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each label's ``(slope, offset)`` of :class:`ContrastiveLimit` from the warm log-probs and
    ``r = log p_φ − log p_θ`` ``[M, V]``; ``labels`` ``[M]``. (Any per-position shift of z_φ or r
    cancels, so log-probs serve as logits.)"""
    d = sign * r
    top = d.max(dim=-1, keepdim=True).values
    at_top = lp_warm.masked_fill(d != top, float("-inf"))  # the tokens the limit keeps, at their z_φ
    label = lambda t: t.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    return label(d - top), label(lp_warm) - torch.logsumexp(at_top, dim=-1)


def limit_choice_scores(slope: torch.Tensor, offset: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Choice scores ``[N]`` whose metrics are the limits of the metrics of ``|γ|·slope + offset`` as
    |γ| → ∞ -- for every metric of the raw scores (argmax, normalised mass: MC1, MC2, acc), not for
    length-normalised ones: in each ``group`` (one choice set of one question) the rows of largest
    slope keep their offset, the others get −∞. ``slope`` sums exact zeros where every label token
    is at the top, so those ties are exact."""
    top = torch.full((int(group.max()) + 1,), float("-inf"), dtype=slope.dtype, device=slope.device).scatter_reduce(0, group, slope, "amax")
    return offset.masked_fill(slope < top[group], float("-inf"))


# --------------------------------------------------------------------------------------------------
# Global strength μ̄ from calibration tokens.


def _host_accumulator() -> torch.Tensor:
    """An empty fp64 accumulator on the host: statistics gather there, whatever device computed them."""
    return torch.zeros(0, dtype=torch.float64, device="cpu")


@dataclass
class StrengthStats:
    """Mergeable per-token statistics of the calibration set; every aggregate of μ* comes from here.

    Keeps the per-token numerators and both curvatures (a few floats per calibration token), so the
    median and trimmed mean are exact after merging ranks, not approximations. DDP: gather the three
    vectors from every rank (:meth:`to_tensor` / :meth:`from_tensor`) and merge.
    """

    num: torch.Tensor = field(default_factory=_host_accumulator)
    den_identity: torch.Tensor = field(default_factory=_host_accumulator)
    den_fisher: torch.Tensor = field(default_factory=_host_accumulator)

    @property
    def count(self) -> int:
        return int(self.num.numel())

    def update(self, terms: StrengthTerms) -> "StrengthStats":
        v = terms.valid
        take = lambda t: t[v].detach().to("cpu", torch.float64)  # noqa: E731
        self.num = torch.cat([self.num, take(terms.num)])
        self.den_identity = torch.cat([self.den_identity, take(terms.den_identity)])
        self.den_fisher = torch.cat([self.den_fisher, take(terms.den_fisher)])
        return self

    def merge(self, other: "StrengthStats") -> "StrengthStats":
        return StrengthStats(
            torch.cat([self.num, other.num]),
            torch.cat([self.den_identity, other.den_identity]),
            torch.cat([self.den_fisher, other.den_fisher]),
        )

    def to_tensor(self) -> torch.Tensor:
        return torch.stack([self.num, self.den_identity, self.den_fisher])

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "StrengthStats":
        t = t.detach().to("cpu", torch.float64)
        return cls(t[0].clone(), t[1].clone(), t[2].clone())

    def strengths(self, curvature: Curvature = "identity") -> torch.Tensor:
        return self.num / (_pick_curvature(self, curvature) + EPS)

    def _check(self) -> None:
        if self.count == 0:
            raise ValueError(
                "no calibration token has a usable steering vector (empty calibration set, or every "
                "token had ‖δ̂‖ < 1e-12: the adapter does not change the model on these inputs)"
            )

    def mean(self, curvature: Curvature = "identity") -> float:
        """The paper's μ̄: the plain mean of per-token μ*."""
        self._check()
        return float(self.strengths(curvature).mean())

    def median(self, curvature: Curvature = "identity") -> float:
        self._check()
        return float(self.strengths(curvature).quantile(0.5))

    def trimmed_mean(self, curvature: Curvature = "identity", trim: float = 0.1) -> float:
        """Mean of μ* after dropping the ``trim`` fraction at each tail."""
        self._check()
        mu = self.strengths(curvature).sort().values
        k = int(trim * mu.numel())
        return float(mu[k : mu.numel() - k].mean()) if mu.numel() > 2 * k else float(mu.quantile(0.5))

    def pooled(self, curvature: Curvature = "identity") -> float:
        """Σ num / Σ den: the one-step Newton strength of the summed calibration loss."""
        self._check()
        return float(self.num.sum() / (_pick_curvature(self, curvature).sum() + EPS))

    def aggregate(self, how: Aggregate, curvature: Curvature = "identity", trim: float = 0.1) -> float:
        if how == "mean":
            return self.mean(curvature)
        if how == "median":
            return self.median(curvature)
        if how == "trimmed":
            return self.trimmed_mean(curvature, trim)
        if how == "pooled":
            return self.pooled(curvature)
        raise ValueError(f"unknown strength aggregate {how!r} (exact is solved by ExactStrengthCache)")

    def summary(self, trim: float = 0.1) -> dict[str, float]:
        """Every aggregate × curvature, for logs and ``steering.json``."""
        out = {"tokens": float(self.count)}
        for c in ("identity", "fisher"):
            for how in ("mean", "median", "trimmed", "pooled"):
                out[f"{how}_{c}"] = self.aggregate(how, c, trim)  # type: ignore[arg-type]
        return out


@dataclass
class ExactStrengthCache:
    """Compact per-token cache to minimise the calibration NLL ``Σ −log softmax(z_φ + μ·δ̂)_y`` exactly.

    ``z_φ + μ·δ̂`` differs from ``z_φ`` only on kept tokens, so a token is summarised by the
    log-sum-exp of its masked logits, its kept logits and δ̂ (ragged, flattened with a segment id)
    and its label's logit and δ̂. The loss is convex in μ (log-sum-exp of affine functions minus an
    affine one), so safeguarded Newton finds the global minimum without another pass over the data.
    """

    rest_lse: torch.Tensor = field(default_factory=_host_accumulator)
    label_logit: torch.Tensor = field(default_factory=_host_accumulator)
    label_delta: torch.Tensor = field(default_factory=_host_accumulator)
    kept_logit: torch.Tensor = field(default_factory=_host_accumulator)
    kept_delta: torch.Tensor = field(default_factory=_host_accumulator)
    segment: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long, device="cpu"))

    @property
    def count(self) -> int:
        return int(self.rest_lse.numel())

    def update(self, warm_logits: torch.Tensor, delta: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor) -> "ExactStrengthCache":
        sel = labels != IGNORE_INDEX
        z = warm_logits[sel].to(torch.float64)
        d = masked_delta(delta, keep)[sel].to(torch.float64)
        k = keep[sel]
        y = labels[sel].unsqueeze(-1)
        rest = torch.logsumexp(z.masked_fill(k, float("-inf")), dim=-1)
        rows, cols = k.nonzero(as_tuple=True)
        offset = self.count
        self.rest_lse = torch.cat([self.rest_lse, rest.cpu()])
        self.label_logit = torch.cat([self.label_logit, z.gather(-1, y).squeeze(-1).cpu()])
        self.label_delta = torch.cat([self.label_delta, d.gather(-1, y).squeeze(-1).cpu()])
        self.kept_logit = torch.cat([self.kept_logit, z[rows, cols].cpu()])
        self.kept_delta = torch.cat([self.kept_delta, d[rows, cols].cpu()])
        self.segment = torch.cat([self.segment, (rows + offset).cpu()])
        return self

    def loss_grad_hess(self, mu: float) -> tuple[float, float, float]:
        """Total NLL and its first two derivatives in μ (sums over tokens: all-reducible)."""
        n = self.count
        logits = self.kept_logit + mu * self.kept_delta
        seg_max = torch.full((n,), float("-inf"), dtype=torch.float64, device=self.segment.device).scatter_reduce(
            0, self.segment, logits, "amax"
        )
        top = torch.maximum(seg_max, self.rest_lse)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        w = (logits - top[self.segment]).exp()
        z = torch.zeros(n, dtype=torch.float64, device=self.segment.device)
        mass = z.index_add(0, self.segment, w) + (self.rest_lse - top).exp()
        m1 = torch.zeros(n, dtype=torch.float64, device=self.segment.device).index_add(0, self.segment, w * self.kept_delta) / mass
        m2 = torch.zeros(n, dtype=torch.float64, device=self.segment.device).index_add(0, self.segment, w * self.kept_delta**2) / mass
        lse = top + mass.log()
        loss = (lse - self.label_logit - mu * self.label_delta).sum()
        grad = (m1 - self.label_delta).sum()
        hess = (m2 - m1**2).clamp_min(0.0).sum()
        return float(loss), float(grad), float(hess)

    def solve(
        self,
        mu0: float = 0.0,
        tol: float = 1e-10,
        max_iter: int = 100,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> float:
        """Newton with backtracking on the convex calibration NLL; ``reduce`` sums across ranks (DDP)."""

        def evaluate(mu: float) -> tuple[float, float, float]:
            vals = torch.tensor(self.loss_grad_hess(mu) if self.count else (0.0, 0.0, 0.0), dtype=torch.float64, device="cpu")
            if reduce is not None:
                vals = reduce(vals)
            return tuple(float(v) for v in vals)  # type: ignore[return-value]

        mu = mu0
        loss, grad, hess = evaluate(mu)
        for _ in range(max_iter):
            if abs(grad) <= tol * max(1.0, abs(loss)):
                break
            step = -grad / hess if hess > EPS else -math.copysign(1.0, grad)
            # Backtrack until the loss decreases: Newton on a convex 1-D function can overshoot.
            for _ in range(60):
                new = evaluate(mu + step)
                if new[0] <= loss:
                    break
                step *= 0.5
            else:
                break
            if abs(step) <= tol * max(1.0, abs(mu)):
                mu, (loss, grad, hess) = mu + step, new
                break
            mu, (loss, grad, hess) = mu + step, new
        if not math.isfinite(mu):
            raise FloatingPointError("exact strength solve diverged")
        return mu


# --------------------------------------------------------------------------------------------------
# Global strength fit to the multiple-choice loss (``choice_nll``).


def _segment_logsumexp(values: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
    """log Σ exp(values) per segment id in ``[0, n)``; −∞ for empty or all −∞ segments."""
    top = torch.full((n,), float("-inf"), dtype=values.dtype, device=values.device).scatter_reduce(0, segment, values, "amax")
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    mass = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, segment, (values - safe[segment]).exp())
    return safe + mass.log()


def choice_set_nll(scores: torch.Tensor, group: torch.Tensor, true: torch.Tensor, n: int) -> torch.Tensor:
    """The multiple-choice loss ``−log Σ_{c true} softmax(scores)_c`` of each of ``n`` choice sets.

    ``scores`` are the rows' summed log-likelihoods, ``group`` each row's set id, ``true`` whether
    the row is a correct choice. NaN-free: a set with no (finite) true row gets +∞.
    """
    lse_all = _segment_logsumexp(scores, group, n)
    return lse_all - _segment_logsumexp(scores.masked_fill(~true, float("-inf")), group, n)


def strength_grid(lo: float = 1e-3, hi: float = 1e3, per_decade: int = 4) -> list[float]:
    """0 and ±μ on a log-spaced grid from ``lo`` to ``hi``: the bracketing grid of :class:`ChoiceStrengthCache`.

    Symmetric because the useful sign depends on the direction (negative for the KL gradient,
    positive for the logit difference); log-spaced because μ's scale does too (δz is weighted by
    p_φ, the logit difference is not).
    """
    k = round(math.log10(hi / lo) * per_decade)
    mags = [lo * (hi / lo) ** (i / k) for i in range(k + 1)]
    return [-m for m in reversed(mags)] + [0.0] + mags


def best_grid_point(mus: list[float], losses: list[float]) -> int:
    """The index of the grid point with the smallest finite loss; ties prefer the smaller |μ|."""
    finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
    if not finite:
        raise FloatingPointError("the loss is not finite at any point of the grid")
    return min(finite, key=lambda i: (losses[i], abs(mus[i])))


@dataclass
class ChoiceStrengthCache:
    """Per-question cache to fit μ to the calibration set's multiple-choice loss, in closed form per μ.

    A row (one choice) scores ``S_c(μ) = Σ_t log p_steered(y_t)`` under ``policy`` (as
    :func:`steered_log_probs` scores it). A choice set of a question is one softmax over its rows:
    its loss is the NLL of the true *set*, ``−log Σ_{c true} softmax(S)_c`` (one true choice:
    MC1-style NLL; several: MC2-style). Choice sets are separate softmaxes whose losses add
    (TruthfulQA: mc1 + mc2). Sets without a true choice (or, under ``mask``, whose true rows all
    hold a masked token) carry no μ-dependent loss and are left out.

    Tokens use :class:`ExactStrengthCache`'s compact form (kept logits and δ̂, log-sum-exp of the
    rest), so the loss at any μ needs no model pass. Under policy ``none`` the cache is built with
    the :data:`NO_MASK_ALPHA` mask and scored like ``mask_generation_only``. The loss is not convex
    in μ: :meth:`solve` brackets on :func:`strength_grid` and refines by golden section.

    DDP: the loss is a sum over choice sets, so each rank caches its own questions (all rows of a
    question on one rank, as whole-question batches give) and :meth:`solve` all-reduces the sums.
    """

    policy: ScoringPolicy = "mask_generation_only"
    floor: float = -20.0
    tokens: ExactStrengthCache = field(default_factory=ExactStrengthCache)
    label_kept: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool, device="cpu"))
    token_row: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long, device="cpu"))  # token -> scored row
    row_scored: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long, device="cpu"))  # row -> scored row
    row_group: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long, device="cpu"))
    row_true: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool, device="cpu"))
    groups: dict = field(default_factory=dict)  # (question_index, choice_set) -> group id

    scored_rows: int = 0  # rows whose tokens are cached (a repeated row reads its first copy's)

    def __post_init__(self) -> None:
        if self.policy not in ("mask_generation_only", "none", "floor", "mask"):
            raise ValueError(f"unknown scoring policy {self.policy!r}")

    @property
    def rows(self) -> int:
        return int(self.row_group.numel())

    def update(self, warm_logits: torch.Tensor, delta: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor,
               row: torch.Tensor, question_index: torch.Tensor, choice_set: torch.Tensor,
               is_true: torch.Tensor, same_as: torch.Tensor | None = None) -> "ChoiceStrengthCache":
        """Add one choice batch: label positions ``[M, V]`` / ``[M]`` (as :func:`paired_label_logits`
        returns them, ``row`` = their batch row) and the batch's per-row ``[N]`` question ids;
        ``same_as`` as :func:`svd_lightning.forward.encoders.distinct_rows` gives it, when the tokens are
        those of the batch's distinct rows."""
        self.add_tokens(warm_logits, delta, keep, labels, row)
        return self.add_rows(question_index, choice_set, is_true, same_as)

    def add_tokens(self, warm_logits: torch.Tensor, delta: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor,
                   row: torch.Tensor) -> "ChoiceStrengthCache":
        """:meth:`update` in parts: some label positions of the batch whose rows :meth:`add_rows` adds next."""
        if (labels == IGNORE_INDEX).any():
            raise ValueError("ChoiceStrengthCache.update takes label positions only (no -100 labels)")
        self.tokens.update(warm_logits, delta, keep, labels)
        self.label_kept = torch.cat([self.label_kept, keep.gather(-1, labels.unsqueeze(-1)).squeeze(-1).cpu()])
        self.token_row = torch.cat([self.token_row, row.cpu() + self.scored_rows])
        return self

    def add_rows(self, question_index: torch.Tensor, choice_set: torch.Tensor, is_true: torch.Tensor,
                 same_as: torch.Tensor | None = None) -> "ChoiceStrengthCache":
        """The batch's rows, after all of its tokens (:meth:`add_tokens`); ``same_as``: see :meth:`update`."""
        keys = zip(question_index.tolist(), choice_set.tolist())
        ids = [self.groups.setdefault(k, len(self.groups)) for k in keys]
        same_as = torch.arange(len(ids), device="cpu") if same_as is None else same_as.cpu()
        self.row_group = torch.cat([self.row_group, torch.tensor(ids, dtype=torch.long, device="cpu")])
        self.row_true = torch.cat([self.row_true, is_true.bool().cpu()])
        self.row_scored = torch.cat([self.row_scored, same_as + self.scored_rows])
        self.scored_rows += int(same_as.max()) + 1 if same_as.numel() else 0
        return self

    def row_scores(self, mu: float) -> torch.Tensor:
        """``S_c(μ)`` of every cached row (float64), as steered scoring sums it."""
        t = self.tokens
        kept_lse = _segment_logsumexp(t.kept_logit + mu * t.kept_delta, t.segment, t.count)
        token = compact_label_log_probs(t.label_logit + mu * t.label_delta, kept_lse, t.rest_lse, self.label_kept,
                                        self.policy, self.floor)
        return torch.zeros(self.scored_rows, dtype=torch.float64, device=token.device).index_add(0, self.token_row, token)[self.row_scored]

    def losses(self, mus) -> torch.Tensor:
        """This cache's summed choice-set NLL at every μ of ``mus`` (``[K]`` float64: all-reducible)."""
        n = len(self.groups)
        out = torch.zeros(len(mus), dtype=torch.float64, device="cpu")
        for k, mu in enumerate(mus):
            nll = choice_set_nll(self.row_scores(float(mu)), self.row_group, self.row_true, n)
            out[k] = nll[torch.isfinite(nll)].sum()
        return out

    def usable_groups(self) -> int:
        """Choice sets that carry loss (a true choice with a finite score)."""
        s = self.row_scores(0.0).masked_fill(~self.row_true, float("-inf"))
        return int(torch.isfinite(_segment_logsumexp(s, self.row_group, len(self.groups))).sum())

    def solve(
        self,
        grid: list[float] | None = None,
        tol: float = 1e-8,
        max_iter: int = 200,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> float:
        """The μ that minimises the (all-reduced) loss: best point of ``grid`` (default
        :func:`strength_grid`, widened ×10 while the best is at an end), then golden section
        between its neighbours. Ties prefer the smaller |μ|. Every rank takes the same steps."""

        def evaluate(mus: list[float]) -> list[float]:
            vals = self.losses(mus)
            return (reduce(vals) if reduce is not None else vals).tolist()

        mus = sorted(set(strength_grid() if grid is None else grid))
        if len(mus) < 3:
            raise ValueError(f"the bracketing grid needs at least 3 points, got {mus}")
        values = evaluate(mus)
        if not any(math.isfinite(v) for v in values):
            raise FloatingPointError("the choice loss is not finite at any μ of the grid")

        def best() -> int:
            return best_grid_point(mus, values)

        i = best()
        for _ in range(12):  # the minimum may lie beyond the grid: widen it outward
            if 0 < i < len(mus) - 1:
                break
            edge = mus[i] * 10.0
            if i == 0:
                mus.insert(0, edge)
                values.insert(0, evaluate([edge])[0])
            else:
                mus.append(edge)
                values.append(evaluate([edge])[0])
            i = best()
        if not 0 < i < len(mus) - 1:
            raise FloatingPointError(f"the choice loss keeps falling as |μ| grows (best at μ = {mus[i]:g})")
        mu, loss = _golden_section(lambda m: evaluate([m])[0], mus[i - 1], mus[i + 1], tol, max_iter)
        return mu if loss < values[i] else mus[i]


def _golden_section(f: Callable[[float], float], a: float, b: float, tol: float, max_iter: int) -> tuple[float, float]:
    """A local minimum of ``f`` on ``[a, b]`` (golden-section search); returns ``(μ, f(μ))``."""
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(max_iter):
        if abs(b - a) <= tol * max(1.0, abs(c) + abs(d)):
            break
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return (c, fc) if fc <= fd else (d, fd)
