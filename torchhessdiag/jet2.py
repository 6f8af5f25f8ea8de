"""The collapsed second-order jet in one pass: the product rule and the activation rule.

A Laplacian (or any weighted sum of second derivatives along K directions) propagated through a
traced graph (taylor.py, ``Context(order=2, collapsed=True)``) carries, for every input-dependent
value of shape (N, *S), the jet (x0, x1, sx): the value, its K first-order rows (N, K, *S) and the
weighted sum of its second-order rows sx = sum_k w_k x2[k] (N, *S). Two rules do most of the work
in gated and residual networks (the modified MLP, PirateNet, Fourier-feature nets):

    y = a b:       y0 = a0 b0,    y1 = a0 b1 + a1 b0,    sy = a0 sb + b0 sa + 2 sum_k w_k a1 b1
    y = sigma(h):  y0 = sigma(h0), y1 = sigma'(h0) h1,   sy = sigma''(h0) sum_k w_k h1^2 + sigma'(h0) s

In torch ops each is six to eight elementwise kernels over the (N, K, *S) rows, each with a fresh
output; the ops ``torchhessdiag::jet2_mul`` / ``jet2_act`` (csrc/jet2_ops.cpp, CPU) read every
input and write every output once, and so do their backward ops (the gradients of a training
step). ``mul`` and ``act`` below return the new jet's (y0, y1, sy), or None where the op does not
apply -- then the rules (_rules_algebra, _rules_activation) use the torch formulas:

* not compiled, or not every tensor on the CPU (the CUDA path keeps torch's kernels), or dtypes
  other than float32/float64;
* under torch.compile (its own fusion of the torch formulas serves better, and keeps one graph)
  or a torch.func transform;
* weights that require grad (a learned operator coefficient: the ops take them as constants);
* a jet with a shared (K, *S) or structurally zero coefficient (before the first nonlinearity,
  where most terms vanish), a user-registered or piecewise-linear activation (whose structural
  zeros the torch formulas keep).

Autograd: the backward ops give the gradients in one pass; a backward that is itself recorded
(``create_graph=True``, a derivative of the training gradient) runs the same formulas in torch
ops instead, so every order stays differentiable. The torch formulas here are also the reference
kernels (the pure-PyTorch backend, CUDA tensors) and what tests/ops/test_jet2.py checks the C++
kernels against.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import ops
from ._jet import _fma, _mul, _wsum
from .activations import ActivationSpec

Tensor = torch.Tensor
_ops = ops._ops

_functorch_probe = getattr(torch._C, "_are_functorch_transforms_active", None)


# ---- the formulas in torch ops (reference kernels, differentiable backward) ----------------------


def _kshape(w: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """weights (K,) shaped to broadcast over (N, K, *S) rows, in their dtype."""
    if w is None:
        return None
    return w.to(dtype=like.dtype, device=like.device).reshape((1, -1) + (1,) * (like.dim() - 2))


def _z(g: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def mul_formulas(a0, a1, sa, b0, b1, sb, weights):
    """(y0, y1, sy) of a b in torch ops: the one spelling of the rule outside the C++ kernels.
    Any coefficient may be None (identically zero) or shared (K, *S); the traced rules
    (_rules_algebra._product) use it where the op declines."""
    vdim = a0.dim()
    y1 = _fma(_mul(a0.unsqueeze(1), b1), a1, b0.unsqueeze(1))
    cross = _mul(a1, b1)
    two_cross = None if cross is None else 2.0 * _wsum(cross, vdim, weights)
    return a0 * b0, y1, _fma(_fma(two_cross, a0, sb), b0, sa)


def mul_backward_formulas(gv, gy1, gs, a0, a1, sa, b0, b1, sb, weights):
    gv, gy1, gs = _z(gv, a0), _z(gy1, a1), _z(gs, a0)
    t = 2.0 * gs.unsqueeze(1)
    if weights is not None:
        t = t * _kshape(weights, a1)
    ga0 = gv * b0 + (gy1 * b1).sum(1) + gs * sb
    gb0 = gv * a0 + (gy1 * a1).sum(1) + gs * sa
    ga1 = gy1 * b0.unsqueeze(1) + t * b1
    gb1 = gy1 * a0.unsqueeze(1) + t * a1
    return ga0, ga1, gs * b0, gb0, gb1, gs * a0


def act_combine(d1, d2, h1, s, weights):
    """(y1, sy) of sigma(h) from d1 = sigma'(h0), d2 = sigma''(h0) in torch ops: the one spelling
    of the rule outside the C++ kernels. d1, d2, h1, s may be None (identically zero), h1 shared
    (K, *S); the traced rules (_rules_activation.activation_jet) use it where the op declines."""
    vdim = next(t for t in (d1, d2) if t is not None).dim()
    y1 = None if d1 is None else _mul(d1.unsqueeze(1), h1)
    sq = None if h1 is None else _wsum(h1 * h1, vdim, weights)
    return y1, _fma(_mul(d2, sq), d1, s)


def act_formulas(h0, h1, s, act, a, b, weights):
    d0, d1, d2 = _ops.act_derivatives(h0, act, a, b, [0, 1, 2]).unbind(0)
    return (d0, *act_combine(d1, d2, h1, s, weights))


def act_backward_formulas(gy0, gy1, gsy, h0, h1, s, act, a, b, weights):
    gy0, gy1, gsy = _z(gy0, h0), _z(gy1, h1), _z(gsy, h0)
    d1, d2, d3 = _ops.act_derivatives(h0, act, a, b, [1, 2, 3]).unbind(0)
    q = _wsum(h1 * h1, h0.dim(), weights)
    gh0 = gy0 * d1 + d2 * (gy1 * h1).sum(1) + gsy * (d3 * q + d2 * s)
    t = 2.0 * (gsy * d2).unsqueeze(1)
    if weights is not None:
        t = t * _kshape(weights, h1)
    gh1 = gy1 * d1.unsqueeze(1) + t * h1
    return gh0, gh1, gsy * d1


# ---- autograd ------------------------------------------------------------------------------------


class _Mul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a0, a1, sa, b0, b1, sb, weights):
        ctx.save_for_backward(a0, a1, sa, b0, b1, sb)
        ctx.weights = weights
        return tuple(_ops.jet2_mul(a0, a1, sa, b0, b1, sb, weights))

    @staticmethod
    def backward(ctx, gv, gy1, gs):
        ins = ctx.saved_tensors
        if torch.is_grad_enabled():  # recorded: the torch formulas, differentiable again
            return (*mul_backward_formulas(gv, gy1, gs, *ins, ctx.weights), None)
        return (*_ops.jet2_mul_backward(gv, gy1, gs, *ins, ctx.weights), None)


class _Act(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h0, h1, s, act, a, b, weights):
        ctx.save_for_backward(h0, h1, s)
        ctx.args = (act, a, b, weights)
        return tuple(_ops.jet2_act(h0, h1, s, act, a, b, weights))

    @staticmethod
    def backward(ctx, gy0, gy1, gsy):
        ins = ctx.saved_tensors
        if torch.is_grad_enabled():
            out = act_backward_formulas(gy0, gy1, gsy, *ins, *ctx.args)
        else:
            out = _ops.jet2_act_backward(gy0, gy1, gsy, *ins, *ctx.args)
        return (*out, None, None, None, None)


# ---- when the ops apply --------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float64)


def _usable(weights: Optional[Tensor], *ts) -> bool:
    if not ops.COMPILED or torch.compiler.is_compiling():
        return False
    if weights is not None and weights.requires_grad:  # a learned coefficient: its gradient is
        return False  # the torch formulas' (the ops treat the weights as constants)
    if _functorch_probe is not None and _functorch_probe():
        return False
    x0 = ts[0]
    if x0.dtype not in _FLOATS or x0.device.type != "cpu":
        return False
    for t in ts:
        if t is None or t.device.type != "cpu" or t.dtype != x0.dtype:
            return False
    return True


def _point_jet(x0: Tensor, x1: Optional[Tensor], sx: Optional[Tensor]) -> bool:
    """(x0, x1, sx) is a per-point jet of value shape x0.shape (no shared or zero coefficient)."""
    return (
        x1 is not None
        and sx is not None
        and x1.dim() == x0.dim() + 1
        and x1.shape[0] == x0.shape[0]
        and x1.shape[2:] == x0.shape[1:]
        and sx.shape == x0.shape
    )


def mul(a0, a1, sa, b0, b1, sb, weights) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    """(y0, y1, sy) of the product of two jets of one shape, or None (use the torch formulas)."""
    if not (_usable(weights, a0, a1, sa, b0, b1, sb) and a0.shape == b0.shape):
        return None
    if not (_point_jet(a0, a1, sa) and _point_jet(b0, b1, sb) and a1.shape == b1.shape):
        return None
    return _Mul.apply(a0, a1, sa, b0, b1, sb, weights)


def act(h0, h1, s, spec: ActivationSpec, weights) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    """(y0, y1, sy) of sigma(h) for a table activation, or None (use the torch formulas)."""
    if spec.is_user or spec.piecewise_linear or spec.linear:
        return None
    if not (_usable(weights, h0, h1, s) and _point_jet(h0, h1, s)):
        return None
    return _Act.apply(h0, h1, s, spec.name, spec.a, spec.b, weights)


# ---- fake kernels (torch.compile / export / opcheck) and the reference kernels ----------------------


@torch.library.register_fake("torchhessdiag::jet2_mul")
def _fake_mul(a0, a1, sa, b0, b1, sb, weights):
    return torch.empty_like(a0), torch.empty_like(a1), torch.empty_like(a0)


@torch.library.register_fake("torchhessdiag::jet2_mul_backward")
def _fake_mul_backward(gv, gy1, gs, a0, a1, sa, b0, b1, sb, weights):
    return tuple(torch.empty_like(t) for t in (a0, a1, sa, b0, b1, sb))


@torch.library.register_fake("torchhessdiag::jet2_act")
def _fake_act(h0, h1, s, act, a, b, weights):
    return torch.empty_like(h0), torch.empty_like(h1), torch.empty_like(h0)


@torch.library.register_fake("torchhessdiag::jet2_act_backward")
def _fake_act_backward(gy0, gy1, gsy, h0, h1, s, act, a, b, weights):
    return torch.empty_like(h0), torch.empty_like(h1), torch.empty_like(s)


def _ref(fn):
    def kernel(*args):
        with torch.no_grad():
            return tuple(t.contiguous() for t in fn(*args))

    return kernel


# The ops have CPU kernels only: CUDA tensors (and every device, without the extension) get the
# torch formulas -- never on the library's own paths, which use the ops on the CPU only.
for _name, _fn in (
    ("jet2_mul", mul_formulas),
    ("jet2_mul_backward", mul_backward_formulas),
    ("jet2_act", act_formulas),
    ("jet2_act_backward", act_backward_formulas),
):
    for _key in ("CUDA",) if ops.COMPILED else ("CPU", "CUDA"):
        ops._impl_lib.impl(_name, _ref(_fn), _key)
