"""Using a finished run: its base model and adapter loaded and checked against the record, and the settings a
command takes from it.

A run may come from someone else, so what its ``steering.json`` names is checked before it is used: its field
``model`` is loaded when it is one of svd-lightning's aliases or a Hub id; a local path only when the user
names the base model (``base_model=``, ``--base-model``, ``--model.model``) or allows the folder it lies
under (``$SVD_LIGHTNING_MODEL_DIRS``, folders separated by ``os.pathsep``). No model's own code runs
(:mod:`svd_lightning.models`).
"""

from __future__ import annotations

import os
from pathlib import Path

from svd_lightning.config import SteeringConfig
from svd_lightning.log import InputError, say
from svd_lightning.run.record import ADAPTER_DIR, RUN_FILE, RunError, SteeringRun, check_tokenizer


MODEL_DIRS_ENV = "SVD_LIGHTNING_MODEL_DIRS"


def allowed_model_dirs() -> list[Path]:
    """The folders under which a run's local base model may be loaded (``$SVD_LIGHTNING_MODEL_DIRS``)."""
    return [Path(p).expanduser().resolve() for p in os.environ.get(MODEL_DIRS_ENV, "").split(os.pathsep) if p.strip()]


def base_model_source(run: SteeringRun, run_dir, base_model: str | os.PathLike | None = None) -> str:
    """What to load as ``run``'s base model (see the module doc): ``base_model`` when the user names it, else
    the run's field ``model`` if it may be loaded as it stands; a local path outside the allowed folders is an
    error naming the settings that allow it."""
    from svd_lightning.models import is_local_source

    if base_model is not None:
        return os.fspath(base_model)
    if not is_local_source(run.model):
        return run.model
    path = Path(run.model).expanduser().resolve()
    if any(path == d or d in path.parents for d in allowed_model_dirs()):
        return run.model
    raise RunError(f"{run_dir}/{RUN_FILE}: field 'model' names a local path ({run.model!r}); a run can come from "
                   "anyone, so svd-lightning loads a run's local base model only where you say: name it yourself "
                   f"(base_model=PATH, --base-model PATH, --model.model PATH) or allow its folder in {MODEL_DIRS_ENV}")


def load_base(run: SteeringRun, run_dir, base_model: str | os.PathLike | None = None):
    """``(tokenizer, base model)`` of ``run`` (:func:`base_model_source`); the tokenizer is checked against the
    run's before the model loads. Errors name the run and the field."""
    from svd_lightning.models import load_causal_lm, load_tokenizer

    source = base_model_source(run, run_dir, base_model)
    where = f"{run_dir}/{RUN_FILE}: field 'model' = {run.model!r}" if base_model is None else f"base model {source!r}"
    try:
        tokenizer = load_tokenizer(source)
        check_tokenizer(run, tokenizer, run_dir)
        return tokenizer, load_causal_lm(source)
    except RunError:
        raise
    except InputError as err:
        raise RunError(f"{where}: {err}") from None
    except Exception as err:  # noqa: BLE001 -- whatever the loader raised, say which run and field
        raise RunError(f"{where} cannot be loaded "
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
    except Exception as err:  # noqa: BLE001 -- a damaged file (SafetensorError, UnpicklingError, EOFError, ...)
        first = str(err).strip().splitlines()
        raise RunError(f"{run_dir}: {ADAPTER_DIR}/ cannot be read ({type(err).__name__}: {first[0] if first else ''}): "
                       "its weights file is damaged; restore the run, or re-run `fit`") from err


def load_run(run_dir: str | os.PathLike, base_model: str | os.PathLike | None = None):
    """``(peft model, tokenizer, SteeringRun)`` of a finished run directory, validated, in eval mode;
    ``base_model``: the base model to load instead of the path the run names (see the module doc)."""
    run = SteeringRun.load(run_dir)
    tokenizer, base = load_base(run, run_dir, base_model)
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
