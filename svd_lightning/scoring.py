"""Teacher-forced scoring: the warm, base and steered log-probabilities of each row's continuation, and
the warm and base logits behind them (for lm-eval's requests and for calibration)."""

from __future__ import annotations

from typing import Mapping

import torch

from svd_lightning.batch import IGNORE_INDEX
from svd_lightning.config import ForwardMode, SteeringConfig
from svd_lightning.forward.adapter import leaves_no_hooks
from svd_lightning.forward.encoders import distinct_rows, encoder_for
from svd_lightning.forward.prefix import PrefixCache, cached_prefix, common_prefix
from svd_lightning.forward.rows import WARM, Rows, real_logits, warm_and_base
from svd_lightning.steering import ContrastiveLimit, PairedLabels, limit_choice_scores, log_probs

# Positions per PairedLabels in the calibration pass and in scoring: their [chunk, V] tensors stay in
# cache (measured on CPU: the log-softmax pair costs 18x less per position at 64 positions than at 2400).
POSITION_CHUNK = 64


@torch.no_grad()
@leaves_no_hooks
def paired_logits(model, input_ids: torch.Tensor, forward_mode: ForwardMode = "auto", skip: int = 0,
                  prefixes: PrefixCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Warm and base logits ``[B, T', V]`` at the positions of right-padded (or unpadded) ``input_ids``.

    ``skip``: the caller needs no logits before position ``skip``. Where ``prefixes`` holds a cached
    prefix covering the rows' first L ≤ ``skip`` tokens, those are not encoded again and the result
    starts at position L (``T' = T − L``); otherwise ``T' = T``.
    """
    n, T = input_ids.shape

    def encode(rows: Rows) -> torch.Tensor:
        prefix = cached_prefix(prefixes, model, common_prefix(input_ids, torch.ones_like(input_ids), skip), rows, T)
        if prefix is None:
            return real_logits(rows.forward(model, {"input_ids": input_ids}).logits, T)
        L = len(prefix)
        return rows.forward(model, {"input_ids": input_ids[:, L:], "attention_mask": torch.ones_like(input_ids),
                                    "position_ids": torch.arange(L, T, device=input_ids.device).expand(n, -1)},
                            past_key_values=prefix.cache(n, input_ids.device), use_cache=True).logits

    warm, base = warm_and_base(model, forward_mode, encode)
    if warm.shape[1] != base.shape[1]:  # the base pass found no cached prefix where the warm one did
        width = min(warm.shape[1], base.shape[1])
        warm, base = warm[:, -width:], base[:, -width:]
    return warm, base


@torch.no_grad()
@leaves_no_hooks
def paired_label_logits(model, batch: dict, share_prompts: bool = True, with_base: bool = True,
                        forward_mode: ForwardMode = "auto", prefixes: PrefixCache | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Warm and base logits at every labelled position of the batch (``forward_mode``: see
    :mod:`svd_lightning.forward.rows`).

    Returns ``(warm [M, V], base [M, V], labels [M], row [M])`` where ``row`` is the batch row of
    each of the M label tokens (``labels[:, t]`` is predicted by the logits at ``t - 1``).
    ``share_prompts`` encodes each distinct prompt once and reuses its KV cache for all of its
    continuations, or, for rows with different prompts after one shared primer, the primer once
    (:func:`~svd_lightning.forward.encoders.encoder_for`) -- the same numbers up to float rounding;
    ``prefixes`` (the owner's :class:`PrefixCache`) keeps the split's primer across batches.
    ``with_base=False`` skips the pre-trained pass (``base`` is then None).
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    vocabulary = model.get_input_embeddings().num_embeddings
    # An IndexError deep in the embedding otherwise. One reduction per batch, where a batch of any source
    # enters; the finiteness check below waits for the device anyway.
    if int(ids.max()) >= vocabulary:
        raise ValueError(f"token id {int(ids.max())} is outside the model's vocabulary ({vocabulary} ids): the batch was "
                         "tokenized with another tokenizer than the model's")
    target = labels[:, 1:]
    sel = target != IGNORE_INDEX
    row = sel.nonzero(as_tuple=True)[0]
    encoder = encoder_for(model, ids, mask, labels, share_prompts)
    if with_base:
        warm, base = warm_and_base(model, forward_mode, lambda rows: encoder.label_logits(model, rows, prefixes))
    else:
        warm, base = encoder.label_logits(model, WARM, prefixes), None
    for name, z in (("warm", warm), ("base", base)):
        if z is not None and not torch.isfinite(z).all():
            raise FloatingPointError(f"non-finite {name} logits in the forward pass (check dtype/precision)")
    return warm, base, target[sel], row


def _per_row(values: torch.Tensor, row: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, row, values)


@torch.no_grad()
def score_choices(model, batch: dict, config: SteeringConfig = SteeringConfig(), *, gamma: float | None = None,
                  forward_mode: ForwardMode = "auto", share_prompts: bool = True,
                  prefixes: PrefixCache | None = None) -> dict[str, torch.Tensor]:
    """Summed log-probability of each row's continuation under the plain (warm), base and steered models.

    Returns fp32 tensors ``[N]``: ``plain``, ``base``, ``steered`` (when ``config.mu`` is set),
    ``contrastive`` (when ``gamma`` is given: the baseline ``z_φ + γ(z_φ − z_θ)``, see
    :meth:`SteeringConfig.contrastive`) and ``num_tokens`` (divide for per-token length
    normalisation). Masked label tokens follow ``config.scoring_policy`` (see
    :func:`svd_lightning.steering.steered_log_probs`); no score is ever NaN. One forward serves all
    (``forward_mode``: see :mod:`svd_lightning.forward.rows`); ``prefixes``: the owner's
    :class:`PrefixCache`, if it keeps one.
    """
    variants = {"steered": config} if config.mu is not None else {}
    if gamma is not None:
        variants["contrastive"] = config.contrastive(gamma)
    return score_choice_variants(model, batch, variants, share_prompts=share_prompts, forward_mode=forward_mode,
                                 prefixes=prefixes)


@torch.no_grad()
def score_choice_variants(model, batch: dict, variants: Mapping[str, SteeringConfig | ContrastiveLimit], *,
                          share_prompts: bool = True, with_base: bool = True, forward_mode: ForwardMode = "auto",
                          prefixes: PrefixCache | None = None) -> dict[str, torch.Tensor]:
    """:func:`score_choices` under many configs from one forward: ``{name: [N]}`` per entry of
    ``variants`` (each a :class:`SteeringConfig` with its μ, or a :class:`ContrastiveLimit`, whose
    scores are −∞ outside each choice set's top: see :func:`limit_choice_scores`), plus ``plain``,
    ``base`` and ``num_tokens``.

    The warm and base logits are log-softmaxed once (:class:`svd_lightning.steering.PairedLabels`):
    a masked config costs a top-k over its kept tokens, a policy-``none`` one a softmax per position.
    ``with_base=False`` scores the warm model alone (``plain`` and ``num_tokens``; no variants).
    """
    if not with_base and variants:
        raise ValueError("steered variants need the pre-trained logits (with_base=True)")
    every_row = batch
    batch, same_as = distinct_rows(batch)
    warm, base, y, row = paired_label_logits(model, batch, share_prompts, with_base=with_base, forward_mode=forward_mode,
                                            prefixes=prefixes)
    n = batch["input_ids"].shape[0]
    per_row = lambda t: _per_row(t.float(), row, n)  # noqa: E731
    out = {"num_tokens": _per_row(torch.ones_like(y, dtype=torch.float32), row, n)}
    if not with_base:
        out["plain"] = per_row(log_probs(warm).gather(-1, y.unsqueeze(-1)).squeeze(-1))
        return {k: v[same_as] for k, v in out.items()}
    limits = {name: v for name, v in variants.items() if isinstance(v, ContrastiveLimit)}
    sums = {name: torch.zeros(n, dtype=torch.float32, device=y.device) for name in ("plain", "base", *variants)
            if name not in limits}
    # a limit's slope and offset, summed in fp64 so that exact-zero slopes stay exact ties
    slopes = {name: torch.zeros(n, dtype=torch.float64, device=y.device) for name in limits}
    offsets = {name: torch.zeros(n, dtype=torch.float64, device=y.device) for name in limits}
    for start in range(0, y.numel(), POSITION_CHUNK):  # [chunk, V] tensors stay in cache (measured on CPU)
        part = slice(start, start + POSITION_CHUNK)
        paired, rows = PairedLabels(warm[part], base[part], y[part]), row[part]
        sums["plain"].index_add_(0, rows, paired.plain().float())
        sums["base"].index_add_(0, rows, paired.base().float())
        for name, config in variants.items():
            if name in limits:
                slope, offset = paired.limit_terms(config)
                slopes[name].index_add_(0, rows, slope.double())
                offsets[name].index_add_(0, rows, offset.double())
            else:
                sums[name].index_add_(0, rows, paired.log_probs(config).float())
    out.update(sums)
    out = {k: v[same_as] for k, v in out.items()}
    if limits:  # per choice set of every row (a distinct row can sit in two sets); a batch holds whole questions
        _, group = torch.unique(torch.stack([every_row["question_index"], every_row["choice_set"]]), dim=1,
                                return_inverse=True)
        for name in limits:
            out[name] = limit_choice_scores(slopes[name][same_as], offsets[name][same_as], group.to(y.device)).float()
    bad = [k for k, v in out.items() if torch.isnan(v).any()]
    if bad:
        settings = "; ".join(f"{k}: mu={variants[k].mu!r}, alpha={variants[k].alpha!r}" for k in bad if k in variants)
        raise FloatingPointError(f"NaN in the {'/'.join(bad)} multiple-choice scores ({settings}): a strength this "
                                 "large overflows the steered logits")
    return out
