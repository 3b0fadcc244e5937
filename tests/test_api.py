"""SteeredModel, the five-line API: inputs are checked where they enter, a failed call breaks nothing."""

import json

import pytest
import torch

from svd_lightning import SteeredModel
from svd_lightning.config import ConfigError, SteeringConfig
from svd_lightning.steering import contrastive_log_probs, contrastive_logits

from conftest import perturbed_lora, save_tiny_run


@pytest.fixture(scope="module")
def steered(tmp_path_factory):
    return SteeredModel.from_run_dir(save_tiny_run(perturbed_lora(), tmp_path_factory.mktemp("api") / "run"))


@pytest.mark.parametrize("prompt,choices,message", [
    ("Q: Sky?\nA:", " Yes.", r"choices must be a list of strings \(e.g."),
    (["Q: a?", "Q: b?"], [" a", " b"], r"choices\[0\] must be a list of strings, got str"),
    ([1, 2], [[" a", " b"], [" a", " b"]], "prompt 0 must be a string, got int"),
    ("Q: Sky?\nA:", [" Yes", 3], "choices must be a non-empty list of non-empty strings"),
    ("", [" Yes", " No"], r"prompt 0 \(''\) gives no tokens"),  # no position would predict a choice's first token
])
def test_score_refuses_a_string_where_a_list_belongs(steered, prompt, choices, message):
    with pytest.raises((TypeError, ValueError), match=message):
        steered.score(prompt, choices)


def test_a_failed_generate_leaves_the_model_usable(steered):
    """An empty prompt fails (nothing to continue) and leaves no peft hooks behind on the model."""
    before = steered.generate(["Q: Why?\nA:"], with_plain=True, max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 0 \\(''\\) gives no tokens"):
        steered.generate([""], max_new_tokens=4)
    with pytest.raises(ValueError, match="top_p must be in"):
        steered.generate(["Q: Why?\nA:"], mode="sample", top_p=2.0)
    assert steered.generate(["Q: Why?\nA:"], with_plain=True, max_new_tokens=4) == before


def test_a_failed_forward_inside_peft_leaves_no_hooks(steered, monkeypatch):
    """Even an error raised inside peft's per-row forward (after it registered its hooks) is cleaned up."""
    from svd_lightning.scoring import paired_logits

    model = steered.model
    hooks = lambda: sum(len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    count = hooks()
    base = model.get_base_model()
    original = base.forward
    monkeypatch.setattr(base, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    ids = steered.tokenizer(["Q: Why?"], return_tensors="pt")["input_ids"]
    with pytest.raises(RuntimeError, match="boom"):
        paired_logits(model, ids, "one_forward")
    monkeypatch.setattr(base, "forward", original)
    assert hooks() == count
    paired_logits(model, ids, "one_forward")


@pytest.mark.parametrize("field,value,message", [
    ("floor", 5.0, "floor is a log-probability and must be ≤ 0"),
    ("mu", 1e300, "is too large"),
    ("alpha", 0.0, r"alpha must be in \(0, 1\]"),
    ("scoring_policy", "sometimes", "scoring_policy must be one of"),
])
def test_bad_settings_are_refused(steered, field, value, message):
    with pytest.raises(ConfigError, match=message):
        SteeredModel(steered.model, steered.tokenizer, SteeringConfig(**{"mu": -1.0, field: value}))
    with pytest.raises(ConfigError, match=message):
        steered.config.replace(**{field: value})
    with pytest.raises(ConfigError, match="config.mu is None"):
        SteeredModel(steered.model, steered.tokenizer, SteeringConfig())


# -- the contrastive baseline is part of the run -----------------------------------------------------------
@pytest.fixture(scope="module")
def with_gamma(tmp_path_factory):
    return save_tiny_run(perturbed_lora(), tmp_path_factory.mktemp("gamma") / "run", gamma=1.5)


@torch.no_grad()
def _slow_contrastive_greedy(model, ids, steps, gamma):
    """Greedy on z_φ + γ(z_φ − z_θ), both full forwards recomputed every step (no mask: the baseline has none)."""
    for _ in range(steps):
        warm = model(input_ids=ids).logits[:, -1]
        with model.disable_adapter():
            base = model(input_ids=ids).logits[:, -1]
        ids = torch.cat([ids, contrastive_logits(warm, base, gamma).argmax(-1, keepdim=True)], 1)
    return ids


def test_a_runs_gamma_scores_and_generates_the_contrastive_baseline(with_gamma):
    sm = SteeredModel.from_run_dir(with_gamma)
    assert sm.gamma == 1.5 and sm.run.contrastive_gamma == 1.5
    scores = sm.score("Q: Is the sky blue?\nA:", [" Yes", " No, it is green"])
    assert set(scores) == {"plain", "base", "steered", "contrastive"}
    prompt = "Q: What is the capital of France? A:"
    ids = sm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    expected = sm.tokenizer.decode(_slow_contrastive_greedy(sm.model, ids, 5, 1.5)[0, ids.shape[1]:],
                                   skip_special_tokens=True)
    for mode in ("one_forward", "two_pass"):
        got = SteeredModel(sm.model, sm.tokenizer, sm.config, gamma=sm.gamma, forward_mode=mode)
        assert got.generate(prompt, method="contrastive", max_new_tokens=5) == expected, mode
    assert scores["contrastive"] != scores["steered"], "SVDecode and the baseline should score differently here"


def test_no_gamma_no_contrastive_method(steered):
    with pytest.raises(ConfigError, match="no contrastive γ"):
        steered.generate("Q: Why?", method="contrastive")
    with pytest.raises(ConfigError, match="method must be one of"):
        steered.generate("Q: Why?", method="dola")


def test_generate_cli_and_lm_eval_use_the_runs_gamma(with_gamma, tmp_path):
    from svd_lightning.generate import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Q: What is the capital of France? A:"}\n')
    main(["--run-dir", str(with_gamma), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
          "--method", "contrastive", "--max-new-tokens", "5"])
    row = json.loads((tmp_path / "o.jsonl").read_text())
    sm = SteeredModel.from_run_dir(with_gamma)
    assert row["steered"] == sm.generate(row["prompt"], method="contrastive", max_new_tokens=5)
    assert row["mu"] == 1.5  # the strength the answer was steered with: γ
    lm_eval = pytest.importorskip("svd_lightning.lm_eval", reason="the lm-eval extra")
    backend = lm_eval.SteeredHFLM(str(with_gamma), method="contrastive")
    inps = sm.tokenizer(["Q: Is the sky blue?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        warm = sm.model(input_ids=inps).logits
        with sm.model.disable_adapter():
            base = sm.model(input_ids=inps).logits
    torch.testing.assert_close(backend._model_call(inps), contrastive_log_probs(warm, base, 1.5), rtol=1e-5, atol=1e-5)


def test_the_public_api_is_exported_and_the_run_api_does_not_import_lightning():
    """`from svd_lightning import SteeredModel` in plain PyTorch code loads no Lightning; every name in
    `__all__` resolves."""
    import subprocess
    import sys

    code = ("import sys; from svd_lightning import SteeredModel, SteeringConfig, score_choices, steered_generate; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')], "
            "'Lightning was imported'; import svd_lightning; "
            "missing = [n for n in svd_lightning.__all__ if getattr(svd_lightning, n, None) is None]; "
            "assert not missing, missing; print(len(svd_lightning.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) == 20
