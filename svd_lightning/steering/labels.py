"""Scoring many steering configs from one forward: the label tokens' log-probs under each, from one pair of
log-softmaxes."""

from __future__ import annotations

import torch

from svd_lightning.config import Direction, SteeringConfig
from svd_lightning.steering.contrastive import ContrastiveLimit, contrastive_limit_terms
from svd_lightning.steering.vector import (
    compact_label_log_probs,
    confidence_mask,
    direction_from_log_probs,
    log_probs,
    log_ratio,
)


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
