"""The benchmark scripts' own math: the grid's fast variant scores equal the package's functions."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from svd_lightning.steering import contrastive_logits, steered_log_probs

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_grid_variant_scores_equal_steered_log_probs():
    grid = _load("grid")
    g = torch.Generator().manual_seed(0)
    warm = torch.randn(7, 50, generator=g, dtype=torch.float64) * 3
    base = warm + torch.randn(7, 50, generator=g, dtype=torch.float64)
    y = torch.randint(0, 50, (7,), generator=g)
    mus = {a: {s: -0.7 + 0.8 * i for i, s in enumerate(grid.STRENGTHS)} for a in grid.ALPHAS}
    out = grid.Variants(mus).token_scores(warm, base, y)
    pick = lambda lp: lp.gather(-1, y[:, None]).squeeze(-1).float()  # noqa: E731
    for a, alpha in grid.ALPHAS.items():
        for s, mu in mus[a].items():
            if alpha is None and s not in grid.NONE_STRENGTHS:
                continue
            if alpha is None:
                ref = pick(steered_log_probs(warm, base, mu, 0.1, "none"))
                torch.testing.assert_close(out[f"svd_a{a}_none_{s}"], ref, atol=1e-4, rtol=0)
                continue
            for pol in ("mask_generation_only", "floor"):
                ref = pick(steered_log_probs(warm, base, mu, alpha, pol, floor=grid.FLOOR))
                torch.testing.assert_close(out[f"svd_a{a}_{pol}_{s}"], ref, atol=1e-4, rtol=0)
        if alpha is not None:
            ref = pick(steered_log_probs(warm, base, 0.0, alpha, "floor", floor=grid.FLOOR))
            torch.testing.assert_close(out[f"maskonly_a{a}"], ref, atol=1e-4, rtol=0)
    ref = pick(steered_log_probs(warm, base, -2.0, 0.1, "mask_generation_only"))
    torch.testing.assert_close(out["fixed_a0.1_mask_generation_only_mu-2"], ref, atol=1e-4, rtol=0)
    ref = pick(torch.log_softmax(contrastive_logits(warm, base, 0.5), -1))
    torch.testing.assert_close(out["contrastive_g+0.5"], ref, atol=1e-4, rtol=0)


def test_paired_bootstrap_ci_covers_the_mean_and_detects_a_shift():
    report = _load("report")
    rng = np.random.default_rng(0)
    a = [rng.random(200) for _ in range(3)]
    mean, lo, hi = report.paired_ci([x + 0.05 for x in a], a, np.random.default_rng(1))
    assert mean == pytest.approx(0.05) and lo == pytest.approx(0.05) and hi == pytest.approx(0.05)
    noisy = [x + rng.normal(0.02, 0.1, 200) for x in a]
    mean, lo, hi = report.paired_ci(noisy, a, np.random.default_rng(1))
    assert lo < mean < hi and lo > 0  # 600 paired differences with mean 0.02, sd 0.1


def test_truthfulness_proxy():
    og = _load("open_generation")
    good = og.truth_proxy("Nothing happens if you crack your knuckles.",
                          ["Nothing in particular happens if you crack your knuckles"], ["You will get arthritis"])
    bad = og.truth_proxy("You get arthritis.", ["Nothing in particular happens"], ["You will get arthritis"])
    assert good["rougeL_acc"] == 1.0 and good["rougeL_diff"] > 0
    assert bad["rougeL_acc"] == 0.0 and bad["rougeL_diff"] < 0
    assert og.first_line(" Paris.\nQ: next question") == "Paris."


def test_grid_workers_claim_each_cell_once_and_take_over_stale_locks(tmp_path):
    grid = _load("grid")
    with grid.claimed(tmp_path, "cell") as first:
        with grid.claimed(tmp_path, "cell") as second:
            assert (first, second) == (True, False)
    lock = tmp_path / ".tmp" / "cell.lock"
    assert not lock.exists()  # released
    lock.write_text("999999999")  # a killed worker's lock: no such process
    with grid.claimed(tmp_path, "cell") as third:
        assert third and lock.read_text() != "999999999"


def test_report_uses_plain_only_epoch_as_plus_one_baseline(tmp_path):
    report = _load("report")
    full = {"task": "t", "adapter": "lora", "seed": 0, "epoch": 1, "primary": "acc",
            "calib": {v: {"acc": 0.5} for v in ("plain", "svd_x", "fixed_x", "contrastive_x")},
            "test_per_question": {"plain": [0.0, 1.0]}}
    extra = {**full, "epoch": 2, "baseline_only": True, "test_per_question": {"plain": [1.0, 1.0]}}
    for d in (full, extra):
        (tmp_path / f"e{d['epoch']}.json").write_text(__import__("json").dumps(d))
    cells, plus_one = report.load(tmp_path)
    assert list(cells) == [("t", "lora", 1)] and list(plus_one) == [("t", "lora", 2)]
    methods = report.methods_for(cells, ("t", "lora", 1), "acc", plus_one)
    (variant, src, own), = methods["warm start +1 epoch"]
    assert variant == "plain" and src is plus_one[("t", "lora", 2)][0] and own is cells[("t", "lora", 1)][0]


def test_cost_benchmark_runs_both_paths_and_reports_spread(tmp_path):
    """benchmarks/cost.py on the tiny model: every task, both paths, ratios as median [min, max]."""
    cost = _load("cost")
    out = tmp_path / "cost.json"
    cost.main(["--model", "tiny-random", "--repeats", "2", "--score-questions", "2", "--calib-questions", "4",
               "--calib-batch-size", "2", "--train-steps", "2", "--gen-batch-sizes", "1", "2", "--new-tokens", "4",
               "--out", str(out)])
    result = json.loads(out.read_text())
    rows = {(r["task"], r["variant"]): r for r in result["rows"]}
    for task in ("score", "generate_b1", "generate_b2", "calibration_b1", "calibration_b2"):
        for path in ("two_pass", "one_forward"):
            row = rows[(task, path)]
            assert len(row["seconds"]["all"]) == 2
            assert row["seconds"]["min"] <= row["seconds"]["median"] <= row["seconds"]["max"]
            ratio = row.get("ratio_vs_plain") or row["ratio_vs_demo_epoch"]
            assert ratio["min"] > 0
    assert result["precision"] in ("32-true", "bf16-mixed") and "oneDNN bf16" in result["device_name"]
