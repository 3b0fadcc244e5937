"""The paper's eight commonsense sets in the LLM-Adapters format ``{instruction, input, output, answer}``.

The options live inside ``instruction``, e.g. (ARC, SIQA, OBQA)::

    Please choose the correct answer to the question: {q}\\n\\nAnswer1: {a} Answer2: {b} ...
    \\n\\nAnswer format: answer1/answer2/...

boolq has no option list (labels true/false), piqa separates ``Solution1:``/``Solution2:`` by blank
lines, hellaswag (``Ending1..4``), ARC-e/ARC-c/SIQA/OBQA (``Answer1..5``) and WinoGrande
(``Option1: Sarah Option2: Maria Answer format: option1/option2`` -- one space, no blank line,
before the format line) by single spaces.

``option_text`` scoring of WinoGrande is lm-eval's *partial evaluation*: each option is put into
the sentence's blank to form that choice's context, and the words after the blank -- the same
for every option -- are the scored continuation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from svd_lightning.batch import ChoiceExample
from svd_lightning.data.base import ChoiceDataModule, seeded_split
from svd_lightning.data.sources import DataError, check_example

# LLM-Adapters' `generate_prompt` (commonsense_evaluate.py); the model continues with "the correct answer is X".
TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\nthe correct answer is"
)
TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\nthe correct answer is"
)

_FORMAT = re.compile(r"\s+Answer format: (\S+)\s*$")
_PREAMBLE = re.compile(r"^Please [^:]*:\s*")  # "Please choose the correct answer to the question: "
_NUMBERED = re.compile(r"^(solution|ending|answer|option)(\d+)$")

Scoring = Literal["label", "option_text"]


def parse_row(row: dict, scoring: Scoring, path, i: int) -> ChoiceExample:
    """One LLM-Adapters row as a ChoiceExample; ``DataError`` naming file/row/field when it does not parse."""
    for field in ("instruction", "answer"):
        if not isinstance(row.get(field), str) or not row[field].strip():
            raise DataError(path, "missing or empty", i, field)
    instruction, answer = row["instruction"], row["answer"].strip()
    fmt = _FORMAT.search(instruction)
    if fmt is None:
        raise DataError(path, "no trailing 'Answer format: a/b/...' line to read the labels from", i, "instruction")
    labels = fmt.group(1).split("/")
    if answer not in labels:
        raise DataError(path, f"answer {answer!r} is not one of the labels {labels}", i, "answer")
    is_true = [label == answer for label in labels]
    body = instruction[: fmt.start()]

    if scoring == "label":
        if _numbered(labels):  # the options are not scored, but a row repeating one is ill-posed
            _parse_options(body, labels, path, i)
        extra = row.get("input") or ""
        prompt = (TEMPLATE_WITH_INPUT if extra.strip() else TEMPLATE).format(instruction=instruction, input=extra)
        ex = ChoiceExample(prompt, [" " + label for label in labels], is_true, index=i)
    elif scoring == "option_text":
        ex = _option_text_example(body, labels, is_true, path, i)
    else:
        raise ValueError(f"scoring must be 'label' or 'option_text', got {scoring!r}")
    return check_example(ex, path, set_fields=("instruction",), prompt_field="instruction")


def _numbered(labels: list[str]) -> bool:
    return all(_NUMBERED.match(label) for label in labels)


def _option_text_example(body: str, labels: list[str], is_true: list[bool], path, i: int) -> ChoiceExample:
    """The options' own text scored under an lm-eval style prompt (see the module docstring)."""
    if sorted(labels) == ["false", "true"]:  # boolq: the labels are the options
        question = _PREAMBLE.sub("", body.strip(), count=1)
        return ChoiceExample(f"Question: {question}\nAnswer:", [" " + label for label in labels], is_true, index=i)
    name, context, options = _parse_options(body, labels, path, i)
    if name == "Option":  # WinoGrande: partial evaluation
        blank = context.find("_")
        if blank < 0:
            raise DataError(path, "no '_' blank in the sentence to put the options into", i, "instruction")
        rest = context[blank + 1 :].strip()
        if not rest:
            raise DataError(path, "nothing after the blank to score (partial evaluation scores those words)", i, "instruction")
        contexts = [context[:blank] + option for option in options]
        return ChoiceExample(context, [" " + rest] * len(options), is_true, index=i, contexts=contexts)
    # hellaswag continues the sentence itself; piqa, ARC, SIQA and OBQA are questions
    prompt = context if name == "Ending" else f"Question: {context}\nAnswer:"
    return ChoiceExample(prompt, [" " + text for text in options], is_true, index=i)


def _parse_options(body: str, labels: list[str], path, i: int) -> tuple[str, str, list[str]]:
    """(option name, the question without its preamble, option texts in label order)."""
    kinds = {m.group(1) for m in map(_NUMBERED.match, labels) if m}
    if len(kinds) != 1 or not _numbered(labels):
        raise DataError(path, f"cannot score labels {labels} as option text; use scoring='label'", i, "instruction")
    name = kinds.pop().capitalize()  # solution -> "Solution1: ..."
    start = re.search(rf"\n\n{name}1:", body)
    if start is None:
        raise DataError(path, f"no '{name}1:' option list before the answer format line", i, "instruction")
    parts = re.split(rf"(?:^|\s+){name}(\d+):", body[start.start() :].strip())
    numbers, texts = parts[1::2], [t.strip() for t in parts[2::2]]
    if numbers != [str(k) for k in range(1, len(labels) + 1)]:
        found = [f"{name}{n}" for n in numbers]
        raise DataError(path, f"options {found} do not match the answer format {labels}", i, "instruction")
    for k, text in enumerate(texts):
        if not text:
            raise DataError(path, f"option {name}{k + 1} is an empty string", i, "instruction")
    dups = sorted({t for t in texts if texts.count(t) > 1})
    if dups:
        raise DataError(path, f"duplicate options {dups}", i, "instruction")
    return name, _PREAMBLE.sub("", body[: start.start()].strip(), count=1), texts


class CommonsenseDataModule(ChoiceDataModule):
    """The eight commonsense sets of LLM-Adapters: BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA.

    Five ship in ``../shared/data/commonsense``; SIQA (``social_i_qa``), WinoGrande and OBQA
    (``openbookqa``) are read from the same format wherever you keep LLM-Adapters' ``dataset/``.

    Args:
        test_path: the task's ``test.json``.
        train_path: the task's ``train.json``; if given, train, calib and val come from it (split by
            ``calib_fraction`` and ``val_fraction``) and the whole test file is the test split. Otherwise
            the test file is split by ``split``.
        calib_fraction: calib share of the train file.
        val_fraction: val share of the train file (0: no validation split).
        scoring: ``"label"`` scores the paper's label words (``... the correct answer is`` + `` answer1``)
            under the LLM-Adapters prompt; ``"option_text"`` scores the options' own text under an
            lm-eval style prompt (``Question: ...\\nAnswer:``; WinoGrande: partial evaluation),
            which small models handle better.
        **kwargs: see :class:`ChoiceDataModule`.
    """

    def __init__(
        self,
        test_path: str | dict[str, Any],
        train_path: str | dict[str, Any] | None = None,
        calib_fraction: float = 0.2,
        val_fraction: float = 0.1,
        scoring: Scoring = "option_text",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if scoring not in ("label", "option_text"):
            raise ValueError(f"scoring must be 'label' or 'option_text', got {scoring!r}")
        if not (0.0 <= calib_fraction and 0.0 <= val_fraction and calib_fraction + val_fraction < 1.0):
            raise ValueError(f"calib_fraction and val_fraction must be >= 0 with a sum below 1, got {calib_fraction} "
                             f"and {val_fraction}")
        self.test_path, self.train_path = test_path, train_path
        self.calib_fraction, self.val_fraction, self.scoring = calib_fraction, val_fraction, scoring

    def _load(self, path: str | Path) -> list[ChoiceExample]:
        return self.parse_file(path, lambda p, i, row: parse_row(row, self.scoring, p, i))

    def load_examples(self) -> list[ChoiceExample]:
        return self._load(self.test_path)

    def split_examples(self, examples: list[ChoiceExample]) -> tuple[list, ...]:
        if self.train_path is None:
            return super().split_examples(examples)
        fractions = (1 - self.calib_fraction - self.val_fraction, self.calib_fraction, self.val_fraction)
        train, calib, val = seeded_split(self._load(self.train_path), fractions, self.seed)
        return train, calib, val, examples
