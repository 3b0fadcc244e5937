"""The run directory: what a run holds, and the one place that writes and reads it.

A run directory holds ``adapter/`` (peft ``save_pretrained``), ``steering.json`` (a
:class:`SteeringRun`) and ``README.md`` (its model card, :mod:`svd_lightning.card`) when a μ̄ was
solved, next to ``config.yaml``, ``metrics.csv``,
``metrics.json``, the per-question scores, ``predictions.jsonl``, ``skipped_rows.jsonl`` and
``logit_snapshots.pt`` of the command that made it.

**A run is written whole or not at all.** :class:`RunWriter` builds it in a hidden sibling
(``.version_3.partial-<pid>-<token>``) and renames that into place once the command has
finished, so a kill at any moment (SIGKILL included) leaves the previous runs as they were and
either the new complete run or none. Nothing writes into a finished run: a target that exists
already gets the next free name, and says so. Two commands writing "the same" run both finish,
under two names. The partial directory of a killed command stays where it is (its checkpoints
can resume it) and is named when the next run starts.

``steering.json`` records the SHA-256 of the adapter (its config and its weights) and of the
tokenizer's vocabulary; loading checks both, and that the adapter is the kind the run names.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from svd_lightning.config import ConfigError, SteeringConfig
from svd_lightning.files import (atomic_write_bytes, atomic_write_text, fault_point, follow_umask, fsync_dir,
                                  write_json)
from svd_lightning.log import InputError, say

# 2: the settings nested as a SteeringConfig (with the contrastive γ); the adapter hash covers
# adapter_config.json; settings and hashes required. 1: flat settings, weights-only hash. 0: no format field.
FORMAT_VERSION = 2
RUN_FILE = "steering.json"
ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.json"
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning",
               "PREFIX_TUNING": "prefix_tuning"}
PARTIAL = ".partial-"  # staging directories: .<name>.partial-<pid>-<token>


def adapter_kind(peft_type) -> str | None:
    """svd-lightning's name of a peft adapter type (``PeftType.LORA`` or ``"LORA"`` -> ``"lora"``), None if unknown."""
    return _PEFT_TYPES.get(str(getattr(peft_type, "value", peft_type)))


class RunError(InputError):
    """A run directory that cannot be used; the message names the directory, file and field."""


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

    def write_text(self, name: str, text: str) -> Path:
        fault_point(f"write:{name}")
        return atomic_write_text(self.directory() / name, text)

    def write_bytes(self, name: str, data: bytes) -> Path:
        fault_point(f"write:{name}")
        return atomic_write_bytes(self.directory() / name, data)

    def write_json(self, name: str, payload: Any) -> Path:
        fault_point(f"write:{name}")
        return write_json(self.directory() / name, payload)

    def save_torch(self, name: str, obj: Any) -> Path:
        import torch

        fault_point(f"write:{name}")
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
        fault_point(f"write:{ADAPTER_DIR}")
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

    def update_steering(self, **changes) -> Path:
        """Rewrite ``steering.json`` with settings found later for the same weights (the contrastive γ)."""
        if self.run is None:
            raise RunError(f"{self.target}: no run record written yet to update")
        self.run.steering = self.run.steering.replace(**changes)
        return self.write_json(RUN_FILE, self.run.to_dict())

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
            payload = json.loads(metrics.read_text(encoding="utf-8")) if metrics.is_file() else None
            figures = sorted(p.name for p in staging.glob("*.png"))
            self.write_text(CARD_FILE, model_card(self.run, payload, figures=figures))
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


# -- the run record ---------------------------------------------------------------------------------------
HASHES = ("adapter_sha256", "tokenizer_sha256")
# The settings a run records (formats 0-1 kept them flat; format 2 requires them all). forward_mode is how
# a machine computes them, not part of the run, and γ is absent where no contrastive baseline was fit.
_SETTINGS = ("mu", "alpha", "scoring_policy", "floor", "direction", "strength", "curvature", "trim")


@dataclass
class SteeringRun:
    """Everything needed to steer with a warm-started adapter again, as saved in ``steering.json``."""

    model: str  # base model source: hub id, folder, .gguf, smollm2-135m, tiny-random
    adapter: str  # peft method
    steering: SteeringConfig  # μ̄ (solved: never None in a run), α, policy, floor, direction, γ, ...
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
        out["steering"] = self.steering.to_dict()
        return out

    @classmethod
    def from_dict(cls, payload: Any, where: str) -> "SteeringRun":
        if not isinstance(payload, dict):
            raise RunError(f"{where}: expected a JSON object, got {type(payload).__name__}")
        version = payload.get("format_version", 0)  # steering.json of svd-lightning before the run format: 0
        if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= FORMAT_VERSION:
            raise RunError(f"{where}: field 'format_version' must be an integer ≤ {FORMAT_VERSION} (a newer "
                           f"svd-lightning wrote this run?), got {version!r}")
        payload = dict(payload)
        if version < 2:  # flat settings: the same names, nested as they are now
            payload["steering"] = {k: payload.pop(k) for k in _SETTINGS if k in payload}
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(payload) - set(names))
        if unknown:
            raise RunError(f"{where}: unknown field(s) {unknown} (a typo, or a newer svd-lightning wrote it?); "
                           f"the fields are {names}")
        required = ["model", "adapter"] + (["adapter_sha256"] if version >= 1 else [])  # format 1 always had it
        if version >= 2:
            required = ["model", "adapter", "steering", *HASHES, "format_version"]
        missing = [n for n in required if payload.get(n) is None]
        steering = payload.get("steering") or {}
        needed = _SETTINGS if version >= 2 else ("mu", "alpha")
        missing += [f"steering.{n}" if version >= 2 else n for n in needed
                    if not isinstance(steering, dict) or steering.get(n) is None]
        if missing:
            raise RunError(f"{where}: missing field(s) {missing} (required in format {version}); the file was "
                           "edited or damaged: re-run `fit`, or restore it")
        try:
            config = SteeringConfig.from_dict(steering, f"{where}: field 'steering'" if version >= 2 else where)
        except ConfigError as err:
            raise RunError(str(err)) from None
        run = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(run, f.name, payload.get(f.name, default))
        run.steering, run.format_version = config, version
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
        try:
            payload = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constants)
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


# -- using a run ---------------------------------------------------------------------------------------------
def check_tokenizer(run: SteeringRun, tokenizer, run_dir) -> None:
    actual = tokenizer_hash(tokenizer)
    if run.tokenizer_sha256 is not None and run.tokenizer_sha256 != actual:
        raise RunError(f"the tokenizer of {run.model!r} (hash {actual}) is not the one run {run_dir} was trained "
                       f"with (tokenizer_sha256 {run.tokenizer_sha256}): {RUN_FILE}'s field 'model' names another "
                       "base model than the adapter was trained on")


def load_base(run: SteeringRun, run_dir):
    """``(tokenizer, base model)`` of ``run``'s field ``model``; errors name the run and the field."""
    from svd_lightning.models import load_causal_lm, load_tokenizer

    try:
        tokenizer = load_tokenizer(run.model)
        check_tokenizer(run, tokenizer, run_dir)
        return tokenizer, load_causal_lm(run.model)
    except RunError:
        raise
    except Exception as err:  # noqa: BLE001 -- whatever the loader raised, say which run and field
        raise RunError(f"{run_dir}/{RUN_FILE}: field 'model' = {run.model!r} cannot be loaded "
                       f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err


def attach_adapter(base, run: SteeringRun, run_dir, is_trainable: bool = False):
    """``PeftModel.from_pretrained`` of the run's adapter; a mismatch with the base names the run."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, Path(run_dir) / ADAPTER_DIR, is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()
        raise RunError(f"{run_dir}: {ADAPTER_DIR}/ does not fit the base model {run.model!r} ({type(err).__name__}: "
                       f"{first[0] if first else ''} …); was it trained on another model?") from err


def load_run(run_dir: str | os.PathLike):
    """``(peft model, tokenizer, SteeringRun)`` of a finished run directory, validated, in eval mode."""
    run = SteeringRun.load(run_dir)
    tokenizer, base = load_base(run, run_dir)
    return attach_adapter(base, run, run_dir).eval(), tokenizer, run


RESOLVABLE = ("alpha", "scoring_policy", "floor", "direction")  # re-solving μ̄ makes these free to change
DEFAULTS = {"model": "tiny-random", "adapter": "lora",
            **{k: SteeringConfig.__dataclass_fields__[k].default for k in RESOLVABLE}}


def resolve_settings(given: dict, run: SteeringRun | None, run_dir, reuse_strength: bool) -> dict:
    """Unset (None) settings come from the run, else from :data:`DEFAULTS`; conflicts are errors."""
    out = {}
    for key, value in given.items():
        if run is None:
            out[key] = DEFAULTS[key] if value is None else value
            continue
        stored = getattr(run, key) if key in ("model", "adapter") else getattr(run.steering, key)
        if value is None or value == stored:
            out[key] = stored
        elif key in RESOLVABLE and not reuse_strength:
            say(f"{key}={value!r} instead of run {run_dir}'s {stored!r}: μ̄ is re-solved (written as a new run)")
            out[key] = value
        else:
            hint = " (or set reuse_strength: false to re-solve μ̄ for it)" if key in RESOLVABLE else ""
            raise ValueError(f"{key}={value!r} conflicts with run {run_dir}, whose {key} is {stored!r}; leave it "
                             f"unset to use the run's{hint}")
    return out
