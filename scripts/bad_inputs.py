"""Print the error each bad input gets (the record behind issue 6's closing note).

    .venv/bin/python scripts/bad_inputs.py

Every case here is also a test (tests/test_data.py, test_models.py, test_framework.py,
test_generate.py); this script only shows the messages a user sees.
"""

from __future__ import annotations

import json
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
        module = SteeringLM("tiny-random", strength=-1.0)
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
    from conftest import perturbed_lora

    from svd_lightning.run import RUN_FILE, SteeringRun, write_run

    def fresh(name: str) -> Path:
        write_run(perturbed_lora(), SteeringRun(model="tiny-random", adapter="lora", mu=-1.0, alpha=0.1), tmp / name)
        return tmp / name

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


if __name__ == "__main__":
    main()
