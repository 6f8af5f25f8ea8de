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
# Re-runs skip what is already done (measured before: ~80 s before pytest started on every run):
# the tools when their list is unchanged, the build when no input of it changed (a hash of
# setup.py, csrc/ and the torch version). A changed input rebuilds incrementally (ninja, build/).
RUFF_SPEC='ruff==0.17.6'  # the linter (pyproject.toml [tool.ruff]); pinned: new rules come with new versions
CLANG_FORMAT_SPEC='clang-format==19.1.7'  # the C++/CUDA formatter (.clang-format); pinned likewise
TOOLS='"setuptools>=64" wheel ninja pytest numpy mpmath matplotlib hypothesis '"$RUFF_SPEC"
STAMP_DIR="$VENV/.torchhessdiag"
mkdir -p "$STAMP_DIR"
if [ "$(cat "$STAMP_DIR/tools" 2>/dev/null)" != "$TOOLS" ]; then
  echo "== installing build and test tools"
  eval "\"$PY\" -m pip install -q $TOOLS"
  echo "$TOOLS" > "$STAMP_DIR/tools"
else
  echo "== build and test tools: installed"
fi
TORCH_VER="$("$PY" -c 'import torch; print(torch.__version__)')"
BUILD_KEY="$(cat setup.py pyproject.toml $(find csrc -type f | sort) | sha256sum | cut -c1-16) torch $TORCH_VER ${TORCHHESSDIAG_FORCE_CPU:-} ${TORCH_CUDA_ARCH_LIST:-}"
if [ "$(cat "$STAMP_DIR/build" 2>/dev/null)" = "$BUILD_KEY" ] && "$PY" -c "import torchhessdiag._C" >/dev/null 2>&1; then
  echo "== torchhessdiag: built, nothing changed (csrc/, setup.py, torch $TORCH_VER)"
else
  echo "== building torchhessdiag against torch $TORCH_VER"
  # --no-build-isolation: the extension must be compiled against the torch installed above.
  if [ -f "$STAMP_DIR/installed" ]; then  # registered already: rebuild in place, incrementally
    "$PY" setup.py -q build_ext --inplace
  else
    "$PY" -m pip install -q --no-build-isolation --no-deps -e .
    touch "$STAMP_DIR/installed"
  fi
  echo "$BUILD_KEY" > "$STAMP_DIR/build"
fi
