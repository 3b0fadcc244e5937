"""Multiple-choice questions from a user's own file: one row per question, a prompt template over its fields."""

from __future__ import annotations

import math
import string
from pathlib import Path
from typing import Any, Literal

from svd_lightning.batch import ChoiceExample
from svd_lightning.data.base import ChoiceDataModule
from svd_lightning.data.sources import DataError, check_example


class GenericChoiceDataModule(ChoiceDataModule):
    """Rows like ``{"question": "2+2?", "choices": ["3", "4"], "label": 1}`` in .json/.jsonl/.csv/.tsv/.parquet.

    Args:
        path: the data file.
        template: ``str.format`` template over the row's fields, giving the prompt.
        choices_field: a list of strings, or (CSV) one ``;``-separated string.
        label_field: index of the true choice (0-based), a list of indices (several true), or the
            true choice's text, as ``label_kind`` says.
        label_kind: ``index``: integers, or digit strings as CSV stores them (``"1"``, ``"0;2"`` for
            several); ``text``: the true choice's text (``"100"`` is the choice "100", not position 100);
            ``auto`` (default): digits are an index, any other string a choice's text (so CSV
            ``choices=1;2;3, label=1`` and JSON ``"label": 1`` both mean "2").
        continuation_prefix: put before each choice (the usual leading space of a continuation).
        **kwargs: see :class:`ChoiceDataModule`.
    """

    def __init__(
        self,
        path: str | dict[str, Any],
        template: str = "{question}",
        choices_field: str = "choices",
        label_field: str = "label",
        label_kind: Literal["auto", "index", "text"] = "auto",
        continuation_prefix: str = " ",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if label_kind not in ("auto", "index", "text"):
            raise ValueError(f"label_kind must be 'auto', 'index' or 'text', got {label_kind!r}")
        self.label_kind = label_kind
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
        field, kind = self.label_field, self.label_kind
        fix = {"index": "set label_kind: text if the column holds the answer's text",
               "text": "set label_kind: index if the column holds positions"}
        if kind == "text" or (kind == "auto" and isinstance(label, str) and not _digits(label)):
            text = str(label).strip()
            if text not in choices:
                what = "is not a choice's text" if kind == "text" else "is neither a choice's text nor an index"
                raise DataError(path, f"{label!r} {what}; choices: {choices}" + (f" ({fix['text']})" if kind == "text" else ""),
                                i, field)
            return [c == text for c in choices]
        if isinstance(label, str):
            cells = [x.strip() for x in label.split(";")]
            if not _digits(label):
                raise DataError(path, f"{label!r} is not an index (label_kind: index; {fix['index']})", i, field)
            label = [int(x) for x in cells]
        indices = label if isinstance(label, list) else [label]
        if not indices or not all(isinstance(k, int) and not isinstance(k, bool) for k in indices):
            raise DataError(path, f"expected an int index, a list of them or a choice's text, got {label!r}", i, field)
        bad = [k for k in indices if not 0 <= k < len(choices)]
        if bad:
            raise DataError(path, f"label {bad} is outside the {len(choices)} choices (labels are 0-based indices"
                                  + ("" if kind == "index" else "; label_kind: auto reads digits as an index: "
                                     f"{fix['index']}") + ")", i, field)
        return [k in indices for k in range(len(choices))]


def _digits(label: str) -> bool:
    """``"1"`` or ``"0;2"``: indices as CSV stores them."""
    return all(x.strip().isdigit() for x in label.split(";"))


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
