"""DataModules: parsing, splits, batches and input validation, on small files built in tmp_path."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import pytest
import torch

from svd_lightning.batch import CHOICE_KEYS, IGNORE_INDEX, validate_choice_batch
from svd_lightning.data import (
    ChoiceDataModule,
    CommonsenseDataModule,
    DataError,
    GenericChoiceDataModule,
    TruthfulQADataModule,
)
from svd_lightning.data.base import PAPER_SPLIT, seeded_split
from svd_lightning.data.truthfulqa import INSTRUCTION, QA_PRIMER
from svd_lightning.tiny import tiny_tokenizer

from conftest import write_truthfulqa

SHARED = Path(__file__).resolve().parents[1] / "../shared/data"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def tqa_rows(n: int = 10) -> list[dict]:
    return [
        {
            "question": f"What happens if you eat pomegranate {i}?",
            "mc1_targets": {f"Nothing in particular happens {i}.": 1, "You will die.": 0, "You go to Hades.": 0},
            "mc2_targets": {f"Nothing in particular happens {i}.": 1, "You digest it.": 1, "You will die.": 0},
        }
        for i in range(n)
    ]


def qa_rows(n: int) -> list[dict]:
    return [{"question": f"Q{i}: is {i} even?", "choices": ["yes", "no"], "label": i % 2} for i in range(n)]


def ready(dm: ChoiceDataModule, tok, stage: str | None = None) -> ChoiceDataModule:
    dm.tokenizer = tok
    dm.setup(stage)
    return dm


def indices(examples) -> list[int]:
    return [ex.index for ex in examples]


# --- splits ----------------------------------------------------------------------------------------


def test_split_sizes_determinism_and_disjointness(tmp_path):
    path = write_json(tmp_path / "qa.json", qa_rows(20))
    dm = GenericChoiceDataModule(str(path), seed=0)
    sizes = dm.describe()
    # the default: train / calib / val / test = 60/10/10/20
    assert [sizes[k] for k in ("questions", "train", "calib", "val", "test", "test_rows")] == [20, 12, 2, 2, 4, 8]
    sets = lambda d: (d.train_set, d.calib_set, d.val_set, d.test_set)  # noqa: E731
    parts = [indices(s) for s in sets(dm)]
    assert sorted(sum(parts, [])) == list(range(20))  # disjoint and complete

    again = GenericChoiceDataModule(str(path), seed=0)
    again.describe()
    assert [indices(s) for s in sets(again)] == parts
    other = GenericChoiceDataModule(str(path), seed=1)
    other.describe()
    assert [indices(s) for s in sets(other)] != parts

    limited = GenericChoiceDataModule(str(path), split=(0.4, 0.2, 0.2, 0.2), limit_train=3, limit_calib=2, limit_val=1,
                                      limit_test=3)
    assert [limited.describe()[k] for k in ("train", "calib", "val", "test")] == [3, 2, 1, 3]
    # three fractions (the paper's 60/20/20): train / calib / test, no validation split
    paper = GenericChoiceDataModule(str(path), split=PAPER_SPLIT)
    assert [paper.describe()[k] for k in ("train", "calib", "val", "test")] == [12, 4, 0, 4]


def test_split_argument_is_checked():
    with pytest.raises(ValueError, match="sum"):
        GenericChoiceDataModule("x.json", split=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="three or four"):
        GenericChoiceDataModule("x.json", split=(0.5, 0.5))


def test_validation_scores_a_split_of_its_own_or_none(tmp_path, tok):
    """Validation never scores μ̄'s calibration questions: the val split; with a three-way split there is
    none (no loader: Lightning skips validation) and `validate` says how to get one."""
    path = write_json(tmp_path / "qa.json", qa_rows(20))
    dm = ready(GenericChoiceDataModule(str(path), batch_size=1), tok)
    scored = [int(b["question_index"][0]) for b in dm.val_dataloader()]
    assert scored == indices(dm.val_set) and not set(scored) & set(indices(dm.calib_set) + indices(dm.test_set))
    three = ready(GenericChoiceDataModule(str(path), split=PAPER_SPLIT), tok)
    assert three.val_dataloader() == []
    with pytest.raises(ValueError, match=r"the val split is empty .*give split four fractions, train/calib/val/test"):
        three.check_splits("validate")


# --- TruthfulQA ------------------------------------------------------------------------------------


def test_truthfulqa_parsing(tmp_path):
    path = write_json(tmp_path / "mc_task.json", tqa_rows(5))
    ex = TruthfulQADataModule(str(path)).load_examples()[2]
    assert ex.index == 2
    assert ex.choices == [
        " Nothing in particular happens 2.", " You will die.", " You go to Hades.",
        " Nothing in particular happens 2.", " You digest it.", " You will die.",
    ]
    assert ex.choice_sets == [0, 0, 0, 1, 1, 1]
    assert ex.is_true == [True, False, False, True, True, False]
    assert ex.answer == " Nothing in particular happens 2."
    assert ex.prompt == f"{INSTRUCTION}\n\n{QA_PRIMER}\n\nQ: What happens if you eat pomegranate 2?\nA:"
    assert QA_PRIMER.count("Q: ") == 6 and QA_PRIMER.count("\nA: ") == 6

    plain = TruthfulQADataModule(str(path), instruction=False).load_examples()[2]
    assert plain.prompt.startswith("Q: What is human life expectancy in the United States?\nA: Human life")
    assert plain.prompt.endswith("Spain.\n\nQ: What happens if you eat pomegranate 2?\nA:")


# --- batches ---------------------------------------------------------------------------------------


def continuation_text(tok, batch, row: int) -> str:
    keep = batch["labels"][row] != IGNORE_INDEX
    return tok.decode(batch["labels"][row][keep].tolist())


def check_labels_are_the_suffix(batch):
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        keep = (batch["labels"][row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert keep and keep == list(range(keep[0], n))  # contiguous, ending at the last real token
        assert torch.equal(batch["labels"][row, keep], batch["input_ids"][row, keep])


def test_dataloaders_follow_the_contract(tmp_path, tok):
    path = write_json(tmp_path / "mc_task.json", tqa_rows(10))
    dm = TruthfulQADataModule(str(path), batch_size=2, train_batch_size=3, split=(0.4, 0.2, 0.2, 0.2), max_length=2048)
    ready(dm, tok)
    by_index = {ex.index: ex for ex in dm.train_set + dm.calib_set + dm.val_set + dm.test_set}

    for loader in (dm.train_dataloader(), dm.calib_dataloader()):
        batch = next(iter(loader))
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        check_labels_are_the_suffix(batch)
        answers = {ex.answer for ex in by_index.values()}
        assert all(continuation_text(tok, batch, r) in answers for r in range(batch["input_ids"].shape[0]))
    assert len(dm.calib_dataloader()) == 1 and len(dm.train_dataloader()) == 2

    splits = [(dm.val_dataloader(), dm.val_set), (dm.test_dataloader(), dm.test_set), (dm.predict_dataloader(), dm.test_set)]
    for loader, split in splits:  # validation scores its own split: neither μ̄'s questions nor the test ones
        batches = list(loader)
        assert len(batches) == len(split) // 2  # 2 questions per batch
        for batch in batches:
            assert set(batch) == {*CHOICE_KEYS, "is_reference"}
            validate_choice_batch(batch)
            check_labels_are_the_suffix(batch)
            for r in range(batch["input_ids"].shape[0]):
                ex = by_index[int(batch["question_index"][r])]
                j = int(batch["choice_index"][r])
                assert continuation_text(tok, batch, r) == ex.choices[j]
                assert int(batch["choice_set"][r]) == ex.choice_sets[j]
                assert bool(batch["is_true"][r]) == ex.is_true[j]
                assert int(batch["num_chars"][r]) == len(ex.choices[j].lstrip())
                first_answer = ex.choices.index(ex.answer) == j  # the row calibration takes μ̄'s tokens from
                assert bool(batch["is_reference"][r]) == first_answer
        seen = [int(q) for b in batches for q in b["question_index"].unique()]
        assert seen == indices(split)  # no shuffling

    pickle.dumps(dm.train_dataloader().collate_fn)  # workers need it


def test_train_shuffle_is_seeded(tmp_path, tok):
    path = write_json(tmp_path / "qa.json", qa_rows(30))

    def first_epoch(seed):
        dm = ready(GenericChoiceDataModule(str(path), seed=seed, train_batch_size=30, split=(1.0, 0.0, 0.0)), tok)
        return next(iter(dm.train_dataloader()))["input_ids"]

    assert torch.equal(first_epoch(0), first_epoch(0))


def test_long_prompt_is_truncated_from_the_left(tmp_path, tok):
    rows = [{"question": "What is the capital of France? " * 40 + "Answer:", "choices": ["Paris", "Lyon"], "label": 0}]
    path = write_json(tmp_path / "long.json", rows)
    dm = ready(GenericChoiceDataModule(str(path), max_length=24, split=(0, 0, 1)), tok)
    with pytest.warns(UserWarning, match="truncated from the left"):
        batch = next(iter(dm.test_dataloader()))
    assert batch["input_ids"].shape[1] <= 24
    assert [continuation_text(tok, batch, r) for r in range(2)] == [" Paris", " Lyon"]
    prompt_ids = batch["input_ids"][0][batch["labels"][0] == IGNORE_INDEX]
    assert tok.decode(prompt_ids[batch["attention_mask"][0][: len(prompt_ids)].bool()]).endswith("France? Answer:")
    assert dm.tokenized.truncated == 2


def test_tokenizer_comes_from_the_trainers_module(tmp_path, tok):
    from types import SimpleNamespace

    dm = GenericChoiceDataModule(str(write_json(tmp_path / "qa.json", qa_rows(10))))
    dm.tokenizer = "not this one"
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tok))
    dm.setup("validate")
    assert dm.tokenized.tokenizer is tok


def test_setup_without_tokenizer_fails_clearly(tmp_path):
    dm = GenericChoiceDataModule(str(write_json(tmp_path / "qa.json", qa_rows(5))))
    with pytest.raises(RuntimeError, match="tokenizer"):
        dm.setup("fit")


def test_jsonargparse_sees_the_base_arguments():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(ChoiceDataModule, "data")
    cfg = parser.parse_args(["--data=svd_lightning.data.CommonsenseDataModule", "--data.test_path=t.json",
                             "--data.split=[0.5,0.25,0.25]", "--data.limit_test=5"])
    assert cfg.data.init_args.split == (0.5, 0.25, 0.25) and cfg.data.init_args.limit_test == 5


# --- commonsense (row shapes from LLM-Adapters, shortened) -----------------------------------------

BOOLQ = {
    "instruction": "Please answer the following question with true or false, question: is house tax and property "
    "tax are same?\n\nAnswer format: true/false",
    "input": "", "output": "the correct answer is true", "answer": "true",
}
PIQA = {
    "instruction": "Please choose the correct solution to the question: dresser\n\nSolution1: replace drawer with "
    "bobby pin \n\nSolution2: finish, woodgrain with  bobby pin \n\nAnswer format: solution1/solution2",
    "input": "", "output": "the correct answer is solution2", "answer": "solution2",
}
HELLASWAG = {
    "instruction": "Please choose the correct ending to complete the given sentence: Roof shingle removal: A man is "
    "sitting on a roof. he\n\nEnding1: is using wrap to wrap a pair of skis. Ending2: is ripping level tiles off. "
    "Ending3: is holding a rubik's cube. Ending4: starts pulling up roofing on a roof.\n\n"
    "Answer format: ending1/ending2/ending3/ending4",
    "input": "", "output": "the correct answer is ending4", "answer": "ending4",
}
ARC = {
    "instruction": "Please choose the correct answer to the question: Which piece of safety equipment is used to "
    "keep mold spores from entering the respiratory system?\n\nAnswer1: safety goggles Answer2: breathing mask "
    "Answer3: rubber gloves Answer4: lead apron Answer5: a hat\n\nAnswer format: answer1/answer2/answer3/answer4/answer5",
    "input": "", "output": "the correct answer is answer2", "answer": "answer2",
}

OPTION_TEXT = {
    "boolq": (BOOLQ, "Question: is house tax and property tax are same?\nAnswer:", [" true", " false"], 0),
    "piqa": (PIQA, "Question: dresser\nAnswer:", [" replace drawer with bobby pin", " finish, woodgrain with  bobby pin"], 1),
    "hellaswag": (
        HELLASWAG,
        "Roof shingle removal: A man is sitting on a roof. he",
        [" is using wrap to wrap a pair of skis.", " is ripping level tiles off.", " is holding a rubik's cube.",
         " starts pulling up roofing on a roof."],
        3,
    ),
    "arc": (
        ARC,
        "Question: Which piece of safety equipment is used to keep mold spores from entering the respiratory system?\nAnswer:",
        [" safety goggles", " breathing mask", " rubber gloves", " lead apron", " a hat"],
        1,
    ),
}


@pytest.mark.parametrize("task", OPTION_TEXT)
def test_commonsense_option_text(tmp_path, task):
    row, prompt, choices, true = OPTION_TEXT[task]
    [ex] = CommonsenseDataModule(str(write_json(tmp_path / "test.json", [row]))).load_examples()
    assert (ex.prompt, ex.choices) == (prompt, choices)
    assert ex.is_true == [k == true for k in range(len(choices))]
    assert ex.answer == choices[true]


@pytest.mark.parametrize("task", OPTION_TEXT)
def test_commonsense_label(tmp_path, task):
    row = OPTION_TEXT[task][0]
    [ex] = CommonsenseDataModule(str(write_json(tmp_path / "test.json", [row])), scoring="label").load_examples()
    labels = row["instruction"].rsplit("Answer format: ", 1)[1].split("/")
    assert ex.prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{row['instruction']}\n\n### Response:\nthe correct answer is"
    )
    assert ex.choices == [" " + label for label in labels]
    assert ex.answer == " " + row["answer"] and ex.is_true == [label == row["answer"] for label in labels]


def test_commonsense_train_file_gives_train_calib_and_val(tmp_path, tok):
    test = write_json(tmp_path / "test.json", [ARC] * 3)
    train = write_json(tmp_path / "train.json", [BOOLQ] * 10)
    dm = CommonsenseDataModule(str(test), train_path=str(train), calib_fraction=0.3, overlap="keep")  # repeated rows
    assert [dm.describe()[k] for k in ("train", "calib", "val", "test")] == [6, 3, 1, 3]
    no_val = CommonsenseDataModule(str(test), train_path=str(train), calib_fraction=0.3, val_fraction=0, overlap="keep")
    assert [no_val.describe()[k] for k in ("train", "calib", "val", "test")] == [7, 3, 0, 3]
    with pytest.raises(ValueError, match="sum below 1"):
        CommonsenseDataModule(str(test), calib_fraction=0.5, val_fraction=0.5)
    assert indices(dm.test_set) == [0, 1, 2]
    batch = next(iter(ready(dm, tok).train_dataloader()))
    assert continuation_text(tok, batch, 0) == " true"


# --- generic ---------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_generic_formats(tmp_path, monkeypatch):
    rows = [
        {"q": "2+2?", "topic": "math", "options": ["3", "4", "5"], "answer": 1},
        {"q": "Pick primes", "topic": "math", "options": ["2", "4", "5"], "answer": [0, 2]},
        {"q": "Capital of France?", "topic": "geo", "options": ["Lyon", "Paris"], "answer": "Paris"},
    ]
    expected = [[False, True, False], [True, False, True], [False, True]]
    # CSV/TSV cells are strings: ";"-separated choices, "0;2" for several true choices
    flat = [dict(r, options=";".join(r["options"])) for r in rows]
    flat[1]["answer"] = "0;2"
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    files = [write_json(tmp_path / "qa.json", rows), jsonl, write_csv(tmp_path / "qa.csv", flat),
             write_csv(tmp_path / "qa.tsv", flat, delimiter="\t")]
    for path in files:
        dm = GenericChoiceDataModule(
            str(path), template="[{topic}] {q}\nA:", choices_field="options", label_field="answer", continuation_prefix=" "
        )
        examples = dm.load_examples()
        assert [ex.is_true for ex in examples] == expected, path
        assert examples[2].prompt == "[geo] Capital of France?\nA:" and examples[2].choices == [" Lyon", " Paris"]
        assert examples[0].answer == " 4"


# --- bad input -------------------------------------------------------------------------------------


def tqa_with(**changes) -> tuple:
    rows = tqa_rows(3)
    rows[1].update(changes)
    return "mc_task.json", TruthfulQADataModule, rows


def qa_with(row) -> tuple:  # row 1 replaced
    return "qa.json", GenericChoiceDataModule, [qa_rows(1)[0], row]


def cs_with(row) -> tuple:
    return "test.json", CommonsenseDataModule, [ARC, row]


QA = {"question": "q", "choices": ["a", "b"], "label": 0}
PIQA_BAD_NUMBERS = PIQA["instruction"].replace("Solution2", "Solution3")
# (file name, DataModule, rows with row 1 broken, expected part of the message)
BAD = {
    "tqa_no_choices": (*tqa_with(mc1_targets={}), "field 'mc1_targets'"),
    "tqa_no_true": (*tqa_with(mc2_targets={"A": 0, "B": 0}), "no choice is marked true"),
    "tqa_empty_choice": (*tqa_with(mc2_targets={"A": 1, "": 0}), "empty string"),
    "tqa_bad_value": (*tqa_with(mc2_targets={"A": 1, "B": 2}), "0 or 1"),
    "tqa_empty_question": (*tqa_with(question=" "), "field 'question'"),
    "generic_no_choices": (*qa_with(dict(QA, choices=[])), "field 'choices'"),
    "generic_missing_field": (*qa_with({"question": "x", "label": 0}), "field 'choices'"),
    "generic_template_field": (*qa_with({"choices": ["a", "b"], "label": 0}), "field 'question'"),
    "generic_empty_choice": (*qa_with(dict(QA, choices=["a", " "])), "empty string"),
    "generic_duplicate": (*qa_with(dict(QA, choices=["a", "a"])), "duplicate"),
    "generic_label_range": (*qa_with(dict(QA, label=2)), "outside"),
    "generic_label_text": (*qa_with(dict(QA, label="maybe")), "neither a choice"),
    "generic_not_object": (*qa_with(["a", "b"]), "JSON object"),
    "generic_null_question": (*qa_with(dict(QA, question=None)), "field 'question': is a missing value (None)"),
    "generic_nan_question": (*qa_with(dict(QA, question=float("nan"))), "field 'question': is a missing value (nan)"),
    "generic_nan_choice": (*qa_with(dict(QA, choices=["a", float("nan")])), "field 'choices': choice 1 is a missing value"),
    "generic_list_question": (*qa_with(dict(QA, question=["q"])), "field 'question': must be text, got list"),
    "tqa_null_question": (*tqa_with(question=None), "field 'question'"),
    "cs_answer_not_label": (*cs_with(dict(BOOLQ, answer="maybe")), "field 'answer'"),
    "cs_empty_instruction": (*cs_with(dict(BOOLQ, instruction="")), "field 'instruction'"),
    "cs_no_format_line": (*cs_with(dict(BOOLQ, instruction="Is it?")), "Answer format"),
    "cs_options_mismatch": (*cs_with(dict(PIQA, instruction=PIQA_BAD_NUMBERS)), "do not match"),
    "cs_empty_option": (*cs_with(dict(ARC, instruction=ARC["instruction"].replace("lead apron", ""))), "empty string"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_rows_name_file_row_and_field(tmp_path, case):
    name, cls, rows, message = BAD[case]
    path = write_json(tmp_path / name, rows)
    with pytest.raises(DataError, match="row 1") as err:
        cls(str(path)).describe()
    assert str(path) in str(err.value) and message in str(err.value)


def test_duplicate_json_keys_are_caught(tmp_path):
    # json.load would silently keep one of the two "You will die." answers
    path = tmp_path / "mc_task.json"
    good = json.dumps(tqa_rows(1)[0])
    bad = '{"question": "Q?", "mc1_targets": {"A": 1, "B": 0}, "mc2_targets": {"You will die.": 0, "You will die.": 1}}'
    path.write_text(f"[{good}, {bad}]")
    with pytest.raises(DataError, match=r"row 1, field 'mc2_targets': duplicate key") as err:
        TruthfulQADataModule(str(path)).describe()
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope" / "mc_task.json"
    with pytest.raises(FileNotFoundError, match="shared/data") as err:
        TruthfulQADataModule(str(missing)).describe()
    assert str(missing) in str(err.value)


def test_malformed_files(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"question": "a", "choices": ["x"], "label": 0},\n {"question": ')
    with pytest.raises(DataError, match="malformed JSON at line 2") as err:
        GenericChoiceDataModule(str(bad_json)).describe()
    assert str(bad_json) in str(err.value)

    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text(json.dumps(qa_rows(1)[0]) + "\n\n" + "{oops\n")
    with pytest.raises(DataError, match=r"row 1: malformed JSON on line 3") as err:
        GenericChoiceDataModule(str(bad_jsonl)).describe()
    assert str(bad_jsonl) in str(err.value)

    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("question,choices,label\nq0,a;b,0\nq1,a;b,0,surplus\n")
    with pytest.raises(DataError, match="row 1: 4 cells for 3 columns") as err:
        GenericChoiceDataModule(str(bad_csv)).describe()
    assert str(bad_csv) in str(err.value)

    quote_csv = tmp_path / "quote.csv"
    quote_csv.write_text('question,choices,label\nq0,a;b,0\n"q1,a;b,0\n')
    with pytest.raises(DataError, match="row 1: malformed CSV"):
        GenericChoiceDataModule(str(quote_csv)).describe()

    empty = write_json(tmp_path / "empty.json", [])
    with pytest.raises(DataError, match="no rows"):
        GenericChoiceDataModule(str(empty)).describe()


# --- the real files (CI has ../shared/data beside the repo, as do the configs) -----------------------


def test_real_files_parse(tok):
    tqa = SHARED / "truthfulqa/v1_2021/mc_task.json"
    arc = SHARED / "commonsense/ARC-Challenge/test.json"
    assert tqa.exists() and arc.exists(), f"shared data not found at {SHARED.resolve()}"
    dm = ready(TruthfulQADataModule(str(tqa), limit_test=2, batch_size=2, max_length=2048), tok)
    assert dm.describe()["questions"] == 817
    assert all(sum(t for t, s in zip(ex.is_true, ex.choice_sets) if s == 0) == 1 for ex in dm.test_set)
    validate_choice_batch(next(iter(dm.test_dataloader())))
    for scoring in ("label", "option_text"):
        assert CommonsenseDataModule(str(arc), scoring=scoring).describe()["questions"] == 1172


# --- questions in two splits, choices too long ----------------------------------------------------


@pytest.mark.parametrize("overlap", ["drop", "error", "keep"])
def test_a_question_repeated_across_splits_follows_overlap(tmp_path, overlap, capsys):
    train, calib, test = seeded_split(list(range(10)), (0.5, 0.2, 0.3), 0)
    rows = qa_rows(10)
    first, again = train[0], (calib + test)[0]
    rows[again] = dict(rows[first])  # the same question and choices in train and in a later split
    path = write_json(tmp_path / "qa.json", rows)
    dm = lambda: GenericChoiceDataModule(str(path), split=(0.5, 0.2, 0.3), overlap=overlap)  # noqa: E731
    later = "calib" if again in calib else "test"
    if overlap == "error":
        with pytest.raises(DataError, match=rf"1 {later} question\(s\) also in an earlier split.*set overlap: drop"):
            dm().describe()
        return
    sizes = dm().describe()
    expected = {"calib": len(calib), "test": len(test)}
    if overlap == "drop":
        expected[later] -= 1
    assert (sizes["calib"], sizes["test"]) == (expected["calib"], expected["test"])
    assert f"overlap: {overlap} -- 1 {later} question(s)" in capsys.readouterr().err


@pytest.mark.parametrize("bad_rows", ["error", "skip"])
def test_a_choice_longer_than_max_length_is_a_bad_row(tmp_path, tok, bad_rows):
    rows = qa_rows(10)
    rows[4] = dict(rows[4], choices=["yes", "no " * 40])
    path = write_json(tmp_path / "qa.json", rows)
    dm = GenericChoiceDataModule(str(path), max_length=16, split=(0.4, 0.3, 0.3), bad_rows=bad_rows)
    if bad_rows == "error":
        with pytest.raises(DataError, match=rf"{path}, row 4, field 'choices': choice 1 .* does not fit "
                                            r"max_length=16 .*set bad_rows: skip"):
            ready(dm, tok)
        return
    ready(dm, tok)
    kept = indices(dm.train_set + dm.calib_set + dm.test_set)
    assert 4 not in kept and len(kept) == 9
    assert [(e.row, e.field) for e in dm.skipped] == [(4, "choices")]
    for loader in (dm.train_dataloader(), dm.calib_dataloader(), dm.test_dataloader()):
        list(loader)  # every batch tokenizes: no choice is cut


def test_data_paths_resolve_under_the_data_root_or_the_packaged_sample(tmp_path, monkeypatch):
    """No path resolves against the package's location: as given, else under $SVD_LIGHTNING_DATA (the
    shipped configs' ../shared/data/ prefix dropped), else a packaged sample; a miss names the settings."""
    from svd_lightning.data.sources import DATA_ENV, DataFileNotFound, resolve_path

    root = tmp_path / "data"
    (root / "truthfulqa" / "v1_2021").mkdir(parents=True)
    target = write_truthfulqa(root / "truthfulqa" / "v1_2021" / "mc_task.json")
    monkeypatch.chdir(tmp_path / "data")  # ../shared/data/... does not exist from here
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(DataFileNotFound, match=f"{DATA_ENV} is not set") as err:
        resolve_path("../shared/data/truthfulqa/v1_2021/mc_task.json")
    assert "--data.init_args.path" in str(err.value)
    monkeypatch.setenv(DATA_ENV, str(root))
    assert resolve_path("../shared/data/truthfulqa/v1_2021/mc_task.json") == target
    assert resolve_path("truthfulqa/v1_2021/mc_task.json") == Path("truthfulqa/v1_2021/mc_task.json")  # as given wins
    sample = resolve_path("package:truthfulqa_mc_40.json")
    assert len(json.loads(sample.read_text())) == 40
    with pytest.raises(DataFileNotFound, match="truthfulqa_mc_40.json"):
        resolve_path("package:nope.json")
    dm = TruthfulQADataModule(path="package:truthfulqa_mc_40.json", split=(0.5, 0.2, 0.1, 0.2))  # the tiny config's
    dm.prepare_data()
    assert (len(dm.train_set), len(dm.calib_set), len(dm.val_set), len(dm.test_set)) == (20, 8, 4, 8)


def test_your_datasets_as_you_have_them(tmp_path):
    """A datasets.Dataset, a one-split DatasetDict and a load_dataset spec give the questions the file gives;
    the Hub's {choices, labels} layout of truthful_qa too; errors name the dataset, row and field."""
    import datasets

    from svd_lightning.log import InputError

    path = write_truthfulqa(tmp_path / "mc.json", n=10)
    rows = json.loads(path.read_text())
    from_file = TruthfulQADataModule(path=str(path)).load_examples()

    def hub_layout(row):  # truthfulqa/truthful_qa, config multiple_choice
        return {"question": row["question"], **{k: {"choices": list(v), "labels": list(v.values())}
                                               for k, v in row.items() if k.endswith("_targets")}}
    sources = {
        "Dataset": datasets.Dataset.from_list([hub_layout(r) for r in rows]),
        "DatasetDict": datasets.DatasetDict({"validation": datasets.Dataset.from_list([hub_layout(r) for r in rows])}),
        "spec": {"path": "json", "data_files": str(path), "split": "train"},
    }
    for name, source in sources.items():
        got = TruthfulQADataModule(path=source).load_examples()
        assert [(e.prompt, e.choices, e.is_true, e.choice_sets) for e in got] == \
               [(e.prompt, e.choices, e.is_true, e.choice_sets) for e in from_file], name
    two = datasets.DatasetDict({"train": sources["Dataset"], "test": sources["Dataset"]})
    with pytest.raises(InputError, match=r"splits \['test', 'train'\]: give one split"):
        TruthfulQADataModule(path=two).load_examples()
    broken = datasets.Dataset.from_list([hub_layout(r) for r in rows[:3]] + [{"question": "", "mc1_targets": None, "mc2_targets": None}])
    with pytest.raises(DataError, match=r"datasets.Dataset\(in memory, 4 rows\), row 3, field 'question'"):
        TruthfulQADataModule(path=broken).load_examples()
    with pytest.raises(InputError, match="load_dataset spec"):
        TruthfulQADataModule(path={"data_files": str(path)}).load_examples()
