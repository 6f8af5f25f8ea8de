"""The pure-PyTorch kernels of the torchhessdiag ops (torchhessdiag/reference.py behind the same
argument checks as the compiled ones), registered where no compiled kernel exists and as the ops
``torchhessdiag_ref::<op>`` for GPUs outside the build.

Import direction: above ``_backend`` and ``_checks``; below ``ops``.
"""

from __future__ import annotations

import torch

from . import reference
from ._backend import COMPILED, _impl_lib, _ref_keys, _warn_reference
from ._checks import (
    _check_derivatives,
    _check_forward,
    _check_grad,
    _check_layer,
    _check_layer_backward,
    _check_layer_inplace,
    _check_mul_pair,
    _check_mul_pair_backward,
    _check_taylor,
    _check_taylor_backward,
)
from ._schemas import SCHEMAS
from .activations import ActivationSpec, torch_function


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
    # contiguous, as the compiled kernels (and the fake kernel) give them: einsum's acc is not
    Ja, acc = reference.jet_layer(J, s1, c, need_ja)
    return Ja.contiguous(), acc.contiguous()


def _ref_jet_layer_(J, s1, c):
    _check_layer_inplace(J, s1, c)
    _warn_reference(J.device)
    Ja, acc = reference.jet_layer(J, s1, c, True)
    J.copy_(Ja)
    return acc.contiguous()


def _ref_jet_layer_backward(gJa, gacc, J, s1, c):
    _check_layer_backward(gJa, gacc, J, s1, c)
    _warn_reference(J.device)
    return tuple(t.contiguous() for t in reference.jet_layer_backward(gJa, gacc, J, s1, c))


def _ref_taylor_act(D, H):
    _check_taylor(D, H, "taylor_act")
    _warn_reference(H.device)
    return reference.taylor_act(D, H).contiguous()


def _ref_taylor_act_backward(gY, D, H):
    _check_taylor_backward(gY, D, H)
    _warn_reference(H.device)
    dD, dH = reference.taylor_act_backward(gY, D, H)
    return dD.contiguous(), dH.contiguous()


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
