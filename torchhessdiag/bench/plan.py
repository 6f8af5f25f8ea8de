"""``--plan``: the blocks of a grid and a rough estimate of how long they take, from a cost model
(no measurement): GEMM FLOPs at an assumed rate plus elementwise work per jet element, times a
per-method factor, plus a per-call overhead, through the runner's steps and budgets (probe, warm-up, timed samples
batched to --min-sample-ms, the method budget, the memory call, the float64 check, compiles).

The factors are the CPU record of docs/benchmarks.md (tanh, 4x256, N=4096, 2 threads of an AMD EPYC: thd ~1.3x
its floor, nested autograd ~2.6x, torch.func 7-10x, ...); the rate 150 GFLOP/s float32 and
75 float64 is that record's GEMM floor (16 GFLOP in 104 ms). Small blocks are dominated by the
overheads and the compiles, which are guesses from short runs on the same machine. Take the
result as +-50 %, on an idle machine; a loaded one is slower.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List

from . import measure as M
from .methods import METHODS

GFLOPS = {"float32": 150e9, "float64": 75e9}
# median call time over the GEMM floor's (inference: K = d floor; training: training floor)
FACTOR_INF = {"thd_diag": 1.3, "thd_lap": 1.3, "thd_deriv": 1.4, "thd_general": 1.4,
              "nested": 2.6, "nested_dropin": 3.0, "func_hessian": 10.0, "func_jvp": 7.0,
              "fwd_diag": 3.0, "fwd_lap": 1.5, "fwd_deriv": 1.6, "fwd_lap_compiled": 1.8,
              "jet": 2.0, "jet_std": 4.5, "jet_deriv": 2.1}
FACTOR_TRAIN = {"thd_lap": 1.3, "thd_general": 1.3, "nested": 2.7, "nested_dropin": 2.8,
                "func_hessian": 5.0, "func_jvp": 4.0, "fwd_lap": 1.4, "fwd_lap_compiled": 1.3,
                "jet": 1.6, "jet_std": 4.0}
# elementwise work (s per element of the jet, N x sum(widths) x (K + 2)), float32; float64 x 1.6.
# From issue 13's small-width figures (tanh, 2 threads): jet collapsed d=2 4x128 N=8192 training
# 124 ms over a ~65 ms GEMM floor; d=3 4x64 N=4096 34-37 ms
ELEM_S = {"inference": 1.5e-9, "train": 3.5e-9}
# per-call host overhead (s) of a 3-layer net, inference (training x 3); scaled by depth / 3.
# issue 13: nested autograd training step d=2 3x32 N=512 2.9-4.3 ms, thd 5.8 ms
OVERHEAD = {"func_hessian": 3e-3, "func_jvp": 2e-3, "jet_std": 2e-3}
OVERHEAD_DEFAULT = 1e-3
COMPILE_S = {"inference": 15.0, "train": 25.0}  # the compiled forward Laplacian, per graph


def floor_flops(d: int, widths: List[int], N: int, K: int, train: bool) -> float:
    """2 x the multiply-adds of the GEMM floor (see methods.floor_fn)."""
    dims = [d] + list(widths) + [1]
    row = sum(a * b for a, b in zip(dims[:-1], dims[1:]))  # one row through every layer
    rows = sum(a * b for a, b in zip(widths[:-1], widths[1:]))  # layers 2..L
    macs = N * (2 * row + K * rows)
    return 2 * macs * (3 if train else 1)


def method_seconds(k: str, spec: dict) -> float:
    train = spec["mode"] == "train"
    d, w, N = spec["d"], spec["widths"], spec["N"]
    K = min(d, min(w)) if train else d
    fl = floor_flops(d, w, N, K, train) / GFLOPS[spec["dtype"]]
    if k.startswith("floor"):
        return fl
    elem = N * sum(w) * (K + 2) * ELEM_S[spec["mode"]] * (1.6 if spec["dtype"] == "float64" else 1)
    fac = (FACTOR_TRAIN if train else FACTOR_INF).get(k, 1.0)
    ovh = OVERHEAD.get(k, OVERHEAD_DEFAULT) * (3 if train else 1) * (len(w) / 3)
    return fac * (fl + elem) + ovh


def block_seconds(spec: dict, keys: List[str], opts, compiled_seen: set, checked: set) -> float:
    """The runner's steps for one block under the model (see the module docstring)."""
    mode = spec["mode"]
    budget, mb = opts.budget, opts.method_budget
    min_sample = getattr(opts, "min_sample_ms", 20.0) / 1e3
    total = 0.0
    ks = [k for k in keys if mode in METHODS[k].modes and METHODS[k].available() is None]
    floors = ["floor_train"] if mode == "train" else ["floor_diag", "floor_lap"]
    for k in ks + floors:
        t = method_seconds(k, spec)
        if k.startswith("floor"):
            total += t + min(opts.repeats * max(t, min_sample), max(mb, 3 * t))
            continue
        total += 2 * method_seconds(k, dict(spec, N=4)) + t / 8  # probe
        if t > budget:
            continue
        total += t  # warm-up
        if t <= mb / 2:
            samples = opts.repeats
            sample = max(t, min_sample)
            total += min(samples * sample, max(mb - t, 3 * sample))
            total += 1.5 * t  # the memory call (profiler)
        if k == "fwd_lap_compiled":
            key = (tuple(spec["widths"]), spec["d"], spec["dtype"], mode)
            if key not in compiled_seen:
                compiled_seen.add(key)
                total += COMPILE_S[mode]
    ck = (spec["d"], tuple(spec["widths"]), mode)
    if ck not in checked:  # float64 check at N = check_n, once per architecture and mode
        checked.add(ck)
        total += sum(2 * method_seconds(k, dict(spec, N=opts.check_n, dtype="float64"))
                     for k in ks)
        if "fwd_lap_compiled" in ks:
            key = (tuple(spec["widths"]), spec["d"], "float64", mode)
            if key not in compiled_seen:
                compiled_seen.add(key)
                total += COMPILE_S[mode]
    return total + 2.0  # model, points, full-size check


def plan_markdown(blocks: List[dict], keys: List[str], opts) -> str:
    seen, checked = set(), set()
    parts: "OrderedDict[tuple, List[float]]" = OrderedDict()
    for b in blocks:
        parts.setdefault((b["mode"], b["dtype"], b["N"] == 16), []).append(
            block_seconds(b, keys, opts, seen, checked))
    rows = [[mode, dt, "16" if tiny else "> 16", len(v), f"{sum(v) / 60:.0f}",
             f"{max(v) / 60:.1f}"] for (mode, dt, tiny), v in parts.items()]
    tot = sum(sum(v) for v in parts.values())
    return "\n".join([
        f"{len(blocks)} blocks, methods: {', '.join(keys)}; repeats {opts.repeats}, budget "
        f"{opts.budget:g} s, method budget {opts.method_budget:g} s.", "",
        M.markdown_table(["mode", "dtype", "N", "blocks", "est. minutes", "largest block, min"],
                         rows), "",
        f"Estimated total: {tot / 60:.0f} minutes (a cost model, +-50 %, idle machine: "
        f"torchhessdiag/bench/plan.py). Blocks in order:", ""]
        + [f"- {b['mode']} {b['dtype']} d={b['d']} widths={'x'.join(map(str, b['widths']))} "
           f"N={b['N']}" for b in blocks])
