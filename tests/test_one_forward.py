"""The one-forward path (warm and base as rows of one batch) against the two-pass path, in fp64."""

import pytest
import torch
from peft import IA3Config, PromptTuningConfig, get_peft_model

from svd_lightning.batch import ChoiceExample, Tokenized, collate_choices, collate_lm
from svd_lightning.calibration import calibrate
from svd_lightning.config import SteeringConfig
from svd_lightning.forward.rows import resolve_forward_mode
from svd_lightning.generation import steered_generate
from svd_lightning.scoring import paired_label_logits, score_choices
from svd_lightning.tiny import tiny_model_and_tokenizer

from conftest import EXAMPLES, PROMPTS, left_padded, perturbed_lora


@pytest.fixture(scope="module")
def model64():
    torch.manual_seed(0)  # LoRA A's init: a fixed model, so a failure reproduces
    return perturbed_lora(dtype=torch.float64)


@pytest.mark.parametrize("share", [True, False])
def test_scoring_logits_match_two_pass(tokenizer, model64, share):
    batch = collate_choices(EXAMPLES, Tokenized(tokenizer, 64))  # right padded rows of different lengths
    one = paired_label_logits(model64, batch, share_prompts=share, forward_mode="one_forward")
    two = paired_label_logits(model64, batch, share_prompts=share, forward_mode="two_pass")
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert not torch.allclose(one[0], one[1]), "warm and base must differ on this model"
    s1 = score_choices(model64, batch, SteeringConfig(mu=-1.5), forward_mode="one_forward")
    s2 = score_choices(model64, batch, SteeringConfig(mu=-1.5), forward_mode="two_pass")
    for k in s2:
        torch.testing.assert_close(s1[k], s2[k], rtol=0, atol=1e-10)


def _calibration(model, tokenizer, batch_size, mode):
    tok = Tokenized(tokenizer, 64)
    batches = [collate_lm(EXAMPLES[i : i + batch_size], tok) for i in range(0, len(EXAMPLES), batch_size)]
    result = calibrate(model, batches, SteeringConfig(), forward_mode=mode, progress=False)
    return {**result.stats.summary(), "exact": result.cache.solve()}, result.diagnostics


@pytest.mark.parametrize("batch_size", [1, 3])
def test_calibration_mu_matches_two_pass(tokenizer, model64, batch_size):
    one, diag_one = _calibration(model64, tokenizer, batch_size, "one_forward")
    two, diag_two = _calibration(model64, tokenizer, batch_size, "two_pass")
    assert diag_one["usable_tokens"] > 0
    for key in two:
        assert one[key] == pytest.approx(two[key], rel=1e-10, abs=1e-10), key
    for key in diag_two:
        assert diag_one[key] == pytest.approx(diag_two[key], rel=1e-10, abs=1e-12), key


def test_batched_calibration_gives_the_same_mu(tokenizer):
    """Padding in larger calibration batches changes no μ̄ (fp32, the default dtype)."""
    model = perturbed_lora()
    single, _ = _calibration(model, tokenizer, 1, "auto")
    batched, _ = _calibration(model, tokenizer, 4, "auto")
    # fp32: padding changes the matmuls' reduction order (~1e-7 per logit); the Fisher-curvature
    # aggregates divide by δ̂ᵀJδ̂, small on some tokens, which amplifies that to ~1e-6
    for key in single:
        assert batched[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("kw", [
    dict(do_sample=False),
    dict(num_beams=3, num_return_sequences=3, do_sample=False, length_penalty=1.0),
    dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.95),
    dict(do_sample=True, num_return_sequences=2, min_p=0.05),
], ids=["greedy", "beam", "sample", "sample-x2"])
@pytest.mark.parametrize("mu", [-2.0, 3.0])
def test_generation_tokens_match_two_pass(tokenizer, model64, kw, mu):
    ids, mask = left_padded(tokenizer, PROMPTS)  # rows of different lengths: left padding
    out = {}
    for mode in ("one_forward", "two_pass"):
        torch.manual_seed(7)
        out[mode] = steered_generate(model64, ids, mask, SteeringConfig(mu=mu), forward_mode=mode, max_new_tokens=10,
                                     pad_token_id=tokenizer.pad_token_id, **kw)
    assert torch.equal(out["one_forward"], out["two_pass"])
    plain = model64.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    assert out["one_forward"].shape[1] > ids.shape[1]
    if kw == dict(do_sample=False):
        assert not torch.equal(plain, out["one_forward"]), "steering should change some token on this model"


def test_beam_scores_match_two_pass(tokenizer, model64):
    ids, mask = left_padded(tokenizer, PROMPTS)
    kw = dict(num_beams=4, num_return_sequences=2, do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id,
              return_dict_in_generate=True, output_scores=True)
    one = steered_generate(model64, ids, mask, SteeringConfig(mu=-1.0), forward_mode="one_forward", **kw)
    two = steered_generate(model64, ids, mask, SteeringConfig(mu=-1.0), forward_mode="two_pass", **kw)
    assert torch.equal(one.sequences, two.sequences)
    # generate's scores are fp32 (the processors return fp32 log-probs): equal to fp32 rounding.
    torch.testing.assert_close(one.sequences_scores, two.sequences_scores, rtol=0, atol=1e-6)


def test_auto_picks_two_pass_where_peft_cannot_mix_rows(tokenizer):
    base, _ = tiny_model_and_tokenizer(0)
    ia3 = get_peft_model(base, IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                         feedforward_modules=["down_proj"])).eval()
    assert resolve_forward_mode(ia3, "auto") == "two_pass"
    with pytest.raises(ValueError, match="LoRA only, not ia3"):
        resolve_forward_mode(ia3, "one_forward")
    prompt = get_peft_model(tiny_model_and_tokenizer(0)[0], PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    assert resolve_forward_mode(prompt, "auto") == "two_pass"
    lora = perturbed_lora()
    assert resolve_forward_mode(lora, "auto") == "one_forward"
    assert resolve_forward_mode(lora.train(), "auto") == "two_pass"  # peft refuses per-row adapters in training
    with pytest.raises(ValueError, match="forward_mode must be one of"):
        resolve_forward_mode(lora, "fast")
    ids, mask = left_padded(tokenizer, PROMPTS)
    with pytest.raises(ValueError, match="beam sampling"):
        steered_generate(lora.eval(), ids, mask, SteeringConfig(mu=1.0), forward_mode="one_forward", num_beams=2, do_sample=True,
                         max_new_tokens=2, pad_token_id=tokenizer.pad_token_id)


@pytest.mark.parametrize("mode", ["one_forward", "two_pass"])
def test_common_primer_is_encoded_once_with_the_full_pass_logits(tokenizer, model64, mode):
    """Calibration rows: different questions after one few-shot primer (CommonPrefix), fp64."""
    from svd_lightning.forward.encoders import FullRows
    from svd_lightning.forward.rows import WARM

    def _full_label_logits(model, ids, mask, labels):
        return FullRows(ids, mask, labels).label_logits(model, WARM)
    from svd_lightning.forward.adapter import adapter_disabled
    from svd_lightning.forward.encoders import CommonPrefix

    primer = "Q: What is the capital of France?\nA: The capital of France is Paris.\n\n"
    examples = [ChoiceExample(primer + ex.prompt, ex.choices, ex.is_true, ex.index, answer=ex.answer) for ex in EXAMPLES]
    batch = collate_lm(examples, Tokenized(tokenizer, 128))
    prefix = CommonPrefix(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert prefix.usable and prefix.length >= 16
    warm, base, y, row = paired_label_logits(model64, batch, forward_mode=mode)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    torch.testing.assert_close(warm, _full_label_logits(model64, ids, mask, labels), rtol=0, atol=1e-10)
    with adapter_disabled(model64):
        torch.testing.assert_close(base, _full_label_logits(model64, ids, mask, labels), rtol=0, atol=1e-10)
    sel = labels[:, 1:] != -100
    assert torch.equal(y, labels[:, 1:][sel]) and torch.equal(row, sel.nonzero()[:, 0])
    # A primer that is a whole row's prompt (its first answer token follows the primer directly).
    short = collate_lm([ChoiceExample(primer, [" Yes"], [True], 0), examples[1]], Tokenized(tokenizer, 128))
    assert CommonPrefix(short["input_ids"], short["attention_mask"], short["labels"]).usable
    w2, b2, _, _ = paired_label_logits(model64, short, forward_mode=mode)
    torch.testing.assert_close(w2, _full_label_logits(model64, short["input_ids"], short["attention_mask"], short["labels"]),
                               rtol=0, atol=1e-10)
