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
