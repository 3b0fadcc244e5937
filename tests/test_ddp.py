"""DDP end to end: 2 CPU ranks (gloo) must reproduce the single-process SVDecode run exactly.

One fit epoch with ``SteeringExtraction`` + ``StrengthSolver("choice_nll")`` (which also solves
``exact`` and every token aggregate, so all of them are compared) + steered validation runs
twice on the same synthetic TruthfulQA file, in ``tests/ddp_worker.py``: once with
``Trainer(strategy="ddp", devices=2, accelerator="cpu")`` and once with one process. μ̄, every
solver aggregate, the calibration diagnostics and every validation metric (plain / base / steered)
must agree to 1e-5, and the merged calibration statistics must hold each token exactly once.

Why a subprocess: Lightning's ``ddp`` strategy on CPU launches the other ranks by re-running the
main script, which cannot be pytest; the worker is that main script.

Why ``prompt_tuning`` with ``learning_rate=0``: for equal μ̄ the warm-started weights must be equal
in both runs, but DDP splits each training batch across ranks and averages per-rank mean losses,
which equals the single-process mean loss only when every row has the same number of label tokens.
With lr = 0 the warm start is a no-op in both runs, and prompt tuning's random virtual tokens still
make warm ≠ base (a fresh LoRA is the identity: no usable steering vector, the solve would fail).

Odd sizes on purpose: 5 calibration questions in 3 batches of 2 (the ranks get 2 and 1 batches)
and 7 test questions, which ``DistributedSampler`` pads to 8 by repeating one -- the metrics must
drop that duplicate, and the calibration pass (a loader the callback builds itself, into which
Lightning injects no sampler) must shard its batches instead of running all of them on every rank.

The same on N GPUs, with any config::

    svd-lightning fit --config configs/tiny.yaml \\
        --trainer.strategy=ddp --trainer.devices=N --trainer.accelerator=gpu

(the CLI is then the main script each rank re-runs; on CPU use ``--trainer.accelerator=cpu``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import run_worker, write_truthfulqa

TOL = 1e-5

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def _run(tmp_path: Path, data: Path, devices: int) -> dict:
    return run_worker(tmp_path, data, f"devices{devices}", "--devices", str(devices))


@pytest.mark.slow
def test_ddp_two_ranks_match_single_process(tmp_path):
    data = write_truthfulqa(tmp_path / "mc.json", n=35)  # seeded split 14/7/7/7 -> limits 4/5/7/7
    one = _run(tmp_path, data, devices=1)
    ddp = _run(tmp_path, data, devices=2)
    assert (one["world_size"], ddp["world_size"]) == (1, 2)
    assert one["calib_questions"] == ddp["calib_questions"] == 5
    assert one["test_questions"] == ddp["test_questions"] == 7

    # Calibration: each token exactly once across ranks (no rank may run every batch).
    n_tokens = one["stats_count"]
    assert n_tokens > 0
    assert ddp["stats_count"] == n_tokens, "merged StrengthStats hold a different number of tokens"
    assert sum(ddp["cache_count_per_rank"]) == n_tokens, ddp["cache_count_per_rank"]
    assert all(c > 0 for c in ddp["cache_count_per_rank"]), "one rank did all the calibration work"
    assert ddp["diagnostics"]["tokens"] == one["diagnostics"]["tokens"]
    assert ddp["diagnostics"]["usable_tokens"] == one["diagnostics"]["usable_tokens"]
    for key, value in one["diagnostics"].items():
        assert ddp["diagnostics"][key] == pytest.approx(value, abs=TOL), key

    # One pass per rank served μ̄'s tokens (reference rows), the choice_nll cache and the γ grid.
    assert one["calibration_passes"] == ddp["calibration_passes"] == 1
    assert ddp["diagnostics"]["calibration_passes"] == 1
    assert ddp["gamma"] == one["gamma"]
    for g, loss in one["contrastive_losses"].items():
        assert ddp["contrastive_losses"][g] == pytest.approx(loss, abs=TOL), g

    # The strength and every aggregate the solver reports.
    assert ddp["mu"] == pytest.approx(one["mu"], abs=TOL)
    assert ddp["module_mu"] == pytest.approx(ddp["mu"], abs=1e-12)
    assert ddp["mu"] == ddp["aggregates"]["choice_nll"] and "exact" in ddp["aggregates"]
    assert ddp["diagnostics"]["usable_choice_sets"] == one["diagnostics"]["usable_choice_sets"] == 10  # mc1 + mc2
    assert set(ddp["aggregates"]) == set(one["aggregates"])
    for key, value in one["aggregates"].items():
        assert ddp["aggregates"][key] == pytest.approx(value, abs=TOL), key

    # Validation (the val split): DistributedSampler padded 7 questions to 8 (one duplicated), dedup restores 7.
    # Every epoch-level metric holds for all ranks (logged with sync_dist): no "use sync_dist=True" flood.
    assert "sync_dist=True" not in ddp["stderr"]
    assert sum(ddp["val_rows_per_rank"]) > one["val_rows_per_rank"][0], "expected sampler padding"
    assert set(ddp["metrics"]) == set(one["metrics"])
    assert {k.rsplit("_", 1)[-1] for k in one["metrics"] if k not in ("val/mu", "val/gamma")} == {
        "plain", "base", "steered", "contrastive"}
    for key, value in one["metrics"].items():
        assert ddp["metrics"][key] == pytest.approx(value, abs=TOL), key
    for variant, table in one["score_tables"].items():
        got = ddp["score_tables"][variant]
        for col in ("question_index", "choice_set", "choice_index"):
            assert got[col] == table[col], (variant, col)
        assert got["score"] == pytest.approx(table["score"], abs=1e-4), variant
    # global_step differs by design: 4 training questions are 2 steps alone, 1 step per rank in DDP.
    drop_step = lambda h: {k: v for k, v in h.items() if k not in ("step", "paired_bootstrap")}  # noqa: E731
    assert drop_step(ddp["history"][-1]) == pytest.approx(drop_step(one["history"][-1]), abs=TOL)
    # the paired CIs come from the per-question values gathered over ranks (padding deduplicated)
    for key, gain in one["history"][-1]["paired_bootstrap"].items():
        assert ddp["history"][-1]["paired_bootstrap"][key] == pytest.approx(gain, abs=TOL), key


@pytest.mark.slow
def test_ddp_takes_the_best_checkpoints_weights_as_one_process_does(tmp_path):
    """Two epochs; a ModelCheckpoint ranks the first best: CheckpointWeights loads it on every rank and solves
    μ̄ and γ again (its collectives on both ranks), to the single process's values."""
    data = write_truthfulqa(tmp_path / "mc.json", n=35)
    one = run_worker(tmp_path, data, "best1", "--devices", "1", "--best-of-epochs", "2")
    ddp = run_worker(tmp_path, data, "best2", "--devices", "2", "--best-of-epochs", "2")
    for run in (one, ddp):
        assert run["weights"]["from"] == "best" and run["weights"]["global_step"] == run["global_step"] // 2
        assert run["calibration_passes"] == 3  # each epoch's validation, and the best weights' own
    assert ddp["mu"] == pytest.approx(one["mu"], abs=TOL) and ddp["gamma"] == one["gamma"]
    assert "sync_dist=True" not in ddp["stderr"]
