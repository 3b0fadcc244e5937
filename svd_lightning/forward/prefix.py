"""The prefix every prompt of a split starts with (a few-shot primer), encoded once per weights.

:class:`PrefixCache` is an object its owner holds for one model and hands to every scoring call on it
(``SteeringLM``, ``SteeredModel`` and the lm-eval backend each hold one); a call given none caches nothing.
Layouts that hand transformers a KV cache or a custom mask are exact only where no sliding attention
window is shorter than the rows (:func:`shares_exactly`).
"""

from __future__ import annotations

import weakref

import torch
from transformers import DynamicCache

from svd_lightning.forward.adapter import tuner_layers, uses_virtual_tokens
from svd_lightning.forward.rows import Rows
from svd_lightning.log import say
from svd_lightning.sharding import local_tensor

MIN_PREFIX = 16  # tokens: a shorter common prefix is not worth a cache of its own


class SplitPrefix:
    """The key/value cache of a prefix, encoded for the warm, base or paired rows.

    Reused by every batch whose rows start with it: calibration, choice passes, validation, test and
    predict scoring. Exact: the rows attend to the same keys and values a full pass computes.
    """

    def __init__(self, model, tokens: tuple[int, ...], rows: Rows):
        self.tokens, self.rows = tokens, rows
        ids = torch.tensor([tokens], device=next(model.parameters()).device)
        out = rows.forward(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, use_cache=True,
                           logits_to_keep=1)
        self.layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self.last = out.logits[:, -1]  # [R, V]: predicts the first token after the prefix
        self.nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)

    def __len__(self) -> int:
        return len(self.tokens)

    def cache(self, n: int, device) -> DynamicCache:
        """A fresh cache holding the prefix for ``n`` rows of each copy of these rows."""
        index = self.rows.index(torch.zeros(n, dtype=torch.long, device=device), 1)
        return DynamicCache(ddp_cache_data=[(k.index_select(0, index), v.index_select(0, index)) for k, v in self.layers])


class PrefixCache:
    """The split's prefix for one model, learnt from the batches scored through this cache.

    The common part of two consecutive batches' leading tokens (≥ :data:`MIN_PREFIX`) is encoded once
    per rows kind (warm, base, paired) and adapter state, and kept until the weights change (an
    optimizer step, a load, autocast switched), so a split of one primer pays for it once.
    """

    def __init__(self):
        self._model: weakref.ref | None = None
        self.announced = False
        self._reset(None)

    def _reset(self, model) -> None:
        self._model = weakref.ref(model) if model is not None else None
        self.weights: tuple | None = None
        self.entries: dict[tuple, SplitPrefix] = {}  # by (rows, adapter state)
        self.candidates: dict[tuple, tuple[int, ...]] = {}
        # One adapter layer tells whether the adapter is on (disable_adapter) and which one is active.
        self.tuner = next(iter(tuner_layers(model)), None) if model is not None else None

    def __getstate__(self) -> dict:
        return {}  # a cache: pickled (ddp_spawn, a saved module) it starts empty

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def _bind(self, model) -> None:
        """Another model than the last: nothing cached holds (no reference kept that would keep it alive)."""
        if self._model is None or self._model() is not model:
            self._reset(model)

    def _weights_state(self, model) -> tuple:
        device = next(model.parameters()).device.type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) if device in ("cpu", "cuda") else ()
        return autocast, tuple((t.data_ptr(), t._version) for t in map(local_tensor, model.parameters()))

    def _key(self, rows: Rows) -> tuple:
        adapter = (self.tuner.disable_adapters, tuple(self.tuner.active_adapters)) if self.tuner is not None else ()
        return rows.name, adapter

    def lookup(self, model, tokens: torch.Tensor, rows: Rows, length: int) -> SplitPrefix | None:
        """The cached prefix that ``tokens`` (a batch's common leading tokens, of rows ``length`` tokens
        long) start with, if any. Training mode and prompt-learning adapters never cache."""
        if model.training or uses_virtual_tokens(model) or len(tokens) < MIN_PREFIX or not shares_exactly(model, length):
            return None
        self._bind(model)
        weights = self._weights_state(model)
        if self.weights != weights:  # new weights: nothing cached holds
            self.weights, self.entries = weights, {}
        key, tokens = self._key(rows), tuple(tokens.tolist())  # host sync: once per batch, a prefix's few tokens
        entry = self.entries.get(key)
        if entry is not None and tokens[: len(entry)] == entry.tokens:
            return entry
        candidate = self.candidates.get(key, entry.tokens if entry is not None else None)
        if candidate is None:
            self.candidates[key] = tokens
            return None
        common = next((i for i, (a, b) in enumerate(zip(candidate, tokens)) if a != b), min(len(candidate), len(tokens)))
        self.candidates[key] = tokens[:common] if common >= MIN_PREFIX else tokens
        if common < MIN_PREFIX:
            return None
        entry = self.entries[key] = SplitPrefix(model, tokens[:common], rows)
        if not self.announced:
            self.announced = True
            say(f"the prompts' shared prefix ({common} tokens) is encoded once per weights and reused "
                f"({entry.nbytes / 2**20:.1f} MB cached per distribution set)")
        return entry


def cached_prefix(prefixes: PrefixCache | None, model, tokens: torch.Tensor, rows: Rows, length: int
                  ) -> SplitPrefix | None:
    """:meth:`PrefixCache.lookup`, or None without a cache."""
    return prefixes.lookup(model, tokens, rows, length) if prefixes is not None else None


def common_prefix(ids: torch.Tensor, mask: torch.Tensor, limit: int) -> torch.Tensor:
    """The leading tokens every row of a right-padded batch shares, at most ``limit`` of them."""
    same = ((ids == ids[:1]) & mask.bool()).all(0).int()
    return ids[0, : min(int(same.cumprod(0).sum()), limit)]


def attention_window(model) -> int | None:
    """The shortest sliding attention window a layer of ``model`` applies (Mistral, Gemma 2/3, Qwen2 with
    ``use_sliding_window``, Phi-3); None when every layer attends to the whole sequence."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None and not any("sliding" in t for t in types):
        return None
    return int(window)


_announced_window: set[int] = set()


def shares_exactly(model, length: int) -> bool:
    """Whether the shared-work layouts (a cached prefix, shared prompts, trees) are exact for rows of
    ``length`` tokens. They hand transformers a KV cache or a custom 4D mask, and a custom mask is used as
    given: no sliding window is applied to it, and a sliding layer's cache keeps only its last window. So
    a model whose window is shorter than the rows is scored as full rows (exact), said once."""
    window = attention_window(model)
    if window is None or length < window:
        return True
    if id(model) not in _announced_window:
        _announced_window.add(id(model))
        say(f"{type(getattr(model, 'base_model', model)).__name__}: a sliding attention window of {window} tokens, "
            f"shorter than these rows ({length} tokens): they are scored as full rows, one forward each (exact; "
            "the shared-prefix and shared-prompt layouts would not apply the window)")
    return False
