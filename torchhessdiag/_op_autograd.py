"""Derivatives of the activations to any order (``_derivs``: the table, then the exact composite
path ``_beyond_table``), and the autograd formulas of the torchhessdiag ops (for the compiled
backend those of ``taylor_act``, ``mul_pair``, ``mul_pair_backward`` and ``jet_layer``; for the
reference backend also those of the three activation ops, which are C++ otherwise).

Import direction: above ``_backend``, ``_checks``, ``reference``, ``activations`` and ``custom``;
below ``ops`` (which re-exports ``_derivs``).
"""

from __future__ import annotations

import warnings
from typing import List, Sequence

import torch

from . import custom as _custom, reference
from ._backend import COMPILED, _impl_lib, _ops
from ._checks import _check_act, _check_float
from .activations import ActivationSpec, torch_function
from .reference import MAX_ORDER

Tensor = torch.Tensor


_warned_pwl = set()


def _warn_piecewise_linear(spec: ActivationSpec) -> None:
    if spec.name in _warned_pwl:
        return
    _warned_pwl.add(spec.name)
    warnings.warn(
        f"torchhessdiag: second and higher derivatives of {spec.name} are exactly 0 -- it is "
        "piecewise linear, and its true second derivative is a Dirac delta at 0 that no "
        "autograd can see. A network built only from such activations has a zero Hessian "
        "(and Laplacian) almost everywhere; use a smooth activation (Tanh, SiLU, GELU, Softplus) "
        "where second derivatives matter, e.g. in a PDE loss.",
        UserWarning,
        stacklevel=4,
    )


def _nested_grad(y: Tensor, z: Tensor, times: int, keep_graph: bool) -> Tensor:
    """d^times y / dz^times for an elementwise y(z), by repeated autograd."""
    for i in range(times):
        if not y.requires_grad:
            return torch.zeros_like(z)
        (y,) = torch.autograd.grad(
            y, z, torch.ones_like(y), create_graph=keep_graph or i < times - 1, allow_unused=True
        )
        if y is None:
            return torch.zeros_like(z)
    return y


def _beyond_table(z: Tensor, spec: ActivationSpec, n: int) -> Tensor:
    """sigma^(n)(z) for n > 4, exactly, by nested autograd (the slow path).

    Near 0 (|z| <= 1) it differentiates torch's own function n times: smooth and accurate there.
    Elsewhere it differentiates the table's stable order-4 formula (reference.py) n - 4 times:
    that one stays accurate and finite in the tails, where torch's formulas cancel or overflow
    (e.g. NaN for gelu_tanh at |z| = 30), but it is built on |z| and must not be differentiated
    at 0. Each branch only ever sees points of its own region (the usual double-where), so no
    NaN leaks into either value or gradient.
    """
    if spec.linear or spec.piecewise_linear:
        return torch.zeros_like(z)
    keep_graph = torch.is_grad_enabled() and z.requires_grad
    # float32 input: work in float64 (this path is slow anyway), so that intermediate products of
    # the chain rule cannot overflow float32 where the true value underflows to 0
    wide = z.dtype == torch.float32 and z.device.type in ("cpu", "cuda")
    with torch.enable_grad():
        zz = z if keep_graph else z.detach().requires_grad_(True)
        if wide:
            zz = zz.double()
        small = zz.detach().abs() <= 1.0
        z_s = torch.where(small, zz, torch.zeros_like(zz))
        z_l = torch.where(small, torch.full_like(zz, 2.0), zz)
        d_s = _nested_grad(torch_function(spec)(z_s), zz, n, keep_graph)
        d4 = reference.derivatives(z_l, spec.name, spec.a, spec.b, MAX_ORDER)[MAX_ORDER]
        d_l = _nested_grad(d4, zz, n - MAX_ORDER, keep_graph)
        out = torch.where(small, d_s, d_l)
        if wide:
            out = out.to(torch.float32)
    return out if keep_graph else out.detach()


def _derivs(z: Tensor, spec: ActivationSpec, orders: Sequence[int]) -> List[Tensor]:
    """[sigma^(k)(z) for k in orders], differentiable to any order.

    A user activation (``spec.is_user``, see custom.py) is served from its registered callables:
    sigma^(k) is the given d_k, beyond them exact autograd of the last one."""
    if spec.is_user:
        return _custom.derivatives(z, spec, orders)
    table = [k for k in orders if k <= MAX_ORDER]
    out = {}
    if table:
        uniq = sorted(set(table))
        stacked = _ops.act_derivatives(z, spec.name, spec.a, spec.b, uniq)
        out.update(zip(uniq, stacked.unbind(0)))
    for k in orders:
        if k not in out:
            out[k] = _beyond_table(z, spec, k)
    return [out[k] for k in orders]


def _times_deriv(w: Tensor, z: Tensor, spec: ActivationSpec, n: int) -> Tensor:
    """w * sigma^(n)(z), fused where the table reaches."""
    if n <= MAX_ORDER:
        return _ops.act_grad(w, z, spec.name, spec.a, spec.b, n)
    return w * _beyond_table(z, spec, n)


def _spec_of(ctx) -> ActivationSpec:
    return ActivationSpec(ctx.act, ctx.a, ctx.b)


def _save_common(ctx, act, a, b):
    ctx.act, ctx.a, ctx.b = act, a, b


def _keep_needs(ctx) -> None:
    """Keep ctx.needs_input_grad as the forward saw it, for the backward to read.

    torch.library.register_autograd's backward wrapper (torch/_library/autograd.py, torch 2.13)
    sets ``ctx.needs_input_grad = ctx.needs_input_grad[:-1]`` around our backward and restores it
    afterwards. Threads differentiating one shared graph at once (torch allows it) interleave
    there: a thread may see the tuple cut twice (IndexError), and the restores can leave it cut.
    The copy made here, while the forward runs in one thread, is not touched by that."""
    ctx._thd_needs = tuple(getattr(ctx, "needs_input_grad", ()))


def _needs(ctx) -> tuple:
    return getattr(ctx, "_thd_needs", None) or ctx.needs_input_grad


# act_forward ----------------------------------------------------------------------------------


def _fwd_setup(ctx, inputs, output):
    z, act, a, b = inputs
    _save_common(ctx, act, a, b)
    ctx.save_for_backward(z)


def _fwd_backward(ctx, gy):
    """g * sigma'(z). The first backward through the node builds a fused act_grad node (whose own
    backward is the fused double backward); nested-autograd loops come back through this node
    once per input dimension, and those later passes multiply by a cached sigma'(z) instead of
    evaluating the table again (with a graph to z when one is being recorded)."""
    (z,) = ctx.saved_tensors
    if torch.is_grad_enabled():
        if not getattr(ctx, "_thd_seen", False):
            ctx._thd_seen = True
            return _ops.act_grad(gy, z, ctx.act, ctx.a, ctx.b, 1), None, None, None
        D1 = getattr(ctx, "_thd_d1_graph", None)
        if D1 is None:
            D1 = _ops.act_derivatives(z, ctx.act, ctx.a, ctx.b, [1])[0]
            ctx._thd_d1_graph = D1
        return gy * D1, None, None, None
    D1 = getattr(ctx, "_thd_d1_graph", None)
    if D1 is None:
        D1 = getattr(ctx, "_thd_d1", None)
    if D1 is None:
        D1 = _ops.act_derivatives(z, ctx.act, ctx.a, ctx.b, [1])[0]
        ctx._thd_d1 = D1
    return gy * D1, None, None, None


# act_grad -------------------------------------------------------------------------------------


def _grad_setup(ctx, inputs, output):
    g, z, act, a, b, k = inputs
    _save_common(ctx, act, a, b)
    _keep_needs(ctx)
    ctx.k = k
    ctx.save_for_backward(g, z)


def _cached_derivs(ctx, z: Tensor, spec: ActivationSpec, k: int) -> Tensor:
    """(sigma^(k), sigma^(k+1)) at z, stacked, computed once per graph node.

    Nested-autograd second derivatives backpropagate through the same node once per input
    dimension; the table is evaluated on the first pass and every later pass is pure arithmetic
    (the fused mul_pair kernel). A cache made without a graph is never used when a graph is being
    recorded (create_graph=True), so higher derivatives stay exact.
    """
    if torch.is_grad_enabled():
        D = getattr(ctx, "_thd_derivs_graph", None)
        if D is None:
            D = _ops.act_derivatives(z, spec.name, spec.a, spec.b, [k, k + 1])
            ctx._thd_derivs_graph = D
        return D
    D = getattr(ctx, "_thd_derivs_graph", None)
    if D is None:
        D = getattr(ctx, "_thd_derivs", None)
    if D is None:
        D = _ops.act_derivatives(z, spec.name, spec.a, spec.b, [k, k + 1])
        ctx._thd_derivs = D
    return D


def _grad_backward(ctx, gout):
    g, z = ctx.saved_tensors
    spec, k = _spec_of(ctx), ctx.k
    need_g, need_z = _needs(ctx)[:2]
    if need_z and spec.piecewise_linear:
        _warn_piecewise_linear(spec)
    if k + 1 <= MAX_ORDER:
        D = _cached_derivs(ctx, z, spec, k)
        dg, dz = _ops.mul_pair(gout, g, D[0], D[1])
        return (dg if need_g else None), (dz if need_z else None), None, None, None, None
    dg = _times_deriv(gout, z, spec, k) if need_g else None
    dz = _times_deriv(gout * g, z, spec, k + 1) if need_z else None
    return dg, dz, None, None, None, None


# mul_pair ---------------------------------------------------------------------------------------


def _mp_setup(ctx, inputs, output):
    _keep_needs(ctx)
    ctx.save_for_backward(*inputs)


def _mp_backward(ctx, g1, g2):
    w, g, d1, d2 = ctx.saved_tensors
    n = _needs(ctx)
    g2w = g2 * w if (n[1] or n[3]) else None
    return (
        g1 * d1 + g2 * g * d2 if n[0] else None,  # d/dw
        g2w * d2 if n[1] else None,  # d/dg
        g1 * w if n[2] else None,  # d/dd1
        g2w * g if n[3] else None,  # d/dd2
    )


# mul_pair_backward: its own derivative (direct calls only; the drop-ins run it without a graph) -


def _mpb_setup(ctx, inputs, output):
    _keep_needs(ctx)
    ctx.save_for_backward(*inputs)


def _mpb_backward(ctx, a, b, c):
    """ow = g1 d1 + g2 g d2, og = g2 w d2, oz = w (g1 d2 + g2 g d3), differentiated (torch ops, so
    differentiable again); a, b, c: the gradients of ow, og, oz (None = zero)."""
    g1, g2, w, g, d1, d2, d3 = ctx.saved_tensors
    need = _needs(ctx)

    def acc(*terms):  # sum of the products in terms, skipping those with a None factor
        out = None
        for factors in terms:
            if any(f is None for f in factors):
                continue
            p = factors[0]
            for f in factors[1:]:
                p = p * f
            out = p if out is None else out + p
        return torch.zeros_like(w) if out is None else out

    res = [
        acc((a, d1), (c, w, d2)) if g1 is not None else None,  # g1
        acc((a, g, d2), (b, w, d2), (c, w, g, d3)) if g2 is not None else None,  # g2
        acc((b, g2, d2), (c, g1, d2), (c, g2, g, d3)),  # w
        acc((a, g2, d2), (c, w, g2, d3)),  # g
        acc((a, g1)),  # d1
        acc((a, g2, g), (b, g2, w), (c, w, g1)),  # d2
        acc((c, w, g2, g)),  # d3
    ]
    return tuple(r if n else None for r, n in zip(res, need))


# act_derivatives ------------------------------------------------------------------------------


def _ad_setup(ctx, inputs, output):
    z, act, a, b, orders = inputs
    _save_common(ctx, act, a, b)
    ctx.orders = list(orders)
    ctx.save_for_backward(z)


def _ad_backward(ctx, gd):
    (z,) = ctx.saved_tensors
    up = torch.stack(_derivs(z, _spec_of(ctx), [k + 1 for k in ctx.orders]))
    return (gd * up).sum(0), None, None, None, None


# jet_layer ------------------------------------------------------------------------------------


def _jl_setup(ctx, inputs, output):
    J, s1, c, need_ja = inputs
    ctx.need_ja = need_ja
    ctx.save_for_backward(J, s1, c)


def _jl_backward(ctx, gJa, gacc):
    J, s1, c = ctx.saved_tensors
    g = gJa if ctx.need_ja else None
    if torch.is_grad_enabled():
        # a graph of the backward is wanted (double backward): the same formulas in torch ops
        dJ, ds1, dc = reference.jet_layer_backward(g, gacc, J, s1, c)
    else:
        dJ, ds1, dc = _ops.jet_layer_backward(g, gacc, J, s1, c)
    return dJ, ds1, dc, None


# taylor_act -----------------------------------------------------------------------------------


def _ta_setup(ctx, inputs, output):
    D, H = inputs
    ctx.save_for_backward(D, H)


def _ta_backward(ctx, gY):
    D, H = ctx.saved_tensors
    if torch.is_grad_enabled():
        # a graph of the backward is wanted (double backward): the same formulas in torch ops
        return reference.taylor_act_backward(gY, D, H)
    return _ops.taylor_act_backward(gY.contiguous(), D, H)


# act_beyond_table ------------------------------------------------------------------------------


def _beyond_table_op(z, act, a, b, n):
    """sigma^(n)(z) by the exact composite path (any n >= 0; the table where it reaches). The C++
    autograd of the activation ops (csrc/act_autograd.h) calls it past the table. Registered as
    CompositeImplicitAutograd: its autograd is that of the torch ops it runs."""
    _check_float(z, "z", "act_beyond_table")
    _check_act(act, a, "act_beyond_table")
    if n < 0:
        raise ValueError(f"torchhessdiag.act_beyond_table: derivative order must be >= 0, got {n}")
    if n <= MAX_ORDER:
        return _ops.act_derivatives(z, act, a, b, [n])[0]
    return _beyond_table(z, ActivationSpec(act, a, b), n)


_impl_lib.impl("act_beyond_table", _beyond_table_op, "CompositeImplicitAutograd")

torch.library.register_autograd("torchhessdiag::taylor_act", _ta_backward, setup_context=_ta_setup)
torch.library.register_autograd("torchhessdiag::mul_pair", _mp_backward, setup_context=_mp_setup)
torch.library.register_autograd(
    "torchhessdiag::mul_pair_backward", _mpb_backward, setup_context=_mpb_setup
)
torch.library.register_autograd("torchhessdiag::jet_layer", _jl_backward, setup_context=_jl_setup)
if not COMPILED:
    # compiled: the autograd of these three is C++, at the Autograd key (csrc/act_autograd.h), with
    # the same formulas and the same derivative caching; this Python version serves the
    # reference backend
    torch.library.register_autograd("torchhessdiag::act_forward", _fwd_backward, setup_context=_fwd_setup)
    torch.library.register_autograd("torchhessdiag::act_grad", _grad_backward, setup_context=_grad_setup)
    torch.library.register_autograd(
        "torchhessdiag::act_derivatives", _ad_backward, setup_context=_ad_setup
    )
