"""Multi-indices, the central polarization identity that turns d^alpha u into directional
derivatives with exact rational weights (its derivation and rounding: operators.py's docstring),
and plans: the directions of a call's terms pooled, with the weight matrices that combine them.

Import direction: imports only torch; below ``operators`` (which re-exports ``polarization``
and ``amplification``).
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import operator as _op
from fractions import Fraction
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor


# ---- multi-indices and the polarization identity -------------------------------------------------


def _check_alpha(alpha: Any, d: int, where: str, what: str) -> Tuple[int, ...]:
    """A multi-index as a tuple of d non-negative Python ints, or a clear error."""
    if isinstance(alpha, Tensor):
        if alpha.dim() != 1 or alpha.is_floating_point() or alpha.is_complex() or alpha.dtype == torch.bool:
            raise TypeError(f"{where}: {what} must be a tuple of {d} non-negative ints, got the tensor {alpha!r}")
        alpha = alpha.tolist()
    if isinstance(alpha, (str, bytes, Mapping)) or not hasattr(alpha, "__iter__"):
        raise TypeError(f"{where}: {what} must be a tuple of {d} non-negative ints (one per input dimension), got {alpha!r}")
    items = list(alpha)
    out = []
    for a in items:
        if isinstance(a, bool):
            raise TypeError(f"{where}: {what} = {tuple(items)!r} holds a bool; entries must be non-negative ints")
        try:
            out.append(_op.index(a))
        except TypeError:
            raise TypeError(
                f"{where}: {what} = {tuple(items)!r} holds {a!r} ({type(a).__name__}); entries must be non-negative "
                "ints (the number of derivatives along each input dimension)"
            ) from None
    if len(out) != d:
        raise ValueError(
            f"{where}: {what} = {tuple(out)!r} has length {len(out)}, but x has d = {d} input dimensions; a "
            f"multi-index has one entry per input dimension (e.g. {(2, 2) + (0,) * (d - 2) if d >= 2 else (4,)} "
            f"for {'d^4u/dx_0^2 dx_1^2' if d >= 2 else 'd^4u/dx^4'})"
        )
    neg = [a for a in out if a < 0]
    if neg:
        raise ValueError(f"{where}: {what} = {tuple(out)!r} has negative entries; entries must be >= 0")
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def _local_polarization(local: Tuple[int, ...]) -> Tuple[Tuple[Tuple[int, ...], Fraction], ...]:
    """The identity for a multi-index with every entry >= 1 (m = len(local) variables): pairs
    (primitive direction over the m variables, exact weight) with d^alpha u = sum w D_v^n u."""
    n = sum(local)
    acc: Dict[Tuple[int, ...], Fraction] = {}
    denom = math.factorial(n) * 2**n
    for k in itertools.product(*(range(a + 1) for a in local)):
        p = tuple(2 * ki - ai for ki, ai in zip(k, local))
        if not any(p):
            continue  # D_0^n u = 0 for n >= 1
        coef = (-1) ** (n - sum(k)) * math.prod(math.comb(a, ki) for a, ki in zip(local, k))
        g = functools.reduce(math.gcd, (abs(e) for e in p))
        first = next(e for e in p if e)
        s = g if first > 0 else -g
        v = tuple(e // s for e in p)
        acc[v] = acc.get(v, Fraction(0)) + Fraction(coef * s**n, denom)
    return tuple((v, w) for v, w in sorted(acc.items()) if w != 0)


def polarization(alpha: Sequence[int]) -> List[Tuple[Tuple[int, ...], Fraction]]:
    """The directions and exact weights this module uses for d^alpha u:
    ``[(v, w), ...]`` with d^alpha u = sum w * D_v^n u, n = |alpha|, v integer vectors of
    len(alpha) (primitive, first nonzero entry positive). Order 0: ``[]`` (the value itself).

    >>> polarization((2, 2))
    [((0, 1), Fraction(-1, 6)), ((1, -1), Fraction(1, 12)), ((1, 0), Fraction(-1, 6)), ((1, 1), Fraction(1, 12))]
    """
    alpha = _check_alpha(alpha, len(alpha), "torchhessdiag.polarization", "alpha")
    support = [i for i, a in enumerate(alpha) if a]
    if not support:
        return []
    out = []
    for v_local, w in _local_polarization(tuple(alpha[i] for i in support)):
        v = [0] * len(alpha)
        for i, e in zip(support, v_local):
            v[i] = e
        out.append((tuple(v), w))
    return sorted(out)


def amplification(alpha: Sequence[int]) -> float:
    """A(alpha) = sum_v |w_v| ||v||_1^n of :func:`polarization`: the combination's rounding error
    is at most about eps * A(alpha) * max_(|beta| = n) |d^beta u| (operators.py's docstring)."""
    n = sum(alpha)
    return float(sum(abs(w) * sum(abs(e) for e in v) ** n for v, w in polarization(alpha)))


def _seq(alpha: Tuple[int, ...]) -> Tuple[int, ...]:
    return tuple(i for i, a in enumerate(alpha) for _ in range(a))


# ---- plans: which directions, which weights ------------------------------------------------------


class _Term(NamedTuple):
    alpha: Tuple[int, ...]  # dense, length d
    out: int  # which output (partials: the alpha's index; operator: 0)
    coef: Any  # a Python number (int, float, Fraction) or a 0-d tensor


class _Plan:
    """The directions (pooled over every term) and, per order n, the weight matrix W_n (P, K):
    output p = c0[p] * u + sum_n sum_k W_n[p, k] D^n_(v_k) u."""

    def __init__(self, d: int, terms: List[_Term], P: int):
        self.d, self.terms, self.P = d, terms, P
        self.order = max((sum(t.alpha) for t in terms), default=0)
        self.dirs: Dict[Tuple[Tuple[int, int], ...], int] = {}  # sparse direction -> column
        # per order n: {(p, k): exact weight} for number coefficients, [(p, {k: w}, tensor)] else
        self.exact: Dict[int, Dict[Tuple[int, int], Any]] = {}
        self.tensor_terms: Dict[int, List[Tuple[int, Dict[int, Fraction], Tensor]]] = {}
        self.c0_exact: Dict[int, Any] = {}
        self.c0_tensor: List[Tuple[int, Tensor]] = []
        for t in terms:
            n = sum(t.alpha)
            if n == 0:
                if isinstance(t.coef, Tensor):
                    self.c0_tensor.append((t.out, t.coef))
                else:
                    self.c0_exact[t.out] = self.c0_exact.get(t.out, 0) + _exact(t.coef)
                continue
            support = [i for i, a in enumerate(t.alpha) if a]
            ws: Dict[int, Fraction] = {}
            for v_local, w in _local_polarization(tuple(t.alpha[i] for i in support)):
                key = tuple((i, e) for i, e in zip(support, v_local) if e)
                k = self.dirs.setdefault(key, len(self.dirs))
                ws[k] = ws.get(k, Fraction(0)) + w
            if isinstance(t.coef, Tensor):
                self.tensor_terms.setdefault(n, []).append((t.out, ws, t.coef))
            else:
                c = _exact(t.coef)
                table = self.exact.setdefault(n, {})
                for k, w in ws.items():
                    table[(t.out, k)] = table.get((t.out, k), 0) + w * c
        self.K = len(self.dirs)
        n = self.order
        tops = {p for (p, _k), w in self.exact.get(n, {}).items() if w != 0} | {p for p, _ws, _c in self.tensor_terms.get(n, [])}
        # collapse the top order when one output needs it (and it is >= 2: order 1 is one row anyway)
        self.collapse_out: Optional[int] = next(iter(tops)) if (n >= 2 and len(tops) == 1) else None

    def V(self, x: Tensor) -> Tensor:
        """(d, K) directions in x's dtype and device (small integers: exact)."""
        V = torch.zeros(self.d, self.K, dtype=torch.float64)
        for key, k in self.dirs.items():
            for i, e in key:
                V[i, k] = float(e)
        return V.to(dtype=x.dtype, device=x.device)

    def W(self, n: int, like: Tensor) -> Optional[Tensor]:
        """W_n (P, K) in like's dtype/device (None if order n has no term)."""
        table = self.exact.get(n)
        tt = self.tensor_terms.get(n, [])
        if not table and not tt:
            return None
        W = torch.zeros(self.P, self.K, dtype=torch.float64)
        for (p, k), w in (table or {}).items():
            W[p, k] = float(w)  # one rounding of the exact rational
        W = W.to(dtype=like.dtype, device=like.device)
        for p, ws, c in tt:
            row = torch.zeros(self.P, self.K, dtype=torch.float64)
            for k, w in ws.items():
                row[p, k] = float(w)
            W = W + row.to(dtype=like.dtype, device=like.device) * c.to(dtype=like.dtype, device=like.device)
        return W

    def c0(self, like: Tensor) -> Optional[Tensor]:
        if not self.c0_exact and not self.c0_tensor:
            return None
        c = torch.zeros(self.P, dtype=torch.float64)
        for p, v in self.c0_exact.items():
            c[p] = float(v)
        c = c.to(dtype=like.dtype, device=like.device)
        for p, t in self.c0_tensor:
            onehot = torch.zeros(self.P, dtype=like.dtype, device=like.device)
            onehot[p] = 1.0
            c = c + onehot * t.to(dtype=like.dtype, device=like.device)
        return c


def _exact(c: Any) -> Any:
    """A Python number as an exact rational (floats are rationals) -- so that coefficient times
    weight is rounded once, at the end."""
    if isinstance(c, (int, Fraction)):
        return Fraction(c)
    if isinstance(c, float):
        return Fraction(c) if math.isfinite(c) else c
    return c


def _check_coef(c: Any, where: str, what: str) -> Any:
    """A coefficient: a finite real Python number (kept exact) or a 0-d real tensor."""
    if isinstance(c, bool):
        raise TypeError(f"{where}: the coefficient of {what} is a bool; give a real number or a 0-d tensor")
    if isinstance(c, Tensor):
        if c.dim() != 0 or c.is_complex() or c.dtype == torch.bool:
            raise TypeError(
                f"{where}: the coefficient of {what} must be a real number or a 0-d real tensor, got a tensor of shape "
                f"{tuple(c.shape)} and dtype {c.dtype}"
            )
        return c
    if isinstance(c, numbers.Integral):
        return int(c)
    if isinstance(c, Fraction):
        return c
    if isinstance(c, numbers.Real):
        c = float(c)
        if not math.isfinite(c):
            raise ValueError(f"{where}: the coefficient of {what} is {c}; coefficients must be finite")
        return c
    raise TypeError(f"{where}: the coefficient of {what} must be a real number or a 0-d tensor, got {type(c).__name__}")


def _biharmonic_terms(d: int, dims: Optional[List[int]]) -> List[_Term]:
    axes = list(range(d)) if dims is None else dims
    out = []
    for a, i in enumerate(axes):
        alpha = [0] * d
        alpha[i] = 4
        out.append(_Term(tuple(alpha), 0, 1))
        for j in axes[a + 1 :]:
            alpha = [0] * d
            alpha[i] = alpha[j] = 2
            out.append(_Term(tuple(alpha), 0, 2))
    return out
