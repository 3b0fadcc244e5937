"""The lm-eval backend (`svd`) against our own scorer and generator, offline, on the tiny model."""

import json

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval extra (installed by scripts/install.sh and CI)")

from svd_lightning import SteeredModel  # noqa: E402
from svd_lightning.cli import main as cli_main  # noqa: E402

from conftest import ROOT, tiny_run  # noqa: E402

TASKS = ROOT / "tests" / "lm_eval_tasks"
DOCS = json.loads((TASKS / "tiny_mc.json").read_text())


@pytest.fixture(autouse=True, scope="module")
def lm_evals_task_index_built_once():
    """lm-eval indexes its few thousand task files for every evaluation (seconds each); here the index of a set
    of folders is built once per module and reused -- test plumbing only: each call still gets its own copy."""
    from lm_eval.tasks._index import TaskIndex

    built, original = {}, TaskIndex.build

    def build(paths, **kw):
        paths = list(paths)
        key = (tuple(str(p) for p in paths), tuple(sorted(kw.items())))
        if key not in built:
            built[key] = original(paths, **kw)
        return dict(built[key])

    patch = pytest.MonkeyPatch()
    patch.setattr(TaskIndex, "build", staticmethod(build))
    yield
    patch.undo()


def _evaluate(run_dir, tasks, mu=None, **kw):
    from svd_lightning.lm_eval import evaluate

    return evaluate(str(run_dir), tasks, include_path=str(TASKS), batch_size=1, mu=mu, **kw)


def _predictions(sm, variant):
    scores = sm.score([f"Q: {d['question']}\nA:" for d in DOCS], [[" " + c for c in d["choices"]] for d in DOCS])
    return [max(range(len(s[variant])), key=s[variant].__getitem__) for s in scores]


def _accuracy(predictions):
    return sum(p == d["label"] for p, d in zip(predictions, DOCS)) / len(DOCS)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("lm_eval"), mu=10.0)[0]


@pytest.mark.slow
def test_multiple_choice_matches_our_scorer(run_dir, monkeypatch):
    monkeypatch.chdir(ROOT)  # the task YAML's data path is relative to the repository
    sm = SteeredModel.from_run_dir(run_dir)
    plain, steered = _predictions(sm, "plain"), _predictions(sm, "steered")
    assert plain != steered, "μ̄ should change some answer on this model"
    plain, steered = _accuracy(plain), _accuracy(steered)
    at_zero = _evaluate(run_dir, ["svd_tiny_mc"], mu=0.0)["results"]["svd_tiny_mc"]["acc,none"]
    with_mu = _evaluate(run_dir, ["svd_tiny_mc"])["results"]["svd_tiny_mc"]["acc,none"]
    assert at_zero == pytest.approx(plain) and with_mu == pytest.approx(steered)


@pytest.mark.slow
def test_generate_until_returns_the_steered_answers(run_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = _evaluate(run_dir, ["svd_tiny_gen"], log_samples=True)
    got = [s["resps"][0][0] for s in sorted(out["samples"]["svd_tiny_gen"], key=lambda s: s["doc_id"])]
    sm = SteeredModel.from_run_dir(run_dir)
    ours = sm.generate([f"Q: {d['question']}\nA:" for d in DOCS], max_new_tokens=8, batch_size=1)
    assert got == [a.split("\n")[0] for a in ours]
    info = out["config"]  # lm-eval records get_model_info() here
    assert info["svd_mu"] == 10.0 and info["svd_alpha"] == 0.1 and info["svd_scoring_policy"] == "mask_generation_only"


@pytest.mark.slow
def test_registered_name_and_cli(run_dir, monkeypatch, tmp_path, capsys):
    import svd_lightning.lm_eval  # noqa: F401 (registers "svd")
    from lm_eval.api.registry import get_model

    assert get_model("svd").__name__ == "SteeredHFLM"
    monkeypatch.chdir(ROOT)
    cli_main(["eval", "--run-dir", str(run_dir), "--tasks", "svd_tiny_mc", "--include_path", str(TASKS),
              "--batch_size", "1"])
    captured = capsys.readouterr()
    assert f"reading run {run_dir}" in captured.err
    assert "Tasks" in captured.out and "svd_tiny_mc" in captured.out and "|acc" in captured.out.replace(" ", "")  # make_table
    with pytest.raises(ValueError, match="mu must be a finite number"):
        _evaluate(run_dir, ["svd_tiny_mc"], mu=float("nan"))


def test_an_unknown_model_arg_is_an_error_not_ignored(run_dir):
    """HFLM would silently drop `muu=1`, and the run's μ̄ would be used instead of the one asked for."""
    from svd_lightning.lm_eval import SteeredHFLM

    with pytest.raises(ValueError, match=r"model_args: unknown option\(s\) \['muu'\] for the svd backend"):
        SteeredHFLM.create_from_arg_string(f"run_dir={run_dir},muu=1")
    with pytest.raises(ValueError, match="model_args: mu must be a number, got 'x'"):
        SteeredHFLM(str(run_dir), mu="x")


@pytest.mark.slow
def test_eval_takes_lm_evals_flags_and_writes_its_results_format(run_dir, monkeypatch, tmp_path):
    """`svd-lightning eval` is lm-eval's own `run` with the run as the model: its flags (--num_fewshot,
    --output_path, --log_samples, --seed, ... any of them), its results files (results_<time>.json,
    samples_<task>_<time>.jsonl) under a folder named after the run, the model and its arguments recorded."""
    from lm_eval.utils import sanitize_model_name

    monkeypatch.chdir(ROOT)
    out = tmp_path / "lm_eval_out"
    cli_main(["eval", "--run-dir", str(run_dir), "--tasks", "svd_tiny_mc", "--include_path", str(TASKS),
              "--batch_size", "1", "--num_fewshot", "1", "--output_path", str(out), "--log_samples", "--seed", "3",
              "--write_out"])  # one of lm-eval's flags svd-lightning does not know: handed to lm-eval as it is
    folder = out / sanitize_model_name(str(run_dir))  # named after the run (lm-eval's `pretrained`), not a random id
    results = sorted(folder.glob("results_*.json"))
    samples = sorted(folder.glob("samples_svd_tiny_mc_*.jsonl"))
    assert len(results) == 1 and len(samples) == 1 and sorted(p.name for p in out.iterdir()) == [folder.name]
    payload = json.loads(results[0].read_text())
    # the model recorded as for any lm-eval model: its registered name and arguments
    assert payload["config"]["model"] == "svd" and payload["config"]["model_args"]["pretrained"] == str(run_dir)
    assert payload["model_name"] == str(run_dir)
    assert "acc,none" in payload["results"]["svd_tiny_mc"]
    assert payload["n-shot"]["svd_tiny_mc"] == 1 and payload["config"]["random_seed"] == 3
    assert payload["config"]["svd_mu"] == 10.0  # the run's settings, from get_model_info
    rows = [json.loads(line) for line in samples[0].read_text().splitlines()]
    assert len(rows) == len(DOCS) and all("resps" in r for r in rows)
    with pytest.raises(SystemExit):
        cli_main(["eval", "--run-dir", str(run_dir), "--tasks", "svd_tiny_mc", "--model", "hf"])


def test_repeated_requests_are_scored_once_with_every_requests_answer(run_dir, monkeypatch):
    """TruthfulQA's MC1 choices recur in MC2: identical (context, continuation) tokens are one request."""
    from lm_eval.models.huggingface import HFLM

    from svd_lightning.lm_eval import SteeredHFLM

    backend = SteeredHFLM(str(run_dir), batch_size=1)
    tok = backend.tokenizer
    ctx, yes, no = (tok(t, add_special_tokens=False)["input_ids"] for t in ("Q: Is the sky blue?\nA:", " Yes", " No"))
    requests = [(("q", " Yes"), ctx, yes), (("q", " No"), ctx, no), (("mc2 q", " Yes"), ctx, yes)]
    scored, original = [], HFLM._loglikelihood_tokens
    monkeypatch.setattr(HFLM, "_loglikelihood_tokens",
                        lambda self, reqs, *a, **kw: scored.append(len(reqs)) or original(self, reqs, *a, **kw))
    got = backend._loglikelihood_tokens(requests)
    assert scored == [2] and got[0] == got[2] and got[0] != got[1]
    again = backend._loglikelihood_tokens(requests[:2])  # another call: the prefix cache and GEMM shapes may differ
    assert [g for _, g in got[:2]] == [g for _, g in again]
    # fp32 sums of a few token log-probs: equal to float rounding (seen 1e-7 relative with one thread)
    assert [ll for ll, _ in got[:2]] == pytest.approx([ll for ll, _ in again], rel=1e-5)



@pytest.mark.slow
def test_python_m_svd_lightning_lm_eval_is_lm_evals_own_cli_with_svd_registered(run_dir, tmp_path):
    """lm-eval's command line itself (its flags and its table), with the `svd` model available."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "svd_lightning.lm_eval", "run", "--model", "svd", "--model_args",
                          f"run_dir={run_dir}", "--tasks", "svd_tiny_mc", "--include_path", str(TASKS), "--batch_size", "1",
                          "--device", "cpu"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "svd_tiny_mc" in out.stdout and "acc" in out.stdout and "|" in out.stdout


def test_eval_names_a_num_fewshot_larger_than_the_task_can_give(run_dir, monkeypatch, capsys):
    """lm-eval's sampler fails on more shots than the task has examples ("Sample larger than population"):
    the flag is named instead, one line, no traceback."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["eval", "--run-dir", str(run_dir), "--tasks", "svd_tiny_mc", "--include_path", str(TASKS),
                  "--batch_size", "1", "--num_fewshot", "1000"])
    assert exit_.value.code != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse's one line, as for every bad flag
    assert last.startswith("svd-lightning eval: error: --num_fewshot 1000: a task has fewer examples than that")


@pytest.mark.parametrize("flags,message", [
    (["--num_fewshot", "-1"], "--num_fewshot must be an integer ≥ 0"),
    (["--num_fewshot", "two"], "--num_fewshot must be an integer ≥ 0"),
    (["--limit", "0"], "--limit must be a number of examples ≥ 1"),
    (["--limit=-1"], "--limit must be a number of examples ≥ 1"),
    (["-L", "2.5"], "--limit must be a number of examples ≥ 1"),
    (["--output_path", ""], "--output_path is empty"),
    (["--output_path", "FILE"], "is a file: lm-eval writes a folder"),
    (["--include_path", "no/such/folder"], "--include_path no/such/folder does not exist"),
    (["--seed", "-5"], "--seed must be an integer ≥ 0"),
])
def test_eval_refuses_lm_evals_flags_it_would_misread_before_any_model_loads(tmp_path, monkeypatch, capsys, flags, message):
    from svd_lightning import lm_eval as backend

    (tmp_path / "FILE").write_text("results")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(backend, "cli_evaluate", lambda: pytest.fail("lm-eval ran"), raising=False)
    with pytest.raises(SystemExit) as exit_:
        backend.main(["--run-dir", "no-run-needed", "--tasks", "truthfulqa_mc2", *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert backend.lm_eval_flag_problem(["--num_fewshot", "0", "--limit", "0.5", "--seed", "0,1234,1234,1234",
                                         "--output_path", str(tmp_path / "out")]) is None
