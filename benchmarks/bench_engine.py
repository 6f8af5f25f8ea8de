"""Engine benchmark: Hessian diagonal and Laplacian of an MLP, torchhessdiag vs the alternatives.

The problem (defaults = the issue's setting): a tanh MLP with ``--d`` inputs (a list: one block of
results per d), ``--depth`` hidden layers of ``--width`` units and a linear output to one unit,
``--n`` points, ``--dtype`` float32. For every d all methods run in the same process on the same
weights and inputs.

Inference (``--modes inference``), each call computes the quantity for all N points from x:

* ``thd.mlp_hessian_diag`` and ``thd.mlp_laplacian``, under ``torch.no_grad``;
* nested autograd: u = model(x); g = grad(u.sum(), x, create_graph=True); then one
  grad(g[:, i].sum(), x, retain_graph=True) per input dimension -> the Hessian diagonal, and its
  sum (the Laplacian) from the same call;
* ``torch.func``: vmap(hessian(f)) with f mapping one point (d,) to the scalar output, diagonal
  taken (under no_grad: the transforms ignore it, but no outer graph is recorded);
* plain PyTorch forward Laplacian, the yardstick written here: carry the value h (N, w), the
  Jacobian rows J (N, d, w) and the summed second derivative s (N, w) through the layers --
  linear: h = h W^T + b, J = J W^T, s = s W^T; tanh: t = tanh(h), s1 = 1 - t^2, s2 = -2 t s1,
  s = s1 s + s2 sum_i J_i^2, J = s1 J, h = t. The Hessian-diagonal variant carries per-direction
  second derivatives S (N, d, w) instead: S = S W^T, S = s1 S + s2 J^2. Both start from J = W1^T
  after the first layer (J0 = I, so no GEMM on the identity) and skip J after the last tanh;
* the "floor": the GEMMs the engine itself does, alone (``torch.mm`` into preallocated outputs,
  biases not added): the forward row (N x d -> w, then w -> w for the other hidden layers, w -> 1),
  the backward row (N x 1 -> w, w -> w, ..., w -> d) and the first-order rows through the hidden
  layers 2..depth (N*K rows, w x w each). Layer 1 has no per-point GEMM (its Jacobian is the
  constant W1 V) and the output layer none for the rows (nothing follows the last activation).
  K = d for the Hessian diagonal; K = min(d, width) for the Laplacian. It leaves out everything
  else the engine does: activation tables, the fused row kernel, the small layer-1 GEMM
  c1 @ (W1 V)^2, allocation and Python overhead.

Training step (``--modes train``): loss = mean((lap - 1)^2), ``loss.backward()`` to the weights
(grads set to None before each run), the Laplacian from: ``thd.mlp_laplacian``; nested autograd
with create_graph=True on every level; the plain forward Laplacian (autograd through it);
torch.func (vmap(hessian), trace).

Checks, before anything is timed (exit status 1 if one fails):

* float64, N = ``--check-n`` (16): every method (both modes: the Laplacian/Hessian diagonal, and
  the loss gradient to the weights) against torch.func on a float64 copy of the same weights;
  norm-wise relative error max|a - ref| / max|ref| <= 1e-10;
* full size in ``--dtype``: the output of each method's first (warm-up) call against nested
  autograd's -- norm-wise relative difference <= 1e-4 in float32 (unit roundoff 6e-8; observed
  ~1e-6), 1e-10 in float64; in training mode the same for the weight gradients.

Budget (the default run has to fit in ~10 minutes of a 2-core CPU): before its full-size warm-up
each method runs on N/8 points; where the time scaled to N exceeds ``--budget`` seconds per call,
or (torch.func, and nested autograd in training) the live-tensor peak scaled to N exceeds half the
available memory, the method is skipped, with the reason in the report. In the timed rounds a
method gets no more calls once its seconds in this block (warm-up included) exceed
``--method-budget``, so slow methods may have fewer than ``--repeats`` samples (column n; at
least one, at least 3 for the engine calls and the floor); a warm-up call longer than half the
method budget counts as one of the samples (n marked *).

Timing: ``--warmup`` untimed calls, then ``--repeats`` timed calls per method, round-robin over
the methods (benchmarks/_common.py: wall time on the CPU, CUDA events + synchronize on CUDA);
median, min, max and IQR reported, ratios of medians (and of minima, which the stalls of a shared
machine disturb less). Peak memory (``--memory``): on CPU the resident-set increase of the first
full-size call in a fresh process per method and the live-tensor peak from the profiler's
allocation events (see _common.py); on CUDA max_memory_allocated in this process.

    python benchmarks/bench_engine.py                         # issue setting, auto device
    python benchmarks/bench_engine.py --quick                 # smoke run, seconds
    python benchmarks/bench_engine.py --device cuda --repeats 10 --memory --json out.json
    python benchmarks/bench_engine.py --d 32 --modes inference --profile
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
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import torchhessdiag as thd  # noqa: E402

Tensor = torch.Tensor

# key -> (label, what one call gives: "diag", "lap" or "both")
INF_METHODS = {
    "thd_diag": ("thd.mlp_hessian_diag", "diag"),
    "thd_lap": ("thd.mlp_laplacian", "lap"),
    "nested": ("nested autograd", "both"),
    "func": ("torch.func vmap(hessian)", "both"),
    "fwd_diag": ("plain fwd Hessian diag", "diag"),
    "fwd_lap": ("plain fwd Laplacian", "lap"),
}
TRAIN_METHODS = {
    "thd_lap": "thd.mlp_laplacian",
    "nested": "nested autograd",
    "fwd_lap": "plain fwd Laplacian",
    "func": "torch.func vmap(hessian)",
}
DIAG_RIVALS = ("nested", "func", "fwd_diag")  # the other Hessian-diagonal methods
# methods whose memory can blow up: their probe also measures the live-tensor peak
HEAVY = {"inference": ("func",), "train": ("func", "nested")}
PIVOT = "nested"  # full-size agreement is measured against nested autograd

TARGET_DIAG = 1.7  # mlp_hessian_diag vs the fastest other Hessian-diagonal method
TARGET_LAP = 1.1  # mlp_laplacian vs the plain forward Laplacian
TARGET_FLOOR = 1.3  # engine within this factor of the floor
TARGET_TRAIN = 1.3  # training step vs the best other


# ---- the problem ---------------------------------------------------------------------------------


def build_base(d: int, width: int, depth: int, seed: int) -> nn.Sequential:
    """The float32 CPU model, weights from ``seed`` (torch.nn's default init)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers, fan = [], d
        for _ in range(depth):
            layers += [nn.Linear(fan, width), nn.Tanh()]
            fan = width
        layers.append(nn.Linear(fan, 1))
        return nn.Sequential(*layers)


def model_as(base: nn.Module, device, dtype) -> nn.Sequential:
    """A copy of base (same weights) on device/dtype."""
    return copy.deepcopy(base).to(device=device, dtype=dtype)


def make_input(n: int, d: int, device, dtype, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed + 1000 + d)
    return torch.randn(n, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


# ---- the methods ---------------------------------------------------------------------------------


def nested_autograd(model: nn.Module, x: Tensor, create_graph: bool = False):
    """(Hessian diagonal (N, d), Laplacian (N,)) by nested reverse mode, from one call."""
    x = x.detach().requires_grad_(True)
    u = model(x)
    (g,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    cols = []
    for i in range(x.shape[1]):
        (h,) = torch.autograd.grad(g[:, i].sum(), x, retain_graph=True, create_graph=create_graph)
        cols.append(h[:, i])
    diag = torch.stack(cols, dim=1)
    return diag, diag.sum(1)


def torch_func(model: nn.Module, x: Tensor):
    """(Hessian diagonal (N, d), Laplacian (N,)): vmap of torch.func.hessian, diagonal taken."""

    def f(xi):  # one point (d,) -> scalar
        return model(xi).squeeze(-1)

    diag = torch.func.vmap(torch.func.hessian(f))(x).diagonal(dim1=-2, dim2=-1)
    return diag, diag.sum(1)


def plain_forward(model: nn.Sequential, x: Tensor, per_direction: bool) -> Tensor:
    """The plain-PyTorch forward Laplacian (N,) or, per_direction, Hessian diagonal (N, d).

    Carries h (N, w), J (N, d, w) -- rows J_i = d h / d x_i -- and s (N, w) = sum_i d^2 h / dx_i^2
    (or S (N, d, w) per direction) through a Sequential of Linear and Tanh layers.
    """
    mods = list(model)
    last_act = max(i for i, m in enumerate(mods) if isinstance(m, nn.Tanh))
    h, J, s = x, None, None  # J None: the identity (J0 = I); s None: zero
    for i, m in enumerate(mods):
        if isinstance(m, nn.Linear):
            W = m.weight
            h = F.linear(h, W, m.bias)
            if i < last_act:  # J is not needed after the last activation
                # layer 1: J = I W^T, the same for every point. contiguous(): the transposed
                # view would make s1 * J a non-contiguous (N, d, w) whose next matmul falls back
                # to bmm (~2.5x slower than the mm of the folded rows)
                J = W.t().contiguous() if J is None else torch.matmul(J, W.t())
            if s is not None:
                s = torch.matmul(s, W.t())
        elif isinstance(m, nn.Tanh):
            t = torch.tanh(h)
            s1 = 1 - t * t
            s2 = -2 * t * s1
            J2 = J * J  # (d, w) after layer 1 (the same for every point), else (N, d, w)
            if per_direction:
                new = s2.unsqueeze(1) * J2
                s = new if s is None else s1.unsqueeze(1) * s + new
            else:
                new = s2 * J2.sum(-2)
                s = new if s is None else s1 * s + new
            if i < last_act:
                J = s1.unsqueeze(1) * J
            h = t
        else:
            raise TypeError(f"plain_forward: unexpected layer {type(m).__name__}")
    return s.squeeze(-1)  # (N,) or (N, d)


def _nograd(fn: Callable, *args, **kw):
    with torch.no_grad():
        return fn(*args, **kw)


def inference_fn(key: str, model: nn.Module, x: Tensor) -> Callable[[], Dict[str, Tensor]]:
    """A zero-argument call of method ``key``; returns {"diag": (N, d), "lap": (N,)} (what it has)."""
    if key == "thd_diag":
        return lambda: {"diag": _nograd(thd.mlp_hessian_diag, model, x).squeeze(1)}
    if key == "thd_lap":
        return lambda: {"lap": _nograd(thd.mlp_laplacian, model, x).squeeze(1)}
    if key == "nested":
        return lambda: dict(zip(("diag", "lap"), nested_autograd(model, x)))
    if key == "func":
        return lambda: dict(zip(("diag", "lap"), _nograd(torch_func, model, x)))
    if key == "fwd_diag":
        return lambda: {"diag": _nograd(plain_forward, model, x, True)}
    if key == "fwd_lap":
        return lambda: {"lap": _nograd(plain_forward, model, x, False)}
    raise KeyError(key)


def laplacian_for_training(key: str, model: nn.Module, x: Tensor) -> Tensor:
    """The Laplacian (N,) with a graph to the weights."""
    if key == "thd_lap":
        return thd.mlp_laplacian(model, x).squeeze(1)
    if key == "nested":
        return nested_autograd(model, x, create_graph=True)[1]
    if key == "fwd_lap":
        return plain_forward(model, x, False)
    if key == "func":
        return torch_func(model, x)[1]
    raise KeyError(key)


def train_fn(key: str, model: nn.Module, x: Tensor) -> Callable[[], Tensor]:
    """One training step: grads to None, loss = mean((lap - 1)^2), backward. Returns the loss."""
    params = list(model.parameters())

    def run():
        for p in params:
            p.grad = None
        loss = ((laplacian_for_training(key, model, x) - 1.0) ** 2).mean()
        loss.backward()
        return loss.detach()

    return run


def flat_grads(model: nn.Module) -> Tensor:
    """All weight gradients, flattened (None -> zeros: the Laplacian does not depend on the output
    bias, and some methods leave its grad None)."""
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad.detach()).flatten()
                      for p in model.parameters()])


def floor_fn(model: nn.Sequential, x: Tensor, K: int) -> Callable[[], None]:
    """The engine's GEMMs alone (see the module docstring), on preallocated outputs."""
    Ws = [m.weight.detach() for m in model if isinstance(m, nn.Linear)]
    N = x.shape[0]
    fwd_out = [x.new_empty(N, W.shape[0]) for W in Ws]
    bwd_out = [x.new_empty(N, W.shape[1]) for W in Ws]
    g0 = x.new_ones(N, Ws[-1].shape[0])
    hidden = Ws[1:-1]  # layers 2..depth: (w, w)
    width = Ws[0].shape[0]
    # a fixed input (never overwritten: values must not decay call after call into denormals,
    # which are slow on CPUs) and two ping-pong outputs
    rows_in = x.new_empty(N * K, width).normal_()
    outs = [x.new_empty(N * K, width), x.new_empty(N * K, width)]
    xd = x.detach()

    def run():
        h = xd
        for W, out in zip(Ws, fwd_out):  # forward row
            torch.mm(h, W.t(), out=out)
            h = out
        g = g0
        for W, out in zip(reversed(Ws), reversed(bwd_out)):  # backward row
            torch.mm(g, W, out=out)
            g = out
        a = rows_in
        for i, W in enumerate(hidden):  # first-order rows, N*K at a time
            torch.mm(a, W.t(), out=outs[i % 2])
            a = outs[i % 2]

    return run


# ---- checks --------------------------------------------------------------------------------------


def rel_err(a: Tensor, ref: Tensor) -> float:
    """max |a - ref| / max |ref| (norm-wise relative error)."""
    a, ref = a.detach().to(torch.float64), ref.detach().to(torch.float64)
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def check_float64(base: nn.Module, d: int, device, args, keys_inf, keys_train) -> dict:
    """Every method vs float64 torch.func at small N: outputs, and the loss gradient to the weights."""
    m64 = model_as(base, device, torch.float64)
    x = make_input(args.check_n, d, device, torch.float64, args.seed + 7)
    with torch.no_grad():
        ref_diag, ref_lap = torch_func(m64, x)
    out = {"n": args.check_n, "inference": {}, "train": {}}
    for key in keys_inf:
        m64.requires_grad_(False)
        res = inference_fn(key, m64, x)()
        for q, v in res.items():
            out["inference"][f"{key}:{q}"] = rel_err(v, ref_diag if q == "diag" else ref_lap)
    m64.requires_grad_(True)
    if keys_train:
        train_fn("func", m64, x)()
        ref_g = flat_grads(m64)
        for key in keys_train:
            train_fn(key, m64, x)()
            out["train"][key] = rel_err(flat_grads(m64), ref_g)
    errs = list(out["inference"].values()) + list(out["train"].values())
    out["max"] = max(errs)
    out["tol"] = 1e-10
    out["ok"] = all(e <= 1e-10 for e in errs)  # NaN fails
    return out


def full_tol(dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-4


# ---- budget probe --------------------------------------------------------------------------------


def avail_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def probe(make: Callable[[Tensor], Callable], x: Tensor, device, with_memory: bool,
          budget: float) -> dict:
    """One call on N/8 points (after a tiny warm-up), repeated once where it looks over the budget
    (a stall of the shared machine should not skip a method), and optionally the live-tensor
    peak; both scaled to N. A small call carries more fixed overhead per point, so the scaled
    time errs on the high side."""
    N = x.shape[0]
    n_p = max(1, min(N, max(16, N // 8)))
    scale = N / n_p
    make(x[: min(4, N)].contiguous())()  # load kernels and libraries, not timed
    fn = make(x[:n_p].contiguous())
    C.synchronize(device)
    t = C.time_once(fn, device)
    if t * scale > budget:
        t = min(t, C.time_once(fn, device))
    out = {"n": n_p, "seconds_scaled": t * scale}
    if with_memory:
        peak = C.cuda_peak(fn, device) if device.type == "cuda" else C.cpu_peak_tensor(fn)
        out["peak_bytes_scaled"] = peak["peak_bytes"] * scale
    return out


def over_budget(pr: dict, args, device) -> Optional[str]:
    if pr["seconds_scaled"] > args.budget:
        return (f"est. {pr['seconds_scaled']:.0f} s per call (from N={pr['n']}) > --budget "
                f"{args.budget:g} s")
    if "peak_bytes_scaled" in pr and pr["peak_bytes_scaled"] > 0.5 * avail_bytes(device):
        return (f"est. {pr['peak_bytes_scaled'] / 2**30:.1f} GiB (from N={pr['n']}) > half the "
                f"available {avail_bytes(device) / 2**30:.1f} GiB")
    return None


def time_budgeted(fns: Dict[str, Callable], first: Dict[str, List[float]],
                  spent: Dict[str, float], device, repeats: int, method_budget: float,
                  min_calls: Dict[str, int]) -> Dict[str, List[float]]:
    """Round-robin timed calls (methods interleaved call by call), starting from the samples in
    ``first``. A method leaves the rotation when it has ``repeats`` samples, or at least
    ``min_calls[k]`` (default 1) and its seconds so far (``spent``: warm-up included) exceed
    ``method_budget``."""
    times: Dict[str, List[float]] = {k: list(first.get(k, [])) for k in fns}
    spent = dict(spent)

    def done(k):
        n = len(times[k])
        return n >= repeats or (n >= min_calls.get(k, 1) and spent.get(k, 0.0) > method_budget)

    active = [k for k in fns if not done(k)]
    while active:
        for k in list(active):
            t = C.time_once(fns[k], device)
            times[k].append(t)
            spent[k] = spent.get(k, 0.0) + t
            if done(k):
                active.remove(k)
    return times


# ---- one block: a d and a mode ---------------------------------------------------------------------


def run_block(mode: str, base, d: int, device, dtype, args) -> dict:
    """Probe, warm up + check at full size, time interleaved; returns the raw results."""
    model = model_as(base, device, dtype)
    x = make_input(args.n, d, device, dtype, args.seed)
    keys = [k for k in (INF_METHODS if mode == "inference" else TRAIN_METHODS) if k in args.methods]
    model.requires_grad_(mode == "train")
    if mode == "inference":
        make = lambda k: (lambda xx: inference_fn(k, model, xx))  # noqa: E731
    else:
        make = lambda k: (lambda xx: train_fn(k, model, xx))  # noqa: E731
    res: dict = {"skipped": {}, "probe": {}, "warmup_s": {}, "agreement": {}}

    # budget probe
    for k in keys:
        pr = probe(make(k), x, device, k in HEAVY[mode], args.budget)
        res["probe"][k] = pr
        why = over_budget(pr, args, device)
        if why:
            res["skipped"][k] = why
    keys = [k for k in keys if k not in res["skipped"]]

    # full-size warm-up calls; the first one's output is kept for the agreement check
    fns = {k: make(k)(x) for k in keys}
    outs = {}
    for k in keys:
        res["warmup_s"][k] = []
        for w in range(max(1, args.warmup)):
            C.synchronize(device)
            t0 = time.perf_counter()
            r = fns[k]()
            C.synchronize(device)
            res["warmup_s"][k].append(time.perf_counter() - t0)
            if w == 0:
                outs[k] = r if mode == "inference" else flat_grads(model).clone()
            del r
    tol = full_tol(dtype)
    pivot = PIVOT if PIVOT in outs else (keys[0] if keys else None)
    ok = True
    for k in keys:
        if k == pivot:
            continue
        if mode == "inference":
            for q, v in outs[k].items():
                ref = outs[pivot].get(q)
                if ref is None and q == "lap" and "diag" in outs[pivot]:
                    ref = outs[pivot]["diag"].sum(1)  # nested autograd, the pivot, has both
                if ref is None:
                    continue
                e = rel_err(v, ref)
                res["agreement"][f"{k}:{q}"] = e
                ok &= e <= tol
        else:
            e = rel_err(outs[k], outs[pivot])
            res["agreement"][k] = e
            ok &= e <= tol
    res["agreement_pivot"] = pivot
    res["agreement_tol"] = tol
    res["agreement_ok"] = bool(ok)
    del outs
    if not ok:
        return res

    timed = dict(fns)
    spent = {k: sum(v) for k, v in res["warmup_s"].items()}
    K_diag, K_lap = d, min(d, args.width)
    if mode == "inference":
        timed["floor_diag"] = floor_fn(model, x, K_diag)
        if K_lap != K_diag:
            timed["floor_lap"] = floor_fn(model, x, K_lap)
        for fk in ("floor_diag", "floor_lap"):
            if fk in timed:
                spent[fk] = C.time_once(timed[fk], device)  # warm-up
    # a warm-up call longer than half the method budget also counts as a timed sample: its one-time
    # costs are small next to its length, and it saves a call of the slowest methods
    first = {k: v[:1] for k, v in res["warmup_s"].items() if v[0] > args.method_budget / 2}
    res["warmup_counted"] = sorted(first)
    min_calls = {k: min(args.repeats, 3) for k in ("thd_diag", "thd_lap", "floor_diag", "floor_lap")}
    times = time_budgeted(timed, first, spent, device, args.repeats, args.method_budget, min_calls)
    res["times_s"] = times
    res["stats_s"] = {k: C.summarize(v) for k, v in times.items()}
    res["K"] = {"diag": K_diag, "lap": K_lap}

    if args.memory:
        res["memory"] = measure_memory(mode, keys, d, device, args, x, make)
    if args.profile and mode == "inference":
        profile_engine(model, x, device, d)
    if args.profile and mode == "train" and "thd_lap" in keys:
        profile_call(f"training step, thd.mlp_laplacian, d={d}", fns["thd_lap"], device)
    return res


# ---- memory --------------------------------------------------------------------------------------


def measure_memory(mode, keys, d, device, args, x, make) -> dict:
    """CUDA: max_memory_allocated in this process. CPU: a fresh process per method."""
    out = {}
    for k in keys:
        if device.type == "cuda":
            out[k] = {"cuda": C.cuda_peak(make(k)(x), device)}
        else:
            out[k] = C.run_worker([os.path.abspath(__file__), *worker_argv(args, d),
                                   "--worker", f"{mode}:{k}"])
    return out


def worker_argv(args, d: int) -> List[str]:
    argv = ["--device", args.device, "--dtype", args.dtype, "--n", str(args.n), "--d", str(d),
            "--width", str(args.width), "--depth", str(args.depth), "--seed", str(args.seed)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def worker(args) -> None:
    """Peak memory of one method's first full-size call in this fresh process."""
    mode, key = args.worker.split(":")
    device, dtype = C.pick_device(args.device), C.parse_dtype(args.dtype)
    d = args.d[0]
    model = model_as(build_base(d, args.width, args.depth, args.seed), device, dtype)
    model.requires_grad_(mode == "train")
    mk = (lambda xx: inference_fn(key, model, xx)) if mode == "inference" else (
        lambda xx: train_fn(key, model, xx))
    mk(make_input(4, d, device, dtype, args.seed))()  # tiny warm-up: libraries, kernels
    x = make_input(args.n, d, device, dtype, args.seed)
    fn = mk(x)
    res = {"method": key, "mode": mode, "threads": torch.get_num_threads()}
    res["rss"] = C.cpu_peak_rss(fn)  # first full-size call of this process: sound
    res["tensor"] = C.cpu_peak_tensor(fn)
    C.emit_worker_result(res)


def peak_bytes(mem: Optional[dict], k: str, device) -> Optional[float]:
    if not mem or k not in mem:
        return None
    r = mem[k]
    return r["cuda"]["peak_bytes"] if device.type == "cuda" else r["rss"]["peak_bytes"]


def tensor_bytes(mem: Optional[dict], k: str) -> Optional[float]:
    if not mem or k not in mem or "tensor" not in mem[k]:
        return None
    return mem[k]["tensor"]["peak_bytes"]


# ---- profile -------------------------------------------------------------------------------------


def profile_call(title: str, fn: Callable, device, row_limit: int = 14) -> None:
    from torch.profiler import ProfilerActivity, profile as prof_ctx

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    fn()
    with prof_ctx(activities=acts) as prof:
        fn()
        C.synchronize(device)
    print(f"\n### profile: {title}\n")
    print(prof.key_averages().table(sort_by=sort, row_limit=row_limit))


def profile_engine(model, x, device, d) -> None:
    profile_call(f"thd.mlp_hessian_diag, d={d}", inference_fn("thd_diag", model, x), device)
    profile_call(f"thd.mlp_laplacian, d={d}", inference_fn("thd_lap", model, x), device)


# ---- report --------------------------------------------------------------------------------------


def fmt_ratio(a: Optional[float], b: Optional[float]) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def speedups(st: dict, fast: str, others) -> Optional[dict]:
    """The best of ``others`` (by median) vs ``fast``: ratios of medians and of minima."""
    present = [k for k in others if k in st]
    if fast not in st or not present:
        return None
    best = min(present, key=lambda k: st[k]["median"])
    return {"best": best,
            "median": st[best]["median"] / st[fast]["median"],
            "min": st[best]["min"] / st[fast]["min"]}


def report_block(mode: str, d: int, res: dict, device, args) -> dict:
    """Print one block; return the ratios for the summary."""
    st = res.get("stats_s", {})
    labels = INF_METHODS if mode == "inference" else {k: (v, "lap") for k, v in TRAIN_METHODS.items()}
    mem = res.get("memory")
    K = res.get("K", {"diag": d, "lap": min(d, args.width)})
    floor = {"diag": st.get("floor_diag", {}).get("median"),
             "lap": st.get("floor_lap", st.get("floor_diag", {})).get("median")}
    headers = ["method", "gives", "n", "median ms", "min ms", "max ms", "IQR ms"]
    if mode == "inference":
        headers.append("/ floor")
    if mem is not None:
        headers += ["peak CUDA MiB" if device.type == "cuda" else "peak RSS MiB"]
        if device.type != "cuda":
            headers.append("peak tensors MiB")
    rows = []
    for k, (label, gives) in labels.items():
        if k not in args.methods:
            continue
        if k in res["skipped"]:
            rows.append([label, gives, 0, "skipped"] + [""] * (len(headers) - 4))
            continue
        if k not in st:
            continue
        s = st[k]
        n = f"{s['n']}{'*' if k in res.get('warmup_counted', ()) else ''}"
        row = [label, gives, n, C.fmt_ms(s["median"]), C.fmt_ms(s["min"]),
               C.fmt_ms(s["max"]), C.fmt_ms(s["iqr"])]
        if mode == "inference":
            fl = floor["lap"] if gives == "lap" else floor["diag"]
            row.append(fmt_ratio(s["median"], fl))
        if mem is not None:
            row.append(C.fmt_mib(peak_bytes(mem, k, device)))
            if device.type != "cuda":
                row.append(C.fmt_mib(tensor_bytes(mem, k)))
        rows.append(row)
    if mode == "inference":
        for fk, kk in (("floor_diag", "diag"), ("floor_lap", "lap")):
            if fk in st:
                s = st[fk]
                what = f"floor, K={K[kk]}" + ("" if "floor_lap" in st else " (diag and Laplacian)")
                rows.append([what, "GEMMs", s["n"], C.fmt_ms(s["median"]), C.fmt_ms(s["min"]),
                             C.fmt_ms(s["max"]), C.fmt_ms(s["iqr"]), "1.00x"]
                            + [""] * (len(headers) - 8))
    title = "inference (one call, all N points)" if mode == "inference" else \
        "training step (Laplacian + loss + backward to the weights)"
    print(f"\n### d = {d}: {title}\n")
    print(C.markdown_table(headers, rows))
    for k, why in res["skipped"].items():
        print(f"- {labels[k][0]} skipped: {why}")
    short = [labels[k][0] for k in st if k in labels and st[k]["n"] < args.repeats]
    if short:
        print(f"- fewer than {args.repeats} timed calls (--method-budget {args.method_budget:g} s "
              f"reached): {', '.join(short)}")
    if res.get("warmup_counted"):
        print(f"- n*: the warm-up call (over half of --method-budget) is one of the n samples")

    ratios: dict = {}
    if mode == "inference":
        sp = speedups(st, "thd_diag", DIAG_RIVALS)
        if sp:
            ratios["diag_vs_best"] = sp
            print(f"- thd.mlp_hessian_diag vs the fastest other Hessian-diagonal method "
                  f"({INF_METHODS[sp['best']][0]}): {sp['median']:.2f}x faster (medians), "
                  f"{sp['min']:.2f}x (minima)")
        sp = speedups(st, "thd_lap", ("fwd_lap",))
        if sp:
            ratios["lap_vs_fwd"] = sp
            print(f"- thd.mlp_laplacian vs the plain forward Laplacian: {sp['median']:.2f}x "
                  f"faster (medians), {sp['min']:.2f}x (minima)")
        sp = speedups(st, "thd_lap", ("nested", "func", "fwd_lap", "fwd_diag"))
        if sp:
            ratios["lap_vs_best"] = sp
            print(f"- thd.mlp_laplacian vs the fastest other Laplacian method "
                  f"({INF_METHODS[sp['best']][0]}): {sp['median']:.2f}x faster (medians), "
                  f"{sp['min']:.2f}x (minima)")
        for k, kk in (("thd_diag", "diag"), ("thd_lap", "lap")):
            fk = "floor_lap" if kk == "lap" and "floor_lap" in st else "floor_diag"
            if k in st and fk in st:
                ratios[f"{k}_vs_floor"] = {"median": st[k]["median"] / st[fk]["median"],
                                           "min": st[k]["min"] / st[fk]["min"]}
                print(f"- {INF_METHODS[k][0]} / floor (K={K[kk]}): "
                      f"{ratios[f'{k}_vs_floor']['median']:.2f}x (medians), "
                      f"{ratios[f'{k}_vs_floor']['min']:.2f}x (minima)")
    else:
        sp = speedups(st, "thd_lap", [k for k in TRAIN_METHODS if k != "thd_lap"])
        if sp:
            ratios["train_vs_best"] = sp
            print(f"- training step, thd.mlp_laplacian vs the best other "
                  f"({TRAIN_METHODS[sp['best']]}): {sp['median']:.2f}x faster (medians), "
                  f"{sp['min']:.2f}x (minima)")
    return ratios


def target_rows(all_ratios: Dict[int, dict]) -> List[List[str]]:
    rows = []
    for d, r in all_ratios.items():
        def add(name, key, target, higher_is_better=True):
            if key not in r:
                return
            v = r[key]
            ok_med = v["median"] >= target if higher_is_better else v["median"] <= target
            ok_min = v["min"] >= target if higher_is_better else v["min"] <= target
            status = "met" if ok_med and ok_min else ("met (medians only)" if ok_med else
                                                      ("met (minima only)" if ok_min else "MISSED"))
            rows.append([d, name, f"{'>=' if higher_is_better else '<='} {target}x",
                         f"{v['median']:.2f}x", f"{v['min']:.2f}x", status])

        add("mlp_hessian_diag vs fastest other diag", "diag_vs_best", TARGET_DIAG)
        add("mlp_laplacian vs plain fwd Laplacian", "lap_vs_fwd", TARGET_LAP)
        add("mlp_hessian_diag / floor", "thd_diag_vs_floor", TARGET_FLOOR, False)
        add("mlp_laplacian / floor", "thd_lap_vs_floor", TARGET_FLOOR, False)
        add("training step vs best other", "train_vs_best", TARGET_TRAIN)
    return rows


# ---- main ----------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--n", type=int, default=None, help="number of points (4096; --quick 256)")
    p.add_argument("--d", type=int, nargs="+", default=None,
                   help="input dimensions, one block each (8 32 100; --quick 4 40)")
    p.add_argument("--width", type=int, default=None, help="hidden width (256; --quick 32)")
    p.add_argument("--depth", type=int, default=None, help="hidden layers (4; --quick 3)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per method (5; --quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed full-size calls per method first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--modes", nargs="+", default=["inference", "train"],
                   choices=["inference", "train"])
    p.add_argument("--methods", nargs="+", default=None,
                   choices=sorted(set(INF_METHODS) | set(TRAIN_METHODS)),
                   help="restrict to these methods (default: all; torch.func is the reference of "
                        "the float64 check either way)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="skip a method whose estimated seconds per call exceed this")
    p.add_argument("--method-budget", type=float, default=30.0,
                   help="seconds per method and block (warm-up included) after which it gets no "
                        "more timed calls (it always gets one)")
    p.add_argument("--check-n", type=int, default=16, help="N of the float64 torch.func check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory", action="store_true",
                   help="peak memory per method (CPU: one fresh process per method and d; slow)")
    p.add_argument("--profile", action="store_true",
                   help="print torch.profiler tables of the engine calls")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--json", metavar="PATH", help="write raw results to PATH")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    defaults = dict(n=4096, d=[8, 32, 100], width=256, depth=4, repeats=5)
    quick = dict(n=256, d=[4, 40], width=32, depth=3, repeats=3)  # d=40 > width: K=min(d, w)
    for k, v in (quick if a.quick else defaults).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.depth < 1 or a.width < 1 or a.n < 1 or min(a.d) < 1 or a.repeats < 1:
        p.error("--depth, --width, --n, --d and --repeats must be >= 1")
    if a.methods is None:
        a.methods = list(dict.fromkeys([*INF_METHODS, *TRAIN_METHODS]))
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return 0
    device, dtype = C.pick_device(args.device), C.parse_dtype(args.dtype)
    args.device = str(device)
    threads = torch.get_num_threads()
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    backend = thd.backend_info()["devices"][device.type]
    setting = {"device": C.device_label(device), "dtype": args.dtype, "d": args.d,
               "width": args.width, "depth": args.depth, "N": args.n, "threads": threads,
               "torch": torch.__version__, "torchhessdiag": thd.__version__, "backend": backend,
               "repeats": args.repeats, "warmup": args.warmup, "modes": args.modes,
               # glibc malloc settings change CPU timings a lot (page faults of fresh memory)
               "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}
    print(f"# Engine benchmark: tanh MLP, Hessian diagonal and Laplacian w.r.t. the input")
    print()
    print(C.markdown_table(
        ["device", "dtype", "d", "width", "depth", "N", "threads", "torch", "torchhessdiag"],
        [[C.device_label(device), args.dtype, " ".join(map(str, args.d)), args.width,
          args.depth, args.n, threads, torch.__version__, f"{thd.__version__} ({backend})"]]))
    if device.type == "cpu" and (os.cpu_count() or 0) <= threads:
        print(f"\nnote: {threads} threads on {os.cpu_count()} cores; a shared machine is noisy.")
    if setting["malloc_env"]:
        print(f"malloc environment: {setting['malloc_env']}")
    print(f"1-min load average at start: {load_before[0]:.2f}")

    results = {"setting": setting, "env": C.env_info(device), "args": vars(args), "blocks": {}}
    all_ratios: Dict[int, dict] = {}
    failed = False
    keys_inf = [k for k in INF_METHODS if k in args.methods] if "inference" in args.modes else []
    keys_train = [k for k in TRAIN_METHODS if k in args.methods] if "train" in args.modes else []
    for d in args.d:
        base = build_base(d, args.width, args.depth, args.seed)
        chk = check_float64(base, d, device, args, keys_inf, keys_train)
        print(f"\n## d = {d}\n")
        print(f"float64 check vs torch.func (N={chk['n']}, norm-wise rel. error): max "
              f"{chk['max']:.1e} (tol {chk['tol']:g}) -> {'ok' if chk['ok'] else 'FAILED'}")
        if not chk["ok"]:
            bad = {k: v for part in ("inference", "train") for k, v in chk[part].items()
                   if not v <= chk["tol"]}
            print(f"check failed: {bad}", file=sys.stderr)
        block = {"check_float64": chk}
        results["blocks"][str(d)] = block
        failed |= not chk["ok"]
        if not chk["ok"]:
            continue
        ratios: dict = {}
        block_ok = True
        for mode in ("inference", "train"):
            if mode not in args.modes:
                continue
            res = run_block(mode, base, d, device, dtype, args)
            block[mode] = res
            agree = res["agreement"]
            worst = max(agree.values()) if agree else 0.0
            print(f"\nfull-size {args.dtype} agreement ({mode}) vs {res['agreement_pivot']}: max "
                  f"{worst:.1e} (tol {res['agreement_tol']:g}) -> "
                  f"{'ok' if res['agreement_ok'] else 'FAILED'}")
            if not res["agreement_ok"]:
                print(f"agreement failed: {agree}", file=sys.stderr)
                failed = True
                block_ok = False
                continue
            ratios.update(report_block(mode, d, res, device, args))
        if block_ok:
            all_ratios[d] = ratios

    if all_ratios:
        print("\n## Summary\n")
        rows = []
        for d in all_ratios:
            inf = results["blocks"][str(d)].get("inference", {}).get("stats_s", {})
            tr = results["blocks"][str(d)].get("train", {}).get("stats_s", {})
            def ms(st, k):
                return C.fmt_ms(st[k]["median"]) if k in st else "-"
            rows.append([d, ms(inf, "floor_diag"), ms(inf, "thd_diag"), ms(inf, "thd_lap"),
                         ms(inf, "nested"), ms(inf, "func"), ms(inf, "fwd_diag"),
                         ms(inf, "fwd_lap"), ms(tr, "thd_lap"), ms(tr, "nested"),
                         ms(tr, "fwd_lap"), ms(tr, "func")])
        print(C.markdown_table(
            ["d", "floor", "thd diag", "thd lap", "nested", "torch.func", "fwd diag", "fwd lap",
             "train: thd lap", "train: nested", "train: fwd lap", "train: torch.func"], rows))
        print("\nmedian ms per call; floor = the engine's GEMMs alone with K = d (see the docstring).")
        trows = target_rows(all_ratios)
        if trows:
            print("\n## Targets\n")
            print(C.markdown_table(["d", "target", "goal", "medians", "minima", "status"], trows))
            results["targets"] = trows
            if args.quick:
                print("\n--quick: smoke-test sizes, dominated by per-op overhead; the targets are "
                      "meant for the issue setting.")
    load_after = os.getloadavg()
    elapsed = time.perf_counter() - t_start
    print(f"\n{args.repeats} timed calls per method after {args.warmup} warm-up call(s), methods "
          f"interleaved call by call; {'CUDA events' if device.type == 'cuda' else 'wall time'}.")
    print(f"1-min load average {load_before[0]:.2f} at start, {load_after[0]:.2f} at the end "
          f"({os.cpu_count()} cores); well above 0 before the start means others shared the "
          f"machine. Total {elapsed:.0f} s.")
    results.update(loadavg_before=load_before, loadavg_after=load_after, elapsed_s=elapsed,
                   ok=not failed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"raw results written to {args.json}")
    if failed:
        print("a correctness check FAILED (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
