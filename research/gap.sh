#!/usr/bin/env bash
# The gap experiment (issue 41; docs/results.md): round 1's demo seeds 0-2 and round 2's fresh seeds 10-14 at
# the documented demo regime (instruction + six-shot, LR 5e-5, batch 1, fp32), 2 epochs, both equal-cost
# baselines, the closed γ grid, each model also scored on the other group's unseen test questions
# (results/grid_gap/cross/). Resumable: a finished cell is skipped, an interrupted one resumes from its
# last finished epoch. On 2 cores run two workers, one thread each (they share cells through lock files):
#   bash research/gap.sh & bash research/gap.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
export GRID_THREADS=1 OMP_NUM_THREADS=1
"$py" -m research.grid --only truthfulqa_gap_demo-lora truthfulqa_gap_fresh-lora --out research/results/grid_gap
"$py" -m research.gap_report > /dev/null  # research/results/gap_summary.{md,json}; then `python -m research.results_page`
