"""The activation rule: Faa di Bruno's formula (:func:`activation_jet`: ``reference.faa_di_bruno``,
the one Python spelling of it, or the fused ``taylor_act`` op when every coefficient is per point)
and the rule of a table activation (the one-pass ``jet2.act`` for the collapsed second order).

Sits above _jet and the op layer (ops, jet2); taylor_nn's scalar functions use activation_jet too.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch

from . import jet2, ops, reference
from ._jet import Context, Jet, _fix, _fma, _wsum
from .activations import ActivationSpec
from .ops import MAX_ORDER  # the table's last order (csrc/activations.h kMaxOrder)

Tensor = torch.Tensor

# the fused Faa di Bruno op (csrc/taylor.h), when this build has it
_TAYLOR_ACT = getattr(torch.ops.torchhessdiag, "taylor_act", None)


# ---- the activation rule: Faa di Bruno ----------------------------------------------------------


def activation_jet(
    D: Sequence[Optional[Tensor]],
    H: Sequence[Optional[Tensor]],
    collapsed: bool = False,
    weights: Optional[Tensor] = None,
) -> List[Optional[Tensor]]:
    """Coefficients of sigma(h) from sigma's derivatives at h0 and h's coefficients.

    Args:
        D: [sigma'(h0), sigma''(h0), ..., sigma^(n)(h0)], each shaped like the value (N, *S);
            ``None`` for a derivative that is identically zero (piecewise-linear activations).
        H: [h1, ..., hn]: h1 is (N, K, *S) or shared (K, *S); h2.. are (N, K, *S) or ``None``
            (zero). With ``collapsed`` the last one is the weighted sum s = sum_k w_k h_n[k],
            (N, *S) or None.
        collapsed: return [y1, ..., y_(n-1), s_y] with s_y = sum_k w_k y_n[k], computed as
            sum_k w_k (y_n[k] without its sigma' h_n term) + sigma' s -- h_n enters y_n only
            through sigma' h_n, so the sum needs no per-direction h_n (n = 2: s_y = sigma''
            sum_k w_k h1_k^2 + sigma' s).
        weights: w (K,) of the collapsed sum; None for all ones.

    Returns:
        [y1, ..., yn] (``None`` where identically zero):

            y1 = s1 h1
            y2 = s2 h1^2 + s1 h2
            y3 = s3 h1^3 + 3 s2 h1 h2 + s1 h3
            y4 = s4 h1^4 + 6 s3 h1^2 h2 + s2 (3 h2^2 + 4 h1 h3) + s1 h4

    This is the whole combination step of the jet propagation. When every coefficient is a
    per-point tensor (after the first nonlinearity) and no derivative is structurally zero, it
    runs the fused ``taylor_act`` op (csrc/taylor.h: one pass over the jet, fused backward; for a
    collapsed n >= 3 with h_n = 0, then the weighted sum of y_n); otherwise -- shared or zero
    coefficients before the first nonlinearity, where most terms vanish, piecewise-linear
    activations, the collapsed second order -- the same formulas in torch ops.
    """
    n = len(H)
    if len(D) != n:
        raise ValueError(f"activation_jet: {len(D)} derivatives for {n} coefficients")
    if n > MAX_ORDER:
        raise ValueError(f"activation_jet: order {n} > {MAX_ORDER}")
    if collapsed and n < 2:
        raise ValueError("activation_jet: collapsed jets are of order >= 2")
    vdim = next(t for t in D if t is not None).dim()
    lower = H[:-1] if collapsed else H  # the per-direction coefficients
    if (
        (not collapsed or n >= 3)
        and _TAYLOR_ACT is not None
        and all(t is not None for t in D)
        and all(h is not None and h.dim() == vdim + 1 for h in lower)
    ):
        N, K = H[0].shape[0], H[0].shape[1]
        Dm = torch.stack([t.reshape(N, -1) for t in D])  # (n, N, w)
        hs = [h.reshape(N, K, -1) for h in lower]
        if collapsed:
            hs.append(torch.zeros_like(hs[0]))  # y_n without sigma' h_n
        Hm = torch.stack(hs)  # (n, N, K, w)
        Y = [y.reshape(H[0].shape) for y in _TAYLOR_ACT(Dm, Hm).unbind(0)]
        if collapsed:
            Y[-1] = _fma(_wsum(Y[-1], vdim, weights), D[0], H[-1])
        return Y
    if collapsed and n == 2:
        return list(jet2.act_combine(D[0], D[1], H[0], H[1], weights))
    d = [None if t is None else t.unsqueeze(1) for t in D]
    # (collapsed: h_n left out, so out[-1] lacks sigma' h_n; added below)
    out = reference.faa_di_bruno(d, list(lower) + ([None] if collapsed else []))
    if collapsed:  # out[-1] lacks sigma' h_n (h_n was left out above): add sigma' s
        out[-1] = _fma(_wsum(out[-1], vdim, weights), D[0], H[-1])
    return out


def _rule_activation(ctx: Context, p: dict, x, *args, **kwargs) -> Any:
    # the parameters (beta, alpha, ...) are already in the spec, read when the graph was built
    spec: ActivationSpec = p["spec"]
    if not isinstance(x, Jet):
        return ops.activation(x, spec) if isinstance(x, Tensor) else x
    if spec.linear:
        return x
    n = ctx.order
    pwl = spec.piecewise_linear
    if pwl:
        ctx.piecewise_linear_seen = True
    if ctx.collapsed and n == 2:  # one pass (jet2.py), where it applies
        fused = jet2.act(x.value, x.coefs[0], x.coefs[1], spec, ctx.weights)
        if fused is not None:
            return Jet(fused[0], [fused[1], fused[2]])
    orders = [0, 1] if pwl else list(range(n + 1))
    Ds = ops._derivs(x.value, spec, orders)
    D: List[Optional[Tensor]] = list(Ds[1:]) + [None] * (n + 1 - len(Ds))
    coefs = activation_jet(D, x.coefs, collapsed=ctx.collapsed, weights=ctx.weights)
    vdim = x.value.dim()
    return Jet(Ds[0], [_fix(ctx, c, k, vdim) for k, c in enumerate(coefs, start=1)])
