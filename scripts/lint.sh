#!/usr/bin/env bash
# ruff over the Python sources (rules: pyproject.toml [tool.ruff]). Takes seconds and needs neither
# torch nor the build, so CI (.ci/run) runs it first. Uses the venv's ruff -- the version
# scripts/_env.sh pins in RUFF_SPEC and installs with the build and test tools -- and installs that
# version alone into the venv when it is not there yet (a fresh clone). Extra arguments go to ruff.
#
#   PYTHON, VENV  as in scripts/_env.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
RUFF_SPEC="$(sed -n "s/^RUFF_SPEC='\([^']*\)'.*/\1/p" scripts/_env.sh)"
[ -n "$RUFF_SPEC" ] || { echo "lint.sh: no RUFF_SPEC in scripts/_env.sh" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if [ "$("$VENV/bin/ruff" --version 2>/dev/null)" != "ruff ${RUFF_SPEC#ruff==}" ]; then
  echo "== installing $RUFF_SPEC"
  "$VENV/bin/python" -m pip install -q "$RUFF_SPEC"
fi
echo "== ruff check"
"$VENV/bin/ruff" check "$@" .
