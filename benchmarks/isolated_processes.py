"""One method per process, as a user runs it: wall time and page faults per call, with glibc's
default malloc and with its trimming switched off (CPU only).

    python benchmarks/isolated_processes.py --rounds 3 --out benchmarks/results/isolated_cpu

Why: the presets of ``python -m torchhessdiag.bench`` time every method round-robin in one process.
There the heap is kept large by whichever method needs the most memory, so large temporaries are
rarely page-faulted -- but a user's training script runs one method alone, and glibc's malloc then
returns freed memory at the top of the heap to the system after each call (M_TRIM_THRESHOLD; its
dynamic default is twice the largest chunk freed so far, a few MB here) and faults it in again at
the next call. This script runs each (setting, method) in its own fresh process, ``--rounds``
times (methods and environments alternating, so a drift of the machine's speed hits all alike),
and reports per call the median wall time and the median number of minor page faults
(``getrusage``), under two environments:

* ``default``: the process as started;
* ``no-trim``: ``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_`` set (glibc keeps freed
  memory in the process, up to the peak: the process's resident size no longer shrinks between
  calls). jemalloc or tcmalloc (``LD_PRELOAD``) do the same by design.

Settings: ``thd.laplacian`` vs nested autograd on the models preset's modified MLP (d = 2, width
128, N = 4096, float32, inference and training step) and Fourier ResNet (float64, d = 2, inference
and training step); ``thd.mlp_laplacian`` vs nested autograd on a tanh MLP, d = 2, 3 hidden layers of 64,
N = 4096, float32, training step. Every call is the models preset's / the PINN preset's call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

NO_TRIM = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(1 << 25)}

CHILD = r"""
import json, resource, statistics, sys, time, torch
import torchhessdiag as thd
from torchhessdiag.bench import models as M
torch.set_num_threads(int(sys.argv[1]))
setting, method, reps = sys.argv[2], sys.argv[3], int(sys.argv[4])
kind, name, d, dtype, mode = setting.split(":")
d, dtype = int(d), getattr(torch, dtype)
if kind == "model":
    model = M.build_model(name, d, 128, 0).to(dtype)
    x = torch.rand(4096, d, dtype=dtype, generator=torch.Generator().manual_seed(1))
    call = M.build_call(method, model, x, mode)
else:  # the MLP engine, tanh 3 x 64
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(d, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)).to(dtype)
    x = torch.rand(4096, d, dtype=dtype, generator=torch.Generator().manual_seed(1))
    lap = ((lambda: thd.mlp_laplacian(model, x)) if method == "thd"
           else (lambda: M._nested_laplacian(model, x, mode == "train")))
    def call():
        for p in model.parameters():
            p.grad = None
        loss = ((lap() - 1.0) ** 2).mean()
        loss.backward()
        return loss.detach()
for _ in range(3):
    call()
ts, faults = [], []
for _ in range(reps):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    call()
    ts.append(time.perf_counter() - t0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"ms": [t * 1e3 for t in ts], "faults": faults}))
"""

SETTINGS = [
    ("model:modified_mlp:2:float32:inference", ["thd", "nested"]),
    ("model:modified_mlp:2:float32:train", ["thd", "nested"]),
    ("model:fourier_resnet:2:float64:inference", ["thd", "nested"]),
    ("model:fourier_resnet:2:float64:train", ["thd", "nested"]),
    ("engine:tanh_3x64:2:float32:train", ["thd", "nested"]),
]
LABEL = {"thd": "torchhessdiag", "nested": "nested autograd"}


def run_child(setting: str, method: str, env_name: str, threads: int, reps: int) -> dict:
    env = dict(os.environ)
    if env_name == "no-trim":
        env.update(NO_TRIM)
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), setting, method, str(reps)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per (setting, method, environment)")
    p.add_argument("--reps", type=int, default=9, help="timed calls per process, after 3 warm-up calls")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="folder for report.md and results.jsonl")
    a = p.parse_args(argv)
    import torch

    head = (f"CPU, {a.threads} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, "
            f"load average {os.getloadavg()[0]:.2f}; {a.rounds} processes per cell, {a.reps} timed calls each")
    print(head, flush=True)
    rows, records = [], []
    for setting, methods in SETTINGS:
        cell = {}
        for r in range(a.rounds):
            envs = ["default", "no-trim"] if r % 2 == 0 else ["no-trim", "default"]
            for env_name in envs:
                for m in methods if r % 2 == 0 else methods[::-1]:
                    res = run_child(setting, m, env_name, a.threads, a.reps)
                    cell.setdefault((m, env_name), []).append(res)
                    records.append({"setting": setting, "method": m, "env": env_name, "round": r, **res})
        for env_name in ("default", "no-trim"):
            meds = {}
            for m in methods:
                runs = cell[(m, env_name)]
                per_proc = [statistics.median(x["ms"]) for x in runs]
                flt = [statistics.median(x["faults"]) for x in runs]
                meds[m] = statistics.median(per_proc)
                rows.append((setting, env_name, LABEL[m], statistics.median(per_proc), min(per_proc), max(per_proc),
                             statistics.median(flt)))
            rows.append((setting, env_name, "nested / thd", meds["nested"] / meds["thd"], None, None, None))
            print(rows[-3], rows[-2], rows[-1], flush=True)
    lines = ["# One method per process (benchmarks/isolated_processes.py)", "", head, "",
             f"`no-trim`: {' '.join(f'{k}={v}' for k, v in NO_TRIM.items())}. Times: median over the "
             "processes of each process's median call (min-max of those); faults: median minor page "
             "faults per call.", "",
             "| setting (kind:model:d:dtype:mode) | malloc | method | ms | min-max | faults / call |",
             "|---|---|---|---|---|---|"]
    for s, e, m, ms, lo, hi, f in rows:
        if lo is None:
            lines.append(f"| {s} | {e} | **{m}** | **{ms:.2f}x** | | |")
        else:
            lines.append(f"| {s} | {e} | {m} | {ms:.1f} | {lo:.1f}-{hi:.1f} | {f:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "report.md"), "w") as fh:
            fh.write(text)
        with open(os.path.join(a.out, "results.jsonl"), "w") as fh:
            for rec in records:
                fh.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
