"""Oracle and models for the tests of laplacian / hessian_diag / axis_derivatives (test_general_*).

``oracle(f, x, order, dims)`` computes d^k f / dx_i^k for k = 0..order by plain nested
``torch.autograd.grad`` -- one backward per output component, then one per axis and order -- the
textbook way, sharing no code with torchhessdiag. Models used with it are built from torch's own
modules and functions (never torchhessdiag drop-ins), so the expected values are torch's.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from torchhessdiag.activations import ActivationSpec, make_spec, torch_function


def oracle(f: Callable, x: torch.Tensor, order: int, dims: Optional[Sequence[int]] = None, create_graph: bool = False) -> torch.Tensor:
    """(order + 1, N, *S, D): out[k][n, ..., j] = d^k f_n / dx_{n, dims[j]}^k, by nested autograd.

    Rows are assumed independent (each row's gradient is the gradient of the sum over rows)."""
    N, d = x.shape
    dims = list(range(d)) if dims is None else list(dims)
    with torch.enable_grad():
        xx = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
        y = f(xx)
        S = tuple(y.shape[1:])
        yf = y.reshape(N, -1)
        M = yf.shape[1]
        rows: List[List[List[torch.Tensor]]] = [[[None] * M for _ in dims] for _ in range(order)]
        for i in range(M):
            (g,) = torch.autograd.grad(yf[:, i].sum(), xx, create_graph=True, allow_unused=True)
            for j, k in enumerate(dims):
                cur = torch.zeros(N, dtype=x.dtype, device=x.device) if g is None else g[:, k]
                for o in range(order):
                    if o > 0:
                        if cur.requires_grad:
                            (gg,) = torch.autograd.grad(cur.sum(), xx, create_graph=True, allow_unused=True)
                            cur = torch.zeros_like(cur) if gg is None else gg[:, k]
                        else:
                            cur = torch.zeros_like(cur)
                    rows[o][j][i] = cur if create_graph else cur.detach()
    val = y if create_graph else y.detach()
    out = [val.unsqueeze(-1).expand(tuple(val.shape) + (len(dims),))]
    for o in range(order):
        out.append(torch.stack([torch.stack(rows[o][j], 1) for j in range(len(dims))], -1).reshape((N,) + S + (len(dims),)))
    return torch.stack(out)


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-10, what: str = "") -> None:
    """|got - want| <= rtol * max(1, max |want|) elementwise: relative to the scale of the
    quantity (derivatives of different orders and points vary by orders of magnitude, and an
    exact zero must come out as ~0)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.detach(), want.detach()
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:g} * {scale:.3g}"


# every table activation with non-default parameters where it has any (as in tests/_helpers.py)
SPECS: List[ActivationSpec] = [
    make_spec("tanh"),
    make_spec("sigmoid"),
    make_spec("softplus", beta=2.0, threshold=5.0),
    make_spec("silu"),
    make_spec("gelu"),
    make_spec("gelu_tanh"),
    make_spec("sin", w=1.5),
    make_spec("cos"),
    make_spec("exp"),
    make_spec("elu", alpha=0.7),
    make_spec("celu", alpha=0.7),
    make_spec("relu"),
    make_spec("leaky_relu", negative_slope=0.2),
]

#: torch.nn modules for the specs that have one
_TORCH_MODULES = {
    "tanh": lambda s: nn.Tanh(),
    "sigmoid": lambda s: nn.Sigmoid(),
    "softplus": lambda s: nn.Softplus(beta=s.a, threshold=s.b),
    "silu": lambda s: nn.SiLU(),
    "gelu": lambda s: nn.GELU(),
    "gelu_tanh": lambda s: nn.GELU(approximate="tanh"),
    "elu": lambda s: nn.ELU(alpha=s.a),
    "celu": lambda s: nn.CELU(alpha=s.a),
    "relu": lambda s: nn.ReLU(),
    "leaky_relu": lambda s: nn.LeakyReLU(negative_slope=s.a),
}


def torch_module(spec: ActivationSpec) -> Optional[nn.Module]:
    make = _TORCH_MODULES.get(spec.name)
    return None if make is None else make(spec)


class RandomNet(nn.Module):
    """A random graph of supported pieces: residual blocks, products of branches, concatenated
    features, slices, scalar and constant-tensor scaling, integer powers, sums over features,
    activations as torch.nn modules or torch functions. ``plan`` is a static list, so the
    forward's Python loop traces to a fixed graph."""

    def __init__(self, seed: int, d: int, m: Optional[int], depth: int, width: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def pick(seq):
            return seq[int(torch.randint(len(seq), (1,), generator=g))]

        self.m = m
        self.inp = nn.Linear(d, width)
        self.layers = nn.ModuleList()
        self.mods = nn.ModuleList()
        self.plan = []
        for i in range(depth):
            spec = pick(SPECS)
            kind = pick(["plain", "residual", "product", "features", "scaled", "power"])
            mod = torch_module(spec) if bool(torch.rand(1, generator=g) < 0.5) else None
            self.layers.append(nn.Linear(width, width))
            self.mods.append(mod if mod is not None else nn.Identity())
            self.plan.append((kind, spec, mod is not None))
        self.register_buffer("scale", torch.rand(width, generator=g) + 0.5)
        self.out = nn.Linear(width, m if m is not None else 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.8 / math.sqrt(max(1, p.shape[-1]))))

    def act(self, i: int, h):
        _, spec, as_module = self.plan[i]
        return self.mods[i](h) if as_module else torch_function(spec)(h)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for i, (kind, spec, _) in enumerate(self.plan):
            z = self.layers[i](h)
            a = self.act(i, z)
            if kind == "plain":
                h = a
            elif kind == "residual":
                h = h + 0.5 * a
            elif kind == "product":
                h = a * torch.sin(z) - h / 3.0
            elif kind == "features":
                w = h.shape[-1]
                h = torch.cat([a[:, : w // 2], torch.cos(2.0 * z[..., w // 2 :])], dim=-1)
            elif kind == "scaled":
                h = (a - 0.1) * self.scale
            else:
                h = a ** 2 + h.sum(-1, keepdim=True) / h.shape[-1]
        out = self.out(h)
        return out[:, 0] if self.m is None else out


def ln_r2(x):
    """f(x) = ln(sum x_i^2); its Laplacian in 3-D is 2 / r^2."""
    return torch.log((x * x).sum(-1))


def poly_product(x):
    """prod_i (x_i^2 - 3 x_i + 1); at x = (1, 2, 0) the Hessian diagonal is (-2, -2, 2)."""
    return (x**2 - 3 * x + 1).prod(-1)


def poly_product_traceable(x):
    """The same product written with supported pieces only (slices and products)."""
    p = x**2 - 3 * x + 1
    return p[:, 0] * p[:, 1] * p[:, 2]
