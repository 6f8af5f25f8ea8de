"""Random models and independent oracles for the hardening tests (issue 7).

* ``ACTS``: every activation of the table (with non-default parameters where it has any), each with
  the module the model under test uses (torch.nn's where torch has one, else the torchhessdiag.nn
  drop-in; ``dropin()`` always gives the drop-in) and torch's own function, which the *oracle*
  twin of the model uses.
* ``build_mlp(...)``: an ``nn.Sequential`` MLP under test and its oracle twin, sharing the same
  ``nn.Linear`` modules (so parameter gradients of both land on the same tensors); the oracle's
  activations are plain torch functions, so nothing of torchhessdiag runs in it.
* ``ResidualNet``: a non-Sequential model (residual blocks, a product with an input coordinate)
  for the traced-graph path of ``laplacian`` / ``hessian_diag`` / ``axis_derivatives``.
* ``func_hessian`` / ``func_value_grad``: torch.func (vmap of jacrev(jacrev) / jacrev) on the oracle.
* ``nested_hessian``: the full input Hessian by nested ``torch.autograd.grad(create_graph=True)``
  on the oracle, differentiable w.r.t. the parameters and x (the oracle for training gradients).
* ``axis_nested``: d^k f / dx_i^k by k nested ``torch.autograd.grad`` along e_i.

Nothing here calls torchhessdiag's derivative code: the expected values come from torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import torchhessdiag as thd

Tensor = torch.Tensor


@dataclass(frozen=True)
class Act:
    label: str
    torch_module: Optional[Callable[[], nn.Module]]  # torch.nn's module, if torch has one
    dropin: Callable[[], nn.Module]  # the torchhessdiag.nn drop-in
    fn: Callable[[Tensor], Tensor]  # torch's own function (the oracle)
    piecewise_linear: bool = False

    def module(self, prefer_dropin: bool = False) -> nn.Module:
        if prefer_dropin or self.torch_module is None:
            return self.dropin()
        return self.torch_module()


ACTS: List[Act] = [
    Act("tanh", nn.Tanh, thd.nn.Tanh, torch.tanh),
    Act("sigmoid", nn.Sigmoid, thd.nn.Sigmoid, torch.sigmoid),
    Act("softplus", nn.Softplus, thd.nn.Softplus, F.softplus),
    Act("softplus(2,5)", lambda: nn.Softplus(2.0, 5.0), lambda: thd.nn.Softplus(2.0, 5.0), lambda z: F.softplus(z, 2.0, 5.0)),
    Act("silu", nn.SiLU, thd.nn.SiLU, F.silu),
    Act("gelu", nn.GELU, thd.nn.GELU, F.gelu),
    Act("gelu_tanh", lambda: nn.GELU("tanh"), lambda: thd.nn.GELU("tanh"), lambda z: F.gelu(z, approximate="tanh")),
    Act("sin(1.7)", None, lambda: thd.nn.Sine(1.7), lambda z: torch.sin(1.7 * z)),
    Act("cos", None, thd.nn.Cosine, torch.cos),
    Act("exp", None, thd.nn.Exp, torch.exp),
    Act("elu(0.7)", lambda: nn.ELU(0.7), lambda: thd.nn.ELU(0.7), lambda z: F.elu(z, 0.7)),
    Act("celu(0.5)", lambda: nn.CELU(0.5), lambda: thd.nn.CELU(0.5), lambda z: F.celu(z, 0.5)),
    Act("identity", None, thd.nn.Identity, lambda z: z),
    Act("relu", nn.ReLU, thd.nn.ReLU, F.relu, piecewise_linear=True),
    Act("leaky_relu(0.2)", lambda: nn.LeakyReLU(0.2), lambda: thd.nn.LeakyReLU(0.2), lambda z: F.leaky_relu(z, 0.2), piecewise_linear=True),
]
ACT_BY_LABEL = {a.label: a for a in ACTS}
SMOOTH_ACTS = [a for a in ACTS if not a.piecewise_linear and a.label != "identity"]


class Fn(nn.Module):
    """An activation of the oracle: torch's own function."""

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def build_mlp(
    d: int,
    widths: Sequence[int],
    m: int,
    acts: Sequence[Act],
    *,
    bias: Sequence[bool] = (),
    dropins: Sequence[bool] = (),
    nest: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device="cpu",
    scale: float = 1.0,
) -> Tuple[nn.Sequential, nn.Sequential]:
    """(model under test, oracle twin): Linear(d, w1), act1, ..., Linear(w_L, m).

    ``bias[i]`` / ``dropins[i]`` per layer (default: bias, torch.nn modules); ``nest`` wraps the
    hidden part in a nested Sequential with an ``nn.Identity`` (the engine flattens both);
    ``scale`` multiplies the default initialisation of the weights.
    """
    assert len(acts) == len(widths)
    g = torch.Generator().manual_seed(seed)
    dims = [d] + list(widths) + [m]
    linears = []
    for i in range(len(dims) - 1):
        has_bias = bias[i] if i < len(bias) else True
        lin = nn.Linear(dims[i], dims[i + 1], bias=has_bias)
        bound = scale / dims[i] ** 0.5
        with torch.no_grad():
            lin.weight.copy_((torch.rand(lin.weight.shape, generator=g) * 2 - 1) * bound)
            if has_bias:
                lin.bias.copy_((torch.rand(lin.bias.shape, generator=g) * 2 - 1) * bound)
        linears.append(lin.to(dtype=dtype, device=device))
    under, oracle = [], []
    for i, a in enumerate(acts):
        under += [linears[i], a.module(dropins[i] if i < len(dropins) else False)]
        oracle += [linears[i], Fn(a.fn)]
    under.append(linears[-1])
    oracle.append(linears[-1])
    if nest and len(under) > 2:
        under = [under[0], nn.Sequential(nn.Identity(), *under[1:-1]), under[-1]]
    return nn.Sequential(*under), nn.Sequential(*oracle)


class ResidualNet(nn.Module):
    """A model the engine does not take (not a Sequential): an input layer, residual blocks
    h + act(W h), an output layer, optionally multiplied by (1 + x_0) (a product with the input,
    as a hard boundary condition would write it). ``acts`` are modules (model under test) or
    torch functions (oracle)."""

    def __init__(self, inp: nn.Linear, blocks: Sequence[nn.Linear], out: nn.Linear, acts: Sequence, product: bool):
        super().__init__()
        self.inp, self.blocks, self.out = inp, nn.ModuleList(blocks), out
        self.acts = list(acts)
        for i, a in enumerate(self.acts):
            if isinstance(a, nn.Module):
                self.add_module(f"act{i}", a)
        self.product = product

    def forward(self, x: Tensor) -> Tensor:
        h = self.acts[0](self.inp(x))
        for lin, act in zip(self.blocks, self.acts[1:]):
            h = h + act(lin(h))
        y = self.out(h)
        if self.product:
            y = y * (1.0 + x[:, :1])
        return y


def build_residual(
    d: int, width: int, m: int, acts: Sequence[Act], *, product: bool, seed: int = 0, dtype=torch.float64, device="cpu"
) -> Tuple[ResidualNet, ResidualNet]:
    """(model under test with activation modules, oracle twin with torch functions), same weights."""
    g = torch.Generator().manual_seed(seed)

    def lin(i, o):
        L = nn.Linear(i, o)
        with torch.no_grad():
            for p in L.parameters():
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) / i**0.5)
        return L.to(dtype=dtype, device=device)

    inp, out = lin(d, width), lin(width, m)
    blocks = [lin(width, width) for _ in acts[1:]]
    under = ResidualNet(inp, blocks, out, [a.module() for a in acts], product)
    oracle = ResidualNet(inp, blocks, out, [a.fn for a in acts], product)
    return under, oracle


# ---- oracles ---------------------------------------------------------------------------------


def _single(f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return lambda p: f(p.unsqueeze(0)).squeeze(0)


def func_hessian(f: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """(N, m, d, d): torch.func.vmap(jacrev(jacrev(f))) per point (reverse over reverse:
    torch.func.hessian is forward over reverse, and torch has no forward-mode formula for some
    activation backwards, e.g. aten::silu_backward)."""
    with torch.no_grad():
        return torch.func.vmap(torch.func.jacrev(torch.func.jacrev(_single(f))))(x)


def func_value_grad(f: Callable[[Tensor], Tensor], x: Tensor) -> Tuple[Tensor, Tensor]:
    """(value (N, m), gradient (N, m, d)) by torch.func."""
    with torch.no_grad():
        return f(x), torch.func.vmap(torch.func.jacrev(_single(f)))(x)


def nested_hessian(f: Callable[[Tensor], Tensor], x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(value (N, m), gradient (N, m, d), Hessian (N, m, d, d)) by nested torch.autograd.grad with
    create_graph=True: differentiable w.r.t. the parameters of f and w.r.t. x (if x requires
    grad). Rows are independent, so the gradient of a sum over rows is the per-row gradient."""
    xx = x if x.requires_grad else x.detach().requires_grad_(True)
    N, d = xx.shape
    with torch.enable_grad():
        u = f(xx)
        m = u.shape[1]
        grads, hess = [], []
        for i in range(m):
            (g,) = torch.autograd.grad(u[:, i].sum(), xx, create_graph=True, allow_unused=True)
            if g is None:
                g = xx.new_zeros(N, d)
            rows = []
            for k in range(d):
                h = None
                if g.requires_grad:
                    (h,) = torch.autograd.grad(g[:, k].sum(), xx, create_graph=True, allow_unused=True)
                rows.append(xx.new_zeros(N, d) if h is None else h)
            grads.append(g)
            hess.append(torch.stack(rows, 1))
    return u, torch.stack(grads, 1), torch.stack(hess, 1)


def axis_nested(f: Callable[[Tensor], Tensor], x: Tensor, dims: Sequence[int], order: int) -> Tensor:
    """(order + 1, N, m, D): d^k f / dx_i^k for i in dims, k = 0..order, by k nested
    torch.autograd.grad of t -> f(x + t e_i) (t one scalar per point: the rows are independent,
    so the gradient of the sum over points is the per-point derivative). Reverse mode, since torch
    lacks forward-mode formulas for some activation backwards (aten::silu_backward)."""
    N, d = x.shape
    out = []
    for i in dims:
        e = torch.zeros(d, dtype=x.dtype, device=x.device)
        e[i] = 1.0
        with torch.enable_grad():
            t = x.new_zeros(N, requires_grad=True)
            y = f(x.detach() + t.unsqueeze(1) * e)  # (N, m)
            cols = []
            for j in range(y.shape[1]):
                cur, ks = y[:, j], [y[:, j].detach()]
                for _ in range(order):
                    g = None
                    if cur.requires_grad:
                        (g,) = torch.autograd.grad(cur.sum(), t, create_graph=True, allow_unused=True)
                    cur = t.new_zeros(N) if g is None else g
                    ks.append(cur.detach())
                cols.append(torch.stack(ks))  # (order+1, N)
        out.append(torch.stack(cols, -1))  # (order+1, N, m)
    return torch.stack(out, -1)


def rel_err(got: Tensor, want: Tensor, scale: Optional[float] = None) -> float:
    """max |got - want| / scale (default: max |want|); 0 when both are exactly equal."""
    err = (got - want).abs().max().item() if want.numel() else 0.0
    if err == 0.0:
        return 0.0
    s = want.abs().max().item() if scale is None else scale
    return err / s if s > 0 else float("inf")
