"""Teacher-forced scoring (svd_lightning.scoring) against per-row references."""

import pytest
import torch

from svd_lightning.batch import ChoiceExample, Tokenized, collate_choices
from svd_lightning.config import SteeringConfig
from svd_lightning.scoring import score_choices
from svd_lightning.steering import steered_log_probs

from conftest import perturbed_lora, prompt_sharing_batch


PROMPTS = ["Q: What is the capital of France? A:", "Q: What happens if you eat a pomegranate?\nA:", "Yes"]


@pytest.mark.parametrize("policy", ["mask_generation_only", "floor", "mask"])
def test_score_choices_matches_per_row_reference(tokenizer, lora_model, policy):
    batch = prompt_sharing_batch(tokenizer)
    got = score_choices(lora_model, batch, SteeringConfig(mu=-1.5, alpha=0.1, scoring_policy=policy))
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i : i + 1, :n]
        labels = batch["labels"][i, 1:n]
        with torch.no_grad():
            zw = lora_model(input_ids=ids).logits[0, :-1]
            with lora_model.disable_adapter():
                zb = lora_model(input_ids=ids).logits[0, :-1]
        sel = labels != -100
        y = labels[sel]
        ref = {
            "plain": torch.log_softmax(zw[sel].double(), -1).gather(-1, y[:, None]).sum(),
            "base": torch.log_softmax(zb[sel].double(), -1).gather(-1, y[:, None]).sum(),
            "steered": steered_log_probs(zw[sel].double(), zb[sel].double(), -1.5, 0.1, policy).gather(-1, y[:, None]).sum(),
        }
        for k, v in ref.items():
            if torch.isinf(v):
                assert got[k][i] == v
            else:
                assert got[k][i].item() == pytest.approx(v.item(), rel=1e-4, abs=1e-4)
        assert got["num_tokens"][i] == sel.sum()
    assert not any(torch.isnan(v).any() for v in got.values())


def test_score_choices_mu0_tiny_alpha_equals_plain(tokenizer, lora_model):
    batch = prompt_sharing_batch(tokenizer)
    for policy in ("mask_generation_only", "floor", "mask"):
        got = score_choices(lora_model, batch, SteeringConfig(mu=0.0, alpha=1e-30, scoring_policy=policy))
        # fp32 sums of ~10 tokens, normalised in two orders (full log-softmax vs kept + rest): a few ulps
        torch.testing.assert_close(got["steered"], got["plain"], rtol=1e-6, atol=1e-5)


def test_adapter_off_means_base(tokenizer):
    model = perturbed_lora()
    batch = prompt_sharing_batch(tokenizer)
    got = score_choices(model, batch, SteeringConfig(mu=None))
    assert "steered" not in got
    merged_off = model.get_base_model()
    # Base scores must not depend on the adapter's weights at all.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(3.0)
    again = score_choices(model, batch, SteeringConfig(mu=None))
    torch.testing.assert_close(again["base"], got["base"])
    assert not torch.allclose(again["plain"], got["plain"])
    assert merged_off is model.get_base_model()


def _repeating_batch(tokenizer):
    from conftest import CHOICE_EXAMPLES

    repeats = [ChoiceExample(ex.prompt, [*ex.choices, *ex.choices], [*ex.is_true, *ex.is_true], ex.index,
                             choice_sets=[0] * len(ex.choices) + [1] * len(ex.choices)) for ex in CHOICE_EXAMPLES[:3]]
    return collate_choices(repeats, Tokenized(tokenizer, 64))


def test_repeated_rows_are_scored_once_with_every_rows_scores(tokenizer, model64, monkeypatch):
    from svd_lightning import scoring
    from svd_lightning.forward.encoders import distinct_rows
    from svd_lightning.scoring import score_choices

    batch = _repeating_batch(tokenizer)
    distinct, same_as = distinct_rows(batch)
    n = batch["input_ids"].shape[0]
    assert distinct["input_ids"].shape[0] < n and same_as.unique().numel() == distinct["input_ids"].shape[0]
    torch.testing.assert_close(distinct["input_ids"][same_as], batch["input_ids"], rtol=0, atol=0)
    config = SteeringConfig(mu=-1.5, alpha=0.2)
    once = score_choices(model64, batch, config, gamma=2.0)
    monkeypatch.setattr(scoring, "distinct_rows", lambda b: (b, torch.arange(b["input_ids"].shape[0])))
    every = score_choices(model64, batch, config, gamma=2.0)  # each row encoded and scored on its own
    assert set(once) == set(every) == {"plain", "base", "steered", "contrastive", "num_tokens"}
    for k in every:
        torch.testing.assert_close(once[k], every[k], rtol=0, atol=1e-10)
    unique = {"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.ones(1, 2), "labels": torch.tensor([[-100, 2]])}
    assert distinct_rows(unique)[0] is unique  # nothing repeated: the batch itself


def test_contrastive_limit_scores_are_the_metrics_limit(tokenizer, model64):
    """score_choice_variants' contrastive limits give the TruthfulQA metrics of the fp64 scores at a γ
    so large that only the slope ranks choices (repeated MC1/MC2 rows and both choice sets included)."""
    from svd_lightning.scoring import paired_label_logits, score_choice_variants
    from svd_lightning.metrics import truthfulqa_per_question
    from svd_lightning.steering import ContrastiveLimit, contrastive_log_probs

    from conftest import CHOICE_EXAMPLES

    # as in TruthfulQA, set 1 (MC2) holds set 0's (MC1) choices and more: rows shared by two sets
    examples = [ChoiceExample(ex.prompt, [*ex.choices, *ex.choices, " Maybe.", " Nobody knows."],
                              [*ex.is_true, *ex.is_true, False, True], ex.index,
                              choice_sets=[0] * len(ex.choices) + [1] * (len(ex.choices) + 2)) for ex in CHOICE_EXAMPLES[:3]]
    batch = collate_choices(examples, Tokenized(tokenizer, 64))
    got = score_choice_variants(model64, batch, {"up": ContrastiveLimit(1), "down": ContrastiveLimit(-1)})
    warm, base, y, row = paired_label_logits(model64, batch)
    table = {k: batch[k] for k in ("question_index", "choice_set", "choice_index", "is_true")}
    n = batch["input_ids"].shape[0]
    for name, sign in (("up", 1), ("down", -1)):
        assert torch.isfinite(got[name]).any() and (got[name] == float("-inf")).any()
        gamma = sign * 1e8  # e^{-γ·Δslope} vanishes for any Δslope > 1e-6; γ·r rounds to ~1e-6 in fp64
        token = contrastive_log_probs(warm.double(), base.double(), gamma).gather(-1, y[:, None]).squeeze(-1)
        ref = torch.zeros(n, dtype=torch.float64).index_add_(0, row, token)
        limit, at_gamma = truthfulqa_per_question(**table, score=got[name]), truthfulqa_per_question(**table, score=ref)
        assert torch.equal(limit["mc1"], at_gamma["mc1"]) and torch.equal(limit["mc2_paper"], at_gamma["mc2_paper"])
        # MC2: the fp32 offsets set the share of exactly tied choices
        torch.testing.assert_close(limit["mc2"], at_gamma["mc2"], rtol=0, atol=1e-5)
