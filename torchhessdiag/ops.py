"""Python face of the torchhessdiag ops: the functional API, and the one import that sets the ops up.

The ops (schemas: _schemas.py; kernels: csrc/act_ops.cpp, engine_ops.cpp, taylor_ops.cpp)::

    act_forward(z, act, a, b)                 sigma(z)                       (ATen's own kernel)
    act_derivatives(z, act, a, b, orders)     stack of sigma^(k)(z), k in orders, one table pass
    act_grad(g, z, act, a, b, k)              g * sigma^(k)(z)
    mul_pair(w, g, d1, d2)                    (w * d1, w * g * d2)           (arithmetic only)
    mul_pair_backward(g1, g2, w, g, d1, d2, d3)  its backward w.r.t. w, g and z (d2 = d1', d3 = d2')
    act_beyond_table(z, act, a, b, n)         sigma^(n)(z) past the table: exact composite path
    jet_layer(J, s1, c, need_ja)              the engine's per-layer kernel (engine_ops.h)
    jet_layer_(J, s1, c)                      the same, in place
    jet_layer_backward(gJa, gacc, J, s1, c)   its fused backward
    taylor_act(D, H)                          Faa di Bruno over a Taylor jet, orders 1..4 (taylor_ops.h)
                                              (csrc/taylor.h; D = sigma^(1..n)(h0) from the table)
    taylor_act_backward(gY, D, H)             its fused backward

Autograd chains them so that differentiating the order-k derivative gives order k+1:
``act_forward`` backpropagates through ``act_grad(k=1)``; the backward of ``act_grad`` is the fused
pair (w sigma^(k), w g sigma^(k+1)) (``mul_pair``), whose backward is ``mul_pair_backward``.
Nested-autograd loops revisit every node once per input dimension: the derivatives of one
activation are evaluated once (sigma', sigma'', sigma''' in one table pass) and every later visit
is pure arithmetic on them. With the compiled extension this autograd is C++
(csrc/act_autograd.h: no Python per backward node); the Python version (_op_autograd.py) serves the
reference backend, with the same formulas and per-node caching. Orders beyond the table (> 4) come from an
exact composite path (``_beyond_table``, as the op ``act_beyond_table`` for the C++ side).

Backends: the compiled extension ``torchhessdiag._C`` provides CPU kernels and, when built with
CUDA, CUDA kernels. Where no compiled kernel exists (extension missing, CPU-only build with CUDA
tensors, other devices) the same ops run the pure-PyTorch reference (torchhessdiag/reference.py)
with the same argument checks, and warn once. A GPU that the CUDA kernels were not compiled for
is found at its first op call and served by the same reference kernels (``torchhessdiag_ref::*``,
see _cuda_probe.py), with one warning. ``TORCHHESSDIAG_BACKEND=reference`` forces the reference
everywhere.

Where things are, in import order (each module imports only those before it):

    _backend.py             loading the extension (or defining the ops for the reference), the
                            dispatch keys of the reference kernels, the no-compiled-kernel warning
    _checks.py              the ops' argument checks (as the C++ ones), check_float_tensor
    _reference_kernels.py   the reference kernels and their registration (torchhessdiag_ref::*)
    _fake_kernels.py        the fake kernels, for torch.compile / export
    _op_autograd.py         derivatives of any order (_derivs) and the ops' autograd formulas
    ops.py                  this module: activation, activation_derivatives, backend_info,
                            empty_cache; it re-exports the names other modules read from it
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

# isort: off
from . import custom as _custom
# the op layer, bottom up (importing it defines the ops and registers their kernels and autograd)
from . import _backend, _checks, _reference_kernels, _fake_kernels, _op_autograd  # noqa: F401
# isort: on
from ._backend import (  # noqa: F401  (re-exported: read as ops.<name> across the package and tests)
    _C,
    COMPILED,
    CUDA_KERNELS,
    FORCED_REFERENCE,
    LOAD_ERROR,
    _impl_lib,
    _ops,
    _ref_keys,
    _warn_reference,
)
from ._checks import check_float_tensor
from ._op_autograd import _derivs  # noqa: F401  (re-exported, as above)
from ._reference_kernels import _REF_KERNELS, _mul_pair_backward_math, _ref_jet_layer_  # noqa: F401
from .activations import make_spec
from .reference import MAX_ORDER

Tensor = torch.Tensor


# ---- public functional API -------------------------------------------------------------------


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
    kept derivatives and the products of their backward passes). A buffer goes back to the pool
    when its tensor is freed and is handed out again from there, instead of being allocated -- and
    page-faulted -- again. Returns the bytes released: the free buffers now, those still held by a
    tensor or graph when it is freed. Like ``torch.cuda.empty_cache()``: for memory, never needed
    for correctness."""
    return int(_C.empty_cache()) if COMPILED else 0
