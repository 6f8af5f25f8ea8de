"""Exact replacements for the torch functions whose higher derivatives torch gets wrong (or cannot
take), used while the autograd fallback differentiates ``f``.

The autograd fallback (torchhessdiag/general.py) is as exact as torch's derivative rules of the
ops f uses. Some of those rules are wrong or missing at higher orders (torch 2.13, CPU, float64,
against the same function written with elementary ops; see tests/general/test_fallback.py):

* ``F.layer_norm``: nested reverse mode is wrong from the 3rd derivative on (10-100 %), nested
  forward mode from the 2nd (pytorch/pytorch#196700, umbrella #198017);
* ``F.instance_norm`` (per point and channel, over the spatial dims): the same;
* ``F.scaled_dot_product_attention`` on 4-d inputs picks the flash kernel on the CPU, whose
  backward has no derivative ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu
  _backward is not implemented"); ``nn.MultiheadAttention`` calls it with ``need_weights=False``.

:class:`ExactDerivatives` is a ``TorchFunctionMode`` (per thread, active only during the fallback's
own calls of f) that runs, instead:

* layer_norm / instance_norm: their definitions in elementary ops ((h - mean) * rsqrt(var + eps),
  affine), whose derivatives torch composes exactly to any order;
* scaled_dot_product_attention: torch's own math backend (``aten::_scaled_dot_product_attention_
  math``: matmul, softmax, matmul), differentiable to any order;
* ``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` calls): the same function
  with ``need_weights=True``, which is torch's explicit bmm / softmax path (the weights are dropped
  again when the caller did not ask for them).

The values agree with torch's kernels to rounding. One difference: instance_norm with running
statistics and ``use_input_stats=True`` does not update the running statistics here.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["ExactDerivatives", "REPLACED"]


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *args, **kwargs):
    """F.layer_norm in elementary ops."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    dims = tuple(range(-len(shape), 0))
    c = input - input.mean(dims, keepdim=True)
    y = c * torch.rsqrt((c * c).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True, momentum=0.1, eps=1e-5):
    """F.instance_norm in elementary ops (normalise each point's channel over the spatial dims)."""
    shape = (1, -1) + (1,) * (input.dim() - 2)
    if use_input_stats:
        dims = tuple(range(2, input.dim()))
        c = input - input.mean(dims, keepdim=True)
        y = c * torch.rsqrt((c * c).mean(dims, keepdim=True) + eps)
    else:
        y = (input - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


_SDPA_SIG = inspect.signature(lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False: None)


def scaled_dot_product_attention(*args, **kwargs):
    """F.scaled_dot_product_attention by torch's math backend (differentiable to any order)."""
    b = _SDPA_SIG.bind(*args, **kwargs)
    b.apply_defaults()
    a = b.arguments
    return torch.ops.aten._scaled_dot_product_attention_math(
        a["query"], a["key"], a["value"], a["attn_mask"], a["dropout_p"], a["is_causal"], scale=a["scale"], enable_gqa=a["enable_gqa"]
    )[0]


_MHA_SIG = inspect.signature(F.multi_head_attention_forward)


def _mha_explicit(func: Callable, args, kwargs):
    """F.multi_head_attention_forward through torch's explicit path: with need_weights=True it
    computes bmm -> softmax -> bmm itself instead of calling scaled_dot_product_attention (which
    this mode could not replace there: a mode is popped while its handler runs)."""
    b = _MHA_SIG.bind(*args, **kwargs)
    b.apply_defaults()
    wanted = b.arguments["need_weights"]
    b.arguments["need_weights"] = True
    out, weights = func(*b.args, **b.kwargs)
    return out, (weights if wanted else None)


#: the replaced torch functions -> their exact stand-ins
REPLACED: Dict[Any, Callable] = {
    F.layer_norm: layer_norm,
    torch.layer_norm: layer_norm,
    F.instance_norm: instance_norm,
    torch.instance_norm: instance_norm,
    F.scaled_dot_product_attention: scaled_dot_product_attention,
}


class ExactDerivatives(TorchFunctionMode):
    """Run the functions of :data:`REPLACED` (and ``F.multi_head_attention_forward``) with exact
    higher derivatives while active (this thread only)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sub: Optional[Callable] = REPLACED.get(func)
        if sub is not None:
            return sub(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            return _mha_explicit(func, args, kwargs)
        return func(*args, **kwargs)
