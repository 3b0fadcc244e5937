"""The run record: ``steering.json`` as a :class:`SteeringRun`, its format and migration from older ones, and
the hashes that tie it to its adapter and tokenizer (checked on load)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from svd_lightning.config import ConfigError, SolverSettings, SteeringConfig, strength_problem
from svd_lightning.files import unique_keys
from svd_lightning.log import InputError, say

# 3: the decode settings (``steering``) apart from how μ̄ was solved (``solver``) and the contrastive γ
# (``contrastive_gamma``); no forward mode. 2: all of them nested in ``steering``; the adapter hash covers
# adapter_config.json; settings and hashes required. 1: flat settings, weights-only hash. 0: no format field.
FORMAT_VERSION = 3
RUN_FILE = "steering.json"
ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.json"
TIMINGS_FILE = "timings.json"  # the stage times of the command that wrote the run
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning",
               "PREFIX_TUNING": "prefix_tuning"}


def adapter_kind(peft_type) -> str | None:
    """svd-lightning's name of a peft adapter type (``PeftType.LORA`` or ``"LORA"`` -> ``"lora"``), None if unknown."""
    return _PEFT_TYPES.get(str(getattr(peft_type, "value", peft_type)))


class RunError(InputError):
    """A run directory that cannot be used; the message names the directory, file and field."""


HASHES = ("adapter_sha256", "tokenizer_sha256")
DECODE_SETTINGS = tuple(SteeringConfig.fields())  # format 3's ``steering``, all required
SOLVER_SETTINGS = ("strength", "curvature", "trim")  # format 3's ``solver``, all required


@dataclass
class SteeringRun:
    """Everything needed to steer with a warm-started adapter again, as saved in ``steering.json``."""

    model: str  # base model source: hub id, folder, .gguf, smollm2-135m, tiny-random
    adapter: str  # peft method
    steering: SteeringConfig  # the decode settings: μ̄ (solved: never None in a run), α, policy, floor, direction
    solver: SolverSettings = field(default_factory=SolverSettings)  # how μ̄ was solved (or fixed)
    contrastive_gamma: float | None = None  # the contrastive baseline's γ, where one was fit
    base_weights: str | None = None  # where the base's weights came from when ``model`` is an alias of ours
    adapter_options: dict | None = None
    tokenizer_sha256: str | None = None
    adapter_sha256: str | None = None  # of the adapter (config + weights) this μ̄ belongs to
    aggregates: dict = field(default_factory=dict)  # every strength option's μ on the same calibration
    diagnostics: dict = field(default_factory=dict)
    calibration_seconds: float | None = None
    global_step: int | None = None
    weights: dict = field(default_factory=dict)  # which warm-start weights (callbacks.CheckpointWeights)
    datasets: list = field(default_factory=list)  # Hub ids of the task's data (ChoiceDataModule.datasets)
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
        if not isinstance(self.steering, SteeringConfig):
            bad("steering", "must be a SteeringConfig")
        if not isinstance(self.solver, SolverSettings):
            bad("solver", "must be a SolverSettings")
        problem = strength_problem(self.contrastive_gamma, "contrastive_gamma")
        if problem:
            bad("contrastive_gamma", problem)
        if self.steering.mu is None:
            raise RunError(f"{where}: field 'steering' has no mu: a run records the solved strength")
        if not isinstance(self.format_version, int) or not 0 <= self.format_version <= FORMAT_VERSION:
            bad("format_version", f"must be an integer ≤ {FORMAT_VERSION} (a newer svd-lightning wrote this run?)")
        for name in HASHES:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{16,64}", value)):
                bad(name, "must be a hex digest")

    # -- reading and writing --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["steering"], out["solver"] = self.steering.to_dict(), self.solver.to_dict()
        return out

    @classmethod
    def from_dict(cls, payload: Any, where: str) -> "SteeringRun":
        if not isinstance(payload, dict):
            raise RunError(f"{where}: expected a JSON object, got {type(payload).__name__}")
        version = payload.get("format_version", 0)  # steering.json of svd-lightning before the run format: 0
        if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= FORMAT_VERSION:
            raise RunError(f"{where}: field 'format_version' must be an integer ≤ {FORMAT_VERSION} (a newer "
                           f"svd-lightning wrote this run?), got {version!r}")
        payload = _as_format_3(payload, version, where)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(payload) - set(names))
        if unknown:
            raise RunError(f"{where}: unknown field(s) {unknown} (a typo, or a newer svd-lightning wrote it?); "
                           f"the fields are {names}")
        required = ["model", "adapter"] + (["adapter_sha256"] if version >= 1 else [])  # format 1 always had it
        if version >= 2:
            required = ["model", "adapter", "steering", *HASHES, "format_version"]
        missing = [n for n in required if payload.get(n) is None]
        steering, solver = payload.get("steering") or {}, payload.get("solver") or {}
        for block, fields, needed in (("steering", steering, DECODE_SETTINGS if version >= 2 else ("mu", "alpha")),
                                      ("solver", solver, SOLVER_SETTINGS if version >= 2 else ())):
            missing += [f"{block}.{n}" if version >= 2 else n for n in needed
                        if not isinstance(fields, dict) or fields.get(n) is None]
        if missing:
            raise RunError(f"{where}: missing field(s) {missing} (required in format {version}); the file was "
                           "edited or damaged: re-run `fit`, or restore it")
        try:
            config = SteeringConfig.from_dict(steering, f"{where}: field 'steering'" if version >= 2 else where)
            solved = SolverSettings.from_dict(solver, f"{where}: field 'solver'" if version >= 3 else where)
        except ConfigError as err:
            raise RunError(str(err)) from None
        run = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(run, f.name, payload.get(f.name, default))
        run.steering, run.solver, run.format_version = config, solved, version
        run.validate(where)
        return run

    @classmethod
    def load(cls, run_dir: str | os.PathLike, check_adapter: bool = True) -> "SteeringRun":
        """Read and validate ``run_dir``; every error names the run directory and the file or field."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise RunError(f"run directory {run_dir} does not exist")
        path = run_dir / RUN_FILE
        if not path.is_file():
            raise RunError(f"{run_dir} is not a finished run: {RUN_FILE} is missing (the command that wrote it "
                           "solved no μ̄, or this is not an svd-lightning run directory)")
        own_file(run_dir, path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constants,
                                 object_pairs_hook=unique_keys)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
            raise RunError(f"{path}: not valid JSON ({err}); the file is damaged or truncated") from None
        run = cls.from_dict(payload, str(path))
        for name in HASHES:
            if getattr(run, name) is None:
                say(f"{path}: no {name} (written by svd-lightning format {run.format_version}): "
                    f"that check is skipped for this run")
        if check_adapter:
            run.check_adapter(run_dir)
        return run

    def check_adapter(self, run_dir: str | os.PathLike) -> Path:
        """The adapter folder exists, is of the run's kind, and is the one this run's μ̄ was solved for."""
        adapter = Path(run_dir) / ADAPTER_DIR
        for path in [adapter, *adapter.rglob("*")] if adapter.exists() else []:
            own_file(run_dir, path)
        config = adapter / "adapter_config.json"
        if not config.is_file():
            raise RunError(f"{run_dir}: {ADAPTER_DIR}/adapter_config.json is missing: no saved adapter in this run")
        try:
            peft_type = json.loads(config.read_text(encoding="utf-8")).get("peft_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise RunError(f"{config}: not a valid adapter config ({err})") from None
        kind = adapter_kind(peft_type)
        if kind != self.adapter:
            raise RunError(f"{run_dir}/{RUN_FILE}: field 'adapter' is {self.adapter!r} but {ADAPTER_DIR}/ holds a "
                           f"{peft_type} adapter ({kind or 'unknown to svd-lightning'}); the files were edited or mixed")
        if self.adapter_sha256 is not None and adapter_hash(adapter, self.format_version) != self.adapter_sha256:
            raise RunError(f"{run_dir}: {ADAPTER_DIR}/ is not the adapter {RUN_FILE} was written for (adapter_sha256 "
                           "differs: its weights or adapter_config.json changed, or the directory mixes two runs); "
                           "re-run `fit`")
        return adapter


def _as_format_3(payload: dict, version: int, where: str) -> dict:
    """An older record's fields where format 3 keeps them: formats 0-1 flat, format 2 all in ``steering``
    (``forward_mode`` there was the writing machine's, dropped); a format-3 payload unchanged."""
    payload = dict(payload)
    if version >= 3:
        return payload
    if version < 2:  # flat settings: the same names
        flat = {k: payload.pop(k) for k in (*DECODE_SETTINGS, *SOLVER_SETTINGS, "gamma", "forward_mode") if k in payload}
    else:
        flat = payload.get("steering")
        if flat is None:  # reported as missing by the caller
            return payload
        if not isinstance(flat, dict):
            raise RunError(f"{where}: field 'steering' must be an object of settings, got {type(flat).__name__}")
        flat = dict(flat)
    flat.pop("forward_mode", None)
    payload["solver"] = {k: flat.pop(k) for k in SOLVER_SETTINGS if k in flat}
    payload["contrastive_gamma"] = flat.pop("gamma", None)
    payload["steering"] = flat
    return payload


def own_file(run_dir: str | os.PathLike, path: Path) -> None:
    """A file a run reads is the run's own: no symbolic link, nothing that resolves outside the run directory
    (a run can come from anyone, and a link makes it read, or hash and load, whatever it points at)."""
    run_dir = Path(run_dir)
    if path.is_symlink():
        raise RunError(f"{run_dir}: {path.relative_to(run_dir)} is a symbolic link (to {os.readlink(path)}); a run's "
                       "files are read only from inside it: copy the file in instead")
    if not path.resolve().is_relative_to(run_dir.resolve()):
        raise RunError(f"{run_dir}: {path.relative_to(run_dir)} lies outside the run directory")


def _no_constants(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def adapter_hash(adapter_dir: str | os.PathLike, format_version: int = FORMAT_VERSION) -> str:
    """SHA-256 of the saved adapter: ``adapter_config.json`` and the weights (format 1: the weights only)."""
    adapter_dir = Path(adapter_dir)
    digest = hashlib.sha256()
    if format_version >= 2:
        digest.update(b"adapter_config.json\0" + (adapter_dir / "adapter_config.json").read_bytes() + b"\0")
    for name in _ADAPTER_WEIGHTS:
        path = adapter_dir / name
        if path.is_file():
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            return digest.hexdigest()
    raise RunError(f"{adapter_dir}: no adapter weights ({' or '.join(_ADAPTER_WEIGHTS)})")


def tokenizer_hash(tokenizer) -> str:
    """A short fingerprint of the vocabulary, to catch a run reused with another tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("svd-lightning", "torch", "transformers", "peft", "lightning"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def check_tokenizer(run: SteeringRun, tokenizer, run_dir) -> None:
    actual = tokenizer_hash(tokenizer)
    if run.tokenizer_sha256 is not None and run.tokenizer_sha256 != actual:
        raise RunError(f"the tokenizer of {run.model!r} (hash {actual}) is not the one run {run_dir} was trained "
                       f"with (tokenizer_sha256 {run.tokenizer_sha256}): {RUN_FILE}'s field 'model' names another "
                       "base model than the adapter was trained on")
