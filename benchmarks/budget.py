"""The fresh-question demo regime (``grid.py``'s ``truthfulqa_fresh`` cells): gains at every training
budget, against the equal-cost baselines, with both intervals.

At each budget (¼, ½, 1, 2 epochs of the same runs) the gain over that budget's warm start of:
SVDecode's default (trimmed Fisher, α = 0.3), SVDecode with μ fit to the calib multiple-choice loss,
contrastive decoding with γ fit the same way (no selection among variants), contrastive γ selected
on calib over the wide grid (how many picks sit at its edge is reported), and simply training to the
next budget. At epoch 1 also the two equal-cost baselines: "+1 epoch" and "+ the calibration's cost"
(as many more training questions as the calibration pass took the time of, ``1+cal``). Gains use
:mod:`benchmarks.report`'s rows: a hierarchical bootstrap CI (seeds, then questions; selection redone
for selected rows) and, with 2+ seeds, the t-interval over seeds.

    python benchmarks/budget.py                       # results/grid_fresh -> results/budget_summary.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import DEFAULT, FORMAT, _candidates, _row, gain_text, in_sample_picks, level_text  # noqa: E402

from svd_lightning.run import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parent
BUDGETS = ("0.25", "0.5", "1", "2")
FIXED = {  # no selection among variants
    "SVDecode (trimmed Fisher, α=0.3: default)": DEFAULT,
    "SVDecode (choice_nll μ, α=0.1)": "svd_a0.1_mask_generation_only_choice_nll",
    "contrastive (choice_nll γ, no mask)": "ld_none_choice_nll",
}
CONTRASTIVE = "contrastive γ (selected on calib, wide grid)"


def load(fresh_dir: Path) -> dict[str, dict[int, dict]]:
    """label ("0.25", …, "1+cal") -> seed -> cell, for the current format."""
    out: dict[str, dict[int, dict]] = defaultdict(dict)
    for path in sorted(fresh_dir.glob("*.json")):
        d = json.loads(path.read_text())
        if d.get("format") == FORMAT and d.get("fresh"):
            out[d.get("label", str(d["epoch"]))][d["seed"]] = d
    return out


def rows(cells: dict[str, dict[int, dict]]) -> list[dict]:
    """One row per (budget, method), over the seeds that have the budget (and, for a comparison, the
    other budget it needs)."""
    out = []
    for i, label in enumerate(BUDGETS):
        seeds = cells.get(label, {})
        if not seeds:
            continue
        ds = [seeds[s] for s in sorted(seeds)]
        metric, metrics = ds[0]["primary"], list(ds[0]["metrics"])
        key = ("truthfulqa_fresh", "lora", label)
        methods = {"warm start": [("plain", d, d) for d in ds], "pre-trained": [("base", d, d) for d in ds]}
        methods.update({name: [(v, d, d) for d in ds] for name, v in FIXED.items()})
        comparisons = {"train to the next budget": BUDGETS[i + 1] if i + 1 < len(BUDGETS) else None}
        if label == "1":
            comparisons["+ the calibration's cost in training questions"] = "1+cal"
        for name, later in comparisons.items():
            if later and all(s in cells.get(later, {}) for s in seeds):
                methods[name] = [("plain", cells[later][s], seeds[s]) for s in sorted(seeds)]
        for name, picks in methods.items():
            out.append({**_row(key, name, picks, metric, metrics, None), "budget": label})
        calib, test_of = _candidates(ds, "contrastive_", metric)
        picks = [(v, d, d) for v, d in zip(in_sample_picks(calib), ds)]
        row = _row(key, CONTRASTIVE, picks, metric, metrics, None, (calib, test_of, False), "in-sample")
        edge = max(abs(g) for g in ds[0]["gammas"])
        row["edge_picks"] = sum(abs(float(v.removeprefix("contrastive_g"))) == edge for v, _, _ in picks)
        row["budget"] = label
        out.append(row)
    return out


def markdown(table: list[dict], cells: dict) -> str:
    extra = sorted({d["calibration_cost_questions"] for d in cells.get("1", {}).values()})
    lines = ["# The demo regime on fresh questions: gains at every training budget", "",
             "Seeds per budget: " + ", ".join(f"{b}: {sorted(cells.get(b, {}))}" for b in (*BUDGETS, "1+cal")) + ". "
             f"The +calibration-cost baseline trained {extra} more questions. Points vs the same budget's warm start: "
             "mean (per seed) [95% hierarchical CI] t[95% t-interval over seeds].", "",
             "| budget (epochs) | method | MC2 | MC1 |", "|---|---|---|---|"]
    for r in table:
        m1, m2 = r["metrics"][0], r["metrics"][1]
        text = level_text if r["method"] == "warm start" else gain_text
        note = f" ({r['edge_picks']} of {r['seeds']} picks at the grid's edge)" if "edge_picks" in r else ""
        lines.append(f"| {r['budget']} | {r['method']}{note} | {text(r['by_metric'][m1])} | {text(r['by_metric'][m2])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fresh", type=Path, default=ROOT / "results" / "grid_fresh")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args(argv)
    cells = load(args.fresh)
    if not cells:
        raise SystemExit(f"no fresh cells in {args.fresh}; run `python benchmarks/grid.py --only truthfulqa_fresh-lora`")
    table = rows(cells)
    atomic_write_text(args.out / "budget_summary.json", json.dumps(table, indent=1, default=float))
    md = markdown(table, cells)
    atomic_write_text(args.out / "budget_summary.md", md)
    print(md)


if __name__ == "__main__":
    main()
