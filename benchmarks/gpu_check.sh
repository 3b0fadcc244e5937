#!/usr/bin/env bash
# The GPU check: under 5 minutes on one GPU, self-contained, one JSON at the end.
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default OUT_DIR: $OUT or benchmarks/results)
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh /tmp/x   # a dry run of the script's logic, no GPU
#
# 1. installs this repo into the machine's own Python, keeping its CUDA torch (`--no-deps`; missing
#    dependencies come from the registry if it is reachable, or from wheels in ./.whl);
# 2. runs the tests that take a device (tests/test_device.py, test_one_forward.py: CUDA where present) and
#    the architecture matrix on the device (tests/test_architectures.py, SVD_TEST_DEVICE; fp64 reference on CPU);
# 3. the cost benchmark on the tiny model and on SmolLM2-135M (when it can be had offline or fetched),
#    on the device in the precision it runs fast (bf16 on GPUs that have it);
# 4. `fit` of configs/tiny.yaml with strategy=ddp, devices=1 on the device, and benchmarks/peers.py on that run;
# 5. with at least 2 GPUs (or in the CPU dry run: 2 CPU ranks): `fit` of configs/tiny.yaml sharded,
#    strategy=fsdp2, devices=2, and benchmarks/scale.py's 135M cell on 1 and 2 sharded ranks;
# and writes OUT_DIR/gpu_check.json with each step's status, seconds and results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-benchmarks/results}}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
STEPS=()

step() {  # step NAME TIMEOUT_S COMMAND...: run, log, record status and seconds
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  STEPS+=("$name:$rc:$((SECONDS - start))")
  echo "   rc=$rc in $((SECONDS - start)) s" | tee -a "$LOG"
}

do_install() {
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . || return 1
  if [ -d .whl ]; then "$PY" -m pip install -q --no-index --no-deps .whl/*.whl || return 1; fi
  # Anything still missing: from the registry if reachable (torch is never touched).
  "$PY" - <<'EOF' || "$PY" -m pip install -q jsonargparse[signatures] gguf datasets || true
import importlib
for name in ("lightning", "transformers", "peft", "torchmetrics", "jsonargparse", "gguf", "datasets"):
    importlib.import_module(name)
EOF
  "$PY" -c "import torch, svd_lightning; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
}

export PY
export -f do_install
step install 120 bash -c do_install
if [ "$DEVICE" = cuda ]; then
  step tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_device.py tests/test_one_forward.py
  step matrix 150 env SVD_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_architectures.py \
    -k "steered_scores or calibration_statistics or greedy"
  ACCEL=gpu
else
  step tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_device.py
  ACCEL=cpu
fi
step cost_tiny 120 "$PY" -m benchmarks.cost --model tiny-random --device "$DEVICE" --repeats 5 \
  --out "$OUT_DIR/cost_tiny-random_$DEVICE.json"
if [ "$DEVICE" = cuda ] && "$PY" -c "from svd_lightning.models import smollm2_gguf; smollm2_gguf()" >>"$LOG" 2>&1; then
  step cost_smollm2 150 "$PY" -m benchmarks.cost --model smollm2-135m --device "$DEVICE" --repeats 5 \
    --score-questions 16 --calib-questions 32 --train-steps 32 --out "$OUT_DIR/cost_smollm2-135m_$DEVICE.json"
else
  STEPS+=("cost_smollm2:skipped (SmolLM2 not available offline here, or no GPU):0")
fi
step fit_ddp 90 "$PY" -m svd_lightning.cli fit --config configs/tiny.yaml --trainer.accelerator "$ACCEL" \
  --trainer.strategy ddp --trainer.devices 1 --trainer.default_root_dir "$OUT_DIR/runs/tiny"
# The tools a user would run instead, on the device, on that run (benchmarks/peers.py, scoped).
step peers 150 "$PY" -m benchmarks.peers --run-dir "$OUT_DIR/runs/tiny/version_0" --device "$DEVICE" --limit 4 \
  --steps 4 --repeats 3 --new-tokens 8 --out "$OUT_DIR/peers_tiny_$DEVICE.json"
if [ "$DEVICE" = cuda ]; then
  GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>>"$LOG" || echo 0)
else
  GPUS=2  # the dry run: 2 CPU ranks (gloo)
fi
if [ "${GPUS:-0}" -ge 2 ]; then
  step fit_fsdp2 150 "$PY" -m svd_lightning.cli fit --config configs/tiny.yaml --trainer.accelerator "$ACCEL" \
    --trainer.strategy fsdp2 --trainer.devices 2 --trainer.default_root_dir "$OUT_DIR/runs/tiny-fsdp2"
  step scale_135m 240 "$PY" -m benchmarks.scale --device "$DEVICE" --sizes 135m --ranks 1 2 --steps 2 \
    --results "$OUT_DIR/scale"
else
  STEPS+=("fit_fsdp2:skipped (${GPUS:-0} GPU: sharding needs at least 2):0")
fi

"$PY" - "$OUT_DIR" "${STEPS[@]}" <<'EOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
steps = {}
for entry in sys.argv[2:]:
    name, status, seconds = entry.split(":", 2)
    steps[name] = {"status": status if not status.lstrip("-").isdigit() else ("ok" if status == "0" else f"rc={status}"),
                   "seconds": int(seconds)}
try:
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    versions = {"torch": torch.__version__}
except Exception as err:  # the install step failed
    device, versions = f"unknown ({err})", {}
costs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("cost_*.json"))}
peers = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("peers_*.json"))}
result = {"device": device, "versions": versions, "steps": steps, "cost": costs, "peers": peers}
(out / "gpu_check.json").write_text(json.dumps(result, indent=1))
print(json.dumps({k: v for k, v in result.items() if k not in ("cost", "peers")}, indent=1))
failed = [k for k, v in steps.items() if v["status"].startswith("rc=")]
sys.exit(1 if failed else 0)
EOF
