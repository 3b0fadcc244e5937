"""Steered generation (svd_lightning.generation) against a slow reference that recomputes everything."""

import pytest
import torch

from svd_lightning.config import SteeringConfig
from svd_lightning.generation import SteeringLogitsProcessor, steered_generate
from svd_lightning.steering import steer

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
