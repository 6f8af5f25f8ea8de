"""Drop-in benchmark: nested-autograd Hessian diagonal of an MLP, torch.nn vs torchhessdiag.nn.

The problem (defaults = the issue's setting): an MLP with ``--d`` inputs, ``--depth`` hidden
layers of ``--width`` units with the activation ``--activation``, and a linear output to one
unit; ``--n`` points. The Hessian diagonal d^2 f / dx_i^2 of the output at every point is computed
by nested autograd -- one ``torch.autograd.grad(create_graph=True)`` for the gradient, then one
backward per input dimension -- once with the torch.nn activations and once with the same model
converted by ``torchhessdiag.nn.convert`` (same weights, same inputs).

Before anything is timed, both methods are checked against ``torch.func`` (vmap of hessian, the
diagonal) on a float64 copy of the problem at small N, and against each other at full size in the
benchmark dtype; the script exits with status 1 if a check fails.

Reported per method: median, min, max and IQR of the wall time of one full Hessian diagonal
(forward included) over ``--repeats`` runs after ``--warmup`` runs, the methods interleaved run by
run; peak memory (see benchmarks/_common.py for the methods): on CUDA the peak of
``max_memory_allocated``, on CPU the peak resident-set increase of the first full-size run in a
fresh process per method, and the peak of live tensor bytes from the profiler's allocation events.

    python benchmarks/bench_dropin.py                       # issue setting, auto device
    python benchmarks/bench_dropin.py --device cpu --repeats 7 --json out.json
    python benchmarks/bench_dropin.py --activation silu --dtype float64 --n 1024
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Dict

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import torchhessdiag  # noqa: E402

ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
}
METHODS = ("torch.nn", "torchhessdiag.nn")


# ---- the problem -----------------------------------------------------------------------------


def build_base_mlp(d: int, width: int, depth: int, activation: str, seed: int) -> nn.Sequential:
    """The torch.nn MLP (float32, CPU), weights from ``seed``: depth x (Linear, act), Linear->1."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers, fan = [], d
        for _ in range(depth):
            layers += [nn.Linear(fan, width), ACTIVATIONS[activation]()]
            fan = width
        layers.append(nn.Linear(fan, 1))
        return nn.Sequential(*layers)


def make_models(base: nn.Module, device: torch.device, dtype: torch.dtype) -> Dict[str, nn.Module]:
    """Both methods' models: the same weights, on device/dtype."""
    ref = _copy(base).to(device=device, dtype=dtype)
    thd = torchhessdiag.nn.convert(ref)  # a deep copy with drop-in activations
    return {"torch.nn": ref, "torchhessdiag.nn": thd}


def _copy(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m)


def make_input(n: int, d: int, device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(n, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def hessian_diag_nested(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, d) Hessian diagonal of model's scalar output per point, by nested autograd."""
    x = x.detach().requires_grad_(True)
    y = model(x)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    d = x.shape[1]
    cols = []
    for i in range(d):
        (h,) = torch.autograd.grad(g[:, i].sum(), x, retain_graph=i < d - 1)
        cols.append(h[:, i])
    return torch.stack(cols, dim=1)


def hessian_diag_func(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reference: vmap of torch.func.hessian of the single-point function, its diagonal."""

    def f(xi):
        return model(xi.unsqueeze(0)).squeeze()

    H = torch.func.vmap(torch.func.hessian(f))(x)
    return torch.diagonal(H, dim1=-2, dim2=-1)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (norm-wise relative error)."""
    a, ref = a.detach(), ref.detach()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


# ---- checks ----------------------------------------------------------------------------------


def check(args, device: torch.device, dtype: torch.dtype, base: nn.Module) -> dict:
    """float64 small-N check of both methods against torch.func; full-size agreement in dtype."""
    out = {"ok": True}
    n_small = min(args.n, args.check_n)
    models = make_models(base, device, torch.float64)
    x = make_input(n_small, args.d, device, torch.float64, args.seed)
    ref = hessian_diag_func(models["torch.nn"], x)
    out["float64_vs_torch_func"] = {"n": n_small}
    for name, model in models.items():
        e = rel_err(hessian_diag_nested(model, x), ref)
        out["float64_vs_torch_func"][name] = e
        out["ok"] &= e <= 1e-10
    models = make_models(base, device, dtype)
    x = make_input(args.n, args.d, device, dtype, args.seed)
    h = {k: hessian_diag_nested(m, x) for k, m in models.items()}
    e = rel_err(h["torchhessdiag.nn"], h["torch.nn"])
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    out["full_size_methods_agree"] = {"dtype": str(dtype), "n": args.n, "rel_err": e, "tol": tol}
    out["ok"] &= e <= tol
    return out


# ---- memory worker (fresh process per method) ------------------------------------------------


def worker(args) -> None:
    """Measure the peak memory of one method in this (fresh) process and emit it."""
    device, dtype = C.pick_device(args.device), C.parse_dtype(args.dtype)
    base = build_base_mlp(args.d, args.width, args.depth, args.activation, args.seed)
    model = make_models(base, device, dtype)[args.worker]
    # tiny warm-up: loads kernels, initialises BLAS/autograd state without touching much memory
    hessian_diag_nested(model, make_input(8, args.d, device, dtype, args.seed))
    x = make_input(args.n, args.d, device, dtype, args.seed)
    C.synchronize(device)
    run = lambda: hessian_diag_nested(model, x)  # noqa: E731
    res = {"method": args.worker, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        res["cuda"] = C.cuda_peak(run, device)
    else:
        res["rss"] = C.cpu_peak_rss(run)  # first full-size run of this process: sound
        res["tensor"] = C.cpu_peak_tensor(run)
    C.emit_worker_result(res)


def measure_memory(args, threads: int) -> Dict[str, dict]:
    script = os.path.abspath(__file__)
    common = ["--device", args.device, "--dtype", args.dtype, "--n", str(args.n),
              "--d", str(args.d),
              "--width", str(args.width), "--depth", str(args.depth), "--activation",
              args.activation, "--seed", str(args.seed), "--threads", str(threads)]
    return {m: C.run_worker([script, *common, "--worker", m]) for m in METHODS}


# ---- profile (optional) ----------------------------------------------------------------------


def profile(models, x, device, row_limit: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile as prof_ctx

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, model in models.items():
        with prof_ctx(activities=acts) as prof:
            hessian_diag_nested(model, x)
            C.synchronize(device)
        print(f"\n## profile: {name}\n")
        print(prof.key_averages().table(sort_by=sort, row_limit=row_limit))


# ---- main ------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--n", type=int, default=4096, help="number of points")
    p.add_argument("--d", type=int, default=16, help="input dimension")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4, help="number of hidden layers")
    p.add_argument("--activation", default="tanh", choices=sorted(ACTIVATIONS))
    p.add_argument("--repeats", type=int, default=7, help="timed runs per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per method first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-n", type=int, default=64, help="N of the float64 torch.func check")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table per method")
    p.add_argument("--json", metavar="PATH", help="write raw results to PATH")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return 0
    device, dtype = C.pick_device(args.device), C.parse_dtype(args.dtype)
    args.device = str(device)
    env = C.env_info(device)
    threads = torch.get_num_threads()
    setting = {"device": str(device), "dtype": args.dtype, "activation": args.activation,
               "d": args.d, "width": args.width, "depth": args.depth, "N": args.n,
               "threads": threads, "torch": torch.__version__,
               "torchhessdiag": torchhessdiag.__version__,
               "backend": torchhessdiag.backend_info()["devices"][device.type]}
    print("# Hessian diagonal by nested autograd: torch.nn vs torchhessdiag.nn "
          f"({args.activation})")
    print(f"device: {C.device_label(device)}")
    load_before = os.getloadavg()
    if device.type == "cpu" and (os.cpu_count() or 0) <= threads:
        print(f"note: {threads} threads on {os.cpu_count()} cores; a shared machine is noisy")

    base = build_base_mlp(args.d, args.width, args.depth, args.activation, args.seed)
    chk = check(args, device, dtype, base)
    f64 = chk["float64_vs_torch_func"]
    full = chk["full_size_methods_agree"]
    print(f"check float64 vs torch.func (N={f64['n']}): "
          + ", ".join(f"{m} {f64[m]:.1e}" for m in METHODS)
          + f"; full size {args.dtype} torchhessdiag vs torch.nn: {full['rel_err']:.1e}"
          + f" (tol {full['tol']:g}) -> {'ok' if chk['ok'] else 'FAILED'}")
    if not chk["ok"]:
        print("check failed: not timing a method that gives wrong numbers", file=sys.stderr)
        return 1

    models = make_models(base, device, dtype)
    x = make_input(args.n, args.d, device, dtype, args.seed)
    fns = {k: (lambda m=m: hessian_diag_nested(m, x)) for k, m in models.items()}
    times = C.time_interleaved(fns, device, args.repeats, args.warmup)
    stats = {k: C.summarize(v) for k, v in times.items()}

    mem = None
    if not args.no_memory:
        mem = measure_memory(args, threads)

    def peak(m, kind):
        if mem is None:
            return None
        r = mem[m]
        if device.type == "cuda":
            return r["cuda"]["peak_bytes"] if kind == "main" else None
        return r["rss" if kind == "main" else "tensor"]["peak_bytes"]

    print()
    print(C.markdown_table(
        ["device", "dtype", "activation", "d", "width", "depth", "N", "threads", "torch",
         "torchhessdiag backend"],
        [[C.device_label(device), args.dtype, args.activation, args.d, args.width, args.depth,
          args.n, threads, torch.__version__, setting["backend"]]]))
    print()
    mem_main = "peak CUDA alloc (MiB)" if device.type == "cuda" else "peak RSS incr. (MiB)"
    headers = ["method", "median (ms)", "min (ms)", "max (ms)", "IQR (ms)", mem_main]
    if device.type == "cpu":
        headers.append("peak tensors (MiB)")
    rows = []
    for m in METHODS:
        s = stats[m]
        row = [m, C.fmt_ms(s["median"]), C.fmt_ms(s["min"]), C.fmt_ms(s["max"]),
               C.fmt_ms(s["iqr"]), C.fmt_mib(peak(m, "main"))]
        if device.type == "cpu":
            row.append(C.fmt_mib(peak(m, "tensor")))
        rows.append(row)
    def ratio(a, b):
        return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"

    a, b = METHODS
    row = ["ratio torch.nn / torchhessdiag", ratio(stats[a]["median"], stats[b]["median"]),
           ratio(stats[a]["min"], stats[b]["min"]), ratio(stats[a]["max"], stats[b]["max"]), "",
           ratio(peak(a, "main"), peak(b, "main"))]
    if device.type == "cpu":
        row.append(ratio(peak(a, "tensor"), peak(b, "tensor")))
    rows.append(row)
    print(C.markdown_table(headers, rows))
    print()
    print(f"{args.repeats} timed runs per method after {args.warmup} warm-up runs, interleaved; "
          "one run = forward + gradient (create_graph) + one backward per input dim.")
    if device.type == "cpu":
        print("peak RSS incr.: VmHWM - VmRSS over the first full-size run in a fresh process per "
              "method (HWM reset via /proc/self/clear_refs); peak tensors: max live tensor bytes "
              "above the start, from torch.profiler allocation events.")
        if mem and any(not mem[m]["rss"]["hwm_reset"] for m in METHODS):
            print("warning: VmHWM could not be reset; the RSS numbers are upper bounds.")
    else:
        print("peak CUDA alloc: max_memory_allocated during one run minus allocated before it, "
              "fresh process per method.")

    load_after = os.getloadavg()
    print(f"1-min load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
          f"({os.cpu_count()} cores); well above 0 means other processes shared the machine.")

    if args.profile:
        profile(models, x, device)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setting": setting, "env": env, "check": chk, "times_s": times,
                       "stats_s": stats, "memory": mem,
                       "loadavg_before": load_before, "loadavg_after": load_after}, f, indent=2)
        print(f"raw results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
