"""The calibration pass, with no Trainer: steering statistics of every calibration label token.

:func:`calibrate` runs the warm and pre-trained models over teacher-forced prompt + answer batches
and returns what every token-level strength option needs (:class:`CalibrationResult`);
:func:`calibrate_choices` runs them over the calibration *choice* batches for the strength fit to
the multiple-choice loss (``choice_nll``); :func:`calibrate_choice_grid` evaluates that loss exactly
on a fixed grid of strengths (the contrastive baseline's γ, whose unmasked direction no compact
cache holds). The Lightning callbacks
(:mod:`svd_lightning.callbacks`) are thin wrappers that pass in their rank's batches and the
collectives of their strategy; ``benchmarks/`` call it directly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from svd_lightning.config import ForwardMode, SteeringConfig
from svd_lightning.decoding import paired_label_logits
from svd_lightning.progress import track
from svd_lightning.steering import (
    ChoiceStrengthCache,
    ExactStrengthCache,
    StrengthStats,
    choice_set_nll,
    confidence_mask,
    kl_from_log_probs,
    policy_log_probs,
    steering_direction,
    strength_terms,
)

Reduce = Callable[[torch.Tensor], torch.Tensor]  # all-reduce (sum) across ranks
Gather = Callable[[torch.Tensor], torch.Tensor]  # all-gather [k, n_rank] -> [k, Σ n]


@dataclass
class CalibrationResult:
    """Sufficient statistics of the strength μ̄ and diagnostics of one calibration pass."""

    stats: StrengthStats
    cache: ExactStrengthCache  # this rank's tokens only (the exact solve all-reduces sums)
    diagnostics: dict[str, float]
    step: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _label_logits(model, batches: Iterable[dict], *, forward_mode: ForwardMode, device, total: int | None,
                  progress: bool, desc: str):
    """Per batch ``(batch, warm, base, labels, row)`` at the labelled positions, fp32, in eval mode.

    The model is put in eval mode for the pass (dropout off) and restored when the generator ends.
    """
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(track(batches, desc, total=total, unit="batch", enabled=progress)):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            try:
                warm, base, labels, row = paired_label_logits(model, batch, forward_mode=forward_mode)
            except FloatingPointError as err:
                raise FloatingPointError(f"{err} -- {desc.lower()} batch {i}") from err
            if warm.dtype in (torch.bfloat16, torch.float16):  # autocast: the statistics are fp32
                warm, base = warm.float(), base.float()
            yield batch, warm, base, labels, row
    finally:
        model.train(was_training)


def _steered_pass(model, batches: Iterable[dict], config: SteeringConfig, device, total: int | None, progress: bool,
                  desc: str):
    """Per choice batch ``(batch, warm, delta, keep, labels, row)``: the steering direction of
    ``config`` and its statistics mask at every labelled position (see :func:`_label_logits`)."""
    for batch, warm, base, labels, row in _label_logits(model, batches, forward_mode=config.forward_mode,
                                                        device=device, total=total, progress=progress, desc=desc):
        delta, lp_warm, _ = steering_direction(warm, base, config.direction)
        yield batch, warm, delta, confidence_mask(lp_warm, config.statistics_alpha), labels, row


def calibrate(model, batches: Iterable[dict], config: SteeringConfig = SteeringConfig(), **kwargs) -> CalibrationResult:
    """Steering statistics over ``batches`` (prompt + reference answer, see :mod:`svd_lightning.batch`).

    The mask threshold is ``config.statistics_alpha`` (α, or no mask under policy ``none``), the
    vector ``config.direction``. Under DDP, give each rank its own batches and the strategy's
    ``reduce`` (sum) and ``gather`` (ragged all-gather): the result is then the same on every rank
    as one process over all batches. The model is put in eval mode and restored. Keyword options:
    see :func:`calibrate_alphas`.
    """
    return calibrate_alphas(model, batches, {"alpha": config.statistics_alpha}, config, **kwargs)["alpha"]


@torch.no_grad()
def calibrate_alphas(
    model,
    batches: Iterable[dict],
    alphas: dict[str, float],
    config: SteeringConfig = SteeringConfig(),
    *,
    reduce: Reduce | None = None,
    gather: Gather | None = None,
    device: torch.device | str | None = None,
    total: int | None = None,
    progress: bool = True,
    step: int = 0,
    desc: str = "Calibration",
) -> dict[str, CalibrationResult]:
    """:func:`calibrate` for several mask thresholds from one pass over the model: ``{name: result}``.

    ``config.direction``: the steering vector the statistics are of (see
    :func:`svd_lightning.steering.steering_direction`); the ``kl_mean`` diagnostic is the same for both.
    """
    reduce, gather = reduce or _identity, gather or _identity
    device = device if device is not None else next(model.parameters()).device
    stats = {name: StrengthStats() for name in alphas}
    caches = {name: ExactStrengthCache() for name in alphas}
    sums = {name: torch.zeros(4, dtype=torch.float64) for name in alphas}  # KL, kept tokens, ‖δz‖, positions
    start = time.perf_counter()
    passes = _label_logits(model, batches, forward_mode=config.forward_mode, device=device, total=total,
                           progress=progress, desc=desc)
    for _, warm, base, labels, _ in passes:
        # One pass over the vocabulary gives δz and the log-probs the KL diagnostic reuses.
        delta, lp_warm, lp_base = steering_direction(warm, base, config.direction)
        kl = kl_from_log_probs(lp_warm, lp_base).sum().double().cpu()
        norm = delta.norm(dim=-1).sum().double().cpu()
        for name, alpha in alphas.items():
            keep = confidence_mask(lp_warm, alpha)
            stats[name].update(strength_terms(warm, delta, keep, labels))
            caches[name].update(warm, delta, keep, labels)
            sums[name] += torch.stack([kl, keep.sum(-1).double().sum().cpu() / keep.shape[-1], norm,
                                       torch.tensor(float(labels.numel()), dtype=torch.float64)])
    seconds = time.perf_counter() - start
    results = {}
    for name in alphas:
        total_sums = reduce(sums[name].to(device)).cpu()
        merged = StrengthStats.from_tensor(gather(stats[name].to_tensor().to(device)).cpu())
        positions = max(float(total_sums[3]), 1.0)
        diagnostics = {
            "kl_mean": float(total_sums[0]) / positions,
            "kept_fraction": float(total_sums[1]) / positions,
            "delta_norm_mean": float(total_sums[2]) / positions,
            "tokens": float(total_sums[3]),
            "usable_tokens": float(merged.count),
        }
        results[name] = CalibrationResult(merged, caches[name], diagnostics, step, seconds)
    return results


@dataclass
class ChoiceCalibration:
    """One pass over calibration *choice* batches: the cache the ``choice_nll`` strength is solved on."""

    cache: ChoiceStrengthCache  # this rank's questions only (the solve all-reduces the loss)
    diagnostics: dict[str, float]
    step: int = 0
    seconds: float = 0.0


@torch.no_grad()
def calibrate_choices(
    model,
    batches: Iterable[dict],
    config: SteeringConfig = SteeringConfig(),
    *,
    reduce: Reduce | None = None,
    device: torch.device | str | None = None,
    total: int | None = None,
    progress: bool = True,
    step: int = 0,
    desc: str = "Choice calibration",
) -> ChoiceCalibration:
    """The multiple-choice loss of the calibration set as a function of μ (see :class:`ChoiceStrengthCache`).

    ``batches`` are choice batches (every row of a question in one batch, see
    :mod:`svd_lightning.batch`); ``config`` holds the scoring settings (α, policy, floor,
    direction): the cache scores each choice as :func:`svd_lightning.decoding.score_choices` would
    at any μ. ``cache.solve(reduce=...)`` gives the ``choice_nll`` strength. Under DDP give each rank
    its own batches; ``reduce`` (sum) only merges the diagnostics here. The model is put in eval
    mode and restored.
    """
    reduce = reduce or _identity
    device = device if device is not None else next(model.parameters()).device
    cache = ChoiceStrengthCache(config.scoring_policy, config.floor)
    start = time.perf_counter()
    for batch, warm, delta, keep, labels, row in _steered_pass(model, batches, config, device, total, progress, desc):
        cache.update(warm, delta, keep, labels, row, *(batch[k] for k in ("question_index", "choice_set", "is_true")))
    counts = torch.tensor([len(cache.groups), cache.usable_groups(), cache.rows, cache.tokens.count],
                          dtype=torch.float64)
    counts = reduce(counts.to(device)).cpu()
    diagnostics = dict(zip(("choice_sets", "usable_choice_sets", "choice_rows", "choice_tokens"), counts.tolist()))
    return ChoiceCalibration(cache, diagnostics, step, time.perf_counter() - start)


@dataclass
class ChoiceGridCalibration:
    """The calibration set's multiple-choice loss at every strength of a fixed grid (all ranks summed)."""

    mus: list[float]
    losses: torch.Tensor  # [K] float64
    diagnostics: dict[str, float]
    step: int = 0
    seconds: float = 0.0

    def best(self) -> float:
        """The grid point with the smallest loss; ties prefer the smaller |μ|."""
        finite = [i for i, v in enumerate(self.losses.tolist()) if math.isfinite(v)]
        if not finite:
            raise FloatingPointError("the choice loss is not finite at any point of the grid")
        return self.mus[min(finite, key=lambda i: (float(self.losses[i]), abs(self.mus[i])))]

    def at_edge(self) -> bool:
        """The best point is the grid's largest or smallest: the loss may keep falling beyond it."""
        return self.best() in (min(self.mus), max(self.mus)) and self.best() != 0.0


@torch.no_grad()
def calibrate_choice_grid(
    model,
    batches: Iterable[dict],
    mus: Iterable[float],
    config: SteeringConfig = SteeringConfig(),
    *,
    reduce: Reduce | None = None,
    device: torch.device | str | None = None,
    total: int | None = None,
    progress: bool = True,
    step: int = 0,
    desc: str = "Choice calibration (grid)",
) -> ChoiceGridCalibration:
    """The multiple-choice loss of :class:`ChoiceStrengthCache` at each μ of ``mus``, exactly, in one pass.

    Where :func:`calibrate_choices` caches tokens to solve for any μ, this scores every grid point
    from each batch's logits and keeps only the sums: memory does not grow with the vocabulary kept,
    so it also serves policy ``none`` with the logit difference (the contrastive baseline). Batches
    hold whole questions (see :mod:`svd_lightning.batch`); ``config`` holds the scoring settings
    (its ``mu`` is ignored: the grid gives the strengths; ``config.contrastive(gamma=...)`` with any γ is the
    contrastive baseline's). Under DDP give each rank its own batches
    and ``reduce`` (sum): the losses are then those of all ranks' questions.
    """
    mus = [float(m) for m in mus]
    if len(mus) < 2 or not all(math.isfinite(m) for m in mus):
        raise ValueError(f"the strength grid needs at least 2 finite points, got {mus}")
    reduce = reduce or _identity
    device = device if device is not None else next(model.parameters()).device
    losses = torch.zeros(len(mus), dtype=torch.float64)
    counts = torch.zeros(2, dtype=torch.float64)  # choice sets, choice rows
    policy, floor = config.scoring_policy, config.floor
    start = time.perf_counter()
    for batch, warm, delta, keep, labels, row in _steered_pass(model, batches, config, device, total, progress, desc):
        pairs = torch.stack([batch["question_index"], batch["choice_set"]]).cpu()
        sets, group = torch.unique(pairs, dim=1, return_inverse=True)
        true, n = batch["is_true"].bool().cpu(), batch["input_ids"].shape[0]
        for k, mu in enumerate(mus):
            token = policy_log_probs(warm, delta, keep, mu, policy, floor).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            scores = torch.zeros(n, dtype=torch.float64).index_add(0, row.cpu(), token.double().cpu())
            nll = choice_set_nll(scores, group, true, sets.shape[1])
            losses[k] += nll[torch.isfinite(nll)].sum()
        counts += torch.tensor([sets.shape[1], n], dtype=torch.float64)
    losses = reduce(losses.to(device)).cpu()
    counts = reduce(counts.to(device)).cpu()
    diagnostics = dict(zip(("choice_sets", "choice_rows"), counts.tolist()))
    return ChoiceGridCalibration(mus, losses, diagnostics, step, time.perf_counter() - start)
