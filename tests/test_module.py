"""svd_lightning.module with the callbacks under a Trainer on the tiny model: every adapter, μ̄ against a direct computation, crashes and resumes."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from svd_lightning.callbacks import SteeredValidation, SteeringExtraction, StrengthSolver
from svd_lightning.data import TruthfulQADataModule
from svd_lightning.logger import RunLogger
from svd_lightning.models import ADAPTER_METHODS
from svd_lightning.module import SteeringLM
from svd_lightning.calibration.solvers import ExactStrengthCache
from svd_lightning.steering import StrengthStats, steering_vector, strength_terms

from conftest import tiny_datamodule, tiny_trainer, write_truthfulqa


@torch.no_grad()
def _direct_statistics(module, loader, alpha):
    """μ̄ straight from svd_lightning.steering, with our own forward passes and slicing."""
    stats, cache = StrengthStats(), ExactStrengthCache()
    module.eval()
    for batch in loader:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        zw = module.model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:]
        with module.model.disable_adapter():
            zb = module.model(input_ids=ids, attention_mask=mask).logits
        sel = labels[:, 1:] != -100
        zw, zb, y = zw[:, :-1][sel], zb[:, :-1][sel], labels[:, 1:][sel]
        delta, keep = steering_vector(zw, zb, alpha)
        stats.update(strength_terms(zw, delta, keep, y))
        cache.update(zw, delta, keep, y)
    return stats, cache


@pytest.mark.parametrize("adapter", ["lora", "prompt_tuning"])
def test_solver_mu_equals_direct_computation(tmp_path, adapter):
    dm = tiny_datamodule(write_truthfulqa(tmp_path / "mc.json"), limit_train=8, limit_calib=6, limit_test=4)
    module = SteeringLM("tiny-random", adapter=adapter, learning_rate=0.05, adapter_options={"r": 4} if adapter == "lora" else None)
    solver = StrengthSolver("exact")
    tiny_trainer(tmp_path, [SteeringExtraction(), solver]).fit(module, dm)
    stats, cache = _direct_statistics(module, dm.calib_dataloader(), 0.1)
    sol = solver.solution
    assert sol["steering"]["mu"] == pytest.approx(cache.solve(), rel=1e-5, abs=1e-7)
    assert module.mu == pytest.approx(sol["steering"]["mu"], rel=1e-12)
    for key, value in stats.summary().items():
        assert sol["aggregates"][key] == pytest.approx(value, rel=1e-4, abs=1e-7), key


@pytest.mark.parametrize("adapter", ADAPTER_METHODS)
def test_each_adapter_warm_start_step_and_steered_validation(tmp_path, adapter):
    dm = tiny_datamodule(write_truthfulqa(tmp_path / "mc.json", n=10), limit_train=4, limit_calib=2, limit_test=2)
    module = SteeringLM("tiny-random", adapter=adapter, learning_rate=0.05)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    trainer = tiny_trainer(tmp_path, [StrengthSolver("pooled", "fisher"), SteeredValidation(print_table=False)], max_steps=1)
    trainer.fit(module, dm)
    changed = any(not torch.equal(before[n], p) for n, p in module.model.named_parameters() if p.requires_grad)
    assert changed, "one warm-start step should update the adapter"
    assert module.mu is not None
    got = module.steering_state.metrics
    for v in ("plain", "base", "steered"):
        assert 0.0 <= got[f"val/mc2_{v}"] <= 1.0


def test_validate_solves_when_no_strength_is_known(tmp_path):
    dm = tiny_datamodule(write_truthfulqa(tmp_path / "mc.json", n=10), limit_calib=2, limit_test=2)
    module = SteeringLM("tiny-random", adapter="prompt_tuning")  # random virtual tokens: warm ≠ base
    assert module.mu is None
    tiny_trainer(tmp_path, [StrengthSolver("median", "identity")]).validate(module, dm)
    assert module.mu is not None and "val/mc1_steered" in module.steering_state.metrics


def test_identity_adapter_gives_a_clear_error_not_nan(tmp_path):
    """A fresh LoRA (B = 0) leaves the model unchanged: δz = 0 on every calibration token."""
    dm = tiny_datamodule(write_truthfulqa(tmp_path / "mc.json", n=10), limit_calib=2, limit_test=2)
    module = SteeringLM("tiny-random", adapter="lora")
    with pytest.raises(ValueError, match="no calibration token has a usable steering vector"):
        tiny_trainer(tmp_path, [StrengthSolver("pooled")]).validate(module, dm)


def test_fixed_strength_skips_solver_in_validate(tmp_path):
    dm = tiny_datamodule(write_truthfulqa(tmp_path / "mc.json", n=10), limit_calib=2, limit_test=2)
    module = SteeringLM("tiny-random", mu=-1.25)
    solver = StrengthSolver()
    tiny_trainer(tmp_path, [solver]).validate(module, dm)
    assert solver.solution is None and module.steering_state.metrics["val/mu"] == -1.25


def test_predict_returns_per_row_scores(tmp_path):
    dm = tiny_datamodule(write_truthfulqa(tmp_path / "mc.json", n=10), limit_test=2)
    module = SteeringLM("tiny-random", mu=-1.0)
    out = tiny_trainer(tmp_path, []).predict(module, dm)
    rows = sum(len(b["plain"]) for b in out)
    assert rows == sum(len(b["question_index"]) for b in out) > 0
    for b in out:
        assert set(b) >= {"plain", "base", "steered", "question_index", "choice_set", "is_true"}
        assert torch.isfinite(b["steered"]).all()


def _seeded_fit(tmp_path, data, name):
    L.seed_everything(0)
    dm = tiny_datamodule(data, limit_train=8, limit_calib=4, limit_test=3)
    module = SteeringLM("tiny-random", adapter="lora", learning_rate=0.05, adapter_options={"r": 4})
    logger = RunLogger(tmp_path, name=name, version=0)
    tiny_trainer(tmp_path, [StrengthSolver("exact"), SteeredValidation(print_table=False)], logger=logger).fit(module, dm)
    return module, Path(logger.log_dir)


def test_same_seed_same_mu_and_metrics(tmp_path):
    data = write_truthfulqa(tmp_path / "mc.json")
    a, _ = _seeded_fit(tmp_path, data, "a")
    b, _ = _seeded_fit(tmp_path, data, "b")
    assert a.mu == b.mu
    assert a.steering_state.metrics == b.steering_state.metrics


class _CalibrationCrash(TruthfulQADataModule):
    def calib_dataloader(self):
        loader = super().calib_dataloader()

        class Crashing:
            def __len__(self):
                return len(loader)

            def __iter__(self):
                for i, batch in enumerate(loader):
                    if i == 1:
                        raise RuntimeError("killed during calibration")
                    yield batch

        return Crashing()


def test_crash_during_calibration_keeps_previous_artifacts(tmp_path):
    data = write_truthfulqa(tmp_path / "mc.json")
    _, run = _seeded_fit(tmp_path, data, "run")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.suffix == ".json"}
    assert {"steering.json", "metrics.json"} <= set(before)
    module = SteeringLM("tiny-random", adapter="lora", learning_rate=0.05, adapter_options={"r": 4})
    dm = _CalibrationCrash(path=str(data), instruction=False, batch_size=2, train_batch_size=1, calib_batch_size=1,
                           max_length=128, limit_train=8, limit_calib=4, limit_test=3)
    logger = RunLogger(tmp_path, name="run", version=0)  # the same version, pinned
    trainer = tiny_trainer(tmp_path, [StrengthSolver("exact"), SteeredValidation(print_table=False)], logger=logger)
    with pytest.raises(RuntimeError, match="killed during calibration"):
        trainer.fit(module, dm)
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.suffix == ".json"}
    assert after == before
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def _resumable_fit(tmp_path, data, name, ckpt_path=None):
    """Two warm-start epochs of 4 steps (batch 2, dropout on), checkpointing every 3 steps."""
    L.seed_everything(0)
    dm = tiny_datamodule(data, limit_train=8, limit_calib=4, limit_test=3, train_batch_size=2)
    module = SteeringLM("tiny-random", adapter="lora", learning_rate=0.05,
                        adapter_options={"r": 4, "lora_dropout": 0.3})
    ckpt = L.pytorch.callbacks.ModelCheckpoint(tmp_path / name / "ckpt", every_n_train_steps=3, save_top_k=-1)
    logger = RunLogger(tmp_path, name=name, version=0)
    trainer = tiny_trainer(tmp_path, [StrengthSolver("exact"), SteeredValidation(print_table=False), ckpt],
                       logger=logger, max_epochs=2, enable_checkpointing=True, limit_val_batches=0)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return module, sorted((tmp_path / name / "ckpt").glob("*.ckpt"))


@pytest.mark.parametrize("step", [3, 6])  # mid-epoch 0, and mid-epoch 1 (after a μ̄ was solved)
def test_resume_mid_warm_start_gives_the_same_mu(tmp_path, step):
    data = write_truthfulqa(tmp_path / "mc.json")
    full, ckpts = _resumable_fit(tmp_path, data, "full")
    mid = next(p for p in ckpts if f"step={step}." in p.name)
    resumed, _ = _resumable_fit(tmp_path, data, "resumed", ckpt_path=mid)
    assert resumed.mu == pytest.approx(full.mu, abs=1e-6, rel=0)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_empty_calibration_set_fails_before_training(tmp_path):
    dm = tiny_datamodule(write_truthfulqa(tmp_path / "mc.json", n=10), limit_calib=0)
    module = SteeringLM("tiny-random", adapter="lora", learning_rate=0.05)
    before = [p.detach().clone() for p in module.model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match=r"the calib split is empty \(train 6, calib 0, val 1, test 2 of 10 questions"):
        tiny_trainer(tmp_path, [SteeringExtraction(), StrengthSolver()]).fit(module, dm)
    after = [p for p in module.model.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and module.global_step == 0


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
def test_alpha_outside_unit_interval_is_refused(alpha):
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        SteeringLM("tiny-random", alpha=alpha)


def test_non_finite_logits_name_the_step(tmp_path):
    dm = tiny_datamodule(write_truthfulqa(tmp_path / "mc.json", n=10), limit_calib=2, limit_test=2)
    module = SteeringLM("tiny-random", mu=-1.0)
    with torch.no_grad():
        module.model.get_base_model().lm_head.weight[3].fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"non-finite warm logits .* val batch 0, after warm-start step 0"):
        tiny_trainer(tmp_path, [StrengthSolver()]).validate(module, dm)
    module = SteeringLM("tiny-random")
    with torch.no_grad():
        module.model.get_base_model().lm_head.weight[3].fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"calibration batch 0, after warm-start step 0"):
        tiny_trainer(tmp_path, [StrengthSolver()]).validate(module, dm)


def test_run_dir_can_be_recalibrated_with_another_strength_option(tmp_path):
    data = write_truthfulqa(tmp_path / "mc.json")
    _, run = _seeded_fit(tmp_path, data, "run")
    saved = json.loads((run / "steering.json").read_text())
    module = SteeringLM("tiny-random", adapter="lora", adapter_options={"r": 4}, run_dir=str(run), reuse_strength=False)
    assert module.mu is None
    dm = tiny_datamodule(data, limit_train=8, limit_calib=4, limit_test=3)
    tiny_trainer(tmp_path, [StrengthSolver("trimmed", "fisher")]).validate(module, dm)
    assert module.mu == pytest.approx(saved["aggregates"]["trimmed_fisher"], rel=1e-9)


def test_scoring_runs_in_fp32_under_a_bf16_warm_start():
    """Steered scores add μ·δ with a large μ̄: bf16 logits' rounding would move them by nats, so scoring
    leaves autocast off (the same scores inside a bf16 autocast region as outside it)."""
    from conftest import CHOICE_EXAMPLES, Tokenized, collate_choices, perturbed_lora
    from svd_lightning.tiny import tiny_model_and_tokenizer

    module = SteeringLM(model="tiny-random", adapter="lora")
    module.model = perturbed_lora()
    module.set_strength(-40.0)
    module.model.eval()
    batch = collate_choices(CHOICE_EXAMPLES, Tokenized(tiny_model_and_tokenizer(0)[1], 64))
    plain = module.score_batch(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = module.score_batch(batch)
        bf16 = module.model(input_ids=batch["input_ids"]).logits
    assert bf16.dtype == torch.bfloat16  # the region does autocast the model
    for k in plain:
        torch.testing.assert_close(inside[k], plain[k], rtol=0, atol=0)


def test_a_fixed_mu_under_its_former_name_still_loads_with_a_warning():
    """``SteeringLM(strength=...)`` (configs and checkpoints written before ``mu``) gives the same module, says so,
    and is recorded as ``mu``; the two names disagreeing is an error."""
    with pytest.warns(DeprecationWarning, match=r"SteeringLM\(strength=...\) is now SteeringLM\(mu=...\)"):
        old = SteeringLM("tiny-random", strength=-1.5)
    assert old.mu == SteeringLM("tiny-random", mu=-1.5).mu == -1.5
    assert old.hparams["mu"] == -1.5 and old.hparams["strength"] is None
    with pytest.raises(ValueError, match="disagree"):
        SteeringLM("tiny-random", mu=1.0, strength=2.0)


@pytest.mark.parametrize("strategy,says", [("ddp", True), ("auto", False)])
def test_a_distributed_strategy_says_its_sampler_orders_the_warm_start(tmp_path, capsys, strategy, says):
    """Under ddp / fsdp2, even on one device, Lightning's DistributedSampler orders the training data, so the run
    differs from the default strategy's: fit says so (docs/usage.md, Multi-GPU)."""
    module = SteeringLM("tiny-random")
    module.trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False, default_root_dir=tmp_path)
    module.setup("fit")
    assert ("DistributedSampler" in capsys.readouterr().err) == says
