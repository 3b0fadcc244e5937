#!/usr/bin/env bash
# Create .venv and install svd-lightning with the exact CPU pins of constraints.txt (torch 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,lm-eval]"
.venv/bin/python -c "import torch, lightning, peft, transformers; print('installed: torch', torch.__version__, '| lightning', lightning.__version__, '| peft', peft.__version__, '| transformers', transformers.__version__)"
