"""Command line of the benchmark suite: ``python -m torchhessdiag.bench``."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import List, Optional

import torch

import torchhessdiag as thd

from . import measure as M, report as R
from .methods import METHODS, Context, build, build_base, make_input, model_as
from .runner import block_key, run_block

# ---- the PINN presets (issue 13) -------------------------------------------------------------------
# a group is a product grid: dtype x d x arch (width, depth) x N x mode
_F32, _F64 = ["float32"], ["float64"]
_TRAIN_LOW = dict(d=[1, 2, 3], archs=[(32, 3), (64, 3), (64, 4), (128, 4)], n=[512, 4096, 8192],
                  modes=["train"])  # target 1: >= 2x nested autograd
_TRAIN_HIGH = dict(d=[5, 8], archs=[(32, 3), (64, 4), (128, 4)], n=[512, 4096, 8192],
                   modes=["train"])  # target 1: >= 1.3x the best other method for d <= 8
_INFER = dict(d=[1, 2, 3, 5, 8, 16, 32, 100],
              archs=[(32, 3), (64, 3), (64, 4), (128, 4), (256, 4)], n=[512, 4096],
              modes=["inference"])  # target 2: widths 32-256, N 512 and 4096
_OVERHEAD = dict(d=[2], archs=[(32, 3)], n=[16], modes=["inference", "train"])  # target 3
PINN_GROUPS = {
    "train": [dict(_TRAIN_LOW, dtype=_F32), dict(_TRAIN_HIGH, dtype=_F32)],
    "train64": [dict(_TRAIN_LOW, dtype=_F64), dict(_TRAIN_HIGH, dtype=_F64)],
    "infer": [dict(_INFER, dtype=_F32)],
    "infer64": [dict(_INFER, dtype=_F64)],
    "overhead": [dict(_OVERHEAD, dtype=_F32 + _F64)],
    # the settings of issue 13's own table (what users reported) and d = 5: 5 min measured, the record
    # to read first (docs/benchmarks.md); every point is also in the full grid except d=1, N=1024
    "core": [dict(d=[2], archs=[(32, 3)], n=[512], modes=["train"], dtype=_F32),
             dict(d=[3], archs=[(64, 4)], n=[4096], modes=["train"], dtype=_F32 + _F64),
             dict(d=[2], archs=[(128, 4)], n=[8192], modes=["train"], dtype=_F32),
             dict(d=[2, 5, 8], archs=[(256, 4)], n=[4096], modes=["inference", "train"],
                  dtype=_F32),
             dict(d=[1], archs=[(64, 3)], n=[1024], modes=["inference", "train"], dtype=_F64),
             dict(_OVERHEAD, dtype=_F32 + _F64)],
    "tiny": [dict(d=[2], archs=[(32, 3)], n=[512], modes=["inference", "train"], dtype=_F32),
             dict(_OVERHEAD, dtype=_F32)],
}
PINN_PRESETS = {
    "pinn": [g for k in ("overhead", "train", "infer", "train64", "infer64") for g in PINN_GROUPS[k]],
    **{f"pinn-{k}": v for k, v in PINN_GROUPS.items()},
}
# issue 13's methods: the engine, nested autograd, torch.func, the plain forward Laplacian (and
# compiled), jet-for-pytorch (collapsed, standard, and its value/grad/lap); the floor is always timed
PINN_METHODS = ["thd_diag", "thd_lap", "thd_deriv", "nested", "func_hessian", "func_jvp",
                "fwd_diag", "fwd_lap", "fwd_deriv", "fwd_lap_compiled", "jet", "jet_std",
                "jet_deriv"]

from .dropin import GRID as _DROPIN_GRID, QUICK as _DROPIN_QUICK  # noqa: E402

PRESETS = {
    # about a minute on a 2-core CPU: every method, both modes, d < and > the width
    "quick": dict(device=["auto"], dtype=["float32"], d=[4, 40], width=[32], depth=[2],
                  n=[128], repeats=3, budget=5.0, method_budget=1.0, check_n=8),
    # the CPU setting of the README
    "cpu": dict(device=["cpu"], dtype=["float32"], d=[8, 32, 100], width=[256], depth=[4],
                n=[4096], repeats=5, budget=60.0, method_budget=30.0),
    # the Taylor-mode paper's setting: d=50, tanh 768-768-512-512, float64
    "taylor": dict(device=["auto"], dtype=["float64"], d=[50], widths="768,768,512,512",
                   n=None, repeats=5, budget=60.0, method_budget=30.0),
    # issue 13, the PINN regime (CPU, 2 threads): pinn-train, pinn-train64, pinn-infer, pinn-infer64,
    # pinn-overhead; "pinn" is all of them (in resumable pieces with --out DIR --resume
    # --max-minutes M); pinn-tiny a smoke run. Grids in PINN_GROUPS below.
    **{name: dict(device=["cpu"], groups=groups, repeats=5, budget=20.0, method_budget=10.0,
                  threads=2, methods=PINN_METHODS)
       for name, groups in PINN_PRESETS.items()},
    # the GPU grid (runs in resumable pieces; see --max-minutes)
    "gpu": dict(device=["cuda"], dtype=["float32", "float64"], d=[2, 16, 100, 1000],
                width=[256], depth=[4], n=[4096, 65536], repeats=10, budget=30.0,
                method_budget=15.0, diag_max_d=100, extra_taylor=True),
    # issue 14: nested autograd through torchhessdiag.nn drop-ins vs torch.nn, every activation
    # (torchhessdiag/bench/dropin.py, which runs it; its grid is dropin.GRID / dropin.QUICK)
    **{name: dict(device=["cpu"], groups=[grid_], repeats=5, budget=60.0, method_budget=20.0, threads=2)
       for name, grid_ in (("dropin", _DROPIN_GRID), ("dropin-quick", _DROPIN_QUICK))},
    # PINN architectures beyond MLPs (torchhessdiag/bench/models.py, which runs it)
    "models": dict(device=["cpu"], dtype=["float32", "float64"], d=[2, 3], width=[128],
                   depth=[4], n=[4096], repeats=5, budget=60.0, method_budget=30.0, check_n=16),
    # issue 16: biharmonic (d=5, tanh 3x128, N=512) and the sampled Laplacian at d = 1e3..1e5
    # (torchhessdiag/bench/operators.py, which runs it)
    "operators": dict(device=["cpu"], dtype=["float32"], d=[5], width=[128], depth=[3], n=[512],
                      repeats=5, budget=60.0, method_budget=30.0, check_n=8),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m torchhessdiag.bench",
        description="Hessian diagonal and Laplacian of MLPs w.r.t. the input: torchhessdiag vs "
                    "nested autograd, torch.func, a plain forward Laplacian and jet-for-pytorch, "
                    "with the GEMM floor. Every method is checked against float64 torch.func "
                    "before it is timed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a grid: quick (~1 min on 2 CPU cores), cpu (the README setting), "
                        "taylor (the Taylor-mode paper's setting), gpu (the full GPU grid), "
                        "pinn (issue 13's PINN grid; its parts pinn-train, pinn-train64, "
                        "pinn-infer, pinn-infer64, pinn-overhead; pinn-core: the settings users "
                        "reported, ~5 min; pinn-tiny: a smoke run), models "
                        "(PINN architectures: python -m torchhessdiag.bench.models --help), "
                        "dropin (issue 14: nested autograd through torchhessdiag.nn drop-ins vs "
                        "torch.nn, every activation; dropin-quick: ~2 minutes; python -m "
                        "torchhessdiag.bench.dropin --help). "
                        "Default: gpu where CUDA is available, else cpu. Explicit options below "
                        "override the preset's values.")
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    p.add_argument("--device", nargs="+", help="auto, cpu, cuda, cuda:1 (a list: one block each)")
    p.add_argument("--dtype", nargs="+", choices=["float32", "float64"])
    p.add_argument("--d", type=int, nargs="+", help="input dimensions")
    p.add_argument("--width", type=int, nargs="+", help="hidden widths (a list: one block each)")
    p.add_argument("--depth", type=int, nargs="+", help="numbers of hidden layers")
    p.add_argument("--widths", help="explicit hidden widths, e.g. 768,768,512,512 "
                                    "(overrides --width/--depth)")
    p.add_argument("--n", type=int, nargs="+", help="numbers of points N")
    p.add_argument("--activation", nargs="+", default=["tanh"],
                   choices=["tanh", "sigmoid", "silu", "gelu", "softplus"])
    p.add_argument("--modes", nargs="+", choices=["inference", "train"],
                   help="default: both (a pinn preset: each group's own)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS),
                   help="only these methods (default: all)")
    p.add_argument("--exclude", nargs="+", default=[], choices=list(METHODS),
                   help="leave these methods out")
    p.add_argument("--repeats", type=int, help="timed calls per method")
    p.add_argument("--warmup", type=int, default=1, help="untimed full-size calls first")
    p.add_argument("--budget", type=float, help="skip a method whose estimated seconds per "
                                                "call exceed this")
    p.add_argument("--method-budget", type=float,
                   help="seconds per method and block after which it gets no more timed calls")
    p.add_argument("--diag-max-d", type=int, default=None,
                   help="skip Hessian-diagonal-only methods above this d")
    p.add_argument("--check-n", type=int, default=None, help="N of the float64 check (16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU; the pinn presets: 2)")
    p.add_argument("--min-sample-ms", type=float, default=20.0,
                   help="a method whose call takes less is timed in batches of calls of at least "
                        "this many ms per sample, and reported per call")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory call")
    p.add_argument("--rss", action="store_true",
                   help="CPU: also the RSS increase of one call in a fresh process per method")
    p.add_argument("--out", help="results folder (default ./bench-results/<preset>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="keep the blocks already in --out/results.jsonl, run the others")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no new block after this many minutes (exit status 3 if blocks "
                        "are left: run the same command again with --resume)")
    p.add_argument("--json", metavar="PATH", help="also write the raw JSON to PATH")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--verbose", action="store_true", help="tracebacks of failing methods")
    p.add_argument("--plan", action="store_true",
                   help="print the blocks and a rough duration estimate (a cost model, see "
                        "torchhessdiag/bench/plan.py), run nothing")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.preset = "quick"
    if a.preset is None:
        a.preset = "gpu" if torch.cuda.is_available() else "cpu"
    pre = dict(PRESETS[a.preset])
    a.groups = pre.get("groups")
    if a.groups:  # explicit grid options replace that dimension in every group (see grid())
        a.grid_override = {k: getattr(a, k) for k in ("dtype", "d", "width", "depth", "widths",
                                                      "n", "modes") if getattr(a, k) is not None}
    if a.widths is None and pre.get("widths") and a.width is None and a.depth is None:
        a.widths = pre["widths"]
    for k in ("device", "dtype", "d", "width", "depth", "n", "repeats", "budget",
              "method_budget", "diag_max_d", "check_n", "threads", "methods"):
        if getattr(a, k) is None:
            setattr(a, k, pre.get(k))
    if a.modes is None:
        a.modes = ["inference", "train"]
    if a.dtype is None:
        a.dtype = ["float32"]
    if a.d is None:
        a.d = [8]
    a.extra_taylor = pre.get("extra_taylor", False)
    a.check_n = a.check_n or 16
    a.diag_max_d = a.diag_max_d or 10**9
    if a.width is None:
        a.width = [256]
    if a.depth is None:
        a.depth = [4]
    for name in ("d", "width", "depth"):
        if min(getattr(a, name)) < 1:
            p.error(f"--{name} must be >= 1")
    if a.n is not None and min(a.n) < 1:
        p.error("--n must be >= 1")
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    if a.resume and not a.out:
        p.error("--resume needs --out (the folder to resume)")
    return a


def _group_blocks(a, devs) -> List[dict]:
    """The blocks of a preset made of groups (the pinn presets): each group a product grid; an
    explicit --dtype/--d/--width/--depth/--widths/--n/--modes replaces that dimension in every
    group (so ``--preset pinn --d 2 --width 32 --depth 3 --n 512`` runs that setting in each
    mode and dtype of the preset); duplicates are dropped, the order kept."""
    ov = getattr(a, "grid_override", {})
    out, seen = [], set()
    for g in a.groups:
        archs = [[w] * L for w, L in g["archs"]]
        if "widths" in ov:
            archs = [[int(w) for w in ov["widths"].split(",")]]
        elif "width" in ov or "depth" in ov:
            ws = ov.get("width") or sorted({w for w, _ in g["archs"]})
            ls = ov.get("depth") or sorted({L for _, L in g["archs"]})
            archs = [[w] * L for w in ws for L in ls]
        for dev, dt, act, arch, d, n, mode in itertools.product(
                devs, ov.get("dtype", g["dtype"]), a.activation, archs, ov.get("d", g["d"]),
                ov.get("n", g["n"]), ov.get("modes", g["modes"])):
            b = dict(device=dev, dtype=dt, activation=act, d=d, widths=arch, N=n, mode=mode)
            if block_key(b) not in seen:
                seen.add(block_key(b))
                out.append(b)
    return out


def grid(a) -> List[dict]:
    """The blocks, in order."""
    devs = [str(M.pick_device(x)) for x in a.device]
    if getattr(a, "groups", None):
        return _group_blocks(a, devs)
    archs = ([[int(w) for w in a.widths.split(",")]] if a.widths else
             [[w] * L for w in a.width for L in a.depth])
    out = []
    for dev, dt, act, arch, d in itertools.product(devs, a.dtype, a.activation, archs, a.d):
        ns = a.n or ([2048] if dev.startswith("cuda") else [512])
        for n in ns:
            for mode in a.modes:
                out.append(dict(device=dev, dtype=dt, activation=act, d=d, widths=arch, N=n,
                                mode=mode))
    if a.extra_taylor:
        for dev in devs:
            for mode in a.modes:
                out.append(dict(device=dev, dtype="float64", activation="tanh", d=50,
                                widths=[768, 768, 512, 512], N=2048, mode=mode))
    return out


def env_record(devices: List[str]) -> dict:
    dev = torch.device(devices[0]) if devices else torch.device("cpu")
    env = M.env_info(dev)
    env.update(device_label=", ".join(M.device_label(torch.device(x)) for x in devices),
               torchhessdiag=thd.__version__,
               backend=", ".join(f"{t}: {thd.backend_info()['devices'].get(t)}"
                                 for t in sorted({torch.device(x).type for x in devices})),
               git=M.git_info(), loadavg=M.loadavg(),
               malloc_env={k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
               jet=_jet_version())
    return env


def _jet_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("jet-for-pytorch")
    except Exception:
        try:
            import jet

            return getattr(jet, "__version__", "importable (version unknown)")
        except Exception:
            return None


HOW = """How: every method runs in this one process on the same weights (torch.nn default init, seed)
and the same points (N(0, 1)). Before timing, every method is checked against float64 torch.func
vmap(hessian) (N=check_n, rel. error <= 1e-10; training: the weight gradient) and at full size
in the benchmark dtype (see the check line of each block). Times: warm-up call(s), then timed
calls round-robin over the methods (CPU: wall time; CUDA: events after synchronize); median,
min-max and IQR; a method stops after its time budget (n < repeats). "/ floor": median over the
median of the GEMM floor, the engine's GEMMs alone on preallocated buffers (forward row, backward
row, K first-order rows through layers 2..L; K = d for the Hessian diagonal, min(d, width) for
the Laplacian; training: plus the two backward GEMMs of each). "/ thd": median over the median of
thd.mlp_hessian_diag (diagonal and both-giving methods) or thd.mlp_laplacian (Laplacian, training
step). Peak memory: CUDA max_memory_allocated above the level before the call; CPU the peak of
live tensor bytes from torch.profiler's allocation events (~: estimated from the probe at N/8);
"peak RSS" (--rss): resident-set increase of the first full-size call in a fresh process.
Training step: loss = mean((lap - 1)^2), backward to the weights."""


def worker_cmd(spec: dict, key: str) -> List[str]:
    return ["-m", "torchhessdiag.bench", "--worker", json.dumps({"spec": spec, "key": key})]


def worker(a) -> None:
    """Peak RSS increase of one method's first full-size call in this fresh process."""
    job = json.loads(a.worker)
    spec, key = job["spec"], job["key"]
    device, dtype = torch.device(spec["device"]), M.parse_dtype(spec["dtype"])
    model = model_as(build_base(spec["d"], spec["widths"], spec["activation"], a.seed), device,
                     dtype)
    model.requires_grad_(spec["mode"] == "train")
    ctx = Context(model, spec["mode"])
    build(key, ctx, make_input(4, spec["d"], device, dtype, a.seed))()  # libraries, kernels
    fn = build(key, ctx, make_input(spec["N"], spec["d"], device, dtype, a.seed))
    M.emit_worker_result({"key": key, "rss": M.cpu_peak_rss(fn)})


def load_records(path: str) -> List[dict]:
    recs = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    recs.append(json.loads(line))
    return recs


def main(argv=None) -> int:
    """Run the grid; returns the exit status (0 ok, 1 a check failed, 3 blocks left)."""
    a = parse_args(argv)
    if a.preset in ("dropin", "dropin-quick"):  # its own grid and methods: bench/dropin.py
        from .dropin import main_from_cli as dropin_main

        return dropin_main(a)
    if a.preset == "models":  # its own grid and methods: torchhessdiag/bench/models.py
        from .models import main_from_cli

        return main_from_cli(a)
    if a.preset == "operators":  # its own grid and methods: torchhessdiag/bench/operators.py
        from .operators import main_from_cli as operators_main

        return operators_main(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker:
        worker(a)
        return 0
    t0 = time.perf_counter()
    blocks = grid(a)
    if a.plan:
        from .plan import plan_markdown

        keys = [k for k in (a.methods or list(METHODS)) if k not in a.exclude]
        print(plan_markdown(blocks, keys, a))
        return 0
    devices = sorted({b["device"] for b in blocks})
    out = a.out or os.path.join("bench-results", f"{a.preset}-{devices[0].replace(':', '')}-"
                                                  f"{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    jsonl = os.path.join(out, "results.jsonl")
    old = load_records(jsonl) if a.resume else []
    if not a.resume and os.path.exists(jsonl):
        os.replace(jsonl, jsonl + ".previous")
    done = {r["key"] for r in old}
    todo = [b for b in blocks if block_key(b) not in done]
    keys = [k for k in (a.methods or list(METHODS)) if k not in a.exclude]
    env = env_record(devices)
    print(f"# torchhessdiag benchmark, preset {a.preset}: {len(blocks)} blocks "
          f"({len(blocks) - len(todo)} already in {out}), methods: {', '.join(keys)}\n")
    print(R.env_markdown(env))
    print(f"\n1-min load average at start: {env['loadavg'][:1]} ({os.cpu_count()} cores); a "
          f"shared machine is noisy: medians and the spread are reported.\n")
    for k in keys:
        why = METHODS[k].available()
        if why:
            print(f"note: {METHODS[k].label} will be skipped: {why}")
    bar = M.Progress(len(todo), "bench", enabled=a.progress)
    check_cache: dict = {}
    new: List[dict] = []
    left = 0
    for i, spec in enumerate(todo):
        if a.max_minutes is not None and time.perf_counter() - t0 > a.max_minutes * 60:
            left = len(todo) - i
            break
        rec = run_block(spec, keys, a, check_cache, bar, worker_cmd)
        rec["env"] = {"device_label": M.device_label(torch.device(spec["device"])),
                      "torch": torch.__version__, "python": env.get("python"),
                      "git": env["git"].get("commit"), "threads": torch.get_num_threads(),
                      "jet": env.get("jet")}
        new.append(rec)
        with open(jsonl, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        bar.update(1, "")
        sys.stderr.flush()
        print(R.block_markdown(rec, env), flush=True)
    bar.close()
    records = old + new
    order = {block_key(b): i for i, b in enumerate(blocks)}
    records.sort(key=lambda r: order.get(r["key"], len(order)))
    env["loadavg_end"] = M.loadavg()
    env["elapsed_s"] = time.perf_counter() - t0
    extra = {"preset": a.preset, "args": vars(a), "complete": left == 0,
             "ok": all(r.get("ok") for r in records)}
    R.write_json(os.path.join(out, "results.json"), env, records, extra)
    if a.json:
        R.write_json(a.json, env, records, extra)
    R.write_markdown(os.path.join(out, "report.md"), env, records, HOW)
    plots = R.write_plots(out, records)
    print(R.thd_summary_markdown(records))
    print(R.summary_markdown(records))
    pm = R.paper_markdown(records)
    if pm:
        print(pm)
    print(f"1-min load average {env['loadavg'][0] if env['loadavg'] else '?'} at start, "
          f"{env['loadavg_end'][0] if env['loadavg_end'] else '?'} at the end. "
          f"Total {env['elapsed_s']:.0f} s.")
    print(f"written to {out}/: report.md, results.json, results.jsonl"
          + (f", {len(plots)} plots" if plots else ", no plots (matplotlib not installed)"))
    failed = [(r["key"], k) for r in records for k in r.get("failed", {})]
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
        return 1
    if left:
        print(f"{left} blocks left: run the same command again with --resume --out {out}",
              file=sys.stderr)
        return 3
    return 0
