"""Tables, paired bootstrap CIs and plots from the grid's cell files (``benchmarks/grid.py``).

    python benchmarks/report.py            # reads results/grid/*.json, writes results/grid_summary.{json,md} + PNGs

Every choice is made on the calibration split of the same seed (strength option, policy, α, fixed μ,
contrastive γ); the test split only reports. CIs: paired bootstrap over test questions (the same
resampled questions for every seed), the statistic is the seed-averaged mean difference.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from svd_lightning.artifacts import atomic_write_text

ROOT = Path(__file__).resolve().parent
BOOTSTRAP = 2000
DEFAULT = "svd_a0.3_mask_generation_only_trimmed_fisher"  # the configs' default, chosen on calib
EXACT = "svd_a0.1_mask_generation_only_exact"
PAPER = "svd_a0.1_floor_mean_identity"  # the paper's recipe in teacher-forced scoring (mask, mean μ*)


def load(grid_dir: Path) -> tuple[dict, dict]:
    """``(cells, plus_one)``: (task, adapter, epoch) -> seed -> payload, for fully scored epochs and for
    the extra epochs scored plain only (the "+1 epoch" baseline of a cell's last epoch)."""
    cells, plus_one = defaultdict(dict), defaultdict(dict)
    for path in sorted(grid_dir.glob("*.json")):
        d = json.loads(path.read_text())
        (plus_one if d.get("baseline_only") else cells)[(d["task"], d["adapter"], d["epoch"])][d["seed"]] = d
    return cells, plus_one


def select(d: dict, prefix: str, metric: str) -> str:
    """The variant with the best calib ``metric`` among those starting with ``prefix`` (ties: first by name)."""
    names = sorted(v for v in d["calib"] if v.startswith(prefix))
    return max(names, key=lambda v: d["calib"][v][metric])


def paired_ci(a: list[np.ndarray], b: list[np.ndarray], rng: np.random.Generator) -> tuple[float, float, float]:
    """Seed-averaged mean of a − b over questions, with a 95% paired bootstrap interval."""
    d = np.stack([x - y for x, y in zip(a, b)])  # [seeds, questions]
    n = d.shape[1]
    idx = rng.integers(0, n, size=(BOOTSTRAP, n))
    boot = d[:, idx].mean(axis=2).mean(axis=0)
    return float(d.mean()), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def methods_for(cells: dict, key: tuple, metric: str, plus_one: dict | None = None) -> dict[str, list[tuple[str, dict, dict]]]:
    """method name -> per seed (variant chosen, payload holding it, payload of epoch e) for one (task, adapter, epoch)."""
    task, adapter, epoch = key
    seeds = cells[key]
    later = (task, adapter, epoch + 1)
    nxt = {**(plus_one or {}).get(later, {}), **cells.get(later, {})}
    out = defaultdict(list)
    for seed, d in sorted(seeds.items()):
        out["pre-trained"].append(("base", d, d))
        out["warm start"].append(("plain", d, d))
        out["SVDecode (default: trimmed Fisher, α=0.3)"].append((DEFAULT, d, d))
        out["SVDecode (exact, α=0.1)"].append((EXACT, d, d))
        out["SVDecode (paper: mean μ*, mask)"].append((PAPER, d, d))
        out["SVDecode (selected on calib)"].append((select(d, "svd_", metric), d, d))
        out["mask only, μ=0 (α=0.1)"].append(("maskonly_a0.1", d, d))
        out["fixed μ (selected on calib)"].append((select(d, "fixed_", metric), d, d))
        out["contrastive γ (selected on calib)"].append((select(d, "contrastive_", metric), d, d))
        if seed in nxt:
            out["warm start +1 epoch"].append(("plain", nxt[seed], d))
    return out


def summarise(cells: dict, rng, plus_one: dict | None = None) -> list[dict]:
    rows = []
    for key in sorted(cells):
        task, adapter, epoch = key
        seeds = cells[key]
        metric = next(iter(seeds.values()))["primary"]
        methods = methods_for(cells, key, metric, plus_one)
        for name, picks in methods.items():
            if name == "warm start +1 epoch" and len(picks) != len(seeds):
                continue
            values = [np.array(src["test_per_question"][v]) for v, src, _ in picks]
            base_for_pair = [np.array(d["test_per_question"]["plain"]) for _, _, d in picks]
            mean, lo, hi = paired_ci(values, base_for_pair, rng)
            row = {
                "task": task, "adapter": adapter, "epoch": epoch, "method": name, "metric": metric,
                "seeds": len(picks), "questions": len(values[0]),
                "test": float(np.mean([v.mean() for v in values])),
                "calib": float(np.mean([src["calib"][v][metric] for v, src, _ in picks])),
                "gain_vs_warm": mean, "ci_low": lo, "ci_high": hi,
                "variants": sorted({v for v, _, _ in picks}),
                "mu": [_mu_of(src, v) for v, src, _ in picks] if all(v.startswith("svd_") for v, _, _ in picks) else None,
            }
            if task == "truthfulqa":
                row["test_mc1"] = float(np.mean([np.mean(src["test_per_question_mc1"][v]) for v, src, _ in picks]))
            rows.append(row)
    return rows


def ablation(cells: dict, task: str, adapter: str, rng) -> list[dict]:
    """Every SVDecode variant (strength × curvature × policy × α) per epoch: calib and test, gain vs warm."""
    out = []
    for (t, a, epoch), seeds in sorted(cells.items()):
        if (t, a) != (task, adapter):
            continue
        ds = [seeds[s] for s in sorted(seeds)]
        metric = ds[0]["primary"]
        warm = [np.array(d["test_per_question"]["plain"]) for d in ds]
        warm_calib = float(np.mean([d["calib"]["plain"][metric] for d in ds]))
        for v in sorted(ds[0]["test"]):
            if not v.startswith("svd_"):
                continue
            mean, lo, hi = paired_ci([np.array(d["test_per_question"][v]) for d in ds], warm, rng)
            out.append({
                "task": task, "adapter": adapter, "epoch": epoch, "variant": v, "seeds": len(ds),
                "calib_gain": float(np.mean([d["calib"][v][metric] for d in ds])) - warm_calib,
                "test_gain": mean, "ci_low": lo, "ci_high": hi,
                "mu": float(np.mean([_mu_of(d, v) for d in ds])),
            })
    return out


def recommend(abl: list[dict]) -> dict:
    """The SVDecode variant with the best calibration gain averaged over every epoch (test not used)."""
    by = defaultdict(list)
    for r in abl:
        by[r["variant"]].append(r)
    best = max(sorted(by), key=lambda v: np.mean([r["calib_gain"] for r in by[v]]))
    rows = sorted(by[best], key=lambda r: r["epoch"])
    return {"variant": best, "mean_calib_gain": float(np.mean([r["calib_gain"] for r in rows])),
            "per_epoch": [{k: r[k] for k in ("epoch", "calib_gain", "test_gain", "ci_low", "ci_high", "mu")} for r in rows]}


def ranking(cells: dict, tasks: list[str], rng, adapter: str = "lora") -> list[dict]:
    """Every SVDecode variant ranked by its calibration gain averaged over tasks, epochs and seeds.

    Per task, the test gain pools every (epoch, seed) as a paired replicate of the same test questions.
    """
    per_task = {}
    for task in tasks:
        ds = [d for (t, a, _), seeds in sorted(cells.items()) if (t, a) == (task, adapter) for _, d in sorted(seeds.items())]
        if ds:
            per_task[task] = ds
    if not per_task:
        return []
    variants = sorted(set.intersection(*(set(v for v in ds[0]["test"] if v.startswith("svd_")) for ds in per_task.values())))
    out = []
    for v in variants:
        row = {"variant": v, "tasks": {}}
        for task, ds in per_task.items():
            metric = ds[0]["primary"]
            mean, lo, hi = paired_ci([np.array(d["test_per_question"][v]) for d in ds],
                                     [np.array(d["test_per_question"]["plain"]) for d in ds], rng)
            calib = float(np.mean([d["calib"][v][metric] - d["calib"]["plain"][metric] for d in ds]))
            row["tasks"][task] = {"calib_gain": calib, "test_gain": mean, "ci_low": lo, "ci_high": hi, "replicates": len(ds)}
        row["calib_gain"] = float(np.mean([r["calib_gain"] for r in row["tasks"].values()]))
        row["test_gain"] = float(np.mean([r["test_gain"] for r in row["tasks"].values()]))
        out.append(row)
    return sorted(out, key=lambda r: -r["calib_gain"])


def _mu_of(d: dict, variant: str) -> float:
    _, alpha, *rest = variant.split("_")
    alpha = alpha[1:]
    policy_and_strength = "_".join(rest)
    for pol in ("mask_generation_only_", "floor_", "none_"):
        if policy_and_strength.startswith(pol):
            return d["mu"][alpha][policy_and_strength[len(pol):]]
    raise KeyError(variant)


def pct(x: float) -> str:
    return f"{100 * x:+.2f}"


HEADLINE = {  # column -> method name in the rows
    "SVDecode default": "SVDecode (default: trimmed Fisher, α=0.3)",
    "`exact` α=0.1": "SVDecode (exact, α=0.1)",
    "paper recipe": "SVDecode (paper: mean μ*, mask)",
    "SVDecode, calib-selected": "SVDecode (selected on calib)",
    "warm +1 epoch": "warm start +1 epoch",
    "contrastive γ (calib)": "contrastive γ (selected on calib)",
    "fixed μ (calib)": "fixed μ (selected on calib)",
}


def headline(by: dict) -> list[str]:
    """One line per (task, adapter, epoch): warm start and every method's gain [95% CI]."""
    lines = ["## Headline: gain vs warm start, points [95% paired bootstrap CI]", "",
             "| task · adapter · epoch | seeds | test items | warm start | " + " | ".join(HEADLINE) + " |",
             "|---|---:|---:|---:|" + "---|" * len(HEADLINE)]
    for (task, adapter, epoch), rs in sorted(by.items()):
        m = {r["method"]: r for r in rs}
        cell = lambda r: "(not run)" if r is None else f"{pct(r['gain_vs_warm'])} [{pct(r['ci_low'])}, {pct(r['ci_high'])}]"  # noqa: E731
        warm = m["warm start"]
        lines.append(f"| {task} · {adapter} · {epoch} | {warm['seeds']} | {warm['questions']} | {100 * warm['test']:.2f} | "
                     + " | ".join(cell(m.get(name)) for name in HEADLINE.values()) + " |")
    return lines + [""]


def markdown(rows: list[dict], abl: dict, perf: dict, rec: dict | None = None, rankings: dict | None = None) -> str:
    lines = ["# SVDecode benchmark grid (SmolLM2-135M, generated by `benchmarks/report.py`)", ""]
    lines += [
        "Numbers are percentages, averaged over seeds; `gain` is the paired difference to the warm start",
        "of the same seed with a 95% paired bootstrap CI over test questions. Every selection uses the",
        "calibration split only. Metric: TruthfulQA MC2 (standard) with MC1 beside it; commonsense sets: accuracy.",
        "",
    ]
    by = defaultdict(list)
    for r in rows:
        by[(r["task"], r["adapter"], r["epoch"])].append(r)
    lines += headline(by)
    for (task, adapter, epoch), rs in sorted(by.items()):
        r0 = rs[0]
        lines += [f"## {task} · {adapter} · epoch {epoch} ({r0['seeds']} seeds, {r0['questions']} test questions)", ""]
        mc1 = task == "truthfulqa"
        lines.append(f"| method | test {r0['metric']} |" + (" test mc1 |" if mc1 else "") + " gain vs warm [95% CI] | calib | chosen |")
        lines.append("|---|---:|" + ("---:|" if mc1 else "") + "---|---:|---|")
        for r in rs:
            chosen = ", ".join(r["variants"]) if len(r["variants"]) <= 3 else f"{len(r['variants'])} different"
            if r["mu"]:
                chosen += " (μ̄ " + ", ".join(f"{m:+.3g}" for m in r["mu"]) + ")"
            lines.append(
                f"| {r['method']} | {100 * r['test']:.2f} |" + (f" {100 * r['test_mc1']:.2f} |" if mc1 else "")
                + f" {pct(r['gain_vs_warm'])} [{pct(r['ci_low'])}, {pct(r['ci_high'])}] | {100 * r['calib']:.2f} | {chosen} |"
            )
        lines.append("")
    if rec:
        lines += ["## Default chosen on calibration evidence (truthfulqa · lora, all epochs and seeds)", "",
                  f"`{rec['variant']}`: mean calib gain {pct(rec['mean_calib_gain'])}; on test, per epoch: "
                  + "; ".join(f"epoch {r['epoch']}: {pct(r['test_gain'])} [{pct(r['ci_low'])}, {pct(r['ci_high'])}] (μ {r['mu']:+.3g})"
                              for r in rec["per_epoch"]), ""]
    for title, rank_ in (rankings or {}).items():
        if not rank_:
            continue
        tasks = list(rank_[0]["tasks"])
        lines += [f"## Best three and worst three SVDecode variants by calibration gain ({title})", "",
                  "Ranked by calib gain averaged over tasks, epochs and seeds (test not used). Test gain per task pools",
                  "every (epoch, seed) as a paired replicate; [95% paired bootstrap CI].", "",
                  "| rank | variant | calib gain | " + " | ".join(f"{t} test gain" for t in tasks) + " |",
                  "|---:|---|---:|" + "---|" * len(tasks)]
        tags = {DEFAULT: " (default)", EXACT: " (exact)", PAPER: " (paper)"}
        shown = [(i, r) for i, r in enumerate(rank_) if i < 3 or i >= len(rank_) - 3 or r["variant"] in tags]
        for i, r in shown:
            cells_ = " | ".join(f"{pct(x['test_gain'])} [{pct(x['ci_low'])}, {pct(x['ci_high'])}]" for x in r["tasks"].values())
            lines.append(f"| {i + 1} | `{r['variant']}`{tags.get(r['variant'], '')} | {pct(r['calib_gain'])} | {cells_} |")
        lines.append("")
    for (task, adapter), rows_ in sorted(abl.items()):
        lines += [f"## Ablation: every SVDecode variant ({task} · {adapter})", "",
                  "| epoch | variant | mean μ | calib gain | test gain [95% CI] |", "|---:|---|---:|---:|---|"]
        for r in sorted(rows_, key=lambda r: (r["epoch"], -r["calib_gain"])):
            lines.append(f"| {r['epoch']} | {r['variant']} | {r['mu']:+.3g} | {pct(r['calib_gain'])} | "
                         f"{pct(r['test_gain'])} [{pct(r['ci_low'])}, {pct(r['ci_high'])}] |")
        lines.append("")
    if perf:
        lines += ["## Cost (seconds, from the same cells)", "", "| task · adapter | warm-start epoch | calibration | calibration / epoch |",
                  "|---|---:|---:|---:|"]
        for k, v in sorted(perf.items()):
            lines.append(f"| {k} | {v['train_epoch']:.1f} | {v['calibration']:.1f} | {v['ratio']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot_gain_vs_mu(cells: dict, out: Path, task: str = "truthfulqa", adapter: str = "lora") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for (t, a, epoch), seeds in sorted(cells.items()):
        if (t, a) != (task, adapter) or epoch > 3:
            continue
        ds = [seeds[s] for s in sorted(seeds)]
        metric = ds[0]["primary"]
        warm = np.mean([d["test"]["plain"][metric] for d in ds])
        fixed = sorted((float(v.rsplit("mu", 1)[1]), v) for v in ds[0]["test"] if v.startswith("fixed_"))
        xs = [m for m, _ in fixed] + [0.0]
        ys = [np.mean([d["test"][v][metric] for d in ds]) - warm for _, v in fixed] + [0.0]
        order = np.argsort(xs)
        calib_warm = np.mean([d["calib"]["plain"][metric] for d in ds])
        cs = [np.mean([d["calib"][v][metric] for d in ds]) - calib_warm for _, v in fixed] + [0.0]
        fig, ax = plt.subplots(figsize=(7.5, 4))
        ax.plot(np.array(xs)[order], 100 * np.array(ys)[order], "o-", color="0.3", label="fixed μ, test (α=0.1, mask_generation_only)")
        ax.plot(np.array(xs)[order], 100 * np.array(cs)[order], "o--", color="0.65", label="fixed μ, calib")
        for name, marker in (("exact", "*"), ("mean_identity", "s"), ("median_identity", "^"), ("pooled_fisher", "D"), ("trimmed_identity", "v")):
            v = f"svd_a0.1_mask_generation_only_{name}"
            mu = [d["mu"]["0.1"][name] for d in ds]
            gain = [d["test"][v][metric] - d["test"]["plain"][metric] for d in ds]
            ax.scatter(mu, 100 * np.array(gain), marker=marker, s=60, label=f"solved: {name}", zorder=3)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("symlog", linthresh=0.1)
        ticks = [-5, -2, -1, -0.5, -0.2, 0, 0.2, 0.5, 1, 2, 5]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlabel("steering strength μ")
        ax.set_ylabel(f"{metric} − warm start (points)")
        ax.set_title(f"SmolLM2-135M {adapter} on {task}, epoch {epoch}: test gain vs μ ({len(ds)} seeds)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"gain_vs_mu_{task}_{adapter}_epoch{epoch}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def cost(cells: dict) -> dict:
    out = {}
    for (task, adapter, epoch), seeds in cells.items():
        if epoch != 1:
            continue
        tr = np.mean([d["seconds"]["train_epoch"] for d in seeds.values()])
        ca = np.mean([d["seconds"]["calibration"] for d in seeds.values()])
        out[f"{task} · {adapter} ({next(iter(seeds.values()))['sizes']['train']} train / "
            f"{next(iter(seeds.values()))['sizes']['calib']} calib questions)"] = {"train_epoch": tr, "calibration": ca, "ratio": ca / tr}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default=str(ROOT / "results" / "grid"))
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    cells, plus_one = load(Path(args.grid))
    if not cells:
        raise SystemExit(f"no cell files in {args.grid}; run benchmarks/grid.py first")
    rng = np.random.default_rng(0)
    rows = summarise(cells, rng, plus_one)
    tasks = sorted({t for t, a, e in cells if a == "lora" and (t, a, 2) in cells})  # the 3-epoch ablation rows
    abl = {(t, "lora"): ablation(cells, t, "lora", rng) for t in tasks}
    perf = cost(cells)
    rec = recommend(abl[("truthfulqa", "lora")]) if ("truthfulqa", "lora") in abl else None
    commonsense = sorted({t for t, a, e in cells if a == "lora" and t != "truthfulqa"})
    rankings = {
        "LoRA; the 3-epoch ablation: " + ", ".join(tasks): ranking(cells, tasks, rng),
        "LoRA; every commonsense set: " + ", ".join(commonsense): ranking(cells, commonsense, rng),
    }
    out = Path(args.out)
    summary = {"rows": rows, "ablation": [r for rs in abl.values() for r in rs], "cost": perf,
               "recommended": rec, "rankings": rankings}
    atomic_write_text(out / "grid_summary.json", json.dumps(summary, indent=1))
    md = markdown(rows, abl, perf, rec, rankings)
    atomic_write_text(out / "grid_summary.md", md)
    plots = [p for t in tasks for p in plot_gain_vs_mu(cells, out, t)]
    print(md.split("## Ablation")[0])
    print(f"wrote {out / 'grid_summary.md'}, {out / 'grid_summary.json'} and {len(plots)} plot(s)")


if __name__ == "__main__":
    main()
