"""Multiple-choice questions from a user's own file: one row per question, a prompt template over its fields."""

from __future__ import annotations

import math
import string
from pathlib import Path
from typing import Any

from svd_lightning.batch import ChoiceExample
from svd_lightning.data.base import ChoiceDataModule, DataError, check_example


class GenericChoiceDataModule(ChoiceDataModule):
    """Rows like ``{"question": "2+2?", "choices": ["3", "4"], "label": 1}`` in .json/.jsonl/.csv/.tsv/.parquet.

    Args:
        path: the data file.
        template: ``str.format`` template over the row's fields, giving the prompt.
        choices_field: a list of strings, or (CSV) one ``;``-separated string.
        label_field: index of the true choice (0-based), a list of indices (several true), or the
            true choice's text. One rule for every format: an integer -- or a string of digits, as
            CSV stores it (``"1"``, ``"0;2"`` for several) -- is an index; any other string is a
            choice's text. So CSV ``choices=1;2;3, label=1`` and JSON ``"label": 1`` both mean "2".
        continuation_prefix: put before each choice (the usual leading space of a continuation).
        **kwargs: see :class:`ChoiceDataModule`.
    """

    def __init__(
        self,
        path: str | dict[str, Any],
        template: str = "{question}",
        choices_field: str = "choices",
        label_field: str = "label",
        continuation_prefix: str = " ",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.path, self.template = path, template
        self.choices_field, self.label_field, self.continuation_prefix = choices_field, label_field, continuation_prefix

    def load_examples(self) -> list[ChoiceExample]:
        return self.parse_file(self.path, self._parse)

    def _parse(self, path: Path, i: int, row: dict) -> ChoiceExample:
        for field in (self.choices_field, self.label_field):
            if row.get(field) in (None, "", []):
                raise DataError(path, f"missing or empty (the row has {sorted(row)})", i, field)
        for name in _template_fields(self.template):
            if name in row:  # a field the row lacks: the KeyError below names it
                _check_text(row[name], path, i, name)
        try:
            prompt = self.template.format(**row)
        except KeyError as e:
            raise DataError(path, f"template {self.template!r} needs a field this row lacks", i, e.args[0]) from e
        except (IndexError, ValueError) as e:
            raise DataError(path, f"template {self.template!r} does not format: {e}", i, "template") from e

        choices = row[self.choices_field]
        if isinstance(choices, str):
            choices = choices.split(";")
        if not isinstance(choices, (list, tuple)):
            raise DataError(path, f"expected a list of strings, got {choices!r}", i, self.choices_field)
        for k, c in enumerate(choices):
            _check_text(c, path, i, self.choices_field, f"choice {k} ")
        choices = [str(c).strip() for c in choices]
        is_true = self._truth(row[self.label_field], choices, path, i)
        ex = ChoiceExample(prompt, [self.continuation_prefix + c for c in choices], is_true, index=i)
        return check_example(ex, path, set_fields=(self.choices_field,), prompt_field="template")

    def _truth(self, label, choices: list[str], path: Path, i: int) -> list[bool]:
        field = self.label_field
        if isinstance(label, str):
            cells = [x.strip() for x in label.split(";")]
            if all(x.isdigit() for x in cells):  # CSV stores indices as strings: "1" or "0;2"
                label = [int(x) for x in cells]
            elif label.strip() in choices:  # the true choice's text
                return [c == label.strip() for c in choices]
            else:
                msg = f"{label!r} is neither a choice's text nor an index; choices: {choices}"
                raise DataError(path, msg, i, field)
        indices = label if isinstance(label, list) else [label]
        if not indices or not all(isinstance(k, int) and not isinstance(k, bool) for k in indices):
            raise DataError(path, f"expected an int index, a list of them or a choice's text, got {label!r}", i, field)
        bad = [k for k in indices if not 0 <= k < len(choices)]
        if bad:
            raise DataError(path, f"label {bad} is outside the {len(choices)} choices (labels are 0-based "
                                  "indices; digits are always read as an index)", i, field)
        return [k in indices for k in range(len(choices))]


def _template_fields(template: str) -> list[str]:
    """The row fields ``template`` reads (``{question}``, ``{meta[topic]}`` -> ``question``, ``meta``)."""
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    return list(dict.fromkeys(n.split(".")[0].split("[")[0] for n in names))


def _check_text(value, path: Path, i: int, field: str, what: str = "") -> None:
    """Text, or a finite number written as text; a missing value (null, NaN) is an error, not "None"."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise DataError(path, f"{what}is a missing value ({value!r}), not text", i, field)
    if isinstance(value, float) and math.isfinite(value):
        return
    raise DataError(path, f"{what}must be text, got {type(value).__name__} {value!r:.60}", i, field)
