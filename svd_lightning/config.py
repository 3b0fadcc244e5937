"""The settings of SVDecode, each in one validated object: :class:`SteeringConfig` (the decode settings) and
:class:`SolverSettings` (how a run's μ̄ was solved).

In the style of peft's ``LoraConfig``: dataclasses whose options are defined and checked here once
(``__post_init__``), with per-field help, saved as JSON (``steering.json``'s ``steering`` and ``solver``, see
:mod:`svd_lightning.run`). One ``SteeringConfig`` travels through scoring, generation, calibration,
:class:`svd_lightning.SteeredModel` and the lm-eval backend; the code that applies it lives in
:mod:`svd_lightning.scoring`, :mod:`svd_lightning.generation` and :mod:`svd_lightning.calibration`. Free of
torch, so a run can be read without it.

    config = SteeringConfig(mu=-31.1, alpha=0.1)
    config.replace(mu=0.0)            # a new, validated config
    config.contrastive(0.35)          # the contrastive baseline z_φ + γ(z_φ − z_θ) at γ = 0.35 as a config
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from svd_lightning.log import InputError

ScoringPolicy = Literal["mask_generation_only", "none", "floor", "mask"]
Direction = Literal["kl_gradient", "logit_difference"]
ForwardMode = Literal["auto", "one_forward", "two_pass"]
SolvedStrength = Literal["exact", "mean", "median", "trimmed", "pooled", "choice_nll"]  # what StrengthSolver solves
Strength = Literal[SolvedStrength, "fixed"]  # a run's record: ``fixed`` was set by hand
Curvature = Literal["identity", "fisher"]
Method = Literal["svdecode", "contrastive"]

SCORING_POLICIES: tuple[str, ...] = get_args(ScoringPolicy)
DIRECTIONS: tuple[str, ...] = get_args(Direction)
FORWARD_MODES: tuple[str, ...] = get_args(ForwardMode)
SOLVED_STRENGTHS: tuple[str, ...] = get_args(SolvedStrength)
STRENGTHS: tuple[str, ...] = (*SOLVED_STRENGTHS, "fixed")
CURVATURES: tuple[str, ...] = get_args(Curvature)
METHODS: tuple[str, ...] = get_args(Method)
# Every scored variant as tables, cards and the results page name it, in their column order.
VARIANT_LABELS = {"base": "pre-trained", "plain": "warm start", "steered": "+SVDecode", "contrastive": "+contrastive"}
MAX_ABS_STRENGTH = 1e6  # |μ|·|δz| must stay far from fp32's 3.4e38, or steered logits turn inf and scores NaN
# Policy `none` (no confidence mask) keeps tokens with p_φ ≥ 1e-8·max p_φ in the compact strength
# caches (see svd_lightning.steering): for the KL gradient nothing below moves measurably.
NO_MASK_ALPHA = 1e-8


class ConfigError(InputError):
    """A setting outside its range; the message names where it came from, the field and the options."""


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class SteeringConfig:
    """The decode-time settings of SVDecode: the strength μ̄ and the four that shape the steered distribution.

    How μ̄ was solved is the run's :class:`SolverSettings`; the contrastive baseline's γ is the run's own
    (``SteeringRun.contrastive_gamma``); how a machine computes the two distributions (``forward_mode``) is an
    argument of the call that computes them. None of those change what a steered score or answer is.
    """

    mu: float | None = _help("the steering strength μ̄ (None: not solved yet); usually negative for δz",
                             default=None)
    alpha: float = _help("confidence mask: keep tokens with p_φ ≥ α·max p_φ, in (0, 1]", default=0.1)
    scoring_policy: ScoringPolicy = _help(
        "what a masked label token contributes to teacher-forced scores: mask_generation_only (the mask "
        "only when generating), none (no mask anywhere), floor (log-prob `floor`), mask (−∞, the paper)",
        default="mask_generation_only")
    floor: float = _help("log-probability of a masked label token under scoring_policy=floor, ≤ 0", default=-20.0)
    direction: Direction = _help("the vector μ̄ scales: kl_gradient (SVDecode's δz) or logit_difference "
                                 "(z_φ − z_θ, contrastive / proxy-tuning)", default="kl_gradient")

    def __post_init__(self) -> None:
        self.check()

    def check(self, where: str = "SteeringConfig") -> None:
        """Every range and option, once; errors name ``where`` and the field."""
        def bad(name: str, why: str):
            raise ConfigError(f"{where}: {name} {why}, got {getattr(self, name)!r}")

        problem = strength_problem(self.mu)
        if problem:
            bad("mu", problem)
        for name in ("alpha", "floor"):
            if _not_number(getattr(self, name)):
                bad(name, "must be a finite number")
        if not 0.0 < self.alpha <= 1.0:
            bad("alpha", "must be in (0, 1]")
        if self.floor > 0:
            bad("floor", "is a log-probability and must be ≤ 0")
        for name, options in (("scoring_policy", SCORING_POLICIES), ("direction", DIRECTIONS)):
            if getattr(self, name) not in options:
                bad(name, f"must be one of {options}")

    # -- derived settings: each rule in one place ------------------------------------------------------
    @property
    def mask_in_generation(self) -> bool:
        """Generation applies the confidence mask unless the policy is ``none`` (no mask anywhere)."""
        return self.scoring_policy != "none"

    @property
    def statistics_alpha(self) -> float:
        """The mask threshold the strength is solved with: ``alpha``, or (policy ``none``) no mask."""
        return NO_MASK_ALPHA if self.scoring_policy == "none" else self.alpha

    def contrastive(self, gamma: float) -> "SteeringConfig":
        """The contrastive baseline ``z_φ + γ(z_φ − z_θ)`` as steering: the logit difference at μ = γ, no mask."""
        return self.replace(mu=gamma, direction="logit_difference", scoring_policy="none")

    def method(self, name: Method = "svdecode", gamma: float | None = None) -> "SteeringConfig":
        """The config that decodes with ``name``: ``svdecode`` (this one) or ``contrastive`` (with ``gamma``, the
        run's contrastive γ)."""
        if name not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {name!r}")
        if name == "svdecode":
            return self
        if gamma is None:
            raise ConfigError("method 'contrastive': this run has no contrastive γ (no baseline was fit: "
                              "svd_lightning.callbacks.ContrastiveBaseline fits one)")
        return self.contrastive(gamma)

    # -- values --------------------------------------------------------------------------------------
    def replace(self, **changes) -> "SteeringConfig":
        """A copy with ``changes`` (checked); an unknown name is an error naming the fields."""
        unknown = sorted(set(changes) - set(self.fields()))
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown}; SteeringConfig has {list(self.fields())}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def fields(cls) -> dict[str, str]:
        """``{name: help}`` of every setting."""
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, payload: Any, where: str = "SteeringConfig", required: tuple[str, ...] = ()) -> "SteeringConfig":
        """The config in ``payload``; unknown or missing (``required``) fields are errors naming ``where``."""
        return _settings_from_dict(cls, payload, where, required)

    def save(self, path: str | os.PathLike) -> Path:
        from svd_lightning.files import write_json

        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SteeringConfig":
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read a SteeringConfig ({err})") from None
        return cls.from_dict(payload, str(path))


@dataclass(frozen=True)
class SolverSettings:
    """How a run's μ̄ was solved (the :class:`~svd_lightning.callbacks.StrengthSolver`'s options, or ``fixed``):
    a record of where the strength came from, not a decode setting."""

    strength: Strength = _help("exact, mean, median, trimmed, pooled, choice_nll, or fixed (set by hand)",
                               default="exact")
    curvature: Curvature = _help("curvature of the per-token Newton step for mean / median / trimmed / pooled: "
                                 "identity (the paper) or fisher", default="identity")
    trim: float = _help("fraction cut at each tail by strength=trimmed, in [0, 0.5)", default=0.1)

    def __post_init__(self) -> None:
        self.check()

    def check(self, where: str = "SolverSettings") -> None:
        for name, options in (("strength", STRENGTHS), ("curvature", CURVATURES)):
            if getattr(self, name) not in options:
                raise ConfigError(f"{where}: {name} must be one of {options}, got {getattr(self, name)!r}")
        if _not_number(self.trim) or not 0.0 <= self.trim < 0.5:
            raise ConfigError(f"{where}: trim must be a number in [0, 0.5), got {self.trim!r}")

    @property
    def key(self) -> str:
        """The strength's name among a run's aggregates (``exact``, ``trimmed_fisher``, ...)."""
        return self.strength if self.strength in ("exact", "choice_nll", "fixed") else f"{self.strength}_{self.curvature}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, payload: Any, where: str = "SolverSettings") -> "SolverSettings":
        return _settings_from_dict(cls, payload, where)


def _settings_from_dict(cls, payload: Any, where: str, required: tuple[str, ...] = ()):
    """A settings dataclass from JSON: unknown or missing (``required``) names, and every range (``check``), are
    errors naming ``where``; a name left out takes its default."""
    if not isinstance(payload, dict):
        raise ConfigError(f"{where}: expected an object of settings, got {type(payload).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(payload) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {unknown}; the settings are {names}")
    missing = [name for name in required if name not in payload]
    if missing:
        raise ConfigError(f"{where}: missing setting(s) {missing}")
    settings = object.__new__(cls)
    for f in dataclasses.fields(cls):
        object.__setattr__(settings, f.name, payload.get(f.name, f.default))
    settings.check(where)
    return settings


def check_strength(value, name: str, where: str) -> None:
    """A strength (μ̄ or γ) where it enters: finite and in range, or a ConfigError naming ``where`` and ``name``."""
    problem = strength_problem(value, name)
    if problem:
        raise ConfigError(f"{where}: {name} {problem}, got {value!r}")


def check_forward_mode(value, where: str) -> None:
    """A forward mode where it enters (before any model loads), or a ConfigError naming ``where``."""
    if value not in FORWARD_MODES:
        raise ConfigError(f"{where}: forward_mode must be one of {FORWARD_MODES}, got {value!r}")


def strength_problem(value, name: str = "mu") -> str | None:
    """What is wrong with a strength (μ̄ or γ, called ``name``) as a number, or None (None itself is no problem:
    not solved)."""
    if value is None:
        return None
    if _not_number(value):
        return "must be a finite number"
    if abs(value) > MAX_ABS_STRENGTH:
        return f"is too large: |{name}| ≤ {MAX_ABS_STRENGTH:g} keeps steered logits finite in fp32"
    return None


def _not_number(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)


def _finite_number(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def add_override_arguments(parser) -> None:
    """The flags with which a command that reads a run overrides what the run says (argparse): ``--mu``,
    ``--method``, ``--forward-mode`` and ``--base-model`` (``svd-lightning generate`` and ``eval``)."""
    parser.add_argument("--mu", type=_finite_number, help="steering strength (default: μ̄ from steering.json)")
    parser.add_argument("--method", choices=METHODS, default="svdecode",
                        help="svdecode, or contrastive: z_φ + γ(z_φ − z_θ) with the run's γ")
    parser.add_argument("--forward-mode", "--forward_mode", choices=FORWARD_MODES, default="auto",
                        help="auto: warm and pre-trained rows in one forward pass where the adapter allows (LoRA)")
    parser.add_argument("--base-model", "--base_model",
                        help="the base model to load (folder, .gguf or Hub id) instead of the local path the run names")
