"""Train a physics-informed network for the heat equation u_t = Δ_x u with torchhessdiag.

Problem (x in [0, 1]^D, t in [0, T], exact solution known):

    u_t = Δ_x u,   u(0, x) = Π_i sin(π x_i),   u = 0 on the faces of the cube,
    exact u(t, x) = exp(-D π² t) Π_i sin(π x_i).

Defaults: D = 2 spatial dims (``--dim``), T = 0.1 (``--t-end``; the solution decays to
exp(-2π²·0.1) ≈ 0.14 of its initial size).

Model and loss: a tanh MLP u_θ(t, x) with input (t, x_1, ..., x_D), behind a frozen linear layer
that divides t by T (input normalisation). One call per batch,

    out = torchhessdiag.mlp_derivatives(model, tx, second="laplacian", dims=[1, ..., D])

gives the value, the full gradient (N, 1, 1 + D) -- its column 0 is u_t -- and the partial
Laplacian over the spatial dims only, Σ_{i ≥ 1} ∂²u/∂x_i², differentiable w.r.t. the weights. The
loss is mean (u_t - Δ_x u)² over random space-time points plus ``--ic-weight`` × the initial-
condition misfit at t = 0 and ``--bc-weight`` × the boundary misfit (both conditions are loss
terms, not built into the network). Adam on fresh points every step, then L-BFGS on one fixed
batch.

Prints progress lines (loss, its parts, the relative L2 error over held-out space-time points),
then the relative L2 error, the time per training step and the same step with nested autograd (one
``grad(create_graph=True)`` for u_t and ∇u, plus one per spatial dim) in the same run on the same
model and batch, with the setting; writes a PNG (network and error at three times -- or the whole
(t, x) plane for D = 1 -- and the loss curve).

    python examples/heat.py --quick          # 12-18 s on an idle 2-core CPU
    python examples/heat.py                  # full run
    python examples/heat.py --dim 1          # one spatial dimension

Relative L2 errors reached over [0, 0.1] x [0, 1]^2 (float64, seed 0, CPU: AMD EPYC, 2 cores
shared with other jobs, torch 2.13.0; more in the README section "Train a PINN"):

* ``--quick`` (tanh 3x32, 512 + 256 + 256 points per step, Adam 1000 + L-BFGS 300, 2 threads): 7.8e-3;
* full (tanh 4x64, 2048 + 1024 + 1024 points, Adam 5000 + L-BFGS 2000, 1 thread, 1446 s): 5.8e-4.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _pinn  # noqa: E402

import torchhessdiag as thd  # noqa: E402

Tensor = torch.Tensor
PI = math.pi

QUICK = dict(steps=1000, lbfgs_steps=300, width=32, depth=3, batch=512, lr=5e-3)
FULL = dict(steps=5000, lbfgs_steps=2000, width=64, depth=4, batch=2048, lr=5e-3)


class Problem:
    """Exact solution and samplers for u_t = Δ_x u on [0, T] x [0, 1]^D; points are (t, x)."""

    def __init__(self, dim: int, t_end: float, device: torch.device, dtype: torch.dtype):
        if dim < 1:
            raise SystemExit(f"--dim must be >= 1, got {dim}")
        if not t_end > 0:
            raise SystemExit(f"--t-end must be > 0, got {t_end}")
        self.dim, self.t_end, self.device, self.dtype = dim, t_end, device, dtype
        self.spatial = list(range(1, dim + 1))  # the input columns of x; column 0 is t

    def exact(self, tx: Tensor) -> Tensor:
        """u(t, x) = exp(-D π² t) Π sin(π x_i) at points tx (N, 1 + D) -> (N,)."""
        t, x = tx[:, 0], tx[:, 1:]
        return torch.exp(-self.dim * PI**2 * t) * torch.sin(PI * x).prod(1)

    def interior(self, n: int, gen: torch.Generator) -> Tensor:
        tx = torch.rand(n, 1 + self.dim, generator=gen, dtype=self.dtype)
        tx[:, 0] *= self.t_end
        return tx.to(self.device)

    def initial(self, n: int, gen: torch.Generator) -> Tensor:
        tx = torch.rand(n, 1 + self.dim, generator=gen, dtype=self.dtype)
        tx[:, 0] = 0
        return tx.to(self.device)

    def boundary(self, n: int, gen: torch.Generator) -> Tensor:
        t = torch.rand(n, 1, generator=gen, dtype=self.dtype) * self.t_end
        x = _pinn.cube_boundary(n, self.dim, gen, self.dtype)
        return torch.cat([t, x], 1).to(self.device)


def make_model(dim: int, t_end: float, width: int, depth: int) -> torch.nn.Sequential:
    """A frozen linear layer that maps (t, x) to (t / T, x) -- so that every input varies over
    [0, 1] -- followed by the tanh MLP. The library differentiates through the frozen layer like
    through any other, so the derivatives are still taken w.r.t. the original t and x."""
    scale = torch.nn.Linear(1 + dim, 1 + dim, bias=False)
    with torch.no_grad():
        scale.weight.copy_(torch.diag(torch.tensor([1.0 / t_end] + [1.0] * dim)))
    scale.weight.requires_grad_(False)
    return torch.nn.Sequential(scale, _pinn.mlp(1 + dim, width, depth))


def make_loss(problem: Problem, ic_weight: float, bc_weight: float):
    """loss(model, batch, method): method "engine" takes u_t and Δ_x u from one
    torchhessdiag.mlp_derivatives call, "nested" from nested autograd; everything else identical."""

    def loss_fn(model, batch: Dict[str, Tensor], method: str) -> Tuple[Tensor, Dict[str, Tensor]]:
        tx = batch["interior"]
        if method == "engine":
            out = thd.mlp_derivatives(model, tx, second="laplacian", dims=problem.spatial)
            u_t = out.gradient[:, 0, 0]  # ∂u/∂t: column 0 of the full gradient (N, 1, 1 + D)
            lap = out.second[:, 0]  # Σ_{i>=1} ∂²u/∂x_i²: the spatial (partial) Laplacian
        else:
            _, g, lap = _pinn.nested_derivatives(model, tx, dims=problem.spatial)
            u_t = g[:, 0]
        pde = (u_t - lap).pow(2).mean()
        ic = (model(batch["initial"])[:, 0] - batch["u0"]).pow(2).mean()
        bc = model(batch["boundary"])[:, 0].pow(2).mean()
        loss = pde + ic_weight * ic + bc_weight * bc
        return loss, {"pde": pde.detach(), "ic": ic.detach(), "bc": bc.detach()}

    return loss_fn


def plot(path: str, problem: Problem, model, hist: _pinn.History, title: str) -> None:
    plt = _pinn.pyplot()
    n = 121
    s = torch.linspace(0, 1, n, dtype=problem.dtype)

    def evaluate(pts: Tensor):
        pts = pts.to(problem.device)
        with torch.no_grad():
            pred = model(pts)[:, 0].cpu().reshape(n, n)
        return pred, (pred - problem.exact(pts).cpu().reshape(n, n)).abs()

    if problem.dim == 1:
        T, X = torch.meshgrid(s * problem.t_end, s, indexing="xy")
        pred, err = evaluate(torch.stack([T.reshape(-1), X.reshape(-1)], 1))
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.0))
        for ax, img, name in ((axes[0], pred, "network u_θ(t, x)"), (axes[1], err, "|u_θ - u|")):
            im = ax.imshow(img.T.numpy(), origin="lower", aspect="auto",
                           extent=(0, problem.t_end, 0, 1), cmap="viridis")
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("t")
            ax.set_ylabel("x")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        _pinn.plot_history(axes[2], hist)
    else:
        times = [0.0, problem.t_end / 2, problem.t_end]
        fig = plt.figure(figsize=(18, 7.5))
        gs = fig.add_gridspec(2, 4)
        X, Y = torch.meshgrid(s, s, indexing="xy")
        where = "" if problem.dim == 2 else f", x_3..x_{problem.dim} = 0.5"
        for c, t in enumerate(times):
            pts = torch.full((n * n, 1 + problem.dim), 0.5, dtype=problem.dtype)
            pts[:, 0], pts[:, 1], pts[:, 2] = t, X.reshape(-1), Y.reshape(-1)
            pred, err = evaluate(pts)
            for r, (img, name) in enumerate(((pred, f"network u_θ, t = {t:.3g}{where}"),
                                             (err, f"|u_θ - u|, t = {t:.3g}"))):
                ax = fig.add_subplot(gs[r, c])
                im = ax.imshow(img.numpy(), origin="lower", extent=(0, 1, 0, 1), cmap="viridis")
                ax.set_title(name, fontsize=10)
                ax.set_xlabel("x_1")
                ax.set_ylabel("x_2")
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        _pinn.plot_history(fig.add_subplot(gs[:, 3]), hist)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the example; returns a dict (history, error, timing, png path) for tests."""
    p = _pinn.base_parser(__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=2, help="number D of spatial dimensions")
    p.add_argument("--t-end", type=float, default=0.1, help="final time T")
    p.add_argument("--ic-weight", type=float, default=100.0, help="weight of the initial-condition loss")
    p.add_argument("--bc-weight", type=float, default=100.0, help="weight of the boundary loss")
    p.add_argument("--boundary-batch", type=int, default=None,
                   help="initial and boundary points per step, each (default: batch / 2)")
    args = p.parse_args(argv)
    _pinn.apply_preset(args, QUICK, FULL)
    if args.boundary_batch is None:
        args.boundary_batch = max(1, args.batch // 2)
    device, dtype = _pinn.setup(args)
    problem = Problem(args.dim, args.t_end, device, dtype)
    png = _pinn.out_path(args, f"heat_{args.dim}d{'_quick' if args.quick else ''}.png")

    model = make_model(args.dim, args.t_end, args.width, args.depth).to(device=device, dtype=dtype)
    loss_fn = make_loss(problem, args.ic_weight, args.bc_weight)

    def sample(gen: torch.Generator) -> Dict[str, Tensor]:
        x0 = problem.initial(args.boundary_batch, gen)
        return {"interior": problem.interior(args.batch, gen), "initial": x0,
                "u0": problem.exact(x0), "boundary": problem.boundary(args.boundary_batch, gen)}

    test_gen = torch.Generator().manual_seed(args.seed + 12345)
    x_test = problem.interior(args.test_points, test_gen)
    u_test = problem.exact(x_test)

    def error(model) -> float:
        with torch.no_grad():
            return _pinn.relative_l2(model(x_test)[:, 0], u_test)

    setting = _pinn.describe(device, dtype, args.width, args.depth,
                             f"{args.batch} interior + {args.boundary_batch} initial + "
                             f"{args.boundary_batch} boundary points")
    print(f"heat equation u_t = Δ_x u, x in [0,1]^{args.dim}, t in [0, {args.t_end:g}], exact "
          f"u = exp(-{args.dim}π²t) Π sin(πx_i); initial and boundary conditions as loss terms "
          f"(weights {args.ic_weight:g}, {args.bc_weight:g})")
    print(f"setting: {setting}")
    print(f"training: Adam {args.steps} steps (lr {args.lr:g} -> {args.lr / 10:g}), then L-BFGS "
          f"{args.lbfgs_steps} iterations; seed {args.seed}; error on {args.test_points} held-out "
          f"space-time points")
    hist = _pinn.train(model, loss_fn, sample, error, args, device)
    err = error(model)

    print("\n== result")
    print(f"relative L2 error on {args.test_points} held-out space-time points: {err:.2e}  "
          f"(after Adam {hist.adam_steps} + L-BFGS {hist.lbfgs_iters} iterations, "
          f"{hist.total_s:.0f} s in all)")
    print(f"time per Adam step in training: {_pinn.summarize_adam_steps(hist)}")
    print(f"one Adam step (loss + backward + update) on one batch, torchhessdiag.mlp_derivatives vs "
          f"nested autograd (1 + {args.dim} grad(create_graph=True) calls), {setting}:")
    gen = torch.Generator().manual_seed(args.seed + 7)
    timing = _pinn.compare_step_times(model, loss_fn, sample(gen), args, device)

    title = (f"heat u_t = Δ_x u on [0,{args.t_end:g}] x [0,1]^{args.dim}: rel. L2 error {err:.1e} "
             f"({args.dtype}, tanh {args.depth}x{args.width}, Adam {hist.adam_steps} + "
             f"L-BFGS {hist.lbfgs_iters})")
    plot(png, problem, model, hist, title)
    print(f"plot: {os.path.abspath(png)}")
    return {"history": hist, "error": err, "timing": timing, "png": png, "args": args}


if __name__ == "__main__":
    main()
