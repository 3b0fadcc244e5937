"""Model loading and adapters on the tiny random Llama (no downloads)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import peft
import pytest
import torch

import svd_lightning.gguf as gguf_module
from svd_lightning import models, tiny


@pytest.fixture
def model_and_inputs():
    model, tokenizer = tiny.tiny_model_and_tokenizer()
    # Right padding, as in the batch contract: the second row has padding at the end.
    inputs = tokenizer(["The capital of France is Paris.", "Q: What"], return_tensors="pt", padding=True)
    return model, inputs


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# ---------------------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("method", models.ADAPTER_METHODS)
def test_adapter_forward_backward_and_virtual_tokens(model_and_inputs, method):
    model, inputs = model_and_inputs
    peft_model = models.apply_adapter(model, method)
    assert isinstance(peft_model, peft.PeftModel)

    out = peft_model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert sum(p.numel() for p in trainable) < sum(p.numel() for p in peft_model.parameters())  # base frozen

    # The empirical check: how many positions did peft prepend to the logits?
    observed = out.logits.shape[1] - inputs["input_ids"].shape[1]
    assert models.virtual_token_count(peft_model) == observed
    expected = 20 if method in ("prompt_tuning", "p_tuning") else 0
    assert observed == expected


@pytest.mark.parametrize("method", models.ADAPTER_METHODS)
def test_disable_adapter_gives_the_original_logits_exactly(model_and_inputs, method):
    model, inputs = model_and_inputs
    reference = _logits(model, inputs)  # before peft injects layers into `model`
    peft_model = models.apply_adapter(model, method).eval()
    if method in ("lora", "ia3"):  # identity at init: perturb so "disabled" is a real test
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if p.requires_grad:
                    p.add_(0.5)
    assert not torch.equal(_logits(peft_model, inputs)[:, models.virtual_token_count(peft_model) :], reference)

    with peft_model.disable_adapter():
        base = _logits(peft_model, inputs)
        assert models.virtual_token_count(peft_model) == 0
    assert base.shape[1] == inputs["input_ids"].shape[1]
    assert torch.equal(base, reference)
    # Leaving the context restores the adapter (and its prepended positions).
    assert _logits(peft_model, inputs).shape[1] == inputs["input_ids"].shape[1] + models.virtual_token_count(peft_model)


def test_adapter_config_defaults(model_and_inputs):
    model, _ = model_and_inputs
    lora = models.adapter_config("lora", model)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (8, 16, 0.1)
    assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}  # the paper's, found in the model
    assert lora.task_type == peft.TaskType.CAUSAL_LM
    assert models.adapter_config("lora").target_modules is None  # no model: peft's mapping decides
    ia3 = models.adapter_config("ia3", model)
    assert set(ia3.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "up_proj"}
    assert set(ia3.feedforward_modules) == {"down_proj", "up_proj"}
    pt = models.adapter_config("prompt_tuning")
    assert pt.num_virtual_tokens == 20 and pt.prompt_tuning_init == peft.PromptTuningInit.RANDOM
    pe = models.adapter_config("p_tuning")
    assert isinstance(pe, peft.PromptEncoderConfig)
    assert (pe.num_virtual_tokens, pe.encoder_hidden_size, pe.encoder_num_layers) == (20, 128, 2)
    prefix = models.adapter_config("prefix_tuning")
    assert isinstance(prefix, peft.PrefixTuningConfig)
    assert (prefix.num_virtual_tokens, prefix.prefix_projection, prefix.encoder_hidden_size) == (20, True, 128)


def test_overrides_replace_defaults(model_and_inputs):
    model, _ = model_and_inputs
    assert models.adapter_config("lora", r=4).r == 4
    assert models.adapter_config("prompt_tuning", num_virtual_tokens=5).num_virtual_tokens == 5
    # IA3 keeps feedforward_modules a subset of overridden targets.
    ia3 = models.adapter_config("ia3", target_modules=["q_proj", "down_proj"])
    assert list(ia3.feedforward_modules) == ["down_proj"]
    peft_model = models.apply_adapter(model, "lora", r=4, target_modules=["q_proj"])
    a = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]
    assert a.weight.shape[0] == 4
    with pytest.raises(ValueError, match="no field"):
        models.adapter_config("lora", rank=4)


def test_unknown_method_lists_the_methods():
    with pytest.raises(ValueError) as err:
        models.adapter_config("dora")
    for method in models.ADAPTER_METHODS:
        assert method in str(err.value)


def test_missing_target_modules_lists_linear_layers(model_and_inputs):
    model, _ = model_and_inputs
    with pytest.raises(ValueError) as err:
        models.apply_adapter(model, "lora", target_modules=["query", "v_proj"])
    message = str(err.value)
    assert "query" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens"):
        assert name in message
    assert "Linear: " in message and "Embedding: " in message  # candidates by type
    assert not isinstance(model, peft.PeftModel)


# ----------------------------------------------------------------------------------------- loading


def test_tiny_sources():
    tokenizer = models.load_tokenizer("tiny-random")
    assert tokenizer.pad_token is not None
    model = models.load_causal_lm("tiny-random")
    assert model.config.vocab_size == len(tokenizer)
    assert models.load_causal_lm("tiny-random", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_pad_falls_back_to_eos(tmp_path, caplog):
    tokenizer = tiny.tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="svd_lightning.models"):
        loaded = models.load_tokenizer(tmp_path)
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"
    assert "no pad token" in caplog.text


def test_local_folder_round_trip(tmp_path):
    model, tokenizer = tiny.tiny_model_and_tokenizer()
    model.save_pretrained(tmp_path)
    loaded = models.load_causal_lm(tmp_path)
    ids = tokenizer("Q: What", return_tensors="pt")
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


@pytest.mark.parametrize("source", ["/no/such/model", "./missing-folder", "missing.gguf"])
def test_missing_paths_raise_clearly(source):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_causal_lm(source)


# -------------------------------------------------------------------------------- gguf cache logic


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A dummy .gguf and a converter that writes the tiny model instead of dequantizing."""
    monkeypatch.setenv("SVD_LIGHTNING_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "Fake-Model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def convert(path, out_dir):
        calls.append(Path(out_dir))
        model, tokenizer = tiny.tiny_model_and_tokenizer()
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)

    monkeypatch.setattr(gguf_module, "convert_gguf", convert)
    return gguf, calls


def test_gguf_converted_once_into_cache(fake_gguf, tmp_path):
    gguf, calls = fake_gguf
    model = models.load_causal_lm(gguf)
    tokenizer = models.load_tokenizer(str(gguf))
    folder = models.gguf_cache_dir(gguf)
    assert folder.parent == tmp_path / "cache" and folder.name.startswith("Fake-Model.Q4_1-")  # its stem and content
    assert (folder / "config.json").is_file()
    assert len(calls) == 1 and calls[0] != folder and calls[0].parent == folder.parent  # written aside, renamed
    assert model.config.vocab_size == len(tokenizer)
    models.load_causal_lm(gguf)
    assert len(calls) == 1  # reused
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folder left


def test_interrupted_conversion_leaves_no_folder(fake_gguf, tmp_path, monkeypatch):
    gguf, _ = fake_gguf

    def crash(path, out_dir):
        (Path(out_dir) / "config.json").write_text("{}")  # partial output
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_module, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        models.converted_gguf_dir(gguf)
    assert list((tmp_path / "cache").iterdir()) == []


def test_smollm2_alias_uses_cached_gguf(fake_gguf, tmp_path, monkeypatch):
    # A file already in the cache means no download: the subprocess must not run.
    _, calls = fake_gguf
    cached = tmp_path / "cache" / Path(models.SMOLLM2_MEMBER).name
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"GGUF")
    monkeypatch.setattr(gguf_module.subprocess, "run", lambda *a, **k: pytest.fail("no download expected"))
    assert models.smollm2_gguf() == cached
    models.load_causal_lm("smollm2-135m")
    assert os.path.isdir(models.gguf_cache_dir(cached)) and len(calls) == 1
