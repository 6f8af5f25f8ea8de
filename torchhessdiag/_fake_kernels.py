"""Fake (meta) kernels of the torchhessdiag ops, for torch.compile and export: the same argument
checks as the real kernels, and outputs of the right shape, dtype and layout.

Import direction: above ``_checks`` (and ``_backend``, which defines the ops); below ``ops``.
"""

from __future__ import annotations

import torch

from . import _backend  # noqa: F401  (defines the ops these kernels are registered for)
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
