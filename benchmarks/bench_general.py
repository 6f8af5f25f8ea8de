"""Benchmark of the traced-model (jet) path of thd.laplacian / hessian_diag / axis_derivatives.

Model: not an nn.Sequential -- Fourier features of x (2 * n_freq), a tanh input layer, ``blocks``
residual blocks h + silu(W h + b), a linear output (1 component). It goes to the jet path.

Methods, per quantity (every one checked against float64 torch.func on the first points before
timing; timings interleaved run by run, medians with min-max):

* Laplacian / Hessian diagonal: ``thd.laplacian`` / ``thd.hessian_diag`` (jets); nested
  ``torch.autograd.grad`` (one gradient, then one backward per input dimension);
  ``torch.func.vmap(torch.func.hessian(f))`` (full d x d Hessian, its diagonal read);
  the library's own exact fallback (general._autograd_derivatives; the recorded run used torch.func
  nested jvp, the current fallback runs nested torch.autograd.grad first).
* Axis derivatives of order 4: ``thd.axis_derivatives(order=4)`` (jets) vs the fallback (nested
  jvp) and nested ``torch.autograd.grad`` (4 levels per axis).

Inference is timed under ``torch.no_grad()`` where the method allows it (the jets and the
fallback); nested autograd needs a graph. Run ``--help`` for the sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torchhessdiag as thd  # noqa: E402
from torchhessdiag import general  # noqa: E402
from torchhessdiag.bench.measure import device_label, env_info, loadavg, pick_device, summarize, time_interleaved  # noqa: E402


class FourierResNet(nn.Module):
    def __init__(self, d: int, width: int, blocks: int, n_freq: int):
        super().__init__()
        self.register_buffer("B", torch.randn(d, n_freq))
        self.inp = nn.Linear(2 * n_freq, width)
        self.blocks = nn.ModuleList([nn.Linear(width, width) for _ in range(blocks)])
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        z = 2 * math.pi * x @ self.B
        h = torch.tanh(self.inp(torch.cat([torch.sin(z), torch.cos(z)], dim=-1)))
        for lin in self.blocks:
            h = h + torch.nn.functional.silu(lin(h))
        return self.out(h)


def nested_autograd(f, x, order):
    """(order, N, d): d^k f / dx_i^k, k = 1..order, by nested backward passes."""
    xx = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(f(xx).sum(), xx, create_graph=order > 1)
    out = [[g[:, i] for i in range(x.shape[1])]]
    cur = out[0]
    for o in range(1, order):
        nxt = []
        for i, gi in enumerate(cur):
            (gg,) = torch.autograd.grad(gi.sum(), xx, create_graph=o < order - 1, retain_graph=True)
            nxt.append(gg[:, i])
        out.append(nxt)
        cur = nxt
    return torch.stack([torch.stack(o, 1) for o in out])


def func_hessian_diag(f, x):
    h = torch.func.vmap(torch.func.hessian(lambda p: f(p.unsqueeze(0))[0, 0]))(x)
    return h.diagonal(dim1=-2, dim2=-1)


def fallback(f, x, order):
    """The library's exact slow path (nested torch.autograd.grad, torch.func where it cannot)."""
    V = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    derivs, method = general._autograd_derivatives(f, x, V, order)
    METHODS[order] = method
    return torch.stack([t[..., 0] for t in derivs])  # (order, N, d)


METHODS = {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--d", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--n-freq", type=int, default=16)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    device = pick_device(a.device)
    dtype = getattr(torch, a.dtype)
    results = {"env": env_info(device), "args": vars(a), "loadavg_start": loadavg(), "runs": []}
    print(f"# {device_label(device)}, {a.dtype}, width {a.width}, {a.blocks} residual blocks, "
          f"{2 * a.n_freq} Fourier features, N={a.n}, torch {torch.__version__}, median (min-max) of {a.repeats}")
    for d in a.d:
        torch.manual_seed(0)
        model = FourierResNet(d, a.width, a.blocks, a.n_freq).to(device, dtype)
        x = torch.rand(a.n, d, device=device, dtype=dtype)
        assert thd.explain(model, x).path == "jet"
        # correctness first: every method vs float64 torch.func on the first 16 points
        m64 = FourierResNet(d, a.width, a.blocks, a.n_freq).to(device, torch.float64)
        m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
        xs = x[:16]
        ref2 = func_hessian_diag(m64, xs.double())
        ref4 = fallback(m64, xs.double(), 4)
        tol = 1e-3 if dtype == torch.float32 else 1e-9
        checks = {
            "thd.hessian_diag": thd.hessian_diag(model, xs)[:, 0],
            "thd.laplacian": thd.laplacian(model, xs)[:, 0],
            "nested autograd diag": nested_autograd(model, xs, 2)[1],
            "torch.func hessian diag": func_hessian_diag(model, xs),
            "fallback diag": fallback(model, xs, 2)[1],
            "thd.axis_derivatives(4)": thd.axis_derivatives(model, xs, 4)[1:, :, 0],
            "fallback order 4": fallback(model, xs, 4),
            "nested autograd order 4": nested_autograd(model, xs, 4),
        }
        for name, got in checks.items():
            want = ref2.sum(-1) if name == "thd.laplacian" else (ref4 if got.dim() == 3 else ref2)
            err = float((got.detach().double() - want).abs().max() / want.abs().max().clamp_min(1))
            assert err < tol, f"{name}: relative error {err:.2e}"
        groups = {
            "hessian diagonal": {
                "thd.hessian_diag (jets)": lambda: _nograd(thd.hessian_diag, model, x),
                "thd.laplacian (jets, collapsed)": lambda: _nograd(thd.laplacian, model, x),
                "nested autograd": lambda: nested_autograd(model, x, 2),
                "torch.func vmap(hessian)": lambda: func_hessian_diag(model, x),
                "fallback (autograd path)": lambda: _nograd(fallback, model, x, 2),
            },
            "axis derivatives, order 4": {
                "thd.axis_derivatives (jets)": lambda: _nograd(thd.axis_derivatives, model, x, 4),
                "fallback (autograd path)": lambda: _nograd(fallback, model, x, 4),
                "nested autograd": lambda: nested_autograd(model, x, 4),
            },
        }
        print(f"\nd={d}: the fallback ran {METHODS}")
        for group, fns in groups.items():
            times = time_interleaved(fns, device, a.repeats)
            base = summarize(times[next(iter(fns))])["median"]
            print(f"\nd={d}: {group}")
            for name, ts in times.items():
                s = summarize(ts)
                print(f"  {name:34s} {1e3 * s['median']:9.1f} ms ({1e3 * s['min']:.1f}-{1e3 * s['max']:.1f})"
                      f"   x{s['median'] / base:5.2f} of the first")
                results["runs"].append({"d": d, "group": group, "method": name, **s})
    results["loadavg_end"] = loadavg()
    print(f"\nload average (1, 5, 15 min) at the start {results['loadavg_start']}, at the end {results['loadavg_end']}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)


def _nograd(fn, *args):
    with torch.no_grad():
        return fn(*args)


if __name__ == "__main__":
    main()
