"""Evidence round 2 (the cells of ``research/round2.sh``): steering against the equal-cost baselines.

Three parts, all from the cell files (``grid.py``), statistics from :mod:`research.report`:

* **The re-chosen default.** :func:`report.choose_default`'s rule (the SVDecode variant with the best
  calib MC2 gain) at epoch 1 on round 1's TruthfulQA LoRA cells, counting only calib questions that
  no result reports as test (every committed TruthfulQA cell's test rows and the README demo's test
  split). Its winner's curse is measured: its gain on the selection questions beside its gain on the
  round-2 test questions, which it never saw.
* **Equal cost, every round-2 regime, epoch 1.** The gain over the warm start of the defaults (old
  and re-chosen), SVDecode and contrastive decoding with the strength fit to the calib multiple-choice
  loss (no selection among variants), contrastive γ selected on calib over the wide grid (with how
  many picks sit at its edge), and the two equal-cost baselines: one more epoch, and "+ the
  calibration's cost" (as many more training questions as the calibration pass took the time of).
* **The training-budget curve** (six-shot TruthfulQA on fresh questions): the same rows at ¼, ½, 1 and 2
  epochs of the same runs, with "train to the next budget"; a plot, and SVDecode's worth in epochs.
* **The γ grid closed by its limits** (``results/grid_closed``): the fresh seeds trained again to
  epoch 1 and scored on the wide grid extended to |γ| = 10⁴ plus γ = ±∞; contrastive γ picked on
  calib over the wide and over the closed grid of the same cells, and where the picks sit.

Rows carry a bootstrap CI over seeds and questions as crossed factors (seeds share questions; the
selection redone for selected rows) and, with 2+ seeds, the t-interval over seeds. Every row's label
states the settings its cells recorded (:func:`settings_text`), never the task table's.

    python -m research.budget    # results/grid_fresh, grid_round2, grid_closed -> results/budget_summary.{json,md}, budget_curve.png
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from research.report import (
    BOOTSTRAP, DEFAULT, FORMAT, choose_default, ci_text, gain_row, gain_text, in_sample_picks, level_text, pct,
    question_ids, row_rng, selection_candidates, settings_text, test_values,
)
from research.report import load as load_grid

from svd_lightning.files import atomic_write_text
from svd_lightning.experimental import hierarchical_ci, picked_gains, seed_t_interval, selection_ci

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
BENCHMARK_RESULTS = ROOT.parent / "benchmarks" / "results"  # cost.py's
CELL_DIRS = (RESULTS / "grid_fresh", RESULTS / "grid_round2", RESULTS / "grid_closed")
BUDGETS = ("0.25", "0.5", "1", "2")  # epochs of training, in order
CAL = "1+cal"  # epoch 1 + the calibration's cost in training questions
CURVE = "truthfulqa_fresh"  # the task with the training-budget curve
REGIMES = {  # round-2 task -> what its data is; the settings in its rows' labels are read from its cells
    "truthfulqa_fresh": "TruthfulQA, fresh questions",
    "truthfulqa_equal_cost": "TruthfulQA, round 1's splits",
    "arc_easy_demo": "ARC-Easy, test drawn outside round 1's",
    "arc_challenge_demo": "ARC-Challenge, test drawn outside round 1's",
    "boolq_demo": "BoolQ, test drawn outside round 1's",
    "truthfulqa_equal_cost-ia3": "TruthfulQA, round 1's split, IA3, one seed",
    "truthfulqa_equal_cost-prompt_tuning": "TruthfulQA, round 1's split, prompt tuning, one seed",
}
def regime_label(task: str, labels: dict[str, dict[int, dict]]) -> str:
    """A regime's row label: what its data is, then the settings its cells recorded (:func:`settings_text`)."""
    return f"{REGIMES.get(task, task)} ({settings_text(d for seeds in labels.values() for d in seeds.values())})"
EQUAL_COST = "truthfulqa_equal_cost"  # round 1's zero-shot TruthfulQA cells, re-run with both baselines
OLD_DEFAULT = "SVDecode, old default (trimmed Fisher, α=0.3)"
NEW_DEFAULT = "SVDecode, re-chosen default"
FIXED = {  # no selection among variants on the reported seeds
    OLD_DEFAULT: DEFAULT,
    "SVDecode (choice_nll μ, α=0.1)": "svd_a0.1_mask_generation_only_choice_nll",
    "contrastive (choice_nll γ, no mask)": "ld_none_choice_nll",
}
CONTRASTIVE = "contrastive γ (selected on calib, wide grid)"
CLOSED = "truthfulqa_fresh_closed"  # the fresh seeds re-run to epoch 1, scored on the closed γ grid
NEXT = "train to the next budget"
PLUS_ONE = "+1 epoch"
PLUS_CAL = "+ the calibration's cost in training questions"


def regime(cell: dict) -> str:
    """A cell's regime: its task, with its adapter where that is not LoRA."""
    return cell["task"] if cell["adapter"] == "lora" else f"{cell['task']}-{cell['adapter']}"


def load(*dirs: Path) -> dict[str, dict[str, dict[int, dict]]]:
    """regime (:func:`regime`) -> label ("0.25", …, "1+cal") -> seed -> cell, for the current format."""
    out: dict[str, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for directory in dirs:
        for path in sorted(Path(directory).glob("*.json")):
            d = json.loads(path.read_text())
            if d.get("format") == FORMAT and "label" in d:
                out[regime(d)][d["label"]][d["seed"]] = d
    return out


def truthfulqa_reported_rows(round1: Path, cells: dict) -> set[int]:
    """TruthfulQA file rows some result reports as test: every TruthfulQA cell's (round 1 and
    round 2) and the README demo's test split."""
    from research.grid import DEMO_SPLIT, committed_cells, reported_test_rows, split_record

    from svd_lightning.data import TruthfulQADataModule

    every = committed_cells(round1) + [d for labels in cells.values() for seeds in labels.values() for d in seeds.values()]
    demo = TruthfulQADataModule(**DEMO_SPLIT)
    return reported_test_rows(demo.path, every) | set(split_record(demo)["test"])


def rechoose(round1: Path, exclude: set[int]) -> dict | None:
    """The default chosen at epoch 1 on round 1's TruthfulQA LoRA calib questions outside ``exclude``
    (None without round-1 cells)."""
    r1, _ = load_grid(round1, quiet=True)
    selection = [d for (task, adapter, epoch), seeds in sorted(r1.items())
                 if task in ("truthfulqa", "truthfulqa_demo") and adapter == "lora" and epoch == 1
                 for _, d in sorted(seeds.items())]
    if not selection:
        return None
    chosen = choose_default(selection, exclude)
    old = next(i for i, r in enumerate(chosen["ranking"]) if r["variant"] == DEFAULT)
    return {**chosen, "old_default": DEFAULT, "old_default_rank": old + 1,
            "old_default_selection_gain": chosen["ranking"][old]["selection_gain"]}


def reproduction(round1: Path, labels: dict[str, dict[int, dict]], task: str = "truthfulqa") -> dict | None:
    """Round 1's cells of ``task`` (epoch 1, the re-run's adapter) against their re-run (the same seeds and
    splits, maybe another CPU and precision): the warm start's test level and the old default's gain, per seed."""
    new = labels.get("1", {})
    if not new:
        return None
    adapter = next(iter(new.values()))["adapter"]
    r1, _ = load_grid(round1, quiet=True)
    old = r1.get((task, adapter, 1), {})
    seeds = sorted(set(old) & set(new))
    if not seeds:
        return None
    metric = new[seeds[0]]["primary"]

    def per_seed(cells: dict, variant: str, minus_plain: bool) -> list[float]:
        return [float(np.mean(test_values(cells[k], variant, metric) - (test_values(cells[k], "plain", metric) if minus_plain else 0)))
                for k in seeds]

    return {"adapter": adapter, "seeds": seeds, "metric": metric,
            "round1_cpu": f"{old[seeds[0]]['cpu']}; {settings_text(old[k] for k in seeds)}",
            "rerun_cpu": f"{new[seeds[0]]['cpu']}; {settings_text(new[k] for k in seeds)}",
            "warm": {"round1": per_seed(old, "plain", False), "rerun": per_seed(new, "plain", False)},
            "old_default_gain": {"round1": per_seed(old, DEFAULT, True), "rerun": per_seed(new, DEFAULT, True)}}


def rows(task: str, labels: dict[str, dict[int, dict]], new_default: str | None = None) -> list[dict]:
    """One row per (budget, method) of a task, over the seeds that have the budget (a comparison with
    a later cell, over those of them that have it)."""
    out = []
    full = [b for b in BUDGETS if labels.get(b) and not any(d["baseline_only"] for d in labels[b].values())]
    for label in full:
        seeds = labels[label]
        ds = [seeds[s] for s in sorted(seeds)]
        metric, metrics = ds[0]["primary"], list(ds[0]["metrics"])
        key = (task, ds[0]["adapter"], label)
        methods = {"warm start": [("plain", d, d) for d in ds], "pre-trained": [("base", d, d) for d in ds]}
        fixed = dict(FIXED)
        if new_default:
            fixed = {NEW_DEFAULT: new_default, **fixed}
        methods.update({name: [(v, d, d) for d in ds] for name, v in fixed.items()})
        later = BUDGETS[BUDGETS.index(label) + 1] if label != BUDGETS[-1] else None
        comparisons = {PLUS_ONE if label == "1" else NEXT: later}
        if label == "1":
            comparisons[PLUS_CAL] = CAL
        for name, nxt in comparisons.items():  # over the seeds that have the later cell (the row says how many)
            have = [s for s in sorted(seeds) if s in labels.get(nxt, {})] if nxt else []
            if have:
                methods[name] = [("plain", labels[nxt][s], seeds[s]) for s in have]
        for name, picks in methods.items():
            out.append({**gain_row(key, name, picks, metric, metrics, None), "budget": label})
        calib, test_of = selection_candidates(ds, "contrastive_", metric)
        picks = [(v, d, d) for v, d in zip(in_sample_picks(calib), ds)]
        row = gain_row(key, CONTRASTIVE, picks, metric, metrics, None, (calib, test_of, False), "in-sample")
        row["edge_rise"] = edge_rises(calib, [v for v, _, _ in picks])
        row["edge_picks"] = len(row["edge_rise"])
        row["budget"] = label
        out.append(row)
    return out


def gamma_of(variant: str) -> float:
    """γ of a contrastive variant (``contrastive_g+0.5``; ``contrastive_g+inf``: the limit)."""
    return float(variant.removeprefix("contrastive_g"))


def edge_rises(calib: dict[str, list], picks: list[str], edge: float | None = None) -> list[float]:
    """For each seed whose γ pick sits at the grid's edge (``edge``; default the largest |γ|, ∞ where
    the grid holds its limits), how much its calib mean rose from the next γ inward on the same side:
    ~0 is a plateau, more says the optimum may lie beyond."""
    gamma = {v: gamma_of(v) for v in calib}
    edge = max(abs(g) for g in gamma.values()) if edge is None else edge
    rises = []
    for k, v in enumerate(picks):
        if abs(gamma_of(v)) == edge:
            inner = max((u for u in gamma if gamma[u] * gamma_of(v) > 0 and abs(gamma[u]) < edge), key=lambda u: abs(gamma[u]))
            rises.append(float(np.mean(calib[v][k]) - np.mean(calib[inner][k])))
    return rises


def limit_plateau(calib: dict[str, list], picks: list[str]) -> int:
    """How many finite picks score on calib exactly what the limit γ = ±∞ of their side scores: their
    optimum is a plateau that runs on to the limit (the pick rule then takes the plateau's first name)."""
    same = 0
    for k, v in enumerate(picks):
        g = gamma_of(v)
        limit = f"contrastive_g{math.copysign(math.inf, g):+g}"
        if g != 0 and math.isfinite(g) and limit in calib and np.mean(calib[v][k]) == np.mean(calib[limit][k]):
            same += 1
    return same


def closed_grid(labels: dict[str, dict[int, dict]], committed: dict[str, dict[int, dict]],
                new_default: str | None = None) -> list[dict]:
    """The γ grid closed by its limits, per budget of its re-run (:data:`CLOSED`): contrastive γ selected
    on calib over the wide grid and over the closed grid of the same cells -- the picks, how many sit
    at the largest finite |γ| and how many at the limit γ = ±∞, the test gains (selection redone in
    the CI) -- the defaults' gains, and the re-run's warm starts against the committed cells' (the
    same seeds and splits, maybe another CPU and precision)."""
    from research.grid import WIDE_GAMMAS

    out = []
    for label in BUDGETS:
        seeds = labels.get(label)
        if not seeds:
            continue
        ds = [seeds[s] for s in sorted(seeds)]
        metric, metrics = ds[0]["primary"], list(ds[0]["metrics"])
        key = (CLOSED, ds[0]["adapter"], label)
        calib, test_of = selection_candidates(ds, "contrastive_", metric)
        grids = []
        for grid, largest in (("wide", max(WIDE_GAMMAS)), ("closed", math.inf)):
            names = [v for v in calib if abs(gamma_of(v)) <= largest]
            sub = {v: calib[v] for v in names}
            sub_test = lambda m, names=names: {v: x for v, x in test_of(m).items() if v in names}  # noqa: E731
            picks = in_sample_picks(sub)
            row = gain_row(key, f"contrastive γ (selected on calib, {grid} grid)", [(v, d, d) for v, d in zip(picks, ds)],
                       metric, metrics, None, (sub, sub_test, False), "in-sample")
            finite = max(abs(gamma_of(v)) for v in names if math.isfinite(gamma_of(v)))
            row.update(grid=grid, gammas=[gamma_of(v) for v in picks], largest_finite=finite,
                       at_largest_finite=sum(abs(gamma_of(v)) == finite for v in picks),
                       at_limit=sum(math.isinf(gamma_of(v)) for v in picks),
                       largest_finite_rise=edge_rises(sub, picks, finite), limit_rise=edge_rises(sub, picks, math.inf),
                       on_limit_plateau=limit_plateau(sub, picks) if math.isinf(largest) else None)
            grids.append(row)
        defaults = [gain_row(key, name, [(v, d, d) for d in ds], metric, metrics, None)
                    for name, v in ((NEW_DEFAULT, new_default), (OLD_DEFAULT, DEFAULT)) if v and all(v in d["test"] for d in ds)]
        before = committed.get(label, {})
        warm = {s: (float(np.mean(test_values(before[s], "plain", metric))), float(np.mean(test_values(seeds[s], "plain", metric))))
                for s in sorted(seeds) if s in before and before[s]["split"] == seeds[s]["split"]}
        out.append({"budget": label, "seeds": sorted(seeds), "metric": metric, "grids": grids, "defaults": defaults,
                    "warm": warm, "cpu": f"{ds[0]['cpu']}; {settings_text(ds)}", "settings": settings_text(ds),
                    "committed_cpu": f"{before[min(warm)]['cpu']}; {settings_text(before[k] for k in warm)}" if warm else None})
    return out


def gap_rows(round1: Path, cells: dict, new_default: str | None) -> list[dict]:
    """The open question (issue 41): the defaults' epoch-1 gains on round 1's demo-regime seeds against the
    fresh seeds, at the fresh cells' own settings and re-run at the demo's (LR and precision matched)."""
    r1, _ = load_grid(round1, quiet=True)
    groups = [("round 1's demo seeds, own splits", "truthfulqa_demo", r1.get(("truthfulqa_demo", "lora", 1), {})),
              ("fresh seeds, re-run", CLOSED, cells.get(CLOSED, {}).get("1", {})),
              ("fresh seeds", CURVE, cells.get(CURVE, {}).get("1", {}))]
    out = []
    for name, task, seeds in groups:
        if not seeds:
            continue
        ds = [seeds[k] for k in sorted(seeds)]
        metric, metrics = ds[0]["primary"], list(ds[0]["metrics"])
        rows = {method: gain_row((task, "lora", "1"), method, [(v, d, d) for d in ds], metric, metrics, None)
                for method, v in (("warm start", "plain"), (NEW_DEFAULT, new_default), (OLD_DEFAULT, DEFAULT))
                if v and all(v in d["test"] for d in ds)}
        out.append({"group": name, "task": task, "settings": settings_text(ds), "rows": rows})
    return out


def gap_lines(entries: list[dict], sub: str) -> list[str]:
    if not entries:
        return []
    methods = [m for m in (NEW_DEFAULT, OLD_DEFAULT) if any(m in e["rows"] for e in entries)]
    lines = ["", f"{sub} The open question: round 1's demo seeds against the fresh seeds (epoch 1)", ""]
    matched = [e for e in entries if e["task"] in ("truthfulqa_demo", CLOSED) and NEW_DEFAULT in e["rows"]]
    if len(matched) == 2 and matched[0]["settings"] == matched[1]["settings"]:
        (a, b) = (e["rows"][NEW_DEFAULT]["by_metric"]["mc2"] for e in matched)
        apart = a["t_ci"][0] > b["t_ci"][1] or b["t_ci"][0] > a["t_ci"][1]
        lines += [f"At the same settings ({matched[0]['settings']}) the re-chosen default gains {pct(a['gain'])} MC2 on "
                  f"{matched[0]['group']} and {pct(b['gain'])} on the {matched[1]['group']}: {pct(a['gain'] - b['gain'])} points "
                  f"apart; their seed t-intervals {ci_text(*a['t_ci'])} and {ci_text(*b['t_ci'])} "
                  + ("do not overlap." if apart else "overlap.") + " The gap experiment (its own section, "
                  "`research/gap_report.py`) re-runs both groups at one regime and scores each group's models on the "
                  "other's test questions.", ""]
    lines += ["| seeds (settings read from their cells) | seeds × test q. | warm start MC2 | " + " | ".join(methods) + " |",
              "|---|---|---|" + "---|" * len(methods)]
    for e in entries:
        warm = e["rows"]["warm start"]
        items = "/".join(str(n) for n in sorted(set(warm["questions_per_seed"])))
        cols = [gain_text(e["rows"][m]["by_metric"]["mc2"]) if m in e["rows"] else "(not scored)" for m in methods]
        lines.append(f"| {e['group']} ({e['settings']}) | {warm['seeds']} × {items} | {level_text(warm['by_metric']['mc2'])} | "
                     + " | ".join(cols) + " |")
    return lines


def versus(labels: dict[str, dict[int, dict]], row: dict, baseline: str) -> dict | None:
    """An epoch-1 steering row minus an equal-cost baseline (the plain adapter at label ``baseline``),
    paired on the same test questions, primary metric: mean, per seed, crossed bootstrap CI (the selection
    redone for a calib-selected row) and the seed t-interval, over the row's seeds that have the
    baseline (None if none has)."""
    one, later, metric = labels["1"], labels.get(baseline, {}), row["metric"]
    kept = [(s, v) for s, v in zip(row["seed_ids"], row["picks"]) if s in later]
    if not kept:
        return None
    seeds, picks = [s for s, _ in kept], [v for _, v in kept]
    base = [test_values(later[s], "plain", metric) for s in seeds]
    rng = row_rng("versus", row["task"], row["method"], baseline)
    ids = [question_ids(one[s], "test") for s in seeds]
    if row["selection"] == "in-sample":
        calib, test_of = selection_candidates([one[s] for s in seeds], "contrastive_", metric)
        mean, lo, hi = selection_ci(calib, test_of(metric), base, rng, False, n_boot=BOOTSTRAP, questions=ids,
                                    calib_questions=[question_ids(one[s], "calib") for s in seeds])
        per_seed = picked_gains(picks, test_of(metric), base)
    else:
        diffs = [test_values(one[s], v, metric) - b for s, v, b in zip(seeds, picks, base)]
        mean, lo, hi = hierarchical_ci(diffs, rng, n_boot=BOOTSTRAP, questions=ids)
        per_seed = [float(d.mean()) for d in diffs]
    return {"baseline": baseline, "metric": metric, "seeds": seeds, "gain": mean, "ci_low": lo, "ci_high": hi, "per_seed_gain": per_seed,
            "t_ci": list(seed_t_interval(per_seed)[1:]) if len(per_seed) >= 2 else None}


VERSUS = (NEW_DEFAULT, OLD_DEFAULT, *list(FIXED)[1:], CONTRASTIVE)  # the steering rows set against the baselines


def against_baselines(labels: dict[str, dict[int, dict]], table: list[dict]) -> list[dict]:
    """Every steering row of epoch 1 against "+1 epoch" (label 2) and "+ the calibration's cost" (1+cal)."""
    at_one = {r["method"]: r for r in table if r["budget"] == "1"}
    return [{"method": m, "plus_one": versus(labels, at_one[m], "2"), "plus_cal": versus(labels, at_one[m], CAL)}
            for m in VERSUS if m in at_one]


def worth(labels: dict[str, dict[int, dict]], table: list[dict], method: str) -> dict | None:
    """What a steering row at epoch 1 is worth in training: its gain, one more epoch's gain (both over
    the epoch-1 warm start), their paired difference (:func:`versus`), the ratio of the mean gains
    (epochs of training it is worth) and the calibration's cost as a share of an epoch's training time."""
    at_one = {r["method"]: r for r in table if r["budget"] == "1"}
    if method not in at_one or PLUS_ONE not in at_one or at_one[PLUS_ONE]["seeds"] < 2:
        return None
    train, one = at_one[PLUS_ONE], labels["1"]
    seeds = train["seed_ids"]  # the seeds with epoch 2
    steer = at_one[method]
    if steer["seed_ids"] != seeds:  # the row again over the seeds that have epoch 2
        pick_of = dict(zip(steer["seed_ids"], steer["picks"]))  # a fixed row: one variant
        steer = gain_row((one[seeds[0]]["task"], train["adapter"], "1"), method, [(pick_of[k], one[k], one[k]) for k in seeds],
                     train["metric"], train["metrics"], None)
    metric = steer["metric"]
    s, t = steer["by_metric"][metric], train["by_metric"][metric]
    cost = [one[k]["seconds"]["calibration"] / one[k]["seconds"]["train_epoch"] for k in steer["seed_ids"]]
    return {"method": method, "variant": steer["picks"][0], "metric": metric, "seeds": steer["seed_ids"],
            "steer_gain": [s["gain"], s["ci_low"], s["ci_high"]], "train_gain": [t["gain"], t["ci_low"], t["ci_high"]],
            "difference": versus(labels, steer, "2"),
            "epochs_worth": s["gain"] / t["gain"] if t["gain"] > 0 else None,
            "cost_share": float(np.mean(cost)), "cost_share_per_seed": cost}


def inference_cost(path: Path) -> dict | None:
    """Steering's recurring cost at inference, from ``cost.py``'s JSON: the one-forward path's median time
    ratio to the plain model for scoring and for generation (the range over its batch sizes)."""
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    ratios = {r["task"]: r["ratio_vs_plain"]["median"] for r in d["rows"] if r["variant"] == "one_forward" and "ratio_vs_plain" in r}
    generation = [x for task, x in ratios.items() if task.startswith("generate_")]
    return {"scoring": ratios["score"], "generation": [min(generation), max(generation)], "device": d["device_name"],
            "file": path.name}


def worth_sentence(w: dict | None, regime: str, cost: dict | None) -> str:
    if w is None:
        return "(needs epochs 1 and 2 of two or more seeds)"
    m = w["metric"].upper()
    s, t, diff = w["steer_gain"], w["train_gain"], w["difference"]
    d = [diff["gain"], diff["ci_low"], diff["ci_high"]]
    # a ratio of two noisy means: only a point estimate, and only when training's own gain is clearly > 0
    epochs = (f"about {w['epochs_worth']:.2f} epochs of training (a ratio of means; the difference's interval is "
              "the evidence)" if w["epochs_worth"] is not None and w["epochs_worth"] > 0 and t[1] > 0
              else "no measurable amount of training (one more epoch's own gain has an interval reaching 0)")
    recurring = (f" plus a recurring cost at inference: steered scoring takes ×{cost['scoring']:.2f} and steered generation "
                 f"×{cost['generation'][0]:.2f}–{cost['generation'][1]:.2f} the plain model's time (one-forward path, "
                 f"`{cost['file']}`, {cost['device']})" if cost else " (steering's recurring cost at inference not measured)")
    return (f"On SmolLM2-135M, {regime}: `{w['variant']}` is worth {epochs}. Its cost: a one-off calibration at "
            f"{100 * w['cost_share']:.0f} % of an epoch's training time{recurring}. At epoch 1 it gains {pct(s[0])} {m} "
            f"{ci_text(*s[1:])}, one more epoch gains {pct(t[0])} {ci_text(*t[1:])}; steering − training {pct(d[0])} "
            f"{ci_text(*d[1:])} t{ci_text(*diff['t_ci'])} ({len(w['seeds'])} seeds, paired on the same test questions).")


def plot_curve(labels: dict[str, dict[int, dict]], new_default: str | None, path: Path, regime: str = "") -> Path | None:
    """Test MC2 against training budget: the warm start, and steering on top of it at each budget."""
    seeds = sorted(set.intersection(*(set(labels.get(b, {})) for b in BUDGETS)) if all(labels.get(b) for b in BUDGETS) else set())
    if not seeds:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = labels["1"][seeds[0]]["primary"]
    xs = [float(b) for b in BUDGETS]

    def level(label: str, variant: str) -> tuple[float, float, float]:
        v = [100 * labels[label][s]["test"][variant][metric] for s in seeds]
        return float(np.mean(v)), min(v), max(v)

    fig, ax = plt.subplots(figsize=(7, 4))
    series = [("warm start (trained to this budget)", "plain", "k", "o-")]
    if new_default:
        series.append((f"+ SVDecode, re-chosen default", new_default, "tab:blue", "s--"))
    series += [(f"+ SVDecode, old default", DEFAULT, "tab:gray", "v:"),
               ("+ contrastive (choice_nll γ)", "ld_none_choice_nll", "tab:orange", "^--")]
    for name, variant, color, style in series:
        points = [level(b, variant) for b in BUDGETS]
        ax.plot(xs, [p[0] for p in points], style, color=color, label=name)
        if variant == "plain":
            ax.fill_between(xs, [p[1] for p in points], [p[2] for p in points], color=color, alpha=0.1, lw=0)
    if all(s in labels.get(CAL, {}) for s in seeds):
        cal = [labels[CAL][s] for s in seeds]
        ax.plot([float(np.mean([d["epoch"] for d in cal]))], [float(np.mean([100 * d["test"]["plain"][metric] for d in cal]))],
                "D", color="tab:green", label="warm start, epoch 1 + the calibration's cost")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel("training budget (epochs of 490 questions)")
    ax.set_ylabel(f"test {metric.upper()} (%), mean of {len(seeds)} seeds")
    ax.set_title(f"SmolLM2-135M LoRA, {regime} (band: warm start's seed range)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def markdown(summary: dict, level: str = "#") -> str:
    """The summary (:func:`summarise`, as written to JSON) as markdown; ``level`` is the title's heading."""
    sub = level + "#"
    tables, chosen = summary["tables"], summary["chosen"]
    lines = [f"{level} Evidence round 2 (generated by `research/budget.py`)", "",
             "Points vs the same budget's warm start of the same seed: mean (per seed) [95 % bootstrap CI, seeds × "
             "questions crossed] "
             "t[95 % t-interval over seeds]. Seeds: " + "; ".join(
                 f"{task}: " + ", ".join(f"{b} {seeds}" for b, seeds in summary["seeds"][task].items())
                 for task in tables) + f". Cells ran on: {'; '.join(summary['cpus'])}.", "",
             f"{sub} In brief (primary metric; docs/findings.md quotes this table)", "", brief(summary)]
    if chosen:
        top = chosen["ranking"][0]
        lines += [f"{sub} The re-chosen default", "",
                  f"Chosen at epoch 1 on round 1's TruthfulQA LoRA cells ({', '.join(chosen['cells'])}), counting only their "
                  f"calib questions that no result reports as test ({sum(chosen['questions'])} question-cells, "
                  f"{len(chosen['questions_used'])} distinct questions): `{chosen['variant']}`, selection-set gain "
                  f"{pct(top['selection_gain'])} {chosen['metric'].upper()} (per cell " + " / ".join(pct(x) for x in top["per_cell"])
                  + f"); the old default `{chosen['old_default']}` ranked {chosen['old_default_rank']} of {len(chosen['ranking'])} "
                  f"({pct(chosen['old_default_selection_gain'])}). The best of {len(chosen['ranking'])} on these questions "
                  "carries a winner's curse: its gains on the round-2 test questions below are the honest estimate.", ""]
    lines += [f"{sub} Equal cost at epoch 1, every round-2 regime", "",
              "| regime | seeds × test q. | method | metric 1 | metric 2 |", "|---|---|---|---|---|"]
    for task, table in tables.items():
        lines += [_line(summary["regimes"][task], r) for r in table if r["budget"] == "1"]
    lines += ["", f"{sub} Steering minus the equal-cost baselines (epoch 1, paired on the same test questions)", "",
              "Primary metric (MC2 / acc), points: mean (per seed) [95 % crossed bootstrap CI; selection redone for the "
              "selected row] t[seed t-interval]. Above 0: steering beat the baseline.", "",
              "| regime | method | − one more epoch | − the calibration's cost in training |", "|---|---|---|---|"]
    for task, entries in summary["versus"].items():
        for e in entries:
            cols = [gain_text(e[k]) if e[k] else "(not run)" for k in ("plus_one", "plus_cal")]
            lines.append(f"| {summary['regimes'][task]} | {e['method']} | {cols[0]} | {cols[1]} |")
    if CURVE in tables:
        lines += ["", f"{sub} The training-budget curve ({summary['regimes'][CURVE]})", "",
                  f"The +calibration-cost baseline trained {summary['extra_questions'][CURVE]} more questions "
                  "(`budget_curve.png`).", "", "| budget (epochs) | method | MC2 | MC1 |", "|---|---|---|---|"]
        for r in tables[CURVE]:
            m1, m2 = r["metrics"][0], r["metrics"][1]
            text = level_text if r["method"] == "warm start" else gain_text
            lines.append(f"| {r['budget']} | {_name(r)} | {text(r['by_metric'][m1])} | {text(r['by_metric'][m2])} |")
    lines += ["", f"{sub} What steering is worth in training", ""] + [f"- {s}" for s in summary["sentences"]]
    lines += closed_grid_lines(summary.get("closed_grid") or [], sub)
    lines += gap_lines(summary.get("gap") or [], sub)
    reruns = summary.get("reproduction") or []
    if reruns:
        def seeds_text(pair):
            return " / ".join(f"{100 * a:.2f} → {100 * b:.2f}" for a, b in zip(pair["round1"], pair["rerun"]))
        lines += ["", f"{sub} Round 1's zero-shot cells, re-run", ""]
        lines += [f"- {r['adapter']}, seeds {r['seeds']} and their splits, round 1 ({r['round1_cpu']}) → re-run "
                  f"({r['rerun_cpu']}), test {r['metric'].upper()} per seed: warm start {seeds_text(r['warm'])}; the old "
                  f"default's gain (points) {seeds_text(r['old_default_gain'])}." for r in reruns]
    return "\n".join(lines) + "\n"


def gamma_text(g: float) -> str:
    return ("+∞" if g > 0 else "−∞") if math.isinf(g) else f"{g:+g}"


def closed_grid_lines(entries: list[dict], sub: str) -> list[str]:
    """The closed-grid section of the page (:func:`closed_grid`)."""
    if not entries:
        return []
    first = entries[0]
    warm = "; ".join(f"{e['budget']}: " + " / ".join(f"{100 * a:.2f} → {100 * b:.2f}" for a, b in e["warm"].values())
                     for e in entries if e["warm"])
    lines = ["", f"{sub} The γ grid closed by its limits (the fresh seeds re-run to epoch 1)", "",
             f"Seeds {first['seeds']} trained again on the same splits ({first['cpu']}; the committed cells: "
             f"{first['committed_cpu']}) and scored on the *closed* grid: the wide grid, |γ| on to 10⁴, and the "
             "limits γ = ±∞, where choices rank by the logit difference alone (`ContrastiveLimit`, exact). "
             "The wide grid's pick is made again on the same cells, so the two grids differ only in their points. "
             f"Warm-start test {first['metric'].upper()} per seed, committed → re-run: {warm}.", "",
             "A finite pick \"on the limit's plateau\" scores on calib exactly what γ = ±∞ scores: its optimum runs on to "
             "the limit, and the pick rule (the best calib value, ties first by name) took the plateau's first name.", "",
             "| budget (epochs) | method | γ picked per seed | at the largest finite \|γ\| | at γ = ±∞ | metric 1 | metric 2 |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        for r in e["grids"]:
            m1, m2 = r["metrics"][0], r["metrics"][1]
            rise = lambda xs: f" (calib rise from the next γ in: {', '.join(pct(x) for x in xs)})" if xs else ""  # noqa: E731
            plateau = lambda r: f"; {r['on_limit_plateau']} more on the limit's plateau" if r.get("on_limit_plateau") else ""  # noqa: E731
            lines.append(f"| {e['budget']} | {r['method']} | {' / '.join(gamma_text(g) for g in r['gammas'])} | "
                         f"{r['at_largest_finite']} of {r['seeds']} (\|γ\| = {r['largest_finite']:g}){rise(r['largest_finite_rise'])} | "
                         f"{r['at_limit']} of {r['seeds']}{rise(r['limit_rise'])}{plateau(r)} | "
                         f"{m1} {gain_text(r['by_metric'][m1])} | {m2} {gain_text(r['by_metric'][m2])} |")
        for r in e["defaults"]:
            m1, m2 = r["metrics"][0], r["metrics"][1]
            lines.append(f"| {e['budget']} | {r['method']} | | | | {m1} {gain_text(r['by_metric'][m1])} | "
                         f"{m2} {gain_text(r['by_metric'][m2])} |")
    return lines


BRIEF_REGIMES = {  # round-2 task -> its short column head in the brief table
    "truthfulqa_fresh": "TruthfulQA six-shot, fresh q.",
    "truthfulqa_equal_cost": "TruthfulQA zero-shot",
    "arc_easy_demo": "ARC-Easy",
    "arc_challenge_demo": "ARC-Challenge",
    "boolq_demo": "BoolQ",
}
BRIEF_METHODS = (NEW_DEFAULT, OLD_DEFAULT, "SVDecode (choice_nll μ, α=0.1)", "contrastive (choice_nll γ, no mask)",
                 CONTRASTIVE, PLUS_ONE, PLUS_CAL)


def brief(summary: dict) -> str:
    """The README's round-2 table: methods × regimes at epoch 1, primary metric, ``gain [CI] t[t-interval]``,
    and the re-chosen default minus one more epoch (paired)."""
    tasks = [t for t in BRIEF_REGIMES if t in summary["tables"]]

    def at_one(task: str) -> dict[str, dict]:
        return {r["method"]: r for r in summary["tables"][task] if r["budget"] == "1"}

    def text(s: dict | None) -> str:
        if not s:
            return "not run"
        t = f" t{ci_text(*s['t_ci'])}" if s.get("t_ci") else ""
        return f"{pct(s['gain'])} {ci_text(s['ci_low'], s['ci_high'])}{t}"

    head = []
    for t in tasks:
        r = at_one(t)["warm start"]
        head.append(f"{BRIEF_REGIMES[t]} ({r['seeds']} × {max(r['questions_per_seed'])}, {r['metric'].upper()}; "
                    f"{summary['settings'][t]})")
    lines = ["| epoch 1, points vs the warm start | " + " | ".join(head) + " |", "|---" * (len(tasks) + 1) + "|"]
    for method in BRIEF_METHODS:
        cols = []
        for t in tasks:
            r = at_one(t).get(method)
            edge = f" ({r['edge_picks']}/{r['seeds']} at the edge)" if r and "edge_picks" in r else ""
            cols.append(text(r and r["by_metric"][r["metric"]]) + edge)
        lines.append(f"| {method} | " + " | ".join(cols) + " |")
    versus_new = [next((e["plus_one"] for e in summary["versus"].get(t, []) if e["method"] == NEW_DEFAULT), None) for t in tasks]
    lines.append(f"| {NEW_DEFAULT} − one more epoch | " + " | ".join(text(v) for v in versus_new) + " |")
    return "\n".join(lines) + "\n"


def _name(r: dict) -> str:
    rises = "; calib rise from the next γ in: " + ", ".join(pct(x) for x in r["edge_rise"]) if r.get("edge_rise") else ""
    note = f" ({r['edge_picks']} of {r['seeds']} picks at the grid's edge{rises})" if "edge_picks" in r else ""
    return r["method"] + note


def _line(regime: str, r: dict) -> str:
    text = level_text if r["method"] == "warm start" else gain_text
    cells = " | ".join(f"{m} {text(r['by_metric'][m])}" for m in r["metrics"][:2])
    items = "/".join(str(n) for n in sorted(set(r["questions_per_seed"])))
    return f"| {regime} | {r['seeds']} × {items} | {_name(r)} | {cells} |"


def summarise(cells: dict, round1: Path, cost: dict | None = None) -> dict:
    """Everything the page and the summary show: the re-chosen default, every task's rows, the sentences."""
    chosen = rechoose(round1, truthfulqa_reported_rows(round1, cells))
    new = chosen["variant"] if chosen else None
    tables = {task: rows(task, cells[task], new) for task in REGIMES if task in cells}
    tables = {task: table for task, table in tables.items() if table}
    curve = tables.get(CURVE, [])
    worths = [w for w in (worth(cells[CURVE], curve, m) for m in (NEW_DEFAULT, OLD_DEFAULT)) if w] if curve else []
    versus_rows = {task: against_baselines(cells[task], table) for task, table in tables.items()}
    reruns = [reproduction(round1, labels) for key, labels in cells.items() if key.startswith(EQUAL_COST)]
    every = [d for labels in cells.values() for seeds in labels.values() for d in seeds.values()]
    closed = closed_grid(cells[CLOSED], cells.get(CURVE, {}), new) if CLOSED in cells else []
    return {"chosen": chosen, "tables": tables, "versus": versus_rows, "worth": worths, "reproduction": [r for r in reruns if r],
            "closed_grid": closed, "gap": gap_rows(round1, cells, new),
            "sentences": [worth_sentence(w, regime_label(CURVE, cells[CURVE]), cost) for w in worths],
            "inference_cost": cost,
            "seeds": {task: {b: sorted(cells[task][b]) for b in (*BUDGETS, CAL) if cells[task].get(b)} for task in tables},
            "extra_questions": {task: sorted({d["calibration_cost_questions"] for d in cells[task].get("1", {}).values()})
                                for task in tables},
            "cpus": sorted({f"{d['cpu']}, {d['precision']}" for d in every}),
            "regimes": {task: regime_label(task, cells[task]) for task in cells},
            "settings": {task: settings_text(d for seeds in cells[task].values() for d in seeds.values()) for task in cells}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=Path, nargs="+", default=list(CELL_DIRS), help="round-2 cell directories")
    ap.add_argument("--round1", type=Path, default=RESULTS / "grid", help="round 1's cells (the default is chosen on them)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--cost", type=Path, default=BENCHMARK_RESULTS / "cost_smollm2-135m_cpu.json",
                    help="cost.py's JSON: steering's recurring cost at inference, stated beside what it is worth")
    args = ap.parse_args(argv)
    cells = load(*args.cells)
    if not cells:
        raise SystemExit(f"no round-2 cells in {args.cells}; run `bash research/round2.sh`")
    summary = summarise(cells, args.round1, inference_cost(args.cost))
    atomic_write_text(args.out / "budget_summary.json", json.dumps(summary, indent=1, default=float))
    md = markdown(summary)
    atomic_write_text(args.out / "budget_summary.md", md)
    plot = plot_curve(cells.get(CURVE, {}), summary["chosen"] and summary["chosen"]["variant"], args.out / "budget_curve.png",
                      summary["regimes"].get(CURVE, CURVE))
    print(md)
    print(f"wrote {args.out / 'budget_summary.md'}, {args.out / 'budget_summary.json'}" + (f", {plot}" if plot else ""))


if __name__ == "__main__":
    main()
