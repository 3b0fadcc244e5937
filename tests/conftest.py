"""Tiny random models and a local tokenizer: no downloads anywhere in the suite."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from svd_lightning.tiny import tiny_model_and_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_model_and_tokenizer()[1]


def perturbed_lora(seed: int = 0, dtype=torch.float32):
    """A tiny Llama with a LoRA adapter whose B matrices are random, so warm ≠ base."""
    model, _ = tiny_model_and_tokenizer(seed)
    peft_model = get_peft_model(model.to(dtype), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return peft_model.eval()


def left_padded(tokenizer, prompts):
    """Token ids and attention mask of prompts, left padded as for generation."""
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.fixture()
def lora_model():
    return perturbed_lora()


def save_tiny_run(model, run_dir, **fields):
    """``model`` (a tiny-random LoRA) saved as a finished run at ``run_dir``; fields override the defaults."""
    from svd_lightning.config import SteeringConfig
    from svd_lightning.run import SteeringRun, write_run

    run = SteeringRun(model="tiny-random", adapter="lora", steering=SteeringConfig(**{"mu": -1.0, **fields}))
    return write_run(model, run, run_dir, tokenizer=tiny_model_and_tokenizer()[1])


def as_older_format(run_dir, version: int, drop=()):
    """Rewrite ``run_dir``'s steering.json as svd-lightning format ``version`` wrote it (its adapter hash
    rule, without the fields in ``drop``): a run from before a format change."""
    import json
    from pathlib import Path

    from svd_lightning.run import RUN_FILE, adapter_hash

    path = Path(run_dir) / RUN_FILE
    payload = json.loads(path.read_text())
    payload["format_version"] = version
    payload["adapter_sha256"] = adapter_hash(Path(run_dir) / "adapter", version)
    if version < 2:  # flat settings, without the ones format 2 added
        steering = payload.pop("steering")
        payload.update({k: v for k, v in steering.items() if k not in ("forward_mode", "gamma")})
    for name in drop:
        payload.pop(name, None)
    if version == 0:
        payload.pop("format_version")
    path.write_text(json.dumps(payload))
    return path
