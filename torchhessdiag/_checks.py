"""Argument checks of the torchhessdiag ops, written once for the reference and the fake kernels,
and ``check_float_tensor`` for the public functions.

Import direction: bottom of the op layer (imports only torch, ``_registry`` and ``reference``); used by
``_reference_kernels``, ``_fake_kernels``, ``_op_autograd``, ``ops`` and the public entry points.
"""

from __future__ import annotations

import torch

from . import _registry
from .reference import MAX_ORDER


# The same argument checks as the C++ ops (csrc/act_ops_impl.h, csrc/engine_ops.h), with the same
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
    entry = _registry.TABLE.get(act)
    if entry is None:
        raise ValueError(f"torchhessdiag: unknown activation '{act}'; supported: {', '.join(_registry.TABLE_NAMES)}")
    # the parameters the C++ check_params refuses (only a first parameter has a constraint today)
    if entry.params and entry.params[0].nonzero and a == 0.0:
        raise ValueError(f"torchhessdiag: {act} needs {entry.params[0].name} != 0 (got 0)")


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


def _check_alike(tensors, op):
    """float32/float64, all of the first one's dtype and device."""
    first = tensors[0]
    for t in tensors:
        _check_float(t, "tensors", op)
        if t.dtype != first.dtype:
            raise TypeError(f"torchhessdiag.{op}: dtypes differ ({t.dtype} vs {first.dtype})")
        if t.device != first.device:
            raise ValueError(f"torchhessdiag.{op}: devices differ ({t.device} vs {first.device})")


def _check_layer(J, s1, c, op):
    _check_alike((J, s1, c), op)
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
    _check_alike((D, H), op)
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


def _check_mul_pair_backward(g1, g2, w, g, d1, d2, d3):
    _check_float(w, "w", "mul_pair_backward")
    for t, name in ((g1, "g1"), (g2, "g2"), (g, "g"), (d1, "d1"), (d2, "d2"), (d3, "d3")):
        if t is not None:
            _check_like(t, w, name, "mul_pair_backward")


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

