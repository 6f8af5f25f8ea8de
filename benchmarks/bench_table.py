"""The fused table pass (sigma, sigma', sigma'' of one z in one read) against the memory-bound
limit of that pass and against torch computing the same three arrays (issue 13, target 3).

    python benchmarks/bench_table.py                       # float32 and float64, 4M elements, 2 threads
    python benchmarks/bench_table.py --threads 1 --json out.json

Per activation of the derivative table (default parameters), median of --repeats timed calls
after a warm-up; every side allocates its outputs afresh on each call, as a user's call does:

* ``table``: ``torch.ops.torchhessdiag.act_derivatives(z, act, a, b, [0, 1, 2])`` -- one pass,
  reads z once, writes three arrays (16 bytes per float32 element);
* ``limit``: the memory-bound limit of that pass measured in the same run: one read of z and three
  writes, as ``torch.stack([z, z, z])``-shaped copies into a fresh (3, n) output (the same bytes,
  the same fresh allocation; no arithmetic);
* ``torch``: sigma, sigma', sigma'' with torch's own ops, each written out (tanh:
  t = tanh(z); 1 - t^2; -2 t (1 - t^2); the others through torch.func's nested forward mode on
  torch's own function, which is what a user of torch would write).

Printed: ns per element of each, and table / limit (target: <= 1.5), torch / table.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
    return f  # noqa: E301


def _median_ns(fn, n_el: int, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / n_el * 1e9, min(ts) / n_el * 1e9, max(ts) / n_el * 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1 << 22, help="elements (default 4M)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--dtype", nargs="+", default=["float32", "float64"])
    p.add_argument("--json", help="write the figures here too")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    info = thd.backend_info()
    print(f"# table pass: n = {a.n}, {a.threads} threads, torch {torch.__version__}, "
          f"cpu_isa {info.get('cpu_isa')}, median (min-max) of {a.repeats} calls, ns per element")
    rows = []
    for dt in a.dtype:
        dtype = getattr(torch, dt)
        g = torch.Generator().manual_seed(0)
        z = (torch.randn(a.n, generator=g, dtype=torch.float64) * 3).to(dtype)
        limit = _median_ns(lambda: torch.empty(3, a.n, dtype=dtype).copy_(z.expand(3, a.n)),
                           a.n, a.repeats)
        print(f"\n## {dt}: memory-bound limit (read z, write 3 arrays, fresh output) "
              f"{limit[0]:.2f} ({limit[1]:.2f}-{limit[2]:.2f}) ns/el\n")
        print("| activation | table ns/el | table / limit | torch ns/el | torch / table |")
        print("|---|---|---|---|---|")
        for name in activations.NAMES:
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
