"""Train a physics-informed network for a clamped plate: the biharmonic equation Δ²u = f.

Problem (Kirchhoff plate, clamped on all four edges, unit square, exact solution known):

    Δ²u = ∂⁴u/∂x⁴ + 2 ∂⁴u/∂x²∂y² + ∂⁴u/∂y⁴ = f   on (0, 1)²,
    u = 0 and ∂u/∂n = 0                            on the boundary,

with u(x, y) = sin²(πx) sin²(πy) and f = Δ²u written out by hand:
f = -8π⁴ [cos(2πx) sin²(πy) + sin²(πx) cos(2πy) - cos(2πx) cos(2πy)].

Model: u_θ(x, y) = B(x, y) N_θ(x, y) with B = (16 x(1-x) y(1-y))² and N_θ a tanh MLP -- B and
its gradient vanish on the edges, so both clamped conditions hold exactly and the loss is the PDE
residual alone, mean ((Δ²u_θ - f) / (8π⁴))² over random interior points. The model is not an
``nn.Sequential`` (a product with B): ``torchhessdiag.biharmonic`` traces it and propagates
fourth-order Taylor jets along the axes and e_x ± e_y (top order collapsed: 14 rows per point),
with the graph to the weights. Fresh collocation points every Adam step (learning rate decaying to
a tenth), then L-BFGS on one fixed batch of twice the size.

Prints a progress line every ``--log-every`` steps (loss, relative L2 error of u on held-out random
points), then the error reached, the time per training step, and the same step with Δ²u by
nested autograd (Δ(Δu): 2d + 2 = 6 ``grad(create_graph=True)`` calls) in the same run, same model
and batch, after checking that both give the same loss; writes a PNG (exact solution, network,
error, loss curve).

    python examples/plate.py --quick        # under a minute on a 2-core CPU
    python examples/plate.py                # full run

Relative L2 errors reached: see docs/operators.md ("Beyond the Laplacian").
"""

from __future__ import annotations

import math
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _pinn  # noqa: E402

import torchhessdiag as thd  # noqa: E402

Tensor = torch.Tensor
PI = math.pi
SCALE = 8 * PI**4  # the size of f: residuals are divided by it

QUICK = dict(steps=600, lbfgs_steps=200, width=32, depth=3, batch=512, lr=5e-3)
FULL = dict(steps=4000, lbfgs_steps=1500, width=64, depth=3, batch=2048, lr=5e-3)


class Problem:
    """Exact solution, source f = Δ²u (by hand), interior sampler."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype

    @staticmethod
    def exact(x: Tensor) -> Tensor:
        return torch.sin(PI * x[:, 0]) ** 2 * torch.sin(PI * x[:, 1]) ** 2

    @staticmethod
    def source(x: Tensor) -> Tensor:
        """Δ²u for u = S(x) S(y), S = sin²(πt): S'' = 2π² cos(2πt), S'''' = -8π⁴ cos(2πt);
        Δ²u = S''''(x) S(y) + 2 S''(x) S''(y) + S(x) S''''(y)."""
        cx, cy = torch.cos(2 * PI * x[:, 0]), torch.cos(2 * PI * x[:, 1])
        sx, sy = torch.sin(PI * x[:, 0]) ** 2, torch.sin(PI * x[:, 1]) ** 2
        return -8 * PI**4 * (cx * sy + sx * cy) + 8 * PI**4 * cx * cy

    def interior(self, n: int, gen: torch.Generator) -> Tensor:
        return torch.rand(n, 2, generator=gen, dtype=self.dtype).to(self.device)


class ClampedNet(nn.Module):
    """u = (16 x(1-x) y(1-y))² N(x, y): the clamped conditions u = ∂u/∂n = 0 built in."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.net = _pinn.mlp(2, width, depth)

    def forward(self, x: Tensor) -> Tensor:
        b = 16 * x[:, 0:1] * (1 - x[:, 0:1]) * x[:, 1:2] * (1 - x[:, 1:2])
        return b * b * self.net(x)


def nested_biharmonic(model: nn.Module, x: Tensor) -> Tensor:
    """Δ²u = Δ(Δu) by nested autograd: ∇u, Δu (d backwards), ∇Δu, Δ²u (d backwards), every one
    with create_graph=True so that a loss on it trains the weights: 2d + 2 grad calls."""
    x = x.detach().requires_grad_(True)
    u = model(x)[:, 0]
    (g,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    lap = sum(torch.autograd.grad(g[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(x.shape[1]))
    (g2,) = torch.autograd.grad(lap.sum(), x, create_graph=True)
    return sum(torch.autograd.grad(g2[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(x.shape[1]))


def make_loss():
    def loss_fn(model, batch: Dict[str, Tensor], method: str) -> Tuple[Tensor, Dict[str, Tensor]]:
        x = batch["interior"]
        if method == "engine":
            bih = thd.biharmonic(model, x)[:, 0]  # (N,): Δ²u, differentiable
        else:
            bih = nested_biharmonic(model, x)
        pde = ((bih - batch["f"]) / SCALE).pow(2).mean()
        return pde, {"pde": pde.detach()}

    return loss_fn


def plot(path: str, problem: Problem, model, hist: _pinn.History, title: str) -> None:
    plt = _pinn.pyplot()
    n = 161
    s = torch.linspace(0, 1, n, dtype=problem.dtype)
    X, Y = torch.meshgrid(s, s, indexing="xy")
    pts = torch.stack([X.reshape(-1), Y.reshape(-1)], 1).to(problem.device)
    with torch.no_grad():
        pred = model(pts)[:, 0].cpu().reshape(n, n)
    exact = problem.exact(pts).cpu().reshape(n, n)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.0))
    for ax, img, name in ((axes[0], exact, "exact u = sin²(πx) sin²(πy)"), (axes[1], pred, "network u_θ"),
                          (axes[2], (pred - exact).abs(), "|u_θ - u|")):
        im = ax.imshow(img.numpy(), origin="lower", extent=(0, 1, 0, 1), cmap="viridis")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    _pinn.plot_history(axes[3], hist)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the example; returns a dict (history, error, timing, png path) for tests."""
    p = _pinn.base_parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    _pinn.apply_preset(args, QUICK, FULL)
    device, dtype = _pinn.setup(args)
    problem = Problem(device, dtype)
    png = _pinn.out_path(args, f"plate{'_quick' if args.quick else ''}.png")
    model = ClampedNet(args.width, args.depth).to(device=device, dtype=dtype)
    loss_fn = make_loss()

    def sample(gen: torch.Generator) -> Dict[str, Tensor]:
        x = problem.interior(args.batch, gen)
        return {"interior": x, "f": problem.source(x)}

    test_gen = torch.Generator().manual_seed(args.seed + 12345)
    x_test = problem.interior(args.test_points, test_gen)
    u_test = problem.exact(x_test)

    def error(model) -> float:
        with torch.no_grad():
            return _pinn.relative_l2(model(x_test)[:, 0], u_test)

    setting = _pinn.describe(device, dtype, args.width, args.depth, f"{args.batch} interior points")
    print("clamped plate Δ²u = f on [0,1]², exact u = sin²(πx)sin²(πy), u = ∂u/∂n = 0 built into the "
          "network (u = (16x(1-x)y(1-y))² N(x, y))")
    print(f"setting: {setting}")
    print(f"training: Adam {args.steps} steps (lr {args.lr:g} -> {args.lr / 10:g}), then L-BFGS "
          f"{args.lbfgs_steps} iterations; seed {args.seed}; error on {args.test_points} held-out points")
    print(f"path: {thd.explain(model, x_test[:8], 'biharmonic').reason}")
    hist = _pinn.train(model, loss_fn, sample, error, args, device)
    err = error(model)

    print("\n== result")
    print(f"relative L2 error on {args.test_points} held-out points: {err:.2e}  "
          f"(after Adam {hist.adam_steps} + L-BFGS {hist.lbfgs_iters} iterations, {hist.total_s:.0f} s in all)")
    print(f"time per Adam step in training: {_pinn.summarize_adam_steps(hist)}")
    print(f"one Adam step (loss + backward + update) on one batch, torchhessdiag.biharmonic vs nested "
          f"autograd (Δ(Δu): 6 grad(create_graph=True) calls), {setting}:")
    gen = torch.Generator().manual_seed(args.seed + 7)
    timing = _pinn.compare_step_times(model, loss_fn, sample(gen), args, device)

    title = (f"clamped plate Δ²u = f, u = sin²(πx)sin²(πy): rel. L2 error {err:.1e} ({args.dtype}, "
             f"tanh {args.depth}x{args.width}, Adam {hist.adam_steps} + L-BFGS {hist.lbfgs_iters})")
    plot(png, problem, model, hist, title)
    print(f"plot: {os.path.abspath(png)}")
    return {"history": hist, "error": err, "timing": timing, "png": png, "args": args}


if __name__ == "__main__":
    main()
