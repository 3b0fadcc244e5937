"""Steered generation and steered multiple-choice scoring for a peft model.

Both distributions are conditioned on the same real tokens: the warm-started one (adapter on,
virtual tokens included for prompt methods) and the pre-trained one (adapter off, the same weights,
no second copy). Two ways to get them (``forward_mode``):

* ``one_forward`` (LoRA): warm and base are rows of one batch -- ``[x; x]`` with peft's per-row
  ``adapter_names = [adapter]*B + ["__base__"]*B`` -- so the weights are read once per step and
  generation keeps one KV cache. Both halves always receive the same token.
* ``two_pass`` (any adapter): a second forward under ``model.disable_adapter()`` (generation: inside
  the logits processor, with its own KV cache).

``auto`` (default) picks ``one_forward`` wherever peft supports per-row adapters (LoRA without DoRA,
eval mode) and says which it chose, once. Prompt tuning / P-tuning prepend virtual positions to the
logits; they are sliced off before warm and base logits are compared.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import weakref
from typing import Iterator, Mapping

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList
from transformers.generation import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from svd_lightning.batch import IGNORE_INDEX
from svd_lightning.config import FORWARD_MODES, ConfigError, ForwardMode, SteeringConfig
from svd_lightning.log import say
from svd_lightning.sharding import is_sharded, local_tensor, lockstep
from svd_lightning.steering import (
    POSITION_CHUNK,
    ContrastiveLimit,
    PairedLabels,
    limit_choice_scores,
    log_probs,
    masked_delta,
    steering_vector,
)


def _tuner_layers(model) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapter_disabled(model) -> Iterator[None]:
    """The pre-trained model from the same weights: peft's ``disable_adapter`` (no copy); on a model whose
    adapter layers peft injected but that is not the ``PeftModel`` itself (what ``generate`` hands a
    ``custom_generate``), those layers switched off and back."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
        return
    layers = _tuner_layers(model)
    if not layers:
        raise TypeError(f"{type(model).__name__} has no adapter to disable; wrap it with peft first")
    was = [layer.disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer, disabled in zip(layers, was):
            layer.enable_adapters(not disabled)


def adapter_fingerprint(model) -> str:
    """SHA-256 of the adapter weights injected in ``model`` (in module order): equal for two models that
    carry the same adapter, whether wrapped by ``PeftModel`` or not."""
    h = hashlib.sha256()
    for layer in _tuner_layers(model):
        for name, p in layer.named_parameters():
            if not name.startswith("base_layer."):  # the adapter's own weights, not the wrapped layer's
                h.update(name.encode())
                h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def leaves_no_hooks(fn):
    """On an error, remove the forward hooks the call left on the model's modules.

    peft registers per-row ``adapter_names`` hooks around a forward / ``generate`` and removes them
    only when the call returns: an exception inside it (an empty prompt, a bad option) would leave
    them behind and break every later call on the same model.
    """
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        before = {id(m): set(m._forward_pre_hooks) for m in model.modules()}
        try:
            return fn(model, *args, **kwargs)
        except BaseException:
            for m in model.modules():
                for key in set(m._forward_pre_hooks) - before.get(id(m), set()):
                    m._forward_pre_hooks.pop(key, None)
                    m._forward_pre_hooks_with_kwargs.pop(key, None)
            raise
    return wrapper


BASE_ROWS = "__base__"  # peft's name for "no adapter" in a mixed batch
_announced: set[tuple[str, str]] = set()


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


def _adapter_rows(model, n: int) -> list[str]:
    """peft's ``adapter_names`` for ``[warm rows; base rows]`` of ``n`` rows each."""
    return [model.active_adapter] * n + [BASE_ROWS] * n


def _twice(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, t])


@torch.no_grad()
@leaves_no_hooks
def paired_logits(model, input_ids: torch.Tensor, forward_mode: ForwardMode = "auto", skip: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Warm and base logits ``[B, T', V]`` at the positions of right-padded (or unpadded) ``input_ids``.

    ``skip``: the caller needs no logits before position ``skip``. Where the split's cached prefix
    (:func:`split_prefix`) covers the rows' first L ≤ ``skip`` tokens, those are not encoded again
    and the result starts at position L (``T' = T − L``); otherwise ``T' = T``.
    """
    n, T = input_ids.shape

    def forward(role: Role, ids: torch.Tensor, extra: dict) -> torch.Tensor:
        prefix = split_prefix(model, _common_prefix(input_ids, torch.ones_like(input_ids), skip), role, T)
        if prefix is None:
            return _real_logits(model(input_ids=ids, **extra).logits, T)
        L = len(prefix)
        rows = torch.arange(ids.shape[0], device=ids.device) // n if role == "paired" else \
            torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        return model(input_ids=ids[:, L:], attention_mask=torch.ones_like(ids),
                     position_ids=torch.arange(L, T, device=ids.device).expand(ids.shape[0], -1),
                     past_key_values=prefix.cache(rows), use_cache=True, **extra).logits

    if resolve_forward_mode(model, forward_mode) == "one_forward":
        warm, base = forward("paired", _twice(input_ids), {"adapter_names": _adapter_rows(model, n)}).chunk(2)
    else:
        warm = forward("warm", input_ids, {})
        with adapter_disabled(model):
            base = forward("base", input_ids, {})
    if warm.shape[1] != base.shape[1]:  # the base pass found no cached prefix where the warm one did
        width = min(warm.shape[1], base.shape[1])
        warm, base = warm[:, -width:], base[:, -width:]
    return warm, base


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


def _full_label_logits(model, ids, mask, labels, paired: bool = False) -> torch.Tensor:
    """Logits at every labelled position; ``paired``: warm rows' then base rows' in one pass."""
    extra = {}
    if paired:
        extra["adapter_names"] = _adapter_rows(model, ids.shape[0])
        ids, mask, labels = _twice(ids), _twice(mask), _twice(labels)
    T = ids.shape[1]
    logits = _real_logits(model(input_ids=ids, attention_mask=mask, **extra).logits, T)
    return logits[:, :-1][labels[:, 1:] != IGNORE_INDEX]


MIN_PREFIX = 16  # tokens: a shorter common prefix is not worth a cache of its own
Role = str  # "warm", "base" (adapter disabled) or "paired" ([warm; base] rows in one forward)


class SplitPrefix:
    """The key/value cache of the prefix every prompt of a split starts with (a few-shot primer).

    Encoded once per weights (and per autocast state) for the warm, base or paired rows, then
    reused by every batch whose rows start with it: calibration, choice passes, validation, test
    and predict scoring. Exact: the rows attend to the same keys and values a full pass computes.
    """

    def __init__(self, model, tokens: tuple[int, ...], role: Role):
        self.tokens, self.role = tokens, role
        ids = torch.tensor([tokens], device=next(model.parameters()).device)
        extra = {}
        if role == "paired":
            extra["adapter_names"] = _adapter_rows(model, 1)
            ids = _twice(ids)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1, **extra)
        self.layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self.last = out.logits[:, -1]  # [R, V]: predicts the first token after the prefix
        self.nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)

    def __len__(self) -> int:
        return len(self.tokens)

    def cache(self, index: torch.Tensor) -> DynamicCache:
        """A fresh cache holding the prefix for rows ``index`` (into the prefix's 1 or 2 encoded rows)."""
        return DynamicCache(ddp_cache_data=[(k.index_select(0, index), v.index_select(0, index)) for k, v in self.layers])


class _PrefixStore:
    """Per model: the split prefix of each role, valid for one state of the weights and adapters."""

    def __init__(self, model):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.weights: tuple | None = None
        self.entries: dict[tuple, SplitPrefix] = {}  # by (role, adapter state)
        self.candidates: dict[tuple, tuple[int, ...]] = {}
        # One adapter layer tells whether the adapter is on (disable_adapter) and which one is active.
        self.tuner = next((m for m in model.modules() if isinstance(m, BaseTunerLayer)), None)

    def weights_state(self, model) -> tuple:
        """Changes whenever a parameter is replaced or written in place (an optimizer step, a load)
        or autocast changes: then nothing cached holds."""
        device = next(model.parameters()).device.type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) if device in ("cpu", "cuda") else ()
        return autocast, tuple((t.data_ptr(), t._version) for t in map(local_tensor, model.parameters()))

    def key(self, role: Role) -> tuple:
        """The role with the adapter's state: on or off (``disable_adapter``), which one is active."""
        adapter = (self.tuner.disable_adapters, tuple(self.tuner.active_adapters)) if self.tuner is not None else ()
        return role, adapter


_PREFIXES: "weakref.WeakKeyDictionary[torch.nn.Module, _PrefixStore]" = weakref.WeakKeyDictionary()
_announced_prefix: set[int] = set()


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


def split_prefix(model, tokens: torch.Tensor, role: Role, length: int) -> SplitPrefix | None:
    """The cached prefix that ``tokens`` (a batch's common leading tokens, of rows ``length`` tokens
    long) start with, if any.

    The split's prefix is learnt from the batches: the common part of two consecutive batches'
    leading tokens (≥ :data:`MIN_PREFIX`) is encoded once and kept until the weights change, so a
    split of one primer pays for it once. Training mode and prompt-learning adapters never cache.
    """
    if model.training or _uses_virtual_tokens(model) or len(tokens) < MIN_PREFIX or not shares_exactly(model, length):
        return None
    store = _PREFIXES.get(model)
    if store is None:
        store = _PREFIXES[model] = _PrefixStore(model)
    weights = store.weights_state(model)
    if store.weights != weights:  # new weights: nothing cached holds
        store.weights, store.entries = weights, {}
    key, tokens = store.key(role), tuple(tokens.tolist())  # host sync: once per batch, a prefix's few tokens
    entry = store.entries.get(key)
    if entry is not None and tokens[: len(entry)] == entry.tokens:
        return entry
    candidate = store.candidates.get(key, entry.tokens if entry is not None else None)
    if candidate is None:
        store.candidates[key] = tokens
        return None
    common = next((i for i, (a, b) in enumerate(zip(candidate, tokens)) if a != b), min(len(candidate), len(tokens)))
    store.candidates[key] = tokens[:common] if common >= MIN_PREFIX else tokens
    if common < MIN_PREFIX:
        return None
    entry = store.entries[key] = SplitPrefix(model, tokens[:common], role)
    if id(model) not in _announced_prefix:
        _announced_prefix.add(id(model))
        say(f"the prompts' shared prefix ({common} tokens) is encoded once per weights and reused "
            f"({entry.nbytes / 2**20:.1f} MB cached per distribution set)")
    return entry


def groups_in_order(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(group [N], first [G])``: equal rows of ``keys`` [N, K] share a group id, numbered in order of
    first appearance, and ``first[g]`` is group g's first row. On the keys' device, one host sync (the
    number of groups), where a per-row ``.tolist()`` would sync N times."""
    n = keys.shape[0]
    distinct, inverse = torch.unique(keys, dim=0, return_inverse=True)
    rows = torch.arange(n, device=keys.device)
    first = torch.full((distinct.shape[0],), n, device=keys.device).scatter_reduce(0, inverse, rows, "amin")
    order = torch.argsort(first)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=keys.device))
    return rank[inverse], first[order]


def _common_prefix(ids: torch.Tensor, mask: torch.Tensor, limit: int) -> torch.Tensor:
    """The leading tokens every row of a right-padded batch shares, at most ``limit`` of them."""
    same = ((ids == ids[:1]) & mask.bool()).all(0).int()
    return ids[0, : min(int(same.cumprod(0).sum()), limit)]


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
        # A row's prompt: its tokens before the first continuation token, the rest blanked (-1).
        prompts = ids.masked_fill(torch.arange(ids.shape[1], device=ids.device) >= starts.unsqueeze(1), -1)
        self.group, first_row = groups_in_order(prompts)  # the first row of group g is where it starts
        p_len = starts[first_row]
        self.ids, self.mask, self.first_row, self.p_len, self.pad_id = ids, mask, first_row, p_len, pad_id
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

    def _prompt_rest(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each distinct prompt after its first ``length`` tokens, left padded: ``(ids, mask)``."""
        rest = self.p_len - length
        R = int(rest.max())
        cols = torch.arange(R, device=rest.device)
        mask = (cols >= R - rest.unsqueeze(1)).long()
        src = (cols + self.p_len.unsqueeze(1) - R).clamp_min(0)
        return self.ids[self.first_row].gather(1, src).masked_fill(mask == 0, self.pad_id), mask

    def label_logits(self, model, role: Role = "warm") -> torch.Tensor:
        """Logits at every labelled position (``role`` "paired": warm rows' then base rows' in one pass).

        The prompts' common leading tokens come from the split's cached prefix when there is one
        (:func:`split_prefix`): only the rest of each prompt is encoded. Where the attention takes
        a custom mask (sdpa, eager), the batch is one tree per prompt, a row each (:meth:`_forest_label_logits`).
        """
        paired = role == "paired"
        prefix = split_prefix(model, _common_prefix(self.ids, self.mask, int(self.p_len.min()) - 1), role,
                              self.ids.shape[1])
        if _custom_masks(model):
            return self._forest_label_logits(model, prefix, role)
        if prefix is None:
            prompt_ids, prompt_mask, past, n_prefix = self.prompt_ids, self.prompt_mask, None, 0
        else:
            n_prefix = len(prefix)
            prompt_ids, prompt_mask = self._prompt_rest(n_prefix)
        group = self.group
        answer_ids, answer_mask, positions, select = self.answer_ids, self.answer_mask, self.answer_positions, self.select
        prompt_extra, answer_extra = {}, {}
        G = prompt_ids.shape[0]
        if paired:
            prompt_extra["adapter_names"] = _adapter_rows(model, G)
            answer_extra["adapter_names"] = _adapter_rows(model, answer_ids.shape[0])
            group = torch.cat([group, group + G])  # base rows follow base prompts
            prompt_ids, prompt_mask = _twice(prompt_ids), _twice(prompt_mask)
            answer_ids, answer_mask, positions, select = map(_twice, (answer_ids, answer_mask, positions, select))
        if prefix is not None:
            rows = torch.arange(prompt_ids.shape[0], device=prompt_ids.device) // G if paired else \
                torch.zeros(G, dtype=torch.long, device=prompt_ids.device)
            past = prefix.cache(rows)
            prompt_mask = torch.cat([prompt_mask.new_ones(prompt_mask.shape[0], n_prefix), prompt_mask], dim=1)
        out = model(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=_positions(prompt_mask)[:, n_prefix:],
            past_key_values=past,
            use_cache=True,
            logits_to_keep=1,  # only the last position's: it predicts each row's first continuation token
            **prompt_extra,
        )
        cache = out.past_key_values
        cache.reorder_cache(group)  # index_select on the batch dim: one copy per row
        last = out.logits[:, -1][group]  # predicts each row's first continuation token
        rest = model(
            input_ids=answer_ids,
            attention_mask=torch.cat([prompt_mask[group], answer_mask], dim=1),
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            **answer_extra,
        ).logits
        aligned = torch.cat([last.unsqueeze(1), rest[:, :-1]], dim=1)
        return aligned[select]


    def _forest(self, skip: int) -> tuple[torch.Tensor, ...]:
        # Host syncs: the layout is built on the host from a few per-prompt lengths, once per batch.
        """The batch after its first ``skip`` tokens as one tree per distinct prompt, a row each:
        the prompt's rest, then each of its rows' continuations, right padded.
        ``(ids [G, T], position [G, T], allowed [G, T, T], tree [M], place [M])``: ``allowed[g, a, b]``
        iff token b of tree g is an ancestor of its token a (the prompt and earlier, or earlier in the
        same continuation; a pad sees only itself); labelled token m is predicted at ``place[m]`` of
        tree ``tree[m]``.
        """
        if getattr(self, "_forest_skip", None) != skip:
            device = self.ids.device
            trees = [{"ids": [self.ids[r, skip:p]], "position": [torch.arange(skip, p, device=device)],
                      "owner": [-1] * (p - skip)} for r, p in zip(self.first_row.tolist(), self.p_len.tolist())]
            prompt_last = (self.p_len - skip - 1).tolist()
            start = []  # each row's first continuation token's place in its tree
            for j, (g, k) in enumerate(zip(self.group.tolist(), self.answer_mask.sum(1).tolist())):
                grown = trees[g]
                start.append(len(grown["owner"]))
                grown["ids"].append(self.answer_ids[j, :k])
                grown["position"].append(self.answer_positions[j, :k])
                grown["owner"] += [j] * k
            T = max(len(t["owner"]) for t in trees)
            ids = torch.full((len(trees), T), self.pad_id, dtype=self.ids.dtype, device=device)
            position = torch.zeros((len(trees), T), dtype=torch.long, device=device)
            owner = torch.full((len(trees), T), -2, dtype=torch.long, device=device)  # -2: padding
            for g, grown in enumerate(trees):
                n = len(grown["owner"])
                ids[g, :n], position[g, :n] = torch.cat(grown["ids"]), torch.cat(grown["position"])
                owner[g, :n] = torch.tensor(grown["owner"], device=device)
            query, seen = owner.unsqueeze(2), owner.unsqueeze(1)  # [G, T, 1], [G, 1, T]
            allowed = ((position.unsqueeze(1) <= position.unsqueeze(2)) & (seen != -2)
                       & ((seen == -1) | (seen == query)))
            allowed |= torch.eye(T, dtype=torch.bool, device=device) & (query == -2)
            rows, steps = self.select.nonzero(as_tuple=True)  # labelled tokens in row-major order, as the full batch's
            tree = self.group[rows]
            first = torch.tensor(prompt_last, device=device)[tree]  # a row's first token: its prompt's last
            place = torch.where(steps == 0, first, torch.tensor(start, device=device)[rows] + steps - 1)
            self._forest_layout, self._forest_skip = (ids, position, allowed, tree, place), skip
        return self._forest_layout

    def _forest_label_logits(self, model, prefix: "SplitPrefix | None", role: Role) -> torch.Tensor:
        """One forward over the batch laid out as trees (:meth:`_forest`): every prompt token and
        every continuation token once, attending to its own ancestors at its full-row position
        (a 4D mask), after the split's cached prefix when there is one. The same logits as one row
        per choice, without re-encoding a prompt per row or per-row key/value copies."""
        skip = len(prefix) if prefix is not None else 0
        ids, position, allowed, tree, place = self._forest(skip)
        G, paired = ids.shape[0], role == "paired"
        mask = allowed
        if prefix is not None:
            mask = torch.cat([allowed.new_ones(G, allowed.shape[1], skip), allowed], dim=2)
        extra = {}
        if paired:  # warm trees, then the same trees as base rows
            extra["adapter_names"] = _adapter_rows(model, G)
            ids, position, mask = _twice(ids), _twice(position), _twice(mask)
        mask = mask.unsqueeze(1)
        if _custom_masks(model) == "eager":  # additive, in the attention scores' dtype: 0 where attended, its minimum elsewhere
            dtype = model.get_input_embeddings().weight.dtype
            dtype = torch.get_autocast_dtype(mask.device.type) if torch.is_autocast_enabled(mask.device.type) else dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        past = None
        if prefix is not None:
            past = prefix.cache(torch.arange(ids.shape[0], device=ids.device) // G if paired else tree.new_zeros(G))
        keep, column = torch.unique(place, return_inverse=True)  # the LM head only where a label is predicted
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=past,
                       use_cache=past is not None, logits_to_keep=keep, **extra).logits
        warm = logits[tree, column]
        return torch.cat([warm, logits[tree + G, column]]) if paired else warm  # warm tokens, then base


def _custom_masks(model) -> str | None:
    """The attention implementation when it takes a custom 4D mask as given (sdpa: bool, eager: additive)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl if impl in ("sdpa", "eager") else None


class CommonPrefix:
    """Rows that all begin with the same tokens (a few-shot primer): encode them once per batch.

    Calibration rows are different questions after one shared primer; the primer's KV cache is
    computed once and expanded to every row, so each row only runs its own question and answer.
    ``usable`` needs right padding, ≥ 2 rows and a shared prefix of ``min_len`` tokens that ends
    before the first labelled token of every row.
    """

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, min_len: int = 16):
        self.ids, self.mask, self.labels = ids, mask, labels
        lengths = mask.sum(1)
        first_label = (labels != IGNORE_INDEX).int().argmax(1)
        right_padded = mask.bool() == (torch.arange(ids.shape[1], device=ids.device) < lengths.unsqueeze(1))
        self.length = len(_common_prefix(ids, mask, int(first_label.min())))
        self.usable = bool(right_padded.all()) and ids.shape[0] > 1 and self.length >= min_len

    def label_logits(self, model, role: Role = "warm") -> torch.Tensor:
        """Logits at every labelled position (``role`` "paired": warm rows' then base rows' in one pass).

        The prefix comes from the split's cache when it holds one (:func:`split_prefix`), else it
        is encoded here, once for the batch.
        """
        paired = role == "paired"
        n = self.ids.shape[0]
        expand = torch.zeros(n, dtype=torch.long, device=self.ids.device)
        if paired:
            expand = torch.cat([expand, expand + 1])
        shared = split_prefix(model, self.ids[0, : self.length], role, self.ids.shape[1])
        L = len(shared) if shared is not None else self.length
        rest_extra = {}
        rest_ids, rest_mask, labels = self.ids[:, L:], self.mask[:, L:], self.labels[:, L:]
        if paired:
            rest_extra["adapter_names"] = _adapter_rows(model, n)
            rest_ids, rest_mask, labels = _twice(rest_ids), _twice(rest_mask), _twice(labels)
        if shared is not None:
            cache, last = shared.cache(expand), shared.last[expand]
        else:
            prefix, prefix_extra = self.ids[:1, :L], {}
            if paired:
                prefix_extra["adapter_names"] = _adapter_rows(model, 1)
                prefix = _twice(prefix)
            out = model(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True, **prefix_extra)
            cache = out.past_key_values
            cache.reorder_cache(expand)  # index_select on the batch dim: one copy per row
            last = out.logits[:, -1][expand]  # predicts each row's first token after the prefix
        rest = model(
            input_ids=rest_ids,
            attention_mask=torch.cat([rest_mask.new_ones(rest_ids.shape[0], L), rest_mask], dim=1),
            position_ids=torch.arange(L, L + rest_ids.shape[1], device=rest_ids.device).expand(rest_ids.shape[0], -1),
            past_key_values=cache,
            use_cache=True,
            **rest_extra,
        ).logits
        aligned = torch.cat([last.unsqueeze(1), rest[:, :-1]], dim=1)  # aligned[:, j] predicts token L + j
        return aligned[labels != IGNORE_INDEX]


def _sharing(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor):
    """The cheapest exact way to encode a batch: repeated prompts, else a common prefix, else None."""
    shared = SharedPrompts(ids, mask, labels)
    if shared.usable and int(shared.group.max()) + 1 < ids.shape[0]:
        return shared
    prefix = CommonPrefix(ids, mask, labels)
    return prefix if prefix.usable else None


def distinct_rows(batch: dict) -> tuple[dict, torch.Tensor]:
    """``(distinct, same_as)``: the batch's distinct rows (tokens, mask and labels alike) in order of
    first appearance, and for each row the index of its distinct row. A repeated row scores exactly
    as its first copy, so it is encoded and scored once (TruthfulQA's MC1 choices recur in MC2:
    ~40 % of its rows). Per-row values of ``distinct`` are the batch's after ``[same_as]``.
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    n = ids.shape[0]
    same_as, first = groups_in_order(torch.cat([ids, mask.to(ids.dtype), labels.to(ids.dtype)], dim=1))
    if first.shape[0] == n:
        return batch, same_as
    return {k: v[first] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
            for k, v in batch.items()}, same_as


@torch.no_grad()
@leaves_no_hooks
def paired_label_logits(
    model, batch: dict, share_prompts: bool = True, with_base: bool = True, forward_mode: ForwardMode = "auto"
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Warm and base logits at every labelled position of the batch (``forward_mode``: see the module doc).

    Returns ``(warm [M, V], base [M, V], labels [M], row [M])`` where ``row`` is the batch row of
    each of the M label tokens (``labels[:, t]`` is predicted by the logits at ``t - 1``).
    ``share_prompts`` encodes each distinct prompt once and reuses its KV cache for all of its
    continuations (:class:`SharedPrompts`), or, for rows with different prompts after one shared
    primer, the primer once (:class:`CommonPrefix`) -- the same numbers up to float rounding.
    Prompt-learning adapters, whose virtual tokens peft re-inserts on every call, and batches
    with nothing to share use the full pass.
    ``with_base=False`` skips the pre-trained pass (``base`` is then None).
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    target = labels[:, 1:]
    sel = target != IGNORE_INDEX
    row = sel.nonzero(as_tuple=True)[0]
    shared = (_sharing(ids, mask, labels) if share_prompts and not _uses_virtual_tokens(model)
              and shares_exactly(model, ids.shape[1]) else None)
    label_logits = shared.label_logits if shared is not None else \
        lambda m, role="warm": _full_label_logits(m, ids, mask, labels, role == "paired")
    if with_base and resolve_forward_mode(model, forward_mode) == "one_forward":
        both = label_logits(model, "paired")
        warm, base = both.chunk(2)
    else:
        warm, base = label_logits(model, "warm"), None
        if with_base:
            with adapter_disabled(model):
                base = label_logits(model, "base")
    for name, z in (("warm", warm), ("base", base)):
        if z is not None and not torch.isfinite(z).all():
            raise FloatingPointError(f"non-finite {name} logits in the forward pass (check dtype/precision)")
    return warm, base, target[sel], row


def _per_row(values: torch.Tensor, row: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, row, values)


@torch.no_grad()
def score_choices(model, batch: dict, config: SteeringConfig = SteeringConfig(), share_prompts: bool = True
                  ) -> dict[str, torch.Tensor]:
    """Summed log-probability of each row's continuation under the plain (warm), base and steered models.

    Returns fp32 tensors ``[N]``: ``plain``, ``base``, ``steered`` (when ``config.mu`` is set),
    ``contrastive`` (when ``config.gamma`` is set: the baseline ``z_φ + γ(z_φ − z_θ)``, see
    :meth:`SteeringConfig.contrastive`) and ``num_tokens`` (divide for per-token length
    normalisation). Masked label tokens follow ``config.scoring_policy`` (see
    :func:`svd_lightning.steering.steered_log_probs`); no score is ever NaN. One forward serves all.
    """
    variants = {"steered": config} if config.mu is not None else {}
    if config.gamma is not None:
        variants["contrastive"] = config.contrastive()
    return score_choice_variants(model, batch, variants, share_prompts=share_prompts, forward_mode=config.forward_mode)


@torch.no_grad()
def score_choice_variants(model, batch: dict, variants: Mapping[str, SteeringConfig | ContrastiveLimit], *,
                          share_prompts: bool = True, with_base: bool = True, forward_mode: ForwardMode = "auto"
                          ) -> dict[str, torch.Tensor]:
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
    warm, base, y, row = paired_label_logits(model, batch, share_prompts, with_base=with_base, forward_mode=forward_mode)
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


# --------------------------------------------------------------------------------------------------
# Generation.


def steered_next_log_probs(warm: torch.Tensor, base: torch.Tensor, config: SteeringConfig) -> torch.Tensor:
    """SVDecode's next-token log-probs from warm and base logits: −∞ on masked tokens, none masked
    where :attr:`SteeringConfig.mask_in_generation` is False."""
    delta, keep = steering_vector(warm.float(), base.float(), config.alpha, direction=config.direction)
    if not config.mask_in_generation:
        keep = torch.ones_like(keep)
    steered = (warm.float() + config.mu * masked_delta(delta, keep)).masked_fill(~keep, float("-inf"))
    return torch.log_softmax(steered, dim=-1)


def _generation_config(config: SteeringConfig) -> SteeringConfig:
    if not isinstance(config, SteeringConfig):
        raise TypeError(f"expected a SteeringConfig, got {type(config).__name__}")
    if config.mu is None:
        raise ConfigError("steered generation needs a strength: SteeringConfig.mu is None")
    return config


class SteeringLogitsProcessor(LogitsProcessor):
    """Two-pass path: turns the warm model's next-token scores into SVDecode's steered log-probs.

    Runs the pre-trained pass (adapter disabled) alongside ``generate`` with its own KV cache: the
    first call encodes the prompt, later calls feed only the newest token. Rows reordered by beam
    search are matched to their parent by prefix, and the base cache is reordered the same way.
    Returns normalised log-probs (−∞ on masked tokens), which greedy, sampling warpers and beam
    search all accept. ``mu=0`` keeps the warm model's ranking among kept tokens (min-p style).
    """

    def __init__(self, model, config: SteeringConfig, attention_mask: torch.Tensor | None = None):
        self.model, self.config = model, _generation_config(config)
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
        return steered_next_log_probs(scores, self.base_next_logits(input_ids), self.config)


class PairedSteeringLogitsProcessor(LogitsProcessor):
    """One-forward path: rows ``[warm; base]`` of one batch; both halves get the steered log-probs.

    Identical scores in both halves make greedy and beam search pick the same tokens for both, so
    the base rows always see the warm rows' prefix. Later user processors see only the warm half.
    """

    def __init__(self, config: SteeringConfig, then: list | None = None):
        self.config, self.then = _generation_config(config), list(then or [])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        warm, base = scores.chunk(2)
        out = steered_next_log_probs(warm, base, self.config)
        warm_ids = input_ids[: warm.shape[0]]
        for processor in self.then:
            out = processor(warm_ids, out)
        return _twice(out)


class PairedSampler(LogitsProcessor):
    """Draws the next token once per warm row (after the sampling warpers) and forces it on both halves.

    It consumes the global RNG exactly as ``generate``'s own sampling does for the warm rows alone,
    so a seeded one-forward run samples the same tokens as the two-pass path.
    """

    def __init__(self, warpers: list):
        self.warpers = warpers

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        warm = scores[: scores.shape[0] // 2]
        warm_ids = input_ids[: warm.shape[0]]
        for warper in self.warpers:
            warm = warper(warm_ids, warm)
        token = torch.multinomial(torch.softmax(warm, dim=-1), num_samples=1)
        forced = torch.full_like(warm, float("-inf")).scatter(-1, token, 0.0)
        return _twice(forced)


def _sampling_warpers(config) -> tuple[list, str | None]:
    """transformers' sampling warpers for ``config`` in ``generate``'s order, or why we cannot mirror them."""
    unsupported = [k for k in ("top_h", "epsilon_cutoff", "eta_cutoff") if getattr(config, k, None) not in (None, 0.0)]
    if unsupported:
        return [], f"sampling option(s) {unsupported} are only applied by generate itself"
    warpers = []
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=config.top_k))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p))
    if config.min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=config.min_p))
    if config.typical_p is not None and config.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(mass=config.typical_p))
    return warpers, None


def _first_half(out):
    """The warm rows of ``generate``'s output (a tensor or a ``GenerateOutput``)."""
    if isinstance(out, torch.Tensor):
        return out[: out.shape[0] // 2]
    halved = {}
    for key, value in out.items():
        if key == "past_key_values":
            continue
        if isinstance(value, torch.Tensor):
            halved[key] = value[: value.shape[0] // 2]
        elif isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
            halved[key] = tuple(v[: v.shape[0] // 2] for v in value)
        else:
            halved[key] = value
    return type(out)(**halved)


class _WarmRowsStreamer(BaseStreamer):
    """Hands a streamer only the warm rows of the one-forward batch ``[warm; base]``."""

    def __init__(self, streamer):
        self.streamer = streamer

    def put(self, value):
        self.streamer.put(value[: value.shape[0] // 2])

    def end(self):
        self.streamer.end()


def _runs_last(processor) -> bool:
    """The processors ``generate`` appends after the user's: sampling warpers, watermarks, renormalisation."""
    name = type(processor).__name__
    return name.endswith("LogitsWarper") or "Watermark" in name or name == "LogitNormalization"


def model_with_adapter(model, steered_model, who: str):
    """The model whose adapter is switched off for the pre-trained pass when ``model`` generates:
    ``steered_model`` when ``model`` is it or inside it, else ``model`` itself if it carries the same adapter
    weights (:func:`adapter_fingerprint`); any other model is refused (its scores are not the run's)."""
    if any(model is m for m in steered_model.modules()):
        return steered_model
    if not _tuner_layers(model) or adapter_fingerprint(model) != adapter_fingerprint(steered_model):
        raise ValueError(f"{who} steers with the run's adapter, and this {type(model).__name__} carries another one "
                         "(or none): load the run's adapter/ into it (PeftModel.from_pretrained(base, RUN/adapter)), "
                         "or generate with the run's model")
    return model


def steering_decoding_loop(steered_model, config: SteeringConfig):
    """A ``custom_generate`` callable for transformers' ``generate``: its usual decoding loop
    (greedy, sampling or beam search) with SVDecode's two-pass processor put where a user's
    ``logits_processor`` goes (after ``generate``'s own, before the sampling warpers), so every
    option of ``generate`` applies on top of the steered distribution. ``steered_model`` is the
    peft model whose adapter is switched off for the pre-trained pass; ``generate`` may be called on
    it, its inner model, or any model that carries the same adapter weights (:func:`adapter_fingerprint`;
    then that model's own adapter is switched off), and refuses any other."""
    config = _generation_config(config)

    def custom_generate(model, input_ids, logits_processor, stopping_criteria, generation_config,
                        synced_gpus: bool = False, streamer=None, **model_kwargs):
        steering = model_with_adapter(model, steered_model, "custom_generate")
        processor = SteeringLogitsProcessor(steering, config, attention_mask=model_kwargs.get("attention_mask"))
        processors = list(logits_processor)
        at = next((i for i, p in enumerate(processors) if _runs_last(p)), len(processors))
        processors.insert(at, processor)
        options = dict(logits_processor=LogitsProcessorList(processors), stopping_criteria=stopping_criteria,
                       generation_config=generation_config, synced_gpus=synced_gpus, **model_kwargs)
        if (generation_config.num_beams or 1) > 1:
            return type(model)._beam_search(model, input_ids, **options)
        return type(model)._sample(model, input_ids, streamer=streamer, **options)

    return custom_generate


def steered_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: SteeringConfig,
                     **generate_kwargs):
    """``model.generate`` with SVDecode under ``config`` (μ̄, α, direction, forward mode; the mask
    unless the policy is ``none``); all of transformers' decoding options apply on top.

    Sampling options (temperature, top-k, top-p, …) act on the steered distribution. The one-forward
    path covers greedy, beam search and sampling (also with ``num_return_sequences``); beam
    *sampling* and generate-only warpers (top-h, ε/η cutoffs) use the two-pass path. Processors that
    ``generate`` adds itself (e.g. a repetition penalty) see the base rows too on the one-forward path.
    A sharded model (:mod:`svd_lightning.sharding`) generates in lockstep with the other ranks.
    """
    with lockstep(model):
        return _steered_generate(model, input_ids, attention_mask, config, **_unsynced(model, generate_kwargs))


def _unsynced(model, generate_kwargs: dict) -> dict:
    """``generate`` options without transformers' ``synced_gpus`` on a sharded model: :func:`lockstep`
    keeps the ranks' forwards together instead, also the two-pass processor's, which ``synced_gpus``
    skips on a rank that is done (so its per-step all-reduce would meet another rank's forward)."""
    return {**generate_kwargs, "synced_gpus": False} if is_sharded(model) else generate_kwargs


@leaves_no_hooks
def _steered_generate(model, input_ids, attention_mask, config, **generate_kwargs):
    config = _generation_config(config)
    extra = list(generate_kwargs.pop("logits_processor", None) or [])
    options = model.generation_config.__class__.from_dict({**model.generation_config.to_dict(), **generate_kwargs})
    sample, beams = bool(options.do_sample), int(options.num_beams or 1)
    warpers, unsupported = _sampling_warpers(options) if sample else ([], None)
    if sample and beams > 1:
        unsupported = "beam sampling draws per beam inside generate"
    if resolve_forward_mode(model, config.forward_mode, unsupported) == "two_pass":
        processor = SteeringLogitsProcessor(model, config, attention_mask=attention_mask)
        return model.generate(input_ids=input_ids, attention_mask=attention_mask,
                              logits_processor=LogitsProcessorList([processor, *extra]), **generate_kwargs)
    kwargs = dict(generate_kwargs, num_beams=beams)  # peft repeats adapter_names per beam only when told
    if kwargs.get("streamer") is not None:
        kwargs["streamer"] = _WarmRowsStreamer(kwargs["streamer"])
    processors: list = [PairedSteeringLogitsProcessor(config, then=extra)]
    if sample:
        # generate would repeat rows for num_return_sequences but not peft's adapter_names: repeat first.
        copies = int(kwargs.pop("num_return_sequences", None) or 1)
        input_ids, attention_mask = input_ids.repeat_interleave(copies, 0), attention_mask.repeat_interleave(copies, 0)
        processors.append(PairedSampler(warpers))
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None, min_p=None, typical_p=None)
    out = model.generate(
        input_ids=_twice(input_ids),
        attention_mask=_twice(attention_mask),
        adapter_names=_adapter_rows(model, input_ids.shape[0]),
        logits_processor=LogitsProcessorList(processors),
        **kwargs,
    )
    return _first_half(out)


# -- answering prompts ---------------------------------------------------------------------------------
MODES = ("greedy", "sample", "beam")


def decoding_kwargs(mode: str = "greedy", max_new_tokens: int = 64, num_beams: int = 4,
                    temperature: float | None = None, top_k: int | None = None, top_p: float | None = None) -> dict:
    """``generate`` options for ``mode``, checked here (transformers accepts ``top_p=1.5`` silently);
    sampling options are refused outside ``sample``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def count(name, value, least=1):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer ≥ {least}, got {value!r}")

    count("max_new_tokens", max_new_tokens)
    count("num_beams", num_beams)
    if top_k is not None:
        count("top_k", top_k)
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if temperature is not None and not (isinstance(temperature, (int, float)) and 0.0 < temperature < math.inf):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    warpers = {k: v for k, v in dict(temperature=temperature, top_k=top_k, top_p=top_p).items() if v is not None}
    if warpers and mode != "sample":
        raise ValueError(f"sampling options ({', '.join(warpers)}) only apply to mode 'sample', not {mode!r}")
    beams = num_beams if mode == "beam" else 1
    return dict(max_new_tokens=max_new_tokens, do_sample=mode == "sample", num_beams=beams, **warpers)


def check_prompts(prompts, tokenizer) -> list[str]:
    """``prompts`` as a list of strings that each give at least one token; errors name the prompt."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("no prompts to answer")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} must be a string, got {type(p).__name__}")
        if not tokenizer(p, add_special_tokens=True)["input_ids"]:
            raise ValueError(f"prompt {i} ({p!r}) gives no tokens: there is nothing to continue")
    return list(prompts)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], config: SteeringConfig, mode: str = "greedy", *,
                     batch_size: int = 8, seed: int = 0, progress: bool = True, with_plain: bool = True,
                     generation: dict | None = None, **kw) -> list[dict]:
    """Plain and steered (``config``) continuations of ``prompts`` (left-padded batches); ``kw`` go to
    :func:`decoding_kwargs`, ``generation`` (any other option of transformers' ``generate``, e.g.
    ``repetition_penalty``, ``eos_token_id``, ``streamer``) to ``generate`` as given: transformers
    checks them. A ``streamer`` streams the steered answer.

    ``with_plain=False`` skips the warm model's own answer (``plain`` is then None). Sampling
    reseeds with ``seed + index of the batch's first prompt`` before each answer.
    """
    from svd_lightning.progress import progress_bar

    generation = dict(generation or {})
    clash = sorted(set(generation) & {"do_sample", "num_beams", "max_new_tokens", "temperature", "top_k", "top_p"})
    if clash:
        raise ValueError(f"{clash} are set by the mode and its options (mode, max_new_tokens, num_beams, temperature, "
                         "top_k, top_p), not as extra generate options")
    streamer = generation.pop("streamer", None)
    gen = {**decoding_kwargs(mode, **kw), "pad_token_id": tokenizer.pad_token_id, **generation}
    config = _generation_config(config)
    prompts = check_prompts(prompts, tokenizer)
    rows, side = [], tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right: real tokens must end every row
    try:
        gen = _unsynced(model, gen)
        with progress_bar(f"{mode} decoding", len(prompts), "prompt", enabled=progress) as bar, lockstep(model):
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=True).to(model.device)
                torch.manual_seed(seed + start)
                plain = model.generate(**enc, **gen) if with_plain else None
                torch.manual_seed(seed + start)
                steered = steered_generate(model, enc["input_ids"], enc["attention_mask"], config, **gen,
                                           **({"streamer": streamer} if streamer is not None else {}))
                n = enc["input_ids"].shape[1]
                decode = lambda out: tokenizer.batch_decode(out[:, n:], skip_special_tokens=True)  # noqa: E731
                for p, a, b in zip(chunk, decode(plain) if with_plain else [None] * len(chunk), decode(steered)):
                    rows.append({"prompt": p, "plain": a, "steered": b, "mu": float(config.mu), "mode": mode})
                bar.update(len(chunk))
    finally:
        tokenizer.padding_side = side
    return rows
