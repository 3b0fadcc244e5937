"""The strength solvers that need more than an average of per-token strengths, torch only:

* :class:`ExactStrengthCache` -- the μ that minimises the calibration tokens' NLL exactly (convex: Newton);
* :class:`ChoiceStrengthCache` -- the μ that minimises the calibration questions' multiple-choice loss
  (``choice_nll``; not convex: a bracketing grid, then golden section);
* :func:`strength_grid` and :func:`best_grid_point`, the grid and its pick (ties to the smaller |μ|).

Each keeps a compact form of its tokens, so the loss at any μ needs no model pass, and all-reduces sums
across ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from svd_lightning.batch import IGNORE_INDEX
from svd_lightning.config import ScoringPolicy
from svd_lightning.steering.choices import choice_set_nll, segment_logsumexp
from svd_lightning.steering.strengths import host_accumulator
from svd_lightning.steering.vector import EPS, compact_label_log_probs, masked_delta

# NO_MASK_ALPHA (svd_lightning.config): under policy `none` (no confidence mask) the caches keep tokens with
# p_φ ≥ 1e-8·max p_φ in the compact strength caches: every token below moves its logit by
# |μ·δz| ≤ |μ|·1e-8·|KL − r| -- nothing measurable -- while keeping the exact solve's cache to the
# tokens that carry probability. That bound is for the KL gradient (δz ∝ p_φ); the logit difference
# is not small there, so under direction logit_difference + policy none the strength solves treat
# those tokens as unsteered: an approximation of the unmasked objective (a μ large enough to lift
# them into the top is rare).


@dataclass
class ExactStrengthCache:
    """Compact per-token cache to minimise the calibration NLL ``Σ −log softmax(z_φ + μ·δ̂)_y`` exactly.

    ``z_φ + μ·δ̂`` differs from ``z_φ`` only on kept tokens, so a token is summarised by the
    log-sum-exp of its masked logits, its kept logits and δ̂ (ragged, flattened with a segment id)
    and its label's logit and δ̂. The loss is convex in μ (log-sum-exp of affine functions minus an
    affine one), so safeguarded Newton finds the global minimum without another pass over the data.
    """

    rest_lse: torch.Tensor = field(default_factory=host_accumulator)
    label_logit: torch.Tensor = field(default_factory=host_accumulator)
    label_delta: torch.Tensor = field(default_factory=host_accumulator)
    kept_logit: torch.Tensor = field(default_factory=host_accumulator)
    kept_delta: torch.Tensor = field(default_factory=host_accumulator)
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
        kept_lse = segment_logsumexp(t.kept_logit + mu * t.kept_delta, t.segment, t.count)
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
        return int(torch.isfinite(segment_logsumexp(s, self.row_group, len(self.groups))).sum())

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
