"""The fused table pass (sigma, sigma', sigma'' of one z in one read) against the memory-bound
limit of that pass and against torch computing the same three arrays (issue 13, target 3).

    python benchmarks/bench_table.py                       # float32 and float64, 2^20 elements, 2 threads
    python benchmarks/bench_table.py --threads 1 --json out.json

Per activation of the derivative table (default parameters), median of --repeats timed calls
after a warm-up; every side allocates its outputs afresh on each call, as a user's call does:

* ``table``: ``torch.ops.torchhessdiag.act_derivatives(z, act, a, b, [0, 1, 2])`` -- one pass,
  reads z once, writes three arrays (16 bytes per float32 element);
* ``limit``: the same op for ``identity`` (sigma = z, sigma' = 1, sigma'' = 0: the same read and
  three writes, the same allocation, no arithmetic) -- the memory-bound floor of the pass as this
  op and this machine run it, measured in the same run (a plain copy is no floor: torch's copy
  kernels and the op's threads differ, and one run measured a copy slower than the identity pass);
* ``torch``: sigma, sigma', sigma'' with torch's own ops, each written out (tanh:
  t = tanh(z); 1 - t^2; -2 t (1 - t^2); the others through torch.func's nested forward mode on
  torch's own function, which is what a user of torch would write).

Printed: ns per element of each, and table / limit (issue 13 asks <= 1.5), torch / table.

Allocation: every call allocates fresh outputs, and glibc serves large blocks by mmap, so each
call would page-fault its whole output in again -- a cost that swamps the arithmetic and that
glibc switches on and off as its threshold adapts (one run measured 0.5-4 ns/el for the same
pass). The script therefore runs with MALLOC_MMAP_THRESHOLD_ at glibc's maximum (32 MiB) and trimming
off (it re-executes itself with them), and the default n (2^20) keeps every output below that
threshold: every side then reuses warm heap pages, as a training loop's steady state does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import torchhessdiag as thd
from torchhessdiag import activations


def _torch_three(name: str, a: float, b: float):
    """sigma, sigma', sigma'' by torch's ops: closed forms for tanh/sigmoid (what people write),
    nested torch.func.jvp of torch's elementwise function for the rest."""
    if name == "tanh":
        def f(z):
            t = torch.tanh(z)
            d1 = 1 - t * t
            return t, d1, -2 * t * d1
        return f
    if name == "sigmoid":
        def f(z):
            s = torch.sigmoid(z)
            d1 = s * (1 - s)
            return s, d1, d1 * (1 - 2 * s)
        return f
    fn = activations.torch_function(activations.ActivationSpec(name, a, b))

    def f(z):
        one = torch.ones_like(z)
        g = lambda u: torch.func.jvp(fn, (u,), (one,))  # noqa: E731
        (s, d1), (_, d2) = torch.func.jvp(g, (z,), (one,))
        return s, d1, d2
    return f


def _median_ns(fn, n_el: int, repeats: int):
    """(median, min, max) ns per element of fn() over `repeats` timed calls after one warm-up."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / n_el * 1e9, min(ts) / n_el * 1e9, max(ts) / n_el * 1e9


def _reexec_with_heap_allocation() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(32 << 20), MALLOC_TRIM_THRESHOLD_=str(1 << 40))
        os.execve(sys.executable, [sys.executable] + sys.argv, env)


def main() -> None:
    _reexec_with_heap_allocation()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1 << 20, help="elements (default 2^20)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--dtype", nargs="+", default=["float32", "float64"])
    p.add_argument("--json", help="write the figures here too")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    info = thd.backend_info()
    print(f"# table pass: n = {a.n}, {a.threads} threads, torch {torch.__version__}, "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_')}, "
          f"cpu_isa {info.get('cpu_isa')}, median (min-max) of {a.repeats} calls, ns per element")
    rows = []
    for dt in a.dtype:
        dtype = getattr(torch, dt)
        g = torch.Generator().manual_seed(0)
        z = (torch.randn(a.n, generator=g, dtype=torch.float64) * 3).to(dtype)
        limit = _median_ns(lambda: torch.ops.torchhessdiag.act_derivatives(z, "identity", 0.0, 0.0, [0, 1, 2]),
                           a.n, a.repeats)
        print(f"\n## {dt}: the identity pass (read z, write 3 arrays, no arithmetic) "
              f"{limit[0]:.2f} ({limit[1]:.2f}-{limit[2]:.2f}) ns/el\n")
        print("| activation | table ns/el | table / identity pass | torch ns/el | torch / table |")
        print("|---|---|---|---|---|")
        for name in activations.NAMES:
            if name == "identity":
                continue
            defaults = activations._PARAMS[name][1]
            pa = defaults[0] if len(defaults) > 0 else 0.0
            pb = defaults[1] if len(defaults) > 1 else 0.0
            tab = _median_ns(lambda: torch.ops.torchhessdiag.act_derivatives(z, name, pa, pb, [0, 1, 2]),
                             a.n, a.repeats)
            tf = _torch_three(name, pa, pb)
            tt = _median_ns(lambda: tf(z), a.n, a.repeats) if tf is not None else None
            rows.append(dict(dtype=dt, activation=name, table_ns=tab, limit_ns=limit, torch_ns=tt,
                             threads=a.threads, n=a.n))
            ts = f"{tt[0]:.2f} ({tt[1]:.2f}-{tt[2]:.2f})" if tt else "–"
            tr = f"{tt[0] / tab[0]:.2f}×" if tt else "–"
            print(f"| {name} | {tab[0]:.2f} ({tab[1]:.2f}-{tab[2]:.2f}) | {tab[0] / limit[0]:.2f} "
                  f"| {ts} | {tr} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(torch=torch.__version__, backend=info, rows=rows), f, indent=1,
                      default=str)


if __name__ == "__main__":
    main()
