"""svd_lightning.cli: `svd-lightning` end to end on the tiny model -- fit, validate, configs, bad settings."""

import json

import pytest
import torch

from svd_lightning.cli import main
from svd_lightning.module import SteeringLM

from conftest import ROOT, cli_tiny_fit, write_truthfulqa


def test_cli_fit_then_validate_from_run_dir(tmp_path, monkeypatch, capsys):
    run, common = cli_tiny_fit(tmp_path, monkeypatch)
    for name in ("config.yaml", "steering.json", "metrics.json", "metrics.csv", "adapter/adapter_config.json"):
        assert (run / name).exists(), name
    record = json.loads((run / "steering.json").read_text())
    steering = record["steering"]
    # μ̄'s token statistics and the contrastive γ grid came from one pass over the calib choices.
    assert record["diagnostics"]["calibration_passes"] == 1 and record["diagnostics"]["choice_rows"] > 0
    assert torch.isfinite(torch.tensor(steering["mu"]))
    assert record["solver"]["strength"] == "exact" and steering["alpha"] == 0.1 and record["format_version"] == 3
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [h["stage"] for h in history] == ["val", "test"]  # validation on calib, then test after fit
    fit_metrics = {stage: h for h in history for stage in [h["stage"]]}
    assert record["contrastive_gamma"] == fit_metrics["test"]["test/gamma"]  # the contrastive γ is part of the run
    for stage in ("val", "test"):
        for v in ("plain", "base", "steered"):
            for m in ("mc1", "mc2", "mc2_paper", "mc3_paper", "mc_avg_paper"):
                assert f"{stage}/{m}_{v}" in fit_metrics[stage]
    out = capsys.readouterr().out
    assert "+SVDecode" in out and "95% paired bootstrap over" in out
    # Every second of the command in a stage (configs/tiny.yaml validates during fit, so μ̄ and γ are
    # solved, from their one pass, before validation scoring), in the run and printed.
    timings = json.loads((run / "timings.json").read_text())
    assert set(timings["seconds"]) == {"set-up", "warm start", "calibration", "validation scoring",
                                       "run writing", "test scoring"}
    assert min(timings["seconds"].values()) >= 0 and timings["other"] >= 0
    assert sum(timings["seconds"].values()) + timings["other"] == pytest.approx(timings["total"], abs=1e-6)
    assert "stage times of this fit (also in the run's timings.json):" in out and "calibration" in out
    # The figures a reader looks at, referenced from the card; the curve is the objective `exact` minimised.
    for figure in ("calibration.png", "val_questions.png", "test_questions.png"):
        assert (run / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
        assert f"]({figure})" in (run / "README.md").read_text()
    curve = json.loads((run / "calibration_curve.json").read_text())
    lowest = min(range(len(curve["mu"])), key=curve["token_nll"].__getitem__)
    assert abs(curve["mu"][lowest] - steering["mu"]) <= curve["mu"][1] - curve["mu"][0]
    assert curve["strength"] == steering["mu"]
    per_question = json.loads((run / "test_per_question.json").read_text())
    for m in ("mc1", "mc2"):  # the printed gain is the mean of the per-question differences, inside its CI
        gain = fit_metrics["test"]["paired_bootstrap"][f"{m}_steered_minus_plain"]
        diffs = [s - p for s, p in zip(per_question["steered"][m], per_question["plain"][m])]
        assert gain["mean"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-12)
        assert gain["mean"] == pytest.approx(fit_metrics["test"][f"test/{m}_steered"] - fit_metrics["test"][f"test/{m}_plain"], abs=1e-6)
        assert gain["ci_low"] <= gain["mean"] <= gain["ci_high"] and gain["questions"] == len(diffs)

    # The run reproduces both from its directory: through its own config.yaml (a run you made), and through the
    # shipped config with the run's files alone (the safe way to reuse a run you were given).
    for version, stage, config in ((1, "val", str(run / "config.yaml")), (2, "test", "tiny")):
        main(["validate" if stage == "val" else "test", "--config", config, "--model.run_dir", str(run), *common])
        again = json.loads((tmp_path / f"runs/tiny/version_{version}/metrics.json").read_text())["history"][-1]
        assert again[f"{stage}/mu"] == pytest.approx(steering["mu"], abs=1e-12)
        for m in ("mc1", "mc2", "mc_avg_paper"):
            for v in ("plain", "base", "steered"):
                assert again[f"{stage}/{m}_{v}"] == pytest.approx(fit_metrics[stage][f"{stage}/{m}_{v}"], abs=1e-5), (m, v)


CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "_base")


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_parses_and_print_config_round_trips(config, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(ROOT / config), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert capsys.readouterr().out == printed


@pytest.mark.parametrize("config", ["tiny.yaml", "truthfulqa/lora.yaml", "truthfulqa/ia3.yaml", "commonsense/winogrande.yaml"])
def test_print_config_round_trips(tmp_path, capsys, config):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs" / config), "--trainer.default_root_dir", str(tmp_path / "d"),
              "--print_config"])
    printed = capsys.readouterr().out
    assert f"default_root_dir: {tmp_path / 'd'}" in printed  # the flag is honoured, not overridden by a logger
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert capsys.readouterr().out == printed


@pytest.mark.parametrize("flag,value,message", [
    ("--model.floor", "5", "floor is a log-probability and must be ≤ 0, got 5.0"),
    ("--model.alpha", "0", "alpha must be in (0, 1], got 0.0"),
    ("--model.mu", "1e300", "mu is too large"),
])
def test_cli_bad_settings_get_one_line_and_exit_2(tmp_path, monkeypatch, capsys, flag, value, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:
        main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), flag, value])
    assert err.value.code == 2
    assert f"svd-lightning: error: SteeringLM: {message}" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_ckpt_path_settings_that_contradict_the_command_line_are_an_error(tmp_path, monkeypatch, capsys):
    """LightningCLI takes the model's settings from --ckpt_path over an explicit --model.adapter_options."""
    monkeypatch.chdir(tmp_path)
    # configs/tiny.yaml's model settings, as a checkpoint of it would hold them
    hparams = dict(SteeringLM("tiny-random", adapter="lora", adapter_options={"r": 4, "lora_alpha": 8},
                              learning_rate=0.01, alpha=0.1).hparams)
    torch.save({"hyper_parameters": hparams}, tmp_path / "last.ckpt")
    with pytest.raises(SystemExit) as err:
        main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--ckpt_path", str(tmp_path / "last.ckpt"),
              "--model.adapter_options", "{r: 8, lora_alpha: 16}"])
    assert err.value.code == 2
    err = capsys.readouterr().err
    assert ("other model settings (model.adapter_options: given {'r': 8, 'lora_alpha': 16}, checkpoint "
            "{'r': 4, 'lora_alpha': 8})") in err


def test_cli_adds_the_steering_callbacks_and_a_configs_own_list_replaces_them_by_class(tmp_path, monkeypatch, capsys):
    """tiny.yaml lists no callbacks: the CLI adds them, with `steering.*` options. A config's own
    StrengthSolver replaces the default one; `--contrastive_baseline false` drops the baseline."""
    data = write_truthfulqa(tmp_path / "mc.json")
    monkeypatch.chdir(tmp_path)
    common = ["--config", str(ROOT / "configs/tiny.yaml"), "--data.init_args.path", str(data),
              "--trainer.enable_progress_bar", "false"]
    main(["fit", *common, "--trainer.default_root_dir", str(tmp_path / "own"), "--contrastive_baseline", "false",
          "--trainer.callbacks+=svd_lightning.callbacks.StrengthSolver", "--trainer.callbacks.strength", "median"])
    run = json.loads((tmp_path / "own/version_0/steering.json").read_text())
    assert run["solver"]["strength"] == "median" and run["contrastive_gamma"] is None
    assert "trainer.callbacks has its own StrengthSolver: the default one is not added" in capsys.readouterr().err
    per_question = json.loads((tmp_path / "own/version_0/test_per_question.json").read_text())
    assert set(per_question) == {"plain", "base", "steered"}  # no contrastive column


def test_help_says_what_the_tool_is_and_lists_its_commands_without_importing_torch():
    """`svd-lightning --help` answers at once: no torch, Lightning or transformers imported for it."""
    import subprocess
    import sys

    code = ("import sys; from svd_lightning.entry import main; main(['--help']); "
            "print('heavy:', sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("svd-lightning: Steering Vector Decoding")
    for command in ("fit,validate,test,predict", "generate", "eval", "--config NAME", "tiny", "paper/llama-3.1-8b-lora"):
        assert command in out, command
    assert out.rstrip().endswith("heavy: []")


def test_fit_takes_a_load_dataset_spec_as_the_data(tmp_path, monkeypatch):
    """`--data.init_args.path '{path: json, data_files: ..., split: train}'`: datasets loads it (a hub id where
    a hub is reachable), and the run records the spec it read."""
    from conftest import cli_tiny_fit

    data = write_truthfulqa(tmp_path / "questions.json")
    spec = {"path": "json", "data_files": str(data), "split": "train"}
    run, _ = cli_tiny_fit(tmp_path, monkeypatch, "--data.init_args.path", json.dumps(spec))
    assert json.loads((run / "steering.json").read_text())["steering"]["mu"] is not None
    config = (run / "config.yaml").read_text()
    assert "data_files" in config and str(data) in config


def test_the_run_stays_where_it_is_whatever_loggers_the_user_adds(tmp_path, monkeypatch):
    """`--trainer.logger TensorBoardLogger` (any logger list) logs beside ours; the run stays at
    <default_root_dir>/version_N, written whole."""
    from conftest import cli_tiny_fit

    run, _ = cli_tiny_fit(tmp_path, monkeypatch, "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
                          "--trainer.logger.save_dir", str(tmp_path / "tb"))
    assert run == tmp_path / "runs/tiny/version_0" and (run / "steering.json").exists() and (run / "metrics.csv").exists()
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*")), "TensorBoard logged beside the run"
    assert not (tmp_path / "runs/tiny/runs").exists()


@pytest.mark.parametrize("weights", ["best", "last"])
def test_a_monitoring_checkpoint_decides_the_weights_the_run_carries(weights, tmp_path, monkeypatch):
    """EarlyStopping stops after epoch 2; a ModelCheckpoint ranks epoch 1's weights best (monitor: step, mode
    min). ``weights: best`` calibrates, writes and tests those, ``last`` the last ones."""
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "ckpt"), "monitor": "step", "mode": "min", "save_top_k": 1}},
        {"class_path": "lightning.pytorch.callbacks.EarlyStopping",
         "init_args": {"monitor": "train/loss", "mode": "min", "min_delta": 100.0, "patience": 1}},
    ]
    run, _ = cli_tiny_fit(tmp_path, monkeypatch, "--trainer.max_epochs", "5", "--trainer.enable_checkpointing", "true",
                          "--trainer.callbacks", json.dumps(callbacks), "--weights", weights)
    record = json.loads((run / "steering.json").read_text())
    history = json.loads((run / "metrics.json").read_text())["history"]
    val = [h for h in history if h["stage"] == "val"]
    assert len(val) == 2  # EarlyStopping ended the fit after the second epoch
    [best_file] = (tmp_path / "ckpt").glob("*.ckpt")
    saved = torch.load(best_file, map_location="cpu", weights_only=False)
    chosen = val[0] if weights == "best" else val[1]
    assert record["weights"]["from"] == weights and record["global_step"] == chosen["step"]
    if weights == "best":
        assert record["weights"]["checkpoint"] == best_file.name and record["weights"]["monitor"] == "step"
    # μ̄ solved again on the chosen weights is the μ̄ validation solved on them; test scored with it
    assert record["steering"]["mu"] == pytest.approx(chosen["val/mu"], rel=1e-6)
    assert history[-1]["stage"] == "test" and history[-1]["test/mu"] == record["steering"]["mu"]
    from safetensors.torch import load_file

    written = load_file(run / "adapter" / "adapter_model.safetensors")
    lora = {k: v for k, v in saved["state_dict"].items() if "lora_" in k}
    assert written and len(lora) == len(written)
    same = [torch.equal(written[name], next(v for k, v in lora.items() if k.endswith(name.replace(".weight", ".default.weight"))))
            for name in written]
    assert all(same) if weights == "best" else not any(same)


@pytest.mark.parametrize("former,message", [
    (["--steering.strength", "mean", "--steering.curvature", "fisher"], None),
    (["--config", "STEERING_YAML"], None),
    (["--steering.strength", "mean", "--solver.strength", "trimmed"], "disagree: give solver.strength only"),
])
def test_the_solvers_former_cli_key_still_reads_into_solver(tmp_path, capsys, former, message):
    """`steering.*` was the strength solver's key before `solver.*` (run format 3): configs and flags that use it
    still work, with a note; given both ways with different values, it is an error naming both."""
    from lightning.pytorch import LightningDataModule

    from svd_lightning.callbacks import StrengthSolver
    from svd_lightning.cli import SteeringCLI
    from svd_lightning.log import InputError

    old = tmp_path / "old.yaml"
    old.write_text("steering:\n  strength: mean\n  curvature: fisher\n")
    args = ["--config", "tiny", *[str(old) if a == "STEERING_YAML" else a for a in former],
            "--trainer.default_root_dir", str(tmp_path / "runs")]
    from svd_lightning.recipes import packaged_configs

    build = lambda: SteeringCLI(SteeringLM, LightningDataModule, subclass_mode_data=True, args=packaged_configs(args),  # noqa: E731
                                run=False)
    if message:
        with pytest.raises(InputError, match=message):
            build()
        return
    solver = next(c for c in build().trainer.callbacks if isinstance(c, StrengthSolver))
    assert (solver.strength, solver.curvature) == ("mean", "fisher")
    assert "steering.* is now solver.*" in capsys.readouterr().err
