"""Before vs after a change, same run, interleaved: the library's MLP entry points at the ``cpu``
preset's settings (tanh, 4 hidden layers of 256, N = 4096, float32, d in {8, 32, 100}), timed in
fresh processes that alternate between two source trees, each with its own compiled extension.

    python benchmarks/before_after.py --before /path/to/old/checkout --after . --rounds 3

Both trees must be built in place (``python setup.py build_ext --inplace``). Each round runs one
process per tree (the order alternates between rounds, so a drift of the machine's speed hits both
alike); each process times every case ``--reps`` times after one warm-up call. Reported per case:
the median over all of a tree's timed calls, min-max, and after/before (< 1: after is faster).
Only the public API is called, so any two versions of the library can be compared.

Cases: ``mlp_hessian_diag``, ``mlp_laplacian``, ``mlp_derivatives`` and ``laplacian`` (the general
dispatch, here on the MLP engine) in inference (no_grad); ``mlp_laplacian`` and ``laplacian`` as a
training step (mean squared Laplacian, backward to the weights); nested autograd through the
``thd.nn`` drop-ins (Laplacian by one ``grad(create_graph=True)`` and one backward per input) in
inference and training, at d = 8 only (d backward passes: minutes at d = 100 on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time, torch
import torchhessdiag as thd
torch.set_num_threads(int(sys.argv[1]))
reps, ds = int(sys.argv[2]), [int(v) for v in sys.argv[3].split(",")]
N, width, depth = 4096, 256, 4
out = {}

def model(d, seed=0):
    torch.manual_seed(seed)
    layers, w_in = [], d
    for _ in range(depth):
        layers += [torch.nn.Linear(w_in, width), torch.nn.Tanh()]
        w_in = width
    return torch.nn.Sequential(*layers, torch.nn.Linear(w_in, 1))

def nested_lap(m, x, create):
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
    lap = 0
    for i in range(x.shape[1]):
        (h,) = torch.autograd.grad(g[:, i].sum(), x, create_graph=create, retain_graph=True)
        lap = lap + h[:, i]
    return lap

def timed(name, fn):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    out[name] = ts

def train(m, lap_fn):
    def step():
        loss = lap_fn().square().mean()
        loss.backward()
        m.zero_grad(set_to_none=True)
    return step

for d in ds:
    m = model(d)
    x = torch.randn(N, d, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        timed(f"d={d} inference mlp_hessian_diag", lambda: thd.mlp_hessian_diag(m, x))
        timed(f"d={d} inference mlp_laplacian", lambda: thd.mlp_laplacian(m, x))
        timed(f"d={d} inference mlp_derivatives", lambda: thd.mlp_derivatives(m, x))
        timed(f"d={d} inference laplacian", lambda: thd.laplacian(m, x))
    timed(f"d={d} train mlp_laplacian", train(m, lambda: thd.mlp_laplacian(m, x)))
    timed(f"d={d} train laplacian", train(m, lambda: thd.laplacian(m, x)))
    if d <= 8:
        dm = thd.nn.convert(model(d))
        timed(f"d={d} inference nested (drop-ins)", lambda: nested_lap(dm, x, False).detach())
        timed(f"d={d} train nested (drop-ins)", train(dm, lambda: nested_lap(dm, x, True)))
print("RESULT " + json.dumps(out))
"""


def run_tree(tree: str, threads: int, reps: int, ds: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), OMP_NUM_THREADS=str(threads))
    got = subprocess.run(
        [sys.executable, "-c", CHILD, str(threads), str(reps), ds],
        env=env, cwd=os.path.abspath(tree), capture_output=True, text=True, check=False,
    )
    line = [ln for ln in got.stdout.splitlines() if ln.startswith("RESULT ")]
    if got.returncode != 0 or not line:
        raise SystemExit(f"{tree}: child failed (rc {got.returncode}):\n{got.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="source tree of the old version (built in place)")
    p.add_argument("--after", default=".", help="source tree of the new version (built in place)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=3, help="timed calls per case per process")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--d", default="8,32,100", help="input dimensions, comma-separated")
    p.add_argument("--json", default=None, help="write all timings here")
    a = p.parse_args()
    trees = {"before": a.before, "after": a.after}
    times: dict = {"before": {}, "after": {}}
    load0 = os.getloadavg()
    t0 = time.time()
    for r in range(a.rounds):
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        for which in order:
            got = run_tree(trees[which], a.threads, a.reps, a.d)
            for case, ts in got.items():
                times[which].setdefault(case, []).extend(ts)
            print(f"round {r + 1}/{a.rounds} {which}: done ({time.time() - t0:.0f} s)", file=sys.stderr)
    head = (
        f"CPU, {a.threads} threads, torch (each tree's own build), tanh 4x256, N=4096, float32; "
        f"{a.rounds} rounds x {a.reps} calls per tree, interleaved; load average {load0} -> {os.getloadavg()}"
    )
    print(head)
    print()
    print("| case | before ms (median, min-max) | after ms (median, min-max) | after / before |")
    print("|---|---|---|---|")
    for case in times["before"]:
        b, f = times["before"][case], times["after"].get(case)
        if not f:
            continue
        mb, mf = statistics.median(b), statistics.median(f)
        print(
            f"| {case} | {1e3 * mb:.1f} ({1e3 * min(b):.1f}-{1e3 * max(b):.1f}) | "
            f"{1e3 * mf:.1f} ({1e3 * min(f):.1f}-{1e3 * max(f):.1f}) | {mf / mb:.2f}x |"
        )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"setting": head, "before": a.before, "after": a.after, "times": times}, fh, indent=1)


if __name__ == "__main__":
    main()
