"""The problem and the methods of the benchmark suite.

The problem: an MLP ``depth x (Linear, activation), Linear -> 1`` (torch.nn modules, torch.nn's
default initialisation from a seed), N points x ~ N(0, 1)^d; the Hessian diagonal (N, d) and the
Laplacian (N,) of its scalar output with respect to x.

Every method is a :class:`Method`; ``build(ctx, x)`` returns a zero-argument call on the block's
model and the points x:

* inference: the call returns ``{"diag": (N, d), "lap": (N,)}`` (what the method gives);
* training step: the call sets the weight gradients to None, computes the PINN-style loss
  ``mean((lap - 1)^2)`` from the method's Laplacian and runs ``loss.backward()`` to the weights;
  :func:`flat_grads` then reads the gradients of the model the method used.

The plain forward Laplacian / Hessian diagonal is written here in plain PyTorch as a yardstick.
It takes sigma, sigma', sigma'' of the activation from torch's own forward-mode AD of the torch.nn
module (``torch.func.jvp`` nested twice), so no derivative formula is written in the benchmark.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import torchhessdiag as thd

Tensor = torch.Tensor

ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
}


# ---- the problem ---------------------------------------------------------------------------------


def build_base(d: int, widths: List[int], activation: str, seed: int) -> nn.Sequential:
    """The float32 CPU model d -> widths[0] -> ... -> widths[-1] -> 1, weights from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers, fan = [], d
        for w in widths:
            layers += [nn.Linear(fan, w), ACTIVATIONS[activation]()]
            fan = w
        layers.append(nn.Linear(fan, 1))
        return nn.Sequential(*layers)


def model_as(base: nn.Module, device, dtype) -> nn.Sequential:
    """A copy of base (same weights) on device/dtype."""
    return copy.deepcopy(base).to(device=device, dtype=dtype)


def make_input(n: int, d: int, device, dtype, seed: int) -> Tensor:
    """N(0, 1) points, drawn in float64 from ``seed`` (the same values for every dtype)."""
    gen = torch.Generator().manual_seed(seed + 1000 + d)
    return torch.randn(n, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


@dataclass
class Context:
    """The block's model (and its drop-in conversion, made once) and the mode."""

    model: nn.Sequential
    mode: str  # "inference" or "train"
    _dropin: Optional[nn.Module] = field(default=None, repr=False)

    @property
    def dropin(self) -> nn.Module:
        if self._dropin is None:
            self._dropin = thd.nn.convert(self.model)  # same weights, drop-in activations
            self._dropin.requires_grad_(self.mode == "train")
        return self._dropin


# ---- the methods ---------------------------------------------------------------------------------


def nested_autograd(model: nn.Module, x: Tensor, create_graph: bool = False) -> Tuple[Tensor, Tensor]:
    """(Hessian diagonal (N, d), Laplacian (N,)) by nested reverse mode: one
    grad(create_graph=True) for the gradient, then one backward per input dimension."""
    x = x.detach().requires_grad_(True)
    u = model(x)
    (g,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    cols = []
    for i in range(x.shape[1]):
        (h,) = torch.autograd.grad(g[:, i].sum(), x, retain_graph=True, create_graph=create_graph)
        cols.append(h[:, i])
    diag = torch.stack(cols, dim=1)
    return diag, diag.sum(1)


def _scalar_fn(model: nn.Module) -> Callable[[Tensor], Tensor]:
    return lambda xi: model(xi).squeeze(-1)  # one point (d,) -> scalar


def func_hessian(model: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor]:
    """(Hessian diagonal, Laplacian): vmap over the points of torch.func.hessian, diagonal taken.
    Also the reference of every correctness check (in float64)."""
    diag = torch.func.vmap(torch.func.hessian(_scalar_fn(model)))(x).diagonal(dim1=-2, dim2=-1)
    return diag, diag.sum(1)


def func_jvp_grad(model: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor]:
    """(Hessian diagonal, Laplacian) from vector-Hessian-vector products v^T (H v), H v by
    jvp of grad (forward-over-reverse), vmap over v in the basis and over the points."""
    g = torch.func.grad(_scalar_fn(model))
    d = x.shape[1]
    eye = torch.eye(d, dtype=x.dtype, device=x.device)

    def vhv(xi, v):
        return (torch.func.jvp(g, (xi,), (v,))[1] * v).sum()

    per_point = torch.func.vmap(vhv, in_dims=(None, 0))  # over the basis vectors
    diag = torch.func.vmap(per_point, in_dims=(0, None))(x, eye)
    return diag, diag.sum(1)


def act_derivs(act: nn.Module, h: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """sigma(h), sigma'(h), sigma''(h) of an elementwise torch.nn activation, by torch's own
    forward-mode AD (jvp of jvp along ones): no formula written here."""
    ones = torch.ones_like(h)

    def first(u):
        return torch.func.jvp(act, (u,), (ones,))  # (sigma(u), sigma'(u))

    (y, d1), (_, d2) = torch.func.jvp(first, (h,), (ones,))
    return y, d1, d2


def plain_forward(model: nn.Sequential, x: Tensor, per_direction: bool) -> Tensor:
    """The plain-PyTorch forward Laplacian (N,) or, per_direction, Hessian diagonal (N, d).

    Carries the value h (N, w), the Jacobian rows J (N, d, w) and the summed second derivative
    s (N, w) (per direction: S (N, d, w)) through the layers -- linear: h = h W^T + b, J = J W^T,
    s = s W^T; activation: s = sigma' s + sigma'' sum_i J_i^2 (S = sigma' S + sigma'' J^2),
    J = sigma' J. J starts as W1^T after the first layer (no GEMM on the identity) and is not
    formed after the last activation.
    """
    mods = list(model)
    acts = [i for i, m in enumerate(mods) if not isinstance(m, nn.Linear)]
    last_act = max(acts)
    h, J, s = x, None, None  # J None: the identity; s None: zero
    for i, m in enumerate(mods):
        if isinstance(m, nn.Linear):
            W = m.weight
            h = F.linear(h, W, m.bias)
            if i < last_act:
                # contiguous(): a transposed view would make sigma' * J non-contiguous and the
                # next matmul fall back to a slower bmm
                J = W.t().contiguous() if J is None else torch.matmul(J, W.t())
            if s is not None:
                s = torch.matmul(s, W.t())
        else:
            y, d1, d2 = act_derivs(m, h)
            J2 = J * J  # (d, w) after layer 1 (the same for every point), else (N, d, w)
            if per_direction:
                new = d2.unsqueeze(1) * J2
                s = new if s is None else d1.unsqueeze(1) * s + new
            else:
                new = d2 * J2.sum(-2)
                s = new if s is None else d1 * s + new
            if i < last_act:
                J = d1.unsqueeze(1) * J
            h = y
    return s.squeeze(-1)  # (N,) or (N, d)


def _jet_available() -> Optional[str]:
    try:
        import jet  # noqa: F401  (PyPI: jet-for-pytorch, Python >= 3.12)
    except Exception as e:  # ImportError, or a SyntaxError on Python < 3.12
        return (f"jet-for-pytorch not importable ({type(e).__name__}: {str(e)[:80]}); "
                f"pip install jet-for-pytorch (needs Python >= 3.12)")
    return None


def jet_laplacian(model: nn.Module, x: Tensor, collapsed: bool) -> Callable[[Tensor], Tensor]:
    """jet-for-pytorch's Laplacian of the one-point function, as in its own benchmark
    (jet.laplacian, capture_graph, common-subexpression elimination, vmap over the points).
    ``collapsed``: collapsed Taylor mode (sums the second-order coefficients on the way) or
    standard Taylor mode (vmap over the d directions, summed after)."""
    import jet

    lap = jet.laplacian(model, (x[0],), collapsed=collapsed)
    lap, _ = jet.capture_graph(lap, (x[0],))
    jet.common_subexpression_elimination(lap.graph)
    lap.recompile()
    vm = torch.func.vmap(lap)
    return lambda xx: vm(xx).reshape(xx.shape[0])


def _thd_general_available() -> Optional[str]:
    if callable(getattr(thd, "laplacian", None)):
        return None
    return "thd.laplacian(f, x) is not in this version of torchhessdiag (issue 4)"


def _nograd(fn: Callable, *args, **kw):
    with torch.no_grad():
        return fn(*args, **kw)


@dataclass
class Method:
    """One way to get the Hessian diagonal and/or the Laplacian."""

    key: str
    label: str
    gives: str  # "diag", "lap" or "both"
    modes: Tuple[str, ...]
    inference: Optional[Callable] = None  # (ctx, x) -> () -> {"diag"/"lap": Tensor}
    laplacian: Optional[Callable] = None  # (ctx, x) -> () -> (N,) with a graph (training)
    available: Callable[[], Optional[str]] = lambda: None  # reason it cannot run, or None
    uses_dropin: bool = False
    is_thd: bool = False


METHODS: Dict[str, Method] = {}


def _register(m: Method) -> None:
    METHODS[m.key] = m


_register(Method(
    "thd_diag", "thd.mlp_hessian_diag", "diag", ("inference",), is_thd=True,
    inference=lambda c, x: lambda: {"diag": _nograd(thd.mlp_hessian_diag, c.model, x).squeeze(1)}))
_register(Method(
    "thd_lap", "thd.mlp_laplacian", "lap", ("inference", "train"), is_thd=True,
    inference=lambda c, x: lambda: {"lap": _nograd(thd.mlp_laplacian, c.model, x).squeeze(1)},
    laplacian=lambda c, x: lambda: thd.mlp_laplacian(c.model, x).squeeze(1)))
# the hook for the general thd.laplacian(f, x) of issue 4: runs wherever it exists
_register(Method(
    "thd_general", "thd.laplacian (general)", "lap", ("inference", "train"), is_thd=True,
    available=_thd_general_available,
    inference=lambda c, x: lambda: {"lap": _nograd(thd.laplacian, c.model, x).reshape(x.shape[0])},
    laplacian=lambda c, x: lambda: thd.laplacian(c.model, x).reshape(x.shape[0])))
_register(Method(
    "nested", "nested autograd (torch.nn)", "both", ("inference", "train"),
    inference=lambda c, x: lambda: dict(zip(("diag", "lap"), nested_autograd(c.model, x))),
    laplacian=lambda c, x: lambda: nested_autograd(c.model, x, create_graph=True)[1]))
_register(Method(
    "nested_dropin", "nested autograd (thd.nn drop-ins)", "both", ("inference", "train"),
    uses_dropin=True,
    inference=lambda c, x: lambda: dict(zip(("diag", "lap"), nested_autograd(c.dropin, x))),
    laplacian=lambda c, x: lambda: nested_autograd(c.dropin, x, create_graph=True)[1]))
_register(Method(
    "func_hessian", "torch.func vmap(hessian)", "both", ("inference", "train"),
    inference=lambda c, x: lambda: dict(zip(("diag", "lap"), _nograd(func_hessian, c.model, x))),
    laplacian=lambda c, x: lambda: func_hessian(c.model, x)[1]))
_register(Method(
    "func_jvp", "torch.func vmap(jvp of grad)", "both", ("inference", "train"),
    inference=lambda c, x: lambda: dict(zip(("diag", "lap"), _nograd(func_jvp_grad, c.model, x))),
    laplacian=lambda c, x: lambda: func_jvp_grad(c.model, x)[1]))
_register(Method(
    "fwd_diag", "plain fwd Hessian diag", "diag", ("inference",),
    inference=lambda c, x: lambda: {"diag": _nograd(plain_forward, c.model, x, True)}))
_register(Method(
    "fwd_lap", "plain fwd Laplacian", "lap", ("inference", "train"),
    inference=lambda c, x: lambda: {"lap": _nograd(plain_forward, c.model, x, False)},
    laplacian=lambda c, x: lambda: plain_forward(c.model, x, False)))


def _jet_method(key: str, label: str, collapsed: bool) -> Method:
    def inf(c, x):
        f = jet_laplacian(c.model, x, collapsed)
        return lambda: {"lap": _nograd(f, x)}

    def lap(c, x):
        f = jet_laplacian(c.model, x, collapsed)
        return lambda: f(x)

    return Method(key, label, "lap", ("inference", "train"), inference=inf, laplacian=lap,
                  available=_jet_available)


_register(_jet_method("jet", "jet-for-pytorch (collapsed Taylor)", True))
_register(_jet_method("jet_std", "jet-for-pytorch (standard Taylor)", False))

DIAG_KEYS = [k for k, m in METHODS.items() if m.gives in ("diag", "both")]
LAP_KEYS = [k for k, m in METHODS.items() if m.gives in ("lap", "both")]


def build(key: str, ctx: Context, x: Tensor) -> Callable:
    """The zero-argument call of method ``key`` in ``ctx.mode`` on points x."""
    m = METHODS[key]
    if ctx.mode == "inference":
        return m.inference(ctx, x)
    lap = m.laplacian(ctx, x)
    params = list(method_model(key, ctx).parameters())

    def step():
        for p in params:
            p.grad = None
        loss = ((lap() - 1.0) ** 2).mean()
        loss.backward()
        return loss.detach()

    return step


def method_model(key: str, ctx: Context) -> nn.Module:
    return ctx.dropin if METHODS[key].uses_dropin else ctx.model


def flat_grads(model: nn.Module) -> Tensor:
    """All weight gradients, flattened (None -> zeros: the Laplacian does not depend on the
    output bias, and some methods leave its grad None)."""
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad.detach()).flatten()
                      for p in model.parameters()])


# ---- the GEMM floor ------------------------------------------------------------------------------


def floor_fn(model: nn.Sequential, x: Tensor, K: int, train: bool = False) -> Callable[[], None]:
    """The engine's GEMMs alone, on preallocated outputs, biases not added.

    The forward row (N x d -> w_1 ... -> 1), the backward row (N x 1 -> ... -> d) and the K
    first-order rows through the hidden layers 2..L (N*K rows each; layer 1's Jacobian is the
    constant W1 V, and nothing follows the last activation). ``train``: each GEMM A W^T also with
    its two backward GEMMs G W (gradient to A) and G^T A (gradient to W), as a training step
    through those GEMMs needs.
    """
    Ws = [m.weight.detach() for m in model if isinstance(m, nn.Linear)]
    N = x.shape[0]
    gemms = []  # (A, W, out): out = A @ W^T, with A fixed (values must not decay to denormals)
    h = x.detach()
    for W in Ws:  # forward row
        out = x.new_empty(N, W.shape[0])
        gemms.append((h, W, out))
        h = x.new_empty(N, W.shape[0]).normal_()
    g = x.new_ones(N, Ws[-1].shape[0])
    for W in reversed(Ws):  # backward row: g @ W = g (W^T)^T
        Wt = W.t().contiguous()
        gemms.append((g, Wt, x.new_empty(N, W.shape[1])))
        g = x.new_empty(N, W.shape[1]).normal_()
    hidden = Ws[1:-1]
    if hidden and K > 0:
        rows = x.new_empty(N * K, hidden[0].shape[1]).normal_()
        for W in hidden:  # first-order rows, N*K at a time
            gemms.append((rows, W, x.new_empty(N * K, W.shape[0])))
            rows = x.new_empty(N * K, W.shape[0]).normal_()
    grads = []
    if train:
        for A, W, out in gemms:
            G = torch.randn_like(out)
            grads.append((G, x.new_empty(A.shape), x.new_empty(W.shape)))

    def run():
        for A, W, out in gemms:
            torch.mm(A, W.t(), out=out)
        for (A, W, _), (G, gA, gW) in zip(gemms, grads):
            torch.mm(G, W, out=gA)
            torch.mm(G.t(), A, out=gW)

    return run


# ---- checks --------------------------------------------------------------------------------------


def rel_err(a: Tensor, ref: Tensor) -> float:
    """max |a - ref| / max |ref| (norm-wise relative error), in float64; NaN/inf -> inf."""
    a, ref = a.detach().to(torch.float64), ref.detach().to(torch.float64)
    if a.shape != ref.shape:
        raise ValueError(f"shape {tuple(a.shape)} vs reference {tuple(ref.shape)}")
    e = float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
    return e if e == e else float("inf")
