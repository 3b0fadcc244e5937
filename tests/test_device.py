"""The hot paths are device-agnostic: the same numbers on every available device (CPU always; CUDA on
a GPU machine, e.g. ``benchmarks/gpu_check.sh``) as on the CPU reference."""

import copy

import lightning as L
import pytest
import torch

from svd_lightning.batch import Tokenized, collate_choices, collate_lm
from svd_lightning.calibration import calibrate
from svd_lightning.config import SteeringConfig
from svd_lightning.generation import steered_generate
from svd_lightning.scoring import score_choices

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
    got = score_choices(model, on_device, SteeringConfig(mu=-1.0), forward_mode=forward_mode)
    ref = score_choices(reference, batch, SteeringConfig(mu=-1.0), forward_mode="two_pass")
    for k in ref:
        assert got[k].device.type == device
        torch.testing.assert_close(got[k].cpu(), ref[k], rtol=1e-4, atol=1e-4)
    batches = [collate_lm(EXAMPLES, tok)]
    mu = calibrate(model, batches, SteeringConfig(), forward_mode=forward_mode, progress=False).cache.solve()
    mu_ref = calibrate(reference, batches, SteeringConfig(), forward_mode="two_pass", progress=False).cache.solve()
    assert mu == pytest.approx(mu_ref, rel=1e-4, abs=1e-5)
    ids, mask = left_padded(tokenizer, PROMPTS)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    out = steered_generate(model, ids.to(device), mask.to(device), SteeringConfig(mu=-1.0), forward_mode=forward_mode, **kw)
    assert out.device.type == device
    assert torch.equal(out.cpu(), steered_generate(reference, ids, mask, SteeringConfig(mu=-1.0), forward_mode="two_pass", **kw))


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


# -- every tensor the package creates names its device ---------------------------------------------------------
FACTORIES = {"full", "zeros", "ones", "arange", "tensor", "as_tensor", "empty", "eye", "randn", "rand", "randint", "linspace"}


def test_no_tensor_is_created_without_a_device():
    """A factory call without ``device=`` lands on the default device (the CPU): on a GPU it then meets a
    CUDA tensor and fails, or moves data behind the user's back. Host-side accumulators say "cpu"."""
    import ast
    from pathlib import Path

    import svd_lightning

    found = []
    for path in sorted(Path(svd_lightning.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and not any(k.arg == "device" for k in node.keywords)):
                found.append(f"{path.name}:{node.lineno} torch.{node.func.attr}")
    assert not found, f"tensors created without a device: {found}"


def test_the_hot_paths_run_with_the_meta_device_as_default(tokenizer):
    """A proxy for a GPU without one: with ``torch.device("meta")`` as the default, a tensor the package
    creates without naming a device is a meta tensor, and meeting the CPU data fails. Scoring (every
    variant kind, the γ limits), the calibration pass with every solver, and the generation processor."""
    from svd_lightning.calibration import CalibrationNeeds, calibrate_pass
    from svd_lightning.generation import SteeringLogitsProcessor
    from svd_lightning.scoring import score_choice_variants
    from svd_lightning.steering import ContrastiveLimit

    from conftest import CHOICE_EXAMPLES

    model = perturbed_lora()
    batch = collate_choices(CHOICE_EXAMPLES, Tokenized(tokenizer, 64))
    settings = SteeringConfig(floor=-20.0)
    ids, mask = left_padded(tokenizer, PROMPTS)
    with torch.device("meta"):
        for mode in ("one_forward", "two_pass"):
            variants = {"svd": settings.replace(mu=-1.0), "floor": settings.replace(
                mu=-1.0, scoring_policy="floor"), "contrastive": settings.contrastive(gamma=0.5),
                "limit": ContrastiveLimit(1)}
            scores = score_choice_variants(model, batch, variants, forward_mode=mode)
            assert all(v.device.type == "cpu" for v in scores.values())
        needs = CalibrationNeeds(statistics={"a": settings.replace(alpha=0.1)}, choice_caches={"a": settings.replace(alpha=0.1)},
                                 grids={"contrastive": (0.0, 0.5, 1.0)})
        result = calibrate_pass(model, [batch], settings, needs, progress=False)
        summary = result.tokens["a"].stats.summary()
        solved = [result.tokens["a"].cache.solve(), result.choice_caches["a"].cache.solve(), result.grids["contrastive"].best()]
        assert all(torch.isfinite(torch.tensor(x, device="cpu")) for x in [*summary.values(), *solved])
        processor = SteeringLogitsProcessor(model, settings.replace(mu=-1.0), mask)
        warm = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        steered = processor(ids, warm)
        assert steered.device.type == "cpu" and torch.isfinite(steered.max(-1).values).all()
