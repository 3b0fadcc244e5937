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

All probabilities come from ``log_softmax`` in at least fp32 (fp64 inputs stay fp64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

Curvature = Literal["identity", "fisher"]
Aggregate = Literal["mean", "median", "trimmed", "pooled", "exact"]
ScoringPolicy = Literal["mask_generation_only", "none", "floor", "mask"]

IGNORE_INDEX = -100
EPS = 1e-12
# log-probs are floored here before taking differences: a token with p_θ = 0 (−inf logit) then
# contributes a large but finite r. e^-1000 is exactly 0 in fp64, so no representable p changes.
LOGPROB_FLOOR = -1000.0
# Policy `none` (no confidence mask) keeps tokens with p_φ ≥ 1e-8·max p_φ in the compact strength
# caches: every token below moves its logit by |μ·δz| ≤ |μ|·1e-8·|KL − r| -- nothing measurable --
# while keeping the exact solve's cache to the tokens that carry probability.
NO_MASK_ALPHA = 1e-8


def strength_alpha(alpha: float, policy: str) -> float:
    """The mask threshold the strength is solved with: ``alpha``, or (policy ``none``) no mask."""
    return NO_MASK_ALPHA if policy == "none" else alpha


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


def steering_direction(
    warm_logits: torch.Tensor, base_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``δz = p_φ ⊙ (KL − r)`` before any mask, with the warm and base log-probs it was built from.

    O(V) per position; the V×V softmax Jacobian is never built. Returns ``(delta, lp_warm, lp_base)``
    in fp32 (fp64 for fp64 inputs), for callers that also need the log-probs or several masks.
    """
    if warm_logits.shape != base_logits.shape:
        raise ValueError(f"warm {tuple(warm_logits.shape)} and base {tuple(base_logits.shape)} logits differ in shape")
    lp_warm = log_probs(warm_logits)
    lp_base = log_probs(base_logits).to(lp_warm.dtype)
    p, r = lp_warm.exp(), _log_ratio(lp_warm, lp_base)
    kl = (p * r).sum(dim=-1, keepdim=True)
    return p * (kl - r), lp_warm, lp_base


def _log_ratio(lp_warm: torch.Tensor, lp_base: torch.Tensor) -> torch.Tensor:
    return lp_warm.clamp_min(LOGPROB_FLOOR) - lp_base.clamp_min(LOGPROB_FLOOR)


def steering_vector(
    warm_logits: torch.Tensor, base_logits: torch.Tensor, alpha: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit-space steering vector ``δz = p_φ ⊙ (KL − r)`` and the confidence mask ``keep``.

    Returns ``(delta, keep)`` with ``delta`` in fp32 (fp64 for fp64 inputs) and ``keep`` boolean,
    both shaped like the logits.
    """
    delta, lp_warm, _ = steering_direction(warm_logits, base_logits)
    return delta, confidence_mask(lp_warm, alpha)


def kl_divergence(warm_logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_φ ‖ p_θ) per position (same flooring as :func:`steering_vector`)."""
    return kl_from_log_probs(log_probs(warm_logits), log_probs(base_logits))


def kl_from_log_probs(lp_warm: torch.Tensor, lp_base: torch.Tensor) -> torch.Tensor:
    """KL(p_φ ‖ p_θ) from log-probs already computed (e.g. by :func:`steering_direction`)."""
    return (lp_warm.exp() * _log_ratio(lp_warm, lp_base.to(lp_warm.dtype))).sum(-1)


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
) -> torch.Tensor:
    """Steered logits ``z_φ + μ·δz`` on kept tokens, ``mask_value`` (−∞) on masked ones.

    The mask is applied after scaling, so a negative μ never meets −∞. With μ = 0 the kept logits
    are the warm logits exactly.
    """
    delta, keep = steering_vector(warm_logits, base_logits, alpha)
    steered = warm_logits.to(delta.dtype) + mu * delta
    return steered.masked_fill(~keep, mask_value)


def steered_log_probs(
    warm_logits: torch.Tensor,
    base_logits: torch.Tensor,
    mu: float | torch.Tensor,
    alpha: float = 0.1,
    policy: ScoringPolicy = "mask_generation_only",
    floor: float = -20.0,
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

    With μ = 0 and α → 0 every policy reproduces the warm model's log-probs.
    """
    delta, keep = steering_vector(warm_logits, base_logits, alpha)
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


def contrastive_logits(warm_logits: torch.Tensor, base_logits: torch.Tensor, gamma: float) -> torch.Tensor:
    """Equal-cost baseline (proxy-tuning / contrastive style): ``z_φ + γ(z_φ − z_θ)``."""
    dtype = _compute_dtype(warm_logits)
    return warm_logits.to(dtype) + gamma * (warm_logits.to(dtype) - base_logits.to(dtype))


# --------------------------------------------------------------------------------------------------
# Global strength μ̄ from calibration tokens.


@dataclass
class StrengthStats:
    """Mergeable per-token statistics of the calibration set; every aggregate of μ* comes from here.

    Keeps the per-token numerators and both curvatures (a few floats per calibration token), so the
    median and trimmed mean are exact after merging ranks, not approximations. DDP: gather the three
    vectors from every rank (:meth:`to_tensor` / :meth:`from_tensor`) and merge.
    """

    num: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    den_identity: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    den_fisher: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))

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

    rest_lse: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    label_logit: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    label_delta: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    kept_logit: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    kept_delta: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    segment: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

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
        seg_max = torch.full((n,), float("-inf"), dtype=torch.float64).scatter_reduce(
            0, self.segment, logits, "amax"
        )
        top = torch.maximum(seg_max, self.rest_lse)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        w = (logits - top[self.segment]).exp()
        z = torch.zeros(n, dtype=torch.float64)
        mass = z.index_add(0, self.segment, w) + (self.rest_lse - top).exp()
        m1 = torch.zeros(n, dtype=torch.float64).index_add(0, self.segment, w * self.kept_delta) / mass
        m2 = torch.zeros(n, dtype=torch.float64).index_add(0, self.segment, w * self.kept_delta**2) / mass
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
            vals = torch.tensor(self.loss_grad_hess(mu) if self.count else (0.0, 0.0, 0.0), dtype=torch.float64)
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
