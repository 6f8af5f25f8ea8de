"""The rules of linear maps, sums and products: linear layers and matmul by a constant, negation,
add/sub (with alpha), scaling by a constant, Leibniz's rule for the product of two jets (the
one-pass ``jet2.mul`` for the collapsed second order), division by a constant and integer powers.

Sits above _jet and jet2; taylor_nn composes its rules from these.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import jet2
from ._graph_program import ShapeError, Unsupported
from ._jet import Context, Jet, _AxisInput, _broadcast, _fix, _fma, _map, _point, _wsum

Tensor = torch.Tensor


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
        op = torch.add if sign > 0 else torch.sub
        value = op(torch.as_tensor(av, dtype=bv.dtype if isinstance(bv, Tensor) else None), bv, alpha=alpha)
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
        if alpha is None:
            value = a - b.value
        else:
            value = torch.sub(torch.as_tensor(a, dtype=b.value.dtype, device=b.value.device), b.value, alpha=alpha)
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
        value, y1, s = jet2.mul_formulas(a0, a1, sa, b0, b1, sb, ctx.weights)
        return Jet(value, [_fix(ctx, y1, 1, vdim), _fix(ctx, s, 2, vdim)])
    value = a0 * b0
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


def _rule_gate(ctx: Context, p: dict, z, P, Q) -> Any:
    """A gate (1 - z) * P + z * Q, fused by the tracer (_graph_fuse.py), as the jet of
    P + z * (Q - P): one product of jets instead of two, with Q - P computed once per (P, Q) pair
    and propagation (the modified MLP's U and V meet in every layer). The value differs from the
    expression as written by rounding only (as the jets' values do anyway: other GEMM blockings)."""
    if not isinstance(z, Jet):  # a constant gate (P or Q is a jet)
        lerped = _constant_gate_lerp(ctx, z, P, Q)
        if lerped is not None:
            return lerped

        def term(c, t):
            return _rule_mul(ctx, p, t, c) if isinstance(t, Jet) else c * t

        return _add_sub(ctx, term(1 - z, P), term(z, Q), 1.0, None)
    if not isinstance(P, Jet) and not isinstance(Q, Jet):
        D = Q - P
    elif torch.compiler.is_compiling():  # (no id-keyed cache inside a compiled graph)
        D = _rule_sub(ctx, p, Q, P)
    else:
        key = (id(P), id(Q))
        hit = ctx.memo.get(key)
        if hit is None:
            hit = ctx.memo[key] = (P, Q, _rule_sub(ctx, p, Q, P))
        D = hit[2]
    fused = _gate_one_pass(ctx, z, P, D)
    if fused is not None:
        return fused
    return _add_sub(ctx, P, _rule_mul(ctx, p, z, D), 1.0, None)


def _constant_gate_lerp(ctx: Context, z, P, Q) -> Any:
    """(1 - z) P + z Q for a gate z that does not depend on the input (PirateNet's learned
    residual weight alpha): torch.lerp(P_k, Q_k, z) per coefficient, one pass each instead of two
    scalings and a sum; differentiable in z, P and Q. Or None unless P and Q are jets of one
    shape and z is a number or a tensor without a batch dim (it broadcasts over every row)."""
    if not (isinstance(P, Jet) and isinstance(Q, Jet)) or P.value.shape != Q.value.shape:
        return None
    vdim = P.value.dim()
    if isinstance(z, Tensor):
        if z.dim() >= vdim or z.dtype != P.value.dtype or z.device != P.value.device:
            return None
    elif isinstance(z, bool) or not isinstance(z, (int, float)):
        return None
    else:
        z = float(z)
    coefs = []
    for pk, qk in zip(P.coefs, Q.coefs):
        if pk is None and qk is None:
            coefs.append(None)
        elif pk is None:
            coefs.append(qk * z)
        elif qk is None:
            coefs.append(pk * (1 - z))
        else:
            coefs.append(torch.lerp(pk, qk, z))  # (a shared (K, *S) row broadcasts as in a sum)
    return Jet(torch.lerp(P.value, Q.value, z), coefs)


def _gate_one_pass(ctx: Context, z: Jet, P, D) -> Any:
    """P + z D of collapsed second-order jets of one shape: z D by the one-pass product op
    (jet2.mul), then P added into its outputs in place -- they are fresh, held by nothing else (the
    op's autograd saves its inputs only). Or None where that op declines (see jet2.py), or P or D
    is not a jet of z's shape. Measured (modified MLP, d = 2, width 128, N = 4096, float32, CPU
    2 threads, thd.laplacian inference, 4 processes each): 24.6-31.3 ms instead of 35.7-38.7 ms
    with P + (z D) out of place, whose fresh (N, K, width) sums were page-faulted on every call
    (in a process that also runs nested autograd, whose heap keeps those pages: 21.4-22.6 vs
    24.1-25.3 ms)."""
    if not (ctx.collapsed and ctx.order == 2 and isinstance(P, Jet) and isinstance(D, Jet)):
        return None
    shape = tuple(z.value.shape)
    if tuple(P.value.shape) != shape or tuple(D.value.shape) != shape:
        return None
    out = jet2.mul(z.value, *z.coefs, D.value, *D.coefs, ctx.weights)
    if out is None:
        return None
    y0, y1, s = out
    y0.add_(P.value)
    p1, ps = P.coefs
    if p1 is not None:
        y1.add_(p1)  # (a shared (K, *S) row broadcasts over the points)
    if ps is not None:
        s.add_(ps)
    return Jet(y0, [y1, s])


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
