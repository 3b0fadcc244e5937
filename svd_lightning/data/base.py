"""The base DataModule: questions in, seeded train/calib/test splits and contract batches out.

A task subclass implements :meth:`ChoiceDataModule.load_examples` (usually with
:meth:`ChoiceDataModule.parse_file`, which applies the ``bad_rows`` setting) and declares its
``metric`` family; splitting, tokenization and the dataloaders live here. See
``svd_lightning.batch`` for the batch contract.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Callable, ClassVar, Literal, Sequence

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader

from svd_lightning.batch import ChoiceExample, Tokenized, collate_choices, collate_lm
from svd_lightning.log import say
from svd_lightning.logger import start_run
from svd_lightning.metrics import MetricFamily

from svd_lightning.data.sources import DataError, DataSource, check_row, hub_dataset_id, source_rows

SKIPPED_FILE = "skipped_rows.jsonl"  # in the run directory, when bad_rows: skip dropped any
BadRows = Literal["error", "skip"]
# train / calib / val / test: the paper's 60 % train and 20 % test, its 20 % calib shared with a validation
# split of its own (steered validation scores questions μ̄ was not fitted on).
DEFAULT_SPLIT = (0.6, 0.1, 0.1, 0.2)
PAPER_SPLIT = (0.6, 0.2, 0.2)  # train / calib / test (svdecode.md §4): no validation split
SPLITS = ("train", "calib", "val", "test")
Overlap = Literal["drop", "error", "keep"]


def seeded_split(items: Sequence, fractions: Sequence[float], seed: int) -> list[list]:
    """Random partition with sizes ``round(cumulative fraction · n)``; each part keeps file order."""
    n = len(items)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    bounds = [0] + [round(sum(fractions[: k + 1]) * n) for k in range(len(fractions) - 1)] + [n]
    return [[items[i] for i in sorted(perm[a:b])] for a, b in zip(bounds, bounds[1:])]


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning can checkpoint mid-epoch (it implements ``state_dict``).

    The state is the shuffling generator at the start of the epoch and the batches yielded so far;
    after ``load_state_dict`` the next iteration replays the same order and skips those batches,
    so a resumed warm start sees exactly the batches an uninterrupted one would. (Lightning does
    not prefetch from sized loaders, so "yielded" is "trained on" when a checkpoint is written.)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._epoch_state: torch.Tensor | None = None
        self._yielded = 0
        self._resume: dict | None = None

    def __iter__(self):
        resume, self._resume = self._resume, None
        if resume is not None and resume.get("generator") is not None and self.generator is not None:
            self.generator.set_state(resume["generator"])
        self._epoch_state = None if self.generator is None else self.generator.get_state()
        skip = 0 if resume is None else int(resume["batches"])
        self._yielded = 0
        for batch in super().__iter__():
            self._yielded += 1
            if self._yielded > skip:
                yield batch

    def state_dict(self) -> dict:
        return {"generator": self._epoch_state, "batches": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)


class ChoiceDataModule(L.LightningDataModule):
    """Base for multiple-choice tasks.

    Subclasses implement :meth:`load_examples` and set ``metric``: ``"choice"`` (acc / acc_norm)
    or ``"truthfulqa"`` (MC1 / MC2 / MC3 over choice sets 0 and 1); the model scores with it. The
    tokenizer comes from the attached LightningModule (``module.tokenizer``) or from
    ``dm.tokenizer = tok`` when used standalone.

    Splits: ``train`` warm-starts the adapter; ``calib`` solves μ̄ (and the contrastive γ); ``val`` is
    what ``validate`` and validation during ``fit`` score -- questions μ̄ was not fitted on, and never
    the test questions (what a ``ModelCheckpoint`` or ``EarlyStopping`` monitors); ``test`` is scored
    by ``test`` / ``predict``. With a three-way ``split`` there is no ``val`` split: ``fit`` does not
    validate, and ``validate`` is an error.

    Args:
        batch_size: questions per choice batch (val/test/predict); each question yields one row per choice.
        train_batch_size: questions per LM batch of the warm start.
        calib_batch_size: questions per batch of the calibration pass (teacher-forced, or choice
            batches when a solver needs the choices). No gradients are kept there, so it can be
            larger than ``train_batch_size``; μ̄ does not depend on it.
        max_length: token budget per row; longer prompts are cut from the left, the answer is kept.
        split: train/calib/val/test fractions of the questions (seeded; default 60/10/10/20), or
            train/calib/test (e.g. :data:`PAPER_SPLIT`, 60/20/20: no validation split).
        seed: seeds the split and the train shuffling.
        limit_train, limit_calib, limit_val, limit_test: keep only the first k questions of each split.
        num_workers: DataLoader workers.
        bad_rows: ``error`` (default): a row that does not parse stops the run, naming file, row and
            field. ``skip``: such rows are dropped and counted; the first few are printed and all of
            them are written to ``skipped_rows.jsonl`` in the run directory. Errors of the file
            itself (not JSON, not UTF-8, no rows) stop the run either way. A choice too long for
            ``max_length`` is a bad row too, found once the tokenizer is known (in ``setup``).
        overlap: a calib or test question that is also in an earlier split (the same prompt and
            choices; test after train or calib) would be scored on what was trained or selected on.
            ``drop`` (default) removes it from the later split and says how many; ``error`` refuses
            the data; ``keep`` keeps it (and says so).
    """

    metric: ClassVar[MetricFamily] = "choice"
    hub_dataset: ClassVar[str | None] = None  # the Hub dataset the task's questions are (the model card's `datasets`)

    def __init__(
        self,
        batch_size: int = 1,
        train_batch_size: int = 1,
        calib_batch_size: int = 8,
        max_length: int = 512,
        split: tuple[float, ...] = DEFAULT_SPLIT,
        seed: int = 0,
        limit_train: int | None = None,
        limit_calib: int | None = None,
        limit_test: int | None = None,
        limit_val: int | None = None,
        num_workers: int = 0,
        bad_rows: BadRows = "error",
        overlap: Overlap = "drop",
    ):
        super().__init__()
        if bad_rows not in ("error", "skip"):
            raise ValueError(f"bad_rows must be 'error' or 'skip', got {bad_rows!r}")
        if overlap not in ("drop", "error", "keep"):
            raise ValueError(f"overlap must be 'drop', 'error' or 'keep', got {overlap!r}")
        split = tuple(float(f) for f in split)
        if len(split) not in (3, 4) or min(split) < 0 or abs(sum(split) - 1.0) > 1e-6:
            raise ValueError(f"split must be train/calib/val/test (or train/calib/test) fractions: three or four "
                             f"non-negative numbers summing to 1, got {split}")
        sizes = {"batch_size": batch_size, "train_batch_size": train_batch_size,
                 "calib_batch_size": calib_batch_size, "max_length": max_length}
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.save_hyperparameters()
        self.batch_size, self.train_batch_size, self.max_length = batch_size, train_batch_size, max_length
        self.calib_batch_size = calib_batch_size
        self.split, self.seed, self.num_workers = split, seed, num_workers
        self.limits = (limit_train, limit_calib, limit_val, limit_test)
        self.bad_rows, self.overlap = bad_rows, overlap
        self._lengths_checked = False
        self.skipped: list[DataError] = []  # rows dropped by bad_rows: skip, in file order
        self._read_from: set[str | None] = set()  # Hub datasets of the load_dataset specs read (datasets())
        self.tokenizer = None  # set by the user for standalone use; a trainer's module takes precedence
        self.tokenized: Tokenized | None = None
        self.train_set: list[ChoiceExample] | None = None
        self.calib_set: list[ChoiceExample] = []
        self.val_set: list[ChoiceExample] = []
        self.test_set: list[ChoiceExample] = []
        self.num_examples = 0

    def datasets(self) -> list[str]:
        """Hub ids of the datasets the questions came from: the task's own and any ``load_dataset`` spec's."""
        return sorted({d for d in [self.hub_dataset, *self._read_from] if d})

    # --- what a task implements ---------------------------------------------------------------

    def load_examples(self) -> list[ChoiceExample]:
        """All questions of the task that are kept, validated, with ``index`` = position in the file."""
        raise NotImplementedError

    def parse_file(self, path: DataSource, parse: Callable[[Path, int, dict], ChoiceExample]) -> list[ChoiceExample]:
        """``parse(source, row_number, row)`` over the rows of ``path`` -- a file, a ``datasets.Dataset`` (or a
        one-split ``DatasetDict``), or a ``load_dataset`` spec (:func:`source_rows`); a row's ``DataError``
        follows ``bad_rows``."""
        self._read_from.add(hub_dataset_id(path))
        path, rows = source_rows(path)
        kept, skipped = [], []
        for i, row in enumerate(rows):
            try:
                ex = parse(path, i, check_row(path, i, row))
                ex.source = str(path)
                kept.append(ex)
            except DataError as err:
                if self.bad_rows == "error":
                    raise err.with_hint() from None
                skipped.append(err)
        self.skipped = [e for e in self.skipped if e.path != str(path)] + skipped  # a re-read replaces
        if skipped:
            shown = "; ".join(str(e) for e in skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
            say(f"{path}: skipped {len(skipped)} of {len(rows)} rows (bad_rows: skip): {shown}")
        if not kept:
            raise DataError(path, f"no usable rows: all {len(rows)} were bad")
        return kept

    def split_examples(self, examples: list[ChoiceExample]) -> tuple[list, ...]:
        """Seeded (train, calib, val, test) -- or (train, calib, test) for a three-way ``split`` -- partition
        of ``examples``; override when a task ships its own files (either shape)."""
        return tuple(seeded_split(examples, self.split, self.seed))

    # --- Lightning hooks ------------------------------------------------------------------------

    def prepare_data(self) -> None:
        # Reading the files once up front surfaces data errors before any model is loaded.
        self._ensure_splits()

    def setup(self, stage: str | None = None) -> None:
        self._ensure_splits()
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        tokenizer = getattr(module, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self.tokenizer
        if tokenizer is None:
            raise RuntimeError(
                f"{type(self).__name__} has no tokenizer: attach it to a Trainer whose LightningModule has a "
                "`tokenizer` attribute (set in its __init__), or set `datamodule.tokenizer = tokenizer` before setup()"
            )
        self.tokenized = Tokenized(tokenizer, self.max_length)
        self._check_lengths()
        self.check_splits(stage)
        if getattr(stage, "value", stage) == "fit" and not self.val_set:
            say(f"{type(self).__name__}: no val split (split={list(self.split)}): fit does not validate; give split "
                "four fractions, train/calib/val/test, to score a val split each epoch")
        self._record_skipped()

    def _check_lengths(self) -> None:
        """Every choice must fit ``max_length`` (the prompt is cut from the left; a choice cannot be):
        a bad row under ``bad_rows``, named by file, row and choice, before any training."""
        if self._lengths_checked:
            return
        self._lengths_checked = True
        tok, budget = self.tokenized.tokenizer, self.max_length
        for split in (self.train_set, self.calib_set, self.val_set, self.test_set):
            for ex in list(split):
                lengths = [len(ids) for ids in tok(list(ex.choices), add_special_tokens=False)["input_ids"]]
                too_long = [j for j, n in enumerate(lengths) if n >= budget]
                if not too_long:
                    continue
                j = too_long[0]
                err = DataError(ex.source or type(self).__name__, f"choice {j} ({ex.choices[j][:40]!r}…) is "
                                f"{lengths[j]} tokens, which does not fit max_length={budget} (raise max_length)",
                                ex.index, "choices")
                if self.bad_rows == "error":
                    raise err.with_hint()
                split.remove(ex)
                self.skipped.append(err)
                say(f"skipped (bad_rows: skip): {err}")

    def check_splits(self, stage: str | None) -> None:
        """An empty split the stage needs is an error now, not a silent no-op after training."""
        self._ensure_splits()
        needs = {"fit": ("train", "calib"), "validate": ("calib", "val"), "test": ("test",), "predict": ("test",)}
        sizes = dict(zip(SPLITS, map(len, (self.train_set, self.calib_set, self.val_set, self.test_set))))
        for name in needs.get(stage, ()):
            if sizes[name] == 0:
                given = ", ".join(f"{k} {v}" for k, v in sizes.items())
                fix = (" (a three-way split has none: give split four fractions, train/calib/val/test)"
                       if name == "val" and len(self.split) == 3 else "")
                raise ValueError(
                    f"{type(self).__name__}: the {name} split is empty ({given} of {self.num_examples} questions; "
                    f"split={list(self.split)}, limits={list(self.limits)}); {getattr(stage, 'value', stage)} needs it{fix}"
                )

    def _record_skipped(self) -> None:
        trainer = self.trainer
        if trainer is None or not self.skipped:
            return
        writer = start_run(trainer)  # DataModule.setup runs before the module's: this stage's run
        if writer is not None:
            writer.write_text(SKIPPED_FILE, "".join(json.dumps(e.record()) + "\n" for e in self.skipped))
            say(f"{len(self.skipped)} skipped rows listed in {writer.target.resolve() / SKIPPED_FILE}")

    def _ensure_splits(self) -> None:
        if self.train_set is not None:
            return
        examples = self.load_examples()
        if not examples:
            raise ValueError(f"{type(self).__name__}.load_examples() returned no questions")
        self.num_examples = len(examples)
        parts = list(self.split_examples(examples))
        if len(parts) == 3:  # no validation split
            parts.insert(2, [])
        limited = [part if k is None else part[:k] for part, k in zip(parts, self.limits)]
        self.train_set, self.calib_set, self.val_set, self.test_set = self._without_overlap(*limited)

    def _without_overlap(self, train: list, *later: list) -> list[list]:
        """Apply ``overlap`` to a calib, val or test question also in an earlier split."""
        key = lambda ex: (ex.prompt, tuple(ex.contexts), tuple(ex.choices))  # noqa: E731
        seen = {key(ex): ("train", ex) for ex in train}
        kept = []
        for name, split in zip(SPLITS[1:], later):
            repeats = [(ex, seen[key(ex)]) for ex in split if key(ex) in seen]
            if repeats and self.overlap != "keep":
                ex, (earlier, first) = repeats[0]
                where = f"{ex.source or 'the data'}, row {ex.index} (= row {first.index} in {earlier})"
                if self.overlap == "error":
                    raise DataError(ex.source or type(self).__name__, f"{len(repeats)} {name} question(s) also in an "
                                    f"earlier split, e.g. row {ex.index} = row {first.index} in {earlier} (set "
                                    "overlap: drop to remove them from the later split, or keep)", ex.index)
                say(f"overlap: drop -- {len(repeats)} {name} question(s) also in an earlier split were removed "
                    f"from {name}, e.g. {where}")
                dropped = {id(ex) for ex, _ in repeats}
                split = [ex for ex in split if id(ex) not in dropped]
            elif repeats:
                say(f"overlap: keep -- {len(repeats)} {name} question(s) are also in an earlier split")
            kept.append(split)
            seen.update({key(ex): (name, ex) for ex in split if key(ex) not in seen})
        return [train, *kept]

    def _loader(self, examples: list, collate, batch_size: int, shuffle: bool = False) -> DataLoader:
        if self.tokenized is None:
            raise RuntimeError(f"call {type(self).__name__}.setup() before asking for a dataloader")
        return (ResumableLoader if shuffle else DataLoader)(
            examples,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            collate_fn=partial(collate, tok=self.tokenized),  # a partial pickles for worker processes
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, collate_lm, self.train_batch_size, shuffle=True)

    def calib_dataloader(self) -> DataLoader:
        """Teacher-forced calib split; not a Lightning hook, our callbacks call it."""
        return self._loader(self.calib_set, collate_lm, self.calib_batch_size)

    def calib_choice_dataloader(self) -> DataLoader:
        """The calib split as choice batches of ``calib_batch_size`` questions: the one calibration pass
        when a solver needs the choices (``choice_nll``, the contrastive γ); their reference rows
        give μ̄'s token statistics."""
        return self._loader(self.calib_set, collate_choices, self.calib_batch_size)

    def choice_dataloader(self, split: str) -> DataLoader:
        """The questions of ``split`` (train, calib, val or test) as choice batches of ``batch_size``, in order."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self._loader(getattr(self, f"{split}_set"), collate_choices, self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        """The val split, scored: neither μ̄'s calibration questions nor the test questions. None (a
        three-way ``split``): no loader, so Lightning skips validation."""
        return self.choice_dataloader("val") if self.val_set else []

    def test_dataloader(self) -> DataLoader:
        return self.choice_dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.choice_dataloader("test")

    def describe(self) -> dict:
        self._ensure_splits()
        return {
            "task": type(self).__name__,
            "metric": self.metric,
            "questions": self.num_examples,
            "skipped": len(self.skipped),
            "train": len(self.train_set),
            "calib": len(self.calib_set),
            "val": len(self.val_set),
            "test": len(self.test_set),
            "test_rows": sum(len(ex.choices) for ex in self.test_set),
        }
