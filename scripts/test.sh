#!/usr/bin/env bash
# Set up (venv, torch, build) and run the whole test suite. This is the README's test command and
# exactly what CI runs. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
echo "== running the test suite"
set +e
"$PY" -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here, not a pass" >&2
  exit 1
fi
exit "$rc"
