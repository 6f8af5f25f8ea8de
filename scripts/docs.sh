#!/usr/bin/env bash
# Build the documentation site (mkdocs.yml: the pages of docs/; README.md, the front page, stays outside it) with
# `mkdocs build --strict`: a broken link or anchor, a page missing from the nav, or a docstring
# warning of the API reference fails the build. Needs neither torch nor the compiled extension
# (mkdocstrings reads the docstrings by static analysis), so CI (.ci/run) runs it right after
# lint.sh. Installs the pinned tools below into the venv when they are not there yet.
#
#   PYTHON, VENV  as in scripts/_env.sh
#   SITE_DIR      where the site goes (default: site/ in the checkout, ignored by git)
# Extra arguments go to mkdocs build (e.g. --quiet).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
SITE_DIR="${SITE_DIR:-$ROOT/site}"
# The docs tools, pinned (the one place their versions are written): a new version may warn about
# more, and --strict turns every warning into a failure.
DOCS_SPEC='mkdocs==1.6.1 mkdocs-material==9.8.2 mkdocstrings==1.0.8 mkdocstrings-python==2.0.11 griffelib==2.4.1'
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
STAMP_DIR="$VENV/.torchhessdiag"
mkdir -p "$STAMP_DIR"
if [ "$(cat "$STAMP_DIR/docs" 2>/dev/null)" != "$DOCS_SPEC" ] || [ ! -x "$VENV/bin/mkdocs" ]; then
  echo "== installing the docs tools: $DOCS_SPEC"
  # shellcheck disable=SC2086  # one word per package
  "$VENV/bin/python" -m pip install -q $DOCS_SPEC
  echo "$DOCS_SPEC" > "$STAMP_DIR/docs"
fi
echo "== mkdocs build --strict (site: $SITE_DIR)"
NO_MKDOCS_2_WARNING=1 "$VENV/bin/mkdocs" build --strict --site-dir "$SITE_DIR" "$@"
