"""Jet rules for the pieces of transformer-style and normalised models: elementwise powers and
reciprocals, division by an input-dependent value, LayerNorm, RMSNorm, softmax / log_softmax over
feature dims, products of input-dependent matrices, scaled dot-product attention and
``nn.MultiheadAttention`` (``batch_first``).

Every rule is *composed* from the exact elementary rules (_rules_algebra, _rules_shape,
_rules_activation) -- linear maps, sums and means, Leibniz's rule for (bi)linear products, Faa di Bruno's formula for a scalar function of a
jet -- so each is exact to every order the jets carry (1-4) and is built from differentiable
torch ops (training gradients through it are exact too). Nothing here writes a derivative of
layer_norm or softmax by hand: layer norm is (h - mean h) * (var + eps)^(-1/2), softmax is
exp(h - c) / sum exp(h - c) with the constant c = max h (softmax does not depend on c), attention
is softmax(q k^T * scale + mask) v. The scalar functions t^p, log t and exp t enter through
:func:`_scalar`, which takes their derivatives in closed form (p (p-1) ... t^(p-k), ...).

Rows are points: every input-dependent value keeps the N points in its first dimension, and the
tokens of attention are slices of one point's features (``(N, L, E)``, ``batch_first``); a rule
that would mix points (a reduction or softmax over dim 0, an unbatched ``nn.MultiheadAttention``)
raises :class:`~torchhessdiag.graph.Unsupported`.

Sits above those rule modules and below taylor.py, whose ``RULES`` lists the rules defined here.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ._graph_program import ShapeError, Unsupported
from ._jet import Context, Jet, _feature_dim, _fix, _map, _point, _wsum
from ._rules_activation import activation_jet
from ._rules_algebra import (
    _add_sub,
    _product,
    _rule_div as _algebra_div,
    _rule_linear,
    _rule_matmul as _algebra_matmul,
    _rule_pow as _algebra_pow,
    _scale,
)
from ._rules_shape import _reduce

Tensor = torch.Tensor

__all__ = ["pow_jet", "bilinear", "softmax_jet", "layer_norm_jet", "rms_norm_jet", "sdpa_jet"]


# ---- scalar functions of a jet -------------------------------------------------------------------


def _scalar(ctx: Context, x: Jet, value: Tensor, derivs: List[Tensor]) -> Jet:
    """g(x) elementwise, from g(x0) = ``value`` and [g'(x0), ..., g^(n)(x0)] (Faa di Bruno)."""
    coefs = activation_jet(derivs, x.coefs, collapsed=ctx.collapsed, weights=ctx.weights)
    vdim = value.dim()
    return Jet(value, [_fix(ctx, c, k, vdim) for k, c in enumerate(coefs, start=1)])


def pow_jet(ctx: Context, x: Jet, p: float, shift: float = 0.0) -> Jet:
    """(x + shift)^p elementwise for a real p: g^(k)(u) = p (p-1) ... (p-k+1) u^(p-k)."""
    u = x.value + shift if shift else x.value
    if p == -0.5:
        value = torch.rsqrt(u)
    elif p == 0.5:
        value = torch.sqrt(u)
    elif p == -1.0:
        value = torch.reciprocal(u)
    else:
        value = torch.pow(u, p)
    inv = torch.reciprocal(u)
    derivs, d = [], value
    for k in range(1, ctx.order + 1):
        d = d * inv * (p - k + 1)
        derivs.append(d)
    return _scalar(ctx, x, value, derivs)


def log_jet(ctx: Context, x: Jet) -> Jet:
    """log x elementwise: g' = 1/u, g^(k) = -(k-1) g^(k-1) / u."""
    inv = torch.reciprocal(x.value)
    derivs, d = [inv], inv
    for k in range(2, ctx.order + 1):
        d = d * inv * float(-(k - 1))
        derivs.append(d)
    return _scalar(ctx, x, torch.log(x.value), derivs)


def exp_jet(ctx: Context, x: Jet) -> Jet:
    e = torch.exp(x.value)
    return _scalar(ctx, x, e, [e] * ctx.order)


# ---- (bi)linear products of input-dependent tensors --------------------------------------------


def _as_jet(ctx: Context, t: Any) -> Jet:
    if isinstance(t, Jet):
        return t
    if isinstance(t, Tensor):
        return Jet(t, [None] * ctx.order)
    raise Unsupported(f"node '{ctx.node}': an operand of type {type(t).__name__}")


def bilinear(ctx: Context, a: Any, b: Any, fn: Callable[[Tensor, Tensor], Tensor]) -> Any:
    """fn(a, b) for a map fn that is linear in each argument (matmul), by Leibniz's rule:
    y_k = sum_j C(k, j) fn(a_j, b_(k-j)); collapsed (top order n): s_y = fn(a0, s_b) + fn(s_a, b0)
    + sum_k w_k sum_(0<j<n) C(n, j) fn(a_j[k], b_(n-j)[k]) (n = 2: 2 sum_k w_k fn(a1_k, b1_k)).

    Either operand may be a constant tensor: one with fewer dims than the input-dependent values
    has no batch dimension (it broadcasts over the points); one with as many has (size N or 1).
    fn must treat leading dims as batch dims (torch.matmul does): the directions K are inserted as
    dim 1 of every coefficient."""
    ja, jb = isinstance(a, Jet), isinstance(b, Jet)
    if not (ja or jb):
        return fn(a, b)
    nd = (a.value if ja else b.value).dim()
    A, B = _as_jet(ctx, a), _as_jet(ctx, b)
    a0, b0 = A.value, B.value
    value = fn(a0, b0)
    vdim = value.dim()
    if value.dim() < 1 or value.shape[0] != ctx.N:
        raise Unsupported(f"node '{ctx.node}': the product's result {tuple(value.shape)} does not keep the points first")

    def lift(t: Tensor, jet: bool) -> Tensor:  # value layout -> broadcastable against (N, K, ...)
        if jet or t.dim() >= nd:
            return t.unsqueeze(1)
        return t

    def point(c: Optional[Tensor], v: Tensor) -> Optional[Tensor]:
        return None if c is None else _point(ctx, c, v.dim())

    a0l, b0l = lift(a0, ja), lift(b0, jb)
    n = ctx.order
    top_terms: List[Optional[Tensor]] = []
    coefs_in_a, coefs_in_b = list(A.coefs), list(B.coefs)
    if ctx.collapsed:  # the top is the weighted sum over directions: a0 s_b + s_a b0 + sum_k w_k (...)
        sa, sb = coefs_in_a.pop(), coefs_in_b.pop()
        top_terms = [fn(a0, sb) if sb is not None else None, fn(sa, b0) if sa is not None else None]
    Ac = [a0l] + [point(c, a0) for c in coefs_in_a]
    Bc = [b0l] + [point(c, b0) for c in coefs_in_b]
    coefs = []
    for k in range(1, len(Ac)):
        terms = []
        for j in range(k + 1):
            if Ac[j] is None or Bc[k - j] is None:
                continue
            t = fn(Ac[j], Bc[k - j])
            c = math.comb(k, j)
            terms.append(t * float(c) if c != 1 else t)
        coefs.append(_fix(ctx, _sum(terms), k, vdim))
    if ctx.collapsed:
        cross = []
        for j in range(1, n):
            if Ac[j] is not None and Bc[n - j] is not None:
                cross.append(fn(Ac[j], Bc[n - j]) * float(math.comb(n, j)))
        top_terms.append(_wsum(_sum(cross), vdim, ctx.weights))
        coefs.append(_fix(ctx, _sum(top_terms), n, vdim))
    return Jet(value, coefs)


def _sum(terms: Sequence[Optional[Tensor]]) -> Optional[Tensor]:
    out = None
    for t in terms:
        if t is not None:
            out = t if out is None else out + t
    return out


def _transpose(ctx: Context, x: Any, d0: int, d1: int) -> Any:
    if not isinstance(x, Jet):
        return x.transpose(d0, d1)
    nd = x.value.dim()
    a, b = _feature_dim(ctx, d0, nd), _feature_dim(ctx, d1, nd)
    return _map(x, lambda t, off: t.transpose(a - 1 + off, b - 1 + off))


def _rule_transpose(ctx: Context, p: dict, x, dim0, dim1) -> Any:
    return _transpose(ctx, x, dim0, dim1)


def _rule_mT(ctx: Context, p: dict, x, attr=None) -> Any:
    return _transpose(ctx, x, -2, -1)


def _rule_permute(ctx: Context, p: dict, x, *dims, **kw) -> Any:
    if "dims" in kw:
        dims = (kw.pop("dims"),)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list, torch.Size)):
        dims = tuple(dims[0])
    nd = x.value.dim()
    if len(dims) != nd:
        raise Unsupported(f"node '{ctx.node}': permute with {len(dims)} dims of a {nd}-d value")
    ds = [int(d) + nd if int(d) < 0 else int(d) for d in dims]
    if ds[0] != 0:
        raise Unsupported(f"node '{ctx.node}': permute moves the batch dimension ({dims})")
    feat = [d - 1 for d in ds[1:]]
    return _map(x, lambda t, off: t.permute(tuple(range(off)) + tuple(e + off for e in feat)))


def _rule_matmul(ctx: Context, p: dict, a, b) -> Any:
    """(jet) @ (constant matrix) as before; otherwise a batched product of per-point matrices
    (jet @ jet, constant @ jet), both sides with the points first and >= 3 dims."""
    if isinstance(a, Jet) and not isinstance(b, Jet) and isinstance(b, Tensor) and b.dim() in (1, 2):
        return _algebra_matmul(ctx, p, a, b)
    av = a.value if isinstance(a, Jet) else a
    bv = b.value if isinstance(b, Jet) else b
    if not isinstance(av, Tensor) or not isinstance(bv, Tensor):
        raise Unsupported(f"node '{ctx.node}': matmul with a non-tensor operand")
    for t, is_jet in ((av, isinstance(a, Jet)), (bv, isinstance(b, Jet))):
        if is_jet and t.dim() < 3:
            raise Unsupported(
                f"node '{ctx.node}': matmul of an input-dependent {t.dim()}-d value with another input-dependent "
                "or constant matrix mixes the points; per-point matrices need shape (N, ..., rows, cols)"
            )
    return bilinear(ctx, a, b, torch.matmul)


# ---- elementwise powers, reciprocals, division ---------------------------------------------------


def _rule_sqrt(ctx: Context, p: dict, x) -> Any:
    return pow_jet(ctx, x, 0.5)


def _rule_rsqrt(ctx: Context, p: dict, x) -> Any:
    return pow_jet(ctx, x, -0.5)


def _rule_reciprocal(ctx: Context, p: dict, x) -> Any:
    return pow_jet(ctx, x, -1.0)


def _rule_div(ctx: Context, p: dict, a, b, rounding_mode=None) -> Any:
    if not isinstance(b, Jet):
        return _algebra_div(ctx, p, a, b, rounding_mode=rounding_mode)
    if rounding_mode is not None:
        raise Unsupported(f"node '{ctx.node}': division with rounding_mode={rounding_mode!r}")
    r = pow_jet(ctx, b, -1.0)
    if isinstance(a, Jet):
        out = _product(ctx, a, r)
    else:
        value = torch.mul(a, r.value)
        out = _scale(ctx, r, a, torch.mul, value)
    return Jet(torch.div(a.value if isinstance(a, Jet) else a, b.value), out.coefs)


def _rule_pow(ctx: Context, p: dict, base, exponent) -> Any:
    e = exponent
    if isinstance(e, Tensor) and e.dim() == 0 and not isinstance(base, Jet):
        return _algebra_pow(ctx, p, base, exponent)
    if isinstance(e, Tensor) and e.dim() == 0:
        e = e.item()
    if isinstance(base, Jet) and isinstance(e, (int, float)) and not isinstance(e, bool):
        if e == int(e) and e >= 0:
            return _algebra_pow(ctx, p, base, exponent)
        out = pow_jet(ctx, base, float(e))
        return Jet(torch.pow(base.value, exponent), out.coefs)
    return _algebra_pow(ctx, p, base, exponent)


# ---- softmax -------------------------------------------------------------------------------------


def softmax_jet(ctx: Context, x: Jet, dim: Any, log: bool = False) -> Jet:
    """softmax (log_softmax) over a feature dim: exp(h - c) / sum exp(h - c) with c = max h as
    a constant (the result does not depend on c, so its derivatives do not either)."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise Unsupported(f"node '{ctx.node}': softmax with dim={dim!r} (give the feature dim explicitly)")
    d = _feature_dim(ctx, dim, x.value.dim())
    c = x.value.detach().amax(d, keepdim=True)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))  # a row of -inf (all masked)
    z = _add_sub(ctx, x, c, -1.0, None)
    e = exp_jet(ctx, z)
    s = _reduce(ctx, e, torch.sum, d, True, None)
    if log:
        out = _add_sub(ctx, z, log_jet(ctx, s), -1.0, None)
        return Jet(torch.log_softmax(x.value, d), out.coefs)
    out = _product(ctx, e, pow_jet(ctx, s, -1.0))
    return Jet(torch.softmax(x.value, d), out.coefs)


def _softmax_args(ctx: Context, x, dim, dtype, what: str):
    if dtype is not None:
        raise Unsupported(f"node '{ctx.node}': {what} with dtype=")
    return dim


def _rule_softmax(ctx: Context, p: dict, x, dim=None, _stacklevel=3, dtype=None) -> Any:
    _softmax_args(ctx, x, dim, dtype, "softmax")
    return softmax_jet(ctx, x, dim) if isinstance(x, Jet) else torch.softmax(x, dim)


def _rule_log_softmax(ctx: Context, p: dict, x, dim=None, _stacklevel=3, dtype=None) -> Any:
    _softmax_args(ctx, x, dim, dtype, "log_softmax")
    return softmax_jet(ctx, x, dim, log=True) if isinstance(x, Jet) else torch.log_softmax(x, dim)


def _rule_softmax_module(ctx: Context, p: dict, m, x) -> Any:
    return _rule_softmax(ctx, p, x, m.dim)


def _rule_log_softmax_module(ctx: Context, p: dict, m, x) -> Any:
    return _rule_log_softmax(ctx, p, x, m.dim)


# ---- LayerNorm, RMSNorm --------------------------------------------------------------------------


def _norm_dims(ctx: Context, x: Jet, normalized_shape, what: str) -> List[int]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    nd = x.value.dim()
    if len(shape) >= nd:
        raise Unsupported(
            f"node '{ctx.node}': {what} over {len(shape)} dims of a {nd}-d value would normalise over the points"
        )
    if tuple(x.value.shape[nd - len(shape):]) != shape:
        raise ShapeError(
            f"{what} (node '{ctx.node}') normalises over the last dims of shape {shape}, but the value it "
            f"gets has shape {tuple(x.value.shape)}"
        )
    return list(range(nd - len(shape), nd))


def _affine(ctx: Context, y: Jet, weight, bias) -> Jet:
    if isinstance(weight, Jet) or isinstance(bias, Jet):
        raise Unsupported(f"node '{ctx.node}': a normalisation with input-dependent weight or bias")
    if weight is not None:
        y = _scale(ctx, y, weight, torch.mul, y.value * weight)
    if bias is not None:
        y = _add_sub(ctx, y, bias, 1.0, None)
    return y


def layer_norm_jet(ctx: Context, x: Jet, normalized_shape, weight=None, bias=None, eps: float = 1e-5, name: str = "layer_norm") -> Jet:
    """(h - mean h) (var h + eps)^(-1/2) weight + bias over the trailing ``normalized_shape``."""
    dims = _norm_dims(ctx, x, normalized_shape, name)
    mu = _reduce(ctx, x, torch.mean, dims, True, None)
    c = _add_sub(ctx, x, mu, -1.0, None)
    var = _reduce(ctx, _product(ctx, c, c), torch.mean, dims, True, None)
    y = _product(ctx, c, pow_jet(ctx, var, -0.5, shift=float(eps)))
    y = _affine(ctx, y, weight, bias)
    value = F.layer_norm(x.value, tuple(x.value.shape[dims[0]:]), weight, bias, eps)
    return Jet(value, y.coefs)


def rms_norm_jet(ctx: Context, x: Jet, normalized_shape, weight=None, eps: Optional[float] = None, name: str = "rms_norm") -> Jet:
    """h (mean h^2 + eps)^(-1/2) weight over the trailing ``normalized_shape`` (eps None: the
    dtype's machine epsilon, as torch)."""
    dims = _norm_dims(ctx, x, normalized_shape, name)
    if eps is None:
        eps = torch.finfo(x.value.dtype).eps
    ms = _reduce(ctx, _product(ctx, x, x), torch.mean, dims, True, None)
    y = _product(ctx, x, pow_jet(ctx, ms, -0.5, shift=float(eps)))
    return _affine(ctx, y, weight, None)


def _rule_layer_norm(ctx: Context, p: dict, x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True) -> Any:
    if not isinstance(x, Jet):
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    return layer_norm_jet(ctx, x, normalized_shape, weight, bias, eps)


def _rule_layer_norm_module(ctx: Context, p: dict, m, x) -> Any:
    if not isinstance(x, Jet):
        return m(x)
    return layer_norm_jet(ctx, x, m.normalized_shape, m.weight, m.bias, m.eps, name=f"LayerNorm '{p.get('name', ctx.node)}'")


def _rule_rms_norm(ctx: Context, p: dict, x, normalized_shape, weight=None, eps=None) -> Any:
    if not isinstance(x, Jet):
        return F.rms_norm(x, normalized_shape, weight, eps)
    return rms_norm_jet(ctx, x, normalized_shape, weight, eps)


def _rule_rms_norm_module(ctx: Context, p: dict, m, x) -> Any:
    if not isinstance(x, Jet):
        return m(x)
    return rms_norm_jet(ctx, x, m.normalized_shape, m.weight, m.eps, name=f"RMSNorm '{p.get('name', ctx.node)}'")


# ---- attention -----------------------------------------------------------------------------------


def _add_mask(ctx: Context, s: Jet, mask: Tensor) -> Jet:
    """s + mask for a constant additive mask (0 / -inf or any float). A -inf entry makes the
    value -inf and leaves the (finite) coefficients alone: exp then gives exactly 0 there, for the
    value and for every coefficient (each is exp(value) times a polynomial of them)."""
    return _add_sub(ctx, s, mask, 1.0, None)


def _bool_to_additive(mask: Tensor, dtype: torch.dtype, allowed_when: bool) -> Tensor:
    keep = mask if allowed_when else ~mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~keep, float("-inf"))


def sdpa_jet(ctx: Context, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> Any:
    """softmax(q k^T * scale + mask) v, torch's F.scaled_dot_product_attention (its math
    backend), for per-point q (N, ..., L, E), k (N, ..., S, E), v (N, ..., S, Ev)."""
    if dropout_p:
        raise NotImplementedError(
            f"scaled_dot_product_attention with dropout_p={dropout_p} is random and has no Hessian; pass dropout_p=0 "
            "(e.g. put the model in eval mode)"
        )
    if enable_gqa:
        raise Unsupported(f"node '{ctx.node}': scaled_dot_product_attention with enable_gqa=True")
    for t, what in ((attn_mask, "attn_mask"), (scale, "scale")):
        if isinstance(t, Jet):
            raise Unsupported(f"node '{ctx.node}': an input-dependent {what}")
    qv = q.value if isinstance(q, Jet) else q
    kv = k.value if isinstance(k, Jet) else k
    for t, what in ((q, "query"), (k, "key"), (v, "value")):
        tv = t.value if isinstance(t, Jet) else t
        if isinstance(t, Jet) and tv.dim() < 3:
            raise Unsupported(
                f"node '{ctx.node}': attention over a {tv.dim()}-d input-dependent {what}: the tokens must be a "
                "dimension after the points, (N, ..., L, E)"
            )
    if qv.shape[-1] != kv.shape[-1]:
        raise ShapeError(
            f"scaled_dot_product_attention (node '{ctx.node}'): query has {qv.shape[-1]} features per head but key has {kv.shape[-1]}"
        )
    E = qv.shape[-1]
    sc = 1.0 / math.sqrt(E) if scale is None else float(scale)
    s = bilinear(ctx, q, _transpose(ctx, k, -2, -1) if isinstance(k, Jet) else k.transpose(-2, -1), torch.matmul)
    s = _scale(ctx, s, sc, torch.mul, s.value * sc)
    L, S = s.value.shape[-2], s.value.shape[-1]
    dt = s.value.dtype
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=s.value.device).tril()
        s = _add_mask(ctx, s, _bool_to_additive(causal, dt, allowed_when=True))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = _bool_to_additive(attn_mask, dt, allowed_when=True)
        s = _add_mask(ctx, s, attn_mask)
    return bilinear(ctx, softmax_jet(ctx, s, -1), v, torch.matmul)


def _rule_sdpa(
    ctx: Context, p: dict, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
) -> Any:
    if not any(isinstance(t, Jet) for t in (query, key, value)):
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    return sdpa_jet(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _split_heads(ctx: Context, t: Any, H: int) -> Any:
    """(N, L, E) -> (N, H, L, E / H)."""
    tv = t.value if isinstance(t, Jet) else t
    N, L, E = tv.shape
    shape = (N, L, H, E // H)
    if isinstance(t, Jet):
        t = _map(t, lambda c, off: c.reshape(tuple(c.shape[:off]) + shape[1:]), value=tv.reshape(shape))
        return _transpose(ctx, t, 1, 2)
    return tv.reshape(shape).transpose(1, 2)


def _rule_mha_module(
    ctx: Context,
    p: dict,
    m,
    query,
    key,
    value,
    key_padding_mask=None,
    need_weights=True,
    attn_mask=None,
    average_attn_weights=True,
    is_causal=False,
) -> Any:
    """nn.MultiheadAttention with batch_first=True, over the tokens of each point: the in
    projections, scaled dot-product attention per head, the out projection (torch's math path,
    F.multi_head_attention_forward). Returns (output, attention weights or None) like the module."""
    name = f"nn.MultiheadAttention '{p.get('name', ctx.node)}'"
    if not any(isinstance(t, Jet) for t in (query, key, value)):
        return m(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
                 average_attn_weights=average_attn_weights, is_causal=is_causal)
    if not m.batch_first:
        raise Unsupported(
            f"{name} has batch_first=False, so its inputs are (tokens, batch, features) and the points are not the first "
            "dimension; construct it with batch_first=True (inputs (N, tokens, features))"
        )
    if m.training and m.dropout > 0:
        raise NotImplementedError(
            f"{name} is in training mode with dropout={m.dropout}, so the network is random and has no Hessian; call "
            "model.eval()"
        )
    if m.bias_k is not None or m.bias_v is not None or m.add_zero_attn:
        raise Unsupported(f"{name} with add_bias_kv or add_zero_attn")
    for t, what in ((key_padding_mask, "key_padding_mask"), (attn_mask, "attn_mask")):
        if isinstance(t, Jet):
            raise Unsupported(f"{name}: an input-dependent {what}")
    for t, what in ((query, "query"), (key, "key"), (value, "value")):
        tv = t.value if isinstance(t, Jet) else t
        if tv.dim() != 3:
            raise Unsupported(
                f"{name}: {what} has shape {tuple(tv.shape)}; with the points first it must be (N, tokens, features) "
                "(an unbatched 2-d input would make the points the tokens)"
            )
    E, H = m.embed_dim, m.num_heads
    if m._qkv_same_embed_dim:
        Wq, Wk, Wv = m.in_proj_weight.chunk(3)
    else:
        Wq, Wk, Wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    bq = bk = bv = None
    if m.in_proj_bias is not None:
        bq, bk, bv = m.in_proj_bias.chunk(3)
    for t, W, what in ((query, Wq, "query"), (key, Wk, "key"), (value, Wv, "value")):
        tv = t.value if isinstance(t, Jet) else t
        if tv.shape[-1] != W.shape[1]:
            raise ShapeError(f"{name} takes {what} with {W.shape[1]} features, but gets shape {tuple(tv.shape)}")
    q = _rule_linear(ctx, {}, query, Wq, bq)
    k = _rule_linear(ctx, {}, key, Wk, bk)
    v = _rule_linear(ctx, {}, value, Wv, bv)
    qv = q.value if isinstance(q, Jet) else q
    kv = k.value if isinstance(k, Jet) else k
    N, L, _ = qv.shape
    S = kv.shape[1]
    dt = qv.dtype
    mask = None
    if attn_mask is not None:
        am = _bool_to_additive(attn_mask, dt, allowed_when=False) if attn_mask.dtype == torch.bool else attn_mask.to(dt)
        if am.dim() == 3:  # (N * H, L, S)
            am = am.reshape(N, H, L, S)
        mask = am
    elif is_causal:
        raise ValueError(f"{name}: is_causal=True needs attn_mask (as torch's MultiheadAttention)")
    if key_padding_mask is not None:
        kp = key_padding_mask
        kp = _bool_to_additive(kp, dt, allowed_when=False) if kp.dtype == torch.bool else kp.to(dt)
        kp = kp.reshape(N, 1, 1, S)
        mask = kp if mask is None else mask + kp
    qh, kh, vh = _split_heads(ctx, q, H), _split_heads(ctx, k, H), _split_heads(ctx, v, H)
    hd = E // H
    sc = 1.0 / math.sqrt(hd)
    s = bilinear(ctx, qh, _transpose(ctx, kh, -2, -1) if isinstance(kh, Jet) else kh.transpose(-2, -1), torch.matmul)
    s = _scale(ctx, s, sc, torch.mul, s.value * sc) if isinstance(s, Jet) else s * sc
    if mask is not None:
        s = _add_mask(ctx, s, mask) if isinstance(s, Jet) else s + mask
    P = softmax_jet(ctx, s, -1) if isinstance(s, Jet) else torch.softmax(s, -1)
    o = bilinear(ctx, P, vh, torch.matmul)  # (N, H, L, hd)
    o = _transpose(ctx, o, 1, 2) if isinstance(o, Jet) else o.transpose(1, 2)
    shape = (N, L, E)
    if isinstance(o, Jet):
        o = _map(o, lambda c, off: c.reshape(tuple(c.shape[:off]) + shape[1:]), value=o.value.reshape(shape))
    else:
        o = o.reshape(shape)
    out = _rule_linear(ctx, {}, o, m.out_proj.weight, m.out_proj.bias)
    if not need_weights:
        return (out, None)
    if average_attn_weights:
        weights = _reduce(ctx, P, torch.mean, 1, False, None) if isinstance(P, Jet) else P.mean(1)
    else:
        weights = P
    return (out, weights)
