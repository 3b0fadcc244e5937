"""The hot paths are device-agnostic: the same numbers on every available device (CPU always; CUDA on
a GPU machine, e.g. ``benchmarks/gpu_check.sh``) as on the CPU reference."""

import copy

import lightning as L
import pytest
import torch

from svd_lightning.batch import Tokenized, collate_choices, collate_lm
from svd_lightning.calibration import calibrate
from svd_lightning.config import SteeringConfig
from svd_lightning.decoding import score_choices, steered_generate

from conftest import EXAMPLES, PROMPTS, left_padded, perturbed_lora

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("forward_mode", ["one_forward", "two_pass"])
def test_scoring_calibration_generation_on_device(tokenizer, device, forward_mode):
    reference = perturbed_lora()
    model = copy.deepcopy(reference).to(device)
    tok = Tokenized(tokenizer, 64)
    batch = collate_choices(EXAMPLES, tok)
    on_device = {k: v.to(device) for k, v in batch.items()}
    got = score_choices(model, on_device, SteeringConfig(mu=-1.0, forward_mode=forward_mode))
    ref = score_choices(reference, batch, SteeringConfig(mu=-1.0, forward_mode="two_pass"))
    for k in ref:
        assert got[k].device.type == device
        torch.testing.assert_close(got[k].cpu(), ref[k], rtol=1e-4, atol=1e-4)
    batches = [collate_lm(EXAMPLES, tok)]
    mu = calibrate(model, batches, SteeringConfig(forward_mode=forward_mode), progress=False).cache.solve()
    mu_ref = calibrate(reference, batches, SteeringConfig(forward_mode="two_pass"), progress=False).cache.solve()
    assert mu == pytest.approx(mu_ref, rel=1e-4, abs=1e-5)
    ids, mask = left_padded(tokenizer, PROMPTS)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    out = steered_generate(model, ids.to(device), mask.to(device), SteeringConfig(mu=-1.0, forward_mode=forward_mode), **kw)
    assert out.device.type == device
    assert torch.equal(out.cpu(), steered_generate(reference, ids, mask, SteeringConfig(mu=-1.0, forward_mode="two_pass"), **kw))


@pytest.mark.parametrize("device", DEVICES)
def test_trainer_accelerator_runs_the_tiny_fit(tmp_path, device):
    from svd_lightning.callbacks import StrengthSolver
    from svd_lightning.data import TruthfulQADataModule
    from svd_lightning.module import SteeringLM

    from conftest import write_truthfulqa

    data = write_truthfulqa(tmp_path / "mc.json", n=10)
    dm = TruthfulQADataModule(path=str(data), instruction=False, batch_size=2, train_batch_size=2, max_length=128,
                              limit_train=4, limit_calib=2, limit_test=2)
    module = SteeringLM("tiny-random", adapter="lora", learning_rate=0.05, adapter_options={"r": 4})
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_epochs=1, logger=False,
                        default_root_dir=tmp_path, enable_checkpointing=False, enable_progress_bar=False, callbacks=[StrengthSolver("exact")])
    trainer.fit(module, dm)
    assert module.mu is not None and torch.isfinite(torch.tensor(module.mu))
    assert next(module.parameters()).device.type == device
