"""Precision follows what the hardware runs fast; an explicit setting wins."""

import lightning as L
import pytest
import torch

from svd_lightning import precision
from svd_lightning.cli import SteeringCLI, main

from conftest import ROOT, write_truthfulqa


def test_choice_on_this_machine_follows_onednn():
    chosen, why = precision.fast_precision("cpu")
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert chosen == ("bf16-mixed" if native else "32-true"), why
    assert ("natively" in why) == native
    assert precision.resolve_precision(None, "cpu") == (chosen, why)
    assert precision.resolve_precision("auto", "cpu") == (chosen, why)
    explicit, why = precision.resolve_precision("bf16-mixed", "cpu")
    assert explicit == "bf16-mixed" and why.startswith("set explicitly")
    assert ("WARNING: this CPU has no native bf16" in why) == (not precision.cpu_has_fast_bf16())
    assert "oneDNN bf16" in precision.describe_cpu()


@pytest.mark.parametrize("native,expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_cpu_choice_both_ways(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: native)
    assert precision.fast_precision("cpu")[0] == expected


def test_cuda_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    for bf16, expected in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, _b=bf16: _b)
        assert precision.fast_precision("gpu")[0] == expected
        assert precision.fast_precision("auto")[0] == expected
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert precision.fast_precision("cpu")[0] == "32-true"  # a CPU run on a GPU machine asks the CPU


@pytest.mark.parametrize("explicit", [None, "bf16-mixed"])
def test_cli_resolves_unset_precision_and_keeps_an_explicit_one(tmp_path, monkeypatch, capsys, explicit):
    data = write_truthfulqa(tmp_path / "mc.json", n=10)
    seen = {}

    class Spy(SteeringCLI):
        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            seen["precision"] = trainer.precision
            raise SystemExit(0)  # the choice is what this test is about; skip the run

    monkeypatch.setattr("svd_lightning.cli.SteeringCLI", Spy)
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--data.init_args.path", str(data),
            "--trainer.precision", "null" if explicit is None else explicit]
    with pytest.raises(SystemExit):
        main(args)
    expected = precision.fast_precision("cpu")[0] if explicit is None else explicit
    assert seen["precision"] == expected
    err = capsys.readouterr().err
    assert f"precision {expected}" in err
    assert ("set explicitly" in err) == (explicit is not None)


def test_shipped_configs_leave_precision_to_the_machine():
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        text = path.read_text()
        if path.name != "tiny.yaml":  # the tiny run stays fp32 on purpose: tests compare exact numbers
            assert "\n  precision:" not in text, f"{path} pins a precision"


def test_trainer_runs_with_the_chosen_precision():
    chosen, _ = precision.fast_precision("cpu")
    trainer = L.Trainer(accelerator="cpu", precision=chosen, logger=False, enable_progress_bar=False)
    assert trainer.precision == chosen


def test_explicit_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    chosen, why = precision.resolve_precision("bf16-mixed", "cpu")
    assert chosen == "bf16-mixed" and "WARNING: this CPU has no native bf16" in why and "leave trainer.precision unset" in why
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert precision.resolve_precision("bf16-mixed", "cpu") == ("bf16-mixed", "set explicitly")
    assert precision.resolve_precision("32-true", "cpu") == ("32-true", "set explicitly")


# -- steering in a low precision: a measured policy ------------------------------------------------------------
def test_the_policys_numbers_are_the_committed_measurement():
    """svd_lightning.precision.MEASURED_STEERING_ERROR is benchmarks/results/precision.json, to its rounding."""
    import json

    measured = json.loads((ROOT / "benchmarks" / "results" / "precision.json").read_text())
    expected = {}
    for row in measured["rows"]:
        if row["mu_abs"] is not None and row["variant"] in precision.MEASURED_STEERING_ERROR:
            expected.setdefault(row["variant"], {})[row["mu_abs"]] = (row["median_error"], row["max_error"])
    assert set(expected) == set(precision.MEASURED_STEERING_ERROR) and expected
    for kind, table in expected.items():
        assert set(table) == set(precision.MEASURED_STEERING_ERROR[kind])
        for mu, (median, worst) in table.items():
            assert precision.MEASURED_STEERING_ERROR[kind][mu] == pytest.approx((median, worst), rel=0.01), (kind, mu)
    fp32 = [r for r in measured["rows"] if r["variant"] == "fp32 weights" and r["mu_abs"] is not None]
    assert max(r["max_error"] for r in fp32) <= precision.STEERING_ERROR_BOUND  # the bound fp32 keeps


def test_steering_error_interpolates_in_log_mu_and_grows_past_the_table():
    kind = next(iter(precision.MEASURED_STEERING_ERROR))
    table = precision.MEASURED_STEERING_ERROR[kind]
    points = sorted(table)
    assert precision.steering_error(kind, -points[0] / 10) == table[points[0]]
    assert precision.steering_error(kind, points[1]) == pytest.approx(table[points[1]])
    mid = (points[1] * points[2]) ** 0.5  # halfway in log |μ|
    assert precision.steering_error(kind, mid) == pytest.approx(
        tuple((a + b) / 2 for a, b in zip(table[points[1]], table[points[2]])))
    assert precision.steering_error(kind, 2 * points[-1]) == pytest.approx(tuple(2 * x for x in table[points[-1]]))


@pytest.mark.parametrize("dtype,warns", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True)])
def test_a_steered_model_in_a_low_precision_says_its_measured_error(dtype, warns):
    from svd_lightning.api import SteeredModel
    from svd_lightning.config import SteeringConfig

    from conftest import perturbed_lora
    from svd_lightning.tiny import tiny_model_and_tokenizer

    model = perturbed_lora().to(dtype)
    with pytest.warns(precision.SteeringPrecisionWarning) if warns else _no_warning(precision.SteeringPrecisionWarning) as record:
        SteeredModel(model, tiny_model_and_tokenizer()[1], SteeringConfig(mu=-30.0))
    if warns:
        message = str(record[0].message)
        kind = precision.steering_precision(model)
        median, worst = precision.steering_error(kind, 30.0)
        assert f"{median:.2g} nats" in message and f"up to {worst:.2g}" in message and "dtype='float32'" in message
    # μ = 0 steers nothing: no warning, whatever the precision
    with _no_warning(precision.SteeringPrecisionWarning):
        SteeredModel(model, tiny_model_and_tokenizer()[1], SteeringConfig(mu=0.0))


def test_bf16_autocast_over_fp32_weights_is_its_own_measured_kind():
    from conftest import perturbed_lora

    model = perturbed_lora()
    assert precision.steering_precision(model) is None
    kind = precision.steering_precision(model, autocast=torch.bfloat16)
    assert kind == "bf16 autocast over fp32 weights" and kind in precision.MEASURED_STEERING_ERROR
    with pytest.warns(precision.SteeringPrecisionWarning, match="bf16 autocast"):
        precision.check_steering_precision(model, -10.0, "here", autocast=torch.bfloat16)


class _no_warning:
    """``pytest.warns``' opposite: fails if ``category`` is warned inside."""

    def __init__(self, category):
        self.category = category

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.record = self._catch.__enter__()
        warnings.simplefilter("always")
        return self.record

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert not [w for w in self.record if issubclass(w.category, self.category)]
