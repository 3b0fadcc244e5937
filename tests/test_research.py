"""The research apparatus (research/): the grid's cells and splits, the reports and the results page generated from
the committed results, and the labels true to the cells."""

import dataclasses
import importlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import selection_table

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "research" / "results"


def _load(name):
    return importlib.import_module(f"research.{name}")


def test_grid_variants_are_the_package_configs_their_names_say():
    """The grid scores each variant with the package's scorer; its names must map to the right settings."""
    grid = _load("grid")
    mus = {a: {s: -0.7 + 0.8 * i for i, s in enumerate([*grid.STRENGTHS, "choice_nll"])} for a in grid.ALPHAS}
    mus.update({"ld_a0.1": {"exact": 0.8, "choice_nll": 1.3}, "ld_none": {"exact": 0.2, "choice_nll": 0.5}})
    configs = grid.variant_configs(mus)
    S = grid.SETTINGS
    assert configs["svd_a0.3_floor_trimmed_fisher"] == S.replace(mu=mus["0.3"]["trimmed_fisher"], alpha=0.3,
                                                                  scoring_policy="floor")
    assert configs["svd_a0.1_mask_generation_only_choice_nll"].mu == mus["0.1"]["choice_nll"]
    assert "svd_a0.1_floor_choice_nll" not in configs  # choice_nll is fit under mask_generation_only
    assert configs["svd_anone_none_exact"] == S.replace(mu=mus["none"]["exact"], scoring_policy="none")
    assert "svd_anone_none_trimmed_fisher" not in configs  # policy none: NONE_STRENGTHS only
    assert configs["maskonly_a0.05"] == S.replace(mu=0.0, alpha=0.05, scoring_policy="floor")
    assert configs["fixed_a0.1_mask_generation_only_mu-2"] == S.replace(mu=-2.0)
    assert configs["contrastive_g+0.5"] == S.contrastive(gamma=0.5)
    # the unmasked logit difference at μ = γ is the contrastive baseline
    assert configs["ld_none_choice_nll"] == S.contrastive(gamma=0.5)
    assert configs["ld_a0.1_mask_generation_only_exact"] == S.replace(mu=0.8, alpha=0.1, direction="logit_difference")
    assert S.floor == grid.FLOOR
    needs = grid.calibration_needs()
    assert needs.statistics["none"].statistics_alpha == 1e-8 and needs.statistics["ld_a0.1"].direction == "logit_difference"
    assert needs.grids == {"contrastive": tuple(grid.GAMMAS)} and set(needs.choice_caches) == {"0.1", "ld_a0.1"}


def test_grid_workers_claim_each_cell_once_and_take_over_stale_locks(tmp_path):
    grid = _load("grid")
    with grid.claimed(tmp_path, "cell") as first:
        with grid.claimed(tmp_path, "cell") as second:
            assert (first, second) == (True, False)
    lock = tmp_path / ".tmp" / "cell.lock"
    assert not lock.exists()  # released
    lock.write_text("999999999")  # a killed worker's lock: no such process
    with grid.claimed(tmp_path, "cell") as third:
        assert third and lock.read_text() != "999999999"


def test_report_uses_plain_only_epoch_as_plus_one_baseline(tmp_path):
    report = _load("report")
    full = {"format": report.FORMAT, "task": "t", "adapter": "lora", "seed": 0, "epoch": 1, "primary": "acc",
            "calib": {v: {"acc": 0.5} for v in ("plain", "svd_x", "fixed_x", "contrastive_x")},
            "per_question": {"test": {"acc": {"plain": [0.0, 1.0]}}}}
    extra = {**full, "epoch": 2, "baseline_only": True, "per_question": {"test": {"acc": {"plain": [1.0, 1.0]}}}}
    old = {k: v for k, v in full.items() if k != "format"}  # format 1: not read
    for name, d in (("e1", full), ("e2", extra), ("old", old)):
        (tmp_path / f"{name}.json").write_text(json.dumps(d))
    cells, plus_one = report.load(tmp_path, quiet=True)
    assert list(cells) == [("t", "lora", 1)] and list(plus_one) == [("t", "lora", 2)]
    assert len(cells[("t", "lora", 1)]) == 1
    methods = report.methods_for(cells, ("t", "lora", 1), "acc", plus_one)
    (variant, src, own), = methods["warm start +1 epoch"]
    assert variant == "plain" and src is plus_one[("t", "lora", 2)][0] and own is cells[("t", "lora", 1)][0]


PIQA_ROW = {
    "instruction": "Please choose the correct solution to the question: open a jar {i}\n\nSolution1: twist the lid {i}"
    "\n\nSolution2: hit the jar {i}\n\nAnswer format: solution1/solution2",
    "input": "", "output": "the correct answer is solution1", "answer": "solution1",
}


def _piqa_file(path: Path, n: int, first: int = 0) -> Path:
    rows = [{k: v.format(i=i) if isinstance(v, str) else v for k, v in PIQA_ROW.items()} for i in range(first, first + n)]
    path.write_text(json.dumps(rows))
    return path


def _splits(factory, seed):
    return _load("grid").split_record(factory(seed))


def test_grid_seed_draws_the_split_and_the_shuffle(tmp_path):
    """Within a seed the splits are disjoint and cover the file; another seed draws other splits."""
    grid = _load("grid")
    _piqa_file(tmp_path / "piqa.json", 40)
    factory = grid.commonsense("piqa.json", root=str(tmp_path))
    splits = {seed: _splits(factory, seed) for seed in (0, 1, 2)}
    for s in splits.values():
        parts = [set(s[name]) for name in grid.SPLITS]
        assert sum(map(len, parts)) == 40 and set.union(*parts) == set(range(40))  # disjoint, complete
        assert all(s[name] == sorted(s[name]) for name in grid.SPLITS)  # file order: the per-question order
    for name in grid.SPLITS:
        assert len({tuple(s[name]) for s in splits.values()}) == 3, name
    from svd_lightning.tiny import tiny_tokenizer

    dm = factory(1)
    dm.tokenizer = tiny_tokenizer()
    dm.setup("fit")
    assert dm.train_dataloader().generator.initial_seed() == 1  # the shuffle order follows the seed too


def test_grid_seed_with_a_train_file_draws_train_and_calib(tmp_path):
    """ARC/BoolQ: train and calib come from the train file (seeded); the test file is fixed."""
    grid = _load("grid")
    _piqa_file(tmp_path / "train.json", 30)
    _piqa_file(tmp_path / "test.json", 8, first=100)  # other questions than train's
    factory = grid.commonsense("test.json", "train.json", root=str(tmp_path))
    a, b = _splits(factory, 0), _splits(factory, 1)
    for s in (a, b):
        assert not set(s["train"]) & set(s["calib"]) and s["test"] == list(range(8))
    assert a["calib"] != b["calib"] and a["train"] != b["train"]
    dm = factory(0)
    assert grid.split_sources(dm) == {"train": f"{tmp_path}/train.json", "calib": f"{tmp_path}/train.json",
                                      "test": f"{tmp_path}/test.json"}


SHARED_TRUTHFULQA = REPO / "../shared/data/truthfulqa/v1_2021/mc_task.json"


def test_grid_truthfulqa_splits_differ_across_seeds():
    assert SHARED_TRUTHFULQA.exists(), f"shared data not found at {SHARED_TRUTHFULQA.resolve()} (CI has ../shared)"
    grid = _load("grid")
    a, b = _splits(grid.TASKS["truthfulqa"].data, 0), _splits(grid.TASKS["truthfulqa"].data, 1)
    for s in (a, b):
        assert not (set(s["train"]) & set(s["calib"]) or set(s["train"]) & set(s["test"]) or set(s["calib"]) & set(s["test"]))
        assert (len(s["train"]), len(s["calib"]), len(s["test"])) == (200, 60, 100)
    assert set(a["test"]) != set(b["test"]) and set(a["calib"]) != set(b["calib"])


def test_grid_deterministic_init_is_exactly_the_adapters_whose_init_ignores_the_seed():
    grid = _load("grid")
    from svd_lightning.models import apply_adapter
    from svd_lightning.tiny import tiny_model_and_tokenizer

    for adapter in grid.LEARNING_RATE:
        prints = []
        for seed in (0, 1):
            model, _ = tiny_model_and_tokenizer()
            torch.manual_seed(seed)  # as SteeringLM seeds the adapter's init
            prints.append(grid.init_fingerprint(apply_adapter(model, adapter)))
        assert (prints[0] == prints[1]) == (adapter in grid.DETERMINISTIC_INIT), adapter


def _cell(seed, calib, test, warm, fmt=2):
    """A format-2 cell of task t (acc, acc_norm) with the variants of _table as svd_ variants."""
    variants = {"plain": (np.full(2, 0.2), warm), "svd_a": (calib["a"][seed], test["a"][seed]),
                "svd_b": (calib["b"][seed], test["b"][seed]), "base": (np.zeros(2), warm),
                "contrastive_g+1": (np.zeros(2), warm), "fixed_a0.1_mask_generation_only_mu+1": (np.zeros(2), warm)}
    per_q = {split: {m: {v: list(map(float, x[i])) for v, x in variants.items()} for m in ("acc", "acc_norm")}
             for i, split in enumerate(("calib", "test"))}
    means = {split: {v: {m: float(np.mean(per_q[split][m][v])) for m in ("acc", "acc_norm")} for v in variants}
             for split in ("calib", "test")}
    return {"format": fmt, "task": "t", "adapter": "lora", "seed": seed, "epoch": 1, "primary": "acc",
            "metrics": ["acc", "acc_norm"], "calib": means["calib"], "test": means["test"], "per_question": per_q,
            "test_per_question": per_q["test"]["acc"], "mu": {"a": {"a": -1.0, "b": -2.0}},
            "split": {"train": [seed], "calib": [10 + seed, 20 + seed], "test": [30 + seed, 40 + seed]},
            "split_files": {"train": "t.json", "calib": "t.json", "test": "t.json"}}


def test_report_rows_show_both_metrics_per_seed_and_the_loso_row(tmp_path, monkeypatch):
    report = _load("report")
    monkeypatch.setattr(report, "_mu_of", lambda d, v: -1.0)
    calib, test, warm = selection_table()
    for seed in range(3):
        (tmp_path / f"t-lora-seed{seed}-epoch1.json").write_text(json.dumps(_cell(seed, calib, test, warm[seed])))
    old = {**_cell(2, calib, test, warm[2], fmt=1), "seed": 3}
    old.pop("format")
    (tmp_path / "t-lora-seed3-epoch1.json").write_text(json.dumps(old))  # an older format beside new cells
    cells, _ = report.load(tmp_path, quiet=True)
    assert sorted(cells[("t", "lora", 1)]) == [0, 1, 2]  # dropped
    rows = {r["method"]: r for r in report.summarise(cells, np.random.default_rng(0))}
    selected = rows["SVDecode (selected on calib)"]
    honest = rows["SVDecode (selected on calib)" + report.LOSO]
    assert selected["picks"] == ["svd_a", "svd_b", "svd_b"] and honest["picks"] == ["svd_b", "svd_a", "svd_a"]
    for m in ("acc", "acc_norm"):
        assert selected["by_metric"][m]["per_seed_gain"] == [0.5, 1.0, 0.5]
        assert honest["by_metric"][m]["per_seed_gain"] == [0.0, 0.0, 1.0]
        assert honest["by_metric"][m]["gain"] == pytest.approx(1 / 3)
    [effect] = [e for e in report.selection_effect(list(rows.values())) if e["method"] == "SVDecode (selected on calib)"]
    assert effect["metrics"]["acc"]["optimism"] == pytest.approx(1 / 3)
    md = report.markdown(list(rows.values()), {}, {}, effects=report.selection_effect(list(rows.values())))
    assert "acc_norm +33.33 (+0.00 / +0.00 / +100.00)" in md and "leave-one-seed-out" in md


def test_the_results_page_is_what_results_page_generates_from_the_committed_results(tmp_path):
    """docs/results.md is generated, never edited: regenerating it from the committed results gives it byte for byte."""
    _load("results_page").main(["--page", str(tmp_path / "results.md")])
    committed = (REPO / "docs" / "results.md").read_text(encoding="utf-8")
    assert (tmp_path / "results.md").read_text(encoding="utf-8") == committed, (
        "docs/results.md differs from what research/results_page.py generates: run `python -m research.results_page`")


def test_edge_rises_measure_picks_at_the_gamma_grids_edge_only():
    budget = _load("budget")
    calib = {"contrastive_g+0": [[0.5], [0.5]], "contrastive_g+10": [[0.6], [0.7]], "contrastive_g+100": [[0.9], [0.7]],
             "contrastive_g-10": [[0.1], [0.1]], "contrastive_g-100": [[0.2], [0.4]]}
    # seed 0 picks +100 (0.3 above +10), seed 1 picks -100 (0.3 above -10); a pick inside the grid counts nothing
    assert budget.edge_rises(calib, ["contrastive_g+100", "contrastive_g-100"]) == pytest.approx([0.3, 0.3])
    assert budget.edge_rises(calib, ["contrastive_g+10", "contrastive_g+0"]) == []


def test_the_findings_quote_round_2s_table_from_the_committed_summary():
    """docs/findings.md's round-2 table is ``budget.brief`` of the committed summary, not typed by hand."""
    budget = _load("budget")
    table = budget.brief(json.loads((RESULTS / "budget_summary.json").read_text()))
    assert table in (REPO / "docs" / "findings.md").read_text(encoding="utf-8"), (
        "docs/findings.md's round-2 table differs from research/results/budget_summary.json: paste `budget.brief`'s table")


SETTINGS_IN_LABEL = re.compile(r"([^|(;\n]+?) \((?:[^();]*; )?([^()]+?), LR ([0-9.e-]+), (fp32|bf16-mixed) warm start, (\d+) train q\.\)")


def _recorded_settings() -> dict[str, set[tuple]]:
    """(task, adapter) -> the (prompt, learning rate, precision, train questions) its committed cells record,
    read straight from the cell files."""
    out: dict[str, set[tuple]] = {}
    for path in (RESULTS).glob("grid*/*-epoch*.json"):
        d = json.loads(path.read_text())
        key = d["task"] if d["adapter"] == "lora" else f"{d['task']}-{d['adapter']}"
        out.setdefault(key, set()).add((d["prompt"], d["learning_rate"], d["precision"], d["sizes"]["train"]))
    return out


def test_every_reported_row_label_states_the_settings_its_cells_recorded():
    """Each label on the results pages and the README that names a prompt, learning rate, precision and
    training size names those its cells recorded (issue 41: a column said LR 5e-5 for cells run at 5e-4)."""
    budget, page = _load("budget"), _load("results_page")
    names = {**{v: k for k, v in budget.REGIMES.items()}, **{v: k for k, v in budget.BRIEF_REGIMES.items()},
             **{v: k for (k, _, _), v in page.REGIMES.items()},
             "round 1's demo seeds, own splits": "truthfulqa_demo", "fresh seeds, re-run": budget.CLOSED,
             "fresh seeds": budget.CURVE, **{v: k for k, v in _load("gap_report").GROUPS.items()}}
    names = {name: (task,) for name, task in names.items()}
    # the demo's regime, matched: round 1's demo seeds and the fresh seeds' re-run
    names["At the same settings"] = names["The comparison at the same settings"] = ("truthfulqa_demo", budget.CLOSED)
    assert not [n for n in names if "LR " in n], "a regime name carries a typed learning rate: it must come from the cells"
    recorded = _recorded_settings()
    precision = {"fp32": "32-true", "bf16-mixed": "bf16-mixed"}
    seen = 0
    docs = REPO / "docs"
    for doc in (RESULTS / "budget_summary.md", docs / "results.md", docs / "findings.md", REPO / "README.md"):
        for match in SETTINGS_IN_LABEL.finditer(doc.read_text(encoding="utf-8")):
            name, prompt, lr, prec, train = match.groups()
            name = name.strip(" *-").removeprefix("On SmolLM2-135M, ").removeprefix("On ").strip()
            tasks = names.get(name)
            assert tasks is not None, f"{doc.name}: a label names settings for {name!r}, which no regime is"
            for task in tasks:
                assert recorded[task] == {(prompt, float(lr), precision[prec], int(train))}, (
                    f"{doc.name}: {match.group(0)!r} but the cells of {task} record {sorted(recorded[task])}")
            seen += 1
    assert seen >= 20  # the round-2 tables, the brief table's heads, the gap table, the round-1 headline


def test_grid_cells_record_split_init_and_per_question_calib(tmp_path):
    """Two IA3 seeds of the real grid code on the tiny model: format 2, disjoint recorded splits that
    differ across seeds, equal init fingerprints (IA3), per-question values that follow the split."""
    assert SHARED_TRUTHFULQA.exists(), f"shared data not found at {SHARED_TRUTHFULQA.resolve()} (CI has ../shared)"
    grid, report = _load("grid"), _load("report")
    grid.main(["--model", "tiny-random", "--limit", "2", "--only", "truthfulqa-ia3", "--seeds", "0", "1", "--out", str(tmp_path)])
    cells = [json.loads((tmp_path / f"truthfulqa-ia3-seed{s}-epoch1.json").read_text()) for s in (0, 1)]
    for d in cells:
        assert d["format"] == grid.FORMAT and d["deterministic_init"] and d["data_seed"] == d["seed"]
        s = d["split"]
        assert not (set(s["train"]) & set(s["calib"]) or set(s["calib"]) & set(s["test"]) or set(s["train"]) & set(s["test"]))
        for split in ("calib", "test"):
            for metric in ("mc2", "mc1"):
                assert {len(x) for x in d["per_question"][split][metric].values()} == {len(s[split])}
        assert d["per_question"]["calib"]["mc2"].keys() == d["calib"].keys()  # every variant
    assert cells[0]["split"] != cells[1]["split"] and cells[0]["init_fingerprint"] == cells[1]["init_fingerprint"]
    assert grid.is_current(tmp_path / "truthfulqa-ia3-seed0-epoch2.json")  # the +1 epoch cell
    out = tmp_path / "report"
    report.main(["--grid", str(tmp_path), "--out", str(out)])
    md = (out / "grid_summary.md").read_text()
    assert "truthfulqa · ia3 · 1†" in md and "leave-one-seed-out" in md
    _load("results_page").main(["--grid", str(tmp_path), "--page", str(out / "results.md")])
    page = (out / "results.md").read_text()  # the results page, from the same cells
    assert page.startswith("# Results") and "do not edit by hand" in page
    assert "| truthfulqa · ia3 · 1† | [0, 1] | 2 / 2 / 2 | yes |" in page  # the scope table, from the cells


def test_committed_results_record_no_machine_paths():
    """Result files are read on other machines: a run is named relative to the repository, never by an
    absolute path (no JSON string of any committed result starts with "/")."""
    from svd_lightning.files import portable_path

    assert portable_path("/home/me/svd/runs/truthfulqa-lora/version_0") == "runs/truthfulqa-lora/version_0"
    assert portable_path("runs/x/version_1") == "runs/x/version_1"
    assert portable_path("/tmp/elsewhere/truthfulqa-lora/version_0") == "elsewhere/truthfulqa-lora/version_0"
    absolute = re.compile(r'"/[A-Za-z]')  # a JSON string that is an absolute POSIX path
    for path in [*RESULTS.rglob("*.json"), *(REPO / "benchmarks" / "results").rglob("*.json")]:
        if ".tmp" in path.parts:  # a grid's local working files (kept adapters, locks): git ignores them
            continue
        assert not absolute.search(path.read_text(encoding="utf-8")), path.relative_to(REPO)


def test_fresh_pool_is_disjoint_from_every_used_question(tmp_path):
    """The committed pool holds no calib or test question of any committed TruthfulQA cell and none
    of the README demo's test split (recomputed here from the demo config's seed), and seeds drawn
    from it keep calib, test and train apart."""
    assert SHARED_TRUTHFULQA.exists(), f"shared data not found at {SHARED_TRUTHFULQA.resolve()} (CI has ../shared)"
    grid = _load("grid")
    committed = json.loads(grid.FRESH_POOL.read_text())
    data = str(SHARED_TRUTHFULQA)  # the committed record names it relative to the repository
    record = {**grid.fresh_pool(RESULTS / "grid", data), "file": committed["file"]}
    assert record == committed, "results/fresh_pool.json is stale: rerun `python -m research.grid --make-pool`"
    pool = set(record["pool"])
    from svd_lightning.data import TruthfulQADataModule

    demo = TruthfulQADataModule(path=data, seed=0)
    demo.prepare_data()
    assert not pool & {ex.index for ex in demo.test_set}
    checked = 0
    for path in (RESULTS).glob("grid*/truthfulqa*.json"):
        cell = json.loads(path.read_text())
        held = set(cell["split"]["calib"]) | set(cell["split"]["test"])
        if cell.get("fresh"):  # drawn from the pool, never counted as used
            assert held <= pool, path.name
            continue
        assert not pool & held, path.name
        checked += 1
    assert checked >= 5 and len(pool) >= sum(grid.FRESH_SIZES[k] for k in ("calib", "test"))
    assert len(pool) + record["excluded"] == record["questions"] == 817

    splits = []
    for seed in (10, 11):
        dm = grid.FreshTruthfulQA(pool=record["pool"], path=data, seed=seed)
        dm.prepare_data()
        train, calib, test = ({ex.index for ex in part} for part in (dm.train_set, dm.calib_set, dm.test_set))
        assert (len(train), len(calib), len(test)) == (490, 50, 80)
        assert calib <= pool and test <= pool and not calib & test and not train & (calib | test)
        splits.append((calib, test))
    assert splits[0] != splits[1]


def test_equal_cost_baseline_trains_as_many_questions_as_calibration_costs():
    grid = _load("grid")
    # demo-like: calibration 98 s, an epoch of 490 questions 1000 s -> 48.02 -> 49 questions
    assert grid.calibration_cost_questions(98.0, 1000.0, 490) == 49
    assert grid.calibration_cost_questions(100.0, 1000.0, 490) == 49  # exactly 49.0
    assert grid.calibration_cost_questions(0.001, 1000.0, 490) == 1  # at least one question
    with pytest.raises(ValueError, match="timed training epoch"):
        grid.calibration_cost_questions(5.0, 0.0, 490)
    assert grid.probe_labels("truthfulqa_fresh", (1, 2)) == {"0.25", "0.5", "1", "2", "1+cal"}
    assert grid.probe_labels("truthfulqa", (1,)) == {"1", "2"}
    wide = grid.WIDE_GAMMAS
    assert min(wide) == -100 and max(wide) == 100 and 0.0 in wide and len(set(wide)) == len(wide) == 35


def test_fresh_cell_scores_the_budget_curve_and_the_calibration_cost_baseline(tmp_path, monkeypatch):
    """The fresh-pool cell on the tiny model (zero-shot prompts: the tiny tokenizer would overflow the
    six-shot one): files at ¼ and ½ of epoch 1, epochs 1 and 2 with every variant on the wide γ grid,
    and the plain "+calibration cost" baseline after as many epoch-2 questions as epoch 1 recorded."""
    assert SHARED_TRUTHFULQA.exists(), f"shared data not found at {SHARED_TRUTHFULQA.resolve()} (CI has ../shared)"
    grid = _load("grid")
    record = grid.fresh_pool(tmp_path / "no-cells", str(SHARED_TRUTHFULQA))
    assert set(record["excluded_by"]) == {"readme_demo_test"}
    monkeypatch.setitem(grid.TASKS, "truthfulqa_fresh", dataclasses.replace(grid.TASKS["truthfulqa_fresh"], data=lambda seed: grid.FreshTruthfulQA(
        pool=record["pool"], path=str(SHARED_TRUTHFULQA), few_shot=False, instruction=False, seed=seed, max_length=256)))
    out = tmp_path / "grid"
    grid.main(["--model", "tiny-random", "--limit", "8", "--only", "truthfulqa_fresh-lora", "--seeds", "10", "--out", str(out)])
    cells = {label: json.loads((out / f"truthfulqa_fresh-lora-seed10-epoch{label}.json").read_text())
             for label in ("0.25", "0.5", "1", "1+cal", "2")}
    assert [cells[k]["epoch"] for k in ("0.25", "0.5", "1", "2")] == [0.25, 0.5, 1.0, 2.0]
    assert cells["0.25"]["step"] == 2 and cells["0.5"]["step"] == 4 and cells["0.25"]["budget"] == "fraction"
    extra = cells["1"]["calibration_cost_questions"]
    assert 1 <= extra <= 8
    plus = cells["1+cal"]
    assert plus["baseline_only"] and plus["budget"] == "calibration_cost" and plus["step"] == extra
    assert plus["epoch"] == pytest.approx(1 + extra / 8) and set(plus["test"]) == {"plain"}
    assert all(c["fresh"] for c in cells.values())
    assert cells["1"]["gammas"] == list(grid.WIDE_GAMMAS)
    assert {f"contrastive_g{g:+g}" for g in grid.WIDE_GAMMAS} <= set(cells["1"]["test"])
    pool = set(record["pool"])
    for c in cells.values():
        assert set(c["split"]["calib"]) <= pool and set(c["split"]["test"]) <= pool
    assert grid.is_current(out / "truthfulqa_fresh-lora-seed10-epoch2.json")
    # budget.py's rows from these cells: every budget, the next-budget and +calibration-cost comparisons
    budget = _load("budget")
    loaded = budget.load(out)
    assert set(loaded) == {"truthfulqa_fresh"}
    rows = {(r["budget"], r["method"]): r for r in budget.rows("truthfulqa_fresh", loaded["truthfulqa_fresh"])}
    nxt = rows[("0.25", "train to the next budget")]
    metric = cells["0.25"]["primary"]
    expected = np.mean(np.subtract(cells["0.5"]["per_question"]["test"][metric]["plain"],
                                   cells["0.25"]["per_question"]["test"][metric]["plain"]))
    assert nxt["gain_vs_warm"] == pytest.approx(expected, abs=1e-12)
    assert {("1", budget.PLUS_CAL), ("1", budget.PLUS_ONE)} <= set(rows) and ("2", budget.NEXT) not in rows
    contrastive = rows[("1", budget.CONTRASTIVE)]
    assert contrastive["seeds"] == 1 and 0 <= contrastive["edge_picks"] <= 1
    assert contrastive["by_metric"][metric]["t_ci"] is None  # one seed: no seed-level interval
    summary = budget.summarise(loaded, tmp_path / "no-round-1")
    md = budget.markdown(summary)
    assert "| 0.25 | train to the next budget |" in md and f"trained [{extra}] more questions" in md
    brief = budget.brief(summary)
    assert brief in md and f"| {budget.PLUS_ONE} | " in brief and "(1 × 8, MC2; " in brief
    assert budget.worth(loaded["truthfulqa_fresh"], list(rows.values()), budget.OLD_DEFAULT) is None  # one seed
    vs = {e["method"]: e for e in budget.against_baselines(loaded["truthfulqa_fresh"], list(rows.values()))}
    own = cells["1"]["per_question"]["test"][metric]
    expected = np.mean(np.subtract(own[budget.DEFAULT], cells["1+cal"]["per_question"]["test"][metric]["plain"]))
    assert vs[budget.OLD_DEFAULT]["plus_cal"]["gain"] == pytest.approx(expected, abs=1e-12)
    assert vs[budget.CONTRASTIVE]["plus_one"]["per_seed_gain"] == pytest.approx(
        [np.mean(np.subtract(own[contrastive["picks"][0]], cells["2"]["per_question"]["test"][metric]["plain"]))])


def test_a_plain_only_epoch_is_the_plus_one_baseline_not_a_budget_row(tmp_path):
    """A commonsense round-2 cell on the tiny model: epoch 1 with every variant, "+1 epoch" and
    "+ the calibration's cost" scored plain; budget.py makes them comparisons of epoch 1 only."""
    grid, budget = _load("grid"), _load("budget")
    out = tmp_path / "grid"
    grid.main(["--model", "tiny-random", "--limit", "4", "--only", "boolq_demo-lora", "--seeds", "10", "--out", str(out)])
    cells = budget.load(out)["boolq_demo"]
    assert set(cells) == {"1", "1+cal", "2"} and cells["2"][10]["baseline_only"] and cells["1+cal"][10]["baseline_only"]
    assert cells["1"][10]["learning_rate"] == 5e-5 and cells["1"][10]["gammas"] == list(grid.WIDE_GAMMAS)
    rows = budget.rows("boolq_demo", cells, "svd_a0.05_mask_generation_only_trimmed_fisher")
    assert {r["budget"] for r in rows} == {"1"}
    by = {r["method"]: r for r in rows}
    assert {budget.PLUS_ONE, budget.PLUS_CAL, budget.NEW_DEFAULT, budget.OLD_DEFAULT} <= set(by)
    plus_one = np.subtract(cells["2"][10]["per_question"]["test"]["acc"]["plain"], cells["1"][10]["per_question"]["test"]["acc"]["plain"])
    assert by[budget.PLUS_ONE]["by_metric"]["acc"]["gain"] == pytest.approx(plus_one.mean(), abs=1e-12)


def test_the_calibration_cost_probe_fires_once_whatever_the_batch_size():
    grid = _load("grid")
    fires = lambda bs, q: [s for s in range(1, 20) if grid.EpochProbe._first_step_past(s, bs, q)]  # noqa: E731
    assert fires(1, 7) == [7] and fires(4, 6) == [2] and fires(4, 8) == [2] and fires(4, 9) == [3]


def test_commonsense_demo_test_questions_are_a_seeded_draw_outside_reported_rows():
    """ARC-Easy in the demo-like regime: 150 test questions drawn by the seed from the test file,
    none of them a row a round-1 cell reported, train and calib apart (both from the train file)."""
    root = REPO.parent / "shared" / "data" / "commonsense"
    assert root.exists(), f"shared data not found at {root} (CI has ../shared)"
    grid = _load("grid")
    reported = set(grid.reported_test_rows(grid.COMMONSENSE + "/ARC-Easy/test.json"))
    assert len(reported) == 150  # round 1's ARC-Easy cells: the test file's first 150 rows
    tests = []
    for seed in (10, 11):
        dm = grid.TASKS["arc_easy_demo"].data(seed)
        dm.prepare_data()
        train, calib, test = ({ex.index for ex in part} for part in (dm.train_set, dm.calib_set, dm.test_set))
        assert (len(train), len(calib), len(test)) == (490, 60, 150)
        assert not train & calib and not test & reported
        tests.append(test)
    assert tests[0] != tests[1]
    assert grid.TASKS["arc_easy_demo"].learning_rate == 5e-5 and grid.probe_labels("arc_easy_demo", (1,)) == {"1", "1+cal", "2"}


def test_the_default_is_chosen_only_on_calib_questions_outside_the_excluded_rows():
    """Variant A wins on the excluded rows (a reported test question), B on the rest: B is picked, and
    the gains are means over the kept questions only."""
    report = _load("report")

    def cell(seed, rows, a, b):
        values = {"plain": [0.0] * len(rows), "svd_a": a, "svd_b": b, "contrastive_g+1": [9.0] * len(rows)}
        return {"task": "truthfulqa", "adapter": "lora", "seed": seed, "epoch": 1, "primary": "mc2",
                "calib": {v: {"mc2": float(np.mean(x))} for v, x in values.items()},
                "split": {"calib": rows}, "per_question": {"calib": {"mc2": values}}}

    cells = [cell(0, [1, 2, 3], [0.9, 0.0, 0.0], [0.0, 0.2, 0.4]), cell(1, [4, 5], [0.8, 0.1], [0.1, 0.3])]
    chosen = report.choose_default(cells, exclude={1, 4})
    assert chosen["variant"] == "svd_b" and chosen["questions"] == [2, 1] and chosen["questions_used"] == [2, 3, 5]
    assert chosen["ranking"][0]["per_cell"] == pytest.approx([0.3, 0.3])
    assert chosen["ranking"][1] == {"variant": "svd_a", "selection_gain": pytest.approx(0.05), "per_cell": pytest.approx([0.0, 0.1])}
    assert report.choose_default(cells, exclude=set())["variant"] == "svd_a"  # with them in view, A would win
    with pytest.raises(ValueError, match="no calib question outside"):
        report.choose_default(cells, exclude={4, 5})


def test_the_rerun_of_round_1_is_compared_seed_by_seed(tmp_path):
    budget = _load("budget")

    def cell(seed, plain, default, cpu):
        return {"format": 2, "task": "truthfulqa", "adapter": "lora", "epoch": 1, "seed": seed, "primary": "mc2",
                "name": f"truthfulqa-lora-seed{seed}", "cpu": cpu, "precision": "32-true", "learning_rate": 5e-4,
                "prompt": "zero-shot", "sizes": {"train": 200},
                "per_question": {"test": {"mc2": {"plain": plain, budget.DEFAULT: default}}}}

    (tmp_path / "r1").mkdir()
    for seed, plain in ((0, [0.5, 0.7]), (1, [0.4, 0.4])):
        (tmp_path / "r1" / f"c{seed}.json").write_text(json.dumps(cell(seed, plain, [0.6, 0.8], "old")))
    rerun = {"1": {0: cell(0, [0.5, 0.5], [0.5, 0.7], "new"), 3: cell(3, [0.0, 0.0], [0.0, 0.0], "new")}}
    out = budget.reproduction(tmp_path / "r1", rerun)
    settings = "zero-shot, LR 5e-4, fp32 warm start, 200 train q."
    assert out["seeds"] == [0] and out["round1_cpu"] == f"old; {settings}" and out["rerun_cpu"] == f"new; {settings}"
    ia3 = {"1": {0: {**rerun["1"][0], "adapter": "ia3"}}}  # round 1 has no IA3 cell of seed 0 here
    assert out["adapter"] == "lora" and budget.reproduction(tmp_path / "r1", ia3) is None
    assert out["warm"] == {"round1": [pytest.approx(0.6)], "rerun": [pytest.approx(0.5)]}
    assert out["old_default_gain"] == {"round1": [pytest.approx(0.1)], "rerun": [pytest.approx(0.1)]}
    assert budget.reproduction(tmp_path / "r1", {"1": {5: rerun["1"][3]}}) is None


def test_train_only_then_score_saved_writes_the_cells_scoring_in_place_writes(tmp_path, monkeypatch):
    """--train-only keeps each point's adapter and leaves training exactly as a scored probe leaves it
    (mid-epoch too), so --score-saved writes the same cells -- the contrastive limits included."""
    grid = _load("grid")
    monkeypatch.setitem(grid.TASKS, "truthfulqa_fresh_closed", dataclasses.replace(
        grid.TASKS["truthfulqa_fresh_closed"], data=grid.zero_shot_truthfulqa, fractions=(0.5,), gammas=(0.0, 1.0, -1.0)))
    args = ["--model", "tiny-random", "--limit", "4", "--only", "truthfulqa_fresh_closed-lora", "--seeds", "10"]
    grid.main([*args, "--out", str(tmp_path / "in_place")])
    grid.main([*args, "--out", str(tmp_path / "later"), "--train-only"])
    assert not list((tmp_path / "later").glob("*.json"))
    assert {p.name for p in (tmp_path / "later" / ".tmp" / "adapters").iterdir()} == {
        "truthfulqa_fresh_closed-lora-seed10-epoch0.5", "truthfulqa_fresh_closed-lora-seed10-epoch1"}
    grid.main([*args, "--out", str(tmp_path / "later"), "--score-saved"])
    for label in ("0.5", "1"):
        name = f"truthfulqa_fresh_closed-lora-seed10-epoch{label}.json"
        a, b = (json.loads((tmp_path / d / name).read_text()) for d in ("in_place", "later"))
        for cell in (a, b):
            del cell["seconds"], cell["peak_rss_mb"]
        assert a == b
    assert a["gamma_limits"] and {"contrastive_g+inf", "contrastive_g-inf"} <= set(a["test"])
    assert "choice_nll" not in a["test"]["contrastive_g+inf"]


def _closed_cell(seed: int, calib: dict[str, float], test: dict[str, float], cpu: str = "a CPU") -> dict:
    """A hand-built TruthfulQA cell: every calib / test question of a variant scores its given value."""
    per_q = lambda values, n: {m: {v: [x] * n for v, x in values.items()} for m in ("mc2", "mc1")}  # noqa: E731
    return {"seed": seed, "adapter": "lora", "primary": "mc2", "metrics": ["mc2", "mc1"], "cpu": cpu, "precision": "32-true",
            "name": f"truthfulqa_fresh_closed-lora-seed{seed}", "learning_rate": 5e-5, "prompt": "instruction + six-shot",
            "sizes": {"train": 490}, "split": {"train": [0], "calib": [1, 2, 3], "test": [4, 5]},
            "split_files": {"train": "mc_task.json", "calib": "mc_task.json", "test": "mc_task.json"},
            "calib": {v: {"mc2": x, "mc1": x} for v, x in calib.items()}, "test": {v: {} for v in test},
            "per_question": {"calib": per_q(calib, 3), "test": per_q(test, 2)}}


def test_the_closed_gamma_grid_counts_picks_at_its_largest_finite_gamma_and_at_its_limits():
    """Seed 10's calib peaks at γ = +∞: on the wide grid it picks the edge +100, on the closed grid the
    limit; seed 11 peaks inside both. The gains score those picks' test values."""
    budget = _load("budget")
    names = ["plain", "base", "contrastive_g+0", "contrastive_g+1", "contrastive_g+100", "contrastive_g-100",
             "contrastive_g+10000", "contrastive_g-10000", "contrastive_g+inf", "contrastive_g-inf"]
    calib10 = dict(zip(names, [0.5, 0.4, 0.5, 0.55, 0.6, 0.3, 0.62, 0.3, 0.72, 0.3]))
    calib11 = dict(zip(names, [0.5, 0.4, 0.5, 0.7, 0.6, 0.3, 0.6, 0.3, 0.6, 0.3]))
    test = {10: dict(zip(names, [0.5, 0.4, 0.5, 0.5, 0.7, 0.2, 0.7, 0.2, 0.9, 0.1])),
            11: dict(zip(names, [0.4, 0.4, 0.4, 0.6, 0.5, 0.2, 0.5, 0.2, 0.5, 0.1]))}
    cells = {"1": {10: _closed_cell(10, calib10, test[10]), 11: _closed_cell(11, calib11, test[11])}}
    committed = {"1": {10: _closed_cell(10, calib10, {**test[10], "plain": 0.45}, cpu="another CPU")}}
    [entry] = budget.closed_grid(cells, committed)
    wide, closed = entry["grids"]
    assert wide["gammas"] == [100, 1] and wide["at_largest_finite"] == 1 and wide["at_limit"] == 0
    assert wide["largest_finite_rise"] == pytest.approx([0.6 - 0.55])  # +100 over the next γ in, +1
    assert closed["gammas"] == [math.inf, 1] and closed["at_limit"] == 1 and closed["at_largest_finite"] == 0
    assert closed["largest_finite"] == 10000 and closed["limit_rise"] == pytest.approx([0.72 - 0.62])
    assert closed["on_limit_plateau"] == 0 and wide["on_limit_plateau"] is None
    plateau = {"contrastive_g+10": [[0.5]], "contrastive_g+1000": [[0.6]], "contrastive_g+inf": [[0.6]], "contrastive_g-inf": [[0.1]]}
    assert budget.limit_plateau(plateau, ["contrastive_g+1000"]) == 1 and budget.limit_plateau(plateau, ["contrastive_g+10"]) == 0
    assert wide["by_metric"]["mc2"]["gain"] == pytest.approx(np.mean([0.7 - 0.5, 0.6 - 0.4]))
    assert closed["by_metric"]["mc2"]["gain"] == pytest.approx(np.mean([0.9 - 0.5, 0.6 - 0.4]))
    assert entry["warm"] == {10: pytest.approx((0.45, 0.5))}
    assert entry["committed_cpu"] == "another CPU; instruction + six-shot, LR 5e-5, fp32 warm start, 490 train q."
    lines = "\n".join(budget.closed_grid_lines([entry], "###"))
    assert "| 1 | contrastive γ (selected on calib, closed grid) | +∞ / +1 | 0 of 2 (\\|γ\\| = 10000) | 1 of 2 (calib rise" in lines


def test_the_gap_experiment_cross_scores_unseen_questions_without_moving_training(tmp_path, monkeypatch):
    """A demo-group cell of the gap experiment on the tiny model: fp32 whatever the CPU, LR 5e-5, both
    baselines, and at each evaluated epoch a cross file scoring the fresh group's test questions the model
    neither trained nor calibrated on. Cross-scoring leaves training as it was (the same epoch-2 scores
    as a run without it)."""
    grid = _load("grid")
    args = ["--model", "tiny-random", "--limit", "2", "--only", "truthfulqa_gap_demo-lora", "--seeds", "0"]
    grid.main([*args, "--out", str(tmp_path / "with")])
    cells = {p.stem.split("-epoch")[1]: json.loads(p.read_text()) for p in (tmp_path / "with").glob("*.json")}
    assert set(cells) == {"1", "1+cal", "2"}
    one = cells["1"]
    assert (one["precision"], one["learning_rate"], one["prompt"]) == ("32-true", 5e-5, "instruction + six-shot")
    fresh_test = set(grid.group_test_rows("truthfulqa_gap_fresh"))
    for label in ("1", "2"):
        cross = json.loads((tmp_path / "with" / "cross" / f"truthfulqa_gap_demo-lora-seed0-epoch{label}-cross.json").read_text())
        seen = set(cells[label]["split"]["train"]) | set(cells[label]["split"]["calib"])
        assert cross["rows"] and set(cross["rows"]) <= fresh_test and not set(cross["rows"]) & seen
        assert cross["cross_task"] == "truthfulqa_gap_fresh" and cross["smoke_limit"] == 2
        assert set(cross["test"]) == set(cells[label]["test"])  # every variant, μ and γ from the model's own calib
        assert len(cross["per_question"]["mc2"]["plain"]) == len(cross["rows"])
    assert not (tmp_path / "with" / "cross" / "truthfulqa_gap_demo-lora-seed0-epoch1+cal-cross.json").exists()
    monkeypatch.setitem(grid.TASKS, "truthfulqa_gap_demo", dataclasses.replace(grid.TASKS["truthfulqa_gap_demo"], cross=None))
    grid.main([*args, "--out", str(tmp_path / "without")])
    without = json.loads((tmp_path / "without" / "truthfulqa_gap_demo-lora-seed0-epoch2.json").read_text())
    assert without["per_question"] == cells["2"]["per_question"]
    assert not (tmp_path / "without" / "cross").exists()


def test_the_gap_decomposition_splits_the_gap_into_question_and_model_effects():
    """The 2 × 2 (models × questions) of the default's gain: a gap that moves with the questions shows as the
    question effect, one that stays with the models as the model effect; the words follow the numbers."""
    gap = _load("gap_report")

    def summary(demo_own, demo_cross, fresh_own, fresh_cross):
        row = lambda g: [{"budget": "1", "method": gap.NEW_DEFAULT, "by_metric": {"mc2": {"gain": g}}}]  # noqa: E731
        return {"groups": {"truthfulqa_gap_demo": {"own": row(demo_own), "cross": row(demo_cross)},
                           "truthfulqa_gap_fresh": {"own": row(fresh_own), "cross": row(fresh_cross)}}}

    questions = gap.decomposition(summary(0.10, 0.01, 0.01, 0.10))  # each model gains 10 on the demo questions only
    assert questions["gap"] == pytest.approx(0.09) and questions["question_effect"] == pytest.approx(0.09)
    assert questions["model_effect"] == pytest.approx(0.0) and "follows the questions more" in gap.reading(questions)
    models = gap.decomposition(summary(0.10, 0.10, 0.01, 0.01))  # the demo models gain 10 wherever they are scored
    assert models["model_effect"] == pytest.approx(0.09) and models["question_effect"] == pytest.approx(0.0)
    assert "follows the models" in gap.reading(models)
    assert gap.decomposition({"groups": {}}) is None
