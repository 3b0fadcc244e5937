"""The multiple-choice loss of choice sets, from the rows' summed log-likelihoods."""

from __future__ import annotations

import torch


def segment_logsumexp(values: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
    """log Σ exp(values) per segment id in ``[0, n)``; −∞ for empty or all −∞ segments."""
    top = torch.full((n,), float("-inf"), dtype=values.dtype, device=values.device).scatter_reduce(0, segment, values, "amax")
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    mass = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, segment, (values - safe[segment]).exp())
    return safe + mass.log()


def choice_set_nll(scores: torch.Tensor, group: torch.Tensor, true: torch.Tensor, n: int) -> torch.Tensor:
    """The multiple-choice loss ``−log Σ_{c true} softmax(scores)_c`` of each of ``n`` choice sets.

    ``scores`` are the rows' summed log-likelihoods, ``group`` each row's set id, ``true`` whether
    the row is a correct choice. NaN-free: a set with no (finite) true row gets +∞.
    """
    lse_all = segment_logsumexp(scores, group, n)
    return lse_all - segment_logsumexp(scores.masked_fill(~true, float("-inf")), group, n)
