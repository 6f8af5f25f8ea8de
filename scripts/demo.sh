#!/usr/bin/env bash
# The README's "main job" command: set up (venv, torch, build), then train the quick Poisson PINN
# (examples/poisson.py --quick: about a minute on a 2-core CPU). Extra arguments go to the example,
# e.g. `bash scripts/demo.sh --dim 10` or `bash scripts/demo.sh --device cuda`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
echo "== running examples/poisson.py --quick $*"
"$PY" examples/poisson.py --quick "$@"
