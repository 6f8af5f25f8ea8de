"""The jet and its layouts: :class:`Jet` (a value and its derivative coefficients), the
:class:`Context` of one propagation (N points, K directions, orders, collapsed or not), the input
jet along coordinate axes (:class:`_AxisInput`), and the layout helpers every rule uses (shared /
per-point / collapsed coefficients, broadcasting, maps over the feature dims, the layout check).

The bottom of the jet modules (taylor.py's docstring describes the layouts): the rules in
_rules_activation, _rules_algebra, _rules_shape and taylor_nn build on it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence

import torch

from ._graph_program import Unsupported
from .reference import zprod as _mul  # noqa: F401 (the rules' None-aware product, one spelling)

Tensor = torch.Tensor


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
        # what rules share within one propagation: the gates' Q - P per (P, Q) pair
        # (_rules_algebra._rule_gate), kept with P and Q so that their ids stay theirs
        self.memo: dict = {}

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
