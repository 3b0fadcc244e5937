"""SteeredModel, the five-line API: inputs are checked where they enter, a failed call breaks nothing."""

import pytest

from svd_lightning import SteeredModel
from svd_lightning.run import RunError

from conftest import perturbed_lora, save_tiny_run


@pytest.fixture(scope="module")
def steered(tmp_path_factory):
    return SteeredModel.from_run_dir(save_tiny_run(perturbed_lora(), tmp_path_factory.mktemp("api") / "run"))


@pytest.mark.parametrize("prompt,choices,message", [
    ("Q: Sky?\nA:", " Yes.", r"choices must be a list of strings \(e.g."),
    (["Q: a?", "Q: b?"], [" a", " b"], r"choices\[0\] must be a list of strings, got str"),
    ([1, 2], [[" a", " b"], [" a", " b"]], "prompt 0 must be a string, got int"),
    ("Q: Sky?\nA:", [" Yes", 3], "choices must be a non-empty list of non-empty strings"),
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
    from svd_lightning import decoding

    model = steered.model
    hooks = lambda: sum(len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    count = hooks()
    base = model.get_base_model()
    original = base.forward
    monkeypatch.setattr(base, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    ids = steered.tokenizer(["Q: Why?"], return_tensors="pt")["input_ids"]
    with pytest.raises(RuntimeError, match="boom"):
        decoding.paired_logits(model, ids, "one_forward")
    monkeypatch.setattr(base, "forward", original)
    assert hooks() == count
    decoding.paired_logits(model, ids, "one_forward")


@pytest.mark.parametrize("field,value,message", [
    ("floor", 5.0, "floor is a log-probability and must be ≤ 0"),
    ("mu", 1e300, "is too large"),
    ("alpha", 0.0, r"alpha must be in \(0, 1\]"),
    ("scoring_policy", "sometimes", "scoring_policy must be one of"),
])
def test_bad_settings_are_refused(steered, field, value, message):
    with pytest.raises((RunError, ValueError), match=message):
        SteeredModel(steered.model, steered.tokenizer, **{"mu": -1.0, field: value})
