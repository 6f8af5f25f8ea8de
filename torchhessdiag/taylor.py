"""Taylor jets along K directions, propagated over a traced program (torchhessdiag/graph.py).

For K directions v_1..v_K (the coordinate axes of ``dims``) every input-dependent value h of the
program carries a jet: its value h0 and the derivative coefficients

    h_k = d^k/dt^k h(x + t v) at t = 0,       k = 1..n   (n <= 4; derivative form, not k!-scaled)

stored as a :class:`Jet`. Layouts (S = the value's feature shape, value = (N, *S)):

* ``point``  (N, K, *S): the general case;
* ``shared`` (K, *S), first order only: the same for every point. Until the first nonlinearity
  the first-order coefficients do not depend on the point (x -> x W^T + b -> ... keeps h1 = V^T
  W^T ...), so they are carried once, as the MLP engine does for its first layer;
* ``None``: identically zero (h2, h3, h4 before the first nonlinearity; everything of order >= 2
  through piecewise-linear activations) -- never materialised;
* collapsed top order: the highest coefficient h_n is replaced by the weighted sum
  s = sum_k w_k h_n[k], (N, *S) (w = 1 for a Laplacian, n = 2: K + 2 rows per point -- value, s
  and K first-order rows -- instead of 2K + 1; a biharmonic or a linear operator of order 4 in
  torchhessdiag/operators.py: 3K + 2 instead of 4K + 1). This is exact because h_n enters every
  rule linearly and no lower coefficient depends on it (collapsed Taylor mode).

One rule per op kind, kept in the table :data:`RULES` (as in jax's experimental/jet.py and
microsoft/folx): linear maps act on every coefficient (the bias only on the value); sums are
componentwise; a product uses Leibniz's rule y_n = sum_j C(n, j) a_j b_{n-j} (collapsed:
s_y = a0 s_b + b0 s_a + 2 sum_k a1_k b1_k); an activation uses Faa di Bruno's formula with
sigma^(j)(h0) from the derivative table (:func:`activation_jet`, the one place the combination is
written, so that it can be backed by a fused kernel later).

Everything is built from differentiable torch ops and the table ops, so the results carry a graph
to the parameters (and to x) when grad mode is on. A rule that meets something it cannot represent
(a broadcast that would mix the batch dimension into the features, a product with a tensor that
is itself input-dependent where only constants are allowed, ...) raises
:class:`~torchhessdiag.graph.Unsupported`, and the caller falls back to exact autograd.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import jet2, ops
from .activations import ActivationSpec
from .graph import _RUNTIME, Program, ShapeError, Unsupported

Tensor = torch.Tensor

MAX_ORDER = ops.MAX_ORDER  # the table's last order (csrc/activations.h kMaxOrder)

# the fused Faa di Bruno op (csrc/taylor.h), when this build has it
_TAYLOR_ACT = getattr(torch.ops.torchhessdiag, "taylor_act", None)

__all__ = ["Jet", "Context", "activation_jet", "propagate", "RULES", "MAX_ORDER"]


class Jet:
    """An input-dependent value with its derivative coefficients (see the module docstring)."""

    __slots__ = ("value", "coefs")

    def __init__(self, value: Tensor, coefs: List[Optional[Tensor]]):
        self.value = value
        self.coefs = coefs

    def __repr__(self) -> str:
        shapes = [None if c is None else tuple(c.shape) for c in self.coefs]
        return f"Jet(value={tuple(self.value.shape)}, coefs={shapes})"


class Context:
    """What one propagation carries: N points, K directions, orders 1..n, collapsed or not.

    ``collapsed``: the top coefficient (order n >= 2) is carried as sum_k w_k h_n[k], (N, *S),
    with ``weights`` w (K,) (None: all ones, the Laplacian's plain sum)."""

    def __init__(self, N: int, K: int, order: int, collapsed: bool, weights: Optional[Tensor] = None):
        if collapsed and order < 2:
            raise ValueError("collapsed jets are of order >= 2")
        if weights is not None and (not collapsed or weights.dim() != 1 or weights.shape[0] != K):
            raise ValueError(f"collapse weights must be a ({K},) tensor of a collapsed context")
        self.N, self.K, self.order, self.collapsed = N, K, order, collapsed
        self.weights = weights
        self.piecewise_linear_seen = False
        self.node = ""  # the node being evaluated, for messages
        self.kind = ""
        self.max_row = 1  # the largest per-point jet row met (elements of one order, K * prod(S))
        self.total_row = 0  # per-point elements of every jet made (value and coefficients)
        # the directions are the coordinate axes ``axes`` (LongTensor (K,)): a linear layer applied
        # to the input jet's rows (V^T, K x d) gathers K weight columns instead of a K x d x out GEMM
        self.axes: Optional[Tensor] = None
        self.input_rows: Optional[Tensor] = None

    def is_sum(self, k: int) -> bool:
        """Coefficient k is the collapsed (weighted) sum over directions, (N, *S)."""
        return self.collapsed and k == self.order


# ---- layout helpers ------------------------------------------------------------------------------


def _off(t: Tensor, value: Tensor) -> int:
    """Number of leading non-feature dims of t: 2 for (N, K, *S), 1 for (K, *S) / (N, *S)."""
    return t.dim() - (value.dim() - 1)


def _point(ctx: Context, t: Tensor, vdim: int) -> Tensor:
    """A shared (K, *S) coefficient as (N, K, *S)."""
    if t.dim() == vdim:
        return t.unsqueeze(0).expand((ctx.N,) + tuple(t.shape))
    return t


def _ksum(t: Tensor, vdim: int) -> Tensor:
    """sum over the K directions of a point (N, K, *S) or shared (K, *S) tensor."""
    return t.sum(1) if t.dim() == vdim + 1 else t.sum(0)


def _wsum(t: Optional[Tensor], vdim: int, weights: Optional[Tensor]) -> Optional[Tensor]:
    """sum_k w_k t[k] over the K directions of a point (N, K, *S) or shared (K, *S) tensor
    (``weights`` None: the plain sum)."""
    if t is None:
        return None
    if weights is None:
        return _ksum(t, vdim)
    w = weights.to(dtype=t.dtype, device=t.device)
    if t.dim() == vdim + 1:  # (N, K, *S): one batched (1 x K) @ (K x prod S) product
        N, K = t.shape[0], t.shape[1]
        return torch.matmul(w, t.reshape(N, K, -1)).reshape((N,) + tuple(t.shape[2:]))
    return torch.matmul(w, t.reshape(t.shape[0], -1)).reshape(tuple(t.shape[1:]))


def _add(*terms: Optional[Tensor]) -> Optional[Tensor]:
    out = None
    for t in terms:
        if t is None:
            continue
        out = t if out is None else out + t
    return out


def _mul(*factors) -> Optional[Tensor]:
    """The product of the factors (tensors or numbers), None (zero) if any is None."""
    for f in factors:
        if f is None:
            return None
    out = factors[0]
    for f in factors[1:]:
        out = out * f
    return out


def _fma(acc: Optional[Tensor], a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    """acc + a * b (one fused pass, torch.addcmul), None meaning zero."""
    if a is None or b is None:
        return acc
    if acc is None:
        return a * b
    return torch.addcmul(acc, a, b)


def _check(ctx: Context, jet: Jet) -> Jet:
    """Every coefficient must have the layout its value implies; else the op mixed points."""
    v = jet.value
    if v.dim() < 1 or v.shape[0] != ctx.N:
        raise Unsupported(
            f"node '{ctx.node}' gives an input-dependent value of shape {tuple(v.shape)}, which no "
            f"longer has the {ctx.N} points in its first dimension (the jet rules keep points apart)"
        )
    S = tuple(v.shape[1:])
    width = math.prod(S)  # not v[0]: N may be 0
    ctx.max_row = max(ctx.max_row, ctx.K * width)
    ctx.total_row += width * (1 + sum(0 if c is None else (1 if ctx.is_sum(k) else ctx.K) for k, c in enumerate(jet.coefs, start=1)))
    for k, c in enumerate(jet.coefs, start=1):
        if c is None:
            continue
        if ctx.is_sum(k):
            ok = tuple(c.shape) == (ctx.N,) + S
        elif c.dim() == v.dim():
            ok = k == 1 and tuple(c.shape) == (ctx.K,) + S
        else:
            ok = tuple(c.shape) == (ctx.N, ctx.K) + S
        if not ok:
            raise Unsupported(
                f"node '{ctx.node}': a broadcast or reshape mixes the points or directions "
                f"(value {tuple(v.shape)}, order-{k} coefficient {tuple(c.shape)})"
            )
    return jet


def _broadcast(ctx: Context, jet: Jet, shape: Sequence[int]) -> Jet:
    """jet expanded to the value shape ``shape`` (same rank; size-1 feature dims grow)."""
    shape = tuple(shape)
    if tuple(jet.value.shape) == shape:
        return jet
    if len(shape) != jet.value.dim():
        raise Unsupported(
            f"node '{ctx.node}': broadcasting changes the rank of an input-dependent value "
            f"({tuple(jet.value.shape)} -> {shape}), which would mix the points"
        )
    if shape[0] != jet.value.shape[0]:
        raise Unsupported(f"node '{ctx.node}': broadcasting over the batch dimension")
    S = shape[1:]
    coefs = []
    for k, c in enumerate(jet.coefs, start=1):
        if c is None:
            coefs.append(None)
        elif ctx.is_sum(k):
            coefs.append(c.expand(shape))
        elif c.dim() == jet.value.dim():
            coefs.append(c.expand((c.shape[0],) + S))
        else:
            coefs.append(c.expand(tuple(c.shape[:2]) + S))
    return Jet(jet.value.expand(shape), coefs)


def _map(jet: Jet, fn: Callable[[Tensor, int], Tensor], value: Optional[Tensor] = None) -> Jet:
    """Apply a map acting on the feature dims to the value and every coefficient. fn(t, off)
    gets the tensor and its number of leading non-feature dims. ``value`` overrides fn(value)."""
    v = jet.value
    new_v = fn(v, 1) if value is None else value
    return Jet(new_v, [None if c is None else fn(c, _off(c, v)) for c in jet.coefs])


def _feature_dim(ctx: Context, dim: Any, ndim: int) -> int:
    """A dim argument as a feature dim 1..ndim-1 (counted in the value), or Unsupported."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise Unsupported(f"node '{ctx.node}': dim={dim!r} is not a constant int")
    d = dim + ndim if dim < 0 else dim
    if not 1 <= d < ndim:
        raise Unsupported(
            f"node '{ctx.node}': dim={dim} acts on the batch dimension (or is out of range for "
            f"{ndim} dims); only feature dimensions are supported"
        )
    return d


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
        h1, s = H
        s1, s2 = D[0], D[1]
        y1 = None if s1 is None else _mul(s1.unsqueeze(1), h1)
        sq = None if h1 is None else _wsum(h1 * h1, vdim, weights)
        return [y1, _fma(_mul(s2, sq), s1, s)]
    d = [None if t is None else t.unsqueeze(1) for t in D] + [None] * (MAX_ORDER - n)
    h = list(lower) + [None] * (MAX_ORDER - len(lower))
    s1, s2, s3, s4 = d
    h1, h2, h3, h4 = h
    out: List[Optional[Tensor]] = [_mul(s1, h1)]
    if n >= 2:
        h1sq = _mul(h1, h1)
        out.append(_add(_mul(s2, h1sq), _mul(s1, h2)))
    if n >= 3:
        out.append(_add(_mul(s3, h1sq, h1), _mul(3.0, s2, h1, h2), _mul(s1, h3)))
    if n >= 4:
        inner = _add(_mul(3.0, h2, h2), _mul(4.0, h1, h3))
        out.append(_add(_mul(s4, h1sq, h1sq), _mul(6.0, s3, h1sq, h2), _mul(s2, inner), _mul(s1, h4)))
    if collapsed:  # out[-1] lacks sigma' h_n (h_n was left out above): add sigma' s
        out[-1] = _fma(_wsum(out[-1], vdim, weights), D[0], H[-1])
    return out


def _rule_activation(ctx: Context, p: dict, x, *args, **kwargs) -> Any:
    # the parameters (beta, alpha, ...) are already in the spec, read when the graph was built
    spec: ActivationSpec = p["spec"]
    if not isinstance(x, Jet):
        return ops.activation(x, spec) if isinstance(x, Tensor) else x
    if getattr(spec, "linear", False):
        return x
    n = ctx.order
    pwl = bool(getattr(spec, "piecewise_linear", False))
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


def _fix(ctx: Context, c: Optional[Tensor], k: int, vdim: int) -> Optional[Tensor]:
    """Make a computed coefficient per point where its layout must be (only h1 may be shared)."""
    if c is None:
        return None
    if ctx.is_sum(k):
        if c.dim() == vdim - 1:
            return c.unsqueeze(0).expand((ctx.N,) + tuple(c.shape))
        return c
    if k >= 2 and c.dim() == vdim:
        return _point(ctx, c, vdim)
    return c


# ---- linear maps -------------------------------------------------------------------------------


def _const(ctx: Context, t: Any, what: str) -> Any:
    if isinstance(t, Jet):
        raise Unsupported(f"node '{ctx.node}': {what} depends on the input; only constants are supported there")
    return t


def _layer_name(ctx: Context, p: dict, what: str) -> str:
    name = p.get("name")
    return f"{what} '{name}'" if name else f"{what} (node '{ctx.node}')"


def _rule_linear(ctx: Context, p: dict, x, weight=None, bias=None) -> Any:
    weight = _const(ctx, weight, "the weight of a linear layer")
    bias = _const(ctx, bias, "the bias of a linear layer")
    if not isinstance(x, Jet):
        return F.linear(x, weight, bias)
    if weight.dim() != 2:
        raise Unsupported(f"node '{ctx.node}': linear with a {weight.dim()}-d weight")
    if x.value.shape[-1] != weight.shape[1]:
        raise ShapeError(
            f"{_layer_name(ctx, p, 'linear layer')} takes {weight.shape[1]} input features, but the "
            f"value it gets has {x.value.shape[-1]} (shape {tuple(x.value.shape)})"
        )
    value = F.linear(x.value, weight, bias)
    # V^T W^T with V = columns e_(axes); contiguous (K, out), so that rows broadcast from it come
    # out (N, K, *S)-ordered, the layout the one-pass jet ops (jet2.py) read without a copy
    if isinstance(x, _AxisInput) and x._coefs is None:
        return Jet(value, [weight.index_select(1, ctx.axes).t().contiguous()] + [None] * (ctx.order - 1))

    def fn(t: Tensor, off: int) -> Tensor:
        if ctx.axes is not None and t is ctx.input_rows:
            return weight.index_select(1, ctx.axes).t().contiguous()
        return F.linear(t, weight)

    return _map(x, fn, value=value)


def _rule_linear_module(ctx: Context, p: dict, m, x) -> Any:
    return _rule_linear(ctx, p, x, m.weight, m.bias)


def _rule_matmul(ctx: Context, p: dict, a, b) -> Any:
    if isinstance(b, Jet) or not isinstance(a, Jet):
        raise Unsupported(
            f"node '{ctx.node}': matmul is supported as (input-dependent value) @ (constant matrix); "
            "a product with the input-dependent value on the right mixes points"
        )
    if not isinstance(b, Tensor) or b.dim() not in (1, 2) or a.value.dim() < 2:
        raise Unsupported(f"node '{ctx.node}': matmul with shapes {tuple(a.value.shape)} @ {getattr(b, 'shape', b)}")
    if a.value.shape[-1] != b.shape[0]:
        raise ShapeError(
            f"matmul (node '{ctx.node}'): the input-dependent value has {a.value.shape[-1]} features "
            f"(shape {tuple(a.value.shape)}) but the matrix it multiplies has {b.shape[0]} rows "
            f"(shape {tuple(b.shape)})"
        )
    return _map(a, lambda t, off: torch.matmul(t, b))


def _rule_identity(ctx: Context, p: dict, x, *args, **kwargs) -> Any:
    return x


def _rule_neg(ctx: Context, p: dict, x) -> Any:
    return _map(x, lambda t, off: -t)


# ---- sums, products ----------------------------------------------------------------------------


def _value_of(t):
    return t.value if isinstance(t, Jet) else t


def _shape_of(t) -> tuple:
    if isinstance(t, Jet):
        return tuple(t.value.shape)
    if isinstance(t, Tensor):
        return tuple(t.shape)
    return ()


def _out_shape(a, b) -> tuple:
    sa, sb = _shape_of(a), _shape_of(b)
    if sa == sb:
        return sa
    n = max(len(sa), len(sb))
    sa, sb = (1,) * (n - len(sa)) + sa, (1,) * (n - len(sb)) + sb
    out = []
    for p, q in zip(sa, sb):
        if p != q and p != 1 and q != 1:
            raise RuntimeError(f"shapes {sa} and {sb} do not broadcast")
        out.append(q if p == 1 else p)
    return tuple(out)


def _add_sub(ctx: Context, a, b, sign: float, alpha) -> Any:
    av, bv = _value_of(a), _value_of(b)
    if alpha is None:
        value = av + bv if sign > 0 else av - bv  # also for a Python number on either side
    else:
        value = (torch.add if sign > 0 else torch.sub)(torch.as_tensor(av, dtype=bv.dtype if isinstance(bv, Tensor) else None), bv, alpha=alpha)
    shape = tuple(value.shape)
    scale_b = sign * (1 if alpha is None else alpha)
    ja = _broadcast(ctx, a, shape) if isinstance(a, Jet) else None
    jb = _broadcast(ctx, b, shape) if isinstance(b, Jet) else None
    n = len((ja or jb).coefs)
    coefs = []
    for k in range(n):
        ca = ja.coefs[k] if ja is not None else None
        cb = jb.coefs[k] if jb is not None else None
        if cb is None:
            coefs.append(ca)
        elif ca is None:
            coefs.append(cb if scale_b == 1 else cb * scale_b)
        elif scale_b == 1:
            coefs.append(ca + cb)
        elif scale_b == -1:
            coefs.append(ca - cb)
        else:
            coefs.append(torch.add(ca, cb, alpha=scale_b))
    out = Jet(value, coefs)
    # a shared coefficient added to a point one is point-shaped by broadcasting already
    return out


def _rule_add(ctx: Context, p: dict, a, b, alpha=None) -> Any:
    _const(ctx, alpha, "alpha")
    return _add_sub(ctx, a, b, 1.0, alpha)


def _rule_sub(ctx: Context, p: dict, a, b, alpha=None) -> Any:
    _const(ctx, alpha, "alpha")
    if not isinstance(a, Jet):
        # c - jet: value c - h0, coefficients -alpha h_k
        value = a - b.value if alpha is None else torch.sub(torch.as_tensor(a, dtype=b.value.dtype, device=b.value.device), b.value, alpha=alpha)
        jb = _broadcast(ctx, b, tuple(value.shape))
        s = -(1 if alpha is None else alpha)
        return Jet(value, [None if c is None else c * s for c in jb.coefs])
    return _add_sub(ctx, a, b, -1.0, alpha)


def _scale(ctx: Context, jet: Jet, c, op: Callable, value: Tensor) -> Jet:
    """jet op c for a constant c (op = torch.mul or torch.div), each coefficient op c."""
    jet = _broadcast(ctx, jet, tuple(value.shape))
    vdim = value.dim()
    if not isinstance(c, Tensor) or c.dim() < vdim:
        # a number, or a tensor without a batch dim: broadcasts against every layout as it is
        return Jet(value, [None if t is None else op(t, c) for t in jet.coefs])
    # c has a batch dim (size 1 or N): insert the K dim for the point layout
    per_point = c.shape[0] != 1
    coefs = []
    for k, t in enumerate(jet.coefs, start=1):
        if t is None:
            coefs.append(None)
        elif ctx.is_sum(k):
            coefs.append(op(t, c))
        else:
            if t.dim() == vdim:  # shared (K, *S)
                if not per_point:
                    coefs.append(op(t, c))  # c (1, *S) broadcasts against (K, *S)
                    continue
                t = _point(ctx, t, vdim)
            coefs.append(op(t, c.unsqueeze(1)))
    return Jet(value, coefs)


def _product(ctx: Context, a: Jet, b: Jet) -> Jet:
    """Leibniz's rule for the elementwise product of two jets."""
    shape = _out_shape(a, b)
    a, b = _broadcast(ctx, a, shape), _broadcast(ctx, b, shape)
    a0, b0 = a.value, b.value
    vdim = a0.dim()
    n = ctx.order
    if ctx.collapsed and n == 2:
        a1, sa = a.coefs
        b1, sb = b.coefs
        fused = jet2.mul(a0, a1, sa, b0, b1, sb, ctx.weights)  # one pass, where it applies
        if fused is not None:
            return Jet(fused[0], [fused[1], fused[2]])
    value = a0 * b0
    if ctx.collapsed and n == 2:
        y1 = _fma(_mul(a0.unsqueeze(1), b1), a1, b0.unsqueeze(1))
        cross = _mul(a1, b1)
        s = _fma(_fma(None if cross is None else 2.0 * _wsum(cross, vdim, ctx.weights), a0, sb), b0, sa)
        return Jet(value, [_fix(ctx, y1, 1, vdim), _fix(ctx, s, 2, vdim)])
    A = [a0.unsqueeze(1)] + list(a.coefs)
    B = [b0.unsqueeze(1)] + list(b.coefs)
    coefs = []
    if ctx.collapsed:  # top: a0 s_b + b0 s_a + sum_k w_k sum_(0<j<n) C(n, j) a_j[k] b_(n-j)[k]
        top = None
        for j in range(1, n):
            if A[j] is None or B[n - j] is None:
                continue
            c = float(math.comb(n, j))
            top = A[j] * B[n - j] * c if top is None else torch.addcmul(top, A[j], B[n - j], value=c)
        top = _fma(_fma(_wsum(top, vdim, ctx.weights), a0, B[n]), b0, A[n])
        A, B = A[:n], B[:n]
        n -= 1
    for k in range(1, n + 1):
        acc = None
        for j in range(k + 1):  # acc += C(k, j) a_j b_(k-j), one fused pass per term
            if A[j] is None or B[k - j] is None:
                continue
            c = math.comb(k, j)
            if acc is None:
                acc = A[j] * B[k - j] if c == 1 else torch.mul(A[j], B[k - j]).mul_(float(c))
            else:
                acc = torch.addcmul(acc, A[j], B[k - j], value=float(c))
        coefs.append(_fix(ctx, acc, k, vdim))
    if ctx.collapsed:
        coefs.append(_fix(ctx, top, ctx.order, vdim))
    return Jet(value, coefs)


def _rule_mul(ctx: Context, p: dict, a, b) -> Any:
    if isinstance(a, Jet) and isinstance(b, Jet):
        return _product(ctx, a, b)
    if isinstance(b, Jet):
        a, b = b, a
    value = torch.mul(a.value, b)
    return _scale(ctx, a, b, torch.mul, value)


def _rule_div(ctx: Context, p: dict, a, b, rounding_mode=None) -> Any:
    if rounding_mode is not None:
        raise Unsupported(f"node '{ctx.node}': division with rounding_mode={rounding_mode!r}")
    if isinstance(b, Jet):
        raise Unsupported(f"node '{ctx.node}': division by an input-dependent value")
    value = torch.div(a.value, b)
    return _scale(ctx, a, b, torch.div, value)


def _rule_pow(ctx: Context, p: dict, base, exponent) -> Any:
    if isinstance(exponent, Jet) or not isinstance(base, Jet):
        raise Unsupported(f"node '{ctx.node}': a power with an input-dependent exponent")
    e = exponent
    if isinstance(e, Tensor) and e.dim() == 0:
        e = e.item()
    if isinstance(e, bool) or not isinstance(e, (int, float)) or e != int(e) or e < 0:
        raise Unsupported(f"node '{ctx.node}': power {e!r}; only integer exponents >= 0 are supported")
    e = int(e)
    if e == 0:
        return torch.ones_like(base.value)
    result, sq = None, base
    while True:  # binary exponentiation with Leibniz products
        if e & 1:
            result = sq if result is None else _product(ctx, result, sq)
        e >>= 1
        if not e:
            break
        sq = _product(ctx, sq, sq)
    return Jet(torch.pow(base.value, exponent), result.coefs)


def _rule_square(ctx: Context, p: dict, x) -> Any:
    return _rule_pow(ctx, p, x, 2)


# ---- indexing, concatenation, sums, reshapes ------------------------------------------------------


def _full_slice(s: Any, n: int) -> bool:
    return isinstance(s, slice) and range(n)[s] == range(n)


def _rule_getitem(ctx: Context, p: dict, x, idx) -> Any:
    if not isinstance(x, Jet):
        return x[idx]
    idx = idx if isinstance(idx, tuple) else (idx,)
    nd = x.value.dim()
    consuming = [e for e in idx if e is not Ellipsis and e is not None]
    if sum(e is Ellipsis for e in idx) > 1:
        raise Unsupported(f"node '{ctx.node}': index with two Ellipses")
    n_adv = 0
    for e in consuming:
        if isinstance(e, (int, slice)) and not isinstance(e, bool):
            continue
        if isinstance(e, (list, Tensor)):
            t = torch.as_tensor(e)
            if t.dtype not in (torch.int64, torch.int32) or t.dim() != 1:
                raise Unsupported(f"node '{ctx.node}': only 1-d integer index tensors are supported")
            n_adv += 1
            continue
        raise Unsupported(f"node '{ctx.node}': index {e!r} is not supported")
    if n_adv > 1:
        raise Unsupported(f"node '{ctx.node}': more than one advanced index")
    if Ellipsis in idx:
        i = idx.index(Ellipsis)
        fill = (slice(None),) * (nd - len(consuming))
        idx = idx[:i] + fill + idx[i + 1 :]
    if not idx or idx[0] is None or not _full_slice(idx[0], ctx.N):
        raise Unsupported(f"node '{ctx.node}': indexing must keep every point (x[:, ...]); got {idx!r}")
    rest = idx[1:]
    value = x.value[idx]

    def fn(t: Tensor, off: int) -> Tensor:
        return t[(slice(None),) * off + rest]

    return _map(x, fn, value=value)


def _jet_parts(ctx: Context, items: Sequence[Any]) -> List[Jet]:
    """Turn constants among cat/stack parts into jets with zero coefficients."""
    parts = []
    n = ctx.order
    for t in items:
        if isinstance(t, Jet):
            parts.append(t)
        elif isinstance(t, Tensor):
            parts.append(Jet(t, [None] * n))
        else:
            raise Unsupported(f"node '{ctx.node}': cannot concatenate {type(t).__name__}")
    return parts


def _join(ctx: Context, items, dim, joiner: Callable, stacking: bool) -> Any:
    if isinstance(items, Jet) or not isinstance(items, (list, tuple)):
        raise Unsupported(f"node '{ctx.node}': cat/stack of a single tensor")
    if not any(isinstance(t, Jet) for t in items):
        return joiner(list(items), dim)
    parts = _jet_parts(ctx, items)
    nd = parts[0].value.dim()
    d = _feature_dim(ctx, dim, nd + 1 if stacking else nd)
    value = joiner([q.value for q in parts], d)
    coefs = []
    for k in range(1, ctx.order + 1):
        cs = [q.coefs[k - 1] for q in parts]
        if all(c is None for c in cs):
            coefs.append(None)
            continue
        shared = (not ctx.is_sum(k)) and all(c is not None and c.dim() == q.value.dim() for c, q in zip(cs, parts))
        full = []
        for c, q in zip(cs, parts):
            S = tuple(q.value.shape[1:])
            if ctx.is_sum(k):
                full.append(c if c is not None else q.value.new_zeros((ctx.N,) + S))
            elif shared:
                full.append(c)
            elif c is None:
                full.append(q.value.new_zeros((ctx.N, ctx.K) + S))
            else:
                full.append(_point(ctx, c, q.value.dim()))
        off = 1 if (shared or ctx.is_sum(k)) else 2
        coefs.append(joiner(full, d - 1 + off))
    return Jet(value, coefs)


def _rule_cat(ctx: Context, p: dict, tensors, dim=0, axis=None) -> Any:
    return _join(ctx, tensors, dim if axis is None else axis, torch.cat, stacking=False)


def _rule_stack(ctx: Context, p: dict, tensors, dim=0) -> Any:
    return _join(ctx, tensors, dim, torch.stack, stacking=True)


def _reduce(ctx: Context, x, reducer: Callable, dim, keepdim, dtype) -> Any:
    if dtype is not None:
        raise Unsupported(f"node '{ctx.node}': sum/mean with dtype=")
    if dim is None:
        raise Unsupported(f"node '{ctx.node}': a sum/mean over every dimension sums over the points")
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    nd = x.value.dim()
    ds = [_feature_dim(ctx, e, nd) for e in dims]
    return _map(x, lambda t, off: reducer(t, [e - 1 + off for e in ds], keepdim=keepdim))


def _rule_sum(ctx: Context, p: dict, x, dim=None, keepdim=False, dtype=None) -> Any:
    return _reduce(ctx, x, torch.sum, dim, keepdim, dtype)


def _rule_mean(ctx: Context, p: dict, x, dim=None, keepdim=False, dtype=None) -> Any:
    return _reduce(ctx, x, torch.mean, dim, keepdim, dtype)


def _reshape_to(ctx: Context, x: Jet, value: Tensor) -> Jet:
    if value.dim() < 1 or value.shape[0] != ctx.N:
        raise Unsupported(
            f"node '{ctx.node}': reshape to {tuple(value.shape)} does not keep the {ctx.N} points in "
            "the first dimension"
        )
    S = tuple(value.shape[1:])
    return _map(x, lambda t, off: t.reshape(tuple(t.shape[:off]) + S), value=value)


def _rule_reshape(ctx: Context, p: dict, x, *shape, **kw) -> Any:
    if "shape" in kw:
        shape = (kw.pop("shape"),)
    if kw:
        raise Unsupported(f"node '{ctx.node}': reshape/view with {sorted(kw)}")
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    if any(isinstance(s, Jet) for s in shape):
        raise Unsupported(f"node '{ctx.node}': reshape to an input-dependent shape")
    if len(shape) == 1 and isinstance(shape[0], torch.dtype):
        raise Unsupported(f"node '{ctx.node}': view as another dtype")
    return _reshape_to(ctx, x, x.value.reshape(shape))


def _rule_flatten(ctx: Context, p: dict, x, start_dim=0, end_dim=-1) -> Any:
    nd = x.value.dim()
    s = start_dim + nd if start_dim < 0 else start_dim
    if s < 1 and nd > 1:
        raise Unsupported(f"node '{ctx.node}': flatten from dim {start_dim} merges the points into the features")
    return _reshape_to(ctx, x, torch.flatten(x.value, start_dim, end_dim))


def _rule_unsqueeze(ctx: Context, p: dict, x, dim) -> Any:
    d = _feature_dim(ctx, dim, x.value.dim() + 1)
    return _map(x, lambda t, off: t.unsqueeze(d - 1 + off))


def _rule_squeeze(ctx: Context, p: dict, x, dim=None) -> Any:
    if dim is None:
        raise Unsupported(f"node '{ctx.node}': squeeze() without dim could squeeze the batch dimension")
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    nd = x.value.dim()
    ds = [_feature_dim(ctx, e, nd) for e in dims]
    return _map(x, lambda t, off: t.squeeze(tuple(e - 1 + off for e in ds)))


RULES: Dict[str, Callable[..., Any]] = {
    "activation": _rule_activation,
    "linear": _rule_linear,
    "linear_module": _rule_linear_module,
    "matmul": _rule_matmul,
    "identity": _rule_identity,
    "neg": _rule_neg,
    "add": _rule_add,
    "sub": _rule_sub,
    "mul": _rule_mul,
    "div": _rule_div,
    "pow": _rule_pow,
    "square": _rule_square,
    "getitem": _rule_getitem,
    "cat": _rule_cat,
    "stack": _rule_stack,
    "sum": _rule_sum,
    "mean": _rule_mean,
    "reshape": _rule_reshape,
    "flatten": _rule_flatten,
    "unsqueeze": _rule_unsqueeze,
    "squeeze": _rule_squeeze,
}


# ---- running a program ---------------------------------------------------------------------------


def _plain(a: Any) -> Any:
    """A Jet used where only its value matters (shape queries, *_like constructors)."""
    return a.value if isinstance(a, Jet) else a


class _AxisInput(Jet):
    """The input jet when the directions are coordinate axes (``ctx.axes``) and V was not given:
    its first-order rows (the one-hot (K, d) matrix V^T) are made only when a rule reads
    ``coefs``; a linear layer on it gathers weight columns instead (:func:`_rule_linear`), so a few
    axes of a very wide input never cost a (K, d) tensor."""

    __slots__ = ("_ctx", "_coefs")

    def __init__(self, ctx: Context, value: Tensor):  # noqa: D107 - no Jet.__init__: coefs is lazy
        self.value = value
        self._ctx = ctx
        self._coefs: Optional[List[Optional[Tensor]]] = None

    @property
    def coefs(self) -> List[Optional[Tensor]]:  # type: ignore[override]
        if self._coefs is None:
            ctx, x = self._ctx, self.value
            rows = torch.zeros(ctx.K, x.shape[-1], dtype=x.dtype, device=x.device)
            rows[torch.arange(ctx.K, device=x.device), ctx.axes] = 1.0
            ctx.input_rows = rows
            self._coefs = [rows] + [None] * (ctx.order - 1)
        return self._coefs

    def __repr__(self) -> str:
        return f"_AxisInput(value={tuple(self.value.shape)}, axes={self._ctx.K})"


def _input_jet(ctx: Context, x: Tensor, V: Optional[Tensor]) -> Jet:
    if V is None:
        return _AxisInput(ctx, x)
    rows = V.t().to(dtype=x.dtype, device=x.device)
    ctx.input_rows = rows
    return Jet(x, [rows] + [None] * (ctx.order - 1))


def _check_if_jet(ctx: Context, res: Any) -> Any:
    return _check(ctx, res) if isinstance(res, Jet) else res


_RUNTIME.rules = RULES
_RUNTIME.input = _input_jet
_RUNTIME.check = _check_if_jet
_RUNTIME.plain = _plain

#: errors that are the caller's or the machine's, never "this model is not supported"
_PASS_THROUGH = (ShapeError, NotImplementedError, MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))


def propagate(
    program: Program, x: Tensor, V: Tensor, order: int, collapsed: bool = False, f: Any = None,
    weights: Optional[Tensor] = None, axes: Optional[Tensor] = None,
):
    """Run ``program`` on x (N, d) with jets along the K columns of V (d, K), orders 1..order;
    ``collapsed``: the top order as the sum over directions, weighted by ``weights`` (K,) if given;
    ``axes``: when the directions are the coordinate axes e_(axes[k]) (a LongTensor (K,); then V
    may be None and is made only if a rule other than a linear layer reads the input's rows), so
    that a linear layer on the input gathers weight columns (cost K x out, not K x d x out).

    ``f`` is the model (or function) the program was traced from: its weights and submodules are
    read from it on every run (default: the one it was traced from, if it is still alive).

    Returns ``(out, ctx)``: ``out`` is the output :class:`Jet` (or a plain tensor when the output
    does not depend on x), ``ctx.piecewise_linear_seen`` tells whether a piecewise-linear
    activation was met. Raises :class:`~torchhessdiag.graph.Unsupported` when some step cannot be
    represented, :class:`ShapeError` (a ValueError) when x does not fit the model.
    """
    if not 1 <= order <= MAX_ORDER:
        raise ValueError(f"propagate: order must be 1..{MAX_ORDER}, got {order}")
    if V is None and axes is None:
        raise ValueError("propagate: give the directions V or the axes")
    ctx = Context(x.shape[0], V.shape[1] if V is not None else axes.shape[0], order, collapsed, weights)
    if axes is not None:
        ctx.axes = axes.to(device=x.device)
    if f is None and program.fn_ref is not None:
        f = program.fn_ref()
    try:
        out = program.run(ctx, x, V, f, program.root)
    except (Unsupported, *_PASS_THROUGH):
        raise
    except Exception as e:  # noqa: BLE001 - a form of the op the rule does not handle
        # (a genuine error of f itself is raised again, unchanged, by the autograd fallback)
        raise Unsupported(f"node '{ctx.node}' ({ctx.kind}): {type(e).__name__}: {str(e)[:200]}") from None
    if isinstance(out, (tuple, list, dict)):
        raise Unsupported("f returns a tuple/list/dict; it must return one tensor")
    return out, ctx


# Points per chunk: about this many elements of the largest jet row block, so that the working set
# of an elementwise step stays in cache on the CPU (measured on this project's 2-core CPU: a
# FourierResNet of width 128, K=16, N=1024 ran ~1.6-2.4x faster in chunks of 256 points than in
# one block); on a GPU large blocks are what keeps the device busy.
_CHUNK_ELEMENTS = 1 << 19
_CHUNK_ELEMENTS_GPU = 1 << 27
_FIRST_CHUNK = 128


def _cat_outputs_ctx(parts: List[Any], ctx: Context) -> Any:
    """The outputs of several chunks as one (shared first-order rows are the same in each)."""
    first = parts[0]
    if not isinstance(first, Jet):
        return torch.cat(parts) if isinstance(first, Tensor) and first.dim() >= 1 else first
    coefs = []
    for k, c0 in enumerate(first.coefs, start=1):
        if c0 is None:
            coefs.append(None)
        elif not ctx.is_sum(k) and c0.dim() == first.value.dim():
            coefs.append(c0)  # shared (K, *S)
        else:
            coefs.append(torch.cat([p.coefs[k - 1] for p in parts]))
    return Jet(torch.cat([p.value for p in parts]), coefs)


def _graph_wanted(x: Tensor, f: Any) -> bool:
    """Will the result carry an autograd graph? (grad mode on, and x or a parameter of f needs
    grad; for a plain function, whose parameters are not known, assumed so)."""
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad:
        return True
    if isinstance(f, torch.nn.Module):
        return any(p.requires_grad for p in f.parameters())
    return True


def chunk_points(x: Tensor, ctx: Context, first: int) -> int:
    """Points per chunk after a first chunk of ``first`` points measured the jet sizes (ctx).

    CPU: about ``_CHUNK_ELEMENTS`` elements per coefficient tensor, so that an elementwise step
    stays in cache. CUDA: as many points as fit in half the free device memory
    (``torch.cuda.mem_get_info``), counting every jet the program creates as if all were alive at
    once (values are freed after their last use, so fewer are), capped at
    ``_CHUNK_ELEMENTS_GPU`` elements per coefficient tensor."""
    N = x.shape[0]
    rows = max(1, ctx.max_row)
    if x.device.type != "cuda":
        return max(_FIRST_CHUNK, _CHUNK_ELEMENTS // rows)
    chunk = max(_FIRST_CHUNK, _CHUNK_ELEMENTS_GPU // rows)
    try:
        free, _ = torch.cuda.mem_get_info(x.device)
    except Exception:  # noqa: BLE001 - no information: the element cap alone
        return chunk
    per_point = max(1, ctx.total_row) * x.element_size()
    fit = int(0.5 * free // per_point)
    return max(min(first, N), min(chunk, fit))


def propagate_chunked(
    program: Program, x: Tensor, V: Tensor, order: int, collapsed: bool = False, f: Any = None,
    weights: Optional[Tensor] = None, axes: Optional[Tensor] = None,
):
    """:func:`propagate` over chunks of points (rows are independent), concatenated.

    With an autograd graph to keep (training) all points go in one block: the graph is kept
    whole either way, and one block has the least overhead. Without one, a first chunk of
    ``_FIRST_CHUNK`` points tells the jet sizes, and the rest go in chunks of
    :func:`chunk_points` (bounded memory; on CUDA sized from the free device memory)."""
    N = x.shape[0]
    if _graph_wanted(x, f):
        return propagate(program, x, V, order, collapsed, f, weights, axes)
    first = min(N, _FIRST_CHUNK)
    out, ctx = propagate(program, x[:first], V, order, collapsed, f, weights, axes)
    if first == N:
        return out, ctx
    parts = [out]
    chunk = chunk_points(x, ctx, first)
    for i in range(first, N, chunk):
        part, c = propagate(program, x[i : i + chunk], V, order, collapsed, f, weights, axes)
        ctx.piecewise_linear_seen |= c.piecewise_linear_seen
        parts.append(part)
    ctx.N = N
    return _cat_outputs_ctx(parts, ctx), ctx


# the rules for normalisation, softmax and attention (they build on the ones above)
from . import taylor_nn as _taylor_nn  # noqa: E402,F401
