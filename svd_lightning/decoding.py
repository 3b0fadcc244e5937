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


def _uses_virtual_tokens(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def _full_label_logits(model, ids, mask, labels) -> torch.Tensor:
    T = ids.shape[1]
    logits = _real_logits(model(input_ids=ids, attention_mask=mask).logits, T)
    return logits[:, :-1][labels[:, 1:] != IGNORE_INDEX]


class SharedPrompts:
    """A choice batch split into its distinct prompts and the continuations that follow them.

    Rows of one question repeat the same prompt; encoding it once and expanding its KV cache to
    the rows cuts the cost of multiple-choice scoring to (prompt + Σ continuations) tokens.
    """

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, pad_id: int = 0):
        lengths = mask.sum(1)
        labelled = labels != IGNORE_INDEX
        starts = labelled.int().argmax(1)  # first continuation token of each row
        right_padded = mask.bool() == (torch.arange(ids.shape[1], device=ids.device) < lengths.unsqueeze(1))
        # Sharing needs the contract's layout: real tokens first, a prompt before every continuation.
        self.usable = bool(right_padded.all()) and bool((starts > 0).all())
        groups: dict[tuple, int] = {}
        self.group = torch.tensor(
            [groups.setdefault(tuple(ids[i, : starts[i]].tolist()), len(groups)) for i in range(ids.shape[0])],
            device=ids.device,
        )
        # Groups are numbered in order of first appearance: the first row of group g is where it starts.
        first_row = torch.full((len(groups),), ids.shape[0], device=ids.device).scatter_reduce(
            0, self.group, torch.arange(ids.shape[0], device=ids.device), "amin"
        )
        p_len = starts[first_row]
        P, A = int(p_len.max()), int((lengths - starts).max())
        # Prompts left padded (their last token lines up); continuations right padded.
        cols = torch.arange(P, device=ids.device)
        src = (cols + p_len.unsqueeze(1) - P).clamp_min(0)
        self.prompt_mask = (cols >= P - p_len.unsqueeze(1)).long()
        self.prompt_ids = ids[first_row].gather(1, src).masked_fill(self.prompt_mask == 0, pad_id)
        cols = torch.arange(A, device=ids.device)
        src = (starts.unsqueeze(1) + cols).clamp_max(ids.shape[1] - 1)
        self.answer_mask = (cols < (lengths - starts).unsqueeze(1)).long()
        self.answer_ids = ids.gather(1, src).masked_fill(self.answer_mask == 0, pad_id)
        answer_labels = labels.gather(1, src).masked_fill(self.answer_mask == 0, IGNORE_INDEX)
        self.select = answer_labels != IGNORE_INDEX  # the same tokens, in the same order, as the full batch
        # Full-batch positions count from the row's first token; the answer follows its prompt.
        self.answer_positions = p_len[self.group].unsqueeze(1) + cols

    def label_logits(self, model) -> torch.Tensor:
        out = model(
            input_ids=self.prompt_ids,
            attention_mask=self.prompt_mask,
            position_ids=_positions(self.prompt_mask),
            use_cache=True,
        )
        cache = out.past_key_values
        cache.reorder_cache(self.group)  # index_select on the batch dim: one copy per row
        last = out.logits[:, -1][self.group]  # predicts each row's first continuation token
        rest = model(
            input_ids=self.answer_ids,
            attention_mask=torch.cat([self.prompt_mask[self.group], self.answer_mask], dim=1),
            position_ids=self.answer_positions,
            past_key_values=cache,
            use_cache=True,
        ).logits
        aligned = torch.cat([last.unsqueeze(1), rest[:, :-1]], dim=1)
        return aligned[self.select]


@torch.no_grad()
def paired_label_logits(
    model, batch: dict, share_prompts: bool = True, with_base: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Warm and base logits at every labelled position: one forward pass per model for the batch.

    Returns ``(warm [M, V], base [M, V], labels [M], row [M])`` where ``row`` is the batch row of
    each of the M label tokens (``labels[:, t]`` is predicted by the logits at ``t - 1``).
    ``share_prompts`` encodes each distinct prompt once and reuses its KV cache for all of its
    continuations (the same numbers up to float rounding); prompt-learning adapters, whose virtual
    tokens peft re-inserts on every call, and batches without a repeated prompt use the full pass.
    ``with_base=False`` skips the pre-trained pass (``base`` is then None).
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    target = labels[:, 1:]
    sel = target != IGNORE_INDEX
    row = sel.nonzero(as_tuple=True)[0]
    shared = None
    if share_prompts and not _uses_virtual_tokens(model):
        shared = SharedPrompts(ids, mask, labels)
        if not shared.usable or int(shared.group.max()) + 1 == ids.shape[0]:
            shared = None  # no prompt repeats: sharing saves nothing
    label_logits = shared.label_logits if shared is not None else lambda m: _full_label_logits(m, ids, mask, labels)
    warm, base = label_logits(model), None
    if with_base:
        with adapter_disabled(model):
            base = label_logits(model)
    for name, z in (("warm", warm), ("base", base)):
        if z is not None and not torch.isfinite(z).all():
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
    share_prompts: bool = True,
) -> dict[str, torch.Tensor]:
    """Summed log-probability of each row's continuation under plain (warm), base and steered models.

    Returns fp32 tensors ``[N]``: ``plain``, ``base``, ``steered`` (absent when ``mu`` is None) and
    ``num_tokens`` (divide for per-token length normalisation). Masked label tokens follow
    ``policy`` (see :func:`svd_lightning.steering.steered_log_probs`); no score is ever NaN.
    """
    warm, base, y, row = paired_label_logits(model, batch, share_prompts)
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
