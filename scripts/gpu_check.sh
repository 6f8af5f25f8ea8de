#!/usr/bin/env bash
# GPU evidence in one go, for a machine with a GPU, nvcc and a CUDA torch already installed
# (e.g. the H100/H200 machines: torch 2.11+cu130, no network). Everything it finds is written to
# $OUT (default ./gpu_out): build log, test logs, compute-sanitizer reports, benchmark records.
#
#   STEPS   which steps to run, space separated (default: "build test sanitize bench")
#   OUT     where the logs go
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
STEPS="${STEPS:-build test sanitize bench}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
PY="${PY:-python3}"
has() { [[ " $STEPS " == *" $1 "* ]]; }
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 ))s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
if has build; then
  stamp build
  $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
fi
# libstdc++ number formatting must come from libstdc++.so, not from a private copy in _C (a
# private copy crashed error-message formatting on such a machine; see csrc/jet_ops_impl.h)
echo "private ostream code in _C: $(nm -C --defined-only torchhessdiag/_C*.so | grep -c '_M_insert<') symbols" | tee -a "$OUT/gpu.txt"
$PY -c "import torch, torchhessdiag as t; print(torch.__version__, torch.cuda.get_device_name(), t.backend_info())" | tee -a "$OUT/gpu.txt"
if has test; then
  TEST_K="${TEST_K-cuda}"
  stamp "test suite (-k '${TEST_K}')"
  timeout ${TEST_TIMEOUT:-300} $PY -m pytest -q -p no:cacheprovider -n 8 ${TEST_K:+-k "$TEST_K"} ${TEST_ARGS:-} tests > "$OUT/test_cuda.log" 2>&1
  echo "pytest rc=$?"; tail -25 "$OUT/test_cuda.log"
fi
if has sanitize; then
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck}; do
    stamp "compute-sanitizer $tool"
    timeout ${SANITIZE_TIMEOUT:-120} compute-sanitizer --tool $tool --error-exitcode 99 --print-limit 20 \
      $PY -m pytest -q -x -p no:cacheprovider -k cuda ${SANITIZE_TESTS:-tests/test_engine_ops.py tests/test_layer_op.py} \
      > "$OUT/sanitize_$tool.log" 2>&1
    echo "$tool rc=$?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitize_$tool.log" | tail -3
  done
fi
if has bench; then
  stamp bench
  timeout ${BENCH_TIMEOUT:-240} ${BENCH_CMD:-$PY -m torchhessdiag.bench --preset gpu --out $OUT/bench --resume --max-minutes 3 --no-progress} > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; tail -60 "$OUT/bench.log"
fi
stamp done
