"""The run format: what a finished run directory holds, defined, written and read here only.

A run directory is ``adapter/`` (peft ``save_pretrained``) plus ``steering.json`` (a
:class:`SteeringRun`), next to Lightning's ``config.yaml`` / ``metrics.*``. ``steering.json`` is
written *last*, after the adapter, and records the SHA-256 of the adapter's weights: a directory
whose steering.json is missing, or whose adapter is not the one steering.json was written with
(a run killed between the two writes, two runs writing one directory), is not a run, and loading
it is an error that names the directory and what is wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from svd_lightning import artifacts

FORMAT_VERSION = 1
RUN_FILE = artifacts.STEERING_FILE
ADAPTER_DIR = artifacts.ADAPTER_DIR
SCORING_POLICIES = ("mask_generation_only", "none", "floor", "mask")
STRENGTHS = ("exact", "mean", "median", "trimmed", "pooled", "choice_nll", "fixed")
CURVATURES = ("identity", "fisher")
DIRECTIONS = ("kl_gradient", "logit_difference")  # = svd_lightning.steering.DIRECTIONS
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class RunError(ValueError):
    """A run directory that cannot be used; the message names the directory, file and field."""


@dataclass
class SteeringRun:
    """Everything needed to steer with a warm-started adapter again, as saved in ``steering.json``."""

    model: str  # base model source: hub id, folder, .gguf, smollm2-135m, tiny-random
    adapter: str  # peft method
    mu: float  # the steering strength μ̄
    alpha: float  # confidence-mask threshold
    scoring_policy: str = "mask_generation_only"
    direction: str = "kl_gradient"  # the steering vector μ̄ scales; runs written before it existed: kl_gradient
    floor: float = -20.0
    strength: str = "exact"  # how μ̄ was solved (``fixed``: set by hand)
    curvature: str = "identity"
    trim: float = 0.1
    adapter_options: dict | None = None
    tokenizer_sha256: str | None = None
    adapter_sha256: str | None = None  # of the adapter weights this μ̄ belongs to
    aggregates: dict = field(default_factory=dict)  # every strength option's μ on the same calibration
    diagnostics: dict = field(default_factory=dict)
    calibration_seconds: float | None = None
    global_step: int | None = None
    hparams: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "SteeringRun") -> None:
        def bad(name: str, why: str):
            raise RunError(f"{where}: field {name!r} {why}, got {getattr(self, name)!r}")

        for name in ("model", "adapter"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                bad(name, "must be a non-empty string")
        for name in ("mu", "alpha", "floor", "trim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(name, "must be a finite number")
        if not 0.0 < self.alpha <= 1.0:
            bad("alpha", "must be in (0, 1]")
        if self.scoring_policy not in SCORING_POLICIES:
            bad("scoring_policy", f"must be one of {SCORING_POLICIES}")
        if self.strength not in STRENGTHS:
            bad("strength", f"must be one of {STRENGTHS}")
        if self.curvature not in CURVATURES:
            bad("curvature", f"must be one of {CURVATURES}")
        if self.direction not in DIRECTIONS:
            bad("direction", f"must be one of {DIRECTIONS}")
        if not isinstance(self.format_version, int) or not 0 <= self.format_version <= FORMAT_VERSION:
            bad("format_version", f"must be an integer ≤ {FORMAT_VERSION} (a newer svd-lightning wrote this run?)")

    # -- reading and writing --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, payload: Any, where: str) -> "SteeringRun":
        if not isinstance(payload, dict):
            raise RunError(f"{where}: expected a JSON object, got {type(payload).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [n for n in ("model", "adapter", "mu", "alpha") if n not in payload]
        if missing:
            raise RunError(f"{where}: missing field(s) {missing}")
        known = {k: v for k, v in payload.items() if k in names}
        known.setdefault("format_version", 0)  # steering.json of svd-lightning before the run format
        run = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(run, f.name, known.get(f.name, default))
        run.validate(where)
        return run

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write ``steering.json`` (atomically); call it after the adapter is in place."""
        return artifacts.write_json(Path(run_dir) / RUN_FILE, self.to_dict())

    @classmethod
    def load(cls, run_dir: str | os.PathLike, check_adapter: bool = True) -> "SteeringRun":
        """Read and validate ``run_dir``; every error names the run directory and the file or field."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise RunError(f"run directory {run_dir} does not exist")
        path = run_dir / RUN_FILE
        if not path.is_file():
            raise RunError(f"{run_dir} is not a finished run: {RUN_FILE} is missing "
                           "(the run was interrupted, or this is not an svd-lightning run directory)")
        try:
            payload = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constants)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
            raise RunError(f"{path}: not valid JSON ({err}); the file is damaged or truncated") from None
        run = cls.from_dict(payload, str(path))
        if check_adapter:
            run.check_adapter(run_dir)
        return run

    def check_adapter(self, run_dir: str | os.PathLike) -> Path:
        """The adapter folder exists and is the one this run's μ̄ was solved for."""
        adapter = Path(run_dir) / ADAPTER_DIR
        if not (adapter / "adapter_config.json").is_file():
            raise RunError(f"{run_dir}: {ADAPTER_DIR}/adapter_config.json is missing: no saved adapter in this run")
        if self.adapter_sha256 is not None and adapter_hash(adapter) != self.adapter_sha256:
            raise RunError(f"{run_dir}: {ADAPTER_DIR}/ is not the adapter {RUN_FILE} was written for (adapter_sha256 "
                           "differs): the directory mixes two runs, e.g. a run killed while saving or two runs "
                           "writing one directory; re-run `fit`")
        return adapter


def _no_constants(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def adapter_hash(adapter_dir: str | os.PathLike) -> str:
    """SHA-256 of the saved adapter weights (the first weights file peft writes)."""
    for name in _ADAPTER_WEIGHTS:
        path = Path(adapter_dir) / name
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            return digest.hexdigest()
    raise RunError(f"{adapter_dir}: no adapter weights ({' or '.join(_ADAPTER_WEIGHTS)})")


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("svd-lightning", "torch", "transformers", "peft", "lightning"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def write_run(model, run: SteeringRun, run_dir: str | os.PathLike) -> Path:
    """Save the adapter, then ``steering.json`` bound to it by hash: the run is complete once this returns."""
    adapter = artifacts.save_adapter(model, run_dir)
    run.adapter_sha256 = adapter_hash(adapter)
    run.versions = run.versions or library_versions()
    return run.save(run_dir)


LOCK_FILE = ".writing"


def acquire(run_dir: str | os.PathLike) -> Path:
    """Claim ``run_dir`` for this process: a second writer is refused, a dead writer's claim is taken over."""
    lock = Path(run_dir) / LOCK_FILE
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(lock.read_text() or "0")
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except (ValueError, ProcessLookupError):
            alive = False
        except PermissionError:
            alive = True
        if alive:
            raise RunError(f"{run_dir} is being written by another process (pid {pid}); use another "
                           "directory or version, or wait for it to finish") from None
        lock.unlink(missing_ok=True)
        return acquire(run_dir)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return lock


def release(run_dir: str | os.PathLike) -> None:
    lock = Path(run_dir) / LOCK_FILE
    try:
        if int(lock.read_text() or "0") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass
