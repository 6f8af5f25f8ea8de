"""Kept for the scripts in benchmarks/: the helpers live in the package now
(torchhessdiag/bench/measure.py), so that ``python -m torchhessdiag.bench`` works from an
installed package. See that module for how time and memory are measured."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchhessdiag.bench.measure import *  # noqa: E402,F401,F403
from torchhessdiag.bench.measure import WORKER_TAG  # noqa: E402,F401
