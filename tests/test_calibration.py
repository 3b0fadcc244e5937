"""svd_lightning.calibration: one pass over the calibration questions for every solver, against the
single-purpose passes and the scores steered scoring gives (float64 references)."""

import pytest
import torch

from svd_lightning.batch import Tokenized, collate_lm
from svd_lightning.calibration import (
    CalibrationNeeds,
    calibrate,
    calibrate_choice_grid,
    calibrate_choices,
    calibrate_pass,
)
from svd_lightning.calibration.passes import reference_rows
from svd_lightning.callbacks import ContrastiveBaseline, StrengthSolver
from svd_lightning.config import NO_MASK_ALPHA, SteeringConfig
from svd_lightning.module import SteeringLM
from svd_lightning.run import SteeringRun
from svd_lightning.steering import GAMMA_GRID

from conftest import (CHOICE_EXAMPLES, choice_batches, scored_choice_loss, tiny_datamodule, tiny_trainer,
                      write_truthfulqa)


class Counted:
    """Batches that count how often they are iterated: a pass is one iteration."""

    def __init__(self, batches):
        self.batches, self.iterations = batches, 0

    def __iter__(self):
        self.iterations += 1
        return iter(self.batches)


@pytest.mark.parametrize("direction", ["kl_gradient", "logit_difference"])
def test_one_pass_over_the_choices_serves_every_solver_with_the_numbers_of_separate_passes(tokenizer, model64, direction):
    config, two_pass = SteeringConfig(alpha=0.1, direction=direction), {"forward_mode": "two_pass"}
    choices = Counted(choice_batches(tokenizer))
    needs = CalibrationNeeds(tokens=True, choice_cache=True, grids={"contrastive": GAMMA_GRID})
    one = calibrate_pass(model64, choices, config, needs, progress=False, **two_pass)
    assert choices.iterations == 1 and one.passes == 1 and one.batches == 2 and one.missing_references == 0
    assert one.diagnostics == {"calibration_passes": 1, "calibration_batches": 2, "choice_sets": 6.0, "choice_rows": 14.0}
    # μ̄'s token statistics from the reference rows equal a teacher-forced pass over prompt + answer; float64,
    # other batch shapes: equal to rounding of sums over a few hundred terms (1e-9 leaves orders of margin).
    lm = [collate_lm(CHOICE_EXAMPLES[i : i + 2], Tokenized(tokenizer, 64)) for i in (0, 2)]
    alone = calibrate(model64, lm, config, progress=False, **two_pass)
    tokens = one.tokens["alpha"]
    assert tokens.diagnostics["tokens"] == alone.diagnostics["tokens"] == sum(int((b["labels"] != -100).sum()) for b in lm)
    for k, v in alone.stats.summary(0.1).items():
        assert tokens.stats.summary(0.1)[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    for k, v in alone.diagnostics.items():
        assert tokens.diagnostics[k] == pytest.approx(v, rel=1e-9), k
    assert tokens.cache.solve() == pytest.approx(alone.cache.solve(), rel=1e-8)  # the solver's own tolerance: 1e-10
    # The choice_nll cache and the γ grid, each as its own pass would give them.
    mus = [-3.0, 0.0, 0.7, 4.0]
    batches = choice_batches(tokenizer)
    torch.testing.assert_close(one.choices.cache.losses(mus),
                               calibrate_choices(model64, batches, config, progress=False, **two_pass).cache.losses(mus))
    grid = calibrate_choice_grid(model64, batches, GAMMA_GRID, config.contrastive(gamma=0.0), progress=False, **two_pass)
    torch.testing.assert_close(one.grids["contrastive"].losses, grid.losses)
    assert one.grids["contrastive"].best() == grid.best()


def test_reference_rows_are_marked_once_per_question_and_checked(tokenizer):
    batch = choice_batches(tokenizer, size=4)[0]
    rows, missing = reference_rows(batch)
    assert missing == 0 and rows.tolist() == [r == 0 or r in (3, 7, 11) for r in range(14)]  # each first true choice
    unmarked = {k: v for k, v in batch.items() if k != "is_reference"}
    assert reference_rows(unmarked)[1] == 4  # a user's batch without the key: no question has one
    twice = {**batch, "is_reference": batch["is_reference"] | (torch.arange(14) == 1)}
    with pytest.raises(ValueError, match="question 0 has 2 reference rows"):
        reference_rows(twice)


def test_solvers_that_ask_for_different_batches_or_a_choice_pass_over_answers_are_told_why(tokenizer, model64):
    needs = CalibrationNeeds(tokens=True, limit_batches=4)
    with pytest.raises(ValueError, match="ContrastiveBaseline asks for limit_batches=2, another solver for 4"):
        needs.add(CalibrationNeeds(grids={"contrastive": (0.0, 1.0)}, limit_batches=2), "ContrastiveBaseline")
    lm = [collate_lm(CHOICE_EXAMPLES[:2], Tokenized(tokenizer, 64))]
    with pytest.raises(ValueError, match="a solver needs choice batches"):
        calibrate_pass(model64, lm, SteeringConfig(), CalibrationNeeds(choice_cache=True), progress=False)


def _fit(tmp_path, dm, **module_options):
    module = SteeringLM("tiny-random", learning_rate=0.05, adapter_options={"r": 4}, **module_options)
    trainer = tiny_trainer(tmp_path, [StrengthSolver("choice_nll"), ContrastiveBaseline()], max_steps=2)
    trainer.fit(module, dm)
    return module, SteeringRun.load(trainer.log_dir)


def test_fit_with_choice_nll_and_the_contrastive_baseline_runs_one_calibration_pass(tmp_path):
    dm = tiny_datamodule(write_truthfulqa(tmp_path / "mc.json"), limit_train=8, limit_calib=6, limit_test=4)
    module, run = _fit(tmp_path, dm)
    assert module.steering_state.calibration_passes == 1 and run.diagnostics["calibration_passes"] == 1
    assert run.diagnostics["calibration_batches"] == len(dm.calib_choice_dataloader())  # calib_batch_size questions each
    # Each solution is what its own pure function gives on the trained weights (fp32, other batch shapes).
    alone = calibrate(module.model, dm.calib_dataloader(), module.steering_config, progress=False)
    assert run.aggregates["exact"] == pytest.approx(alone.cache.solve(), rel=1e-4, abs=1e-6)
    assert run.diagnostics["tokens"] == alone.diagnostics["tokens"]
    grid = calibrate_choice_grid(module.model, dm.calib_choice_dataloader(), GAMMA_GRID,
                                 module.steering_config.contrastive(gamma=0.0), progress=False)
    assert module.gamma == run.contrastive_gamma == grid.best()


class UnmarkedChoices:
    """A user's choice loader that builds its own batches, without ``is_reference``."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return ({k: v for k, v in batch.items() if k != "is_reference"} for batch in self.loader)


def test_choice_batches_without_reference_rows_give_the_token_statistics_a_pass_of_their_own(tmp_path, capsys):
    dm = tiny_datamodule(write_truthfulqa(tmp_path / "mc.json"), limit_train=8, limit_calib=6, limit_test=4)
    calib_choices = dm.calib_choice_dataloader
    dm.calib_choice_dataloader = lambda: UnmarkedChoices(calib_choices())
    module, run = _fit(tmp_path, dm)
    assert run.diagnostics["calibration_passes"] == 2
    err = capsys.readouterr().err
    assert f"{dm.describe()['calib']} calibration question(s) have no reference row among their choices" in err, err
    alone = calibrate(module.model, dm.calib_dataloader(), module.steering_config, progress=False)
    assert run.aggregates["exact"] == pytest.approx(alone.cache.solve(), rel=1e-6, abs=1e-8)  # the same batches


@pytest.mark.parametrize("direction", ["kl_gradient", "logit_difference"])
@pytest.mark.parametrize("policy", ["mask_generation_only", "floor"])
def test_choice_calibration_reproduces_steered_scoring(tokenizer, model64, policy, direction):
    batches = choice_batches(tokenizer)
    settings = dict(alpha=0.1, scoring_policy=policy, floor=-12.0, direction=direction)
    got = calibrate_choices(model64, batches, SteeringConfig(**settings), progress=False)
    assert got.diagnostics == {"choice_sets": 6.0, "usable_choice_sets": 6.0, "choice_rows": 14.0,
                               "choice_tokens": float(sum(int((b["labels"] != -100).sum()) for b in batches))}
    mus = [-8.0, -1.0, 0.0, 0.5, 3.0]
    # score_choices sums fp32 token scores: agreement to fp32 rounding of the sums.
    ref = torch.tensor([scored_choice_loss(model64, batches, m, **settings) for m in mus], dtype=torch.float64)
    torch.testing.assert_close(got.cache.losses(mus), ref, rtol=1e-5, atol=1e-5)
    mu = got.cache.solve()
    grid = torch.linspace(-20, 20, 41).tolist()
    brute = min(scored_choice_loss(model64, batches, m, **settings) for m in grid)
    assert scored_choice_loss(model64, batches, mu, **settings) <= brute + 1e-4
    # Questions split over two "ranks" give the same loss.
    halves = [calibrate_choices(model64, [b], SteeringConfig(**settings), progress=False) for b in batches]
    torch.testing.assert_close(halves[0].cache.losses(mus) + halves[1].cache.losses(mus), got.cache.losses(mus))


@pytest.mark.parametrize("settings", [
    dict(alpha=NO_MASK_ALPHA, scoring_policy="none", direction="logit_difference"),  # the contrastive baseline
    dict(alpha=0.1, scoring_policy="mask_generation_only", direction="kl_gradient"),
    dict(alpha=0.1, scoring_policy="floor", floor=-12.0, direction="logit_difference"),
])
def test_choice_grid_calibration_is_the_scored_choice_loss_at_every_grid_point(tokenizer, model64, settings):
    batches = choice_batches(tokenizer)
    mus = [-3.0, -0.5, 0.0, 0.75, 2.0, 5.0]
    got = calibrate_choice_grid(model64, batches, mus, SteeringConfig(**settings), progress=False)
    ref = torch.tensor([scored_choice_loss(model64, batches, m, **settings) for m in mus], dtype=torch.float64)
    torch.testing.assert_close(got.losses, ref, rtol=1e-5, atol=1e-5)
    assert got.best() == mus[int(ref.argmin())]
    assert got.diagnostics == {"choice_sets": 6.0, "choice_rows": 14.0}
    # Two "ranks", each with its own questions, sum to the same losses.
    parts = [calibrate_choice_grid(model64, [b], mus, SteeringConfig(**settings), progress=False).losses for b in batches]
    torch.testing.assert_close(parts[0] + parts[1], got.losses)




def test_a_pass_over_repeated_rows_gives_the_numbers_of_scoring_each_row(tokenizer, model64, monkeypatch):
    """TruthfulQA's MC1 choices recur in MC2: each distinct row is encoded and scored once, and μ̄'s
    statistics, the choice_nll cache and the γ grid are those of scoring every row (float64)."""
    from svd_lightning.calibration import passes as calibration
    from svd_lightning.batch import ChoiceExample, collate_choices

    repeats = [ChoiceExample(ex.prompt, [*ex.choices, *ex.choices], [*ex.is_true, *ex.is_true], ex.index,
                             choice_sets=[0] * len(ex.choices) + [1] * len(ex.choices), answer=ex.choices[0])
               for ex in CHOICE_EXAMPLES]
    tok = Tokenized(tokenizer, 64)
    batches = [collate_choices(repeats[i : i + 2], tok) for i in (0, 2)]
    assert all(calibration.distinct_rows(b)[0]["input_ids"].shape[0] < b["input_ids"].shape[0] for b in batches)
    config = SteeringConfig(alpha=0.1)
    needs = CalibrationNeeds(tokens=True, choice_cache=True, grids={"contrastive": GAMMA_GRID})
    once = calibrate_pass(model64, batches, config, needs, progress=False)
    monkeypatch.setattr(calibration, "distinct_rows", lambda b: (b, torch.arange(b["input_ids"].shape[0])))
    every = calibrate_pass(model64, batches, config, needs, progress=False)
    assert once.missing_references == every.missing_references == 0
    a, b = once.tokens["alpha"], every.tokens["alpha"]
    for k, v in b.stats.summary(0.1).items():
        assert a.stats.summary(0.1)[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    assert a.diagnostics == pytest.approx(b.diagnostics, rel=1e-12)
    mus = [-3.0, 0.0, 0.7, 4.0]
    assert once.choices.cache.rows == every.choices.cache.rows
    torch.testing.assert_close(once.choices.cache.losses(mus), every.choices.cache.losses(mus), rtol=1e-10, atol=1e-10)
    assert once.choices.cache.usable_groups() == every.choices.cache.usable_groups()
    torch.testing.assert_close(once.grids["contrastive"].losses, every.grids["contrastive"].losses, rtol=1e-10, atol=1e-10)


def test_the_pass_reports_its_own_duration(tokenizer, model64):
    import time

    began = time.perf_counter()
    one = calibrate_pass(model64, choice_batches(tokenizer), SteeringConfig(), progress=False)
    assert 0 < one.seconds <= time.perf_counter() - began
    assert 0 < one.tokens["alpha"].seconds <= one.seconds
