#!/usr/bin/env bash
# Set up (venv, torch, build) and run the short demo: the README's "main job" command.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
echo "== running examples/demo.py"
"$PY" examples/demo.py "$@"
