"""Where a DataModule's rows come from, read and checked: a file (JSON, JSON Lines, CSV, or whatever ``datasets``
reads), a ``datasets.Dataset``, or a ``load_dataset`` spec; every error names the file, the row and the field."""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Sequence


from svd_lightning.batch import ChoiceExample
from svd_lightning.log import InputError

# Data paths resolve without looking at where the package is installed: as given (relative to the working
# directory), else under the data root SVD_LIGHTNING_DATA (a folder laid out like this project's
# ../shared/data, whose prefix a path may keep), else a sample shipped in the package ("package:NAME").
DATA_ENV = "SVD_LIGHTNING_DATA"
SHARED_DATA = "../shared/data"  # the layout's prefix in the shipped configs (this repository's checkout)
PACKAGE_DATA = "package:"


class DataError(InputError):
    """Bad input data; the message names the file, the row (0-based) and the field."""

    def __init__(self, path: str | Path, message: str, row: int | None = None, field: str | None = None):
        where = str(path)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}")
        self.path, self.row, self.field, self.reason = str(path), row, field, message

    def record(self) -> dict:
        return {"path": self.path, "row": self.row, "field": self.field, "reason": self.reason}

    def with_hint(self) -> "DataError":
        """The same error, telling how to drop such rows instead."""
        return DataError(self.path, f"{self.reason} (set bad_rows: skip to drop such rows)", self.row, self.field)


class DataFileNotFound(InputError, FileNotFoundError):
    """A data file that is not where its setting points (the CLI prints it as one line, exit 2)."""


def resolve_path(path: str | Path) -> Path:
    """A data file's path: ``package:NAME`` (a sample shipped in the package), else ``path`` as given
    (relative to the working directory), else under ``$SVD_LIGHTNING_DATA`` (its ``../shared/data/`` prefix
    dropped). A missing file is a :class:`DataFileNotFound` naming every place looked at and the settings."""
    text = str(path)
    if text.startswith(PACKAGE_DATA):
        from importlib.resources import files

        sample = files("svd_lightning.data") / "samples" / text[len(PACKAGE_DATA):]
        if sample.is_file():
            return Path(str(sample))
        shipped = sorted(p.name for p in (files("svd_lightning.data") / "samples").iterdir() if p.name.endswith(".json"))
        raise DataFileNotFound(f"data file {text!r}: the package ships no such sample (it ships {', '.join(shipped)})")
    p = Path(text).expanduser()
    if p.exists():
        return p
    tried = [str(p if p.is_absolute() else Path.cwd() / p)]
    root = os.environ.get(DATA_ENV)
    if root and not p.is_absolute():
        rest = text[len(SHARED_DATA) + 1:] if text.startswith(SHARED_DATA + "/") else text
        candidate = Path(root).expanduser() / rest
        if candidate.exists():
            return candidate
        tried.append(f"{candidate} (${DATA_ENV})")
    raise DataFileNotFound(
        f"data file {text!r} not found (looked at {' and '.join(tried)}). Point the DataModule's path at it "
        f"(e.g. --data.init_args.path FILE), or set {DATA_ENV} to a folder laid out like shared/data "
        f"(truthfulqa/v1_2021/mc_task.json, commonsense/...); `package:truthfulqa_mc_40.json` is a 40-question sample"
        + ("" if root else f" ({DATA_ENV} is not set)")
    )


class _JsonObject(dict):
    """A JSON object that remembers duplicate keys, which ``json`` would silently drop."""

    duplicates: list[str]


def _pairs_hook(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject(pairs)
    obj.duplicates = [k for k, n in Counter(k for k, _ in pairs).items() if n > 1]
    return obj


def check_row(path: Path, i: int, row: Any) -> dict:
    """A row is an object whose keys are unique (JSON would silently keep the last of two)."""
    if not isinstance(row, dict):
        raise DataError(path, f"expected a JSON object, got {type(row).__name__}", row=i)
    for key, value in [(None, row), *row.items()]:
        if isinstance(value, _JsonObject) and value.duplicates:
            raise DataError(path, f"duplicate key(s) {value.duplicates} (JSON keeps only the last)", i, key)
    return row


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    try:
        return path.read_bytes().decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8: byte {e.object[e.start]:#04x} at offset {e.start} cannot be "
                              f"decoded ({e.reason}); re-save the file as UTF-8") from None


def read_records(path: str | Path) -> list:
    """Rows of a .json (list of objects), .jsonl or .csv file; other extensions via ``datasets``.

    File-level problems raise :class:`DataError`; rows are checked one by one by :func:`check_row`.
    """
    path = resolve_path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            rows = json.loads(_read_text(path), object_pairs_hook=_pairs_hook)
        except json.JSONDecodeError as e:
            raise DataError(path, f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
        if not isinstance(rows, list):
            raise DataError(path, f"expected a JSON list of objects at the top level, got {type(rows).__name__}")
    elif suffix in (".jsonl", ".ndjson"):
        rows = []
        for lineno, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line, object_pairs_hook=_pairs_hook))
            except json.JSONDecodeError as e:
                raise DataError(path, f"malformed JSON on line {lineno}: {e.msg}", row=len(rows)) from e
    elif suffix == ".csv":
        rows = _read_csv(path)
    else:
        rows = _read_with_datasets(path)
    if not rows:
        raise DataError(path, "the file has no rows")
    return rows


# Where a DataModule's rows come from: a file path (str / Path), a ``datasets.Dataset`` or one-split
# ``DatasetDict`` (Python), or a ``datasets.load_dataset`` spec: {path, name, split, data_files, ...} (YAML).
DataSource = Any
_SPEC_KEYS = {"path", "name", "split", "data_files", "data_dir", "revision"}


def source_rows(source: DataSource) -> tuple[Path, list]:
    """``(label, rows)`` of a data source: rows as plain dicts, and what names the source in every error
    (the file, or a description of the dataset) -- so a bad row names its source, row and field."""
    if isinstance(source, (str, Path)):
        path = resolve_path(source)
        return path, read_records(path)
    import datasets

    if isinstance(source, dict) and not isinstance(source, datasets.DatasetDict):
        unknown = sorted(set(source) - _SPEC_KEYS)
        if "path" not in source or unknown:
            raise InputError(f"a data source given as a mapping is a datasets.load_dataset spec: keys {sorted(_SPEC_KEYS)}, "
                             f"'path' required; got {sorted(source)}" + (f" (unknown: {unknown})" if unknown else ""))
        label = Path("load_dataset(" + ", ".join(f"{k}={v!r}" for k, v in source.items()) + ")")
        try:
            loaded = datasets.load_dataset(**source)
        except Exception as err:  # offline, a missing file or config: name the spec
            raise DataError(label, f"datasets could not load it: {type(err).__name__}: {err}") from None
        return source_rows_of_dataset(loaded, label)
    return source_rows_of_dataset(source, None)


def source_rows_of_dataset(dataset: Any, label: Path | None) -> tuple[Path, list]:
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if len(dataset) != 1:
            raise InputError(f"a DatasetDict with splits {sorted(dataset)}: give one split, e.g. dataset[{sorted(dataset)[0]!r}] "
                             "(or 'split' in the load_dataset spec); svd-lightning draws train/calib/test from it itself")
        (name, dataset), = dataset.items()
    if not isinstance(dataset, datasets.Dataset):
        raise InputError(f"a data source must be a file path, a datasets.Dataset / DatasetDict or a load_dataset spec, "
                         f"got {type(dataset).__name__}")
    if label is None:
        name = dataset.info.dataset_name or "in memory"
        label = Path(f"datasets.Dataset({name}, {dataset.num_rows} rows)")
    rows = [dict(row) for row in dataset]
    if not rows:
        raise DataError(label, "the dataset has no rows")
    return label, rows


def _read_csv(path: Path) -> list[dict]:
    # utf-8-sig: TruthfulQA's v1 CSV starts with a BOM that would otherwise end up in the first header
    with io.StringIO(_read_text(path, "utf-8-sig"), newline="") as f:
        reader = csv.DictReader(f, strict=True)
        rows = []
        try:
            for row in reader:
                if None in row:  # DictReader files surplus cells under the key None
                    raise DataError(path, f"{len(reader.fieldnames) + len(row[None])} cells for "
                                    f"{len(reader.fieldnames)} columns", row=len(rows))
                missing = [k for k, v in row.items() if v is None]
                if missing:
                    raise DataError(path, f"too few cells, no value for {missing}", row=len(rows))
                rows.append(row)
        except csv.Error as e:
            raise DataError(path, f"malformed CSV near line {reader.line_num}: {e}", row=len(rows)) from e
    return rows


def _read_with_datasets(path: Path) -> list[dict]:
    import datasets
    from datasets import packaged_modules

    # the (private) table load_dataset itself uses to pick a builder by extension
    builder, kwargs = getattr(packaged_modules, "_EXTENSION_TO_MODULE", {}).get(path.suffix, (None, {}))
    if builder not in ("csv", "json", "parquet", "arrow"):
        raise DataError(path, "unsupported extension; use .json, .jsonl, .csv, .tsv, .parquet or .arrow")
    try:
        return list(datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs))
    except Exception as e:
        raise DataError(path, f"could not be read by datasets ({builder}): {e}") from e


def check_example(
    ex: ChoiceExample, path: str | Path, set_fields: Sequence[str] = ("choices",), prompt_field: str = "prompt"
) -> ChoiceExample:
    """Rejects empty prompts/choices, single-choice sets, duplicate choices and sets without a true answer.

    ``set_fields[s]`` is the source field of choice set ``s``, so the error points at the file's field.
    A choice is its (context, continuation) pair: partial evaluation repeats the continuation.
    """
    row = ex.index
    if not ex.prompt.strip() or not all(c.strip() for c in ex.contexts):
        raise DataError(path, "empty prompt", row, prompt_field)
    if not ex.choices:
        raise DataError(path, "no choices", row, set_fields[0])
    for s in sorted(set(ex.choice_sets)):
        field = set_fields[min(s, len(set_fields) - 1)]
        members = [j for j, cs in enumerate(ex.choice_sets) if cs == s]
        texts = [ex.choices[j].strip() for j in members]
        if not all(texts):
            raise DataError(path, f"choice {texts.index('')} is an empty string", row, field)
        if len(members) < 2:
            raise DataError(path, f"only one choice ({texts[0]!r}): nothing to choose between", row, field)
        pairs = [(ex.context(j).strip(), ex.choices[j].strip()) for j in members]
        dups = [c if not ex.contexts else f"{ctx} | {c}" for (ctx, c), n in Counter(pairs).items() if n > 1]
        if dups:
            raise DataError(path, f"duplicate choices {dups}", row, field)
        if not any(t for t, cs in zip(ex.is_true, ex.choice_sets) if cs == s):
            raise DataError(path, "no choice is marked true", row, field)
    return ex


def hub_dataset_id(source: DataSource) -> str | None:
    """The Hugging Face Hub dataset a ``load_dataset`` spec names (``{path: owner/name, ...}``), else None."""
    path = source.get("path") if isinstance(source, dict) else None
    looks_like_id = isinstance(path, str) and path.count("/") == 1 and not path.startswith((".", "/", "~"))
    return path if looks_like_id and not Path(path).exists() else None


