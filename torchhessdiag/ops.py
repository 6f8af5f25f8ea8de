"""Python face of the torchhessdiag ops: loading, fake kernels, autograd, and the functional API.

The ops (schemas in csrc/jet_ops.cpp)::

    act_forward(z, act, a, b)                 sigma(z)                      (ATen's own kernel)
    act_derivatives(z, act, a, b, orders)     stack of sigma^(k)(z), k in orders
    act_grad(g, z, act, a, b, k)              g * sigma^(k)(z)
    act_grad_backward(gg, g, z, act, a, b, k) (gg * sigma^(k)(z), gg * g * sigma^(k+1)(z))

Autograd chains them so that differentiating the order-k derivative gives order k+1:
``act_forward`` backpropagates through ``act_grad(k=1)``, whose backward is the fused
``act_grad_backward``; the backward of that is composed from ``act_derivatives``, whose backward
is ``act_derivatives`` one order up. Orders beyond the table (> 4) are computed exactly by
nested autograd of torch's own function (slower), so nested ``torch.autograd.grad`` works to any
order and never returns a wrong number.

Backends: the compiled extension ``torchhessdiag._C`` provides CPU kernels and, when built with
CUDA, CUDA kernels. Where no compiled kernel exists (extension missing, CPU-only build with CUDA
tensors, other devices) the same ops run the pure-PyTorch reference (torchhessdiag/reference.py)
and warn once. ``TORCHHESSDIAG_BACKEND=reference`` forces the reference everywhere.
"""

from __future__ import annotations

import os
import warnings
from typing import List, Optional, Sequence

import torch

from . import reference
from ._schemas import SCHEMAS
from .activations import ActivationSpec, make_spec, torch_function

Tensor = torch.Tensor
MAX_ORDER = reference.MAX_ORDER

# ---- loading ---------------------------------------------------------------------------------

FORCED_REFERENCE = os.environ.get("TORCHHESSDIAG_BACKEND", "").strip().lower() == "reference"
LOAD_ERROR: Optional[str] = None
_C = None
if FORCED_REFERENCE:
    LOAD_ERROR = "TORCHHESSDIAG_BACKEND=reference was set"
else:
    try:
        from . import _C  # noqa: F811  (loading it registers the ops)
    except (ImportError, OSError) as e:  # missing, or built against another torch
        LOAD_ERROR = f"{type(e).__name__}: {e}"

COMPILED = _C is not None
CUDA_KERNELS = bool(COMPILED and _C.cuda_compiled())

if not COMPILED:
    _def_lib = torch.library.Library("torchhessdiag", "DEF")
    for _schema in SCHEMAS.values():
        _def_lib.define(_schema)
    if not FORCED_REFERENCE:
        warnings.warn(
            "torchhessdiag: the compiled extension torchhessdiag._C could not be loaded "
            f"({LOAD_ERROR}); every op runs the pure-PyTorch reference implementation (exact, "
            "slower). Rebuild with `pip install --no-build-isolation -e .` against the torch you "
            "use.",
            RuntimeWarning,
            stacklevel=2,
        )

_ops = torch.ops.torchhessdiag


# ---- reference kernels, for devices with no compiled kernel ---------------------------------

_warned_devices = set()


def _warn_reference(device: torch.device) -> None:
    if device.type in _warned_devices or FORCED_REFERENCE or not COMPILED:
        return  # without the extension the import already warned
    _warned_devices.add(device.type)
    warnings.warn(
        f"torchhessdiag: no compiled kernel for {device.type} tensors (the extension was built "
        f"{'with' if CUDA_KERNELS else 'without'} CUDA); using the pure-PyTorch reference "
        "implementation (exact, slower).",
        RuntimeWarning,
        stacklevel=3,
    )


def _ref_forward(z, act, a, b):
    _warn_reference(z.device)
    y = torch_function(ActivationSpec(act, a, b))(z)
    return y.clone() if y is z else y


def _ref_derivatives(z, act, a, b, orders):
    _warn_reference(z.device)
    d = reference.derivatives(z, act, a, b, max(orders))
    return torch.stack([d[k] for k in orders])


def _ref_grad(g, z, act, a, b, k):
    _warn_reference(z.device)
    return g * reference.derivatives(z, act, a, b, k)[k]


def _ref_grad_backward(gg, g, z, act, a, b, k):
    _warn_reference(z.device)
    d = reference.derivatives(z, act, a, b, k + 1)
    return gg * d[k], gg * g * d[k + 1]


def _ref_jet_layer(J, s1, c, need_ja):
    _warn_reference(J.device)
    return reference.jet_layer(J, s1, c, need_ja)


def _ref_jet_layer_(J, s1, c):
    _warn_reference(J.device)
    Ja, acc = reference.jet_layer(J, s1, c, True)
    J.copy_(Ja)
    return acc


def _ref_jet_layer_backward(gJa, gacc, J, s1, c):
    _warn_reference(J.device)
    return reference.jet_layer_backward(gJa, gacc, J, s1, c)


_REF_KERNELS = {
    "jet_layer": _ref_jet_layer,
    "jet_layer_": _ref_jet_layer_,
    "jet_layer_backward": _ref_jet_layer_backward,
    "act_forward": _ref_forward,
    "act_derivatives": _ref_derivatives,
    "act_grad": _ref_grad,
    "act_grad_backward": _ref_grad_backward,
}

_impl_lib = torch.library.Library("torchhessdiag", "IMPL")
if not COMPILED:
    _ref_keys = ["CompositeExplicitAutograd"]
else:
    _ref_keys = ([] if CUDA_KERNELS else ["CUDA"]) + ["MPS", "XPU"]
for _key in _ref_keys:
    for _name, _fn in _REF_KERNELS.items():
        if _name == "act_forward" and COMPILED:
            continue  # the compiled act_forward already serves every device
        try:
            _impl_lib.impl(_name, _fn, _key)
        except (RuntimeError, ValueError):  # a dispatch key this torch build does not know
            pass


# ---- fake (meta) kernels, for torch.compile / export -----------------------------------------


@torch.library.register_fake("torchhessdiag::act_forward")
def _(z, act, a, b):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


@torch.library.register_fake("torchhessdiag::act_derivatives")
def _(z, act, a, b, orders):
    return z.new_empty((len(orders), *z.shape))


@torch.library.register_fake("torchhessdiag::act_grad")
def _(g, z, act, a, b, k):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


@torch.library.register_fake("torchhessdiag::act_grad_backward")
def _(gg, g, z, act, a, b, k):
    return (
        torch.empty_like(z, memory_format=torch.contiguous_format),
        torch.empty_like(z, memory_format=torch.contiguous_format),
    )


@torch.library.register_fake("torchhessdiag::jet_layer")
def _(J, s1, c, need_ja):
    Ja = torch.empty_like(J, memory_format=torch.contiguous_format) if need_ja else J.new_empty((0,))
    return Ja, J.new_empty((c.shape[0], J.shape[0], J.shape[1]))


@torch.library.register_fake("torchhessdiag::jet_layer_")
def _(J, s1, c):
    return J.new_empty((c.shape[0], J.shape[0], J.shape[1]))


@torch.library.register_fake("torchhessdiag::jet_layer_backward")
def _(gJa, gacc, J, s1, c):
    return torch.empty_like(J), torch.empty_like(s1), torch.empty_like(c)


# ---- derivatives of any order, differentiable ------------------------------------------------

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


def _beyond_table(z: Tensor, spec: ActivationSpec, n: int) -> Tensor:
    """sigma^(n)(z) for n > 4, exactly: nested autograd of torch's own function (slow path)."""
    if spec.linear or spec.piecewise_linear:
        return torch.zeros_like(z)
    fn = torch_function(spec)
    keep_graph = torch.is_grad_enabled() and z.requires_grad
    with torch.enable_grad():
        zz = z if keep_graph else z.detach().requires_grad_(True)
        y = fn(zz)
        for i in range(n):
            (y,) = torch.autograd.grad(
                y, zz, torch.ones_like(y), create_graph=keep_graph or i < n - 1
            )
    return y if keep_graph else y.detach()


def _derivs(z: Tensor, spec: ActivationSpec, orders: Sequence[int]) -> List[Tensor]:
    """[sigma^(k)(z) for k in orders], differentiable to any order."""
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


# act_forward ----------------------------------------------------------------------------------


def _fwd_setup(ctx, inputs, output):
    z, act, a, b = inputs
    _save_common(ctx, act, a, b)
    ctx.save_for_backward(z)


def _fwd_backward(ctx, gy):
    (z,) = ctx.saved_tensors
    return _ops.act_grad(gy, z, ctx.act, ctx.a, ctx.b, 1), None, None, None


# act_grad -------------------------------------------------------------------------------------


def _grad_setup(ctx, inputs, output):
    g, z, act, a, b, k = inputs
    _save_common(ctx, act, a, b)
    ctx.k = k
    ctx.save_for_backward(g, z)


def _grad_backward(ctx, gout):
    g, z = ctx.saved_tensors
    spec, k = _spec_of(ctx), ctx.k
    need_g, need_z = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if need_z and spec.piecewise_linear:
        _warn_piecewise_linear(spec)
    dg = dz = None
    if need_g and need_z and k + 1 <= MAX_ORDER:
        dg, dz = _ops.act_grad_backward(gout, g, z, spec.name, spec.a, spec.b, k)
    else:
        if need_g:
            dg = _times_deriv(gout, z, spec, k)
        if need_z:
            dz = _times_deriv(gout * g, z, spec, k + 1)
    return dg, dz, None, None, None, None


# act_grad_backward ----------------------------------------------------------------------------


def _gb_setup(ctx, inputs, output):
    gg, g, z, act, a, b, k = inputs
    _save_common(ctx, act, a, b)
    ctx.k = k
    ctx.save_for_backward(gg, g, z)


def _gb_backward(ctx, g1, g2):
    gg, g, z = ctx.saved_tensors
    spec, k = _spec_of(ctx), ctx.k
    need_gg, need_g, need_z = ctx.needs_input_grad[:3]
    orders = [k, k + 1] + ([k + 2] if need_z else [])
    d = _derivs(z, spec, orders)
    dk, dk1 = d[0], d[1]
    d_gg = g1 * dk + g2 * g * dk1 if need_gg else None
    d_g = g2 * gg * dk1 if need_g else None
    d_z = g1 * gg * dk1 + g2 * gg * g * d[2] if need_z else None
    return d_gg, d_g, d_z, None, None, None, None


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


torch.library.register_autograd("torchhessdiag::jet_layer", _jl_backward, setup_context=_jl_setup)
torch.library.register_autograd("torchhessdiag::act_forward", _fwd_backward, setup_context=_fwd_setup)
torch.library.register_autograd("torchhessdiag::act_grad", _grad_backward, setup_context=_grad_setup)
torch.library.register_autograd(
    "torchhessdiag::act_grad_backward", _gb_backward, setup_context=_gb_setup
)
torch.library.register_autograd(
    "torchhessdiag::act_derivatives", _ad_backward, setup_context=_ad_setup
)


# ---- public functional API -------------------------------------------------------------------


def check_float_tensor(x, name: str, where: str) -> None:
    """Raise a clear TypeError unless x is a float32/float64 tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        hint = (
            " (half precision is not supported: second derivatives in float16/bfloat16 lose "
            "most of their digits; cast with .float())"
            if x.dtype in (torch.float16, torch.bfloat16)
            else "; cast with .float() or .double()"
        )
        raise TypeError(f"{where}: {name} must be float32 or float64, got {x.dtype}{hint}")


def activation(x: Tensor, act, **params) -> Tensor:
    """Apply an activation of the table with exact derivatives of every order.

    The value is computed by torch's own kernel for that function (bit-for-bit what torch gives);
    the first derivative runs the fused ``act_grad`` kernel, the second the fused
    ``act_grad_backward`` kernel, higher orders the table up to 4 and an exact composite path
    beyond. Second derivatives never come back ``None``: they are zeros where they vanish.

    Args:
        x: float32 or float64 tensor, any shape, any device.
        act: a name from ``torchhessdiag.activations.NAMES`` (e.g. ``"tanh"``), an
            :class:`~torchhessdiag.activations.ActivationSpec`, or a supported module.
        **params: the activation's parameters, e.g. ``beta=2.0`` for softplus.
    """
    spec = make_spec(act, **params)
    check_float_tensor(x, "x", "torchhessdiag.activation")
    return _ops.act_forward(x, spec.name, spec.a, spec.b)


def activation_derivatives(x: Tensor, act, order: int = 2, orders: Optional[Sequence[int]] = None, **params) -> Tensor:
    """Derivatives of an activation at ``x``, stacked: shape ``(len(orders),) + x.shape``.

    By default the orders are ``0, 1, ..., order``. Orders up to 4 come from the fused derivative
    table in one pass; higher orders from exact nested autograd of torch's own function. The
    result is differentiable with respect to ``x`` (to any order).
    """
    spec = make_spec(act, **params)
    check_float_tensor(x, "x", "torchhessdiag.activation_derivatives")
    if orders is None:
        if not isinstance(order, int) or isinstance(order, bool) or order < 0:
            raise ValueError(f"activation_derivatives: order must be an int >= 0, got {order!r}")
        orders = list(range(order + 1))
    else:
        orders = list(orders)
        if not orders or any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in orders):
            raise ValueError(
                f"activation_derivatives: orders must be a non-empty list of ints >= 0, got {orders!r}"
            )
    return torch.stack(_derivs(x, spec, orders))


def backend_info() -> dict:
    """Which implementation serves the ops, and why.

    Returns a dict with ``compiled`` (the extension loaded), ``cuda_kernels`` (it was built with
    CUDA), ``devices`` (``"compiled"`` or ``"reference"`` per device type), ``load_error`` (why
    the extension did not load, if it did not), ``max_order`` and ``activations``.
    """
    from . import __version__
    from .activations import NAMES

    return {
        "version": __version__,
        "torch": torch.__version__,
        "compiled": COMPILED,
        "cuda_kernels": CUDA_KERNELS,
        "forced_reference": FORCED_REFERENCE,
        "load_error": LOAD_ERROR,
        "devices": {
            "cpu": "compiled" if COMPILED else "reference",
            "cuda": "compiled" if CUDA_KERNELS else "reference",
        },
        "max_order": MAX_ORDER,
        "activations": tuple(_C.activations()) if COMPILED else NAMES,
    }
