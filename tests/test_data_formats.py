"""Real data as users bring it: SIQA, OBQA and WinoGrande rows, bad rows, encodings, labels, empty splits.

The fixture rows are in the exact LLM-Adapters formats of the files (shortened); the real SIQA, OBQA and
WinoGrande files are not in ../shared/data.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from svd_lightning.batch import IGNORE_INDEX, Tokenized, collate_choices, collate_lm
from svd_lightning.callbacks import SteeringExtraction, StrengthSolver
from svd_lightning.config import SteeringConfig
from svd_lightning.data import CommonsenseDataModule, DataError, GenericChoiceDataModule, TruthfulQADataModule
from svd_lightning.data.base import SKIPPED_FILE
from svd_lightning.scoring import score_choices
from svd_lightning.logger import RunLogger
from svd_lightning.module import SteeringLM
from svd_lightning.tiny import tiny_tokenizer

from conftest import write_truthfulqa


def arc_style(question: str, answers: list[str], true: int) -> dict:
    options = " ".join(f"Answer{k + 1}: {a}" for k, a in enumerate(answers))
    labels = "/".join(f"answer{k + 1}" for k in range(len(answers)))
    return {
        "instruction": f"Please choose the correct answer to the question: {question}\n\n{options}\n\n"
        f"Answer format: {labels}",
        "input": "", "output": f"the correct answer is answer{true + 1}", "answer": f"answer{true + 1}",
    }


def winogrande(sentence: str, options: list[str], true: int) -> dict:
    listed = " ".join(f"Option{k + 1}: {o}" for k, o in enumerate(options))
    return {
        "instruction": "Please choose the correct answer to fill in the blank to complete the given sentence: "
        f"{sentence}\n\n{listed} Answer format: option1/option2",
        "input": "", "output": f"the correct answer is option{true + 1}", "answer": f"option{true + 1}",
    }


SIQA = arc_style("Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do "
                 "before this?", ["make a new plan", "Go home and see Riley", "Find somewhere to go"], 2)
SIQA_DUPLICATE = arc_style("Sydney walked past a homeless woman asking for change. How would you describe Sydney?",
                           ["confident", "worried", "confident"], 1)
OBQA = arc_style("The sun is responsible for", ["puppies learning new tricks", "children growing up and getting old",
                                                "flowers wilting in a vase", "plants sprouting, blooming and wilting"], 3)
WINOGRANDE = winogrande("Sarah was a much better surgeon than Maria so _ always got the easier cases.",
                        ["Sarah", "Maria"], 1)


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows))
    return path


def varied(row: dict, n: int) -> list[dict]:
    """n distinct questions of one format (the k-th one numbered)."""
    out = []
    for k in range(n):
        r = dict(row)
        r["instruction"] = r["instruction"].replace("Sarah was", f"In case {k}, Sarah was").replace(
            "to the question: ", f"to the question: ({k}) ")
        out.append(r)
    return out


# --- the three new formats ------------------------------------------------------------------------


@pytest.mark.parametrize("row,answers,true", [
    (SIQA, ["make a new plan", "Go home and see Riley", "Find somewhere to go"], 2),
    (OBQA, ["puppies learning new tricks", "children growing up and getting old", "flowers wilting in a vase",
            "plants sprouting, blooming and wilting"], 3),
])
def test_siqa_and_obqa_are_arc_style(tmp_path, row, answers, true):
    path = write_json(tmp_path / "test.json", [row])
    [ex] = CommonsenseDataModule(str(path), scoring="option_text").load_examples()
    question = row["instruction"].split("question: ", 1)[1].split("\n\n")[0]
    assert ex.prompt == f"Question: {question}\nAnswer:"
    assert ex.choices == [" " + a for a in answers] and ex.is_true.index(True) == true and not ex.contexts
    [ex] = CommonsenseDataModule(str(path), scoring="label").load_examples()
    assert ex.choices == [f" answer{k + 1}" for k in range(len(answers))] and ex.is_true.index(True) == true


def test_winogrande_option_text_is_partial_evaluation(tmp_path):
    [ex] = CommonsenseDataModule(str(write_json(tmp_path / "test.json", [WINOGRANDE]))).load_examples()
    assert ex.contexts == ["Sarah was a much better surgeon than Maria so Sarah",
                           "Sarah was a much better surgeon than Maria so Maria"]
    assert ex.choices == [" always got the easier cases."] * 2 and ex.is_true == [False, True]
    assert ex.reference() == (ex.contexts[1], " always got the easier cases.")

    tok = Tokenized(tiny_tokenizer(), 256)
    batch = collate_choices([ex], tok)
    text = tok.tokenizer.decode
    for j in range(2):  # row j: context j, then the shared continuation, which alone is labelled
        scored = batch["labels"][j] != IGNORE_INDEX
        assert text(batch["input_ids"][j][scored]) == " always got the easier cases."
        real = batch["attention_mask"][j].bool()
        assert text(batch["input_ids"][j][real & ~scored]).endswith(ex.contexts[j])
    assert batch["num_chars"].tolist() == [len("always got the easier cases.")] * 2
    lm = collate_lm([ex], tok)  # the warm start reads the true option's sentence
    assert text(lm["input_ids"][0]).endswith("so Maria always got the easier cases.")


def test_winogrande_label_scoring_uses_the_papers_prompt(tmp_path):
    [ex] = CommonsenseDataModule(str(write_json(tmp_path / "test.json", [WINOGRANDE])), scoring="label").load_examples()
    assert ex.choices == [" option1", " option2"] and ex.is_true == [False, True] and not ex.contexts
    assert WINOGRANDE["instruction"] in ex.prompt and ex.prompt.endswith("the correct answer is")


def test_partial_evaluation_scores_are_the_direct_log_likelihoods(tmp_path, lora_model):
    rows = varied(WINOGRANDE, 2)
    examples = CommonsenseDataModule(str(write_json(tmp_path / "test.json", rows))).load_examples()
    tok = Tokenized(tiny_tokenizer(), 256)
    batch = collate_choices(examples, tok)
    shared = score_choices(lora_model, batch, SteeringConfig(mu=0.5))
    full = score_choices(lora_model, batch, SteeringConfig(mu=0.5), share_prompts=False)
    for key in ("plain", "base", "steered"):
        torch.testing.assert_close(shared[key], full[key], atol=1e-4, rtol=0)
    with torch.no_grad():  # plain score = Σ log p(continuation | context j), one sequence at a time
        for r, (ex, j) in enumerate([(ex, j) for ex in examples for j in range(2)]):
            ctx, cont = tok.pair(ex.contexts[j], ex.choices[j])
            logits = lora_model(input_ids=torch.tensor([ctx + cont])).logits[0].double()
            lp = torch.log_softmax(logits, -1)[len(ctx) - 1 : -1].gather(-1, torch.tensor(cont).unsqueeze(-1)).sum()
            assert float(full["plain"][r]) == pytest.approx(float(lp), abs=1e-4)


def test_winogrande_without_a_blank_is_a_bad_row(tmp_path):
    bad = dict(WINOGRANDE, instruction=WINOGRANDE["instruction"].replace(" _ ", " she "))
    path = write_json(tmp_path / "test.json", [WINOGRANDE, bad])
    with pytest.raises(DataError, match=r"row 1, field 'instruction': no '_' blank"):
        CommonsenseDataModule(str(path)).load_examples()
    assert len(CommonsenseDataModule(str(path), scoring="label").load_examples()) == 2  # labels need no blank


@pytest.mark.parametrize("fmt", ["siqa", "obqa", "winogrande"])
def test_tiny_fit_on_each_new_format(tmp_path, fmt):
    row = {"siqa": SIQA, "obqa": OBQA, "winogrande": WINOGRANDE}[fmt]
    dm = CommonsenseDataModule(str(write_json(tmp_path / "test.json", varied(row, 15))), batch_size=2,
                               train_batch_size=4, max_length=128)
    module = SteeringLM("tiny-random", adapter="lora", adapter_options={"r": 4}, learning_rate=0.01)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=RunLogger(tmp_path),
                        callbacks=[SteeringExtraction(), StrengthSolver()], enable_checkpointing=False,
                        enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    [metrics] = trainer.test(module, dm)
    assert module.metric_family == "choice" and torch.isfinite(torch.tensor(module.mu))
    for v in ("plain", "base", "steered"):
        assert 0.0 <= metrics[f"test/acc_{v}"] <= 1.0 and 0.0 <= metrics[f"test/acc_norm_{v}"] <= 1.0
    assert (tmp_path / "version_0" / "steering.json").exists()  # fit's run
    assert Path(trainer.log_dir) == tmp_path / "version_1"  # test's: a finished run is never written into


# --- bad rows -------------------------------------------------------------------------------------


def test_duplicate_option_is_a_bad_row_not_a_bad_file(tmp_path, capsys):
    path = write_json(tmp_path / "social_i_qa.json", [SIQA, SIQA_DUPLICATE, OBQA])
    for scoring in ("option_text", "label"):
        with pytest.raises(DataError, match=r"row 1, field 'instruction': duplicate options \['confident'\] "
                                            r"\(set bad_rows: skip to drop such rows\)") as err:
            CommonsenseDataModule(str(path), scoring=scoring).load_examples()
        assert str(path) in str(err.value)
        dm = CommonsenseDataModule(str(path), scoring=scoring, bad_rows="skip")
        assert [ex.index for ex in dm.load_examples()] == [0, 2]  # load_examples returns the kept rows
        assert [e.record() for e in dm.skipped] == [
            {"path": str(path), "row": 1, "field": "instruction", "reason": "duplicate options ['confident']"}]
        assert f"{path}: skipped 1 of 3 rows (bad_rows: skip): {path}, row 1" in capsys.readouterr().err


def test_skipped_rows_are_recorded_in_the_run_directory(tmp_path):
    rows = varied(SIQA, 12)
    rows[3] = SIQA_DUPLICATE
    rows[7] = dict(SIQA, answer="answer9")
    dm = CommonsenseDataModule(str(write_json(tmp_path / "test.json", rows)), bad_rows="skip", batch_size=2,
                               train_batch_size=4, max_length=128)
    assert dm.describe()["questions"] == 10 and dm.describe()["skipped"] == 2
    module = SteeringLM("tiny-random", adapter_options={"r": 4}, learning_rate=0.01)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=RunLogger(tmp_path),
                        callbacks=[SteeringExtraction(), StrengthSolver()], enable_checkpointing=False,
                        enable_progress_bar=False)
    trainer.fit(module, dm)
    lines = (Path(trainer.log_dir) / SKIPPED_FILE).read_text().splitlines()
    assert [(r["row"], r["field"]) for r in map(json.loads, lines)] == [(3, "instruction"), (7, "answer")]


def test_bad_rows_setting_is_checked():
    with pytest.raises(ValueError, match="bad_rows must be 'error' or 'skip'"):
        GenericChoiceDataModule("x.json", bad_rows="ignore")


def test_a_file_of_only_bad_rows_is_an_error_either_way(tmp_path):
    path = write_json(tmp_path / "test.json", [SIQA_DUPLICATE])
    with pytest.raises(DataError, match="no usable rows: all 1 were bad"):
        CommonsenseDataModule(str(path), bad_rows="skip").load_examples()


def test_single_choice_question_is_a_bad_row(tmp_path):
    path = write_json(tmp_path / "qa.json", [{"question": "a?", "choices": ["x", "y"], "label": 0},
                                             {"question": "b?", "choices": ["only"], "label": 0}])
    with pytest.raises(DataError, match=r"row 1, field 'choices': only one choice \('only'\)"):
        GenericChoiceDataModule(str(path)).load_examples()
    assert len(GenericChoiceDataModule(str(path), bad_rows="skip").load_examples()) == 1


def test_non_object_row_is_a_bad_row(tmp_path):
    path = write_json(tmp_path / "qa.json", [{"question": "a?", "choices": ["x", "y"], "label": 0}, ["x", "y"]])
    with pytest.raises(DataError, match="row 1: expected a JSON object"):
        GenericChoiceDataModule(str(path)).load_examples()
    assert len(GenericChoiceDataModule(str(path), bad_rows="skip").load_examples()) == 1


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_encoding_errors_name_the_file_and_byte_offset(tmp_path, suffix):
    text = {".json": '[{"question": "caf\xe9?", "choices": ["a", "b"], "label": 0}]',
            ".jsonl": '{"question": "caf\xe9?", "choices": ["a", "b"], "label": 0}\n',
            ".csv": "question,choices,label\ncaf\xe9?,a;b,0\n"}[suffix]
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    with pytest.raises(DataError, match=rf"not UTF-8: byte 0xe9 at offset {offset} ") as err:
        GenericChoiceDataModule(str(path), bad_rows="skip").load_examples()  # a file error either way
    assert str(path) in str(err.value)


def test_csv_and_json_labels_mean_the_same(tmp_path):
    (tmp_path / "qa.csv").write_text('question,choices,label\nq,1;2;3,1\nr,one;two,two\ns,1;2;3,"0;2"\n')
    write_json(tmp_path / "qa.json", [{"question": "q", "choices": ["1", "2", "3"], "label": 1},
                                      {"question": "r", "choices": ["one", "two"], "label": "two"},
                                      {"question": "s", "choices": ["1", "2", "3"], "label": [0, 2]}])
    for name in ("qa.csv", "qa.json"):
        examples = GenericChoiceDataModule(str(tmp_path / name)).load_examples()
        assert [ex.is_true for ex in examples] == [[False, True, False], [False, True], [True, False, True]], name
    write_json(tmp_path / "digits.json", [{"question": "q", "choices": ["1", "2", "3"], "label": "3"}])
    with pytest.raises(DataError, match=r"row 0, field 'label': label \[3\] is outside the 3 choices .*reads digits as an "
                                        r"index: set label_kind: text"):
        GenericChoiceDataModule(str(tmp_path / "digits.json")).load_examples()
    # numeric answers held as text: the declared setting reads them so, and a mismatch names the row
    write_json(tmp_path / "numbers.json", [{"question": "q", "choices": ["100", "9"], "label": "9"},
                                           {"question": "r", "choices": ["7", "8"], "label": 8}])
    examples = GenericChoiceDataModule(str(tmp_path / "numbers.json"), label_kind="text").load_examples()
    assert [ex.is_true for ex in examples] == [[False, True], [False, True]]
    write_json(tmp_path / "numbers.json", [{"question": "q", "choices": ["100", "9"], "label": "10"}])
    with pytest.raises(DataError, match=r"row 0, field 'label': '10' is not a choice's text.*set label_kind: index"):
        GenericChoiceDataModule(str(tmp_path / "numbers.json"), label_kind="text").load_examples()
    with pytest.raises(DataError, match=r"row 0, field 'label': 'nine' is not an index \(label_kind: index"):
        write_json(tmp_path / "numbers.json", [{"question": "q", "choices": ["100", "9"], "label": "nine"}])
        GenericChoiceDataModule(str(tmp_path / "numbers.json"), label_kind="index").load_examples()


def test_empty_split_fails_before_training(tmp_path):
    from svd_lightning.cli import main

    path = write_json(tmp_path / "qa.json", [{"question": f"q{i}?", "choices": ["x", "y"], "label": 0} for i in range(2)])
    module = SteeringLM("tiny-random")
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    dm = GenericChoiceDataModule(str(path), split=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match=r"the calib split is empty \(train 1, calib 0, val 0, test 1 of 2 questions.*fit needs it"):
        trainer.fit(module, dm)
    assert module.global_step == 0
    # the CLI's fit ends with the test split, so an empty one fails before training too
    args = ["fit", "--model.model", "tiny-random", "--data", "svd_lightning.data.GenericChoiceDataModule",
            "--data.path", str(path), "--data.split", "[0.5, 0.5, 0.0]", "--trainer.default_root_dir", str(tmp_path / "runs"),
            "--trainer.logger", "false"]
    with pytest.raises(ValueError, match=r"the test split is empty \(train 1, calib 1, val 0, test 0 of 2 .*--test_after_fit false"):
        main(args)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("steering.json"))


# --- tasks declare their metric -------------------------------------------------------------------


class UserDataModule(L.LightningDataModule):
    """A user's own DataModule (not ours): it says how it is scored."""

    metric = "truthfulqa"

    def __init__(self, inner: TruthfulQADataModule):
        super().__init__()
        self.inner = inner

    def setup(self, stage):
        self.inner.trainer = self.trainer
        self.inner.setup(stage)

    def test_dataloader(self):
        return self.inner.test_dataloader()


def test_metric_family_comes_from_the_datamodule(tmp_path):
    tqa = TruthfulQADataModule(str(write_truthfulqa(tmp_path / "mc.json", n=10)), instruction=False, batch_size=2,
                               max_length=128)
    qa = GenericChoiceDataModule(str(write_json(tmp_path / "qa.json", [
        {"question": f"q{i}?", "choices": ["x", "y", "z"], "label": i % 3} for i in range(10)])), batch_size=2)
    for dm, key in ((tqa, "test/mc1_plain"), (qa, "test/acc_norm_plain"), (UserDataModule(tqa), "test/mc2_plain")):
        module = SteeringLM("tiny-random", mu=0.0)
        [metrics] = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                              default_root_dir=tmp_path).test(module, dm)
        assert key in metrics, (type(dm).__name__, sorted(metrics))
    assert not (tmp_path / "runs").exists(), "a stage that writes nothing leaves no empty run directory"
