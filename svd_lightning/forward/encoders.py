"""Encoders: the ways to get the logits at every labelled position of a choice batch, exactly, with as
little repeated work as the batch allows. Each one writes its forward once, for :class:`Rows` (warm,
base or paired), and takes the split's :class:`PrefixCache` when its owner keeps one.

* :class:`FullRows` -- one row per choice, nothing shared.
* :class:`SharedPrompts` -- rows of one question repeat its prompt: each distinct prompt once, its KV
  cache expanded to its continuations; where attention takes a custom 4D mask, one tree per prompt.
* :class:`CommonPrefix` -- different questions after one primer: the primer once per batch.

:func:`encoder_for` picks the cheapest that applies.
"""

from __future__ import annotations

from typing import Protocol

import torch

from svd_lightning.batch import IGNORE_INDEX
from svd_lightning.forward.adapter import uses_virtual_tokens
from svd_lightning.forward.prefix import PrefixCache, SplitPrefix, cached_prefix, common_prefix, shares_exactly
from svd_lightning.forward.rows import Rows, positions, real_logits


class Encoder(Protocol):
    def label_logits(self, model, rows: Rows, prefixes: PrefixCache | None = None) -> torch.Tensor:
        """Logits ``[M, V]`` at every labelled position, in row-major order (paired: warm's, then base's)."""


class FullRows:
    """Every row encoded on its own: the reference layout, and the one for prompt-learning adapters."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor):
        self.ids, self.mask, self.labels = ids, mask, labels

    def label_logits(self, model, rows: Rows, prefixes: PrefixCache | None = None) -> torch.Tensor:
        logits = rows.forward(model, {"input_ids": self.ids, "attention_mask": self.mask}).logits
        logits = real_logits(logits, self.ids.shape[1])
        return logits[:, :-1][rows.expand(self.labels)[:, 1:] != IGNORE_INDEX]


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


def custom_masks(model) -> str | None:
    """The attention implementation when it takes a custom 4D mask as given (sdpa: bool, eager: additive)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl if impl in ("sdpa", "eager") else None


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

    def label_logits(self, model, rows: Rows, prefixes: PrefixCache | None = None) -> torch.Tensor:
        """The prompts' common leading tokens come from the split's cached prefix when there is one: only
        the rest of each prompt is encoded. Where the attention takes a custom mask (sdpa, eager), the
        batch is one tree per prompt, a row each (:meth:`_forest_label_logits`)."""
        prefix = cached_prefix(prefixes, model, common_prefix(self.ids, self.mask, int(self.p_len.min()) - 1), rows,
                               self.ids.shape[1])
        if custom_masks(model):
            return self._forest_label_logits(model, prefix, rows)
        G, past, n_prefix = self.prompt_ids.shape[0], None, 0
        prompt_ids, prompt_mask = self.prompt_ids, self.prompt_mask
        if prefix is not None:
            n_prefix = len(prefix)
            prompt_ids, prompt_mask = self._prompt_rest(n_prefix)
            past = prefix.cache(G, prompt_ids.device)
            prompt_mask = torch.cat([prompt_mask.new_ones(G, n_prefix), prompt_mask], dim=1)
        out = rows.forward(model, {"input_ids": prompt_ids, "attention_mask": prompt_mask,
                                   "position_ids": positions(prompt_mask)[:, n_prefix:]},
                           past_key_values=past, use_cache=True,
                           logits_to_keep=1)  # only the last position's: it predicts each row's first continuation token
        group = rows.index(self.group, G)  # base rows follow base prompts
        cache = out.past_key_values
        cache.reorder_cache(group)  # index_select on the batch dim: one copy per row
        last = out.logits[:, -1][group]  # predicts each row's first continuation token
        rest = rows.forward(model, {"input_ids": self.answer_ids,
                                    "attention_mask": torch.cat([prompt_mask[self.group], self.answer_mask], dim=1),
                                    "position_ids": self.answer_positions},
                            past_key_values=cache, use_cache=True).logits
        aligned = torch.cat([last.unsqueeze(1), rest[:, :-1]], dim=1)
        return aligned[rows.expand(self.select)]

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

    def _forest_label_logits(self, model, prefix: SplitPrefix | None, rows: Rows) -> torch.Tensor:
        """One forward over the batch laid out as trees (:meth:`_forest`): every prompt token and
        every continuation token once, attending to its own ancestors at its full-row position
        (a 4D mask), after the split's cached prefix when there is one. The same logits as one row
        per choice, without re-encoding a prompt per row or per-row key/value copies."""
        skip = len(prefix) if prefix is not None else 0
        ids, position, allowed, tree, place = self._forest(skip)
        G = ids.shape[0]
        mask = allowed
        if prefix is not None:
            mask = torch.cat([allowed.new_ones(G, allowed.shape[1], skip), allowed], dim=2)
        mask = mask.unsqueeze(1)
        if custom_masks(model) == "eager":  # additive, in the attention scores' dtype: 0 where attended, its minimum elsewhere
            dtype = model.get_input_embeddings().weight.dtype
            dtype = torch.get_autocast_dtype(mask.device.type) if torch.is_autocast_enabled(mask.device.type) else dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        past = prefix.cache(G, ids.device) if prefix is not None else None
        keep, column = torch.unique(place, return_inverse=True)  # the LM head only where a label is predicted
        logits = rows.forward(model, {"input_ids": ids, "attention_mask": mask, "position_ids": position},
                              past_key_values=past, use_cache=past is not None, logits_to_keep=keep).logits
        return logits[rows.index(tree, G), rows.expand(column)]  # warm tokens, then base


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
        self.length = len(common_prefix(ids, mask, int(first_label.min())))
        self.usable = bool(right_padded.all()) and ids.shape[0] > 1 and self.length >= min_len

    def label_logits(self, model, rows: Rows, prefixes: PrefixCache | None = None) -> torch.Tensor:
        """The prefix comes from the split's cache when it holds one, else it is encoded here, once for
        the batch."""
        n, device = self.ids.shape[0], self.ids.device
        expand = rows.index(torch.zeros(n, dtype=torch.long, device=device), 1)  # each row's prefix row
        shared = cached_prefix(prefixes, model, self.ids[0, : self.length], rows, self.ids.shape[1])
        L = len(shared) if shared is not None else self.length
        rest_ids, rest_mask = self.ids[:, L:], self.mask[:, L:]
        if shared is not None:
            cache, last = shared.cache(n, device), shared.last[expand]
        else:
            prefix = self.ids[:1, :L]
            out = rows.forward(model, {"input_ids": prefix, "attention_mask": torch.ones_like(prefix)}, use_cache=True)
            cache = out.past_key_values
            cache.reorder_cache(expand)  # index_select on the batch dim: one copy per row
            last = out.logits[:, -1][expand]  # predicts each row's first token after the prefix
        rest = rows.forward(model, {
            "input_ids": rest_ids,
            "attention_mask": torch.cat([rest_mask.new_ones(n, L), rest_mask], dim=1),
            "position_ids": torch.arange(L, L + rest_ids.shape[1], device=device).expand(n, -1),
        }, past_key_values=cache, use_cache=True).logits
        aligned = torch.cat([last.unsqueeze(1), rest[:, :-1]], dim=1)  # aligned[:, j] predicts token L + j
        return aligned[rows.expand(self.labels[:, L:]) != IGNORE_INDEX]


def encoder_for(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, share_prompts: bool = True
                ) -> Encoder:
    """The cheapest exact encoder for a batch: repeated prompts, else a common prefix, else full rows.
    Prompt-learning adapters (peft re-inserts their virtual tokens on every call) and models whose sliding
    window is shorter than the rows use full rows."""
    if share_prompts and not uses_virtual_tokens(model) and shares_exactly(model, ids.shape[1]):
        shared = SharedPrompts(ids, mask, labels)
        if shared.usable and int(shared.group.max()) + 1 < ids.shape[0]:
            return shared
        prefix = CommonPrefix(ids, mask, labels)
        if prefix.usable:
            return prefix
    return FullRows(ids, mask, labels)


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
