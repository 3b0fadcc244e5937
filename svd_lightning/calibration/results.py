"""What a calibration pass is asked for (:class:`CalibrationNeeds`) and what it gives back: μ̄'s token
statistics, the ``choice_nll`` caches and the strength grids' losses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from svd_lightning.calibration.solvers import ChoiceStrengthCache, ExactStrengthCache, best_grid_point
from svd_lightning.config import SteeringConfig
from svd_lightning.steering import StrengthStats

CHOICE_NLL = "choice_nll"  # the name of the pass config's choice cache
Reduce = Callable[[torch.Tensor], torch.Tensor]  # all-reduce (sum) across ranks
Gather = Callable[[torch.Tensor], torch.Tensor]  # all-gather [k, n_rank] -> [k, Σ n]


@dataclass
class CalibrationNeeds:
    """What the solvers of one warm-start state ask of its calibration pass; each declares its part.

    Args:
        tokens: the token statistics of μ̄ under the pass's config (key ``"alpha"``).
        statistics: token statistics under further named configs (their direction and mask
            threshold, :attr:`SteeringConfig.statistics_alpha`; benchmarks compare masks and directions).
        choice_cache: the ``choice_nll`` cache, under the pass's config (key ``"choice_nll"``).
        choice_caches: ``choice_nll`` caches under further named configs.
        grids: the exact choice loss on a grid of strengths, per decoding method
            (``{"contrastive": γ grid}``: the contrastive baseline's; ``"svdecode"``: μ of the config).
        limit_batches: the first k calibration batches only (one value for all solvers: one pass).
    """

    tokens: bool = False
    statistics: dict[str, SteeringConfig] = field(default_factory=dict)
    choice_cache: bool = False
    choice_caches: dict[str, SteeringConfig] = field(default_factory=dict)
    grids: dict[str, tuple[float, ...]] = field(default_factory=dict)
    limit_batches: int | None = None

    @property
    def choices(self) -> bool:
        """Some solver needs the choice rows (a choice batch pass), not only the reference rows."""
        return self.choice_cache or bool(self.choice_caches) or bool(self.grids)

    def add(self, other: "CalibrationNeeds", who: str = "a solver") -> "CalibrationNeeds":
        """Merge ``other`` in; two solvers that want different batches or grids of one name are an error."""
        if other.limit_batches is not None:
            if self.limit_batches is not None and self.limit_batches != other.limit_batches:
                raise ValueError(f"{who} asks for limit_batches={other.limit_batches}, another solver for "
                                 f"{self.limit_batches}: one calibration pass serves them all, give them one value")
            self.limit_batches = other.limit_batches
        for name, mus in other.grids.items():
            if name in self.grids and tuple(self.grids[name]) != tuple(mus):
                raise ValueError(f"{who} asks for another {name} grid than a solver before it")
            self.grids[name] = tuple(float(m) for m in mus)
        for mine, theirs in ((self.statistics, other.statistics), (self.choice_caches, other.choice_caches)):
            for name, config in theirs.items():
                if name in mine and mine[name] != config:
                    raise ValueError(f"{who} asks for other {name!r} settings than a solver before it")
                mine[name] = config
        self.tokens |= other.tokens
        self.choice_cache |= other.choice_cache
        return self

    def covers(self, other: "CalibrationNeeds") -> bool:
        """Everything ``other`` asks for is part of these needs."""
        return ((self.tokens or not other.tokens) and (self.choice_cache or not other.choice_cache)
                and other.statistics.items() <= self.statistics.items()
                and other.choice_caches.items() <= self.choice_caches.items() and other.grids.items() <= self.grids.items())


@dataclass
class CalibrationResult:
    """Sufficient statistics of the strength μ̄ and diagnostics of one calibration pass."""

    stats: StrengthStats
    cache: ExactStrengthCache  # this rank's tokens only (the exact solve all-reduces sums)
    diagnostics: dict[str, float]
    step: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass
class ChoiceCalibration:
    """One pass over calibration *choice* batches: the cache the ``choice_nll`` strength is solved on."""

    cache: ChoiceStrengthCache  # this rank's questions only (the solve all-reduces the loss)
    diagnostics: dict[str, float]
    step: int = 0
    seconds: float = 0.0


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
        return self.mus[best_grid_point(self.mus, self.losses.tolist())]

    def at_edge(self) -> bool:
        """The best point is the grid's largest or smallest: the loss may keep falling beyond it."""
        return self.best() in (min(self.mus), max(self.mus)) and self.best() != 0.0


@dataclass
class CalibrationPass:
    """Everything one pass over the calibration questions gave: one entry per declared need."""

    needs: CalibrationNeeds
    tokens: dict[str, CalibrationResult] | None  # by name ("alpha": the pass's config)
    choice_caches: dict[str, ChoiceCalibration]  # by name ("choice_nll": the pass's config)
    grids: dict[str, ChoiceGridCalibration]
    missing_references: int  # questions (all ranks) whose choice rows hold no reference row
    batches: int  # calibration batches (all ranks)
    passes: int = 1  # 2 when the token statistics had to take a pass of their own
    step: int = 0
    seconds: float = 0.0
    choice_counts: dict[str, float] = field(default_factory=dict)  # choice sets and rows, when choices were read

    @property
    def choices(self) -> ChoiceCalibration | None:
        """The ``choice_nll`` cache under the pass's config (``needs.choice_cache``)."""
        return self.choice_caches.get(CHOICE_NLL)

    @property
    def diagnostics(self) -> dict[str, float]:
        """What the pass was: passes, batches and (when choices were read) choice sets and rows."""
        return {"calibration_passes": self.passes, "calibration_batches": self.batches, **self.choice_counts}
