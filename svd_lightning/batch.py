"""The batch contract between DataModules and the steering module.

Every DataModule (ours or a user's) yields questions as :class:`ChoiceExample` and lets
:func:`collate_choices` / :func:`collate_lm` turn them into tensors. A user DataModule may also
build the dicts itself; :func:`validate_choice_batch` checks them once per run.

A question has N choices. Each choice is a (context, continuation) pair and only the
continuation is scored: usually one context (the prompt) is shared by N continuations (the
answers); for lm-eval's *partial evaluation* (WinoGrande) each choice brings its own context (the
sentence with that option filled into the blank) and all share one continuation (the rest of
the sentence). :class:`ChoiceExample` holds both shapes; the batch does not care which.

``ChoiceBatch`` -- one row per (question, choice), right padded:

==================  ========  =====================================================================
key                 shape     meaning
==================  ========  =====================================================================
input_ids           [N, T]    the choice's context tokens followed by its continuation tokens
attention_mask      [N, T]    1 on real tokens
labels              [N, T]    the token id on continuation positions, -100 elsewhere (HF convention:
                              ``labels[:, t]`` is predicted from the logits at ``t - 1``)
question_index      [N]       global id of the question (rows of one question share it)
choice_index        [N]       position of the choice inside its choice set
choice_set          [N]       which list the choice belongs to (TruthfulQA: 0 = mc1, 1 = mc2)
is_true             [N]       the choice is a correct answer
num_chars           [N]       characters of the continuation text (for length-normalised accuracy)
is_reference        [N]       optional: the row is the question's reference (context + answer, as
                              ``LMBatch`` teacher-forces it); at most one per question. The
                              calibration pass takes μ̄'s token statistics from these rows, so one
                              pass over the choices serves every solver (:mod:`svd_lightning.calibration`)
==================  ========  =====================================================================

``LMBatch`` -- teacher-forced training / calibration rows: ``input_ids``, ``attention_mask``,
``labels`` as above, one row per question (:meth:`ChoiceExample.reference`: the true choice's
context + its continuation).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import NotRequired, Sequence, TypedDict

import torch

IGNORE_INDEX = -100


@dataclass
class ChoiceExample:
    """One question with its candidate answers (tasks are data, as in lm-eval).

    ``choices`` are the scored continuations. Without ``contexts`` every choice follows ``prompt``;
    with ``contexts`` (one per choice) choice ``j`` follows ``contexts[j]`` and ``prompt`` is only
    a readable form of the question (e.g. the sentence with its blank).
    """

    prompt: str
    choices: list[str]
    is_true: list[bool]
    index: int
    choice_sets: list[int] = field(default_factory=list)  # empty: all choices in set 0
    answer: str | None = None  # reference continuation for warm start / calibration
    contexts: list[str] = field(default_factory=list)  # empty: every choice follows `prompt`
    source: str | None = None  # the file the question came from (for error messages)

    def __post_init__(self) -> None:
        if not self.choice_sets:
            self.choice_sets = [0] * len(self.choices)
        if not (len(self.choices) == len(self.is_true) == len(self.choice_sets)):
            raise ValueError(f"question {self.index}: choices, is_true and choice_sets differ in length")
        if self.contexts and len(self.contexts) != len(self.choices):
            raise ValueError(f"question {self.index}: {len(self.contexts)} contexts for {len(self.choices)} choices")
        if self.answer is None:
            self.answer = next((c for c, t in zip(self.choices, self.is_true) if t), None)

    def context(self, j: int) -> str:
        """The text choice ``j`` continues."""
        return self.contexts[j] if self.contexts else self.prompt

    def reference(self) -> tuple[str, str | None]:
        """(context, continuation) the warm start and calibration teacher-force."""
        if not self.contexts:
            return self.prompt, self.answer
        true = [j for j, t in enumerate(self.is_true) if t]
        return (self.contexts[true[0]] if true else self.prompt), self.answer


class LMBatch(TypedDict):
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


class ChoiceBatch(LMBatch):
    question_index: torch.Tensor
    choice_index: torch.Tensor
    choice_set: torch.Tensor
    is_true: torch.Tensor
    num_chars: torch.Tensor
    is_reference: NotRequired[torch.Tensor]


CHOICE_KEYS = tuple(k for k in ChoiceBatch.__annotations__ if k != "is_reference")  # the required keys


class Tokenized:
    """Tokenizes prompt + continuation pairs, truncating the prompt from the left (never the answer)."""

    def __init__(self, tokenizer, max_length: int = 512):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncated = 0
        self._warned = False

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        return pad

    def pair(self, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
        ctx = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not cont:
            raise ValueError(f"continuation {continuation!r} tokenizes to nothing")
        if len(cont) >= self.max_length:
            raise ValueError(
                f"continuation of {len(cont)} tokens does not fit max_length={self.max_length}: {continuation[:60]!r}"
            )
        room = self.max_length - len(cont)
        if len(ctx) > room:
            bos = self.tokenizer.bos_token_id
            keep_bos = bos is not None and ctx[0] == bos  # a BOS the tokenizer added stays first
            ctx = ([bos] if keep_bos else []) + ctx[len(ctx) - room + keep_bos :]
            self.truncated += 1
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"prompts longer than max_length={self.max_length} are truncated from the left "
                    "(the answer is kept); see `Tokenized.truncated` for the count",
                    stacklevel=3,
                )
        return ctx, cont


def _pad(rows: Sequence[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long, device="cpu")


def _rows_to_batch(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> LMBatch:
    ids = [ctx + cont for ctx, cont in pairs]
    labels = [[IGNORE_INDEX] * len(ctx) + cont for ctx, cont in pairs]
    return {
        "input_ids": _pad(ids, pad_id),
        "attention_mask": _pad([[1] * len(r) for r in ids], 0),
        "labels": _pad(labels, IGNORE_INDEX),
    }


def collate_lm(examples: Sequence[ChoiceExample], tok: Tokenized) -> LMBatch:
    """Prompt + reference answer, loss on the answer tokens only."""
    references = [ex.reference() for ex in examples]
    missing = [ex.index for ex, (_, answer) in zip(examples, references) if not answer]
    if missing:
        raise ValueError(f"questions {missing} have no reference answer for teacher forcing")
    return _rows_to_batch([tok.pair(context, answer) for context, answer in references], tok.pad_id)


def collate_choices(examples: Sequence[ChoiceExample], tok: Tokenized) -> ChoiceBatch:
    """One row per (question, choice); see the module docstring for the keys."""
    pairs, meta = [], []
    for ex in examples:
        reference, found = ex.reference(), False
        for j, (choice, true, cset) in enumerate(zip(ex.choices, ex.is_true, ex.choice_sets)):
            pairs.append(tok.pair(ex.context(j), choice))
            is_reference = not found and (ex.context(j), choice) == reference
            found |= is_reference
            meta.append((ex.index, j, cset, bool(true), len(choice.lstrip()), is_reference))  # lm-eval: no delimiter
    batch = _rows_to_batch(pairs, tok.pad_id)
    q, j, s, t, n, r = zip(*meta)
    batch.update(
        question_index=torch.tensor(q, dtype=torch.long, device="cpu"),
        choice_index=torch.tensor(j, dtype=torch.long, device="cpu"),
        choice_set=torch.tensor(s, dtype=torch.long, device="cpu"),
        is_true=torch.tensor(t, dtype=torch.bool, device="cpu"),
        num_chars=torch.tensor(n, dtype=torch.long, device="cpu"),
        is_reference=torch.tensor(r, dtype=torch.bool, device="cpu"),
    )
    return batch  # type: ignore[return-value]


def validate_choice_batch(batch: dict) -> None:
    """Clear errors for user DataModules that build batches themselves."""
    missing = [k for k in CHOICE_KEYS if k not in batch]
    if missing:
        raise KeyError(f"choice batch lacks {missing}; see svd_lightning.batch for the contract")
    n, t = batch["input_ids"].shape
    for k in ("attention_mask", "labels"):
        if tuple(batch[k].shape) != (n, t):
            raise ValueError(f"batch[{k!r}] has shape {tuple(batch[k].shape)}, expected {(n, t)}")
    for k in (*CHOICE_KEYS[3:], *(["is_reference"] if "is_reference" in batch else [])):
        if tuple(batch[k].shape) != (n,):
            raise ValueError(f"batch[{k!r}] has shape {tuple(batch[k].shape)}, expected {(n,)}")
    if bool(((batch["labels"] != IGNORE_INDEX).sum(1) == 0).any()):
        raise ValueError("a row of the choice batch has no continuation token (labels all -100)")
