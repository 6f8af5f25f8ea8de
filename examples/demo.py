"""torchhessdiag demo: the input Hessian diagonal of an MLP by nested autograd, with drop-in
activations.

1. Build a tanh MLP with torch.nn and convert it with ``torchhessdiag.nn.convert`` (same weights;
   only the activations change, their forward values are bit-for-bit the same).
2. Compute d^2 f / dx_i^2 at a batch of points by nested autograd: one
   ``torch.autograd.grad(create_graph=True)`` for the gradient, then one backward per input dim.
3. Check it against torch.func (vmap of hessian, the diagonal) and time torch.nn vs
   torchhessdiag.nn activations.
4. A purely linear model: its Hessian is zero; with ``torchhessdiag.nn.Identity`` between the
   layers the nested grad returns zeros instead of None.

    python examples/demo.py [--device auto|cpu|cuda] [--n 256] [--repeats 7]

Exits with status 1 if the Hessian diagonal disagrees with torch.func (relative error > 1e-10).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

import torchhessdiag
import torchhessdiag.nn as thnn

TOL = 1e-10  # relative, float64


def hessian_diag(model: nn.Module, x: torch.Tensor, allow_unused: bool = False):
    """(N, d) diagonal of the Hessian of model's scalar output w.r.t. each input point."""
    x = x.detach().requires_grad_(True)
    y = model(x)  # (N, 1); points are independent, so summing over them is exact
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    cols = []
    for i in range(x.shape[1]):
        (h,) = torch.autograd.grad(g[:, i].sum(), x, retain_graph=True, allow_unused=allow_unused)
        if h is None:
            return None
        cols.append(h[:, i])
    return torch.stack(cols, dim=1)


def hessian_diag_torch_func(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reference: vmap over points of torch.func.hessian, then the diagonal."""
    f = lambda xi: model(xi.unsqueeze(0)).squeeze()  # noqa: E731
    H = torch.func.vmap(torch.func.hessian(f))(x)  # (N, d, d)
    return torch.diagonal(H, dim1=-2, dim2=-1).detach()


def median_ms(fns, device: torch.device, repeats: int):
    """Median wall time (ms) of each fn; the fns alternate run by run so that the noise of a
    shared machine hits them alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ts.append(time.perf_counter() - t0)
    return [1e3 * statistics.median(ts) for ts in times]


def mlp(d: int, width: int, depth: int, act) -> nn.Sequential:
    layers, fan = [], d
    for _ in range(depth):
        layers += [nn.Linear(fan, width), act()]
        fan = width
    return nn.Sequential(*layers, nn.Linear(fan, 1))


def main() -> int:
    p = argparse.ArgumentParser(description="torchhessdiag demo")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--n", type=int, default=256, help="number of points")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats (median reported)")
    args = p.parse_args()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    dtype, d, width, depth, n = torch.float64, 4, 64, 3, args.n

    torch.manual_seed(0)
    model = mlp(d, width, depth, nn.Tanh).to(device=device, dtype=dtype)
    fast = thnn.convert(model)  # deep copy: same weights, torchhessdiag.nn.Tanh activations
    x = torch.randn(n, d, device=device, dtype=dtype)

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    print(f"torchhessdiag {torchhessdiag.__version__}, torch {torch.__version__}; "
          f"backend per device: {torchhessdiag.backend_info()['devices']}")
    print(f"problem: tanh MLP, d={d} inputs, {depth} hidden layers x {width}, output 1, "
          f"{str(dtype).replace('torch.', '')}, N={n} points, device {device} ({where})")

    # -- correctness ------------------------------------------------------------------------------
    h = hessian_diag(fast, x)
    ref = hessian_diag_torch_func(model, x)
    abs_err = (h - ref).abs().max().item()
    rel_err = abs_err / ref.abs().max().item()
    ok = rel_err <= TOL
    print(f"\nHessian diagonal d2f/dx_i2 vs torch.func: max abs err {abs_err:.2e}, "
          f"max rel err {rel_err:.2e} (tol {TOL:g}) -> {'OK' if ok else 'FAILED'}")
    print("first points (rows) x input dims (columns):")
    for row in h[:3].tolist():
        print("   " + "  ".join(f"{v:+.6f}" for v in row))

    # -- the engine: one call, no backward passes ----------------------------------------------------
    hd = torchhessdiag.mlp_hessian_diag(model, x).squeeze(1)  # (N, d)
    lap = torchhessdiag.mlp_laplacian(model, x).squeeze(1)  # (N,)
    eng_err = max((hd - ref).abs().max().item(), (lap - ref.sum(1)).abs().max().item())
    eng_err /= ref.abs().max().item()
    ok = ok and eng_err <= TOL
    print(f"\nmlp_hessian_diag / mlp_laplacian vs torch.func: max rel err {eng_err:.2e} "
          f"-> {'OK' if eng_err <= TOL else 'FAILED'}")

    # -- timing -----------------------------------------------------------------------------------
    def engine():
        with torch.no_grad():
            return torchhessdiag.mlp_hessian_diag(model, x)

    t_torch, t_fast, t_engine = median_ms(
        [lambda: hessian_diag(model, x), lambda: hessian_diag(fast, x), engine], device, args.repeats
    )
    print(f"\ntime per Hessian diagonal, median of {args.repeats}, interleaved:")
    print(f"   nested autograd, torch.nn.Tanh           {t_torch:8.2f} ms")
    print(f"   nested autograd, torchhessdiag.nn.Tanh   {t_fast:8.2f} ms   ({t_torch / t_fast:.2f}x)")
    print(f"   torchhessdiag.mlp_hessian_diag           {t_engine:8.2f} ms   ({t_torch / t_engine:.2f}x)")

    # -- a linear model: zeros, not None ----------------------------------------------------------
    torch.manual_seed(1)
    def layers(ident):
        return [nn.Linear(d, width), ident(), nn.Linear(width, width), ident(),
                nn.Linear(width, 1)]

    lin_torch = nn.Sequential(*layers(nn.Identity)).to(device=device, dtype=dtype)
    lin_fast = nn.Sequential(*layers(thnn.Identity)).to(device=device, dtype=dtype)
    h_torch = hessian_diag(lin_torch, x, allow_unused=True)
    h_fast = hessian_diag(lin_fast, x)
    print("\nlinear model (Linear, Identity, Linear, Identity, Linear), nested grad:")
    print(f"   torch.nn.Identity           -> {h_torch!r}")
    desc = (f"tensor of shape {tuple(h_fast.shape)}, max |value| = {h_fast.abs().max().item():g}"
            if h_fast is not None else "None")
    print(f"   torchhessdiag.nn.Identity   -> {desc}")
    ok = ok and h_fast is not None and bool((h_fast == 0).all())

    print("\nresult:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
