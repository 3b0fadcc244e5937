"""svd_lightning.statistics: the bootstraps behind every interval that fit, the report and the benchmarks print."""

import numpy as np
import pytest
import torch

from svd_lightning import statistics

from conftest import selection_table


def test_paired_bootstrap():
    assert statistics.paired_bootstrap(torch.full((30,), 0.25)) == (0.25, 0.25, 0.25)
    diff = torch.tensor([1.0, 0.0] * 50)  # 100 questions, mean 0.5, sd 0.5: 95% half-width ≈ 1.96·0.05
    mean, lo, hi = statistics.paired_bootstrap(diff)
    assert mean == 0.5 and 0.39 < lo < 0.42 and 0.58 < hi < 0.61
    assert statistics.paired_bootstrap(diff) == (mean, lo, hi)  # seeded: the same interval every time
    rng = np.random.default_rng(0)
    noisy = rng.normal(0.02, 0.1, 600)  # 600 paired differences with mean 0.02, sd 0.1
    mean, lo, hi = statistics.paired_bootstrap(noisy)
    assert lo < mean < hi and lo > 0


def test_hierarchical_ci_resamples_seeds_then_questions():
    rng = np.random.default_rng(0)
    # No spread within a seed, seeds at 0, 0.1, 0.2: only the seed level varies. All three draws of seed
    # 0 (probability 1/27 > 2.5%) give 0, so the interval reaches the extreme seeds.
    diffs = [np.full(50, 0.0), np.full(80, 0.1), np.full(20, 0.2)]  # seeds may differ in size
    mean, lo, hi = statistics.hierarchical_ci(diffs, rng)
    assert mean == pytest.approx(0.1) and lo == pytest.approx(0.0) and hi == pytest.approx(0.2)
    # one seed: the question bootstrap
    x = np.r_[np.zeros(50), np.ones(50)]
    mean, lo, hi = statistics.hierarchical_ci([x], rng)
    assert mean == 0.5 and 0.38 < lo < 0.42 and 0.58 < hi < 0.62  # ±1.96·0.05
    # ... which is fit's one-run interval, the same numbers for the same stream
    assert statistics.paired_bootstrap(x, n_boot=2000, seed=3) == statistics.hierarchical_ci([x], np.random.default_rng(3), 2000)


def test_leave_one_seed_out_selection_on_a_hand_built_table():
    calib, test, warm = selection_table()
    assert statistics.in_sample_picks(calib) == ["a", "b", "b"]
    assert statistics.loso_picks(calib) == ["b", "a", "a"]
    assert statistics.picked_gains(["a", "b", "b"], test, warm) == [0.5, 1.0, 0.5]  # in-sample: mean 2/3
    assert statistics.picked_gains(["b", "a", "a"], test, warm) == [0.0, 0.0, 1.0]  # LOSO: mean 1/3
    mean, lo, hi = statistics.selection_ci(calib, test, warm, np.random.default_rng(0), loso=True)
    assert mean == pytest.approx(1 / 3) and lo <= mean <= hi
    assert statistics.selection_ci(calib, test, warm, np.random.default_rng(0), loso=False)[0] == pytest.approx(2 / 3)
    assert statistics.loso_picks({v: x[:1] for v, x in calib.items()}) is None  # one seed: nothing to leave out
    assert statistics.pick({"b": [np.ones(1)], "a": [np.ones(1)]}, [0]) == "a"  # ties: first by name


def test_seed_t_interval_on_a_hand_built_table():
    """Five seeds' gains 1..5: mean 3, sd √2.5, t(0.975, 4 df) = 2.776445 (printed t tables)."""
    from svd_lightning.statistics import seed_t_interval

    mean, lo, hi = seed_t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776445105 * np.sqrt(2.5) / np.sqrt(5)
    assert mean == 3.0
    assert (lo, hi) == pytest.approx((3.0 - half, 3.0 + half), abs=1e-8)
    # two seeds: 12.706 (1 df) times sd/√2 = |a - b|/2
    _, lo2, hi2 = seed_t_interval([0.0, 2.0])
    assert (lo2, hi2) == pytest.approx((1.0 - 12.7062047, 1.0 + 12.7062047), abs=1e-6)
    _, lo90, hi90 = seed_t_interval([1.0, 2.0, 3.0, 4.0, 5.0], level=0.9)
    assert lo < lo90 < hi90 < hi
    with pytest.raises(ValueError, match="at least 2 seeds"):
        seed_t_interval([1.0])


def test_crossed_bootstrap_shares_questions_between_seeds():
    """Seeds that share their test questions are not independent in them: given the ids, the bootstrap
    draws the questions once per replicate for every seed (crossed), where nesting redraws them per seed
    and so shrinks the question level by about √(seeds)."""
    rng = np.random.default_rng(1)
    question_effect = rng.normal(0.0, 1.0, 100)
    diffs = [question_effect + rng.normal(0.0, 0.05, 100) for _ in range(4)]  # 4 seeds, the same 100 questions
    ids = [list(range(100))] * 4
    mean, lo, hi = statistics.hierarchical_ci(diffs, np.random.default_rng(0), 4000, questions=ids)
    _, nlo, nhi = statistics.hierarchical_ci(diffs, np.random.default_rng(0), 4000)
    alone = statistics.hierarchical_ci([np.mean(diffs, axis=0)], np.random.default_rng(0), 4000)  # one seed, the mean
    assert mean == pytest.approx(np.mean(diffs))
    assert hi - lo == pytest.approx(alone[2] - alone[1], rel=0.1)  # the question level of one seed, not of four
    assert hi - lo > 1.6 * (nhi - nlo)  # nesting: about half as wide
    # disjoint questions: crossed and nested agree (to Monte-Carlo error)
    disjoint = [list(range(100 * k, 100 * k + 100)) for k in range(4)]
    fresh = [rng.normal(0.1 * k, 1.0, 100) for k in range(4)]
    c = statistics.hierarchical_ci(fresh, np.random.default_rng(0), 4000, questions=disjoint)
    n = statistics.hierarchical_ci(fresh, np.random.default_rng(0), 4000)
    assert c[2] - c[1] == pytest.approx(n[2] - n[1], rel=0.15)
    # one seed: the question bootstrap
    x = np.r_[np.zeros(50), np.ones(50)]
    _, lo1, hi1 = statistics.hierarchical_ci([x], np.random.default_rng(0), questions=[[("f", i) for i in range(100)]])
    assert 0.38 < lo1 < 0.42 and 0.58 < hi1 < 0.62
    with pytest.raises(ValueError, match="seed 1 has 100 values but 99 question ids"):
        statistics.hierarchical_ci(diffs[:2], np.random.default_rng(0), questions=[ids[0], ids[0][:99]])


def test_crossed_selection_ci_redoes_the_pick_on_shared_draws():
    calib, test, warm = selection_table()
    n_calib, n_test = len(calib["a"][0]), len(warm[0])
    calib_ids = [[("calib", i) for i in range(n_calib)]] * 3  # every seed: the same questions
    test_ids = [[("test", i) for i in range(n_test)]] * 3
    for loso in (False, True):
        nested = statistics.selection_ci(calib, test, warm, np.random.default_rng(0), loso=loso)
        crossed = statistics.selection_ci(calib, test, warm, np.random.default_rng(0), loso=loso,
                                          questions=test_ids, calib_questions=calib_ids)
        assert crossed[0] == nested[0]  # the point estimate is the picks' mean gain either way
        assert crossed[1] <= crossed[0] <= crossed[2]
    with pytest.raises(ValueError, match="or neither"):
        statistics.selection_ci(calib, test, warm, np.random.default_rng(0), loso=False, questions=test_ids)
