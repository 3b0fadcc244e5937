#!/usr/bin/env bash
# Evidence round 2 (docs/results.md), resumable: every finished cell is one file and is skipped when
# rerun. Two workers share the cells through lock files -- on 2 cores run two, one thread each:
#   bash research/round2.sh & bash research/round2.sh
# Fresh-question demo regime, then seeds 10-11 of the commonsense demo-like regime, the zero-shot
# TruthfulQA equal-cost cells, the commonsense seed 12, and round 1's one-seed IA3 and prompt-tuning
# cells with both baselines last (the order in which a cut costs least). Then the γ grid closed by its
# limits: the fresh seeds trained again to epoch 1, keeping each point's adapter, then scored.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
export GRID_THREADS=1 OMP_NUM_THREADS=1
commonsense=(arc_easy_demo-lora arc_challenge_demo-lora boolq_demo-lora)
"$py" -m research.grid --only truthfulqa_fresh-lora --seeds 10 11 12 13 14 --out research/results/grid_fresh
"$py" -m research.grid --only "${commonsense[@]}" --seeds 10 11 --out research/results/grid_round2
"$py" -m research.grid --only truthfulqa_equal_cost-lora --seeds 0 1 --out research/results/grid_round2
"$py" -m research.grid --only "${commonsense[@]}" --seeds 12 --out research/results/grid_round2
"$py" -m research.grid --only truthfulqa_equal_cost-ia3 truthfulqa_equal_cost-prompt_tuning --seeds 0 --out research/results/grid_round2
"$py" -m research.grid --only truthfulqa_fresh_closed-lora --train-only --out research/results/grid_closed
"$py" -m research.grid --only truthfulqa_fresh_closed-lora --score-saved --labels 1 0.5 0.25 --out research/results/grid_closed
