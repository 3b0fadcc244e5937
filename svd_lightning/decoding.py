"""Steered generation and steered multiple-choice scoring for a peft model.

Both distributions are conditioned on the same real tokens: the warm-started one (adapter on,
virtual tokens included for prompt methods) and the pre-trained one (``model.disable_adapter()``,
the same weights, no second copy). Prompt tuning / P-tuning prepend virtual positions to the
logits; they are sliced off before warm and base logits are compared.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from svd_lightning.batch import IGNORE_INDEX
from svd_lightning.steering import (
    ScoringPolicy,
    log_probs,
    masked_delta,
    steered_log_probs,
    steering_vector,
)


@contextlib.contextmanager
def adapter_disabled(model) -> Iterator[None]:
    """The pre-trained model from the same weights: peft's ``disable_adapter`` (no copy)."""
    if not hasattr(model, "disable_adapter"):
        raise TypeError(f"{type(model).__name__} has no adapter to disable; wrap it with peft first")
    with model.disable_adapter():
        yield


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # Same rule as transformers' generate, so left padding gives the same positions in both passes.
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _real_logits(logits: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Drop the virtual-token positions that prompt tuning / P-tuning prepend."""
    return logits[:, logits.shape[1] - seq_len :]


# --------------------------------------------------------------------------------------------------
# Teacher-forced scoring.


@torch.no_grad()
def paired_label_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Warm and base logits at every labelled position: one forward pass per model for the batch.

    Returns ``(warm [M, V], base [M, V], labels [M], row [M])`` where ``row`` is the batch row of
    each of the M label tokens (``labels[:, t]`` is predicted by the logits at ``t - 1``).
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    T = ids.shape[1]
    warm = _real_logits(model(input_ids=ids, attention_mask=mask).logits, T)
    with adapter_disabled(model):
        base = _real_logits(model(input_ids=ids, attention_mask=mask).logits, T)
    target = labels[:, 1:]
    sel = target != IGNORE_INDEX
    row = sel.nonzero(as_tuple=True)[0]
    warm, base = warm[:, :-1][sel], base[:, :-1][sel]
    for name, z in (("warm", warm), ("base", base)):
        if not torch.isfinite(z).all():
            raise FloatingPointError(f"non-finite {name} logits in the forward pass (check dtype/precision)")
    return warm, base, target[sel], row


def _per_row(values: torch.Tensor, row: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, row, values)


@torch.no_grad()
def score_choices(
    model,
    batch: dict,
    mu: float | None = None,
    alpha: float = 0.1,
    policy: ScoringPolicy = "mask_generation_only",
    floor: float = -20.0,
) -> dict[str, torch.Tensor]:
    """Summed log-probability of each row's continuation under plain (warm), base and steered models.

    Returns fp32 tensors ``[N]``: ``plain``, ``base``, ``steered`` (absent when ``mu`` is None) and
    ``num_tokens`` (divide for per-token length normalisation). Masked label tokens follow
    ``policy`` (see :func:`svd_lightning.steering.steered_log_probs`); no score is ever NaN.
    """
    warm, base, y, row = paired_label_logits(model, batch)
    n = batch["input_ids"].shape[0]
    gather = lambda lp: lp.gather(-1, y.unsqueeze(-1)).squeeze(-1).float()  # noqa: E731
    out = {
        "plain": _per_row(gather(log_probs(warm)), row, n),
        "base": _per_row(gather(log_probs(base)), row, n),
        "num_tokens": _per_row(torch.ones_like(y, dtype=torch.float32), row, n),
    }
    if mu is not None:
        out["steered"] = _per_row(gather(steered_log_probs(warm, base, mu, alpha, policy, floor)), row, n)
    if any(torch.isnan(v).any() for v in out.values()):
        raise FloatingPointError("NaN in multiple-choice scores")
    return out


# --------------------------------------------------------------------------------------------------
# Generation.


class SteeringLogitsProcessor(LogitsProcessor):
    """Turns the warm model's next-token scores into SVDecode's steered log-probabilities.

    Runs the pre-trained pass (adapter disabled) alongside ``generate`` with its own KV cache: the
    first call encodes the prompt, later calls feed only the newest token. Rows reordered by beam
    search are matched to their parent by prefix, and the base cache is reordered the same way.
    Returns normalised log-probs (−∞ on masked tokens), which greedy, sampling warpers and beam
    search all accept. ``mu=0`` keeps the warm model's ranking among kept tokens (min-p style).
    """

    def __init__(self, model, mu: float, alpha: float = 0.1, attention_mask: torch.Tensor | None = None, mask: bool = True):
        self.model, self.mu, self.alpha, self.mask = model, float(mu), alpha, mask
        self.prompt_mask = attention_mask
        self.cache = None
        self.seen: torch.Tensor | None = None  # the ids whose base pass is in the cache
        self.attn: torch.Tensor | None = None

    @torch.no_grad()
    def base_next_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.seen is None:
            mask = torch.ones_like(input_ids) if self.prompt_mask is None else self.prompt_mask.to(input_ids.device)
            if mask.shape[0] != input_ids.shape[0]:  # generate expanded rows for beams / num_return_sequences
                mask = mask.repeat_interleave(input_ids.shape[0] // mask.shape[0], dim=0)
            new_ids, self.attn = input_ids, mask
        else:
            self._follow_reordering(input_ids)
            new_ids = input_ids[:, -1:]
            self.attn = torch.cat([self.attn, self.attn.new_ones(self.attn.shape[0], 1)], dim=-1)
        positions = _positions(self.attn)[:, -new_ids.shape[1] :]
        with adapter_disabled(self.model):
            out = self.model(
                input_ids=new_ids,
                attention_mask=self.attn,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
            )
        self.cache, self.seen = out.past_key_values, input_ids
        return out.logits[:, -1].float()

    def _follow_reordering(self, input_ids: torch.Tensor) -> None:
        prefix = input_ids[:, :-1]
        if torch.equal(prefix, self.seen):
            return
        # Beam search reordered rows: each row continues the previous row with the same prefix.
        match = (prefix.unsqueeze(1) == self.seen.unsqueeze(0)).all(-1)  # [new, old]
        if not match.any(-1).all():
            raise RuntimeError("steered generation lost track of a beam (a row with an unseen prefix)")
        parent = match.float().argmax(-1)
        self.cache.reorder_cache(parent)
        self.attn = self.attn[parent]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        base = self.base_next_logits(input_ids)
        warm = scores.float()
        delta, keep = steering_vector(warm, base, self.alpha)
        if not self.mask:
            keep = torch.ones_like(keep)
        steered = (warm + self.mu * masked_delta(delta, keep)).masked_fill(~keep, float("-inf"))
        return torch.log_softmax(steered, dim=-1)


def steered_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, mu: float, alpha: float = 0.1, mask: bool = True, **generate_kwargs) -> torch.Tensor:
    """``model.generate`` with SVDecode; all of transformers' decoding options apply on top."""
    processor = SteeringLogitsProcessor(model, mu, alpha, attention_mask=attention_mask, mask=mask)
    extra = generate_kwargs.pop("logits_processor", None) or []
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        logits_processor=LogitsProcessorList([processor, *extra]),
        **generate_kwargs,
    )
