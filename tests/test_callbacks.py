"""svd_lightning.callbacks: the strength solver (every option, choice_nll, the logit-difference direction) and
the contrastive baseline under a Trainer, on the tiny model."""

import json
from pathlib import Path

import pytest
import torch

from svd_lightning import SteeredModel
from svd_lightning.calibration import calibrate_choice_grid, calibrate_choices
from svd_lightning.callbacks import ContrastiveBaseline, SteeredValidation, StrengthSolver
from svd_lightning.config import SteeringConfig
from svd_lightning.generation import steered_generate
from svd_lightning.scoring import score_choices
from svd_lightning.module import SteeringLM
from svd_lightning.run import SteeringRun
from svd_lightning.steering import GAMMA_GRID, contrastive_logits, steer, steering_direction

from conftest import (ROOT, as_older_format, choice_batches, left_padded, perturbed_lora, save_tiny_run, tiny_datamodule, tiny_trainer, write_truthfulqa)


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
        config = SteeringConfig(mu=0.8, alpha=0.1, direction="logit_difference")
        fast = steered_generate(model64, ids, mask, config, forward_mode=mode, **kw)
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
    assert run.steering.direction == "logit_difference" and run.solver.strength == "choice_nll"
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


def test_contrastive_scores_are_the_contrastive_logits_in_float64(tokenizer, model64):
    batch = choice_batches(tokenizer, size=4)[0]
    gamma = 1.5
    out = score_choices(model64, batch, SteeringConfig(), gamma=gamma, forward_mode="two_pass")
    assert "steered" not in out
    with torch.no_grad():
        warm = model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        with model64.disable_adapter():
            base = model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    lp = torch.log_softmax(contrastive_logits(warm, base, gamma), -1)[:, :-1]
    labels = batch["labels"][:, 1:]
    tok = lp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1).masked_fill(labels == -100, 0.0)
    torch.testing.assert_close(out["contrastive"].double(), tok.sum(-1), rtol=0, atol=1e-4)
    plain = score_choices(model64, batch, SteeringConfig(), gamma=0.0, forward_mode="two_pass")
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
    old = {"state_dict": {k: v for k, v in SteeringLM("tiny-random", mu=-1.0).state_dict().items()
                          if k != "contrastive_gamma"}}
    module = SteeringLM("tiny-random")
    module.on_load_checkpoint(old)  # Lightning calls it before load_state_dict
    module.load_state_dict(old["state_dict"])
    assert module.mu == -1.0 and module.gamma is None


def test_a_datamodule_without_the_contracts_choice_batches_is_named_with_what_needs_them(tmp_path):
    """Any LightningDataModule with the contract's methods works; one that lacks calib_choice_dataloader is
    refused before calibration with the method and what needs it (here the contrastive baseline's γ, not
    choice_nll: the strength is exact), and works once nothing needs the choices."""
    import lightning as L

    from svd_lightning.data import SteeringDataModule
    from svd_lightning.log import InputError

    data = write_truthfulqa(tmp_path / "mc.json", n=12)

    class OwnData(L.LightningDataModule):  # a user's own: the choice-set loaders only where it has them
        def __init__(self):
            super().__init__()
            self.inner = tiny_datamodule(data, limit_train=4, limit_calib=2, limit_test=2)

        def setup(self, stage=None):
            self.inner.tokenizer = self.trainer.lightning_module.tokenizer
            self.inner.setup(stage)

        def train_dataloader(self):
            return self.inner.train_dataloader()

        def calib_dataloader(self):
            return self.inner.calib_dataloader()

    dm = OwnData()
    assert not isinstance(dm, SteeringDataModule) and isinstance(tiny_datamodule(data), SteeringDataModule)
    module = SteeringLM("tiny-random", adapter="lora", learning_rate=0.05, adapter_options={"r": 4})
    with pytest.raises(InputError, match=r"OwnData lacks calib_choice_dataloader\(\) for the contrastive baseline's γ"):
        tiny_trainer(tmp_path, [StrengthSolver("exact"), ContrastiveBaseline()], limit_val_batches=0).fit(module, dm)
    module = SteeringLM("tiny-random", adapter="lora", learning_rate=0.05, adapter_options={"r": 4})
    tiny_trainer(tmp_path / "without", [StrengthSolver("exact")], limit_val_batches=0).fit(module, OwnData())
    assert module.mu is not None
