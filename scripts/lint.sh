#!/usr/bin/env bash
# ruff over the Python sources (rules: pyproject.toml [tool.ruff]) and clang-format over csrc/
# (.clang-format), as checks. Takes seconds and needs neither torch nor the build, so CI (.ci/run)
# runs it first. Uses the venv's ruff -- the version
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
# csrc/: clang-format (.clang-format), the pinned version, as a check (no file is changed here;
# `clang-format -i` on the files it names fixes them)
CLANG_FORMAT_SPEC="$(sed -n "s/^CLANG_FORMAT_SPEC='\([^']*\)'.*/\1/p" scripts/_env.sh)"
[ -n "$CLANG_FORMAT_SPEC" ] || { echo "lint.sh: no CLANG_FORMAT_SPEC in scripts/_env.sh" >&2; exit 1; }
if ! "$VENV/bin/clang-format" --version 2>/dev/null | grep -q "version ${CLANG_FORMAT_SPEC#clang-format==}"; then
  echo "== installing $CLANG_FORMAT_SPEC"
  "$VENV/bin/python" -m pip install -q "$CLANG_FORMAT_SPEC"
fi
echo "== clang-format --dry-run --Werror (csrc/)"
git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 'csrc/*.inc' | xargs "$VENV/bin/clang-format" --dry-run --Werror
