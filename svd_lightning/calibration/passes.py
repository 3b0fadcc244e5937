"""The calibration pass, with no Trainer: one pass over the calibration questions feeds every solver.

:func:`calibrate_pass` runs the warm and pre-trained models once over the calibration batches
and accumulates what the solvers of that warm-start state declared in :class:`CalibrationNeeds`:

* the token statistics of μ̄ (:class:`CalibrationResult`: every token-level strength option and
  the exact solve), from each question's reference row (prompt + reference answer);
* the ``choice_nll`` cache (:class:`ChoiceCalibration`), from every choice row;
* the exact multiple-choice loss on a strength grid (:class:`ChoiceGridCalibration`: the
  contrastive baseline's γ), from every choice row.

Choice batches (:func:`svd_lightning.batch.collate_choices`) carry all three: their
``is_reference`` rows are the reference rows. Teacher-forced batches (:func:`collate_lm`) carry the
token statistics only. :func:`calibrate`, :func:`calibrate_choices` and
:func:`calibrate_choice_grid` are the single-purpose forms. The Lightning callbacks
(:mod:`svd_lightning.callbacks`) are thin wrappers that pass in their rank's batches and the
collectives of their strategy; ``benchmarks/`` call it directly.
"""

from __future__ import annotations

import math
import time
from typing import Iterable

import torch

from svd_lightning.calibration.results import (
    CHOICE_NLL,
    CalibrationNeeds,
    CalibrationPass,
    CalibrationResult,
    ChoiceCalibration,
    ChoiceGridCalibration,
    Gather,
    Reduce,
)
from svd_lightning.calibration.solvers import ChoiceStrengthCache, ExactStrengthCache
from svd_lightning.config import ForwardMode, SteeringConfig
from svd_lightning.forward.encoders import distinct_rows
from svd_lightning.forward.prefix import PrefixCache
from svd_lightning.progress import track
from svd_lightning.scoring import POSITION_CHUNK, paired_label_logits
from svd_lightning.sharding import lockstep
from svd_lightning.steering import PairedLabels, StrengthStats, choice_set_nll, kl_from_log_probs, strength_terms


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _label_logits(model, batches: Iterable[dict], *, forward_mode: ForwardMode, device, total: int | None,
                  progress: bool, desc: str, prefixes: PrefixCache | None):
    """Per batch ``(batch, same_as, parts)``: ``parts`` a list of ``(warm, base, labels, row)`` at
    the labelled positions (fp32, eval mode), one per question of the batch's distinct rows (``row``
    indexes them, ``same_as`` maps each batch row to its distinct row; see :func:`distinct_rows`).

    The model is put in eval mode for the pass (dropout off) and restored when the generator ends.
    """
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(track(batches, desc, total=total, unit="batch", enabled=progress)):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            distinct, same_as = distinct_rows(batch)
            try:
                parts = _question_by_question(model, distinct, forward_mode, prefixes)
            except FloatingPointError as err:
                raise FloatingPointError(f"{err} -- {desc.lower()} batch {i}") from err
            yield batch, same_as, parts
    finally:
        model.train(was_training)


def _question_by_question(model, batch: dict, forward_mode: ForwardMode, prefixes: PrefixCache | None
                           ) -> list[tuple[torch.Tensor, ...]]:
    """:func:`paired_label_logits` of a choice batch, one question's rows at a time (their prompt once),
    fp32 or wider: a list of ``(warm, base, labels, row)``, ``row`` into the batch's rows.

    Measured on CPU (SmolLM2, TruthfulQA, 2-core Xeon with AVX512-BF16, fp32): 16 questions take
    9.8 s this way and 11.0 s as 8-question batches of trees (:class:`SharedPrompts`: longer padding,
    the primer's keys and values copied per question). The parts are not concatenated (a copy of
    every logit). Teacher-forced batches (one row per question) stay whole.
    """
    if "question_index" not in batch:
        parts = [paired_label_logits(model, batch, forward_mode=forward_mode, prefixes=prefixes)]
    else:
        q = batch["question_index"]
        starts = [0, *((q[1:] != q[:-1]).nonzero().flatten() + 1).tolist(), q.numel()]
        parts = []
        for a, b in zip(starts[:-1], starts[1:]):
            part = {k: v[a:b] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == q.numel() else v
                    for k, v in batch.items()}
            warm, base, labels, row = paired_label_logits(model, part, forward_mode=forward_mode, prefixes=prefixes)
            parts.append((warm, base, labels, row + a))
    if parts[0][0].dtype in (torch.bfloat16, torch.float16):  # autocast: the statistics are fp32
        parts = [(w.float(), None if z is None else z.float(), y, r) for w, z, y, r in parts]
    return parts


def reference_rows(batch: dict) -> tuple[torch.Tensor, int]:
    """``(rows [N] bool, questions without one)``: the rows the token statistics are taken from.

    A teacher-forced batch is all reference rows; a choice batch marks them in ``is_reference``
    (at most one per question); a choice batch without that key has none.
    """
    n = batch["input_ids"].shape[0]
    if "question_index" not in batch:
        return torch.ones(n, dtype=torch.bool, device=batch["input_ids"].device), 0
    questions = batch["question_index"]
    if "is_reference" not in batch:
        return torch.zeros(n, dtype=torch.bool, device=questions.device), int(torch.unique(questions).numel())
    ref = batch["is_reference"].bool()
    per_question = torch.unique(questions[ref], return_counts=True)
    if per_question[0].numel() and int(per_question[1].max()) > 1:
        q = int(per_question[0][per_question[1].argmax()])
        raise ValueError(f"question {q} has {int(per_question[1].max())} reference rows (is_reference); "
                         "a question has at most one")
    return ref, int(torch.unique(questions).numel()) - int(per_question[0].numel())


class _TokenStatistics:
    """The token statistics of μ̄ under several named configs (see :class:`CalibrationResult`)."""

    def __init__(self, configs: dict[str, SteeringConfig]):
        self.configs = configs
        self.stats = {name: StrengthStats() for name in configs}
        self.caches = {name: ExactStrengthCache() for name in configs}
        self.sums = {name: torch.zeros(4, dtype=torch.float64, device="cpu") for name in configs}  # KL, kept, ‖δz‖, positions

    def update(self, paired: PairedLabels, ref: torch.Tensor) -> None:
        """One batch's reference positions ``ref`` (per label position) of its ``paired`` logits."""
        every = bool(ref.all())
        pick = (lambda t: t) if every else (lambda t: t[ref])  # noqa: E731
        warm, labels = pick(paired.warm), pick(paired.labels)
        kl = kl_from_log_probs(pick(paired.lp_warm), pick(paired.lp_base)).sum().double().cpu()
        for name, config in self.configs.items():
            delta, keep = pick(paired.direction(config.direction)), pick(paired.mask(config.statistics_alpha))
            self.stats[name].update(strength_terms(warm, delta, keep, labels))
            self.caches[name].update(warm, delta, keep, labels)
            self.sums[name] += torch.stack([kl, keep.sum(-1).double().sum().cpu() / keep.shape[-1],
                                            delta.norm(dim=-1).sum().double().cpu(),
                                            torch.tensor(float(labels.numel()), dtype=torch.float64, device="cpu")])

    def finish(self, reduce: Reduce, gather: Gather, device, step: int, seconds: float) -> dict[str, CalibrationResult]:
        results = {}
        for name in self.configs:
            total = reduce(self.sums[name].to(device)).cpu()
            merged = StrengthStats.from_tensor(gather(self.stats[name].to_tensor().to(device)).cpu())
            positions = max(float(total[3]), 1.0)
            diagnostics = {
                "kl_mean": float(total[0]) / positions,
                "kept_fraction": float(total[1]) / positions,
                "delta_norm_mean": float(total[2]) / positions,
                "tokens": float(total[3]),
                "usable_tokens": float(merged.count),
            }
            results[name] = CalibrationResult(merged, self.caches[name], diagnostics, step, seconds)
        return results


class _GridLosses:
    """The summed choice-set NLL at every point of a strength grid, scored exactly from each batch."""

    def __init__(self, mus: Iterable[float], config: SteeringConfig):
        self.mus = [float(m) for m in mus]
        if len(self.mus) < 2 or not all(math.isfinite(m) for m in self.mus):
            raise ValueError(f"the strength grid needs at least 2 finite points, got {self.mus}")
        self.config = config
        self.configs = [config.replace(mu=mu) for mu in self.mus]
        self.losses = torch.zeros(len(self.mus), dtype=torch.float64, device="cpu")

    def row_scores(self, scores: torch.Tensor, paired: PairedLabels, row: torch.Tensor) -> None:
        """Add some label positions' steered log-probs to the batch's per-row sums ``scores [K, N]``."""
        # one device-to-host copy for the whole grid (not one per grid point)
        values = torch.stack([paired.log_probs(config) for config in self.configs]).double().cpu()
        scores.index_add_(1, row.cpu(), values)

    def add(self, batch, scores: torch.Tensor) -> None:
        """The batch's choice-set losses at every grid point, from its per-row sums."""
        pairs = torch.stack([batch["question_index"], batch["choice_set"]]).cpu()
        sets, group = torch.unique(pairs, dim=1, return_inverse=True)
        true = batch["is_true"].bool().cpu()
        for i in range(len(self.mus)):
            nll = choice_set_nll(scores[i], group, true, sets.shape[1])
            self.losses[i] += nll[torch.isfinite(nll)].sum()


def _grid_config(config: SteeringConfig, method: str) -> SteeringConfig:
    """The scoring settings a grid of ``method`` is scored with (its μ or γ comes from the grid)."""
    return config if method == "svdecode" else config.contrastive(gamma=0.0)


@torch.no_grad()
def calibrate_pass(
    model,
    batches: Iterable[dict],
    config: SteeringConfig = SteeringConfig(),
    needs: CalibrationNeeds | None = None,
    *,
    reduce: Reduce | None = None,
    gather: Gather | None = None,
    device: torch.device | str | None = None,
    total: int | None = None,
    progress: bool = True,
    step: int = 0,
    desc: str = "Calibration",
    prefixes: PrefixCache | None = None,
    forward_mode: ForwardMode = "auto",
) -> CalibrationPass:
    """One pass over ``batches`` with the model; everything ``needs`` asks for (see the module doc).

    ``config`` holds the settings (α, policy, floor, direction); ``forward_mode``: see
    :mod:`svd_lightning.forward.rows`. Under DDP give each
    rank its own batches (whole questions), the strategy's ``reduce`` (sum) and ``gather`` (ragged
    all-gather): the statistics, losses and counts are then those of all ranks' questions; the
    caches hold this rank's (their solves all-reduce). The model is put in eval mode and restored.
    ``needs`` defaults to μ̄'s token statistics alone; ``prefixes``: the model owner's
    :class:`~svd_lightning.forward.prefix.PrefixCache`, if it keeps one.
    """
    needs = needs if needs is not None else CalibrationNeeds(tokens=True)
    reduce, gather = reduce or _identity, gather or _identity
    device = device if device is not None else next(model.parameters()).device
    statistics = {**({"alpha": config} if needs.tokens else {}), **needs.statistics}
    tokens = _TokenStatistics(statistics) if statistics else None
    cache_configs = {**({CHOICE_NLL: config} if needs.choice_cache else {}), **needs.choice_caches}
    caches = {name: ChoiceStrengthCache(c.scoring_policy, c.floor) for name, c in cache_configs.items()}
    grids = {name: _GridLosses(mus, _grid_config(config, name)) for name, mus in needs.grids.items()}
    counts = torch.zeros(4, dtype=torch.float64, device="cpu")  # batches, questions without a reference row, choice sets, rows
    began = time.perf_counter()
    with lockstep(model):  # sharded: a rank with fewer batches keeps the others' forwards company
        for batch, same_as, parts in _label_logits(model, batches, forward_mode=forward_mode, device=device,
                                                   total=total, progress=progress, desc=desc, prefixes=prefixes):
            counts[0] += 1
            n = int(same_as.max()) + 1  # distinct rows: the ones the logits are of
            if tokens is not None:
                ref_rows, missing = reference_rows(batch)
                counts[1] += missing
                ref_distinct = torch.zeros(n, dtype=torch.bool, device=ref_rows.device).index_fill(0, same_as[ref_rows], True)
            if caches or grids:
                if "question_index" not in batch:
                    raise ValueError(f"{desc}: a solver needs choice batches (question_index, choice_set, is_true), "
                                     "got a teacher-forced batch; see svd_lightning.batch")
                counts[2] += torch.unique(torch.stack([batch["question_index"], batch["choice_set"]]), dim=1).shape[1]
                counts[3] += batch["input_ids"].shape[0]
            grid_scores = {name: torch.zeros(len(g.mus), n, dtype=torch.float64, device="cpu") for name, g in grids.items()}
            # POSITION_CHUNK positions at a time (their [chunk, V] tensors stay in cache): per-position
            # work, accumulated in order, so the numbers do not change.
            for warm, base, labels, row in parts:
                ref = ref_distinct[row] if tokens is not None else None  # per label position
                for first in range(0, labels.numel(), POSITION_CHUNK):
                    part = slice(first, first + POSITION_CHUNK)
                    paired = PairedLabels(warm[part], base[part], labels[part])  # one pair of log-softmaxes for all
                    if tokens is not None and bool(ref[part].any()):
                        tokens.update(paired, ref[part])
                    for name, cache in caches.items():
                        c = cache_configs[name]
                        cache.add_tokens(paired.warm, paired.direction(c.direction), paired.mask(c.statistics_alpha),
                                         paired.labels, row[part])
                    for name, grid in grids.items():
                        grid.row_scores(grid_scores[name], paired, row[part])
            for cache in caches.values():
                cache.add_rows(*(batch[k] for k in ("question_index", "choice_set", "is_true")), same_as)
            for name, grid in grids.items():
                grid.add(batch, grid_scores[name][:, same_as.cpu()])
    seconds = time.perf_counter() - began
    counts = reduce(counts.to(device)).cpu()
    choice_counts = {"choice_sets": float(counts[2]), "choice_rows": float(counts[3])}
    choice_results = {}
    for name, cache in caches.items():
        own = torch.tensor([cache.usable_groups(), cache.tokens.count], dtype=torch.float64, device="cpu")
        usable, choice_tokens = reduce(own.to(device)).cpu().tolist()
        choice_results[name] = ChoiceCalibration(cache, {**choice_counts, "usable_choice_sets": usable,
                                                         "choice_tokens": choice_tokens}, step, seconds)
    grid_results = {name: ChoiceGridCalibration(g.mus, reduce(g.losses.to(device)).cpu(), dict(choice_counts),
                                                step, seconds) for name, g in grids.items()}
    token_results = None if tokens is None else tokens.finish(reduce, gather, device, step, seconds)
    return CalibrationPass(needs, token_results, choice_results, grid_results, int(counts[1]), int(counts[0]),
                           step=step, seconds=seconds, choice_counts=choice_counts if needs.choices else {})


def calibrate(model, batches: Iterable[dict], config: SteeringConfig = SteeringConfig(), **kwargs) -> CalibrationResult:
    """Steering statistics over ``batches`` (prompt + reference answer, see :mod:`svd_lightning.batch`).

    The mask threshold is ``config.statistics_alpha`` (α, or no mask under policy ``none``), the
    vector ``config.direction``. Under DDP, give each rank its own batches and the strategy's
    ``reduce`` (sum) and ``gather`` (ragged all-gather): the result is then the same on every rank
    as one process over all batches. The model is put in eval mode and restored. Keyword options:
    see :func:`calibrate_pass`; choice batches work too (their reference rows are used).
    """
    return calibrate_pass(model, batches, config, CalibrationNeeds(tokens=True), **kwargs).tokens["alpha"]


def calibrate_choices(model, batches: Iterable[dict], config: SteeringConfig = SteeringConfig(), *,
                      desc: str = "Choice calibration", **kwargs) -> ChoiceCalibration:
    """The multiple-choice loss of the calibration set as a function of μ (see :class:`ChoiceStrengthCache`).

    ``batches`` are choice batches (every row of a question in one batch, see
    :mod:`svd_lightning.batch`); ``config`` holds the scoring settings (α, policy, floor,
    direction): the cache scores each choice as :func:`svd_lightning.scoring.score_choices` would
    at any μ. ``cache.solve(reduce=...)`` gives the ``choice_nll`` strength. Under DDP give each rank
    its own batches; ``reduce`` (sum) only merges the diagnostics here.
    """
    return calibrate_pass(model, batches, config, CalibrationNeeds(choice_cache=True), desc=desc, **kwargs).choices


def calibrate_choice_grid(model, batches: Iterable[dict], mus: Iterable[float],
                          config: SteeringConfig = SteeringConfig(), *, desc: str = "Choice calibration (grid)",
                          **kwargs) -> ChoiceGridCalibration:
    """The multiple-choice loss of :class:`ChoiceStrengthCache` at each μ of ``mus``, exactly, in one pass.

    Where :func:`calibrate_choices` caches tokens to solve for any μ, this scores every grid point
    from each batch's logits and keeps only the sums: memory does not grow with the vocabulary kept,
    so it also serves policy ``none`` with the logit difference (the contrastive baseline). Batches
    hold whole questions (see :mod:`svd_lightning.batch`); ``config`` holds the scoring settings
    (its ``mu`` is ignored: the grid gives the strengths; ``config.contrastive(gamma=...)`` with any γ
    is the contrastive baseline's). Under DDP give each rank its own batches and ``reduce`` (sum).
    """
    needs = CalibrationNeeds(grids={"svdecode": tuple(float(m) for m in mus)})  # scored with ``config`` as it is
    return calibrate_pass(model, batches, config, needs, desc=desc, **kwargs).grids["svdecode"]
