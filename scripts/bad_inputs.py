"""Print the error (or result) each bad input gets: the messages a user sees.

    .venv/bin/python scripts/bad_inputs.py

Every case here is also a test (tests/test_data.py, test_run.py, test_api.py, test_generate.py,
test_cli.py, test_module.py, test_lm_eval.py, test_progress.py, test_precision.py); this script only shows
the messages.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import lightning as L  # noqa: E402
import torch  # noqa: E402

import test_data as td  # noqa: E402
from svd_lightning import models  # noqa: E402
from svd_lightning.batch import Tokenized  # noqa: E402
from svd_lightning.callbacks import StrengthSolver  # noqa: E402
from svd_lightning.data import GenericChoiceDataModule, TruthfulQADataModule  # noqa: E402
from svd_lightning.data.base import seeded_split  # noqa: E402
from svd_lightning.generate import read_prompts  # noqa: E402
from svd_lightning.module import SteeringLM  # noqa: E402
from svd_lightning.tiny import tiny_model_and_tokenizer  # noqa: E402


def show(name: str, fn) -> None:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
        msg = "; ".join(str(w.message) for w in caught if "truncated" in str(w.message)) or "(no error)"
        print(f"- **{name}** → warning: {msg}")
    except BaseException as err:  # noqa: BLE001 -- we print whatever the user would see
        print(f"- **{name}** → `{type(err).__name__}: {str(err).splitlines()[0][:300]}`")


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    os.chdir(tmp)  # the trainers below write their runs under ./runs: here, not in the caller's folder
    trainer = lambda: L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,  # noqa: E731
                                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                callbacks=[StrengthSolver()])
    show("missing data file", lambda: TruthfulQADataModule(str(tmp / "nope/mc_task.json")).describe())
    (tmp / "bad.json").write_text('[{"question": "a", "choices": ["x"], "label": 0},\n {"question": ')
    show("malformed JSON", lambda: GenericChoiceDataModule(str(tmp / "bad.json")).describe())
    (tmp / "bad.jsonl").write_text(json.dumps(td.qa_rows(1)[0]) + "\n{oops\n")
    show("malformed JSONL line", lambda: GenericChoiceDataModule(str(tmp / "bad.jsonl")).describe())
    (tmp / "bad.csv").write_text("question,choices,label\nq0,a;b,0\nq1,a;b,0,surplus\n")
    show("malformed CSV (extra cell)", lambda: GenericChoiceDataModule(str(tmp / "bad.csv")).describe())
    (tmp / "quote.csv").write_text('question,choices,label\nq0,a;b,0\n"q1,a;b,0\n')
    show("malformed CSV (open quote)", lambda: GenericChoiceDataModule(str(tmp / "quote.csv")).describe())
    td.write_json(tmp / "empty.json", [])
    show("file with no rows", lambda: GenericChoiceDataModule(str(tmp / "empty.json")).describe())
    for case, (name, cls, rows, _) in td.BAD.items():
        (tmp / case).mkdir()
        path = td.write_json(tmp / case / name, rows)
        show(f"row: {case}", lambda: cls(str(path)).describe())
    tok = tiny_model_and_tokenizer(0)[1]
    show("prompt longer than max_length (truncated from the left, answer kept)",
         lambda: Tokenized(tok, 8).pair("word " * 40, " answer"))
    show("answer longer than max_length", lambda: Tokenized(tok, 4).pair("Q?", " a b c d e f g"))
    rows = td.qa_rows(10)
    rows[4] = dict(rows[4], choices=["yes", "no " * 40])
    long = td.write_json(tmp / "long.json", rows)
    show("a choice longer than max_length, in a DataModule",
         lambda: td.ready(GenericChoiceDataModule(str(long), max_length=16), tok))
    train, calib, test = seeded_split(list(range(10)), (0.6, 0.2, 0.2), 0)
    rows = td.qa_rows(10)
    rows[test[0]] = dict(rows[train[0]])
    repeated = td.write_json(tmp / "repeated.json", rows)
    show("a test question that is also a train question (overlap: error)",
         lambda: GenericChoiceDataModule(str(repeated), overlap="error").describe())
    show("the same with the default overlap: drop",
         lambda: print(f"  test split: {GenericChoiceDataModule(str(repeated)).describe()['test']} of {len(test)}"))
    show("unknown PEFT method", lambda: models.adapter_config("dora"))
    show("target modules absent from the model",
         lambda: models.apply_adapter(tiny_model_and_tokenizer(0)[0], "lora", target_modules=["query"]))
    show("unknown adapter option", lambda: models.adapter_config("lora", rank=4))
    for alpha in (0.0, 1.5):
        show(f"alpha = {alpha}", lambda: SteeringLM("tiny-random", alpha=alpha))
    data = td.write_json(tmp / "mc_task.json", td.tqa_rows(10))
    dm = lambda **kw: TruthfulQADataModule(str(data), instruction=False, max_length=128, **kw)  # noqa: E731
    show("empty calibration set", lambda: trainer().fit(SteeringLM("tiny-random"), dm(limit_calib=0)))
    show("every calibration token skipped (adapter = identity)",
         lambda: L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                           callbacks=[StrengthSolver()]).validate(SteeringLM("tiny-random"), dm(limit_calib=2, limit_test=2)))

    def nan_logits():
        module = SteeringLM("tiny-random", mu=-1.0)
        with torch.no_grad():
            module.model.get_base_model().lm_head.weight[3].fill_(float("nan"))
        L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
            module, dm(limit_calib=2, limit_test=2))

    show("non-finite logits", nan_logits)
    (tmp / "prompts.jsonl").write_text('{"prompt": "fine"}\n{"text": "no prompt field"}\n')
    show("generation prompts without 'prompt'", lambda: read_prompts(tmp / "prompts.jsonl"))
    run_inputs(tmp)


def run_inputs(tmp: Path) -> None:
    """Bad run directories (tests/test_run.py)."""
    from conftest import perturbed_lora, save_tiny_run

    from svd_lightning.run import RUN_FILE, SteeringRun

    def fresh(name: str) -> Path:
        return save_tiny_run(perturbed_lora(), tmp / name)

    show("missing run directory", lambda: SteeringRun.load(tmp / "no-run"))
    run = fresh("truncated")
    (run / RUN_FILE).write_text(open(run / RUN_FILE).read()[:40])
    show("truncated steering.json", lambda: SteeringRun.load(run))
    run = fresh("mu-null")
    (run / RUN_FILE).write_text(open(run / RUN_FILE).read().replace('"mu": -1.0', '"mu": null'))
    show('steering.json with "mu": null', lambda: SteeringRun.load(run))
    run, other = fresh("mixed"), fresh("other")
    (run / "adapter/adapter_model.safetensors").write_bytes((other / "adapter/adapter_model.safetensors").read_bytes())
    show("a directory mixing two runs' files", lambda: SteeringRun.load(run))
    run = fresh("no-steering")
    (run / RUN_FILE).unlink()
    show("a run killed before it finished (no steering.json)", lambda: SteeringRun.load(run))
    run = fresh("reuse")
    show("reuse with another adapter", lambda: SteeringLM(run_dir=str(run), adapter="ia3"))
    show("reuse with another alpha", lambda: SteeringLM(run_dir=str(run), alpha=1.0))
    run_format_inputs(tmp, fresh)
    setting_inputs(tmp, fresh)


def _edit(run: Path, **changes) -> Path:
    from svd_lightning.run import RUN_FILE

    payload = json.loads((run / RUN_FILE).read_text())
    payload.update(changes)
    for key in [k for k, v in changes.items() if v is _DROP]:
        del payload[key]
    (run / RUN_FILE).write_text(json.dumps(payload))
    return run


_DROP = object()


def _edit_steering(run: Path, **changes) -> Path:
    """Change settings inside steering.json's `steering` object (the decode settings)."""
    from svd_lightning.run import RUN_FILE

    payload = json.loads((run / RUN_FILE).read_text())
    payload["steering"].update(changes)
    (run / RUN_FILE).write_text(json.dumps(payload))
    return run


def run_format_inputs(tmp: Path, fresh) -> None:
    """steering.json and adapter/ edited by hand (format 3)."""
    from svd_lightning.run import SteeringRun, load_run

    config = lambda r: r / "adapter" / "adapter_config.json"  # noqa: E731
    run = fresh("lora-alpha")
    config(run).write_text(json.dumps({**json.loads(config(run).read_text()), "lora_alpha": 800}))
    show("adapter_config.json edited (lora_alpha 8 -> 800)", lambda: SteeringRun.load(run))
    show("both hashes removed from steering.json",
         lambda: SteeringRun.load(_edit(fresh("no-hashes"), adapter_sha256=_DROP, tokenizer_sha256=_DROP)))
    show("an unknown key (mue) in steering.json", lambda: SteeringRun.load(_edit(fresh("mue"), mue=-2.0)))
    show("adapter: ia3 in steering.json over LoRA weights", lambda: SteeringRun.load(_edit(fresh("ia3"), adapter="ia3")))
    show("mu = 1e300 in steering.json", lambda: SteeringRun.load(_edit_steering(fresh("huge"), mu=1e300)))
    show("solver.strength 'best' in steering.json",
         lambda: SteeringRun.load(_edit(fresh("solver"), solver={"strength": "best", "curvature": "identity", "trim": 0.1})))
    show("model: /etc in steering.json", lambda: load_run(_edit(fresh("etc"), model="/etc")))
    received_run_inputs(tmp, fresh)


def received_run_inputs(tmp: Path, fresh) -> None:
    """A run from someone else (tests/test_received_runs.py): code, paths, links and keys it names."""

    from svd_lightning import models
    from svd_lightning.run import RUN_FILE, SteeringRun, load_run

    evil = tmp / "evil-model"
    evil.mkdir()
    auto_map = {"AutoConfig": "configuration_evil.C", "AutoTokenizer": ["tokenization_evil.T", None]}
    (evil / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": auto_map}))
    (evil / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_evil.T", None]}}))
    os.environ["SVD_LIGHTNING_MODEL_DIRS"] = str(tmp)
    show("model: a folder with its own code (auto_map), folder allowed",
         lambda: load_run(_edit(fresh("remote-code"), model=str(evil))))
    del os.environ["SVD_LIGHTNING_MODEL_DIRS"]
    show("model: ../../.. in steering.json", lambda: load_run(_edit(fresh("parent"), model="../../..")))
    show("model: a .gguf outside the run", lambda: load_run(_edit(fresh("gguf"), model=str(tmp / "x.gguf"))))
    run, other = fresh("linked"), fresh("linked-other")
    (run / "adapter").rename(tmp / "moved-adapter")
    (run / "adapter").symlink_to(tmp / "moved-adapter")
    show("adapter/ a symbolic link out of the run", lambda: SteeringRun.load(run))
    run = fresh("twice")
    (run / RUN_FILE).write_text((run / RUN_FILE).read_text().replace("{", '{"model": "/etc", ', 1))
    show("steering.json with the key 'model' twice", lambda: SteeringRun.load(run))
    os.environ[models.TRUST_REMOTE_CODE_ENV] = "maybe"
    show(f"{models.TRUST_REMOTE_CODE_ENV}=maybe", models.trust_remote_code)
    del os.environ[models.TRUST_REMOTE_CODE_ENV]


def setting_inputs(tmp: Path, fresh) -> None:
    """Settings, decoding options, the API, lm-eval model_args, environment variables."""
    from svd_lightning import SteeredModel
    from svd_lightning.generation import decoding_kwargs
    from svd_lightning.precision import resolve_precision
    from svd_lightning.progress import interval_seconds

    show("--model.floor 5", lambda: SteeringLM("tiny-random", floor=5.0))
    show("generate --top-p 1.5", lambda: decoding_kwargs("sample", top_p=1.5))
    show('generate(mode="beam", num_beams=0)', lambda: decoding_kwargs("beam", num_beams=0))
    print(f"- **--trainer.precision bf16-mixed on this CPU** → `{resolve_precision('bf16-mixed', 'cpu')[1]}`")
    sm = SteeredModel.from_run_dir(fresh("api"))
    show('SteeredModel.score(p, " Yes.")', lambda: sm.score("Q: Sky?\nA:", " Yes."))
    show('SteeredModel.score([p, p], [" a", " b"])', lambda: sm.score(["Q: a?", "Q: b?"], [" a", " b"]))
    show('SteeredModel.generate([""])', lambda: sm.generate([""]))
    show('SteeredModel.score("", [" a", " b"])', lambda: sm.score("", [" a", " b"]))
    show('SteeredModel.save_pretrained("")', lambda: sm.save_pretrained(""))
    enc = sm.tokenizer(["Q: Why?\nA:"], return_tensors="pt")
    stranger = tiny_model_and_tokenizer(seed=7)[0]  # the same vocabulary, other weights
    show("sm.logits_processor() in another model's generate", lambda: stranger.generate(
        **enc, logits_processor=[sm.logits_processor(enc["attention_mask"])], max_new_tokens=2,
        pad_token_id=sm.tokenizer.pad_token_id))
    show("SteeredModel.generate(..., with_plain=True) after that",
         lambda: print(f"  (works: {sm.generate(['Q: Why?'], with_plain=True, max_new_tokens=3)[0]['steered']!r})"))
    os.environ["SVD_PROGRESS_SECONDS"] = "abc"
    show("SVD_PROGRESS_SECONDS=abc", interval_seconds)
    del os.environ["SVD_PROGRESS_SECONDS"]
    try:
        from svd_lightning.lm_eval import SteeredHFLM
    except ModuleNotFoundError:
        return
    show("lm-eval model_args muu=1", lambda: SteeredHFLM.create_from_arg_string(f"run_dir={fresh('lm')},muu=1"))
    from svd_lightning.lm_eval import lm_eval_flag_problem

    for flags in (["--num_fewshot", "-1"], ["--limit", "0"], ["--output_path", ""], ["--include_path", "nope/"]):
        print(f"- **eval {' '.join(flags)}** → `{lm_eval_flag_problem(flags)}`")
    from svd_lightning.cli import main as cli_main

    tasks = Path(__file__).resolve().parents[1] / "tests" / "lm_eval_tasks"
    os.chdir(tasks.parents[1])  # the tiny task's data path is relative to the repository

    def too_many_shots():
        printed = io.StringIO()
        with contextlib.redirect_stderr(printed), contextlib.suppress(SystemExit):
            cli_main(["eval", "--run-dir", str(fresh("fewshot")), "--tasks", "svd_tiny_mc", "--include_path", str(tasks),
                      "--batch_size", "1", "--num_fewshot", "1000"])
        raise SystemExit(printed.getvalue().strip().splitlines()[-1])  # what the command printed last

    show("eval --num_fewshot 1000 (a task of 8 questions)", too_many_shots)


if __name__ == "__main__":
    main()
