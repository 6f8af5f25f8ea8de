"""The ``operators`` preset (issue 16): the biharmonic against nested autograd, torch.func and
jet-for-pytorch's collapsed bi-Laplacian, and the sampled-axes Laplacian in high dimensions.

``python -m torchhessdiag.bench --preset operators`` or, with more options,
``python -m torchhessdiag.bench.operators --help``. Two parts:

**biharmonic** -- Delta^2 u of a tanh MLP (default d = 5, 3 hidden layers of 128, N = 512,
float32, the issue's target setting), per dtype, d, N and mode (inference: Delta^2 u of all N
points; training step: loss = mean((Delta^2 u - 1)^2) and its backward to the weights), in one
process on the same weights and points, round-robin timed after one warm-up:

* ``thd``: ``thd.biharmonic(model, x)`` (fourth-order Taylor jets along the d axes and the
  d(d-1) directions e_i +- e_j, top order collapsed: 3d^2 + 2 rows per point);
* ``nested``: Delta(Delta u) by nested ``torch.autograd.grad``: the gradient, d backwards for
  Delta u, its gradient, d more backwards (2d + 2 passes; what PINN code writes);
* ``func``: ``torch.func`` -- vmap(jacfwd(jacfwd(jacrev(jacrev(f))))) of the one-point function,
  the d^4 tensor contracted (inference only);
* ``jet``: jet-for-pytorch's ``bilaplacian(collapsed=True)`` (three groups of collapsed 4-jets,
  d + 3 d(d-1)/2 directions), as in its own benchmark: capture_graph, common-subexpression
  elimination, vmap over the points (Python >= 3.12; else skipped with the reason).

Every method is first checked at ``check_n`` points against a float64 reference computed by
torch.func (inference: the biharmonic; training: the weight gradient of the loss): norm-wise
relative error <= ``--tol`` (1e-10) in float64; the float32 timing run is then checked against
the float64 reference at the same points with ``--tol32`` (1e-3: float32 fourth derivatives).

**sampled** -- ``thd.laplacian(model, x, num_samples=S)`` for a tanh MLP of width 128 (3 hidden
layers) at d in {10^3, 10^4, 10^5} and S in {8, 32, 128}: time per call (inference) and peak
tensor memory (torch.profiler's allocation events: the bytes of live tensors, not the RSS), next
to the forward pass ``model(x)`` alone -- the part that must grow with d (the first layer,
N d w) -- and, where d is small enough, the exact Laplacian (all d axes). Time and memory should
grow linearly in S and, beyond the forward pass, not with d.

Timing clock: ``--clock wall`` (default; perf_counter, as the rest of the suite) or ``thread``
(``time.thread_time()``: the CPU time of the calling thread -- with ``--threads 1`` the whole
computation -- steadier on a machine shared with other jobs). Reported: median, min-max.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

Tensor = torch.Tensor

BIH_METHODS = {
    "thd": "thd.biharmonic",
    "nested": "nested autograd Δ(Δu)",
    "func": "torch.func nested jac",
    "jet": "jet-for-pytorch bilaplacian (collapsed)",
}


# ---- models and methods --------------------------------------------------------------------------


def build_mlp(d: int, width: int, depth: int, seed: int, act: str = "tanh") -> nn.Sequential:
    acts = {"tanh": nn.Tanh, "silu": nn.SiLU, "sigmoid": nn.Sigmoid}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: List[nn.Module] = []
        fan = d
        for _ in range(depth):
            layers += [nn.Linear(fan, width), acts[act]()]
            fan = width
        layers.append(nn.Linear(fan, 1))
        return nn.Sequential(*layers)


def nested_biharmonic(model: nn.Module, x: Tensor, create_graph: bool) -> Tensor:
    x = x.detach().requires_grad_(True)
    u = model(x).reshape(x.shape[0])
    (g,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    lap = None
    for i in range(x.shape[1]):
        (h,) = torch.autograd.grad(g[:, i].sum(), x, create_graph=True)
        lap = h[:, i] if lap is None else lap + h[:, i]
    (g2,) = torch.autograd.grad(lap.sum(), x, create_graph=True)
    out = None
    for i in range(x.shape[1]):
        (h,) = torch.autograd.grad(g2[:, i].sum(), x, create_graph=create_graph, retain_graph=True)
        out = h[:, i] if out is None else out + h[:, i]
    return out


def func_biharmonic(model: nn.Module, x: Tensor) -> Tensor:
    one = lambda p: model(p.unsqueeze(0)).reshape(())  # noqa: E731
    T = torch.func.vmap(torch.func.jacfwd(torch.func.jacfwd(torch.func.jacrev(torch.func.jacrev(one)))))(x)
    return torch.einsum("niijj->n", T)


def jet_available() -> Optional[str]:
    try:
        import jet  # noqa: F401  (PyPI: jet-for-pytorch, Python >= 3.12)
    except Exception as e:  # noqa: BLE001 - ImportError, or a SyntaxError on Python < 3.12
        return f"jet-for-pytorch not importable ({type(e).__name__}: {str(e)[:80]}); needs Python >= 3.12"
    return None


def jet_biharmonic(model: nn.Module, x: Tensor) -> Callable[[Tensor], Tensor]:
    import jet

    bl = jet.bilaplacian(model, (x[0],), collapsed=True)
    bl, _ = jet.capture_graph(bl, (x[0],))
    jet.common_subexpression_elimination(bl.graph)
    bl.recompile()
    vm = torch.func.vmap(bl)
    return lambda xx: vm(xx).reshape(xx.shape[0])


def bih_callable(key: str, model: nn.Module, x: Tensor, train: bool) -> Callable[[], Tensor]:
    """() -> Delta^2 u (N,) of ``key`` at x (a graph to the weights when ``train``)."""
    import torchhessdiag as thd

    if key == "thd":
        return lambda: thd.biharmonic(model, x).reshape(x.shape[0])
    if key == "nested":
        return lambda: nested_biharmonic(model, x, train)
    if key == "func":
        if train:
            raise NotImplementedError("torch.func's d^4 tensor: inference only here")
        return lambda: func_biharmonic(model, x)
    if key == "jet":
        why = jet_available()
        if why:
            raise ModuleNotFoundError(why)
        f = jet_biharmonic(model, x)
        return lambda: f(x)
    raise KeyError(key)


def bih_call(key: str, model: nn.Module, x: Tensor, mode: str) -> Callable[[], Tensor]:
    """The timed call: inference returns Delta^2 u (no graph where the method allows); a training
    step zeroes the gradients, computes the loss and its backward, returns the loss."""
    f = bih_callable(key, model, x, mode == "train")
    if mode == "inference":
        if key == "nested":
            return lambda: f().detach()

        def inf():
            with torch.no_grad():
                return f()

        return inf
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        loss = ((f() - 1.0) ** 2).mean()
        loss.backward()
        return loss.detach()

    return step


def flat_grads(model: nn.Module) -> Tensor:
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad.detach()).flatten() for p in model.parameters()])


def rel(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    e = float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
    return e if e == e else float("inf")


def reference(model64: nn.Module, x64: Tensor, mode: str) -> Tensor:
    """torch.func float64: the biharmonic, or the weight gradient of the training loss."""
    if mode == "inference":
        return func_biharmonic(model64, x64).detach()
    for p in model64.parameters():
        p.grad = None
    ((func_biharmonic(model64, x64) - 1.0) ** 2).mean().backward()
    g = flat_grads(model64)
    for p in model64.parameters():
        p.grad = None
    return g


# ---- timing -----------------------------------------------------------------------------------------


def clock(kind: str) -> Callable[[], float]:
    return time.thread_time if kind == "thread" else time.perf_counter


def time_once(fn: Callable[[], object], device: torch.device, kind: str) -> float:
    from . import measure as M

    if device.type == "cuda":
        return M.time_once(fn, device)
    c = clock(kind)
    t0 = c()
    fn()
    return c() - t0


def _err_text(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"


def run_biharmonic_block(spec: dict, keys: List[str], a) -> dict:
    from . import measure as M

    device, dtype, mode = torch.device(spec["device"]), M.parse_dtype(spec["dtype"]), spec["mode"]
    base = build_mlp(spec["d"], spec["width"], spec["depth"], a.seed, spec["act"])
    rec = {"part": "biharmonic", "key": bih_key(spec), "setting": spec, "skipped": {}, "failed": {}}
    rec.update(check={}, check32={}, times={})
    m64 = copy.deepcopy(base).to(device=device, dtype=torch.float64)
    gen = torch.Generator().manual_seed(a.seed + 7)
    xc = torch.rand(a.check_n, spec["d"], generator=gen, dtype=torch.float64).to(device)
    ref = reference(m64, xc, mode)
    ok = []
    for k in keys:
        try:
            out = bih_call(k, m64, xc, mode)()
            got = out if mode == "inference" else flat_grads(m64)
            err = rel(got, ref)
            rec["check"][k] = err
            if err <= a.tol:
                ok.append(k)
            else:
                rec["failed"][k] = f"float64 check: relative error {err:.2e} > {a.tol:g}"
        except (ModuleNotFoundError, NotImplementedError) as e:
            rec["skipped"][k] = str(e)
        except Exception as e:  # noqa: BLE001 - a peer that cannot run: skipped; thd: failed
            rec["failed" if k == "thd" else "skipped"][k] = "cannot run: " + _err_text(e)
        for p in m64.parameters():
            p.grad = None
    model = copy.deepcopy(base).to(device=device, dtype=dtype)
    if dtype != torch.float64:  # the timed dtype against the float64 reference, same points
        mc = copy.deepcopy(base).to(device=device, dtype=dtype)
        for k in list(ok):
            try:
                out = bih_call(k, mc, xc.to(dtype), mode)()
                err = rel(out if mode == "inference" else flat_grads(mc), ref)
            except Exception as e:  # noqa: BLE001
                err = float("inf")
                rec["failed"][k] = f"{spec['dtype']}: " + _err_text(e)
            rec["check32"][k] = err
            if err > a.tol32:
                rec["failed"].setdefault(k, f"{spec['dtype']} check: relative error {err:.2e} > {a.tol32:g}")
                ok.remove(k)
            for p in mc.parameters():
                p.grad = None
    gen = torch.Generator().manual_seed(a.seed + 1000 + spec["d"])
    x = torch.rand(spec["N"], spec["d"], generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    calls = {}
    for k in ok:
        try:
            fn = bih_call(k, model, x, mode)
            t = time_once(fn, device, a.clock)  # warm-up (traces, captures)
            if t > a.budget:
                rec["skipped"][k] = f"one call took {t:.1f} s > budget {a.budget:g} s"
                continue
            calls[k] = fn
        except Exception as e:  # noqa: BLE001
            rec["failed"][k] = _err_text(e)
    times: Dict[str, List[float]] = {k: [] for k in calls}
    spent = {k: 0.0 for k in calls}
    for _ in range(a.repeats):
        for k, fn in calls.items():
            if spent[k] > a.method_budget and times[k]:
                continue
            t = time_once(fn, device, a.clock)
            times[k].append(t)
            spent[k] += t
    rec["times"] = {k: M.summarize(v) for k, v in times.items() if v}
    rec["loadavg"] = M.loadavg()
    return rec


def bih_key(spec: dict) -> str:
    return (f"biharmonic|{spec['device']}|{spec['dtype']}|{spec['act']}|d={spec['d']}|w={spec['width']}x{spec['depth']}|"
            f"N={spec['N']}|{spec['mode']}")


def run_sampled_block(spec: dict, a) -> dict:
    """One d: forward, exact (if d <= --exact-max-d) and sampled for each S: time and peak memory."""
    import torchhessdiag as thd

    from . import measure as M

    device, dtype = torch.device(spec["device"]), M.parse_dtype(spec["dtype"])
    d, N = spec["d"], spec["N"]
    model = build_mlp(d, spec["width"], spec["depth"], a.seed).to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(a.seed + d)
    x = torch.rand(N, d, generator=gen, dtype=dtype).to(device)
    g = torch.Generator().manual_seed(a.seed)
    calls: Dict[str, Callable[[], object]] = {"forward": lambda: model(x)}
    if d <= a.exact_max_d:
        calls["exact"] = lambda: thd.laplacian(model, x)
    for S in spec["samples"]:
        if S <= d:
            calls[f"S={S}"] = (lambda S=S: thd.laplacian(model, x, num_samples=S, generator=g))
    rec = {"part": "sampled", "key": sampled_key(spec), "setting": spec, "times": {}, "peak_bytes": {}, "skipped": {},
           "path": thd.explain(model, x[:2], "laplacian").path}
    with torch.no_grad():
        for k, fn in calls.items():
            t = time_once(fn, device, a.clock)
            if t > a.budget:
                rec["skipped"][k] = f"one call took {t:.1f} s > budget {a.budget:g} s"
        live = {k: fn for k, fn in calls.items() if k not in rec["skipped"]}
        times: Dict[str, List[float]] = {k: [] for k in live}
        for _ in range(a.repeats):
            for k, fn in live.items():
                times[k].append(time_once(fn, device, a.clock))
        rec["times"] = {k: M.summarize(v) for k, v in times.items()}
        if a.memory and device.type == "cpu":
            for k, fn in live.items():
                rec["peak_bytes"][k] = M.cpu_peak_tensor(fn, collect=False)["peak_bytes"]
        elif a.memory:
            for k, fn in live.items():
                rec["peak_bytes"][k] = M.cuda_peak(fn, device).get("peak_bytes")
    rec["loadavg"] = M.loadavg()
    return rec


def sampled_key(spec: dict) -> str:
    return f"sampled|{spec['device']}|{spec['dtype']}|d={spec['d']}|w={spec['width']}x{spec['depth']}|N={spec['N']}"


# ---- reports --------------------------------------------------------------------------------------


def _med(rec: dict, k: str) -> Optional[float]:
    t = rec["times"].get(k)
    return None if t is None else t["median"]


def bih_markdown(rec: dict) -> str:
    from . import measure as M

    s = rec["setting"]
    head = (f"### biharmonic: {s['act']} MLP {s['depth']}x{s['width']}, d={s['d']}, N={s['N']}, {s['dtype']}, {s['mode']} "
            f"(load {rec.get('loadavg', ['?'])[0]})")
    thd_t = _med(rec, "thd")
    rows = []
    for k, t in rec["times"].items():
        rows.append([BIH_METHODS[k], M.fmt_ms(t["median"]), f"{M.fmt_ms(t['min'])}-{M.fmt_ms(t['max'])}", t["n"],
                     "-" if thd_t is None else f"{t['median'] / thd_t:.2f}x",
                     f"{rec['check'].get(k, float('nan')):.1e}", f"{rec['check32'].get(k, float('nan')):.1e}"])
    out = [head, "", M.markdown_table(["method", "median ms", "min-max", "n", "/ thd", "float64 check", "timed-dtype check"], rows)]
    for k, why in rec["skipped"].items():
        out.append(f"- {BIH_METHODS[k]}: skipped ({why})")
    for k, why in rec["failed"].items():
        out.append(f"- {BIH_METHODS[k]}: FAILED ({why})")
    return "\n".join(out) + "\n"


def sampled_markdown(rec: dict) -> str:
    from . import measure as M

    s = rec["setting"]
    head = (f"### sampled Laplacian: tanh MLP {s['depth']}x{s['width']}, d={s['d']}, N={s['N']}, {s['dtype']}, "
            f"inference, path {rec['path']} (load {rec.get('loadavg', ['?'])[0]})")
    fwd = _med(rec, "forward")
    rows = []
    for k, t in rec["times"].items():
        pb = rec["peak_bytes"].get(k)
        rows.append([k, M.fmt_ms(t["median"]), f"{M.fmt_ms(t['min'])}-{M.fmt_ms(t['max'])}",
                     "-" if fwd is None or k == "forward" else M.fmt_ms(t["median"] - fwd), "-" if pb is None else M.fmt_mib(pb)])
    out = [head, "", M.markdown_table(["call", "median ms", "min-max", "minus forward ms", "peak tensor MiB"], rows)]
    for k, why in rec["skipped"].items():
        out.append(f"- {k}: skipped ({why})")
    return "\n".join(out) + "\n"


def summary_markdown(records: List[dict]) -> str:
    from . import measure as M

    rows = []
    for r in records:
        if r["part"] != "biharmonic":
            continue
        s = r["setting"]
        thd_t = _med(r, "thd")
        cells = [s["dtype"], s["d"], f"{s['depth']}x{s['width']}", s["N"], s["mode"], "-" if thd_t is None else M.fmt_ms(thd_t)]
        for k in ("nested", "func", "jet"):
            o = _med(r, k)
            cells.append("skipped" if o is None or thd_t is None else f"{o / thd_t:.2f}x")
        rows.append(cells)
    out = []
    if rows:
        out.append(M.markdown_table(["dtype", "d", "MLP", "N", "mode", "thd ms", "nested / thd", "torch.func / thd", "jet / thd"], rows))
    srows = []
    for r in records:
        if r["part"] != "sampled":
            continue
        s = r["setting"]
        for k, t in r["times"].items():
            if k.startswith("S="):
                pb = r["peak_bytes"].get(k)
                srows.append([s["d"], k[2:], M.fmt_ms(t["median"]), M.fmt_ms(t["median"] - (_med(r, "forward") or 0.0)),
                              "-" if pb is None else M.fmt_mib(pb)])
    if srows:
        out.append(M.markdown_table(["d", "S", "sampled ms", "minus forward ms", "peak tensor MiB"], srows))
    return "\n\n".join(out)


# ---- command line -----------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m torchhessdiag.bench.operators",
                                description="Issue 16's benchmark: the biharmonic and the sampled Laplacian (module docstring).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["biharmonic", "sampled"], choices=["biharmonic", "sampled"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float64"])
    p.add_argument("--d", type=int, nargs="+", default=[5], help="biharmonic: input dimensions")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--activation", default="tanh", choices=["tanh", "silu", "sigmoid"], help="biharmonic MLP")
    p.add_argument("--n", type=int, nargs="+", default=[512], help="biharmonic: points N")
    p.add_argument("--modes", nargs="+", default=["inference", "train"], choices=["inference", "train"])
    p.add_argument("--methods", nargs="+", default=["thd", "nested", "func", "jet"], choices=list(BIH_METHODS))
    p.add_argument("--sampled-d", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--samples", type=int, nargs="+", default=[8, 32, 128], help="sampled: S")
    p.add_argument("--sampled-n", type=int, default=256, help="sampled: points N")
    p.add_argument("--exact-max-d", type=int, default=1000, help="sampled: time the exact Laplacian up to this d")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--clock", default="wall", choices=["wall", "thread"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=60.0, help="skip a call whose warm-up takes longer (s)")
    p.add_argument("--method-budget", type=float, default=30.0, help="seconds per method and block")
    p.add_argument("--check-n", type=int, default=8)
    p.add_argument("--tol", type=float, default=1e-10, help="float64 check")
    p.add_argument("--tol32", type=float, default=1e-3, help="float32 check against the float64 reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", help="results folder (default ./bench-results/operators-<time>)")
    return p.parse_args(argv)


def grid(a) -> List[dict]:
    out: List[dict] = []
    if "biharmonic" in a.parts:
        for dt in a.dtype:
            for d in a.d:
                for n in a.n:
                    for mode in a.modes:
                        out.append(dict(part="biharmonic", device=a.device, dtype=dt, act=a.activation, d=d, width=a.width,
                                        depth=a.depth, N=n, mode=mode))
    if "sampled" in a.parts:
        for dt in a.dtype:
            for d in a.sampled_d:
                out.append(dict(part="sampled", device=a.device, dtype=dt, d=d, width=a.width, depth=a.depth,
                                N=a.sampled_n, samples=list(a.samples)))
    return out


def main(argv=None) -> int:
    """Run the grid; exit status 0 ok, 1 a check failed."""
    import torchhessdiag as thd

    from . import measure as M

    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    out = a.out or os.path.join("bench-results", f"operators-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    dev = M.pick_device(a.device)
    a.device = str(dev)
    env = M.env_info(dev)
    env.update(device_label=M.device_label(dev), torchhessdiag=thd.__version__, git=M.git_info(), loadavg=M.loadavg(),
               clock=a.clock, threads=torch.get_num_threads(), argv=sys.argv[1:] if argv is None else list(argv))
    blocks = grid(a)
    print(f"# torchhessdiag benchmark, operators preset: {len(blocks)} blocks; clock {a.clock}, {torch.get_num_threads()} threads")
    print(f"device {env['device_label']}, torch {env['torch']}, load {env['loadavg']}\n")
    records = []
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        for spec in blocks:
            rec = run_biharmonic_block(spec, a.methods, a) if spec["part"] == "biharmonic" else run_sampled_block(spec, a)
            records.append(rec)
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            print(bih_markdown(rec) if rec["part"] == "biharmonic" else sampled_markdown(rec), flush=True)
    env["loadavg_end"] = M.loadavg()
    env["elapsed_s"] = time.perf_counter() - t0
    summary = summary_markdown(records)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"env": env, "records": records}, f, indent=1, default=str)
    body = "\n".join(bih_markdown(r) if r["part"] == "biharmonic" else sampled_markdown(r) for r in records)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(f"# operators preset\n\ndevice {env['device_label']}, torch {env['torch']}, git {env['git'].get('commit')}, "
                f"clock {a.clock}, {env['threads']} threads, load average {env['loadavg']} -> {env['loadavg_end']}\n\n"
                "Ratios: the other method's median time over thd's (> 1: thd is faster), same run.\n\n" + summary + "\n\n" + body)
    print(summary)
    print(f"written to {out}/: report.md, results.json, results.jsonl ({env['elapsed_s']:.0f} s)")
    failed = [(r["key"], k) for r in records for k in r.get("failed", {})]
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
        return 1
    return 0


def main_from_cli(a) -> int:
    """``python -m torchhessdiag.bench --preset operators [options]``: the suite's --device (first),
    --dtype, --d, --width (first), --depth (first), --n, --modes, --repeats, --budget,
    --method-budget, --check-n, --seed, --threads and --out mapped onto this module's options
    (its --help has the rest: the sampled part's d and S, the clock)."""
    argv = ["--device", str(a.device[0]), "--dtype", *a.dtype, "--d", *map(str, a.d), "--width", str(a.width[0]),
            "--depth", str(a.depth[0]), "--n", *map(str, a.n or [512]), "--modes", *a.modes, "--repeats", str(a.repeats),
            "--budget", str(a.budget), "--method-budget", str(a.method_budget), "--check-n", str(a.check_n),
            "--seed", str(a.seed)]
    if getattr(a, "plan", False):
        blocks = grid(parse_args(argv))
        print(f"operators preset: {len(blocks)} blocks (no cost model for this preset; measured: the default grid in "
              "27 s on 1 thread of the 2-core CPU at load average 1.8):")
        for b in blocks:
            print("  " + (bih_key(b) if b["part"] == "biharmonic" else sampled_key(b)))
        return 0
    if a.threads:
        argv += ["--threads", str(a.threads)]
    if a.out:
        argv += ["--out", a.out]
    return main(argv)


if __name__ == "__main__":
    sys.exit(main())
