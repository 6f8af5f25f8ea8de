"""Python face of the torchhessdiag ops: loading, fake kernels, autograd, and the functional API.

The ops (schemas in csrc/jet_ops.cpp and csrc/engine_ops.cpp)::

    act_forward(z, act, a, b)                 sigma(z)                       (ATen's own kernel)
    act_derivatives(z, act, a, b, orders)     stack of sigma^(k)(z), k in orders, one table pass
    act_grad(g, z, act, a, b, k)              g * sigma^(k)(z)
    mul_pair(w, g, d1, d2)                    (w * d1, w * g * d2)           (arithmetic only)
    mul_pair_backward(g1, g2, w, g, d1, d2, d3)  its backward w.r.t. w, g and z (d2 = d1', d3 = d2')
    act_beyond_table(z, act, a, b, n)         sigma^(n)(z) past the table: exact composite path
    jet_layer(J, s1, c, need_ja)              the engine's per-layer kernel (engine_ops.h)
    jet_layer_(J, s1, c)                      the same, in place
    jet_layer_backward(gJa, gacc, J, s1, c)   its fused backward
    taylor_act(D, H)                          Faa di Bruno over a Taylor jet, orders 1..4
                                              (csrc/taylor.h; D = sigma^(1..n)(h0) from the table)
    taylor_act_backward(gY, D, H)             its fused backward

Autograd chains them so that differentiating the order-k derivative gives order k+1:
``act_forward`` backpropagates through ``act_grad(k=1)``; the backward of ``act_grad`` is the fused
pair (w sigma^(k), w g sigma^(k+1)) (``mul_pair``), whose backward is ``mul_pair_backward``.
Nested-autograd loops revisit every node once per input dimension: the derivatives of one
activation are evaluated once (sigma', sigma'', sigma''' in one table pass) and every later visit
is pure arithmetic on them. With the compiled extension this autograd is C++
(csrc/jet_autograd.h: no Python per backward node); the Python version below serves the reference
backend, with the same formulas and per-node caching. Orders beyond the table (> 4) come from an
exact composite path (``_beyond_table``, as the op ``act_beyond_table`` for the C++ side).

Backends: the compiled extension ``torchhessdiag._C`` provides CPU kernels and, when built with
CUDA, CUDA kernels. Where no compiled kernel exists (extension missing, CPU-only build with CUDA
tensors, other devices) the same ops run the pure-PyTorch reference (torchhessdiag/reference.py)
with the same argument checks, and warn once. A GPU that the CUDA kernels were not compiled for
is found at its first op call and served by the same reference kernels (``torchhessdiag_ref::*``,
see _cuda_probe.py), with one warning. ``TORCHHESSDIAG_BACKEND=reference`` forces the reference
everywhere.
"""

from __future__ import annotations

import os
import warnings
from typing import List, Optional, Sequence

import torch

from . import custom as _custom
from . import reference
from ._precision import warn_if_tf32  # noqa: F401  (the TF32 policy, for general.py's paths)
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
    if device.type == "cpu" or (device.type == "cuda" and CUDA_KERNELS):
        # compiled kernels exist for this device type: the reference runs only as the fallback
        # of a GPU without a kernel image (torchhessdiag_ref::*), and _cuda_probe warned for it
        return
    _warned_devices.add(device.type)
    warnings.warn(
        f"torchhessdiag: no compiled kernel for {device.type} tensors (the extension was built "
        f"{'with' if CUDA_KERNELS else 'without'} CUDA); using the pure-PyTorch reference "
        "implementation (exact, slower).",
        RuntimeWarning,
        stacklevel=3,
    )


# The same argument checks as the C++ ops (csrc/jet_ops_impl.h, csrc/engine_ops.h), with the same
# exception types, so the reference backend refuses exactly what the compiled one refuses.
def _check_float(t, what, op):
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"torchhessdiag.{op}: {what} must be float32 or float64, got {t.dtype}; cast it with "
            ".float() or .double()"
        )


def _check_like(t, z, what, op):
    _check_float(t, what, op)
    if t.device != z.device:
        raise ValueError(f"torchhessdiag.{op}: {what} is on {t.device} but z is on {z.device}; move both to one device")
    if t.dtype != z.dtype:
        raise TypeError(f"torchhessdiag.{op}: {what} has dtype {t.dtype} but z has {z.dtype}")
    if t.shape != z.shape:
        raise ValueError(f"torchhessdiag.{op}: {what} has shape {tuple(t.shape)} but z has shape {tuple(z.shape)}")


def _check_act(act, a, op):
    if act not in reference.TABLE:
        raise ValueError(f"torchhessdiag: unknown activation '{act}'; supported: {', '.join(reference.TABLE)}")
    if act == "softplus" and a == 0.0:
        raise ValueError("torchhessdiag: softplus needs beta != 0 (got 0)")
    if act == "celu" and a == 0.0:
        raise ValueError("torchhessdiag: celu needs alpha != 0 (got 0)")


def _check_order(k, max_k, op):
    if not 0 <= k <= max_k:
        raise ValueError(
            f"torchhessdiag.{op}: derivative order {k} is outside the table (0..{max_k}); higher "
            "orders go through torchhessdiag.activation_derivatives"
        )


def _check_forward(z, act, a, b):
    _check_float(z, "z", "act_forward")
    _check_act(act, a, "act_forward")


def _check_derivatives(z, act, a, b, orders):
    _check_float(z, "z", "act_derivatives")
    _check_act(act, a, "act_derivatives")
    if not 1 <= len(orders) <= 16:
        raise ValueError(f"torchhessdiag.act_derivatives: orders must list 1..16 orders, got {len(orders)}")
    for k in orders:
        _check_order(k, MAX_ORDER, "act_derivatives")


def _check_grad(g, z, act, a, b, k):
    _check_float(z, "z", "act_grad")
    _check_like(g, z, "g", "act_grad")
    _check_act(act, a, "act_grad")
    _check_order(k, MAX_ORDER, "act_grad")


def _check_layer(J, s1, c, op):
    for t in (J, s1, c):
        _check_float(t, "tensors", op)
        if t.dtype != J.dtype:
            raise TypeError(f"torchhessdiag.{op}: dtypes differ ({t.dtype} vs {J.dtype})")
        if t.device != J.device:
            raise ValueError(f"torchhessdiag.{op}: devices differ ({t.device} vs {J.device})")
    if J.dim() != 3:
        raise ValueError(f"torchhessdiag.{op}: J must be (N, K, w), got shape {tuple(J.shape)}")
    N, _, w = J.shape
    if s1.shape != (N, w):
        raise ValueError(f"torchhessdiag.{op}: s1 must be (N, w) = ({N}, {w}), got {tuple(s1.shape)}")
    if c.dim() != 3 or c.shape[1:] != (N, w):
        raise ValueError(f"torchhessdiag.{op}: c must be (m, N, w) with N={N}, w={w}, got {tuple(c.shape)}")


def _check_layer_backward(gJa, gacc, J, s1, c):
    _check_layer(J, s1, c, "jet_layer_backward")
    for t, what in ((gacc, "gacc"), (gJa, "gJa")):
        if t is None:
            continue
        if t.dtype != J.dtype:
            raise TypeError(f"torchhessdiag.jet_layer_backward: {what} has dtype {t.dtype} but J has {J.dtype}")
        if t.device != J.device:
            raise ValueError(f"torchhessdiag.jet_layer_backward: {what} is on {t.device} but J is on {J.device}")
    if gacc.shape != (c.shape[0], J.shape[0], J.shape[1]):
        raise ValueError("torchhessdiag.jet_layer_backward: gacc must be (m, N, K)")
    if gJa is not None and gJa.shape != J.shape:
        raise ValueError("torchhessdiag.jet_layer_backward: gJa must have J's shape")


def _check_taylor(D, H, op):
    for t in (D, H):
        _check_float(t, "tensors", op)
        if t.dtype != D.dtype:
            raise TypeError(f"torchhessdiag.{op}: dtypes differ ({t.dtype} vs {D.dtype})")
        if t.device != D.device:
            raise ValueError(f"torchhessdiag.{op}: devices differ ({t.device} vs {D.device})")
    if H.dim() != 4:
        raise ValueError(f"torchhessdiag.{op}: H must be (n, N, K, w), got shape {tuple(H.shape)}")
    n, N, _, w = H.shape
    if not 1 <= n <= 4:
        raise ValueError(f"torchhessdiag.{op}: the jet order n = H.shape[0] must be 1..4, got {n}")
    if D.shape != (n, N, w):
        raise ValueError(f"torchhessdiag.{op}: D must be (n, N, w) = ({n}, {N}, {w}), got {tuple(D.shape)}")


def _check_taylor_backward(gY, D, H):
    _check_taylor(D, H, "taylor_act_backward")
    if gY.dtype != H.dtype:
        raise TypeError(f"torchhessdiag.taylor_act_backward: gY has dtype {gY.dtype} but H has {H.dtype}")
    if gY.device != H.device:
        raise ValueError(f"torchhessdiag.taylor_act_backward: gY is on {gY.device} but H is on {H.device}")
    if gY.shape != H.shape:
        raise ValueError(
            f"torchhessdiag.taylor_act_backward: gY must have H's shape {tuple(H.shape)}, got {tuple(gY.shape)}"
        )


def _check_mul_pair(w, g, d1, d2):
    _check_float(w, "w", "mul_pair")
    for t, name in ((g, "g"), (d1, "d1"), (d2, "d2")):
        _check_like(t, w, name, "mul_pair")


def _ref_forward(z, act, a, b):
    _check_forward(z, act, a, b)
    _warn_reference(z.device)
    y = torch_function(ActivationSpec(act, a, b))(z)
    return y.clone() if y is z else y


def _ref_derivatives(z, act, a, b, orders):
    _check_derivatives(z, act, a, b, orders)
    _warn_reference(z.device)
    d = reference.derivatives(z, act, a, b, max(orders))
    return torch.stack([d[k] for k in orders])


def _ref_grad(g, z, act, a, b, k):
    _check_grad(g, z, act, a, b, k)
    _warn_reference(z.device)
    # contiguous, as the compiled kernels (and the fake kernel) give it
    return (g * reference.derivatives(z, act, a, b, k)[k]).contiguous()


def _ref_jet_layer(J, s1, c, need_ja):
    _check_layer(J, s1, c, "jet_layer")
    _warn_reference(J.device)
    return reference.jet_layer(J, s1, c, need_ja)


def _shares_memory(a, b) -> bool:
    """Whether contiguous a and b overlap in memory (ATen's get_overlap_status != No; metadata
    only, so fake tensors work too)."""
    if a.numel() == 0 or b.numel() == 0 or not torch._C._is_alias_of(a, b):
        return False
    a0, b0 = a.storage_offset() * a.element_size(), b.storage_offset() * b.element_size()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _check_no_overlap(out, t, what, op):
    # as csrc/engine_ops.cpp check_no_overlap; a non-contiguous t is copied there, so never aliases
    if t.is_contiguous() and _shares_memory(out, t):
        raise ValueError(
            f"torchhessdiag.{op}: {what} shares memory with J, which this op overwrites while it "
            f"still reads {what}; pass {what}.clone(), or use the out-of-place jet_layer"
        )


def _check_layer_inplace(J, s1, c):
    _check_layer(J, s1, c, "jet_layer_")
    if not J.is_contiguous():
        raise ValueError("torchhessdiag.jet_layer_: J must be contiguous")
    _check_no_overlap(J, s1, "s1", "jet_layer_")
    _check_no_overlap(J, c, "c", "jet_layer_")


def _ref_jet_layer_(J, s1, c):
    _check_layer_inplace(J, s1, c)
    _warn_reference(J.device)
    Ja, acc = reference.jet_layer(J, s1, c, True)
    J.copy_(Ja)
    return acc


def _ref_jet_layer_backward(gJa, gacc, J, s1, c):
    _check_layer_backward(gJa, gacc, J, s1, c)
    _warn_reference(J.device)
    return reference.jet_layer_backward(gJa, gacc, J, s1, c)


def _ref_taylor_act(D, H):
    _check_taylor(D, H, "taylor_act")
    _warn_reference(H.device)
    return reference.taylor_act(D, H).contiguous()


def _ref_taylor_act_backward(gY, D, H):
    _check_taylor_backward(gY, D, H)
    _warn_reference(H.device)
    dD, dH = reference.taylor_act_backward(gY, D, H)
    return dD.contiguous(), dH.contiguous()


def _check_mul_pair_backward(g1, g2, w, g, d1, d2, d3):
    _check_float(w, "w", "mul_pair_backward")
    for t, name in ((g1, "g1"), (g2, "g2"), (g, "g"), (d1, "d1"), (d2, "d2"), (d3, "d3")):
        if t is not None:
            _check_like(t, w, name, "mul_pair_backward")


def _mul_pair_backward_math(g1, g2, w, g, d1, d2, d3):
    zero = torch.zeros_like(w)
    ow, og, zi = zero, zero, zero
    if g1 is not None:
        ow, zi = g1 * d1, g1 * d2
    if g2 is not None:
        t = g2 * g
        ow, zi, og = ow + t * d2, zi + t * d3, g2 * w * d2
    return ow, og, w * zi


def _ref_mul_pair_backward(g1, g2, w, g, d1, d2, d3):
    _check_mul_pair_backward(g1, g2, w, g, d1, d2, d3)
    _warn_reference(w.device)
    return tuple(t.contiguous() for t in _mul_pair_backward_math(g1, g2, w, g, d1, d2, d3))


def _ref_mul_pair(w, g, d1, d2):
    _check_mul_pair(w, g, d1, d2)
    _warn_reference(w.device)
    return (w * d1).contiguous(), (w * g * d2).contiguous()


_REF_KERNELS = {
    "mul_pair": _ref_mul_pair,
    "mul_pair_backward": _ref_mul_pair_backward,
    "jet_layer": _ref_jet_layer,
    "jet_layer_": _ref_jet_layer_,
    "jet_layer_backward": _ref_jet_layer_backward,
    "taylor_act": _ref_taylor_act,
    "taylor_act_backward": _ref_taylor_act_backward,
    "act_forward": _ref_forward,
    "act_derivatives": _ref_derivatives,
    "act_grad": _ref_grad,
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


# The same reference kernels as ops of their own, torchhessdiag_ref::<op>: what the compiled CUDA
# ops call on a GPU this build has no kernel image for (csrc/cuda_gate.h, _cuda_probe.py).
# CompositeExplicitAutograd: they serve any device (tests call them on the CPU).
# torchhessdiag_gatetest::<op> (CPU only, compiled kernels in C++): the same gate as the CUDA
# ops, deciding "reference" always -- the fallback path, testable without a GPU.
if COMPILED:
    _ref_def_lib = torch.library.Library("torchhessdiag_ref", "DEF")
    _gatetest_def_lib = torch.library.Library("torchhessdiag_gatetest", "DEF")
    for _name, _fn in _REF_KERNELS.items():
        if _name == "act_forward":
            continue  # the compiled act_forward (ATen's own function) serves every device
        _ref_def_lib.define(SCHEMAS[_name])
        _ref_def_lib.impl(_name, _fn, "CompositeExplicitAutograd")
        _gatetest_def_lib.define(SCHEMAS[_name])


# ---- fake (meta) kernels, for torch.compile / export -----------------------------------------


@torch.library.register_fake("torchhessdiag::act_forward")
def _(z, act, a, b):
    _check_forward(z, act, a, b)
    return torch.empty_like(z)  # ATen's elementwise kernels keep the input's layout


@torch.library.register_fake("torchhessdiag::act_derivatives")
def _(z, act, a, b, orders):
    _check_derivatives(z, act, a, b, orders)
    return z.new_empty((len(orders), *z.shape))


@torch.library.register_fake("torchhessdiag::act_grad")
def _(g, z, act, a, b, k):
    _check_grad(g, z, act, a, b, k)
    return torch.empty_like(z, memory_format=torch.contiguous_format)


@torch.library.register_fake("torchhessdiag::mul_pair")
def _(w, g, d1, d2):
    _check_mul_pair(w, g, d1, d2)
    return (
        torch.empty_like(w, memory_format=torch.contiguous_format),
        torch.empty_like(w, memory_format=torch.contiguous_format),
    )


@torch.library.register_fake("torchhessdiag::mul_pair_backward")
def _(g1, g2, w, g, d1, d2, d3):
    _check_mul_pair_backward(g1, g2, w, g, d1, d2, d3)
    cf = torch.contiguous_format
    return tuple(torch.empty_like(w, memory_format=cf) for _ in range(3))


@torch.library.register_fake("torchhessdiag::jet_layer")
def _(J, s1, c, need_ja):
    _check_layer(J, s1, c, "jet_layer")
    Ja = torch.empty_like(J, memory_format=torch.contiguous_format) if need_ja else J.new_empty((0,))
    return Ja, J.new_empty((c.shape[0], J.shape[0], J.shape[1]))


@torch.library.register_fake("torchhessdiag::jet_layer_")
def _(J, s1, c):
    _check_layer_inplace(J, s1, c)
    return J.new_empty((c.shape[0], J.shape[0], J.shape[1]))


@torch.library.register_fake("torchhessdiag::jet_layer_backward")
def _(gJa, gacc, J, s1, c):
    _check_layer_backward(gJa, gacc, J, s1, c)
    cf = torch.contiguous_format
    return (
        torch.empty_like(J, memory_format=cf),
        torch.empty_like(s1, memory_format=cf),
        torch.empty_like(c, memory_format=cf),
    )


@torch.library.register_fake("torchhessdiag::taylor_act")
def _(D, H):
    _check_taylor(D, H, "taylor_act")
    return torch.empty_like(H, memory_format=torch.contiguous_format)


@torch.library.register_fake("torchhessdiag::taylor_act_backward")
def _(gY, D, H):
    _check_taylor_backward(gY, D, H)
    cf = torch.contiguous_format
    return torch.empty_like(D, memory_format=cf), torch.empty_like(H, memory_format=cf)


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
    autograd of the activation ops (csrc/jet_autograd.h) calls it past the table. Registered as
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
    # compiled: the autograd of these three is C++, at the Autograd key (csrc/jet_autograd.h), with
    # the same formulas and the same derivative caching; this Python version serves the
    # reference backend
    torch.library.register_autograd("torchhessdiag::act_forward", _fwd_backward, setup_context=_fwd_setup)
    torch.library.register_autograd("torchhessdiag::act_grad", _grad_backward, setup_context=_grad_setup)
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
    derivatives come from the stable derivative table (orders 1-4, evaluated once per
    application and kept for every later backward pass) and an exact composite path beyond.
    Second derivatives never come back ``None``: they are zeros where they vanish.

    Args:
        x: float32 or float64 tensor, any shape, any device.
        act: a name from ``torchhessdiag.activations.NAMES`` (e.g. ``"tanh"``) or of a
            registered user activation, an :class:`~torchhessdiag.activations.ActivationSpec`,
            or a supported module.
        **params: the activation's parameters, e.g. ``beta=2.0`` for softplus.
    """
    spec = make_spec(act, **params)
    check_float_tensor(x, "x", "torchhessdiag.activation")
    if spec.is_user:
        return _custom.apply(x, spec)
    return _ops.act_forward(x, spec.name, spec.a, spec.b)


def activation_derivatives(x: Tensor, act, order: int = 2, orders: Optional[Sequence[int]] = None, **params) -> Tensor:
    """Derivatives of an activation at ``x``, stacked: shape ``(len(orders),) + x.shape``.

    By default the orders are ``0, 1, ..., order``. Orders up to 4 come from the fused derivative
    table in one pass; higher orders from exact nested autograd of torch's own function. For a
    registered user activation the orders come from its callables (beyond the last one given,
    exact autograd of that one). The result is differentiable with respect to ``x`` (to any order).
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
    CUDA), ``cuda_archs`` (the GPU architectures those kernels were compiled for, e.g.
    ``"sm_80 sm_90 compute_90"``), ``cuda_fallback`` (``{"cuda:i": why}`` for the GPUs found to
    have no kernel image in this build, which run the reference kernels -- see
    torchhessdiag/_cuda_probe.py; filled at the first op call on each GPU), ``devices``
    (``"compiled"`` or ``"reference"`` per device type; ``"cuda"`` is ``"reference"`` also when
    any GPU is in ``cuda_fallback``), ``load_error`` (why the extension did not load, if it did
    not), ``max_order``, ``activations`` (the table), ``user_activations`` (the names
    registered with ``register_activation``), ``cpu_isa`` (the instruction set of the CPU kernels:
    ``"avx512"``, ``"avx2"`` or ``"scalar"``) and ``cache_bytes`` (CPU memory kept for reuse by
    the fused MLP op and the activation ops, see :func:`empty_cache`).
    """
    from . import __version__, _cuda_probe
    from .activations import NAMES

    fallback = _cuda_probe.fallback_devices()

    return {
        "version": __version__,
        "torch": torch.__version__,
        "compiled": COMPILED,
        "cuda_kernels": CUDA_KERNELS,
        "forced_reference": FORCED_REFERENCE,
        "cuda_archs": _cuda_probe.compiled_archs(),
        "cuda_fallback": fallback,
        "load_error": LOAD_ERROR,
        "devices": {
            "cpu": "compiled" if COMPILED else "reference",
            "cuda": "compiled" if CUDA_KERNELS and not fallback else "reference",
        },
        "max_order": MAX_ORDER,
        "activations": tuple(_C.activations()) if COMPILED else NAMES,
        "user_activations": _custom.registered_names(),
        "cpu_isa": _C.cpu_isa() if COMPILED else None,
        "cache_bytes": _C.cache_bytes() if COMPILED else 0,
    }


def empty_cache() -> int:
    """Release the CPU buffers kept for reuse between calls: the fused MLP op's rows saved for the
    backward, and the outputs of the activation ops behind the ``torchhessdiag.nn`` drop-ins (their
    kept derivatives and the products of their backward passes). A buffer is handed out again only
    once nothing refers to it any more, instead of being allocated -- and page-faulted -- again.
    Returns the bytes released. Buffers still held by a graph are kept until it is freed. Like
    ``torch.cuda.empty_cache()``: for memory, never needed for correctness."""
    return int(_C.empty_cache()) if COMPILED else 0
