"""The strength μ: per-token one-step Newton strengths μ* and the calibration set's aggregates of them (μ̄).

``μ* = ⟨e_y − p_φ, δ̂⟩ / ‖δ̂‖²`` (the paper's Gauss–Newton step; ``fisher`` curvature: ``δ̂ᵀJδ̂``) for each
calibration token; :class:`StrengthStats` keeps them mergeable across ranks and gives the mean (the
paper's μ̄), median, trimmed mean and pooled step. The exact and multiple-choice solves are in
:mod:`svd_lightning.calibration.solvers`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from svd_lightning.batch import IGNORE_INDEX
from svd_lightning.config import Curvature
from svd_lightning.steering.vector import EPS, log_probs, masked_delta

Aggregate = Literal["mean", "median", "trimmed", "pooled", "exact"]


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


def host_accumulator() -> torch.Tensor:
    """An empty fp64 accumulator on the host: statistics gather there, whatever device computed them."""
    return torch.zeros(0, dtype=torch.float64, device="cpu")


@dataclass
class StrengthStats:
    """Mergeable per-token statistics of the calibration set; every aggregate of μ* comes from here.

    Keeps the per-token numerators and both curvatures (a few floats per calibration token), so the
    median and trimmed mean are exact after merging ranks, not approximations. DDP: gather the three
    vectors from every rank (:meth:`to_tensor` / :meth:`from_tensor`) and merge.
    """

    num: torch.Tensor = field(default_factory=host_accumulator)
    den_identity: torch.Tensor = field(default_factory=host_accumulator)
    den_fisher: torch.Tensor = field(default_factory=host_accumulator)

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
