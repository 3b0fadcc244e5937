"""Commonsense reasoning tasks in the LLM-Adapters format ``{instruction, input, output, answer}``.

The options live inside ``instruction``, e.g. (ARC)::

    Please choose the correct answer to the question: {q}\\n\\nAnswer1: {a} Answer2: {b} ...
    \\n\\nAnswer format: answer1/answer2/...

boolq has no option list (labels true/false), piqa separates ``Solution1:``/``Solution2:`` by blank lines,
hellaswag (``Ending1..4``) and ARC (``Answer1..5``) by single spaces.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from svd_lightning.batch import ChoiceExample
from svd_lightning.data.base import ChoiceDataModule, DataError, check_example, read_records, resolve_path, seeded_split

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

_FORMAT = re.compile(r"\n\nAnswer format: (\S+)\s*$")
_PREAMBLE = re.compile(r"^Please [^:]*:\s*")  # "Please choose the correct answer to the question: "
_NUMBERED = re.compile(r"^(solution|ending|answer)(\d+)$")

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

    if scoring == "label":
        extra = row.get("input") or ""
        prompt = (TEMPLATE_WITH_INPUT if extra.strip() else TEMPLATE).format(instruction=instruction, input=extra)
        choices = [" " + label for label in labels]
    elif scoring == "option_text":
        prompt, options = _parse_options(instruction[: fmt.start()], labels, path, i)
        choices = [" " + text for text in options]
    else:
        raise ValueError(f"scoring must be 'label' or 'option_text', got {scoring!r}")
    ex = ChoiceExample(prompt, choices, is_true, index=i, answer=choices[is_true.index(True)])
    return check_example(ex, path, set_fields=("instruction",), prompt_field="instruction")


def _parse_options(body: str, labels: list[str], path, i: int) -> tuple[str, list[str]]:
    """(lm-eval style prompt, option texts in label order) from the instruction without its format line."""
    if sorted(labels) == ["false", "true"]:  # boolq: the labels are the options
        question = _PREAMBLE.sub("", body.strip(), count=1)
        return f"Question: {question}\nAnswer:", labels
    kinds = {m.group(1) for m in map(_NUMBERED.match, labels) if m}
    if len(kinds) != 1 or any(_NUMBERED.match(label) is None for label in labels):
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
    context = _PREAMBLE.sub("", body[: start.start()].strip(), count=1)
    # hellaswag continues the sentence itself; piqa/ARC are questions
    prompt = context if name == "Ending" else f"Question: {context}\nAnswer:"
    return prompt, texts


class CommonsenseDataModule(ChoiceDataModule):
    """boolq / piqa / hellaswag / ARC-e / ARC-c files from LLM-Adapters (``../shared/data/commonsense``).

    Args:
        test_path: the task's ``test.json``.
        train_path: the task's ``train.json``; if given, train and calib come from it (split by
            ``calib_fraction``) and the whole test file is the test split. Otherwise the test file is
            split three ways by ``split``.
        calib_fraction: calib share of the train file.
        scoring: ``"label"`` scores the paper's label words (``... the correct answer is`` + `` answer1``)
            under the LLM-Adapters prompt; ``"option_text"`` scores the options' own text under an
            lm-eval style prompt (``Question: ...\\nAnswer:``), which small models handle better.
        **kwargs: see :class:`ChoiceDataModule`.
    """

    def __init__(
        self,
        test_path: str,
        train_path: str | None = None,
        calib_fraction: float = 0.2,
        scoring: Scoring = "option_text",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if scoring not in ("label", "option_text"):
            raise ValueError(f"scoring must be 'label' or 'option_text', got {scoring!r}")
        if not 0.0 <= calib_fraction < 1.0:
            raise ValueError(f"calib_fraction must be in [0, 1), got {calib_fraction}")
        self.test_path, self.train_path = test_path, train_path
        self.calib_fraction, self.scoring = calib_fraction, scoring

    def _load(self, path: str | Path) -> list[ChoiceExample]:
        path = resolve_path(path)
        return [parse_row(row, self.scoring, path, i) for i, row in enumerate(read_records(path))]

    def load_examples(self) -> list[ChoiceExample]:
        return self._load(self.test_path)

    def split_examples(self, examples: list[ChoiceExample]) -> tuple[list, list, list]:
        if self.train_path is None:
            return super().split_examples(examples)
        fractions = (1 - self.calib_fraction, self.calib_fraction)
        train, calib = seeded_split(self._load(self.train_path), fractions, self.seed)
        return train, calib, examples
