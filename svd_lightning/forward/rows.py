"""Which distributions one forward computes, and the forward mode that decides it: handled here, once.

Both distributions are conditioned on the same real tokens: the warm-started one (adapter on, virtual
tokens included for prompt methods) and the pre-trained one (adapter off, the same weights, no second
copy). Two ways to get them (``forward_mode``):

* ``one_forward`` (LoRA): warm and base are rows of one batch -- ``[x; x]`` with peft's per-row
  ``adapter_names = [adapter]*B + ["__base__"]*B`` -- so the weights are read once per step and
  generation keeps one KV cache. Both halves always receive the same token.
* ``two_pass`` (any adapter): a second forward under ``adapter_disabled`` (generation: inside the logits
  processor, with its own KV cache).

``auto`` (default) picks ``one_forward`` wherever peft supports per-row adapters (LoRA without DoRA,
eval mode) and says which it chose, once. An encoder writes its forward once, for :class:`Rows`; which
rows it runs for is :func:`warm_and_base`'s choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from svd_lightning.config import FORWARD_MODES, ForwardMode
from svd_lightning.forward.adapter import adapter_disabled
from svd_lightning.log import say

BASE_ROWS = "__base__"  # peft's name for "no adapter" in a mixed batch
_announced: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Rows:
    """The rows one forward computes: ``warm`` (adapter on), ``base`` (run under :func:`adapter_disabled`)
    or ``paired``: ``[warm; base]``, each input row twice, with peft's per-row ``adapter_names``."""

    name: str

    @property
    def paired(self) -> bool:
        return self.name == "paired"

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        """A per-row tensor for these rows: twice over when paired."""
        return torch.cat([t, t]) if self.paired else t

    def index(self, index: torch.Tensor, n: int) -> torch.Tensor:
        """An index into ``n`` rows, for the same rows in each copy (the base copy's rows follow the warm's)."""
        return torch.cat([index, index + n]) if self.paired else index

    def forward(self, model, rows: dict[str, torch.Tensor], **options):
        """``model(**rows, **options)`` where ``rows`` holds the per-row inputs of the warm rows: paired, each
        twice and peft's ``adapter_names``. ``options`` (a cache already of these rows, ``logits_to_keep``, …)
        go as they are."""
        if self.paired:
            n = next(iter(rows.values())).shape[0]
            rows = {k: self.expand(v) for k, v in rows.items()}
            options["adapter_names"] = adapter_names(model, n)
        return model(**rows, **options)


WARM, BASE, PAIRED = Rows("warm"), Rows("base"), Rows("paired")


def adapter_names(model, n: int) -> list[str]:
    """peft's ``adapter_names`` for ``[warm rows; base rows]`` of ``n`` rows each."""
    return [model.active_adapter] * n + [BASE_ROWS] * n


def one_forward_unsupported(model) -> str | None:
    """Why warm and base rows cannot share one forward pass on ``model`` (None: they can)."""
    config = getattr(model, "active_peft_config", None)
    if config is None:
        return f"{type(model).__name__} is not a peft model"
    method = str(getattr(config, "peft_type", "")).split(".")[-1].lower()
    if method != "lora":
        return f"peft runs per-row adapters for LoRA only, not {method}"
    if getattr(config, "use_dora", False):
        return "peft has no per-row adapters for DoRA"
    if len(getattr(model, "active_adapters", [None])) != 1:
        return "several adapters are active"
    if model.training:
        return "the model is in training mode (peft refuses per-row adapters there)"
    return None


def resolve_forward_mode(model, forward_mode: ForwardMode = "auto", unsupported: str | None = None) -> str:
    """``one_forward`` or ``two_pass`` for ``model``; ``unsupported`` adds a caller's own reason.

    ``auto`` picks one_forward where it works and logs the choice once per (model type, choice);
    forcing ``one_forward`` where it cannot work is an error naming the reason.
    """
    if forward_mode not in FORWARD_MODES:
        raise ValueError(f"forward_mode must be one of {FORWARD_MODES}, got {forward_mode!r}")
    if forward_mode == "two_pass":
        return "two_pass"
    reason = one_forward_unsupported(model) or unsupported
    if forward_mode == "one_forward" and reason:
        raise ValueError(f"forward_mode='one_forward' is not possible here: {reason}; use 'auto' or 'two_pass'")
    chosen = "two_pass" if reason else "one_forward"
    key = (type(getattr(model, "active_peft_config", model)).__name__, chosen)
    if forward_mode == "auto" and key not in _announced:
        _announced.add(key)
        why = reason or "LoRA: warm and pre-trained rows in one batch"
        say(f"{chosen.replace('_', '-')} path for steering ({why})")
    return chosen


def warm_and_base(model, forward_mode: ForwardMode, encode: Callable[[Rows], torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode``'s warm and base outputs (stacked on dim 0 for paired rows): one forward of :data:`PAIRED`
    rows, or :data:`WARM` then :data:`BASE` with the adapter disabled, as ``forward_mode`` resolves."""
    if resolve_forward_mode(model, forward_mode) == "one_forward":
        warm, base = encode(PAIRED).chunk(2)
        return warm, base
    warm = encode(WARM)
    with adapter_disabled(model):
        base = encode(BASE)
    return warm, base


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # Same rule as transformers' generate, so left padding gives the same positions in both passes.
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def real_logits(logits: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Drop the virtual-token positions that prompt tuning / P-tuning prepend."""
    return logits[:, logits.shape[1] - seq_len :]
