"""Train a physics-informed network for the Poisson equation -Δu = f in d = 1000 dimensions with
the sampled-axes Laplacian of torchhessdiag.

Problem (Dirichlet, on the unit cube [0, 1]^d, exact solution known): a sum of r = 2 ridge waves

    u(x) = Σ_k sin(b_k · x + c_k),   f = -Δu = Σ_k |b_k|² sin(b_k · x + c_k),

with fixed random b_k ~ N(0, (3² / d) I) (|b_k| ≈ 3) and c_k ~ U(0, 2π). Every axis contributes to
Δu: ∂²u/∂x_i² = -Σ_k b_ki² sin(b_k · x + c_k), spread over the d axes like a χ² variable.

Model and loss: a residual tanh network u_θ (a linear embedding of the centred inputs 2x - 1, ``--depth``
blocks h <- h + tanh(W h + b), a linear head; not an ``nn.Sequential``, so the traced Taylor jets
carry it). ``torchhessdiag.laplacian(model, x, num_samples=S, generator=g)`` estimates Δu_θ from S
of the d axes drawn uniformly without replacement (the same axes for the batch, scaled by d/S:
unbiased, each second derivative exact; S + 2 rows per point through every layer after the first
instead of d + 2). The PDE term is mean (r₁ r₂) / F² with r_j = -Δ̂_j u_θ - f from two
*independent* draws and F = mean_k |b_k|² the scale of f: its
expectation is exactly mean (-Δu_θ - f)², so its gradient is unbiased -- the square of one
estimate would add the estimator's variance to the loss and bias the solution. Plus
``--bc-weight`` × mean (u_θ - u)² on random points of the cube's faces. Adam only (the loss is
random, so no L-BFGS), fresh points and axes every step, learning rate decaying to a tenth.

Prints a progress line every ``--log-every`` steps (loss, its parts, the relative L2 error of u on
held-out random points), then the error reached, the residual of the trained network with the
*exact* Laplacian on held-out points, the time per step, and one Adam step with the sampled
Laplacian next to the same step with the exact Laplacian (all d axes, ``thd.laplacian``) on the
same model and batch; writes a PNG (u and u_θ along a line through the cube, the loss curve).

    python examples/poisson_highdim.py --quick             # under a minute on a 2-core CPU
    python examples/poisson_highdim.py                     # full run
    python examples/poisson_highdim.py --dim 10000 --samples 64

Errors reached: see docs/operators.md ("Beyond the Laplacian").
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _pinn  # noqa: E402

import torchhessdiag as thd  # noqa: E402

Tensor = torch.Tensor

QUICK = dict(steps=400, lbfgs_steps=0, width=64, depth=3, batch=256, lr=3e-3)
FULL = dict(steps=4000, lbfgs_steps=0, width=128, depth=3, batch=512, lr=3e-3)


class ResNet(nn.Module):
    """x (N, d) -> linear embedding of 2x - 1 (centred: the first layer trains much faster in high
    dimensions) -> ``depth`` residual tanh blocks -> linear head (N, 1)."""

    def __init__(self, d: int, width: int, depth: int):
        super().__init__()
        self.embed = nn.Linear(d, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.embed(2 * x - 1))
        for blk in self.blocks:
            h = h + torch.tanh(blk(h))
        return self.head(h)


class Problem:
    """The ridge-wave solution, its source (by hand) and the samplers."""

    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype, ridges: int = 2, seed: int = 0):
        if dim < 2:
            raise SystemExit(f"--dim must be >= 2, got {dim}")
        self.dim, self.device, self.dtype = dim, device, dtype
        g = torch.Generator().manual_seed(10_000 + seed)
        self.B = (torch.randn(ridges, dim, generator=g, dtype=torch.float64) * (3.0 / math.sqrt(dim))).to(device, dtype)
        self.c = (torch.rand(ridges, generator=g, dtype=torch.float64) * 2 * math.pi).to(device, dtype)
        self.B2 = (self.B * self.B).sum(1)  # |b_k|²
        self.scale = float(self.B2.mean())  # F: the size of f

    def exact(self, x: Tensor) -> Tensor:
        return torch.sin(x @ self.B.t() + self.c).sum(1)

    def source(self, x: Tensor) -> Tensor:
        """f = -Δu: each sin(b·x + c) contributes |b|² sin(b·x + c)."""
        return (torch.sin(x @ self.B.t() + self.c) * self.B2).sum(1)

    def interior(self, n: int, gen: torch.Generator) -> Tensor:
        return torch.rand(n, self.dim, generator=gen, dtype=self.dtype).to(self.device)

    def boundary(self, n: int, gen: torch.Generator) -> Tensor:
        return _pinn.cube_boundary(n, self.dim, gen, self.dtype).to(self.device)


def make_loss(problem: Problem, bc_weight: float, samples: int, axes_gen: torch.Generator):
    """loss(model, batch, method): "engine" -- the unbiased product of two sampled-Laplacian
    residuals; "exact" -- the squared residual with the exact Laplacian (all d axes)."""

    def loss_fn(model, batch: Dict[str, Tensor], method: str) -> Tuple[Tensor, Dict[str, Tensor]]:
        x, xb = batch["interior"], batch["boundary"]
        if method == "engine":
            r1 = -thd.laplacian(model, x, num_samples=samples, generator=axes_gen)[:, 0] - batch["f"]
            r2 = -thd.laplacian(model, x, num_samples=samples, generator=axes_gen)[:, 0] - batch["f"]
            pde = (r1 * r2).mean() / problem.scale**2
        else:
            pde = (-thd.laplacian(model, x)[:, 0] - batch["f"]).pow(2).mean() / problem.scale**2
        bc = (model(xb)[:, 0] - batch["g"]).pow(2).mean()
        return pde + bc_weight * bc, {"pde": pde.detach(), "bc": bc.detach()}

    return loss_fn


def time_steps(model, loss_fn, batch, runs: int, device) -> Dict[str, List[float]]:
    """One Adam step (loss, backward, update) with each loss, interleaved, on copies of the model."""
    import copy

    models = {m: copy.deepcopy(model) for m in ("engine", "exact")}
    opts = {m: torch.optim.Adam(models[m].parameters(), lr=1e-6) for m in models}

    def step(m):
        opts[m].zero_grad(set_to_none=True)
        loss, _ = loss_fn(models[m], batch, m)
        loss.backward()
        opts[m].step()

    times: Dict[str, List[float]] = {m: [] for m in models}
    for m in models:
        step(m)
    for _ in range(runs):
        for m in models:
            _pinn._sync(device)
            t0 = time.perf_counter()
            step(m)
            _pinn._sync(device)
            times[m].append(time.perf_counter() - t0)
    return times


def plot(path: str, problem: Problem, model, hist: _pinn.History, title: str) -> None:
    """u and u_θ along the diagonal segment x = t·1 + (1 - t)·p for a fixed random corner p."""
    plt = _pinn.pyplot()
    n = 201
    g = torch.Generator().manual_seed(5)
    p0 = torch.rand(problem.dim, generator=g, dtype=problem.dtype)
    p1 = torch.rand(problem.dim, generator=g, dtype=problem.dtype)
    t = torch.linspace(0, 1, n, dtype=problem.dtype)
    pts = (p0 + t[:, None] * (p1 - p0)).to(problem.device)
    with torch.no_grad():
        pred = model(pts)[:, 0].cpu()
    exact = problem.exact(pts).cpu()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.0))
    axes[0].plot(t.numpy(), exact.numpy(), label="exact u", lw=2)
    axes[0].plot(t.numpy(), pred.numpy(), "--", label="network u_θ", lw=1.5)
    axes[0].set_xlabel("t  (x = p + t (q - p), p, q random points of the cube)")
    axes[0].set_title(f"u along a segment through [0,1]^{problem.dim}", fontsize=10)
    axes[0].legend(fontsize=8)
    axes[0].grid(True, alpha=0.3)
    _pinn.plot_history(axes[1], _positive(hist))
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _positive(hist: _pinn.History) -> _pinn.History:
    """The product loss can dip below 0 on one batch: plot |loss| (log scale)."""
    import copy

    h = copy.copy(hist)
    h.loss = [(s, abs(v)) for s, v in hist.loss]
    return h


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the example; returns a dict (history, error, residual, timing, png path) for tests."""
    p = _pinn.base_parser(__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=1000, help="input dimension d")
    p.add_argument("--samples", type=int, default=16, help="axes S per Laplacian estimate (two per step)")
    p.add_argument("--bc-weight", type=float, default=10.0, help="weight of the boundary loss")
    p.add_argument("--boundary-batch", type=int, default=None, help="boundary points per step (default: batch / 2)")
    p.add_argument("--residual-points", type=int, default=256,
                   help="held-out points for the exact-Laplacian residual at the end (0: skip)")
    args = p.parse_args(argv)
    if args.timing_runs == 7 and "--timing-runs" not in (argv if argv is not None else sys.argv[1:]):
        args.timing_runs = 3  # the exact Laplacian at d = 1000 is the slow side
    _pinn.apply_preset(args, QUICK, FULL)
    if args.lbfgs_steps:
        raise SystemExit("--lbfgs-steps: the sampled loss is random, L-BFGS needs a deterministic one; use 0")
    if not 1 <= args.samples <= args.dim:
        raise SystemExit(f"--samples must be between 1 and --dim ({args.dim}), got {args.samples}")
    if args.boundary_batch is None:
        args.boundary_batch = max(1, args.batch // 2)
    device, dtype = _pinn.setup(args)
    problem = Problem(args.dim, device, dtype, seed=args.seed)
    png = _pinn.out_path(args, f"poisson_highdim_{args.dim}d{'_quick' if args.quick else ''}.png")
    model = ResNet(args.dim, args.width, args.depth).to(device=device, dtype=dtype)
    axes_gen = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(args.seed + 99)
    loss_fn = make_loss(problem, args.bc_weight, args.samples, axes_gen)

    def sample(gen: torch.Generator) -> Dict[str, Tensor]:
        x = problem.interior(args.batch, gen)
        xb = problem.boundary(args.boundary_batch, gen)
        return {"interior": x, "f": problem.source(x), "boundary": xb, "g": problem.exact(xb)}

    test_gen = torch.Generator().manual_seed(args.seed + 12345)
    x_test = problem.interior(args.test_points, test_gen)
    u_test = problem.exact(x_test)

    def error(model) -> float:
        with torch.no_grad():
            return _pinn.relative_l2(model(x_test)[:, 0], u_test)

    setting = _pinn.describe(device, dtype, args.width, args.depth,
                             f"{args.batch} interior + {args.boundary_batch} boundary points")
    setting = setting.replace(f"tanh MLP {args.depth} hidden layers", f"residual tanh net, {args.depth} blocks")
    print(f"Poisson -Δu = f on [0,1]^{args.dim}, exact u = Σ_k sin(b_k·x + c_k) (2 random ridge waves), "
          f"Dirichlet condition as a loss term (weight {args.bc_weight:g})")
    print(f"setting: {setting}")
    print(f"Laplacian: sampled, {args.samples} of {args.dim} axes per estimate (uniform, without replacement, "
          f"scaled by d/S), two independent estimates per step; PDE loss mean(r1 r2) (unbiased)")
    print(f"training: Adam {args.steps} steps (lr {args.lr:g} -> {args.lr / 10:g}); seed {args.seed}; "
          f"error on {args.test_points} held-out points")
    hist = _pinn.train(model, loss_fn, sample, error, args, device)
    err = error(model)

    print("\n== result")
    print(f"relative L2 error on {args.test_points} held-out points: {err:.2e}  "
          f"(after Adam {hist.adam_steps} steps, {hist.total_s:.0f} s in all)")
    residual = None
    if args.residual_points > 0:
        xr = problem.interior(args.residual_points, torch.Generator().manual_seed(args.seed + 777))
        with torch.no_grad():
            lap = thd.laplacian(model, xr)[:, 0]  # exact: all d axes
        fr = problem.source(xr)
        residual = _pinn.relative_l2(-lap, fr)
        print(f"PDE residual with the exact Laplacian (all {args.dim} axes) on {args.residual_points} held-out "
              f"points: ||-Δu_θ - f|| / ||f|| = {residual:.2e}")
    print(f"time per Adam step in training: {_pinn.summarize_adam_steps(hist)}")
    timing: Dict[str, object] = {}
    if args.timing_runs > 0:
        gen = torch.Generator().manual_seed(args.seed + 7)
        times = time_steps(model, loss_fn, sample(gen), args.timing_runs, device)
        med = {m: statistics.median(t) for m, t in times.items()}
        print(f"one Adam step on one batch, {setting}:")
        print(f"   sampled Laplacian (2 x {args.samples} axes) {1e3 * med['engine']:9.1f} ms  (min {1e3 * min(times['engine']):.1f})")
        print(f"   exact Laplacian ({args.dim} axes)        {1e3 * med['exact']:9.1f} ms  (min {1e3 * min(times['exact']):.1f})")
        print(f"   ratio exact / sampled = {med['exact'] / med['engine']:.1f}x (medians of {args.timing_runs} interleaved runs, same run)")
        timing = {"times_s": times, "median_s": med}
    title = (f"Poisson -Δu = f on [0,1]^{args.dim}, sampled Laplacian (S = {args.samples}): rel. L2 error "
             f"{err:.1e} ({args.dtype}, residual tanh {args.depth}x{args.width}, Adam {hist.adam_steps})")
    plot(png, problem, model, hist, title)
    print(f"plot: {os.path.abspath(png)}")
    return {"history": hist, "error": err, "residual": residual, "timing": timing, "png": png, "args": args}


if __name__ == "__main__":
    main()
