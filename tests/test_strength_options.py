"""Strength fit to the multiple-choice loss (choice_nll) and the logit-difference direction, on the tiny model."""

import json
from pathlib import Path

import pytest
import torch

from svd_lightning import SteeredModel
from svd_lightning.batch import ChoiceExample, Tokenized, collate_choices
from svd_lightning.calibration import calibrate_choice_grid, calibrate_choices
from svd_lightning.callbacks import ContrastiveBaseline, SteeredValidation, StrengthSolver
from svd_lightning.config import NO_MASK_ALPHA, SteeringConfig
from svd_lightning.decoding import score_choices, steered_generate
from svd_lightning.module import SteeringLM
from svd_lightning.run import SteeringRun
from svd_lightning.steering import GAMMA_GRID, contrastive_logits, steer, steering_direction

from conftest import (ROOT, as_older_format, left_padded, perturbed_lora, save_tiny_run, tiny_datamodule, tiny_trainer,
                      write_truthfulqa)

EXAMPLES = [
    ChoiceExample("Q: What is the capital of France?\nA:", [" Paris", " Lyon is the capital", " Nice"], [True, False, False], 0),
    ChoiceExample("Q: Is the sky blue?\nA:", [" Yes", " No, it is green", " Yes it is", " No"], [True, False, True, False], 1,
                  choice_sets=[0, 0, 1, 1]),
    ChoiceExample("Q: What happens if you eat a pomegranate?\nA:", [" Nothing in particular happens.", " You will die.",
                  " Nothing happens.", " You die."], [True, False, True, False], 2, choice_sets=[0, 0, 1, 1]),
    ChoiceExample("Q: Who outnumbers whom?\nA:", [" The dead outnumber the living.", " The living outnumber the dead.",
                  " I have no comment."], [True, False, True], 3, choice_sets=[1, 1, 1]),
]


@pytest.fixture(scope="module")
def model64():
    torch.manual_seed(0)  # LoRA A's init: a fixed model, so a failure reproduces
    return perturbed_lora(dtype=torch.float64)


def _batches(tokenizer, size=2):
    tok = Tokenized(tokenizer, 64)
    return [collate_choices(EXAMPLES[i : i + size], tok) for i in range(0, len(EXAMPLES), size)]


def _scored_loss(model, batches, mu, **settings):
    """The choice loss from score_choices itself: Σ over (question, choice set) of −log Σ_true softmax(S)."""
    total = 0.0
    for batch in batches:
        s = score_choices(model, batch, SteeringConfig(mu=mu, forward_mode="two_pass", **settings))["steered"].double()
        for q, cset in {(int(a), int(b)) for a, b in zip(batch["question_index"], batch["choice_set"])}:
            sel = (batch["question_index"] == q) & (batch["choice_set"] == cset)
            t = batch["is_true"][sel].bool()
            total += float(torch.logsumexp(s[sel], 0) - torch.logsumexp(s[sel][t], 0))
    return total


@pytest.mark.parametrize("direction", ["kl_gradient", "logit_difference"])
@pytest.mark.parametrize("policy", ["mask_generation_only", "floor"])
def test_choice_calibration_reproduces_steered_scoring(tokenizer, model64, policy, direction):
    batches = _batches(tokenizer)
    settings = dict(alpha=0.1, scoring_policy=policy, floor=-12.0, direction=direction)
    got = calibrate_choices(model64, batches, SteeringConfig(**settings), progress=False)
    assert got.diagnostics == {"choice_sets": 6.0, "usable_choice_sets": 6.0, "choice_rows": 14.0,
                               "choice_tokens": float(sum(int((b["labels"] != -100).sum()) for b in batches))}
    mus = [-8.0, -1.0, 0.0, 0.5, 3.0]
    # score_choices sums fp32 token scores: agreement to fp32 rounding of the sums.
    ref = torch.tensor([_scored_loss(model64, batches, m, **settings) for m in mus], dtype=torch.float64)
    torch.testing.assert_close(got.cache.losses(mus), ref, rtol=1e-5, atol=1e-5)
    mu = got.cache.solve()
    grid = torch.linspace(-20, 20, 41).tolist()
    brute = min(_scored_loss(model64, batches, m, **settings) for m in grid)
    assert _scored_loss(model64, batches, mu, **settings) <= brute + 1e-4
    # Questions split over two "ranks" give the same loss.
    halves = [calibrate_choices(model64, [b], SteeringConfig(**settings), progress=False) for b in batches]
    torch.testing.assert_close(halves[0].cache.losses(mus) + halves[1].cache.losses(mus), got.cache.losses(mus))


def test_unknown_strength_or_curvature_fails_when_the_solver_is_built():
    with pytest.raises(ValueError, match="strength must be one of .*choice_nll"):
        StrengthSolver("choice-nll")
    with pytest.raises(ValueError, match="curvature must be one of"):
        StrengthSolver("mean", "hessian")


def test_unknown_direction_is_refused_everywhere(model64, tokenizer):
    with pytest.raises(ValueError, match="direction must be one of"):
        SteeringLM("tiny-random", direction="contrastive")
    with pytest.raises(ValueError, match="direction must be one of"):
        SteeringConfig(mu=1.0, direction="contrastive")
    with pytest.raises(ValueError, match="direction must be one of"):
        steering_direction(torch.zeros(1, 3), torch.zeros(1, 3), "contrastive")


def test_run_format_round_trips_direction_and_old_runs_load_as_kl_gradient(tmp_path):
    model = perturbed_lora()
    save_tiny_run(model, tmp_path / "new", mu=0.5, direction="logit_difference")
    assert SteeringRun.load(tmp_path / "new").steering.direction == "logit_difference"
    save_tiny_run(model, tmp_path / "old")
    as_older_format(tmp_path / "old", 1, drop=["direction"])  # written before the setting existed
    assert SteeringRun.load(tmp_path / "old").steering.direction == "kl_gradient"
    sm = SteeredModel.from_run_dir(tmp_path / "new")
    assert sm.config.direction == "logit_difference"


@torch.no_grad()
def test_logit_difference_generation_matches_a_slow_reference(tokenizer, model64):
    ids, mask = left_padded(tokenizer, ["Q: What is the capital of France? A:", "Yes"])
    pos = lambda m: (m.cumsum(-1) - 1).clamp_min(0)  # noqa: E731
    slow, smask = ids, mask
    for _ in range(6):  # recompute both full forwards every step; greedy on the masked steered logits
        warm = model64(input_ids=slow, attention_mask=smask, position_ids=pos(smask)).logits[:, -1]
        with model64.disable_adapter():
            base = model64(input_ids=slow, attention_mask=smask, position_ids=pos(smask)).logits[:, -1]
        nxt = steer(warm, base, 0.8, 0.1, direction="logit_difference").argmax(-1)
        slow, smask = torch.cat([slow, nxt[:, None]], 1), torch.cat([smask, torch.ones_like(smask[:, :1])], 1)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    for mode in ("one_forward", "two_pass"):
        config = SteeringConfig(mu=0.8, alpha=0.1, forward_mode=mode, direction="logit_difference")
        fast = steered_generate(model64, ids, mask, config, **kw)
        assert torch.equal(fast, slow), mode
    kl = steered_generate(model64, ids, mask, SteeringConfig(mu=0.8, alpha=0.1), **kw)
    assert not torch.equal(kl, slow), "the two directions should steer differently on this model"


def test_fit_with_choice_nll_and_logit_difference_writes_both_into_the_run(tmp_path):
    dm = tiny_datamodule(write_truthfulqa(tmp_path / "mc.json"), limit_train=8, limit_calib=6, limit_test=4)
    module = SteeringLM("tiny-random", learning_rate=0.05, adapter_options={"r": 4}, direction="logit_difference")
    solver = StrengthSolver("choice_nll")
    trainer = tiny_trainer(tmp_path, [solver], max_steps=2)
    trainer.fit(module, dm)
    run = SteeringRun.load(trainer.log_dir)
    assert run.steering.direction == "logit_difference" and run.steering.strength == "choice_nll"
    assert run.steering.mu == solver.solution["steering"]["mu"] == run.aggregates["choice_nll"] == module.mu
    assert {"exact", "mean_identity", "choice_nll"} <= set(run.aggregates)
    assert run.diagnostics["usable_choice_sets"] == 2 * dm.describe()["calib"]  # mc1 + mc2 of every question
    # The same μ from the pure functions on the trained model.
    direct = calibrate_choices(module.model, dm.calib_choice_dataloader(), module.steering_config, progress=False)
    assert direct.cache.solve() == pytest.approx(run.steering.mu, rel=1e-6, abs=1e-8)
    assert SteeringLM(run_dir=trainer.log_dir).hparams.direction == "logit_difference"


def test_cli_accepts_choice_nll_and_direction(tmp_path, capsys):
    from svd_lightning.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text((ROOT / "configs/tiny.yaml").read_text().replace("strength: exact", "strength: choice_nll"))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--model.direction", "logit_difference", "--print_config"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "strength: choice_nll" in printed and "direction: logit_difference" in printed


@pytest.mark.parametrize("settings", [
    dict(alpha=NO_MASK_ALPHA, scoring_policy="none", direction="logit_difference"),  # the contrastive baseline
    dict(alpha=0.1, scoring_policy="mask_generation_only", direction="kl_gradient"),
    dict(alpha=0.1, scoring_policy="floor", floor=-12.0, direction="logit_difference"),
])
def test_choice_grid_calibration_is_the_scored_choice_loss_at_every_grid_point(tokenizer, model64, settings):
    batches = _batches(tokenizer)
    mus = [-3.0, -0.5, 0.0, 0.75, 2.0, 5.0]
    got = calibrate_choice_grid(model64, batches, mus, SteeringConfig(**settings), progress=False)
    ref = torch.tensor([_scored_loss(model64, batches, m, **settings) for m in mus], dtype=torch.float64)
    torch.testing.assert_close(got.losses, ref, rtol=1e-5, atol=1e-5)
    assert got.best() == mus[int(ref.argmin())]
    assert got.diagnostics == {"choice_sets": 6.0, "choice_rows": 14.0}
    # Two "ranks", each with its own questions, sum to the same losses.
    parts = [calibrate_choice_grid(model64, [b], mus, SteeringConfig(**settings), progress=False).losses for b in batches]
    torch.testing.assert_close(parts[0] + parts[1], got.losses)


def test_contrastive_scores_are_the_contrastive_logits_in_float64(tokenizer, model64):
    batch = _batches(tokenizer, size=4)[0]
    gamma = 1.5
    out = score_choices(model64, batch, SteeringConfig(forward_mode="two_pass", gamma=gamma))
    assert "steered" not in out
    with torch.no_grad():
        warm = model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        with model64.disable_adapter():
            base = model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    lp = torch.log_softmax(contrastive_logits(warm, base, gamma), -1)[:, :-1]
    labels = batch["labels"][:, 1:]
    tok = lp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1).masked_fill(labels == -100, 0.0)
    torch.testing.assert_close(out["contrastive"].double(), tok.sum(-1), rtol=0, atol=1e-4)
    plain = score_choices(model64, batch, SteeringConfig(forward_mode="two_pass", gamma=0.0))
    torch.testing.assert_close(plain["contrastive"], plain["plain"])  # γ = 0: the warm start


def test_fit_scores_the_contrastive_baseline_next_to_svdecode(tmp_path, capsys):
    dm = tiny_datamodule(write_truthfulqa(tmp_path / "mc.json"), limit_train=8, limit_calib=6, limit_test=4)
    module = SteeringLM("tiny-random", learning_rate=0.05, adapter_options={"r": 4})
    baseline = ContrastiveBaseline()
    trainer = tiny_trainer(tmp_path, [StrengthSolver("exact"), baseline, SteeredValidation()], max_steps=2)
    trainer.fit(module, dm)
    trainer.test(module, dm, verbose=False)
    # γ is the grid point with the smallest calib choice loss, from the pure function on the trained model.
    direct = calibrate_choice_grid(module.model, dm.calib_choice_dataloader(), GAMMA_GRID,
                                   SteeringConfig().contrastive(gamma=0.0), progress=False)
    assert module.gamma == baseline.solution["gamma"] == direct.best()
    assert baseline.solution["global_step"] == 2
    got = module.steering_state.metrics
    assert got["test/gamma"] == module.gamma and 0.0 <= got["test/mc2_contrastive"] <= 1.0
    printed = capsys.readouterr().out
    assert "+contrastive" in printed and f"contrastive γ = {module.gamma:+g}" in printed
    assert "+contrastive − warm start" in printed
    history = json.loads((Path(trainer.log_dir) / "metrics.json").read_text())["history"]
    paired = history[-1]["paired_bootstrap"]["mc2_contrastive_minus_plain"]
    assert paired["method"] == "contrastive" and paired["questions"] == dm.describe()["test"]
    per_q = json.loads((Path(trainer.log_dir) / "test_per_question.json").read_text())
    assert set(per_q) == {"plain", "base", "steered", "contrastive"}
    assert len(per_q["contrastive"]["mc2"]) == dm.describe()["test"]


def test_contrastive_baseline_refuses_a_grid_it_cannot_choose_on():
    with pytest.raises(ValueError, match="gammas needs at least 2 finite values"):
        ContrastiveBaseline(gammas=[1.0])
    with pytest.raises(ValueError, match="gammas needs at least 2 finite values"):
        ContrastiveBaseline(gammas=[0.0, float("nan")])


def test_a_checkpoint_from_before_the_contrastive_baseline_still_loads():
    old = {"state_dict": {k: v for k, v in SteeringLM("tiny-random", strength=-1.0).state_dict().items()
                          if k != "contrastive_gamma"}}
    module = SteeringLM("tiny-random")
    module.on_load_checkpoint(old)  # Lightning calls it before load_state_dict
    module.load_state_dict(old["state_dict"])
    assert module.mu == -1.0 and module.gamma is None
