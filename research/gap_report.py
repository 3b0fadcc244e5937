"""The gap experiment's report (issue 41): round 1's demo-regime seeds gained ~+10 MC2 from the default and the
fresh seeds ~+1. Both groups re-run at the documented demo regime (instruction + six-shot, LR 5e-5, batch 1, fp32
warm starts; every setting in a label is read from the cells), two epochs, with both equal-cost baselines, and
each group's models scored on the other group's test questions they never saw (``grid_gap/cross/``): if the gain
follows the questions, a model gains on the other group's questions what that group's own models gain there.

    python -m research.gap_report     # research/results/gap_summary.{json,md}; the results page shows it
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from research.budget import CONTRASTIVE, NEW_DEFAULT, PLUS_CAL, PLUS_ONE, against_baselines, load, rows
from research.report import gain_text, level_text, settings_text
from svd_lightning.files import atomic_write_text
from svd_lightning.recipes import configs_dir

ROOT = Path(__file__).resolve().parent
CELLS = ROOT / "results" / "grid_gap"
GROUPS = {"truthfulqa_gap_demo": "gap experiment, round 1's demo-regime seeds",
          "truthfulqa_gap_fresh": "gap experiment, fresh seeds"}
CLOSED_CONTRASTIVE = "contrastive γ (selected on calib, grid closed by ±∞)"  # its cells hold the limits γ = ±∞
SHOWN = ("warm start", NEW_DEFAULT, CLOSED_CONTRASTIVE, PLUS_ONE, PLUS_CAL)  # the columns, in order


def shipped_default(config: Path = configs_dir() / "truthfulqa" / "lora.yaml") -> str:
    """The grid's name of the SVDecode variant the shipped TruthfulQA config runs (read from the config)."""
    c = yaml.safe_load(config.read_text())
    return f"svd_a{c['model.alpha']:g}_{c['model.scoring_policy']}_{c['solver.strength']}_{c['solver.curvature']}"


def cross_cell(cell: dict, cross: dict) -> dict:
    """``cell`` with its test split replaced by its cross-scoring (the other group's unseen test questions); its
    calib (where μ̄ and γ were chosen) stays its own."""
    return {**cell, "test": cross["test"], "per_question": {**cell["per_question"], "test": cross["per_question"]},
            "split": {**cell["split"], "test": cross["rows"]}, "sizes": {**cell["sizes"], "test": len(cross["rows"])}}


def cross_labels(labels: dict[str, dict[int, dict]], cells: Path) -> dict[str, dict[int, dict]]:
    """label -> seed -> the cell scored on the other group's questions, for every cell that has its cross file."""
    out: dict[str, dict[int, dict]] = {}
    for label, seeds in labels.items():
        for seed, cell in seeds.items():
            path = cells / "cross" / f"{cell['name']}-epoch{label}-cross.json"
            if path.is_file():
                out.setdefault(label, {})[seed] = cross_cell(cell, json.loads(path.read_text()))
    return out


def _closed_grid(table: list[dict], labels: dict[str, dict[int, dict]]) -> list[dict]:
    """budget.rows names its calib-selected contrastive row for the wide grid; these cells hold the closed one."""
    if not all(d.get("gamma_limits") for seeds in labels.values() for d in seeds.values()):
        raise ValueError("a gap-experiment cell was scored without the γ limits: re-score it (grid.py --score-saved)")
    return [{**r, "method": CLOSED_CONTRASTIVE} if r["method"] == CONTRASTIVE else r for r in table]


def summarise(cells: Path = CELLS, default: str | None = None) -> dict:
    default = default or shipped_default()
    every = load(cells)
    out = {"default": default, "groups": {}}
    for task, group in GROUPS.items():
        labels = every.get(task)
        if not labels:
            continue
        own = _closed_grid(rows(task, labels, default), labels)
        crossed = cross_labels(labels, cells)
        out["groups"][task] = {
            "name": group,
            "settings": settings_text(d for seeds in labels.values() for d in seeds.values()),
            "seeds": {label: sorted(seeds) for label, seeds in sorted(labels.items())},
            "own": own, "versus": _closed_grid(against_baselines(labels, rows(task, labels, default)), labels),
            "cross": _closed_grid(rows(task, crossed, default), labels) if crossed.get("1") else [],
            "cpus": sorted({d["cpu"] for seeds in labels.values() for d in seeds.values()}),
        }
    out["decomposition"] = [d for d in (decomposition(out, b) for b in ("1", "2")) if d]
    return out


def decomposition(summary: dict, budget: str = "1") -> dict | None:
    """The 2 × 2 of the default's MC2 gain at ``budget``: models (demo-regime, fresh) × test questions (the demo
    group's, the fresh group's). The question effect is the mean over models of (demo questions − fresh
    questions); the model effect the mean over question sets of (demo models − fresh models)."""
    def gain(task: str, table: str) -> float | None:
        r = next((r for r in summary["groups"].get(task, {}).get(table, [])
                  if r["budget"] == budget and r["method"] == NEW_DEFAULT), None)
        return None if r is None else r["by_metric"]["mc2"]["gain"]

    demo_on_demo, demo_on_fresh = gain("truthfulqa_gap_demo", "own"), gain("truthfulqa_gap_demo", "cross")
    fresh_on_fresh, fresh_on_demo = gain("truthfulqa_gap_fresh", "own"), gain("truthfulqa_gap_fresh", "cross")
    if None in (demo_on_demo, demo_on_fresh, fresh_on_fresh, fresh_on_demo):
        return None
    return {"budget": budget, "demo_models": {"demo_questions": demo_on_demo, "fresh_questions": demo_on_fresh},
            "fresh_models": {"fresh_questions": fresh_on_fresh, "demo_questions": fresh_on_demo},
            "gap": demo_on_demo - fresh_on_fresh,
            "question_effect": ((demo_on_demo - demo_on_fresh) + (fresh_on_demo - fresh_on_fresh)) / 2,
            "model_effect": ((demo_on_demo - fresh_on_demo) + (demo_on_fresh - fresh_on_fresh)) / 2}


def reading(d: dict) -> str:
    """The decomposition in words, every number read from it."""
    def p(x: float) -> str:
        return f"{100 * x:+.2f}"

    return (f"At epoch {d['budget']} the default gains {p(d['demo_models']['demo_questions'])} MC2 with the demo-regime "
            f"models on their own questions and {p(d['demo_models']['fresh_questions'])} with the same models on the "
            f"fresh group's questions; the fresh models gain {p(d['fresh_models']['fresh_questions'])} on their own and "
            f"{p(d['fresh_models']['demo_questions'])} on the demo group's. Of the {p(d['gap'])}-point gap, the "
            f"questions account for {p(d['question_effect'])} (mean over the two model groups of demo questions − "
            f"fresh questions) and the models for {p(d['model_effect'])} (mean over the two question sets of demo "
            "models − fresh models)" + (": the gain follows the questions more than the models."
                                        if d["question_effect"] > d["model_effect"] else
                                        ": the gain follows the models at least as much as the questions."))


CAVEAT = ("Each entry is a mean over 3–5 seeds with wide intervals (the tables below); a cross set holds the other "
          "group's test questions that the model never trained or calibrated on, so the sets differ in size and in "
          "which questions they hold; no interval is computed for the two effects.")


def _cell(r: dict | None) -> str:
    if r is None:
        return "—"
    s = r["by_metric"]["mc2"]
    return level_text(s) if r["method"] == "warm start" else gain_text(s)


def _table(entries: list[tuple[str, list[dict]]], budget: str) -> list[str]:
    lines = ["| group | seeds × test q. | " + " | ".join(SHOWN) + " |", "|---|---|" + "---|" * len(SHOWN)]
    for name, table in entries:
        at = {r["method"]: r for r in table if r["budget"] == budget}
        if not at:
            continue
        warm = at["warm start"]
        items = "/".join(str(n) for n in sorted(set(warm["questions_per_seed"])))
        lines.append(f"| {name} | {warm['seeds']} × {items} | " + " | ".join(_cell(at.get(m)) for m in SHOWN) + " |")
    return lines


def markdown(summary: dict, level: str = "#") -> str:
    sub = level + "#"
    groups = summary["groups"]
    lines = [f"{level} The gap experiment (generated by `research/gap_report.py`)", "",
             f"The default is the shipped TruthfulQA config's (`{summary['default']}`). MC2 points against the same "
             "seed's warm start at the same epoch: mean (per seed) [95 % bootstrap CI, seeds × questions crossed] "
             "t[95 % t-interval over seeds]; the warm start's own MC2 in percent. "
             f"`{PLUS_ONE}` and `{PLUS_CAL}` are the plain adapter trained one more epoch, or on the calibration "
             f"questions too, against the epoch-1 warm start. `{CLOSED_CONTRASTIVE}`: γ picked on each seed's "
             "calib questions, the pick redone in every bootstrap draw.", ""]
    for task, g in groups.items():
        seeds = "; ".join(f"epoch {label}: {s}" for label, s in g["seeds"].items())
        lines.append(f"- {g['name']} ({g['settings']}): `{task}`, seeds {seeds}; cells ran on {', '.join(g['cpus'])}.")
    if summary.get("decomposition"):
        lines += ["", f"{sub} What the gap follows", ""]
        lines += [line for d in summary["decomposition"] for line in (reading(d), "")] + [CAVEAT]
    for budget in ("1", "2"):
        lines += ["", f"{sub} Own test questions, epoch {budget}", ""]
        lines += _table([(g["name"], g["own"]) for g in groups.values()], budget)
    lines += ["", f"{sub} Steering minus the equal-cost baselines (epoch 1, paired on the same test questions)", "",
              "| group | method | − one more epoch | − the calibration's cost in training |", "|---|---|---|---|"]
    for g in groups.values():
        for e in g["versus"]:
            cols = [gain_text(e[k]) if e[k] else "(not run)" for k in ("plus_one", "plus_cal")]
            lines.append(f"| {g['name']} | {e['method']} | {cols[0]} | {cols[1]} |")
    for budget in ("1", "2"):
        lines += ["", f"{sub} The other group's test questions, epoch {budget}", "",
                  "Each model scored on the other group's test questions that it neither trained nor calibrated on "
                  "(μ̄ and γ from its own calib).", ""]
        lines += _table([(f"{g['name']} → the other group's questions", g["cross"]) for g in groups.values()], budget)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=Path, default=CELLS)
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args(argv)
    summary = summarise(args.cells)
    if not summary["groups"]:
        raise SystemExit(f"no gap-experiment cells in {args.cells}; run `bash research/gap.sh`")
    atomic_write_text(args.out / "gap_summary.json", json.dumps(summary, indent=1, default=float))
    md = markdown(summary)
    atomic_write_text(args.out / "gap_summary.md", md)
    print(md)
    print(f"wrote {args.out / 'gap_summary.md'}, {args.out / 'gap_summary.json'}")


if __name__ == "__main__":
    main()
