"""Writing a run: :class:`RunWriter` builds it in a hidden sibling and renames it into place whole
(see :mod:`svd_lightning.run`), under the next free name when the target is taken."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from svd_lightning.files import (atomic_write_bytes, atomic_write_text, fault_point, follow_umask, fsync_dir,
                                  write_json)
from svd_lightning.log import say
from svd_lightning.run.record import (
    ADAPTER_DIR,
    FORMAT_VERSION,
    METRICS_FILE,
    RUN_FILE,
    RunError,
    SteeringRun,
    adapter_hash,
    library_versions,
    tokenizer_hash,
)

PARTIAL = ".partial-"  # staging directories: .<name>.partial-<pid>-<token>


def next_version(root: Path) -> Path:
    """``root/version_<n>`` with n one past the largest in use (``version_0`` in an empty folder)."""
    names = [p.name for p in root.iterdir()] if root.is_dir() else []
    numbers = [int(m.group(1)) for n in names if (m := re.fullmatch(r"version_(\d+)", n))]
    return root / f"version_{max(numbers, default=-1) + 1}"


def next_free(target: Path) -> Path:
    """The first name after ``target`` that no directory uses: ``version_<max+1>``, else ``<name>-<k>``."""
    parent, name = target.parent, target.name
    match = re.fullmatch(r"version_(\d+)", name)
    if match:
        after = next_version(parent)
        return after if int(after.name[8:]) > int(match.group(1)) else parent / f"version_{int(match.group(1)) + 1}"
    k = 1
    while (parent / f"{name}-{k}").exists():
        k += 1
    return parent / f"{name}-{k}"


def is_taken(path: Path) -> bool:
    """A path a new run may not use: a file, or a directory with anything in it."""
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


class RunWriter:
    """One run being built: every file goes into a staging sibling of ``target``, which
    :meth:`commit` renames into place whole (see the module docstring).

    ``hold``: a caller that adds more to the run after the stage that would commit it (the CLI's
    ``fit`` then ``test``) sets it and commits itself.
    """

    def __init__(self, target: str | os.PathLike):
        if not os.fspath(target).strip():
            raise ValueError("the run's directory is empty (''): name the folder to write it to")
        self.target = Path(target)
        self.path = self.target.parent / f".{self.target.name}{PARTIAL}{os.getpid()}-{secrets.token_hex(3)}"
        self.hold = False
        self.committed: Path | None = None
        self.run: SteeringRun | None = None  # the record written by write_run, if any

    def directory(self) -> Path:
        """The staging directory (created on first use); an error once the run is finished."""
        if self.committed is not None:
            raise RunError(f"{self.committed} is a finished run: nothing writes into it (start a new run)")
        if not self.path.is_dir():
            stale = sorted(p.name for p in self.target.parent.glob(f".*{PARTIAL}*")) if self.target.parent.is_dir() else []
            self.path.mkdir(parents=True)
            if stale:
                say(f"{len(stale)} partial run(s) of interrupted commands in {self.target.parent.resolve()} "
                    f"({', '.join(stale[:3])}{', …' if len(stale) > 3 else ''}): remove them once you no longer "
                    "need their checkpoints")
        return self.path

    @contextlib.contextmanager
    def _writing(self, name: str) -> Iterator[None]:
        """An I/O error (disk full, read-only, ...) as an error that names the run and the file."""
        fault_point(f"write:{name}")
        try:
            yield
        except OSError as err:
            raise RunError(f"could not write {name} of run {self.target} ({err.strerror or err}); the run is not "
                           "committed and the runs before it are as they were") from err

    def write_text(self, name: str, text: str) -> Path:
        with self._writing(name):
            return atomic_write_text(self.directory() / name, text)

    def write_bytes(self, name: str, data: bytes) -> Path:
        with self._writing(name):
            return atomic_write_bytes(self.directory() / name, data)

    def write_json(self, name: str, payload: Any) -> Path:
        with self._writing(name):
            return write_json(self.directory() / name, payload)

    def save_torch(self, name: str, obj: Any) -> Path:
        import torch

        with self._writing(name):
            path = self.directory() / name
            tmp = path.with_name(f".{name}.tmp")
            torch.save(obj, tmp)
            os.replace(tmp, path)
            return path

    def save_adapter(self, model, state_dict: dict | None = None, base_name: str | None = None) -> Path:
        """peft ``save_pretrained`` into the run's ``adapter/`` (replacing one saved earlier in this run).
        ``state_dict``: the adapter's whole tensors when the model is sharded
        (:func:`svd_lightning.sharding.full_adapter_state`), so the files are those of an unsharded run.
        ``base_name``: the base model as ``adapter_config.json`` names it (``AutoPeftModelForCausalLM`` loads it
        by that name on another machine), instead of the loaded model's local path or none."""
        with self._writing(ADAPTER_DIR):
            final = self.directory() / ADAPTER_DIR
            tmp = Path(tempfile.mkdtemp(dir=self.path, prefix=f".{ADAPTER_DIR}."))
            model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
            if base_name is not None:  # set in the file, after saving: peft looks a base name up on the Hub when it saves
                config_file = tmp / "adapter_config.json"
                config = json.loads(config_file.read_text(encoding="utf-8"))
                config["base_model_name_or_path"] = base_name
                config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            (tmp / "README.md").unlink(missing_ok=True)  # peft's empty template: the run's README.md is its one card
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            return final

    def write_run(self, model, run: "SteeringRun", tokenizer=None, adapter_state: dict | None = None) -> Path:
        """The adapter (``adapter_state``: see :meth:`save_adapter`), then ``steering.json`` bound to it
        and to the tokenizer by hash."""
        if tokenizer is not None:
            run.tokenizer_sha256 = tokenizer_hash(tokenizer)
        if run.tokenizer_sha256 is None:
            raise RunError(f"{self.target}: a run records its tokenizer's hash: pass `tokenizer` or set tokenizer_sha256")
        from svd_lightning.models import portable_base

        base_name, run.base_weights = portable_base(run.model)
        adapter = self.save_adapter(model, adapter_state, base_name)
        run.adapter_sha256 = adapter_hash(adapter)
        run.versions = run.versions or library_versions()
        run.format_version = FORMAT_VERSION
        run.validate(f"{self.target}/{RUN_FILE}")
        self.run = run
        return self.write_json(RUN_FILE, run.to_dict())

    def update_run(self, **changes) -> Path:
        """Rewrite ``steering.json`` with fields found later for the same weights (the contrastive γ)."""
        if self.run is None:
            raise RunError(f"{self.target}: no run record written yet to update")
        self.run = dataclasses.replace(self.run, **changes)
        return self.write_json(RUN_FILE, self.run.to_dict())

    def discard(self) -> None:
        """Remove the staging directory of a run that will not be committed (an API call that failed)."""
        if self.committed is None:
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(self) -> Path:
        """Rename the staging directory into place; a taken target (another run got there first) moves
        this run to the next free name. Returns the run's directory."""
        if self.committed is not None:
            return self.committed
        fault_point("commit")
        staging = self.directory()
        if self.run is not None:  # the model card, from everything the run now holds
            from svd_lightning.card import CARD_FILE, model_card

            metrics = staging / METRICS_FILE
            figures = sorted(p.name for p in staging.glob("*.png"))
            try:
                payload = json.loads(metrics.read_text(encoding="utf-8")) if metrics.is_file() else None
                card = model_card(self.run, payload, figures=figures)
            except (ValueError, TypeError, KeyError, AttributeError) as err:
                raise RunError(f"run {self.target}: {METRICS_FILE} cannot be summarised on the model card "
                               f"({type(err).__name__}: {err}); the file is damaged") from err
            self.write_text(CARD_FILE, card)
        follow_umask(staging)
        fsync_dir(staging)
        target = self.target
        while True:
            if is_taken(target):
                target = next_free(target)
                continue
            try:
                os.rename(staging, target)  # atomic; refuses a non-empty directory
                break
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise
        if target != self.target:
            say(f"{self.target} was taken by another run meanwhile: this run is {target}")
        fsync_dir(target.parent)
        self.committed = target
        fault_point("committed")
        return target


def write_run(model, run: "SteeringRun", run_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Save ``model``'s adapter and ``run`` as a new finished run at ``run_dir`` (the next free name if
    it is taken). Returns the directory."""
    writer = RunWriter(run_dir)
    writer.write_run(model, run, tokenizer)
    return writer.commit()
