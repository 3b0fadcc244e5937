"""The contrastive baseline (proxy tuning / contrastive decoding): ``z_φ + γ(z_φ − z_θ)``, the logit-difference
direction at μ = γ with no mask, and its limit γ → ±∞ that closes any γ grid."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from svd_lightning.steering.vector import compute_dtype, steered_log_probs


# The contrastive baseline's γ grid (0 = the warm start): the benchmark grid's variants and
# :class:`svd_lightning.callbacks.ContrastiveBaseline` choose γ on it.
GAMMA_GRID = (0.0,) + tuple(sign * g for g in (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0) for sign in (-1, 1))


def contrastive_log_probs(warm_logits: torch.Tensor, base_logits: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    """The contrastive baseline as steering: the logit-difference direction at μ = γ with no mask,
    i.e. ``log_softmax(z_φ + γ(z_φ − z_θ))`` (= :func:`contrastive_logits`, normalised)."""
    return steered_log_probs(warm_logits, base_logits, gamma, policy="none", direction="logit_difference")


def contrastive_logits(warm_logits: torch.Tensor, base_logits: torch.Tensor, gamma: float) -> torch.Tensor:
    """Equal-cost baseline (proxy-tuning / contrastive style): ``z_φ + γ(z_φ − z_θ)``."""
    dtype = compute_dtype(warm_logits)
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
