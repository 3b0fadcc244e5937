#!/usr/bin/env bash
# Every committed benchmark result, in one command (resumable: finished grid cells are skipped).
#   bash research/run.sh            # ~5 h on 2 cores for the whole grid (two 1-thread workers share it)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/install.sh
py=.venv/bin/python
$py -m svd_lightning.models smollm2-135m --max-new-tokens 1 > /dev/null   # fetch + convert once
GRID_THREADS=1 $py -m research.grid "$@" &
first=$!
GRID_THREADS=1 $py -m research.grid "$@"
wait "$first"
$py -m research.report && $py -m research.results_page
$py -m benchmarks.cost   # plain vs steered cost, both paths (README, 'Cost')
# open-ended generation needs the demo's run directory (bash scripts/demo.sh)
run=$(ls -d runs/truthfulqa-lora/version_* 2>/dev/null | tail -1 || true)
if [ -n "$run" ]; then $py -m benchmarks.open_generation --run-dir "$run" --limit 163; fi
