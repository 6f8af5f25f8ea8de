"""Shared pieces of the PINN examples (examples/poisson.py, examples/heat.py).

* command-line options common to both (``--device``, ``--dtype``, ``--seed``, ``--steps``,
  ``--lbfgs-steps``, ``--out``, ``--quick``, sizes, ``--threads``);
* a tanh MLP;
* the nested-autograd baseline that the examples time the library against: one
  ``torch.autograd.grad(create_graph=True)`` for the gradient, then one more
  ``grad(create_graph=True)`` per differentiated input dimension;
* the training loop (Adam, then optionally L-BFGS) with periodic progress lines and the held-out
  relative L2 error;
* the step-time comparison (library vs nested autograd, interleaved, median with spread);
* a lazy matplotlib import that fails with a clear message.

Nothing here knows about a particular PDE: each example passes a ``loss(model, batch, method)``
that builds its residuals either with torchhessdiag (``method="engine"``) or with nested autograd
(``method="nested"``).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

Tensor = torch.Tensor
Batch = Dict[str, Tensor]
LossFn = Callable[[nn.Module, Batch, str], Tuple[Tensor, Dict[str, Tensor]]]

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT_DIR = os.path.join(HERE, "out")


# ---- options and set-up ------------------------------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    """Options shared by the PINN examples. Sizes default to None: the example fills them in
    from its own quick/full presets (an explicit option always wins)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small preset: under a minute on a 2-core CPU (12-18 s idle)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of every sample")
    p.add_argument("--steps", type=int, default=None, help="Adam steps (preset if omitted)")
    p.add_argument("--lbfgs-steps", type=int, default=None,
                   help="L-BFGS iterations after Adam, 0 for none (preset if omitted)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate at the start "
                   "(decays exponentially to a tenth of it over the Adam steps; preset if omitted)")
    p.add_argument("--width", type=int, default=None, help="hidden width (preset if omitted)")
    p.add_argument("--depth", type=int, default=None, help="number of hidden layers (preset if omitted)")
    p.add_argument("--batch", type=int, default=None,
                   help="interior collocation points per step (preset if omitted)")
    p.add_argument("--test-points", type=int, default=20000, help="held-out points for the error")
    p.add_argument("--log-every", type=int, default=None, help="progress line every this many Adam steps")
    p.add_argument("--timing-runs", type=int, default=7,
                   help="interleaved runs per method in the step-time comparison (0: skip it)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="where to write the PNG (default: examples/out/<name>.png)")
    return p


def apply_preset(args: argparse.Namespace, quick: Dict[str, object], full: Dict[str, object]) -> None:
    """Fill every option left at None from the quick or full preset."""
    preset = quick if args.quick else full
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.log_every is None:
        args.log_every = max(1, args.steps // 10)
    for name in ("steps", "lbfgs_steps", "width", "depth", "batch", "test_points", "timing_runs"):
        v = getattr(args, name)
        lo = 1 if name in ("width", "depth", "batch", "test_points") else 0
        if not isinstance(v, int) or v < lo:
            raise SystemExit(f"--{name.replace('_', '-')} must be an integer >= {lo}, got {v!r}")
    if args.log_every < 1:
        raise SystemExit(f"--log-every must be >= 1, got {args.log_every}")


def setup(args: argparse.Namespace) -> Tuple[torch.device, torch.dtype]:
    """Device, dtype, threads and seed from the options."""
    if args.device in (None, "", "auto"):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise SystemExit(f"--device {args.device!r}: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    return device, dtype


def describe(device: torch.device, dtype: torch.dtype, width: int, depth: int, batch: str) -> str:
    """One line with the setting that every printed timing refers to."""
    import torchhessdiag as thd

    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{torch.get_num_threads()} threads"
    backend = thd.backend_info()["devices"].get(device.type, "?")
    return (f"device {device} ({where}, torchhessdiag kernels: {backend}), "
            f"{str(dtype).replace('torch.', '')}, tanh MLP {depth} hidden layers x {width}, "
            f"batch {batch}, torch {torch.__version__}")


def out_path(args: argparse.Namespace, name: str) -> str:
    path = args.out or os.path.join(DEFAULT_OUT_DIR, name)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    return path


def mlp(d_in: int, width: int, depth: int) -> nn.Sequential:
    """tanh MLP d_in -> width (x depth) -> 1."""
    layers: List[nn.Module] = []
    fan = d_in
    for _ in range(depth):
        layers += [nn.Linear(fan, width), nn.Tanh()]
        fan = width
    layers.append(nn.Linear(fan, 1))
    return nn.Sequential(*layers)


def cube_boundary(n: int, dim: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    """n points (n, dim) uniform on the 2*dim faces of [0, 1]^dim: a uniform point with one
    random coordinate set to 0 or 1 (CPU; move them yourself)."""
    x = torch.rand(n, dim, generator=gen, dtype=dtype)
    face = torch.randint(0, dim, (n,), generator=gen)
    side = torch.randint(0, 2, (n,), generator=gen).to(dtype)
    x[torch.arange(n), face] = side
    return x


# ---- the nested-autograd baseline ----------------------------------------------------------------


def nested_derivatives(model: nn.Module, x: Tensor, dims: Optional[Sequence[int]] = None
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    """What one writes without the library: value (N,), gradient (N, d) and the (partial)
    Laplacian (N,) over ``dims`` by nested autograd -- one ``grad(create_graph=True)`` for the
    gradient, then one ``grad(create_graph=True)`` per dimension in ``dims`` for the diagonal
    entry of the Hessian (the graph is kept so that a loss can be backpropagated to the weights).
    """
    x = x.detach().requires_grad_(True)
    u = model(x)[:, 0]
    (g,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    dims = range(x.shape[1]) if dims is None else dims
    lap = torch.zeros_like(u)
    for i in dims:
        (h,) = torch.autograd.grad(g[:, i].sum(), x, create_graph=True)
        lap = lap + h[:, i]
    return u, g, lap


# ---- lazy matplotlib ----------------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or a clear SystemExit."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "matplotlib is needed for the plot: `.venv/bin/python -m pip install matplotlib` "
            "(scripts/_env.sh installs it)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(ax, hist: "History") -> None:
    """Loss (and its parts) and the held-out relative L2 error against the step, log scale."""
    ax.semilogy([s for s, _ in hist.loss], [v for _, v in hist.loss], lw=0.8, label="loss")
    ax.semilogy([s for s, _ in hist.error], [e for _, e in hist.error], "o-", ms=3,
                label="rel. L2 error (held out)")
    if hist.lbfgs_iters > 0:
        ax.axvline(hist.adam_steps + 0.5, color="gray", ls=":", lw=1)
        ax.text(hist.adam_steps + 0.5, ax.get_ylim()[1], " L-BFGS", va="top", fontsize=8, color="gray")
    ax.set_xlabel("step (Adam, then L-BFGS iterations)")
    ax.set_title("training")
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)


# ---- training ----------------------------------------------------------------------------------


@dataclass
class History:
    loss: List[Tuple[int, float]] = field(default_factory=list)  # (step, loss): every Adam step,
    # then after every chunk of L-BFGS iterations (step = Adam steps + L-BFGS iterations so far)
    error: List[Tuple[int, float]] = field(default_factory=list)  # (step, held-out rel. L2 error)
    # (step, loss on one fixed batch drawn before training): at step 0 and with every progress line
    fixed_loss: List[Tuple[int, float]] = field(default_factory=list)
    adam_step_s: List[float] = field(default_factory=list)  # wall time of each Adam step
    adam_steps: int = 0
    lbfgs_iters: int = 0
    lbfgs_evals: int = 0
    lbfgs_s: float = 0.0
    total_s: float = 0.0


def _fmt_parts(parts: Dict[str, Tensor]) -> str:
    return ", ".join(f"{k} {float(v):.2e}" for k, v in parts.items())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    model: nn.Module,
    loss_fn: LossFn,
    sample: Callable[[torch.Generator], Batch],
    error_fn: Callable[[nn.Module], float],
    args: argparse.Namespace,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> History:
    """Adam for ``args.steps`` steps on fresh collocation points every step (learning rate
    ``args.lr`` decaying exponentially to a tenth), then ``args.lbfgs_steps`` L-BFGS iterations
    (strong Wolfe line search) on one fixed, larger batch. Prints a progress line every
    ``args.log_every`` Adam steps (and every few L-BFGS iterations) with the loss, its parts and
    the relative L2 error on the held-out points."""
    hist = History()
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    fixed = sample(torch.Generator(device="cpu").manual_seed(args.seed + 3))

    def fixed_loss(step: int) -> None:
        with torch.no_grad():
            hist.fixed_loss.append((step, float(loss_fn(model, fixed, "engine")[0])))

    fixed_loss(0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr)
    gamma = 0.1 ** (1.0 / max(1, args.steps))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
    t_start = time.perf_counter()
    width = len(str(args.steps))
    for step in range(1, args.steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        batch = sample(gen)
        opt.zero_grad(set_to_none=True)
        loss, parts = loss_fn(model, batch, "engine")
        loss.backward()
        opt.step()
        sched.step()
        _sync(device)
        hist.adam_step_s.append(time.perf_counter() - t0)
        cur = float(loss.detach())
        hist.loss.append((step, cur))
        if not math.isfinite(cur):
            raise FloatingPointError(f"loss became {cur} at Adam step {step}")
        if step % args.log_every == 0 or step == args.steps or step == 1:
            err = error_fn(model)
            hist.error.append((step, err))
            fixed_loss(step)
            recent = statistics.median(hist.adam_step_s[-args.log_every:])
            log(f"adam  {step:{width}d}/{args.steps}  loss {cur:.3e} ({_fmt_parts(parts)})"
                f"  rel.L2 err {err:.2e}  {1e3 * recent:6.1f} ms/step  {time.perf_counter() - t_start:5.1f} s")
    hist.adam_steps = args.steps

    if args.lbfgs_steps > 0:
        batch = sample_big(sample, gen, 2)
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=args.lbfgs_steps,
                                history_size=50, tolerance_grad=0.0, tolerance_change=0.0,
                                line_search_fn="strong_wolfe")
        first = opt.param_groups[0]["params"][0]
        evals = [0]

        def closure():
            opt.zero_grad(set_to_none=True)
            loss, _ = loss_fn(model, batch, "engine")
            loss.backward()
            evals[0] += 1
            return loss

        # One optimizer.step runs up to max_iter iterations (its state, the curvature pairs,
        # carries over to the next call): run it in chunks to print progress in between.
        every = max(10, args.lbfgs_steps // 10)
        t0 = time.perf_counter()
        done = 0
        while done < args.lbfgs_steps:
            n = min(every, args.lbfgs_steps - done)
            opt.param_groups[0]["max_iter"] = n
            opt.param_groups[0]["max_eval"] = 4 * n  # the line search may need a few more
            before = opt.state[first].get("n_iter", 0)
            opt.step(closure)
            iters = opt.state[first]["n_iter"] - before
            done += iters
            with torch.no_grad():
                cur, parts = loss_fn(model, batch, "engine")
            cur = float(cur)
            step = hist.adam_steps + done
            hist.loss.append((step, cur))
            err = error_fn(model)
            hist.error.append((step, err))
            fixed_loss(step)
            log(f"lbfgs {done:{width}d}/{args.lbfgs_steps}  loss {cur:.3e} ({_fmt_parts(parts)})"
                f"  rel.L2 err {err:.2e}  {evals[0]} loss evaluations  {time.perf_counter() - t_start:5.1f} s")
            if not math.isfinite(cur):
                raise FloatingPointError(f"loss became {cur} during L-BFGS")
            if iters < n:
                log("lbfgs stopped early: the line search made no progress (or hit its evaluation limit)")
                break
        hist.lbfgs_iters = done
        hist.lbfgs_evals = evals[0]
        hist.lbfgs_s = time.perf_counter() - t0
    hist.total_s = time.perf_counter() - t_start
    return hist


def sample_big(sample: Callable[[torch.Generator], Batch], gen: torch.Generator, times: int) -> Batch:
    """``times`` fresh batches concatenated (the fixed L-BFGS batch)."""
    parts = [sample(gen) for _ in range(times)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def relative_l2(pred: Tensor, exact: Tensor) -> float:
    """||pred - exact||_2 / ||exact||_2 over the given points."""
    return float(torch.linalg.vector_norm(pred - exact) / torch.linalg.vector_norm(exact))


# ---- step-time comparison ------------------------------------------------------------------------


def compare_step_times(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    args: argparse.Namespace,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> Dict[str, object]:
    """One Adam step (zero_grad, loss, backward, update) with the loss built by torchhessdiag and
    the same step with the loss built by nested autograd, on two copies of the trained model and
    the same batch; ``args.timing_runs`` runs each, interleaved (A, B, A, B, ...) after one
    warm-up each. First checks that both build the same loss (same model, same batch)."""
    with torch.enable_grad():
        le, _ = loss_fn(model, batch, "engine")
        ln, _ = loss_fn(model, batch, "nested")
    le, ln = float(le.detach()), float(ln.detach())
    rel = abs(le - ln) / max(abs(ln), 1e-300)
    log(f"same loss from both (same model, same batch): torchhessdiag {le:.12e}, "
        f"nested autograd {ln:.12e}, relative difference {rel:.1e}")
    out: Dict[str, object] = {"loss_rel_diff": rel}
    if args.timing_runs < 1:
        return out
    models = {m: copy.deepcopy(model) for m in ("engine", "nested")}
    opts = {m: torch.optim.Adam([p for p in models[m].parameters() if p.requires_grad], lr=1e-6)
            for m in models}

    def step(m):
        opts[m].zero_grad(set_to_none=True)
        loss, _ = loss_fn(models[m], batch, m)
        loss.backward()
        opts[m].step()

    times: Dict[str, List[float]] = {m: [] for m in models}
    for m in models:  # warm-up
        step(m)
    for _ in range(args.timing_runs):
        for m in models:
            _sync(device)
            t0 = time.perf_counter()
            step(m)
            _sync(device)
            times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(t) for m, t in times.items()}
    for m, label in (("engine", "torchhessdiag"), ("nested", "nested autograd")):
        t = times[m]
        log(f"   {label:16s} {1e3 * med[m]:8.1f} ms  (min {1e3 * min(t):.1f}, max {1e3 * max(t):.1f})")
    ratio = med["nested"] / med["engine"]
    log(f"   ratio nested autograd / torchhessdiag = {ratio:.2f}x (medians of {args.timing_runs} "
        f"interleaved runs each, same run)")
    out.update({"times_s": times, "median_s": med, "ratio": ratio})
    return out


def summarize_adam_steps(hist: History) -> str:
    """Median and spread of the Adam step times of the training run (first 5 excluded as warm-up
    when there are enough)."""
    ts = hist.adam_step_s[5:] if len(hist.adam_step_s) > 20 else hist.adam_step_s
    if not ts:
        return "no Adam steps"
    q = sorted(ts)
    lo, hi = q[len(q) // 10], q[(9 * len(q)) // 10]
    return (f"{1e3 * statistics.median(ts):.1f} ms median over {len(ts)} steps "
            f"(10-90 % range {1e3 * lo:.1f}-{1e3 * hi:.1f} ms)")


def fail(msg: str) -> "None":
    print(msg, file=sys.stderr)
    raise SystemExit(2)
