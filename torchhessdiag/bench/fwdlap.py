"""The forward Laplacian / Hessian diagonal of an MLP in plain PyTorch, as fast as plain PyTorch
allows: the benchmark's yardstick and an independent check of the engine (it shares no code with
torchhessdiag: no derivative table, no custom op).

The model: ``nn.Sequential`` of ``Linear, act, Linear, act, ..., Linear`` (m outputs). For every
hidden layer the forward sweep carries, per point, the value z, the first-order rows J_k = dz/dx v_k
(K directions) and the second-order row(s): their sum s (the Laplacian, K + 2 rows) or one per
direction S_k (the Hessian diagonal, 2K + 1 rows):

    linear       z = W h + b,   J_k = W J_k,   s = W s            (no bias on the derivative rows)
    activation   y = sigma(z),  J_k = sigma'(z) J_k,  s = sigma'(z) s + sigma''(z) sum_k J_k^2
                                                      (S_k = sigma'(z) S_k + sigma''(z) J_k^2)

What makes it fast, in plain torch ops only:

* the first layer's Jacobian is the constant W1 (no per-point GEMM): after the first activation
  J_k = sigma'(z1) W1[:, k] and s = sigma''(z1) rowsum(W1^2);
* every hidden layer after the first is one GEMM over all the rows, stacked in one buffer
  ((K + 2) N rows; the bias is added to the value rows only);
* sigma, sigma', sigma'' from the activation's output where that is cheapest (tanh: y, 1 - y^2,
  -2 y (1 - y^2); sigmoid: y, y - y^2, sigma' (1 - 2 y)), else from z and one transcendental;
* no Jacobian after the last activation, and only the rows needed through the last Linear
  (the Laplacian: the s row alone);
* the Laplacian at d > width: only J J^T enters sum_k J_k^2, so the K = d directions W1 e_k are
  replaced by the rows of R from W1^T = Q R (K = min(d, width1); exact in exact arithmetic,
  differentiable; the gradient, where wanted, is the compressed rows times Q^T);
* inference (no graph): two preallocated row buffers and a few per-layer temporaries, made once
  per (model, N) and reused by every layer and every call; GEMMs with ``out=``, the elementwise
  work in place (``addcmul_``, ``mul_``);
* training: the same algebra in differentiable out-of-place ops, the value row with its own
  (bias) GEMM and the derivative rows in one stacked GEMM, so no ``cat`` per layer.

:func:`forward_derivatives` is the differentiable function (also what ``torch.compile`` gets);
:class:`ForwardLaplacian` the no-graph one with buffers. Both return a dict with ``"lap"`` (N, m)
or ``"diag"`` (N, m, K), and with ``value=True`` also ``"value"`` (N, m) and ``"grad"`` (N, m, d).
The variants that were measured and not kept are described in :data:`NOTES`.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

NOTES = """Measured while writing this (2 threads of a shared 2-core AMD EPYC, torch 2.13.0; see
the commit message for the figures): inference -- one GEMM over all rows (then the bias on the
value rows) vs a value GEMM + a derivative-row GEMM into the same buffer; sum_k J_k^2 by a loop of
addcmul_ vs one square + sum over k; activation work in place on the GEMM output vs into a second
buffer. Training -- value GEMM + one stacked GEMM of the derivative rows (kept) vs torch.cat of all
rows and one GEMM per layer vs three GEMMs per row kind."""


# ---- the model -----------------------------------------------------------------------------------


def parse_modules(model: nn.Module) -> Tuple[List[nn.Linear], List[nn.Module]]:
    """(Linear modules, activation modules) of ``Sequential(Linear, act, ..., act, Linear)``
    (``nn.Identity`` and eval-mode ``nn.Dropout`` skipped); ValueError with the reason else."""
    mods = [m for m in (model if isinstance(model, nn.Sequential) else [model])
            if not (isinstance(m, nn.Identity) or isinstance(m, nn.Dropout) and not m.training)]
    lins, acts = [], []
    for i, m in enumerate(mods):
        if (i % 2 == 0) != isinstance(m, nn.Linear):
            raise ValueError(f"plain forward Laplacian: expected an nn.Sequential of Linear, act, "
                             f"..., act, Linear; got {type(m).__name__} at position {i}")
        (lins if i % 2 == 0 else acts).append(m)
    if len(lins) < 2 or len(mods) % 2 == 0:
        raise ValueError("plain forward Laplacian: needs at least one hidden layer and a Linear last")
    return lins, acts


def parse(model: nn.Module) -> Tuple[List[Tensor], List[Optional[Tensor]], List[nn.Module]]:
    """(weights, biases, activation modules) of the model (see :func:`parse_modules`)."""
    lins, acts = parse_modules(model)
    return [m.weight for m in lins], [m.bias for m in lins], acts


# ---- activations: sigma, sigma', sigma'' ---------------------------------------------------------
#
# Each entry has a differentiable ``fn(z) -> (y, d1, d2u, scale)`` with sigma'' = scale * d2u (the
# scale is folded into the addcmul that uses it), and a no-graph ``inplace(z, d1, d2u, t1, t2)``
# that overwrites z with y, fills d1 and d2u (t1, t2: scratch of z's shape) and returns the scale.

class _Ones(dict):
    def __missing__(self, key):
        self[key] = torch.ones((), dtype=key[0], device=key[1])
        return self[key]


_ONE = _Ones()  # 0-dim ones per (dtype, device), for addcmul's input
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _tanh_fn(z):
    y = torch.tanh(z)
    d1 = torch.addcmul(y.new_ones(()), y, y, value=-1)  # 1 - y^2 in one op (no global state:
    # torch.compile would guard on it)
    return y, d1, y * d1, -2.0


def _tanh_inplace(z, d1, d2u, t1, t2):
    y = z.tanh_()
    # 1 - y^2 as addcmul(1, y, y, value=-1) with a 0-dim 1: one pass; measured 1.9x faster than
    # mul + neg_ + add_ at 4096 x 256 and 3x at 16 x 32 (1 thread, float32)
    torch.addcmul(_ONE[(y.dtype, y.device)], y, y, value=-1, out=d1)
    torch.mul(y, d1, out=d2u)
    return -2.0


def _sigmoid_fn(z):
    y = torch.sigmoid(z)
    d1 = y - y * y
    return y, d1, d1 - 2 * y * d1, 1.0


def _sigmoid_inplace(z, d1, d2u, t1, t2):
    y = z.sigmoid_()
    torch.addcmul(y, y, y, value=-1, out=d1)  # y - y^2
    torch.mul(y, d1, out=d2u)
    torch.add(d1, d2u, alpha=-2, out=d2u)  # sigma' (1 - 2 y)
    return 1.0


def _silu_fn(z):
    T = torch.sigmoid(z)
    U = T - T * T
    return F.silu(z), T + z * U, U * (2 + z - 2 * z * T), 1.0


def _silu_inplace(z, d1, d2u, t1, t2):
    T, U = t1, t2
    torch.sigmoid(z, out=T)
    torch.addcmul(T, T, T, value=-1, out=U)  # sigma(1 - sigma)
    torch.addcmul(T, z, U, out=d1)  # sigma + z sigma (1 - sigma)
    torch.addcmul(z, z, T, value=-2, out=d2u)  # z (1 - 2 sigma)
    d2u.add_(2).mul_(U)
    z.mul_(T)  # y = z sigma
    return 1.0


def _gelu_fn(z):
    phi = torch.exp(-0.5 * z * z) * _INV_SQRT2PI
    Phi = 0.5 * torch.special.erfc(-_INV_SQRT2 * z)
    return F.gelu(z), Phi + z * phi, phi * (2 - z * z), 1.0


def _gelu_inplace(z, d1, d2u, t1, t2):
    torch.mul(z, z, out=t1)
    torch.mul(t1, -0.5, out=t2)
    t2.exp_().mul_(_INV_SQRT2PI)  # phi
    t1.neg_().add_(2)  # 2 - z^2
    torch.mul(t1, t2, out=d2u)
    torch.mul(z, -_INV_SQRT2, out=t1)
    torch.special.erfc(t1, out=t1)
    t1.mul_(0.5)  # Phi, accurate in both tails
    torch.addcmul(t1, z, t2, out=d1)
    z.mul_(t1)  # y = z Phi
    return 1.0


def _softplus(beta: float, threshold: float):
    """softplus(beta z) / beta; sigma' = sigmoid(beta z), sigma'' = beta sigma' (1 - sigma').
    (The smooth function: torch's value switches to z above ``threshold``, where its derivatives
    and these differ by < 2e-9 relative at the default threshold 20.)"""

    def fn(z):
        sig = torch.sigmoid(z if beta == 1 else beta * z)
        return F.softplus(z, beta, threshold), sig, sig - sig * sig, beta

    def inplace(z, d1, d2u, t1, t2):
        if beta == 1:
            torch.sigmoid(z, out=d1)
        else:
            torch.mul(z, beta, out=d1)
            d1.sigmoid_()
        torch.addcmul(d1, d1, d1, value=-1, out=d2u)
        torch._C._nn.softplus(z, beta, threshold, out=t1)
        z.copy_(t1)
        return beta

    return fn, inplace


def act_derivs(act: nn.Module, h: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """sigma(h), sigma'(h), sigma''(h) of any elementwise torch.nn activation by torch's own
    forward-mode AD (jvp of jvp along ones): the fallback for activations without a formula."""
    ones = torch.ones_like(h)

    def first(u):
        return torch.func.jvp(act, (u,), (ones,))

    (y, d1), (_, d2) = torch.func.jvp(first, (h,), (ones,))
    return y, d1, d2


def act_rules(act: nn.Module) -> Tuple[str, Callable, Callable]:
    """(name, fn, inplace) for a torch.nn activation module."""
    if isinstance(act, nn.Tanh):
        return "tanh", _tanh_fn, _tanh_inplace
    if isinstance(act, nn.Sigmoid):
        return "sigmoid", _sigmoid_fn, _sigmoid_inplace
    if isinstance(act, nn.SiLU):
        return "silu", _silu_fn, _silu_inplace
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu", _gelu_fn, _gelu_inplace
    if isinstance(act, nn.Softplus):
        return ("softplus",) + _softplus(float(act.beta), float(act.threshold))

    def fn(z):
        y, d1, d2 = act_derivs(act, z)
        return y, d1, d2, 1.0

    def inplace(z, d1, d2u, t1, t2):
        y, a, b = act_derivs(act, z)
        d1.copy_(a)
        d2u.copy_(b)
        z.copy_(y)
        return 1.0

    return f"generic({type(act).__name__})", fn, inplace


# ---- first-layer directions ----------------------------------------------------------------------


def first_directions(W1: Tensor, second: str, compress: Optional[bool]) -> Tuple[Tensor, Optional[Tensor]]:
    """(V (K, w1), Q or None): the rows J_k after the first Linear, the same for every point.

    V = W1^T (K = d). For the Laplacian with ``compress`` (default: when d > w1), V = R from the
    reduced QR W1^T = Q R (K = w1): R^T R = W1 W1^T, so sum_k (M R^T e_k)^2 = sum_k (M W1 e_k)^2
    for any M, and the rows in these coordinates times Q^T are the real gradient rows."""
    w1, d = W1.shape
    if compress is None:
        compress = d > w1
    if second == "lap" and compress and d > w1:
        Q, R = torch.linalg.qr(W1.t())  # (d, w1), (w1, w1)
        return R, Q
    return W1.t(), None


def _grad_from_rows(G: Tensor, Q: Optional[Tensor]) -> Tensor:
    """(K, N, m) first-order rows of the output -> the gradient (N, m, d)."""
    G = G.permute(1, 2, 0)  # (N, m, K)
    return G if Q is None else torch.matmul(G, Q.t())


# ---- differentiable (training, torch.compile) ----------------------------------------------------


def forward_derivatives(Ws: List[Tensor], bs: List[Optional[Tensor]], rules: List[Callable],
                        x: Tensor, second: str = "lap", value: bool = False,
                        compress: Optional[bool] = None) -> Dict[str, Tensor]:
    """The forward Laplacian (``second="lap"``) or Hessian diagonal (``"diag"``) of the MLP
    (weights ``Ws``, biases ``bs``, activation rules ``rules`` from :func:`act_rules`) at x (N, d),
    in differentiable ops. ``value``: also the output and the input gradient.

    One GEMM per row kind and layer (value with its bias; s or the S_k; the J_k): measured
    faster in a training step than stacking the rows with ``torch.cat`` for one GEMM, and than
    one stacked derivative-row GEMM whose second-order row is then updated in place (autograd's
    CopySlices copies the whole stacked gradient back), see :data:`NOTES`."""
    nh = len(rules)
    V, Q = first_directions(Ws[0], second, compress)
    z = F.linear(x, Ws[0], bs[0])
    y, d1, d2u, sc = rules[0](z)
    V2 = V * V
    J = d1 * V[:, None, :]  # (K, N, w1): the first layer's rows, sigma' W1 e_k
    if second == "lap":
        s = d2u * (V2.sum(0) * sc)  # sigma'' rowsum(W1^2)
    else:
        s = d2u * (V2 * sc)[:, None, :]  # (K, N, w1): sigma'' (W1 e_k)^2
    for li in range(1, nh):
        W = Ws[li]
        z = F.linear(y, W, bs[li])
        Jz = torch.matmul(J, W.t())
        sz = torch.matmul(s, W.t())
        y, d1, d2u, sc = rules[li](z)
        J2 = Jz * Jz
        if second == "lap":
            s = torch.addcmul(d1 * sz, d2u, J2.sum(0), value=sc)
        else:
            s = torch.addcmul(d1 * sz, d2u, J2, value=sc)
        if li < nh - 1 or value:
            J = d1 * Jz
    out = {}
    WL = Ws[-1]
    if second == "lap":
        out["lap"] = F.linear(s, WL)
    else:
        out["diag"] = torch.matmul(s, WL.t()).permute(1, 2, 0)
    if value:
        out["value"] = F.linear(y, WL, bs[-1])
        out["grad"] = _grad_from_rows(torch.matmul(J, WL.t()), Q)
    return out


def forward_laplacian(model: nn.Module, x: Tensor, second: str = "lap", value: bool = False,
                      compress: Optional[bool] = None) -> Dict[str, Tensor]:
    """:func:`forward_derivatives` of a torch.nn model (differentiable w.r.t. its weights)."""
    Ws, bs, acts = parse(model)
    return forward_derivatives(Ws, bs, [act_rules(a)[1] for a in acts], x, second, value, compress)


# ---- no graph: preallocated buffers, in place ----------------------------------------------------


class ForwardLaplacian:
    """The no-graph forward Laplacian / Hessian diagonal of one model at N points. Every buffer
    and every view of it that a layer uses is made here, once; a call runs the layers on them in
    place. ``fl(x)`` -> dict as :func:`forward_derivatives` (fresh output tensors; the weights are
    read from the model's Linear modules at each call, so they may change between calls).

    Rows, in one buffer per layer: [value, s, J_1..J_K] (Laplacian) or [value, S_1..S_K,
    J_1..J_K] (diagonal). Two buffers alternate: the GEMM reads one and writes the other, the
    activation's rules then work in place on the GEMM's output. ``one_gemm``: all rows in one
    GEMM, then the bias on the value rows (else an addmm for the value rows and one GEMM for the
    derivative rows, into the same buffer: measured as fast). ``sumsq``: sum_k J_k^2 by a loop of
    addcmul_ ("loop", measured faster up to K = 32 at least) or square + sum over k ("sum")."""

    def __init__(self, model: nn.Module, N: int, second: str = "lap", value: bool = False,
                 compress: Optional[bool] = None, one_gemm: bool = False, sumsq: str = "auto"):
        if second not in ("lap", "diag"):
            raise ValueError(f"second must be 'lap' or 'diag', got {second!r}")
        self.linears, acts = parse_modules(model)
        self.second, self.value, self.compress, self.one_gemm = second, value, compress, one_gemm
        self.inplace = [act_rules(a)[2] for a in acts]
        W1 = self.linears[0].weight
        w1, d = W1.shape
        self.N, self.d = N, d
        lap = second == "lap"
        K = w1 if (lap and (compress if compress is not None else d > w1) and d > w1) else d
        self.K = K
        R = (K + 2) if lap else (2 * K + 1)
        self.sumsq = ("loop" if K <= 64 else "sum") if sumsq == "auto" else sumsq
        widths = [m.weight.shape[0] for m in self.linears[:-1]]
        wmax = max(widths)
        kw = dict(dtype=W1.dtype, device=W1.device)
        bufs = [torch.empty(R * N * wmax, **kw), torch.empty(R * N * wmax, **kw)]
        small = [torch.empty(N * wmax, **kw) for _ in range(5)]
        sq = torch.empty(K * N * wmax, **kw) if (self.sumsq == "sum" or not lap) else None
        self._bufs, self._small, self._sq = bufs, small, sq

        def rows(buf, w):
            return buf[: R * N * w].view(R, N, w)

        def nw(i, w):
            return small[i][: N * w].view(N, w)

        jr = slice(2, None) if lap else slice(1 + K, None)
        sr = slice(1, 2) if lap else slice(1, 1 + K)
        self.jr, self.sr = jr, sr
        # layer 1 (its rows are written from the constant W1 directions)
        H = rows(bufs[0], widths[0])
        self.first = (H, H[0], H[jr], H[1] if lap else H[sr]) + tuple(nw(i, widths[0]) for i in range(5))
        self.layers = []
        cur = 0
        for li in range(1, len(widths)):
            w_in, w = widths[li - 1], widths[li]
            Hin, Z = rows(bufs[cur], w_in), rows(bufs[1 - cur], w)
            J = Z[jr]
            d1, d2u, t1, t2, q = (nw(i, w) for i in range(5))
            self.layers.append(dict(
                Hin_all=Hin.view(-1, w_in), Hin0=Hin[0], Hin_rest=Hin[1:].reshape(-1, w_in),
                Z=Z, Z_all=Z.view(-1, w), Z0=Z[0], Z_rest=Z[1:].reshape(-1, w), J=J,
                Jk=list(J.unbind(0)), S=Z[sr], s=Z[1], d1=d1, d1b=d1[None], d2u=d2u,
                d2ub=d2u[None], t1=t1, t2=t2, q=q,
                sq=None if sq is None else sq[: J.numel()].view(J.shape),
                last=li == len(widths) - 1))
            cur = 1 - cur
        Hl = rows(bufs[cur], widths[-1])
        self.out_rows = (Hl[0], Hl[1], Hl[sr], Hl[jr])

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Dict[str, Tensor]:
        lins, N = self.linears, self.N
        lap = self.second == "lap"
        if x.shape[0] != N:
            raise ValueError(f"ForwardLaplacian was made for N={N} points, got {x.shape[0]}")
        W1, b1 = lins[0].weight, lins[0].bias
        V, Q = first_directions(W1, self.second, self.compress)
        H, z, Hj, Hs, d1, d2u, t1, t2, q = self.first
        torch.addmm(b1, x, W1.t(), out=z) if b1 is not None else torch.mm(x, W1.t(), out=z)
        sc = self.inplace[0](z, d1, d2u, t1, t2)  # z is y now
        torch.mul(d1[None], V[:, None, :], out=Hj)  # J_k = sigma' W1 e_k
        if lap:
            torch.mul(d2u, (V * V).sum(0).mul_(sc), out=Hs)  # s = sigma'' rowsum(W1^2)
        else:
            torch.mul(d2u[None], (V * V).mul_(sc)[:, None, :], out=Hs)  # S_k = sigma'' (W1 e_k)^2
        for li, L in enumerate(self.layers, start=1):
            lin = lins[li]
            W, b = lin.weight, lin.bias
            Wt = W.t()
            if self.one_gemm:
                torch.mm(L["Hin_all"], Wt, out=L["Z_all"])
                if b is not None:
                    L["Z0"].add_(b)
            else:
                torch.addmm(b, L["Hin0"], Wt, out=L["Z0"]) if b is not None else torch.mm(
                    L["Hin0"], Wt, out=L["Z0"])
                torch.mm(L["Hin_rest"], Wt, out=L["Z_rest"])
            d1, d2u = L["d1"], L["d2u"]
            sc = self.inplace[li](L["Z0"], d1, d2u, L["t1"], L["t2"])
            if lap:
                q = L["q"]
                if self.sumsq == "loop":
                    Jk = L["Jk"]
                    torch.mul(Jk[0], Jk[0], out=q)
                    for Jj in Jk[1:]:
                        q.addcmul_(Jj, Jj)
                else:
                    torch.mul(L["J"], L["J"], out=L["sq"])
                    torch.sum(L["sq"], 0, out=q)
                L["s"].mul_(d1).addcmul_(d2u, q, value=sc)  # s = sigma' s + sigma'' sum_k J_k^2
            else:  # S_k = sigma' S_k + sigma'' J_k^2
                sq = L["sq"]
                torch.mul(L["J"], L["J"], out=sq)
                sq.mul_(L["d2ub"])
                L["S"].mul_(L["d1b"]).add_(sq, alpha=sc)
            if not (L["last"] and lap and not self.value):
                L["J"].mul_(L["d1b"])  # J_k = sigma' J_k (not needed after the last activation)
        y, s, S, J = self.out_rows
        WL, bL = lins[-1].weight, lins[-1].bias
        out = {}
        if lap:
            out["lap"] = torch.mm(s, WL.t())
        else:
            out["diag"] = torch.matmul(S, WL.t()).permute(1, 2, 0)
        if self.value:
            out["value"] = F.linear(y, WL, bL)
            out["grad"] = _grad_from_rows(torch.matmul(J, WL.t()), Q)
        return out
