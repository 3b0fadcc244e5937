"""The model-side forward (svd_lightning.forward): the shared-prompt and common-prefix encoders and the split's
prefix cache give the full pass's logits, and the cache is its owner's object."""

import pytest
import torch

from svd_lightning.batch import ChoiceExample, Tokenized, collate_choices

from conftest import perturbed_lora, prompt_sharing_batch


PROMPTS = ["Q: What is the capital of France? A:", "Q: What happens if you eat a pomegranate?\nA:", "Yes"]


@pytest.mark.parametrize("share", [True, False])
def test_shared_prompt_scoring_matches_full_pass(tokenizer, share):
    """Encoding each prompt once and expanding its KV cache gives the full pass's logits (fp64)."""
    from svd_lightning.forward.encoders import SharedPrompts
    from svd_lightning.scoring import paired_label_logits

    model = perturbed_lora(dtype=torch.float64)
    batch = prompt_sharing_batch(tokenizer)
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

    batch = prompt_sharing_batch(tokenizer)
    flipped = {k: v.flip(1) if v.dim() == 2 else v for k, v in batch.items()}  # padding moved to the left
    assert not SharedPrompts(flipped["input_ids"], flipped["attention_mask"], flipped["labels"]).usable
    model = get_peft_model(tiny_model_and_tokenizer(0)[0], PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    a = paired_label_logits(model, batch, share_prompts=True)
    b = paired_label_logits(model, batch, share_prompts=False)
    for x, z in zip(a, b):
        assert torch.equal(x, z)


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


def test_a_prefix_cache_pickles_and_copies_empty(tokenizer, model64):
    """The module that owns a cache is pickled by ddp_spawn and copied by users: the cache starts over then."""
    import copy
    import pickle

    from svd_lightning.forward.prefix import PrefixCache
    from svd_lightning.scoring import paired_label_logits

    prefixes = PrefixCache()
    for batch in _primed_batches(tokenizer, 1)[:2]:
        paired_label_logits(model64, batch, prefixes=prefixes)
    assert prefixes.entries
    for other in (pickle.loads(pickle.dumps(prefixes)), copy.deepcopy(prefixes)):
        assert other.entries == {} and other.candidates == {} and other._model is None
