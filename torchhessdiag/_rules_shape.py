"""The rules that move features around: indexing (points kept), cat / stack of feature dims,
sums and means over feature dims, reshape / view / flatten, unsqueeze / squeeze.

Sits above _jet; taylor_nn uses its reduction.
"""

from __future__ import annotations

from typing import Any, Callable, List, Sequence

import torch

from ._graph_program import Unsupported
from ._jet import Context, Jet, _feature_dim, _map, _point

Tensor = torch.Tensor


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
