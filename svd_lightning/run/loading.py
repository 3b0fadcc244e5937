"""Using a finished run: its base model and adapter loaded and checked against the record, and the settings a
command takes from it."""

from __future__ import annotations

import os
from pathlib import Path

from svd_lightning.config import SteeringConfig
from svd_lightning.log import say

from svd_lightning.run.record import ADAPTER_DIR, RUN_FILE, RunError, SteeringRun, check_tokenizer


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
