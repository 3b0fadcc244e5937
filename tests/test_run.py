"""The run format: a run directory is complete or refused, every error names the run, reuse is checked."""

import json
import math

import pytest
import torch

from svd_lightning import SteeredModel
from svd_lightning.decoding import score_choices
from svd_lightning.generate import generate_answers, load_run, main as generate_main
from svd_lightning.module import SteeringLM
from svd_lightning.run import RUN_FILE, RunError, SteeringRun, adapter_hash, write_run

from conftest import perturbed_lora
from test_framework import _datamodule, _trainer, write_truthfulqa


def _run(tmp_path, name="run", mu=-1.0, seed=0, **fields):
    """A complete tiny run directory written the way `fit` writes it (adapter first, then steering.json)."""
    torch.manual_seed(seed)  # LoRA A's init
    model = perturbed_lora(seed)
    run = SteeringRun(model="tiny-random", adapter="lora", mu=mu, alpha=0.1, **fields)
    write_run(model, run, tmp_path / name)
    return tmp_path / name, model


def test_run_round_trips_and_binds_the_adapter(tmp_path):
    path, _ = _run(tmp_path)
    run = SteeringRun.load(path)
    assert run.mu == -1.0 and run.format_version == 1 and run.adapter_sha256 == adapter_hash(path / "adapter")
    assert "torch" in run.versions


@pytest.mark.parametrize("damage,message", [
    (lambda p: (p / RUN_FILE).write_text('{"model": "tiny-random", "adapter": "lo'), "not valid JSON"),
    (lambda p: _edit(p, mu=None), "field 'mu' must be a finite number"),
    (lambda p: (p / RUN_FILE).write_text((p / RUN_FILE).read_text().replace('"mu": -1.0', '"mu": NaN')), "not valid JSON"),
    (lambda p: _edit(p, scoring_policy="sometimes"), "field 'scoring_policy' must be one of"),
    (lambda p: _edit(p, alpha=2.0), "field 'alpha' must be in"),
    (lambda p: (p / RUN_FILE).unlink(), "is not a finished run"),
    (lambda p: (p / "adapter" / "adapter_config.json").unlink(), "adapter_config.json is missing"),
], ids=["truncated", "mu-null", "mu-nan", "policy", "alpha", "no-steering", "no-adapter"])
def test_bad_run_errors_name_the_run(tmp_path, damage, message):
    path, _ = _run(tmp_path)
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


def test_missing_run_directory(tmp_path):
    with pytest.raises(RunError, match=f"run directory {tmp_path / 'nope'} does not exist"):
        SteeringRun.load(tmp_path / "nope")


def test_a_directory_mixing_two_runs_is_refused(tmp_path):
    """A kill between saving the new adapter and writing its steering.json, or two writers: the
    adapter is not the one steering.json was written for."""
    path, _ = _run(tmp_path)
    other, _ = _run(tmp_path, "other", seed=1)
    (path / "adapter" / "adapter_model.safetensors").write_bytes((other / "adapter" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(RunError, match="mixes two runs"):
        SteeringRun.load(path)


def test_fit_killed_before_the_end_leaves_no_run(tmp_path):
    data = write_truthfulqa(tmp_path / "mc.json", n=10)

    class Killed(Exception):
        pass

    class KillAtTrainEnd(SteeringLM):
        def on_train_end(self):
            raise Killed()

    from svd_lightning.callbacks import StrengthSolver

    module = KillAtTrainEnd("tiny-random", adapter="lora", learning_rate=0.05, adapter_options={"r": 4})
    trainer = _trainer(tmp_path, [StrengthSolver("exact")])
    with pytest.raises(Killed):
        trainer.fit(module, _datamodule(data, limit_train=4, limit_calib=2, limit_test=2))
    with pytest.raises(RunError, match="is not a finished run"):
        SteeringRun.load(trainer.log_dir)


def test_reuse_takes_settings_from_the_run_and_refuses_conflicts(tmp_path):
    path, _ = _run(tmp_path)
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
    path, _ = _run(tmp_path)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Q: Yes?\\nA:"}\n')
    with pytest.raises(SystemExit):
        generate_main(["--run-dir", str(path), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"), f"--mu={mu}"])
    assert "must be finite" in capsys.readouterr().err


def test_steered_model_scores_and_generates_like_the_package(tmp_path, tokenizer):
    path, model = _run(tmp_path)
    sm = SteeredModel.from_run_dir(path)
    with pytest.raises(ValueError, match="mu must be a finite number"):
        SteeredModel.from_run_dir(path, mu=math.nan)
    got = sm.score("Q: Is the sky blue?\nA:", [" Yes", " No, it is green"])
    from svd_lightning.batch import ChoiceExample, Tokenized, collate_choices

    batch = collate_choices([ChoiceExample("Q: Is the sky blue?\nA:", [" Yes", " No, it is green"], [True, False], 0)],
                            Tokenized(tokenizer, 512))
    ref = score_choices(model.eval(), batch, mu=-1.0, alpha=0.1)
    for k in ("plain", "base", "steered"):
        torch.testing.assert_close(torch.tensor(got[k]), ref[k], rtol=1e-5, atol=1e-5)
    many = sm.score(["Q: Is the sky blue?\nA:", "Q: Yes?\nA:"], [[" Yes", " No, it is green"], [" Yes", " No", " Maybe"]])
    assert [len(m["steered"]) for m in many] == [2, 3]
    for k in got:
        assert many[0][k] == pytest.approx(got[k], rel=1e-5, abs=1e-5)
    prompts = ["Q: What is the capital of France? A:", "Yes"]
    answers = sm.generate(prompts, max_new_tokens=6)
    ref_rows = generate_answers(model, tokenizer, prompts, -1.0, 0.1, max_new_tokens=6, progress=False)
    assert answers == [r["steered"] for r in ref_rows]
    both = sm.generate(prompts, with_plain=True, max_new_tokens=6)
    assert [r["plain"] for r in both] == [r["plain"] for r in ref_rows]


def test_readme_python_snippet_runs(tmp_path, monkeypatch):
    """The README's "Use it from Python" block, on a tiny run directory."""
    from test_framework import ROOT

    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Use it from Python", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    path, _ = _run(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "truthfulqa-lora").mkdir(parents=True)
    (tmp_path / "runs" / "truthfulqa-lora" / "version_0").symlink_to(path)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    scores = namespace["scores"]
    assert set(scores) == {"plain", "base", "steered"} and len(scores["steered"]) == 2
    assert isinstance(namespace["answers"][0], str)


def test_a_second_writer_is_refused_and_a_dead_ones_claim_taken_over(tmp_path):
    import subprocess
    import sys

    from svd_lightning.run import acquire, release

    run_dir = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        run_dir.mkdir()
        (run_dir / ".writing").write_text(str(child.pid))  # a live writer
        with pytest.raises(RunError, match=f"being written by another process \\(pid {child.pid}\\)"):
            acquire(run_dir)
    finally:
        child.kill()
        child.wait()
    lock = acquire(run_dir)  # that writer is gone: its claim is taken over
    assert lock.read_text() == str(__import__("os").getpid())
    release(run_dir)
    assert not lock.exists()


def test_cli_fit_then_predict_writes_scores_and_prints_the_run(tmp_path, monkeypatch, capsys):
    from svd_lightning.cli import main
    from test_framework import cli_tiny_fit

    run, common = cli_tiny_fit(tmp_path, monkeypatch)
    data = tmp_path / "mc.json"
    assert SteeringRun.load(run).format_version == 1 and not (run / ".writing").exists()
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
    assert len(rows) == expected and rows[0]["mu"] == SteeringRun.load(run).mu
    assert {"plain", "base", "steered", "is_true", "choice_set", "choice_index"} <= set(rows[0]["choices"][0])
    assert not (tmp_path / "adapter").exists()  # nothing lands in the working directory


_FIT_SCRIPT = """
import sys, lightning as L
from svd_lightning.callbacks import StrengthSolver
from svd_lightning.data import TruthfulQADataModule
from svd_lightning.module import SteeringLM
data, root, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
L.seed_everything(seed)
dm = TruthfulQADataModule(path=data, instruction=False, batch_size=2, train_batch_size=2, max_length=128,
                          limit_train=8, limit_calib=4, limit_test=2)
module = SteeringLM("tiny-random", adapter="lora", learning_rate=0.05, adapter_options={"r": 4}, seed=seed)
trainer = L.Trainer(accelerator="cpu", max_epochs=2, enable_checkpointing=False, enable_progress_bar=False,
                    logger=L.pytorch.loggers.CSVLogger(root, name="", version=0), callbacks=[StrengthSolver("exact")])
trainer.fit(module, dm)
"""


def test_killed_fit_leaves_the_previous_run_or_none_never_a_mix(tmp_path):
    """Kill a tiny `fit` (writing into an existing complete run directory) at several moments."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data = write_truthfulqa(tmp_path / "mc.json", n=12)
    script = tmp_path / "fit.py"
    script.write_text(_FIT_SCRIPT)
    run_dir = tmp_path / "runs" / "version_0"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    fit = lambda seed: subprocess.Popen([sys.executable, str(script), str(data), str(tmp_path / "runs"), str(seed)],  # noqa: E731
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert fit(0).wait(timeout=300) == 0
    old = SteeringRun.load(run_dir)
    outcomes = set()
    for delay in (1.0, 3.0, 5.0, 7.0, 9.0):
        proc = fit(1)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        try:
            run = SteeringRun.load(run_dir)  # validates that steering.json and adapter/ belong together
            outcomes.add("old" if run.adapter_sha256 == old.adapter_sha256 else "new")
        except RunError as err:
            assert str(run_dir) in str(err)
            outcomes.add("none")
            assert fit(0).wait(timeout=300) == 0  # restore a complete run for the next kill
            old = SteeringRun.load(run_dir)
    assert "old" in outcomes  # an early kill leaves the previous run untouched
