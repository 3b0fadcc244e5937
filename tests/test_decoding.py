"""Steered scoring and generation against slow references that recompute everything."""

import pytest
import torch

from svd_lightning.batch import ChoiceExample, Tokenized, collate_choices
from svd_lightning.config import SteeringConfig
from svd_lightning.generation import SteeringLogitsProcessor, steered_generate
from svd_lightning.scoring import score_choices
from svd_lightning.steering import steer, steered_log_probs

from conftest import left_padded as _left_padded, perturbed_lora

PROMPTS = ["Q: What is the capital of France? A:", "Q: What happens if you eat a pomegranate?\nA:", "Yes"]


def _full_logits(model, ids, mask, base):
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    if base:
        with model.disable_adapter():
            return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
    return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]


@torch.no_grad()
def _slow_steered_greedy(model, ids, mask, mu, alpha, steps, eos):
    """Recompute both full forwards every step: no cache to get wrong."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        out = steer(_full_logits(model, ids, mask, False), _full_logits(model, ids, mask, True), mu, alpha)
        nxt = out.argmax(-1).masked_fill(done, eos)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        done |= nxt == eos
        if done.all():
            break
    return ids


@pytest.mark.parametrize("mu", [0.0, -4.0, 3.0])
def test_steered_greedy_matches_slow_reference(tokenizer, mu):
    model = perturbed_lora(dtype=torch.float64)  # fp64: cached vs recomputed forwards agree to ~1e-15
    ids, mask = _left_padded(tokenizer, PROMPTS)
    fast = steered_generate(model, ids, mask, SteeringConfig(mu=mu, alpha=0.1), max_new_tokens=12, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    slow = _slow_steered_greedy(model, ids, mask, mu, 0.1, 12, tokenizer.eos_token_id)
    assert torch.equal(fast[:, : slow.shape[1]], slow)
    if mu != 0.0:
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
        assert not torch.equal(plain, fast), "steering with mu != 0 should change some tokens on this model"


def test_steered_sampling_respects_mask_and_is_seeded(tokenizer, lora_model):
    ids, mask = _left_padded(tokenizer, PROMPTS)
    kw = dict(max_new_tokens=8, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    a = steered_generate(lora_model, ids, mask, SteeringConfig(mu=-2.0), **kw)
    torch.manual_seed(0)
    b = steered_generate(lora_model, ids, mask, SteeringConfig(mu=-2.0), **kw)
    assert torch.equal(a, b)
    # Each sampled token was kept by the confidence mask of its step (replay with the slow path).
    for t in range(ids.shape[1], a.shape[1]):
        prefix, pmask = a[:, :t], torch.cat([mask, torch.ones(a.shape[0], t - ids.shape[1], dtype=torch.long)], 1)
        with torch.no_grad():
            out = steer(_full_logits(lora_model, prefix, pmask, False), _full_logits(lora_model, prefix, pmask, True), -2.0)
        picked = out.gather(-1, a[:, t : t + 1]).squeeze(-1)
        live = ~(prefix == tokenizer.eos_token_id).any(-1) | (t == ids.shape[1])
        assert torch.isfinite(picked[live]).all()


def test_processor_mu0_keeps_warm_argmax(tokenizer, lora_model):
    ids, mask = _left_padded(tokenizer, PROMPTS)
    with torch.no_grad():
        warm = _full_logits(lora_model, ids, mask, False)
    proc = SteeringLogitsProcessor(lora_model, SteeringConfig(mu=0.0), attention_mask=mask)
    out = proc(ids, warm.clone())
    assert torch.equal(out.argmax(-1), warm.argmax(-1))
    assert torch.isfinite(out.logsumexp(-1)).all()


@pytest.mark.parametrize("policy", ["mask_generation_only", "floor", "mask"])
def test_score_choices_matches_per_row_reference(tokenizer, lora_model, policy):
    batch = _choice_batch(tokenizer)
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
    batch = _choice_batch(tokenizer)
    for policy in ("mask_generation_only", "floor", "mask"):
        got = score_choices(lora_model, batch, SteeringConfig(mu=0.0, alpha=1e-30, scoring_policy=policy))
        # fp32 sums of ~10 tokens, normalised in two orders (full log-softmax vs kept + rest): a few ulps
        torch.testing.assert_close(got["steered"], got["plain"], rtol=1e-6, atol=1e-5)


def test_adapter_off_means_base(tokenizer):
    model = perturbed_lora()
    batch = _choice_batch(tokenizer)
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


def _choice_batch(tokenizer, max_length=64):
    examples = [
        ChoiceExample("Q: What is the capital of France?\nA:", [" Paris", " Lyon is the capital", " Nice"], [True, False, False], 0),
        ChoiceExample("Q: Is the sky blue?\nA:", [" Yes", " No, it is green on most days"], [True, False], 1),
        ChoiceExample("Q: Is the sky blue?\nA:", [" Yes it is"], [True], 2),  # same prompt, another question
    ]
    return collate_choices(examples, Tokenized(tokenizer, max_length))


@pytest.mark.parametrize("share", [True, False])
def test_shared_prompt_scoring_matches_full_pass(tokenizer, share):
    """Encoding each prompt once and expanding its KV cache gives the full pass's logits (fp64)."""
    from svd_lightning.forward.encoders import SharedPrompts
    from svd_lightning.scoring import paired_label_logits

    model = perturbed_lora(dtype=torch.float64)
    batch = _choice_batch(tokenizer)
    shared = SharedPrompts(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert shared.usable and shared.prompt_ids.shape[0] == 2  # three questions, two distinct prompts
    warm, base, y, row = paired_label_logits(model, batch, share_prompts=share)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    sel = labels[:, 1:] != -100
    ref_warm = model(input_ids=ids, attention_mask=mask).logits[:, :-1][sel]
    with model.disable_adapter():
        ref_base = model(input_ids=ids, attention_mask=mask).logits[:, :-1][sel]
    assert torch.equal(y, labels[:, 1:][sel]) and torch.equal(row, sel.nonzero()[:, 0])
    torch.testing.assert_close(warm, ref_warm, rtol=0, atol=1e-10)
    torch.testing.assert_close(base, ref_base, rtol=0, atol=1e-10)
    assert not torch.allclose(warm, base)
    warm_only, no_base, _, _ = paired_label_logits(model, batch, share_prompts=share, with_base=False)
    assert no_base is None
    torch.testing.assert_close(warm_only, warm, rtol=0, atol=1e-10)


def test_shared_prompts_fall_back_for_left_padding_and_virtual_tokens(tokenizer):
    from peft import PromptTuningConfig, get_peft_model

    from svd_lightning.forward.encoders import SharedPrompts

    from svd_lightning.scoring import paired_label_logits
    from svd_lightning.tiny import tiny_model_and_tokenizer

    batch = _choice_batch(tokenizer)
    flipped = {k: v.flip(1) if v.dim() == 2 else v for k, v in batch.items()}  # padding moved to the left
    assert not SharedPrompts(flipped["input_ids"], flipped["attention_mask"], flipped["labels"]).usable
    model = get_peft_model(tiny_model_and_tokenizer(0)[0], PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    a = paired_label_logits(model, batch, share_prompts=True)
    b = paired_label_logits(model, batch, share_prompts=False)
    for x, z in zip(a, b):
        assert torch.equal(x, z)


# -- the split's shared prefix (a few-shot primer encoded once per weights) ------------------------------

PRIMER = "Q: What is the capital of France?\nA: The capital of France is Paris.\n\nQ: Is water wet?\nA: Yes.\n\n"


def _primed_batches(tokenizer, questions_per_batch, collate=collate_choices, primer=PRIMER):
    from conftest import CHOICE_EXAMPLES

    examples = [ChoiceExample(primer + ex.prompt, ex.choices, ex.is_true, ex.index, choice_sets=ex.choice_sets)
                for ex in CHOICE_EXAMPLES]
    tok = Tokenized(tokenizer, 128)
    return [collate(examples[i : i + questions_per_batch], tok) for i in range(0, len(examples), questions_per_batch)]


def _full_pass(model, batch):
    from svd_lightning.forward.adapter import adapter_disabled
    from svd_lightning.forward.encoders import FullRows
    from svd_lightning.forward.rows import WARM

    rows = FullRows(batch["input_ids"], batch["attention_mask"], batch["labels"])
    warm = rows.label_logits(model, WARM)
    with adapter_disabled(model):
        base = rows.label_logits(model, WARM)
    return warm, base


@pytest.mark.parametrize("layout", ["tree", "rows"])
@pytest.mark.parametrize("mode", ["one_forward", "two_pass"])
@pytest.mark.parametrize("questions_per_batch", [1, 2])
def test_the_split_prefix_is_encoded_once_and_gives_the_full_pass_logits(tokenizer, model64, capsys, monkeypatch,
                                                                         mode, questions_per_batch, layout):
    """Batches of one primer: from the second batch on, the primer's keys and values come from the cache;
    every batch's warm and base logits equal a full pass to 1e-10 (fp64), padded rows included. Both
    layouts: a tree per prompt (sdpa / eager; two trees in one forward with 2 questions a batch) and one row per choice (other attention kernels)."""
    from svd_lightning.forward import encoders
    from svd_lightning.forward.prefix import PrefixCache
    from svd_lightning.scoring import paired_label_logits

    if layout == "rows":
        monkeypatch.setattr(encoders, "custom_masks", lambda model: None)
    prefixes = PrefixCache()  # said once per cache
    batches = _primed_batches(tokenizer, questions_per_batch)
    primer = tokenizer(PRIMER, add_special_tokens=False)["input_ids"]
    for i, batch in enumerate(batches):
        warm, base, _, _ = paired_label_logits(model64, batch, forward_mode=mode, prefixes=prefixes)
        ref_warm, ref_base = _full_pass(model64, batch)
        torch.testing.assert_close(warm, ref_warm, rtol=0, atol=1e-10)
        torch.testing.assert_close(base, ref_base, rtol=0, atol=1e-10)
        entries = list(prefixes.entries.values())
        if i >= 1:  # learnt from the first two batches: the primer (and whatever else their prompts share)
            assert len(entries) == (1 if mode == "one_forward" else 2)  # paired rows, or warm and base
            assert all(len(e) >= len(primer) - 1 and e.nbytes > 0 for e in entries)
    assert "shared prefix" in capsys.readouterr().err


def test_the_split_prefix_is_dropped_when_the_weights_change(tokenizer):
    from svd_lightning.forward.prefix import PrefixCache
    from svd_lightning.scoring import paired_label_logits

    model64 = perturbed_lora(dtype=torch.float64)  # its own: the test writes into the weights
    first, second = _primed_batches(tokenizer, 1)[:2]
    prefixes = PrefixCache()
    paired_label_logits(model64, first, prefixes=prefixes)
    paired_label_logits(model64, second, prefixes=prefixes)
    stale = list(prefixes.entries.values())  # kept alive: ids of freed objects are reused
    assert stale
    with torch.no_grad():  # an optimizer step: the adapter's weights change in place
        next(p for n, p in model64.named_parameters() if "lora_B" in n).mul_(1.5)
    warm, base, _, _ = paired_label_logits(model64, second, prefixes=prefixes)
    assert not {id(e) for e in stale} & {id(e) for e in prefixes.entries.values()}  # not reused
    ref_warm, ref_base = _full_pass(model64, second)
    torch.testing.assert_close(warm, ref_warm, rtol=0, atol=1e-10)
    torch.testing.assert_close(base, ref_base, rtol=0, atol=1e-10)


def test_a_prefix_cache_holds_one_models_prefix_and_no_cache_holds_nothing(tokenizer, model64, monkeypatch):
    """The cache is its owner's object: handed another model it starts over (nothing of the first model's is
    reused, and it keeps the first model alive no longer); a call given no cache encodes the whole prompt."""
    import gc
    import weakref

    from svd_lightning.forward import prefix
    from svd_lightning.forward.prefix import PrefixCache
    from svd_lightning.scoring import paired_label_logits

    original = prefix.SplitPrefix.__init__
    batches = _primed_batches(tokenizer, 1)[:2]
    prefixes, other = PrefixCache(), perturbed_lora(dtype=torch.float64)
    for batch in batches:
        paired_label_logits(other, batch, prefixes=prefixes)
    first = list(prefixes.entries.values())
    assert first
    for batch in batches:
        warm, base, _, _ = paired_label_logits(model64, batch, prefixes=prefixes)
        torch.testing.assert_close(warm, _full_pass(model64, batch)[0], rtol=0, atol=1e-10)
    assert prefixes.entries and not {id(e) for e in first} & {id(e) for e in prefixes.entries.values()}
    gone = weakref.ref(other)
    del other, first
    gc.collect()
    assert gone() is None

    made = []
    monkeypatch.setattr(prefix.SplitPrefix, "__init__", lambda self, *a: made.append(a) or original(self, *a))
    for batch in batches * 2:
        paired_label_logits(model64, batch)
    assert made == []  # without a cache, no prefix is encoded on its own: nothing is kept between calls
    for batch in batches:
        paired_label_logits(model64, batch, prefixes=PrefixCache())
    assert made == []  # a fresh cache learns the prefix from two batches before it encodes it


def test_teacher_forced_batches_share_the_split_prefix_and_prompts_without_one_cache_nothing(tokenizer, model64):
    from svd_lightning.batch import collate_lm
    from svd_lightning.forward.prefix import PrefixCache
    from svd_lightning.scoring import paired_label_logits

    prefixes = PrefixCache()
    for batch in _primed_batches(tokenizer, 2, collate=collate_lm):  # CommonPrefix batches
        warm, base, _, _ = paired_label_logits(model64, batch, prefixes=prefixes)
        ref_warm, ref_base = _full_pass(model64, batch)
        torch.testing.assert_close(warm, ref_warm, rtol=0, atol=1e-10)
        torch.testing.assert_close(base, ref_base, rtol=0, atol=1e-10)
    assert prefixes.entries
    prefixes = PrefixCache()
    for batch in _primed_batches(tokenizer, 1, primer=""):  # zero-shot prompts share 2 tokens ("Q:")
        warm, _, _, _ = paired_label_logits(model64, batch, prefixes=prefixes)
        torch.testing.assert_close(warm, _full_pass(model64, batch)[0], rtol=0, atol=1e-10)
    assert not prefixes.entries


# -- repeated rows (TruthfulQA's MC1 choices recur in MC2) are encoded and scored once ----------------------

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
    config = SteeringConfig(mu=-1.5, gamma=2.0, alpha=0.2)
    once = score_choices(model64, batch, config)
    monkeypatch.setattr(scoring, "distinct_rows", lambda b: (b, torch.arange(b["input_ids"].shape[0])))
    every = score_choices(model64, batch, config)  # each row encoded and scored on its own
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
