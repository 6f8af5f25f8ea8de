"""One block of the grid: a setting (device, dtype, d, widths, activation, N) and a mode.

Steps, in this order (see torchhessdiag/bench/__init__.py for the rationale):

1. float64 check, N = ``check_n``: every method against torch.func vmap(hessian) on a float64
   copy of the same weights (inference: the Hessian diagonal and the Laplacian; training: the
   weight gradient of the loss); norm-wise relative error <= 1e-10.
2. budget probe: one call on 64 points, then (unless that is already far over) one on N/8
   points, scaled to N (time; peak memory for the non-thd
   methods); a method over ``budget`` seconds per call or over half the free memory is skipped
   with the reason (so is one that runs out of memory in the probe or at full size).
3. full-size warm-up; its output is checked in the benchmark dtype. Inference: at S points spread
   over the N (first and last included) against float64 torch.func; tolerance in float32
   ``max(16 e_torch, 1e-6)`` where e_torch is the error of torch's own float32 nested autograd
   (torch.nn) at the same points; 1e-10 in float64. Training: every method's weight gradient
   against the pivot's (nested autograd, else the plain forward Laplacian, else
   thd.mlp_laplacian), tolerance ``max(64 e_torch, 1e-5)`` (two float32 methods, each with
   its own error, summed over all N points) with e_torch the error of torch's
   float32 nested-autograd gradient on the S points vs float64 torch.func; 1e-10 in float64.
4. timed calls, round-robin over the methods and the GEMM floor(s); a method leaves the
   rotation after ``repeats`` calls or once its seconds in the block exceed ``method_budget``
   (at least one call; at least three for the thd methods and the floors).
5. peak memory of one more full-size call per method (CUDA: max_memory_allocated; CPU: the
   profiler's live-tensor peak; optionally the RSS increase of a fresh process).
"""

from __future__ import annotations

import gc
import math
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch

from . import measure as M
from .methods import (
    METHODS,
    Context,
    MethodUnavailable,
    build,
    build_base,
    flat_grads,
    floor_fn,
    func_hessian,
    make_input,
    method_model,
    model_as,
    nested_all,
    quantities,
    rel_err,
    value_and_grad,
)

TOL64 = 1e-10
S_ROWS = 32  # points of the full-size float64 spot check


def block_key(spec: dict) -> str:
    w = "-".join(map(str, spec["widths"]))
    return (f"{spec['device']}|{spec['dtype']}|{spec['activation']}|d={spec['d']}|w={w}|"
            f"N={spec['N']}|{spec['mode']}")


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, getattr(torch, "OutOfMemoryError", MemoryError)) or isinstance(
        e, MemoryError) or "out of memory" in str(e).lower()


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _err_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"


# ---- 1. float64 check -----------------------------------------------------------------------------


def check_float64(spec: dict, keys: List[str], seed: int, check_n: int, device) -> dict:
    """Every method vs float64 torch.func at N = check_n."""
    base = build_base(spec["d"], spec["widths"], spec["activation"], seed)
    m64 = model_as(base, device, torch.float64)
    mode = spec["mode"]
    m64.requires_grad_(mode == "train")
    ctx = Context(m64, mode)
    x = make_input(check_n, spec["d"], device, torch.float64, seed + 7)
    out = {"n": check_n, "tol": TOL64, "errors": {}, "failures": {}, "unavailable": {}}
    # not under no_grad: torch 2.13's forward-over-reverse of SiLU (and GELU) fails there
    # ("forward AD with aten::silu_backward"); torch.func does not need it
    ref_diag, ref_lap = (t.detach() for t in func_hessian(m64, x))
    refs = {"diag": ref_diag, "lap": ref_lap}
    if mode == "inference" and any("value" in quantities(METHODS[k].gives) for k in keys):
        refs["value"], refs["grad"] = value_and_grad(m64, x)
    if mode == "train":
        ctx_ref = Context(m64, mode)
        ref_step = build("func_hessian", ctx_ref, x)
        ref_step()
        ref_g = flat_grads(m64)
    for k in keys:
        try:
            fn = build(k, ctx, x)
            r = fn()
            if mode == "inference":
                missing = set(quantities(METHODS[k].gives)) - set(r)
                if missing:
                    raise RuntimeError(f"returned {sorted(r)}, not {sorted(missing)}")
                for q, v in r.items():
                    out["errors"][f"{k}:{q}"] = rel_err(v, refs[q])
            else:
                out["errors"][k] = rel_err(flat_grads(method_model(k, ctx)), ref_g)
        except MethodUnavailable as e:  # e.g. torch.compile fails here: skipped, with the reason
            out["unavailable"][k] = str(e)
        except Exception as e:  # a method that raises is a failed method, not a crashed run
            out["failures"][k] = _err_text(e)
    bad = {k: v for k, v in out["errors"].items() if not v <= TOL64}
    out["max"] = max(out["errors"].values(), default=0.0)
    out["failed_methods"] = sorted({k.split(":")[0] for k in bad} | set(out["failures"]))
    return out


# ---- 2. probe -------------------------------------------------------------------------------------


def avail_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def peak_memory(fn: Callable, device) -> dict:
    if device.type == "cuda":
        return M.cuda_peak(fn, device)
    return M.cpu_peak_tensor(fn, collect=False)


def probe(make: Callable[[torch.Tensor], Callable], x, device, with_memory: bool,
          budget: float) -> dict:
    """One call on N/8 points (after a 4-point call that loads kernels and libraries), repeated
    once where it looks over the budget (a stall should not skip a method); time and optionally
    peak memory, scaled to N (fixed per-call costs make the scaled time err on the high side)."""
    N = x.shape[0]
    make(x[: min(4, N)].contiguous())()
    # a first look at 64 points: a method far over the budget (time or memory) stops here,
    # before a call on N/8 points could run out of memory
    n0 = min(N, 64)
    if N // 8 > 4 * n0:
        fn = make(x[:n0].contiguous())
        M.synchronize(device)
        out = {"n": n0, "seconds_scaled": M.time_once(fn, device) * N / n0}
        if with_memory:
            out["peak_bytes_scaled"] = peak_memory(fn, device)["peak_bytes"] * N / n0
        if out["seconds_scaled"] > 4 * budget or (
                out.get("peak_bytes_scaled", 0) > 2 * avail_bytes(device)):
            return out
    n_p = max(1, min(N, max(16, N // 8)))
    scale = N / n_p
    fn = make(x[:n_p].contiguous())
    M.synchronize(device)
    t = M.time_once(fn, device)
    if t * scale > budget:
        t = min(t, M.time_once(fn, device))
    out = {"n": n_p, "seconds_scaled": t * scale}
    if with_memory:
        out["peak_bytes_scaled"] = peak_memory(fn, device)["peak_bytes"] * scale
    return out


def over_budget(pr: dict, budget: float, device) -> Optional[str]:
    if pr["seconds_scaled"] > budget:
        return f"est. {pr['seconds_scaled']:.0f} s per call (from N={pr['n']}) > budget {budget:g} s"
    if "peak_bytes_scaled" in pr and pr["peak_bytes_scaled"] > 0.5 * avail_bytes(device):
        return (f"est. {pr['peak_bytes_scaled'] / 2**30:.1f} GiB (from N={pr['n']}) > half the "
                f"free {avail_bytes(device) / 2**30:.1f} GiB")
    return None


# ---- 4. timing ------------------------------------------------------------------------------------


def time_budgeted(fns: Dict[str, Callable], first: Dict[str, List[float]],
                  spent: Dict[str, float], device, repeats: int, method_budget: float,
                  min_calls: Dict[str, int], progress=None) -> Dict[str, List[float]]:
    """Round-robin timed calls starting from the samples in ``first``; a method leaves the
    rotation with ``repeats`` samples, or with at least ``min_calls[k]`` (default 1) once its
    seconds so far (``spent``, warm-up included) exceed ``method_budget``."""
    times = {k: list(first.get(k, [])) for k in fns}
    spent = dict(spent)

    def done(k):
        n = len(times[k])
        return n >= repeats or (n >= min_calls.get(k, 1) and spent.get(k, 0.0) > method_budget)

    active = [k for k in fns if not done(k)]
    rnd = 0
    while active:
        rnd += 1
        if progress is not None:
            progress.note(f"timing, round {rnd}/{repeats}")
        for k in list(active):
            t = M.time_once(fns[k], device)
            times[k].append(t)
            spent[k] = spent.get(k, 0.0) + t
            if done(k):
                active.remove(k)
    return times


MAX_CALLS_PER_SAMPLE = 100000


def calls_per_sample(fns: Dict[str, Callable], device, min_sample_s: float,
                     skip=(), known: Optional[Dict[str, float]] = None) -> Dict[str, int]:
    """How many calls make one timed sample of at least ``min_sample_s`` (absent: 1, calls that
    long already): from the shortest of three more calls of each whose ``known`` time (its
    warm-up) is under 5 x min_sample_s (three: one call stalled on a shared machine must not
    decide)."""
    reps = {}
    for k, f in fns.items():
        if k in skip or min_sample_s <= 0 or (known or {}).get(k, 0.0) >= 5 * min_sample_s:
            continue
        t = min(M.time_once(f, device) for _ in range(3))
        if t < min_sample_s:
            reps[k] = int(min(MAX_CALLS_PER_SAMPLE, math.ceil(min_sample_s / max(t, 1e-7))))
    return reps


def batched(fn: Callable, n: int) -> Callable:
    """A call of fn n times (one timed sample of n calls)."""
    def run():
        for _ in range(n):
            fn()

    return run


# ---- the block ------------------------------------------------------------------------------------


def run_block(spec: dict, keys: List[str], opts, check_cache: dict, progress=None,
              worker_cmd: Optional[Callable[[dict, str], List[str]]] = None) -> dict:
    """Run one block; returns its record (JSON-serialisable)."""
    device, dtype = torch.device(spec["device"]), M.parse_dtype(spec["dtype"])
    d, N, mode = spec["d"], spec["N"], spec["mode"]
    widths = spec["widths"]
    t_block = time.perf_counter()
    rec: dict = {"key": block_key(spec), "setting": dict(spec), "loadavg_before": M.loadavg(),
                 "skipped": {}, "failed": {}, "ok": True}

    def note(s):
        if progress is not None:
            progress.note(f"{rec['key']}: {s}")

    # what can run at all
    runnable = []
    for k in keys:
        m = METHODS[k]
        if mode not in m.modes:
            continue
        why = m.available()
        if why is None and m.gives == "diag" and d > opts.diag_max_d:
            why = f"Hessian diagonal only; d > --diag-max-d {opts.diag_max_d}"
        if why:
            rec["skipped"][k] = why
        else:
            runnable.append(k)

    # 1. float64 check (cached per architecture, device and mode)
    ck = (spec["device"], d, tuple(widths), spec["activation"], mode, tuple(runnable))
    note("float64 check")
    if ck not in check_cache:
        check_cache[ck] = check_float64(spec, runnable, opts.seed, opts.check_n, device)
    chk = check_cache[ck]
    rec["check_float64"] = chk
    for k in chk["failed_methods"]:
        rec["failed"][k] = ("float64 check: " + chk["failures"][k] if k in chk["failures"] else
                            f"float64 check: rel. error "
                            f"{max(v for q, v in chk['errors'].items() if q.split(':')[0] == k):.1e}"
                            f" > {TOL64:g}")
    for k, why in chk.get("unavailable", {}).items():
        rec["skipped"][k] = why
    runnable = [k for k in runnable if k not in rec["failed"] and k not in rec["skipped"]]

    # the full-size problem
    base = build_base(d, widths, spec["activation"], opts.seed)
    model = model_as(base, device, dtype)
    model.requires_grad_(mode == "train")
    ctx = Context(model, mode)
    x = make_input(N, d, device, dtype, opts.seed)

    def make(k):
        return lambda xx: build(k, ctx, xx)

    # 2. probe
    rec["probe"] = {}
    for k in list(runnable):
        note(f"probe {k}")
        try:
            pk = METHODS[k].probe_as or k
            pr = probe(make(pk), x, device, not METHODS[pk].is_thd, opts.budget)
            if pk != k:
                pr["as"] = pk
        except MethodUnavailable as e:
            rec["skipped"][k] = str(e)
            runnable.remove(k)
            continue
        except Exception as e:
            if _is_oom(e):
                rec["skipped"][k] = "out of memory in the budget probe (N/8 points)"
                _free(device)
            else:
                rec["failed"][k] = "probe: " + _err_text(e)
            runnable.remove(k)
            continue
        rec["probe"][k] = pr
        why = over_budget(pr, opts.budget, device)
        if why:
            rec["skipped"][k] = why
            runnable.remove(k)

    # 3. warm-up and full-size check
    fns, outs, warm = {}, {}, {}
    for k in list(runnable):
        note(f"warm-up {k}")
        try:
            fns[k] = make(k)(x)
            if getattr(fns[k], "compile_s", None) is not None:
                rec.setdefault("compile_s", {})[k] = fns[k].compile_s
            warm[k] = []
            for w in range(max(1, opts.warmup)):
                M.synchronize(device)
                t0 = time.perf_counter()
                r = fns[k]()
                M.synchronize(device)
                warm[k].append(time.perf_counter() - t0)
                if w == 0:
                    outs[k] = r if mode == "inference" else flat_grads(method_model(k, ctx)).clone()
                del r
        except MethodUnavailable as e:
            rec["skipped"][k] = str(e)
            runnable.remove(k)
            fns.pop(k, None)
            outs.pop(k, None)
            continue
        except Exception as e:
            if _is_oom(e):
                rec["skipped"][k] = "out of memory at full size"
                _free(device)
            else:
                rec["failed"][k] = "full-size call: " + _err_text(e)
            if opts.verbose:
                traceback.print_exc()
            runnable.remove(k)
            fns.pop(k, None)
            outs.pop(k, None)
    rec["warmup_s"] = warm
    note("full-size check")
    rec["full_check"] = full_check(spec, model, ctx, x, outs, opts, device, dtype)
    for k, why in rec["full_check"]["failed"].items():
        rec["failed"][k] = why
    runnable = [k for k in runnable if k not in rec["failed"]]
    fns = {k: fns[k] for k in runnable}
    del outs

    # 4. timing
    K = {"diag": d, "lap": min(d, min(widths))}
    rec["K"] = K
    timed = dict(fns)
    spent = {k: sum(v) for k, v in warm.items() if k in fns}
    if mode == "inference":
        timed["floor_diag"] = floor_fn(model, x, K["diag"])
        if K["lap"] != K["diag"]:
            timed["floor_lap"] = floor_fn(model, x, K["lap"])
    else:
        timed["floor_train"] = floor_fn(model, x, K["lap"], train=True)
    for fk in [k for k in timed if k.startswith("floor")]:
        spent[fk] = M.time_once(timed[fk], device)  # warm-up
    # a warm-up call longer than half the method budget counts as a timed sample (saves a call
    # of the slowest methods; its one-time costs are small next to its length)
    first = {k: v[:1] for k, v in warm.items() if k in fns and v[0] > opts.method_budget / 2}
    rec["warmup_counted"] = sorted(first)
    # calls shorter than --min-sample-ms (N = 16: ~0.1-1 ms, where the clock and the loop would
    # be a visible part): a sample is a batch of calls, reported per call
    known = {k: min(v) for k, v in warm.items() if k in timed and v}
    known.update({k: spent[k] for k in timed if k.startswith("floor")})
    reps = calls_per_sample(timed, device, getattr(opts, "min_sample_ms", 20.0) / 1e3,
                            skip=set(first), known=known)
    rec["calls_per_sample"] = reps
    timed = {k: batched(f, reps[k]) if reps.get(k, 1) > 1 else f for k, f in timed.items()}
    min_calls = {k: min(opts.repeats, 3) for k in timed
                 if k.startswith("floor") or METHODS.get(k, None) and METHODS[k].is_thd}
    times = time_budgeted(timed, first, spent, device, opts.repeats, opts.method_budget,
                          min_calls, progress)
    times = {k: [t / reps.get(k, 1) for t in v] for k, v in times.items()}
    rec["times_s"] = times
    rec["stats_s"] = {k: M.summarize(v) for k, v in times.items() if v}

    # 5. memory
    rec["memory"] = {}
    if opts.memory:
        gc.collect()
        for k in runnable:
            note(f"memory {k}")
            med = rec["stats_s"][k]["median"]
            if med > opts.method_budget / 2 and "peak_bytes_scaled" in rec["probe"].get(k, {}):
                rec["memory"][k] = {"peak_bytes": rec["probe"][k]["peak_bytes_scaled"],
                                    "method": "probe, scaled from N=%d" % rec["probe"][k]["n"],
                                    "estimated": True}
                continue
            try:
                rec["memory"][k] = peak_memory(fns[k], device)
            except Exception as e:
                rec["memory"][k] = {"error": _err_text(e)}
            if opts.rss and device.type == "cpu" and worker_cmd is not None:
                try:
                    rec["memory"][k]["rss"] = M.run_worker(worker_cmd(spec, k), timeout=600)["rss"]
                except Exception as e:
                    rec["memory"][k]["rss"] = {"error": _err_text(e)}

    rec["ok"] = not rec["failed"]
    rec["loadavg_after"] = M.loadavg()
    rec["threads"] = torch.get_num_threads()
    rec["elapsed_s"] = time.perf_counter() - t_block
    return rec


def full_check(spec, model, ctx, x, outs, opts, device, dtype) -> dict:
    """Step 3 of the module docstring."""
    N, mode = x.shape[0], spec["mode"]
    res: dict = {"errors": {}, "failed": {}}
    if not outs:
        return res
    idx = torch.linspace(0, N - 1, min(S_ROWS, N), device=device).round().long().unique()
    m64 = model_as(model, device, torch.float64)
    xs = x[idx].contiguous()
    xs64 = xs.to(torch.float64)
    # torch's own error in this dtype, at the same points: nested autograd with torch.nn
    if mode == "inference":
        ref_diag, ref_lap = func_hessian(m64.requires_grad_(False), xs64)  # see check_float64
        refs = {"diag": ref_diag, "lap": ref_lap}
        refs["value"], refs["grad"] = value_and_grad(m64, xs64)
        t = nested_all(model, xs)
        e_torch = max(rel_err(t[q], refs[q]) for q in refs)
    else:
        m64.requires_grad_(True)
        build("func_hessian", Context(m64, "train"), xs64)()
        ref_g = flat_grads(m64)
        build("nested", Context(model, "train"), xs)()
        e_torch = rel_err(flat_grads(model), ref_g)
    if dtype == torch.float64:
        tol = TOL64
    else:
        tol = max(16 * e_torch, 1e-6) if mode == "inference" else max(64 * e_torch, 1e-5)
    res.update(tol=tol, torch_error=e_torch, points=int(idx.numel()))
    if mode == "inference":
        res["against"] = "float64 torch.func at the spot-check points"
        for k, r in outs.items():
            for q, v in r.items():
                e = rel_err(v[idx], refs[q])
                res["errors"][f"{k}:{q}"] = e
                if not e <= tol:
                    res["failed"][k] = f"full-size {spec['dtype']} check: {q} rel. error {e:.1e} > {tol:.1e}"
    else:
        pivot = next((k for k in ("nested", "fwd_lap", "thd_lap") if k in outs), next(iter(outs)))
        res["against"] = f"{pivot} (weight gradients, all N points)"
        for k, g in outs.items():
            if k == pivot:
                continue
            e = rel_err(g, outs[pivot])
            res["errors"][k] = e
            if not e <= tol:
                res["failed"][k] = f"full-size {spec['dtype']} check: gradient rel. diff. {e:.1e} vs {pivot} > {tol:.1e}"
    return res
