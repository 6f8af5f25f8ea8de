#!/usr/bin/env bash
# Prove that the CUDA kernels compile and link, on a machine with nvcc but no GPU: build the
# extension with TORCHHESSDIAG_FORCE_CUDA=1 against a CUDA build of torch in a separate venv,
# check that the result loads and registers CUDA kernels, then run the test suite on the CPU
# against that build (so the CUDA-enabled library is also exercised on a CPU-only machine).
#
#   CUDA_TORCH_SPEC  the CUDA torch to build against (default: torch==2.14.1)
#   CUDA_VENV        its venv (default: .venv-cuda)
#   TORCH_CUDA_ARCH_LIST  default here 7.5;9.0+PTX: the oldest and the newest target of
#                         setup.py's default list (7.5;8.0;8.6;8.9;9.0+PTX with nvcc 13), which
#                         costs 1.8x the nvcc CPU time (DEVELOPERS.md, "Compile time") on every
#                         CI run for no code path of its own: the kernels have no per-architecture
#                         code. TORCH_CUDA_ARCH_LIST= (empty) builds setup.py's default.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
CUDA_VENV="${CUDA_VENV:-$ROOT/.venv-cuda}"
CUDA_TORCH_SPEC="${CUDA_TORCH_SPEC:-torch==2.14.1}"
export MAX_JOBS="${MAX_JOBS:-2}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST-7.5;9.0+PTX}"

if ! command -v nvcc >/dev/null 2>&1; then
  echo "check_cuda_build: nvcc not found on PATH; cannot prove the CUDA build" >&2
  exit 1
fi
if [ ! -x "$CUDA_VENV/bin/python" ]; then
  "$PYTHON" -m venv "$CUDA_VENV"
fi
PY="$CUDA_VENV/bin/python"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" >/dev/null 2>&1; then
  echo "== installing $CUDA_TORCH_SPEC (CUDA build) into $CUDA_VENV"
  "$PY" -m pip install -q "$CUDA_TORCH_SPEC"
fi
"$PY" -m pip install -q "setuptools>=64" wheel ninja pytest numpy mpmath matplotlib hypothesis

STAGE="$ROOT/.build-cuda"
rm -rf "$STAGE"
mkdir -p "$STAGE/src"
# Build from a copy so the CPU build in the checkout (another torch) is left alone.
cp -r setup.py pyproject.toml README.md docs csrc torchhessdiag tests examples scripts "$STAGE/src/"
find "$STAGE/src" -name "*.so" -delete
echo "== compiling the CUDA kernels (nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), torch $("$PY" -c 'import torch; print(torch.__version__)'), TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<setup.py default>}, MAX_JOBS=$MAX_JOBS)"
t0=$(date +%s)
(cd "$STAGE/src" && TORCHHESSDIAG_FORCE_CUDA=1 "$PY" setup.py -q build_ext --inplace)
echo "== compiled in $(( $(date +%s) - t0 )) s"

echo "== loading the CUDA-enabled extension"
(cd "$STAGE/src" && "$PY" - <<'PY'
import torch
import torchhessdiag as thd
info = thd.backend_info()
assert info["compiled"], info["load_error"]
assert info["cuda_kernels"], "extension was built without the CUDA kernels"
for op in ("act_derivatives", "act_grad", "mul_pair", "mul_pair_backward", "jet_layer",
           "jet_layer_", "jet_layer_backward", "taylor_act", "taylor_act_backward"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"torchhessdiag::{op}", "CUDA"), op
    # the fallback of a GPU without a kernel image (csrc/cuda_gate.h)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        f"torchhessdiag_ref::{op}", "CompositeExplicitAutograd"), op
# the fused MLP op (csrc/cuda/mlp_ops.cu); on a GPU without a kernel image the engine does not
# pick it (fused.available asks the probe), so it has no torchhessdiag_ref twin
for op in ("mlp_jet", "mlp_jet_backward"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"torchhessdiag::{op}", "CUDA"), op
assert "sm_" in info["cuda_archs"], info["cuda_archs"]
print("CUDA kernels registered:", info["devices"], "for", info["cuda_archs"], "torch", torch.__version__)
PY
)
echo "== test suite on the CPU against the CUDA-enabled build"
set +e
(cd "$STAGE/src" && "$PY" -m pytest -q -p no:cacheprovider tests)
rc=$?
set -e
[ "$rc" -eq 5 ] && { echo "no tests collected" >&2; exit 1; }
exit "$rc"
