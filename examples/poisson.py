"""Train a physics-informed network for the Poisson equation -Δu = f with torchhessdiag.

Problem (Dirichlet, on the unit cube [0, 1]^d, exact solution known):

* ``--dim 2`` (default): u(x, y) = sin(πx) sin(πy), f = 2π² sin(πx) sin(πy), u = 0 on the boundary;
* ``--dim d`` for any other d (e.g. ``--dim 10``): u(x) = Σ_i sin(π x_i / 2),
  f = (π²/4) Σ_i sin(π x_i / 2), u = the exact solution on the boundary.

Model and loss: a tanh MLP u_θ(x); the loss is mean (-Δu_θ - f)² over random interior points
plus ``--bc-weight`` × mean (u_θ - u)² over random points on the faces of the cube (the boundary
condition is a loss term, not built into the network). The Laplacian of the network at every
collocation point comes from one call, ``torchhessdiag.mlp_laplacian(model, x)``, which carries
the graph to the weights. Fresh collocation points every Adam step (learning rate decaying
exponentially to a tenth), then L-BFGS on one fixed batch of twice the size.

Prints a progress line every ``--log-every`` steps (loss, its parts, the relative L2 error on
held-out random points), then the relative L2 error, the time per training step, and the same
step with the Laplacian by nested autograd (one ``grad(create_graph=True)`` plus one more per input
dimension) in the same run on the same model and batch, with the setting; writes a PNG (exact
solution, prediction, error, loss curve; a slice through the cube at x_i = 0.5, i ≥ 2, for d > 2).

    python examples/poisson.py --quick               # 12-18 s on an idle 2-core CPU
    python examples/poisson.py                       # full run
    python examples/poisson.py --dim 10 [--quick]    # the 10-dimensional variant

Relative L2 errors reached (float64, seed 0, CPU: AMD EPYC, 2 cores shared with other jobs,
torch 2.13.0; more in the README section "Train a PINN"):

* ``--quick`` (tanh 3x32, 512 + 256 points per step, Adam 1000 + L-BFGS 300, 2 threads): 4.8e-4;
* full (tanh 4x64, 2048 + 1024 points, Adam 5000 + L-BFGS 2000, 1 thread, 848 s): 6.3e-5;
* ``--dim 10 --quick`` (tanh 3x48, 512 + 256, Adam 400 + L-BFGS 200, 2 threads): 6.4e-3;
* ``--dim 10`` (tanh 3x64, 1024 + 512, Adam 3000 + L-BFGS 1000, 1 thread, 852 s): 1.8e-3.
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

# size presets: --quick finishes in under a minute on a 2-core CPU (12 s idle); explicit options win
QUICK = {2: dict(steps=1000, lbfgs_steps=300, width=32, depth=3, batch=512, lr=5e-3, bc_weight=100.0),
         "d": dict(steps=400, lbfgs_steps=200, width=48, depth=3, batch=512, lr=5e-3, bc_weight=10.0)}
FULL = {2: dict(steps=5000, lbfgs_steps=2000, width=64, depth=4, batch=2048, lr=5e-3, bc_weight=100.0),
        "d": dict(steps=3000, lbfgs_steps=1000, width=64, depth=3, batch=1024, lr=5e-3, bc_weight=10.0)}


class Problem:
    """The exact solution u, the source f = -Δu (written out analytically), and samplers."""

    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype):
        if dim < 1:
            raise SystemExit(f"--dim must be >= 1, got {dim}")
        self.dim, self.device, self.dtype = dim, device, dtype
        self.product = dim == 2

    def exact(self, x: Tensor) -> Tensor:
        """u at points x (N, d) -> (N,)."""
        if self.product:
            return torch.sin(PI * x[:, 0]) * torch.sin(PI * x[:, 1])
        return torch.sin(0.5 * PI * x).sum(1)

    def source(self, x: Tensor) -> Tensor:
        """f = -Δu (N,), by hand: each sin(kx) contributes k² sin(kx)."""
        if self.product:
            return 2 * PI**2 * torch.sin(PI * x[:, 0]) * torch.sin(PI * x[:, 1])
        return (PI**2 / 4) * torch.sin(0.5 * PI * x).sum(1)

    def _uniform(self, n: int, gen: torch.Generator) -> Tensor:
        return torch.rand(n, self.dim, generator=gen, dtype=self.dtype).to(self.device)

    def interior(self, n: int, gen: torch.Generator) -> Tensor:
        return self._uniform(n, gen)

    def boundary(self, n: int, gen: torch.Generator) -> Tensor:
        """n uniform points on the 2d faces of the cube."""
        return _pinn.cube_boundary(n, self.dim, gen, self.dtype).to(self.device)


def make_loss(problem: Problem, bc_weight: float):
    """loss(model, batch, method): method "engine" uses torchhessdiag.mlp_laplacian, "nested"
    the nested-autograd Laplacian (examples/_pinn.py), everything else identical."""

    def loss_fn(model, batch: Dict[str, Tensor], method: str) -> Tuple[Tensor, Dict[str, Tensor]]:
        x, xb = batch["interior"], batch["boundary"]
        if method == "engine":
            lap = thd.mlp_laplacian(model, x)[:, 0]  # (N,): Σ_i ∂²u/∂x_i², differentiable
        else:
            _, _, lap = _pinn.nested_derivatives(model, x)
        pde = (-lap - batch["f"]).pow(2).mean()
        bc = (model(xb)[:, 0] - batch["g"]).pow(2).mean()
        return pde + bc_weight * bc, {"pde": pde.detach(), "bc": bc.detach()}

    return loss_fn


def plot(path: str, problem: Problem, model, hist: _pinn.History, title: str) -> None:
    plt = _pinn.pyplot()
    n = 161
    s = torch.linspace(0, 1, n, dtype=problem.dtype)
    X, Y = torch.meshgrid(s, s, indexing="xy")
    pts = torch.full((n * n, problem.dim), 0.5, dtype=problem.dtype)
    pts[:, 0], pts[:, 1 % problem.dim] = X.reshape(-1), Y.reshape(-1)
    pts = pts.to(problem.device)
    with torch.no_grad():
        pred = model(pts)[:, 0].cpu().reshape(n, n)
    exact = problem.exact(pts).cpu().reshape(n, n)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.0))
    where = "" if problem.dim <= 2 else f" (x_2..x_{problem.dim - 1} = 0.5)"
    for ax, img, name in ((axes[0], exact, "exact u" + where), (axes[1], pred, "network u_θ"),
                          (axes[2], (pred - exact).abs(), "|u_θ - u|")):
        im = ax.imshow(img.numpy(), origin="lower", extent=(0, 1, 0, 1), cmap="viridis")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("x_0")
        ax.set_ylabel("x_1")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    _pinn.plot_history(axes[3], hist)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the example; returns a dict (history, error, timing, png path) for tests."""
    p = _pinn.base_parser(__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=2, help="input dimension d (2: sin(πx)sin(πy); "
                   "otherwise Σ sin(πx_i/2))")
    p.add_argument("--bc-weight", type=float, default=None,
                   help="weight of the boundary loss (preset if omitted: 100 for d = 2, 10 otherwise)")
    p.add_argument("--boundary-batch", type=int, default=None,
                   help="boundary points per step (default: batch / 2)")
    args = p.parse_args(argv)
    key = 2 if args.dim == 2 else "d"
    _pinn.apply_preset(args, QUICK[key], FULL[key])
    if args.boundary_batch is None:
        args.boundary_batch = max(1, args.batch // 2)
    device, dtype = _pinn.setup(args)
    problem = Problem(args.dim, device, dtype)
    png = _pinn.out_path(args, f"poisson_{args.dim}d{'_quick' if args.quick else ''}.png")

    model = _pinn.mlp(args.dim, args.width, args.depth).to(device=device, dtype=dtype)
    loss_fn = make_loss(problem, args.bc_weight)

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

    sol = "sin(πx)sin(πy)" if problem.product else f"Σ_i sin(π x_i/2), i = 0..{args.dim - 1}"
    setting = _pinn.describe(device, dtype, args.width, args.depth,
                             f"{args.batch} interior + {args.boundary_batch} boundary points")
    print(f"Poisson -Δu = f on [0,1]^{args.dim}, exact u = {sol}, Dirichlet condition as a loss "
          f"term (weight {args.bc_weight:g})")
    print(f"setting: {setting}")
    print(f"training: Adam {args.steps} steps (lr {args.lr:g} -> {args.lr / 10:g}), then L-BFGS "
          f"{args.lbfgs_steps} iterations; seed {args.seed}; error on {args.test_points} held-out points")
    hist = _pinn.train(model, loss_fn, sample, error, args, device)
    err = error(model)

    print("\n== result")
    print(f"relative L2 error on {args.test_points} held-out points: {err:.2e}  "
          f"(after Adam {hist.adam_steps} + L-BFGS {hist.lbfgs_iters} iterations, "
          f"{hist.total_s:.0f} s in all)")
    print(f"time per Adam step in training: {_pinn.summarize_adam_steps(hist)}")
    print(f"one Adam step (loss + backward + update) on one batch, torchhessdiag.mlp_laplacian vs "
          f"nested autograd ({args.dim} + 1 grad(create_graph=True) calls), {setting}:")
    gen = torch.Generator().manual_seed(args.seed + 7)
    timing = _pinn.compare_step_times(model, loss_fn, sample(gen), args, device)

    title = (f"Poisson -Δu = f on [0,1]^{args.dim}, u = {sol}: rel. L2 error {err:.1e} "
             f"({args.dtype}, tanh {args.depth}x{args.width}, Adam {hist.adam_steps} + "
             f"L-BFGS {hist.lbfgs_iters})")
    plot(png, problem, model, hist, title)
    print(f"plot: {os.path.abspath(png)}")
    return {"history": hist, "error": err, "timing": timing, "png": png, "args": args}


if __name__ == "__main__":
    main()
