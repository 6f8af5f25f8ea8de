#!/usr/bin/env bash
# The benchmark's environment with every peer: a Python >= 3.12 venv (.venv-bench) with the same
# torch as the test venv, jet-for-pytorch (which declares Python >= 3.12, so the 3.11 test venv
# skips it) and torchhessdiag built CPU-only against that torch. Then, for example:
#
#   bash scripts/bench_env.sh
#   .venv-bench/bin/python -m torchhessdiag.bench --preset pinn-tiny
#
#   BENCH_PYTHON  interpreter >= 3.12 to create the venv with (default: python3.12; e.g.
#                 BENCH_PYTHON=/root/.pyenv/versions/3.12.1/bin/python)
#   BENCH_VENV    where the venv lives (default: .venv-bench in the checkout)
#   TORCH_SPEC    the torch to install (default: torch==2.13.0; on PyPI's Linux index that is a
#                 CUDA build of the same version, used here on the CPU only)
#   MAX_JOBS      parallel compile jobs (default: 2)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BENCH_PYTHON="${BENCH_PYTHON:-python3.12}"
BENCH_VENV="${BENCH_VENV:-$ROOT/.venv-bench}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
export MAX_JOBS="${MAX_JOBS:-2}"

if ! command -v "$BENCH_PYTHON" >/dev/null 2>&1; then
  echo "bench_env.sh: no '$BENCH_PYTHON' on PATH. jet-for-pytorch needs Python >= 3.12: install" >&2
  echo "one, or point BENCH_PYTHON at it (e.g. BENCH_PYTHON=/root/.pyenv/versions/3.12.1/bin/python)." >&2
  exit 2
fi
if ! "$BENCH_PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)'; then
  echo "bench_env.sh: $BENCH_PYTHON is Python $("$BENCH_PYTHON" -c 'import platform; print(platform.python_version())');" \
       "jet-for-pytorch needs >= 3.12 (set BENCH_PYTHON)." >&2
  exit 2
fi

if [ ! -x "$BENCH_VENV/bin/python" ]; then
  echo "== creating $BENCH_VENV with $BENCH_PYTHON"
  "$BENCH_PYTHON" -m venv "$BENCH_VENV"
fi
PY="$BENCH_VENV/bin/python"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "== installing $TORCH_SPEC"
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)')"
# the distribution's version (2.13.0), not torch.__version__ (2.13.0+cu130): pip matches the former
TORCH_DIST="$("$PY" -c 'from importlib.metadata import version; print(version("torch"))')"
echo "== installing jet-for-pytorch and the test/bench tools (torch stays $TORCH_VERSION)"
# torch==<installed> as a constraint: nothing below may replace the torch installed above
CONSTRAINT="$(mktemp)"
trap 'rm -f "$CONSTRAINT"' EXIT
echo "torch==${TORCH_DIST}" > "$CONSTRAINT"
"$PY" -m pip install -q -c "$CONSTRAINT" jet-for-pytorch "setuptools>=64" wheel ninja pytest \
  numpy mpmath matplotlib hypothesis
echo "== building torchhessdiag (CPU only) against torch $TORCH_VERSION"
# --no-build-isolation --no-deps: compiled against the torch above, and pip pulls no other torch
TORCHHESSDIAG_FORCE_CPU=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" - <<'EOF'
import platform
from importlib.metadata import version
import torch, torchhessdiag, jet  # noqa: F401
print(f"== ready: Python {platform.python_version()}, torch {torch.__version__}, "
      f"jet-for-pytorch {version('jet-for-pytorch')}, torchhessdiag {torchhessdiag.__version__} "
      f"({torchhessdiag.backend_info()['devices']})")
EOF
