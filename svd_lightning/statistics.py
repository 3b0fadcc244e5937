"""The statistics of every reported result, in one place: paired, hierarchical and selection-aware bootstraps.

Pure functions on per-question arrays (numpy): ``fit``'s tables (:mod:`svd_lightning.callbacks`),
``research/report.py`` and ``benchmarks/open_generation.py`` all call them, so the same
comparison gets the same interval wherever it is printed.

* :func:`paired_bootstrap` -- one run: the mean of per-question differences, 95% percentile
  interval over questions (paired: the question effect stays out of it).
* :func:`hierarchical_ci` -- several seeds: resample seeds, then the questions within each drawn
  seed (with one seed it is :func:`paired_bootstrap`). Given the questions' ids, seeds and questions
  are resampled as *crossed* factors instead (the pigeonhole bootstrap, Owen 2007): seeds that share
  questions (seeded splits of one file, or one fixed test file) share each question's draw.
* :func:`selection_ci` -- a variant chosen on calib data: every replicate redoes the choice on
  resampled calib questions (in-sample, or leave-one-seed-out), so the winner's curse is inside
  the interval; crossed likewise when given ids.
* :func:`seed_t_interval` -- several seeds: Student's t interval over the per-seed gains alone,
  the seed level without the bootstrap's help from the questions (wide with 2-3 seeds, and
  honestly so); reported beside :func:`hierarchical_ci`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

BOOTSTRAP = 10_000  # replicates of fit's one-run intervals (the report passes its own)


def paired_bootstrap(diff, n_boot: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-question differences with a 95% percentile bootstrap interval over questions.

    Paired: both methods answered the same questions, so resampling their differences keeps the
    question effect out of the interval. One run's interval: it says nothing about seed variance.
    Seeded: the same interval every time.
    """
    diff = np.asarray(diff, dtype=np.float64).reshape(-1)
    return hierarchical_ci([diff], np.random.default_rng(seed), n_boot)




def _resampled_means(x: np.ndarray, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Means over the last axis of ``x`` ([..., n] questions) for ``shape`` bootstrap draws of the
    questions with replacement, one draw shared by every leading row (paired): ``shape + x.shape[:-1]``."""
    n, draws = x.shape[-1], int(np.prod(shape))
    idx = rng.integers(0, n, size=(draws, n)) + n * np.arange(draws)[:, None]
    counts = np.bincount(idx.ravel(), minlength=draws * n).reshape(draws, n).astype(float)  # times each question is drawn
    flat = x.reshape(-1, n)
    return (counts @ flat.T / n).reshape(*shape, *x.shape[:-1])


def _over_drawn_seeds(per_slot: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """``per_slot[k][b, j]``: seed k's statistic if drawn into slot j of replicate b. Draws S seeds with
    replacement per replicate and averages their slots: [B]. A seed drawn twice gets two independent
    question resamples (its slots differ)."""
    stacked = np.stack(per_slot)  # [S, B, S]
    n_seeds, n_boot = stacked.shape[0], stacked.shape[1]
    drawn = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    return stacked[drawn, np.arange(n_boot)[:, None], np.arange(n_seeds)[None, :]].mean(axis=1)


def _ci(mean: float, boot: np.ndarray) -> tuple[float, float, float]:
    return float(mean), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def _crossed_weights(ids: Sequence[Sequence], rng: np.random.Generator, n_boot: int) -> list[np.ndarray]:
    """Per id list, [B, len] multiplicities of its questions in B draws with replacement of the distinct
    ids of every list together: a question drawn k times weighs k in every list that holds it."""
    distinct = sorted({q for qs in ids for q in qs}, key=repr)
    where = {q: i for i, q in enumerate(distinct)}
    n = len(distinct)
    idx = rng.integers(0, n, size=(n_boot, n)) + n * np.arange(n_boot)[:, None]
    counts = np.bincount(idx.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(float)
    return [counts[:, [where[q] for q in qs]] for qs in ids]


def _weighted_means(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Means over the last axis of ``x`` ([..., n]) under each replicate's weights ([B, n]): [B, ...]. A
    replicate that drew none of these questions (vanishingly rare at the sizes reported) gives NaN."""
    total = weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ x.reshape(-1, x.shape[-1]).T).reshape(-1, *x.shape[:-1]) / total.reshape(-1, *[1] * (x.ndim - 1))


def _over_seeds(per_seed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``per_seed[k, b]``: seed k's statistic in replicate b. Draws the seeds with replacement per
    replicate and averages them: [B] (crossed: a seed drawn twice is the same seed, the same questions)."""
    n_seeds, n_boot = per_seed.shape
    drawn = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    return per_seed[drawn, np.arange(n_boot)[:, None]].mean(axis=1)


def _ci_ignoring_empty(mean: float, boot: np.ndarray) -> tuple[float, float, float]:
    return float(mean), float(np.nanpercentile(boot, 2.5)), float(np.nanpercentile(boot, 97.5))


def _check_ids(ids: Sequence[Sequence], values: Sequence[np.ndarray], what: str) -> None:
    for k, (qs, x) in enumerate(zip(ids, values)):
        if len(qs) != np.asarray(x).shape[-1]:
            raise ValueError(f"{what}: seed {k} has {np.asarray(x).shape[-1]} values but {len(qs)} question ids")


def hierarchical_ci(diffs: Sequence[np.ndarray], rng: np.random.Generator, n_boot: int = BOOTSTRAP,
                    questions: Sequence[Sequence] | None = None) -> tuple[float, float, float]:
    """Mean over seeds of the per-seed mean difference, with a 95% CI that resamples seeds, then the
    questions within each drawn seed. Seeds may have different (and different numbers of) questions.
    With one seed it is the question bootstrap; with few seeds the seed level makes it wide, as it should.

    ``questions``: per seed, the ids of its questions (any hashable, e.g. ``(file, row)``). Then seeds and
    questions are resampled as crossed factors: one draw of the distinct questions per replicate, shared
    by every seed that holds them, and the seeds drawn with replacement. Seeds whose test sets overlap
    are not independent in their questions; nesting would treat them so."""
    diffs = [np.asarray(d, dtype=float) for d in diffs]
    mean = np.mean([d.mean() for d in diffs])
    if questions is None:
        n_seeds = len(diffs)
        per_slot = [_resampled_means(d, rng, (n_boot, n_seeds)) for d in diffs]
        return _ci(mean, _over_drawn_seeds(per_slot, rng))
    _check_ids(questions, diffs, "hierarchical_ci")
    weights = _crossed_weights(questions, rng, n_boot)
    per_seed = np.stack([_weighted_means(d, w) for d, w in zip(diffs, weights)])  # [S, B]
    return _ci_ignoring_empty(mean, _over_seeds(per_seed, rng))


def pick(calib: dict[str, Sequence[np.ndarray]], seeds: Sequence[int]) -> str:
    """The variant with the best calib mean pooled over the questions of ``seeds`` (ties: first by name).

    ``calib``: variant -> per seed, its per-question calib values."""
    names = sorted(calib)
    pooled = [np.concatenate([np.asarray(calib[v][j], dtype=float) for j in seeds]).mean() for v in names]
    return names[int(np.argmax(pooled))]


def in_sample_picks(calib: dict[str, Sequence[np.ndarray]]) -> list[str]:
    """Per seed, the variant best on that seed's own calib questions (what the grid's rows always did)."""
    n_seeds = len(next(iter(calib.values())))
    return [pick(calib, [k]) for k in range(n_seeds)]


def loso_picks(calib: dict[str, Sequence[np.ndarray]]) -> list[str] | None:
    """Per seed k, the variant best on the calib questions of every other seed (pooled): a choice made
    without seed k's data, so seed k's test split scores it out of sample. None with a single seed."""
    n_seeds = len(next(iter(calib.values())))
    if n_seeds < 2:
        return None
    return [pick(calib, [j for j in range(n_seeds) if j != k]) for k in range(n_seeds)]


def picked_gains(picks: Sequence[str], test: dict[str, Sequence[np.ndarray]], warm: Sequence[np.ndarray]) -> list[float]:
    """Per seed k, the test gain of ``picks[k]`` over the warm start on seed k's questions."""
    return [float(np.mean(np.asarray(test[v][k], dtype=float) - np.asarray(warm[k], dtype=float))) for k, v in enumerate(picks)]


def selection_ci(calib: dict[str, Sequence[np.ndarray]], test: dict[str, Sequence[np.ndarray]], warm: Sequence[np.ndarray],
                 rng: np.random.Generator, loso: bool, n_boot: int = BOOTSTRAP,
                 questions: Sequence[Sequence] | None = None, calib_questions: Sequence[Sequence] | None = None
                 ) -> tuple[float, float, float]:
    """Seed-averaged gain of a calib-selected variant with a 95% CI that includes the selection: each
    replicate resamples every seed's calib questions and redoes the picks (LOSO: on the other seeds;
    else on the seed's own calib), then resamples seeds and each drawn seed's test questions.

    ``questions`` / ``calib_questions``: per seed, the ids of its test / calib questions. Given both, the
    resampling is crossed (:func:`hierarchical_ci`): one draw of every distinct question per replicate,
    calib and test alike, shared by the seeds that hold it."""
    names = sorted(calib)
    n_seeds = len(warm)
    picks = loso_picks(calib) if loso else in_sample_picks(calib)
    if picks is None:
        raise ValueError("leave-one-seed-out needs at least two seeds")
    mean = float(np.mean(picked_gains(picks, test, warm)))
    if (questions is None) != (calib_questions is None):
        raise ValueError("selection_ci: give the test and the calib questions' ids, or neither")
    if questions is not None:
        _check_ids(questions, warm, "selection_ci (test)")
        _check_ids(calib_questions, calib[names[0]], "selection_ci (calib)")
        weights = _crossed_weights([*calib_questions, *questions], rng, n_boot)
        calib_w, test_w = weights[:n_seeds], weights[n_seeds:]
        # per seed, the calib sums [B, V] under the shared weights (sums: seeds pool by question)
        sums = [calib_w[j] @ np.stack([np.asarray(calib[v][j], dtype=float) for v in names]).T for j in range(n_seeds)]
        per_seed = []
        for k in range(n_seeds):
            pool = [j for j in range(n_seeds) if j != k] if loso else [k]
            chosen = np.argmax(sum(sums[j] for j in pool), axis=1)  # [B]; argmax ties: first by name
            diffs = np.stack([np.asarray(test[v][k], dtype=float) - np.asarray(warm[k], dtype=float) for v in names])
            per_seed.append(_weighted_means(diffs, test_w[k])[np.arange(n_boot), chosen])  # [B]
        return _ci_ignoring_empty(mean, _over_seeds(np.stack(per_seed), rng))
    # calib: per seed, resampled sums [B, V] (sums, so seeds of different sizes pool by question)
    sizes = [len(calib[names[0]][j]) for j in range(n_seeds)]
    sums = [_resampled_means(np.stack([np.asarray(calib[v][j], dtype=float) for v in names]), rng, (n_boot,)) * sizes[j]
            for j in range(n_seeds)]
    per_slot = []
    for k in range(n_seeds):
        pool = [j for j in range(n_seeds) if j != k] if loso else [k]
        chosen = np.argmax(sum(sums[j] for j in pool), axis=1)  # [B]; argmax ties: first by name
        diffs = np.stack([np.asarray(test[v][k], dtype=float) - np.asarray(warm[k], dtype=float) for v in names])
        gains = _resampled_means(diffs, rng, (n_boot, n_seeds))  # [B, S, V]
        per_slot.append(gains[np.arange(n_boot), :, chosen])  # [B, S]
    return _ci(mean, _over_drawn_seeds(per_slot, rng))


def seed_t_interval(per_seed: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-seed values (gains) with Student's t interval over seeds: ``mean ± t · sd/√n``,
    ``n - 1`` degrees of freedom. Treats each seed's value as one draw: the question-level noise
    is inside each value's spread, not modelled apart. Needs at least two seeds."""
    from scipy.stats import t

    x = np.asarray(per_seed, dtype=np.float64).reshape(-1)
    if x.size < 2:
        raise ValueError(f"a seed-level interval needs at least 2 seeds, got {x.size}")
    half = float(t.ppf(0.5 + level / 2, x.size - 1)) * x.std(ddof=1) / np.sqrt(x.size)
    mean = float(x.mean())
    return mean, mean - half, mean + half
