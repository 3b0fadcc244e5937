"""SteeringConfig: every setting checked once where it is built, JSON round trip, the derived rules."""

import json

import pytest

from svd_lightning.config import (
    CURVATURES,
    DIRECTIONS,
    FORWARD_MODES,
    NO_MASK_ALPHA,
    SCORING_POLICIES,
    STRENGTHS,
    ConfigError,
    SolverSettings,
    SteeringConfig,
)


def test_json_round_trip_and_per_field_help(tmp_path):
    config = SteeringConfig(mu=-31.1, alpha=0.3, scoring_policy="floor", floor=-7.0, direction="logit_difference")
    assert SteeringConfig.load(config.save(tmp_path / "c.json")) == config
    assert json.loads((tmp_path / "c.json").read_text())["floor"] == -7.0
    help_ = SteeringConfig.fields()
    assert set(help_) == set(config.to_dict()) and all(len(text) > 20 for text in help_.values())
    # the decode settings only: how μ̄ was solved is the run's SolverSettings, γ the run's own, the forward mode a call's
    assert list(help_) == ["mu", "alpha", "scoring_policy", "floor", "direction"]
    solver = SolverSettings(strength="trimmed", curvature="fisher", trim=0.2)
    assert SolverSettings.from_dict(solver.to_dict()) == solver and solver.key == "trimmed_fisher"
    assert SolverSettings("exact", "fisher").key == "exact" and SolverSettings("fixed").key == "fixed"


@pytest.mark.parametrize("field,value,message", [
    ("mu", float("nan"), "mu must be a finite number"),
    ("mu", True, "mu must be a finite number"),
    ("mu", 2e6, r"mu is too large: \|mu\| ≤ 1e\+06"),
    ("alpha", 0.0, r"alpha must be in \(0, 1\]"),
    ("alpha", 1.5, r"alpha must be in \(0, 1\]"),
    ("floor", 0.5, "floor is a log-probability and must be ≤ 0"),
    ("scoring_policy", "sometimes", "scoring_policy must be one of"),
    ("direction", "contrastive", "direction must be one of"),
])
def test_every_bad_setting_is_refused_by_name(field, value, message):
    with pytest.raises(ConfigError, match=f"SteeringConfig: {message}"):
        SteeringConfig(**{field: value})
    with pytest.raises(ConfigError, match=message):
        SteeringConfig().replace(**{field: value})
    with pytest.raises(ConfigError, match=f"run.json: {message}"):
        SteeringConfig.from_dict({field: value}, where="run.json")


@pytest.mark.parametrize("field,value,message", [
    ("strength", "choice-nll", "strength must be one of"),
    ("curvature", "hessian", "curvature must be one of"),
    ("trim", 0.5, r"trim must be a number in \[0, 0.5\)"),
    ("trim", float("nan"), r"trim must be a number in \[0, 0.5\)"),
])
def test_every_bad_solver_setting_is_refused_by_name(field, value, message):
    with pytest.raises(ConfigError, match=f"SolverSettings: {message}"):
        SolverSettings(**{field: value})
    with pytest.raises(ConfigError, match=f"run.json: {message}"):
        SolverSettings.from_dict({field: value}, where="run.json")


def test_unknown_and_missing_settings_are_errors():
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['muu'\]"):
        SteeringConfig().replace(muu=1.0)
    with pytest.raises(ConfigError, match=r"x.json: unknown setting\(s\) \['muu'\]"):
        SteeringConfig.from_dict({"muu": 1.0}, where="x.json")
    with pytest.raises(ConfigError, match=r"missing setting\(s\) \['alpha'\]"):
        SteeringConfig.from_dict({"mu": 1.0}, required=("mu", "alpha"))


def test_the_derived_rules():
    assert SteeringConfig(scoring_policy="none").mask_in_generation is False
    assert all(SteeringConfig(scoring_policy=p).mask_in_generation for p in SCORING_POLICIES if p != "none")
    assert SteeringConfig(alpha=0.3, scoring_policy="none").statistics_alpha == NO_MASK_ALPHA
    assert SteeringConfig(alpha=0.3).statistics_alpha == 0.3
    contrastive = SteeringConfig(mu=-3.0, alpha=0.3).contrastive(2.0)
    assert (contrastive.mu, contrastive.direction, contrastive.scoring_policy) == (2.0, "logit_difference", "none")
    assert SteeringConfig(mu=-3.0).method("contrastive", gamma=2.0) == contrastive.replace(alpha=0.1)
    assert SteeringConfig(mu=-3.0).method("svdecode", gamma=2.0).mu == -3.0
    with pytest.raises(ConfigError, match="no contrastive γ"):
        SteeringConfig(mu=-3.0).method("contrastive")
    with pytest.raises(ConfigError, match="method must be one of"):
        SteeringConfig(mu=-3.0).method("dola")


def test_the_options_are_the_literals_the_cli_shows():
    assert DIRECTIONS == ("kl_gradient", "logit_difference") and FORWARD_MODES == ("auto", "one_forward", "two_pass")
    assert STRENGTHS[-1] == "fixed" and CURVATURES == ("identity", "fisher")


def test_a_strength_and_a_forward_mode_are_checked_where_they_enter():
    """One rule each for the settings that live outside SteeringConfig (γ, μ̄ set on a module, the forward mode)."""
    from svd_lightning.config import check_forward_mode, check_strength

    check_strength(None, "gamma", "x")  # not fit: no problem
    with pytest.raises(ConfigError, match=r"SteeredModel: gamma must be a finite number, got nan"):
        check_strength(float("nan"), "gamma", "SteeredModel")
    with pytest.raises(ConfigError, match=r"run: mu is too large: \|mu\| ≤ 1e\+06"):
        check_strength(2e6, "mu", "run")
    check_forward_mode("two_pass", "x")
    with pytest.raises(ConfigError, match=r"SteeringLM: forward_mode must be one of \('auto', 'one_forward', 'two_pass'\), got 'fast'"):
        check_forward_mode("fast", "SteeringLM")
