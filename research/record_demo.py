"""Record a finished demo run (`bash scripts/demo.sh`) as ``research/results/demo/``, the results page's demo.

    python -m research.record_demo --run-dir runs/truthfulqa-lora/version_0 \
        --command "bash scripts/demo.sh" --threads "2 torch threads, nothing else running"

Copies the run's ``metrics.json``, ``steering.json``, ``config.yaml``, ``timings.json`` and
``test_per_question.json`` and writes ``run.json``: the test table and paired bootstrap CIs (percent,
read from ``metrics.json``), μ̄ and γ, the stage times, the machine (this one: record on the machine
that ran it) and the commit. ``python -m research.report`` then regenerates ``docs/results.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
from pathlib import Path

from svd_lightning.config import VARIANT_LABELS as VARIANTS
from svd_lightning.metrics import variant_table
from svd_lightning.precision import describe_cpu, fast_precision
from svd_lightning.run import SteeringRun
from svd_lightning.files import atomic_write_text

ROOT = Path(__file__).resolve().parent
COPIED = {"test_per_question.json": "per-question mc1/mc2/... of every variant", "metrics.json": "",
          "steering.json": "", "config.yaml": "", "timings.json": "stage seconds"}
SETTINGS = ("TruthfulQA MC v1, seed 0, 60/20/20 split (490/164/163), instruction + six-shot QA primer, LoRA r=8 "
            "alpha=16, LR 5e-5, 1 epoch, batch 1, strength {strength} {curvature} alpha={alpha:g}, contrastive gamma = "
            "calib multiple-choice-loss minimiser over steering.GAMMA_GRID; scoring in fp32")


def record(run_dir: Path, out: Path, command: str, threads: str, commit: str | None = None) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    test = [h for h in metrics["history"] if h.get("stage") == "test"][-1]
    run = SteeringRun.load(run_dir, check_adapter=False)  # any format, as the package reads it
    timings = json.loads((run_dir / "timings.json").read_text())
    table = {VARIANTS[v]: {n: round(100 * x, 2) for n, x in values.items()}
             for v, values in variant_table(test, "test").items()}
    boot = {k: {**b, **{f: round(100 * b[f], 2) for f in ("mean", "ci_low", "ci_high")}}
            for k, b in test["paired_bootstrap"].items()}
    commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                      cwd=ROOT).stdout.strip()
    precision, why = fast_precision("cpu")
    seconds = timings["seconds"]
    payload = {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "machine": f"{describe_cpu()}; warm start {precision} ({why})",
        "threads": threads,
        "seconds_after_setup": round(timings["total"] - seconds.get("set-up", 0.0)),
        "stage_seconds": {k.replace(" ", "_"): round(v, 1) for k, v in seconds.items() if k != "set-up"},
        "settings": SETTINGS.format(**run.steering.to_dict(), **run.solver.to_dict()),  # the run's own settings
        "mu": run.steering.mu,
        "gamma": run.contrastive_gamma,
        "test_table_percent": table,
        "paired_bootstrap_percent": boot,
        "files": [f"{name} ({why})" if why else name for name, why in COPIED.items()],
    }
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in COPIED:
        shutil.copy2(run_dir / name, out / name)
    atomic_write_text(out / "run.json", json.dumps(payload, indent=1) + "\n")  # in this order: the page's columns
    return payload


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "demo")
    ap.add_argument("--command", default="bash scripts/demo.sh")
    ap.add_argument("--threads", default="2 torch threads, nothing else running")
    ap.add_argument("--commit", help="the commit that ran it (default: this checkout's HEAD)")
    args = ap.parse_args(argv)
    payload = record(args.run_dir, args.out, args.command, args.threads, args.commit)
    print(json.dumps({k: payload[k] for k in ("machine", "seconds_after_setup", "stage_seconds", "mu", "gamma")}, indent=1))


if __name__ == "__main__":
    main()
