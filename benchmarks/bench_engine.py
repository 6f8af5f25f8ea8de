"""The engine benchmark: a thin entry point to ``python -m torchhessdiag.bench``.

The implementation lives in the package (torchhessdiag/bench/) so that the same command works
for a user who pip-installed torchhessdiag. Every option is the same; e.g.

    python benchmarks/bench_engine.py --quick                     # ~1 minute on 2 CPU cores
    python benchmarks/bench_engine.py --preset cpu                # the README's CPU setting
    python benchmarks/bench_engine.py --preset taylor             # the Taylor-mode paper's setting
    python benchmarks/bench_engine.py --preset gpu --out DIR --resume --max-minutes 8
    python benchmarks/bench_engine.py --device cuda --json out.json   # as scripts/gpu_check.sh

The version of this script that produced benchmarks/results/cuda_h100_partial/ is in git
history (commit 39981ff).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchhessdiag.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
