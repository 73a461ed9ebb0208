#!/usr/bin/env bash
# Every GPU figure of docs/performance.md in one bounded run (about 10 minutes on one H200):
#
#     bash benchmarks/gpu_all.sh [LOG_DIR]        # default LOG_DIR: gpu-figures/
#
# Each step has its own time limit and the next one runs whatever the last one did, so a step that
# fails or overruns costs only itself; LOG_DIR/log.txt gets everything, LOG_DIR/util.csv the GPU's
# utilisation once a second (nvidia-smi). PYTHON picks the interpreter (default: .venv/bin/python
# when there is one, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${1:-gpu-figures}
LOG=$LOG_DIR/log.txt
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "error: PYTHON=$PY cannot import torch: set PYTHON to the project's interpreter" >&2
  exit 2
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: torch sees no CUDA device; these are GPU figures (benchmarks/gpu.py --quick checks the code paths on the CPU)" >&2
  exit 2
fi
mkdir -p "$LOG_DIR"

step() {  # step LIMIT_SECONDS COMMAND...
  local limit=$1
  shift
  echo "=== [$(date +%T)] $* (limit ${limit} s)" | tee -a "$LOG"
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "=== exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 1000 \
  > "$LOG_DIR/util.csv" 2>&1 &
SMI=$!
trap 'kill $SMI 2>/dev/null' EXIT
"$PY" -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name())" | tee -a "$LOG"

step 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_perf_paths.py -k cuda
step 90 "$PY" benchmarks/training.py --compile none --rounds 3 --devices cuda --ablate
step 120 "$PY" benchmarks/gpu.py --skip-study --rounds 2
step 330 "$PY" benchmarks/gpu.py --skip-bare --trials 20 --workers 8 16 --packs 8 --settings workers pack both
echo "=== [$(date +%T)] done; CUDA graphs in the seed study (slow: compiling): benchmarks/gpu.py --skip-bare --settings graphs" \
  | tee -a "$LOG"
