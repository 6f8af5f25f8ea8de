"""The ``dropin`` preset (issue 14): your own nested ``torch.autograd.grad`` code through
``torchhessdiag.nn.convert(model)`` against the same code through the torch.nn model.

The problem: an MLP ``depth x (Linear, activation), Linear -> 1`` (torch.nn's default
initialisation from a seed), N points x ~ N(0, 1)^d. The code timed is what DeepXDE-style PINN code
does -- one ``grad(u.sum(), x, create_graph=True)``, then one backward per input dimension:

* inference: the Hessian diagonal (N, d) and the Laplacian (its sum) of all N points (one call
  gives both: the Laplacian is the diagonal summed, so they are one measurement);
* training step: loss = mean((lap - 1)^2) with ``create_graph=True`` on every level, and
  ``loss.backward()`` to the weights.

The two methods run the same function on the same weights and points: ``torch.nn`` (the model as
built) and ``thd.nn`` (``torchhessdiag.nn.convert`` of it; for sin, cos and exp, which torch.nn
has no module for, the torch side is a module calling ``torch.sin`` etc. -- what SIREN code writes
-- and the drop-in side ``thd.nn.Sine`` / ``Cosine`` / ``Exp``). Every activation of the
derivative table is in the grid. Where torch.nn cannot do it at all (ReLU/LeakyReLU/Identity
networks: the second ``grad`` raises, their gradient has no graph to the input) the torch.nn side
is reported as failing with torch's error and the drop-ins are timed alone.

Steps of a block (a setting and a mode):

1. float64 check at ``check_n`` points: both methods against ``torch.func.vmap(hessian)`` of the
   torch.nn model (inference: the Hessian diagonal; training: the weight gradients of the loss
   built on torch.func's Laplacian), norm-wise relative error <= 1e-10 (exact zeros where the
   reference is exactly zero); a method that fails it is not timed (exit status 1).
2. budget probe (torchhessdiag/bench/runner.py ``probe``): one call at N/8 points, scaled; a
   method over ``--budget`` seconds per call or half the free memory is skipped with the reason.
3. warm-up at full size, and the full-size check in the benchmark dtype: inference, the drop-ins'
   diagonal at 32 spot points against float64 torch.func, tolerance ``max(16 e_torch, 1e-6)``
   (float32; e_torch is torch.nn's own error there) or 1e-10 (float64); training, the drop-ins'
   weight gradients against torch.nn's (all N points), ``max(64 e_torch, 1e-5)`` or 1e-10.
4. timed calls, round-robin (torch.nn, thd.nn, torch.nn, ...), ``--repeats`` samples each
   (fewer once a method's seconds in the block pass ``--method-budget``, at least 3); calls
   shorter than ``--min-sample-ms`` are timed in batches and reported per call. Clock: wall time
   (``--clock wall``, the default: what the intra-op threads cost together) or the calling
   thread's CPU time (``--clock thread``: with ``--threads 1`` the least noisy measure on a
   shared machine, what the design choices were made with).
5. peak live-tensor memory of one more call per method (torch.profiler's allocation events;
   ``--no-memory`` skips it).

The speed-up of a block is torch.nn's median over thd.nn's median (> 1: the drop-ins are
faster), also given from the minima. The report opens with the targets of issue 14 per
activation, dtype and mode: the smallest speed-up over the grid (>= 1.0 everywhere, >= 1.3 for
SiLU, GELU, Softplus, Sigmoid, ELU/CELU).

    python -m torchhessdiag.bench --preset dropin-quick            # ~2 minutes: every activation once
    python -m torchhessdiag.bench --preset dropin --out benchmarks/results/dropin_cpu \\
        --resume --max-minutes 60       # repeat until no blocks are left (exit status 3 = blocks left)
    python -m torchhessdiag.bench.dropin --activation tanh silu --d 2 8 --width 64 --n 4096 \\
        --dtype float32 --threads 1 --clock thread      # any part, this module's own options
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import math
import os
import sys
import time
import warnings
from collections import OrderedDict
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

import torchhessdiag as thd

from . import measure as M

# the report (dropin_report.py): what a run writes and reads back
from .dropin_report import METHODS, block_line, load_records, summary_markdown, write_report
from .runner import over_budget, probe

Tensor = torch.Tensor


class TorchFn(nn.Module):
    """The torch side of an activation torch.nn has no module for: torch.sin, torch.cos, torch.exp."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return getattr(torch, self.name)(x)


# name -> (torch.nn side, drop-in side)
ACTIVATIONS: "OrderedDict[str, Tuple[Callable[[], nn.Module], Callable[[], nn.Module]]]" = OrderedDict([
    ("tanh", (nn.Tanh, thd.nn.Tanh)),
    ("sigmoid", (nn.Sigmoid, thd.nn.Sigmoid)),
    ("softplus", (nn.Softplus, thd.nn.Softplus)),
    ("silu", (nn.SiLU, thd.nn.SiLU)),
    ("gelu", (nn.GELU, thd.nn.GELU)),
    ("gelu_tanh", (lambda: nn.GELU("tanh"), lambda: thd.nn.GELU("tanh"))),
    ("elu", (nn.ELU, thd.nn.ELU)),
    ("celu", (nn.CELU, thd.nn.CELU)),
    ("sin", (lambda: TorchFn("sin"), thd.nn.Sine)),
    ("cos", (lambda: TorchFn("cos"), thd.nn.Cosine)),
    ("exp", (lambda: TorchFn("exp"), thd.nn.Exp)),
    ("relu", (nn.ReLU, thd.nn.ReLU)),
    ("leaky_relu", (nn.LeakyReLU, thd.nn.LeakyReLU)),
    ("identity", (nn.Identity, thd.nn.Identity)),
])

GRID = dict(activation=list(ACTIVATIONS), dtype=["float32", "float64"], d=[1, 2, 3, 8, 32, 100],
            width=[32, 64, 256], depth=[3], n=[512, 4096], modes=["inference", "train"])
QUICK = dict(GRID, dtype=["float32"], d=[2], width=[32], n=[512])
PRESET_GRIDS = {"dropin": GRID, "dropin-quick": QUICK}
TOL64 = 1e-10
S_ROWS = 32


# ---- the problem ---------------------------------------------------------------------------------


def build_models(act: str, d: int, width: int, depth: int, seed: int, device, dtype) -> Tuple[nn.Module, nn.Module]:
    """(torch.nn model, drop-in model): the same weights; d -> width x depth -> 1."""
    torch_act, dropin_act = ACTIVATIONS[act]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers, fan = [], d
        for _ in range(depth):
            layers += [nn.Linear(fan, width), torch_act()]
            fan = width
        layers.append(nn.Linear(fan, 1))
    ref = nn.Sequential(*layers).to(device=device, dtype=dtype)
    ours = copy.deepcopy(ref)
    for i, m in enumerate(ours):
        if not isinstance(m, nn.Linear):
            ours[i] = dropin_act()
    return ref, ours


def make_input(n: int, d: int, device, dtype, seed: int) -> Tensor:
    """N(0, 1) points drawn in float64 from ``seed`` (the same values in both dtypes)."""
    gen = torch.Generator().manual_seed(seed + 1000 + d)
    return torch.randn(n, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def nested_hessian_diag(model: nn.Module, x: Tensor, create_graph: bool) -> Tensor:
    """(N, d) by nested reverse mode, as user code writes it (no allow_unused)."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    cols = []
    for i in range(x.shape[1]):
        (h,) = torch.autograd.grad(g[:, i].sum(), x, retain_graph=True, create_graph=create_graph)
        cols.append(h[:, i])
    return torch.stack(cols, dim=1)


def make_call(model: nn.Module, x: Tensor, mode: str) -> Callable[[], object]:
    """The timed call: inference -> (diag, lap); training -> one step, returns the loss."""
    if mode == "inference":
        def infer():
            diag = nested_hessian_diag(model, x, False)
            return diag, diag.sum(1)

        return infer
    params = list(model.parameters())

    def step():
        for p in params:
            p.grad = None
        lap = nested_hessian_diag(model, x, True).sum(1)
        loss = ((lap - 1.0) ** 2).mean()
        loss.backward()
        return loss.detach()

    return step


def weight_grads(model: nn.Module) -> Tensor:
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad.detach()).flatten()
                      for p in model.parameters()])


def func_hessian_diag(model: nn.Module, x: Tensor) -> Tensor:
    f = lambda xi: model(xi).squeeze(-1)  # noqa: E731
    return torch.func.vmap(torch.func.hessian(f))(x).diagonal(dim1=-2, dim2=-1)


def func_train_grads(model: nn.Module, x: Tensor) -> Tensor:
    for p in model.parameters():
        p.grad = None
    lap = func_hessian_diag(model, x).sum(1)
    loss = ((lap - 1.0) ** 2).mean()
    if loss.requires_grad:  # (a linear network's Laplacian has no graph to the weights: zeros)
        loss.backward()
    return weight_grads(model)


def rel_err(a: Tensor, ref: Tensor) -> float:
    """max |a - ref| / max |ref| over the entries where ref is finite, in float64 (where ref is
    exactly zero: max |a|, which must be 0); inf unless a is non-finite exactly where ref is,
    with the same infinities (a float32 exp network overflows in torch.nn and in the drop-ins
    alike; that is not a difference)."""
    a, ref = a.detach().double(), ref.detach().double()
    fin = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(a), fin) or not torch.equal(a[~fin].nan_to_num(), ref[~fin].nan_to_num()):
        return math.inf
    a, ref = a[fin], ref[fin]
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    err = float((a - ref).abs().max()) if ref.numel() else 0.0
    if err != err:
        return math.inf
    return err / scale if scale > 0 else (0.0 if err == 0 else math.inf)


def _err_text(e: BaseException) -> str:
    s = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return f"{type(e).__name__}: {s}"


# ---- a block -------------------------------------------------------------------------------------


def block_key(b: dict) -> str:
    return (f"{b['device']}|{b['dtype']}|{b['activation']}|d={b['d']}|w={b['width']}x{b['depth']}|"
            f"N={b['N']}|{b['mode']}")


def check_float64(b: dict, seed: int, check_n: int, device) -> dict:
    """Step 1: both methods vs float64 torch.func at check_n points."""
    ref_m, ours_m = build_models(b["activation"], b["d"], b["width"], b["depth"], seed, device, torch.float64)
    x = make_input(check_n, b["d"], device, torch.float64, seed + 7)
    out = {"n": check_n, "tol": TOL64, "errors": {}, "failures": {}}
    train = b["mode"] == "train"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the piecewise-linear warning of ReLU drop-ins
        if train:
            ref = func_train_grads(ref_m, x)
        else:
            ref = func_hessian_diag(ref_m, x).detach()
        for name, model in zip(METHODS, (ref_m, ours_m)):
            try:
                model.requires_grad_(train)
                r = make_call(model, x, b["mode"])()
                got = weight_grads(model) if train else r[0]
                out["errors"][name] = rel_err(got, ref)
            except Exception as e:  # noqa: BLE001 - torch.nn cannot do it (ReLU, Identity) or a bug
                out["failures"][name] = _err_text(e)
    return out


def full_check(b: dict, models: Dict[str, nn.Module], x: Tensor, outs: Dict[str, object], seed: int) -> dict:
    """Step 3: the drop-ins in the benchmark dtype at full size."""
    dtype = x.dtype
    res: dict = {}
    train = b["mode"] == "train"
    N = x.shape[0]
    idx = torch.linspace(0, N - 1, min(S_ROWS, N)).round().long().unique()
    ref64, _ = build_models(b["activation"], b["d"], b["width"], b["depth"], seed, x.device, torch.float64)
    xs = x[idx].contiguous()
    if not train:
        truth = func_hessian_diag(ref64, xs.double()).detach()
        e_torch = rel_err(outs["torch.nn"][0][idx], truth) if "torch.nn" in outs else None
        tol = TOL64 if dtype == torch.float64 else max(16 * (e_torch or 1e-6), 1e-6)
        res.update(against="float64 torch.func at the spot points", points=int(idx.numel()))
        res["error"] = rel_err(outs["thd.nn"][0][idx], truth)
    else:
        ref64.requires_grad_(True)
        truth = func_train_grads(ref64, xs.double())
        if "torch.nn" in outs:
            small, _ = build_models(b["activation"], b["d"], b["width"], b["depth"], seed, x.device, dtype)
            small.requires_grad_(True)
            make_call(small, xs, "train")()
            e_torch = rel_err(weight_grads(small), truth)
            tol = TOL64 if dtype == torch.float64 else max(64 * e_torch, 1e-5)
            res.update(against="torch.nn's weight gradients (all N points)")
            res["error"] = rel_err(outs["thd.nn"], outs["torch.nn"])
        else:  # torch.nn cannot: the drop-ins at the spot points against float64 torch.func
            e_torch = None
            small = models["thd.nn"]
            make_call(small, xs, "train")()
            tol = TOL64 if dtype == torch.float64 else 1e-4
            res.update(against="float64 torch.func's weight gradients at the spot points")
            res["error"] = rel_err(weight_grads(small), truth)
    res.update(tol=tol, torch_error=e_torch, ok=res["error"] <= tol)
    ref_out = outs.get("torch.nn")
    if ref_out is not None:
        t = ref_out if train else ref_out[0]
        bad = int((~torch.isfinite(t)).sum())
        if bad:  # e.g. exp(exp(exp(.))) overflows float32: compared where finite, same pattern
            res["note"] = f"torch.nn's own result has {bad} non-finite entries of {t.numel()} (the drop-ins' the same)"
    return res


def _clock(kind: str) -> Callable[[], float]:
    return time.thread_time if kind == "thread" else time.perf_counter


def time_methods(fns: Dict[str, Callable], repeats: int, method_budget: float, min_sample_s: float,
                 clock: str, warm: Dict[str, float]) -> Tuple[Dict[str, List[float]], Dict[str, int]]:
    """Round-robin samples; calls shorter than min_sample_s are batched (reported per call)."""
    now = _clock(clock)
    reps = {}
    for k, f in fns.items():
        if warm.get(k, 0.0) >= 5 * min_sample_s or min_sample_s <= 0:
            continue
        best = math.inf
        for _ in range(3):
            t0 = now()
            f()
            best = min(best, now() - t0)
        if best < min_sample_s:
            reps[k] = int(min(100000, math.ceil(min_sample_s / max(best, 1e-7))))
    times: Dict[str, List[float]] = {k: [] for k in fns}
    spent = dict(warm)
    active = list(fns)
    while active:
        for k in list(active):
            n = reps.get(k, 1)
            t0 = now()
            for _ in range(n):
                fns[k]()
            dt = now() - t0
            times[k].append(dt / n)
            spent[k] = spent.get(k, 0.0) + dt
            if len(times[k]) >= repeats or (len(times[k]) >= min(3, repeats) and spent[k] > method_budget):
                active.remove(k)
    return times, reps


def run_block(b: dict, a, progress=None) -> dict:
    device, dtype = torch.device(b["device"]), M.parse_dtype(b["dtype"])
    t0 = time.perf_counter()
    rec: dict = {"key": block_key(b), "setting": dict(b), "loadavg_before": M.loadavg(),
                 "skipped": {}, "failed": {}, "ok": True}

    def note(s):
        if progress is not None:
            progress.note(f"{rec['key']}: {s}")

    note("float64 check")
    chk = check_float64(b, a.seed, a.check_n, device)
    rec["check_float64"] = chk
    runnable = []
    for k in METHODS:
        if k in chk["failures"]:
            if k == "torch.nn":
                rec["skipped"][k] = "torch cannot: " + chk["failures"][k]
            else:
                rec["failed"][k] = "float64 check: " + chk["failures"][k]
        elif not chk["errors"][k] <= TOL64:
            rec["failed"][k] = f"float64 check: rel. error {chk['errors'][k]:.1e} > {TOL64:g}"
        else:
            runnable.append(k)
    ref_m, ours_m = build_models(b["activation"], b["d"], b["width"], b["depth"], a.seed, device, dtype)
    models = {"torch.nn": ref_m, "thd.nn": ours_m}
    train = b["mode"] == "train"
    for m in models.values():
        m.requires_grad_(train)
    x = make_input(b["N"], b["d"], device, dtype, a.seed)
    rec["probe"] = {}
    for k in list(runnable):
        note(f"probe {k}")
        try:
            pr = probe(lambda xx, m=models[k]: make_call(m, xx, b["mode"]), x, device, True, a.budget)
        except Exception as e:  # noqa: BLE001
            rec["skipped" if "out of memory" in str(e).lower() else "failed"][k] = "probe: " + _err_text(e)
            runnable.remove(k)
            continue
        rec["probe"][k] = pr
        why = over_budget(pr, a.budget, device)
        if why:
            rec["skipped"][k] = why
            runnable.remove(k)
    fns, outs, warm = {}, {}, {}
    for k in list(runnable):
        note(f"warm-up {k}")
        try:
            fns[k] = make_call(models[k], x, b["mode"])
            t = time.perf_counter()
            r = fns[k]()
            warm[k] = time.perf_counter() - t
            outs[k] = weight_grads(models[k]).clone() if train else r
        except Exception as e:  # noqa: BLE001
            rec["failed"][k] = "full-size call: " + _err_text(e)
            runnable.remove(k)
            fns.pop(k, None)
    if "thd.nn" in outs:
        note("full-size check")
        rec["full_check"] = full_check(b, models, x, outs, a.seed)
        if not rec["full_check"]["ok"]:
            rec["failed"]["thd.nn"] = (f"full-size {b['dtype']} check: rel. error "
                                       f"{rec['full_check']['error']:.1e} > {rec['full_check']['tol']:.1e}")
            fns.pop("thd.nn", None)
    del outs
    note("timing")
    times, reps = time_methods(fns, a.repeats, a.method_budget, a.min_sample_ms / 1e3, a.clock,
                               {k: v for k, v in warm.items() if k in fns})
    rec["clock"] = a.clock
    rec["calls_per_sample"] = reps
    rec["times_s"] = times
    rec["stats_s"] = {k: M.summarize(v) for k, v in times.items() if v}
    st = rec["stats_s"]
    if "torch.nn" in st and "thd.nn" in st:
        rec["speedup"] = st["torch.nn"]["median"] / st["thd.nn"]["median"]
        rec["speedup_min"] = st["torch.nn"]["min"] / st["thd.nn"]["min"]
    rec["memory"] = {}
    if a.memory:
        for k, f in fns.items():
            note(f"memory {k}")
            try:
                rec["memory"][k] = M.cpu_peak_tensor(f, collect=False)["peak_bytes"]
            except Exception as e:  # noqa: BLE001
                rec["memory"][k] = _err_text(e)
    rec["ok"] = not rec["failed"]
    rec["threads"] = torch.get_num_threads()
    rec["loadavg_after"] = M.loadavg()
    rec["elapsed_s"] = time.perf_counter() - t0
    del fns, models
    gc.collect()
    return rec


# ---- the grid and the report ---------------------------------------------------------------------


def grid(a) -> List[dict]:
    out = []
    for act, dt, d, w, n, mode in itertools.product(a.activation, a.dtype, a.d, a.width, a.n, a.modes):
        for depth in a.depth:
            out.append(dict(device=a.device, dtype=dt, activation=act, d=d, width=w, depth=depth, N=n,
                            mode=mode))
    return out


def plan(blocks: List[dict], a) -> str:
    """A rough duration: GEMM FLOPs of nested autograd at an assumed rate (50 GFLOP/s float32,
    25 float64: what one thread of the 2-core AMD EPYC this was written on reached in these
    blocks) plus a per-op overhead, times the calls of a block (check, probe, warm-up, repeats)
    for both methods, plus ~0.5 s of checks per block. Calibrated on three runs of 16-28 blocks
    (15-36 s measured); take it as +-2x."""
    total = 0.0
    for b in blocks:
        w, L, d, n = b["width"], b["depth"], b["d"], b["N"]
        macs = n * (d * w + (L - 1) * w * w + w)
        passes = 1 + 1 + 2 * d  # forward, gradient, d backward passes (~2 GEMMs each per layer)
        flops = 2 * macs * passes * (3 if b["mode"] == "train" else 1)
        rate = 50e9 if b["dtype"] == "float32" else 25e9
        call = flops / rate + 40e-6 * L * (d + 2) * (3 if b["mode"] == "train" else 1)
        calls = a.repeats + 4 + (1 if a.memory else 0)
        total += 2 * calls * max(call, a.min_sample_ms / 1e3 if call < a.min_sample_ms / 1e3 else call) + 0.5
    return (f"{len(blocks)} blocks, roughly {total / 60:.1f} minutes (+-2x; a loaded machine is "
            f"slower); split a long grid with --max-minutes and --resume.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m torchhessdiag.bench.dropin",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESET_GRIDS), default="dropin-quick",
                   help="the grid; explicit options below replace its dimensions")
    p.add_argument("--device", default="cpu")
    p.add_argument("--activation", nargs="+", choices=list(ACTIVATIONS))
    p.add_argument("--dtype", nargs="+", choices=["float32", "float64"])
    p.add_argument("--d", type=int, nargs="+")
    p.add_argument("--width", type=int, nargs="+")
    p.add_argument("--depth", type=int, nargs="+")
    p.add_argument("--n", type=int, nargs="+")
    p.add_argument("--modes", nargs="+", choices=["inference", "train"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=60.0, help="skip a method estimated slower per call")
    p.add_argument("--method-budget", type=float, default=20.0,
                   help="seconds per method and block after which it gets no more samples (min 3)")
    p.add_argument("--min-sample-ms", type=float, default=20.0)
    p.add_argument("--check-n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="wall time, or the calling thread's CPU time (use with --threads 1)")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--out", help="results folder (default ./bench-results/<preset>-<time>)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--plan", action="store_true", help="print the blocks' count and a rough duration")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    g = PRESET_GRIDS[a.preset]
    a.overridden = [k for k in ("activation", "dtype", "d", "width", "depth", "n", "modes")
                    if getattr(a, k) is not None]
    for k in ("activation", "dtype", "d", "width", "depth", "n", "modes"):
        if getattr(a, k) is None:
            setattr(a, k, list(g[k]))
    if min(a.d) < 1 or min(a.width) < 1 or min(a.depth) < 1 or min(a.n) < 1:
        p.error("--d, --width, --depth and --n must be >= 1")
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    if a.resume and not a.out:
        p.error("--resume needs --out")
    if torch.device(a.device).type != "cpu":
        p.error("the dropin preset runs on the CPU (--device cpu): its targets are CPU targets")
    if a.clock == "thread" and a.threads != 1:
        print("note: --clock thread measures the calling thread only; with --threads > 1 the other "
              "intra-op threads' work is not counted", file=sys.stderr)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    blocks = grid(a)
    if a.plan:
        print(plan(blocks, a))
        return 0
    t0 = time.perf_counter()
    out = a.out or os.path.join("bench-results", f"{a.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    jsonl = os.path.join(out, "results.jsonl")
    old = load_records(jsonl) if a.resume else []
    if not a.resume and os.path.exists(jsonl):
        os.replace(jsonl, jsonl + ".previous")
    done = {r["key"] for r in old}
    todo = [b for b in blocks if block_key(b) not in done]
    env = M.env_info(torch.device(a.device))
    env.update(torchhessdiag=thd.__version__, cpu_isa=thd.backend_info().get("cpu_isa"), git=M.git_info(),
               loadavg=M.loadavg(), clock=a.clock, preset=a.preset)
    what = a.preset + (f" with --{', --'.join(a.overridden)} replaced" if a.overridden else "")
    env["grid"] = what
    print(f"# drop-in benchmark ({what}): {len(blocks)} blocks, {len(blocks) - len(todo)} already in "
          f"{out}; {a.threads} threads, clock {a.clock}; load average {env['loadavg'][:1]}")
    bar = M.Progress(len(todo), "dropin", enabled=a.progress)
    new, left = [], 0
    for i, b in enumerate(todo):
        if a.max_minutes is not None and time.perf_counter() - t0 > a.max_minutes * 60:
            left = len(todo) - i
            break
        rec = run_block(b, a, bar)
        rec["env"] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "git": env["git"].get("commit")}
        new.append(rec)
        with open(jsonl, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        bar.update(1, "")
        print(block_line(rec), flush=True)
    bar.close()
    order = {block_key(b): i for i, b in enumerate(blocks)}
    records = sorted(old + new, key=lambda r: order.get(r["key"], len(order)))
    env["loadavg_end"] = M.loadavg()
    env["elapsed_s"] = round(time.perf_counter() - t0, 1)
    write_report(out, env, records, a.clock)
    print("\n" + summary_markdown(records))
    print(f"\nload average {env['loadavg'][0]} at the start, {env['loadavg_end'][0]} at the end; "
          f"{env['elapsed_s']:.0f} s. Written to {out}/ (report.md, results.json, results.jsonl)")
    failed = [(r["key"], k) for r in records for k in r.get("failed", {})]
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
        return 1
    if left:
        print(f"{left} blocks left: run the same command again with --resume --out {out}", file=sys.stderr)
        return 3
    return 0


def main_from_cli(a) -> int:
    """``python -m torchhessdiag.bench --preset dropin|dropin-quick [options]``: the suite's grid
    options (--dtype, --d, --width, --depth, --n, --modes) replace the preset's dimensions when
    given; --activation of the MLP suite does not apply (its choices are five activations):
    use ``python -m torchhessdiag.bench.dropin --activation ...`` for a subset."""
    argv = ["--preset", a.preset, "--repeats", str(a.repeats or 5), "--min-sample-ms", str(a.min_sample_ms),
            "--seed", str(a.seed), "--threads", str(a.threads or 2)]
    ov = getattr(a, "grid_override", {})
    for k in ("dtype", "d", "width", "depth", "n", "modes"):
        if k in ov:
            argv += [f"--{k}", *map(str, ov[k])]
    if a.budget:
        argv += ["--budget", str(a.budget)]
    if a.method_budget:
        argv += ["--method-budget", str(a.method_budget)]
    if a.check_n:
        argv += ["--check-n", str(a.check_n)]
    if not a.memory:
        argv.append("--no-memory")
    if a.out:
        argv += ["--out", a.out]
    if a.resume:
        argv.append("--resume")
    if a.max_minutes is not None:
        argv += ["--max-minutes", str(a.max_minutes)]
    if a.plan:
        argv.append("--plan")
    if not a.progress:
        argv.append("--no-progress")
    return main(argv)


if __name__ == "__main__":
    sys.exit(main())
