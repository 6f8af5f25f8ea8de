# Sourced by scripts/test.sh and scripts/demo.sh: create the virtual environment, install torch
# and the build/test tools, and build torchhessdiag (with its compiled extension) into it.
#
#   PYTHON      interpreter to create the venv with (default: python3)
#   VENV        where the venv lives (default: .venv in the checkout)
#   TORCH_SPEC  what to pip-install when the venv has no torch yet (default: torch==2.13.0;
#               e.g. TORCH_SPEC=torch for the newest release, or a CUDA build)
#   MAX_JOBS    parallel compile jobs (default: 2)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
export MAX_JOBS="${MAX_JOBS:-2}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "== installing $TORCH_SPEC"
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
echo "== installing build and test tools"
"$PY" -m pip install -q "setuptools>=64" wheel ninja pytest numpy mpmath matplotlib hypothesis
echo "== building torchhessdiag against torch $("$PY" -c 'import torch; print(torch.__version__)')"
# --no-build-isolation: the extension must be compiled against the torch installed above.
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
