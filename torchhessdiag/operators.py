"""Beyond the Laplacian: the biharmonic, mixed partials to fourth order, constant-coefficient
linear operators in one call, the divergence of a vector field, and a sampled-axes Laplacian.

Public functions (re-exported by ``torchhessdiag``):

* :func:`biharmonic` -- Delta^2 u = sum_i sum_j d^4 u / dx_i^2 dx_j^2;
* :func:`partials` -- d^alpha u for multi-indices alpha (tuples of length d, total order <= 4 on
  the fast path, any order on the exact fallback);
* :func:`operator` -- sum_alpha c_alpha d^alpha u in one call;
* :func:`divergence` -- sum_i d f_i / dx_i of a vector field (N, d) -> (N, d);
* the sampled Laplacian lives in :func:`torchhessdiag.laplacian` (``num_samples=``, see
  :func:`sampled_laplacian` here for the estimator and its variance).

How: polarization, not multivariate jets
----------------------------------------
The jet machinery (torchhessdiag/graph.py, taylor.py) propagates univariate Taylor jets along
any directions v: D_v^n u = d^n/dt^n u(x + t v) at t = 0, for n <= 4, over every model it traces
(MLPs, residual and Fourier-feature nets, norms, attention, ...), with the fused ``taylor_act``
op. A mixed partial is a fixed rational combination of such directional derivatives. For a
multi-index alpha of order n = |alpha| the central finite-difference identity of the
homogeneous polynomial p(t) = D_t^n u = sum_(|beta| = n) n!/beta! t^beta d^beta u gives

    d^alpha u = 1 / (n! 2^n) * sum_(0 <= k <= alpha) (-1)^(n - |k|) C(alpha, k) D^n_(2k - alpha) u

(C(alpha, k) = prod_i C(alpha_i, k_i); the mixed central difference of order alpha kills every
monomial of p but t^alpha). The points 2k - alpha are folded onto primitive integer directions
(D^n_(lambda v) = lambda^n D^n_v), so for example

    d^2u/dxdy       = (D_(1,1)^2 - D_(1,-1)^2) / 4
    d^4u/dx^2dy^2   = (D_(1,1)^4 + D_(1,-1)^4 - 2 D_(1,0)^4 - 2 D_(0,1)^4) / 12
    d^4u/dx^3dy     = (D_(3,1)^4 - D_(3,-1)^4 - 3 D_(1,1)^4 + 3 D_(1,-1)^4) / 192
    Delta^2 u       = (1 - (d-1)/3) sum_i D_(e_i)^4 + 1/6 sum_(i<j) (D_(e_i+e_j)^4 + D_(e_i-e_j)^4)

with entries of the directions in {-alpha_i..alpha_i}, the smallest the identity allows (the
Griewank-Utke-Walther interpolation uses directions j with |j| = n >= 0 only -- 3e_i + e_j,
2e_i + 2e_j: more directions and larger entries; jet-for-pytorch's bi-Laplacian uses those, d +
3 d(d-1)/2 directions against d^2 here). Directions of all requested terms are pooled (shared
by every alpha and output that uses them) and one propagation of order max |alpha| carries them
all: K directions cost 1 + nK rows per point. Where only one combination of the top order is
needed (:func:`biharmonic`, :func:`operator`, :func:`partials` with one alpha of the largest
order), the top coefficient is carried *collapsed* -- only its weighted sum sum_k w_k D^n_(v_k)
u, (N, *S), through every layer (taylor.py: h_n enters every rule linearly and no lower
coefficient depends on it) -- so the jets carry 1 + (n-1)K + 1 rows: 3d^2 + 2 for Delta^2.

Rounding of the combination. Each D^n_v u is computed with a relative error of a few ulps times
the conditioning of the network's own evaluation, and the weights are exact rationals rounded
once to the working dtype. The combination then adds an absolute error of about
eps * sum_v |w_v| |D^n_v u| <= eps * A(alpha) * max_(|beta| = n) |d^beta u|, where
A(alpha) = sum_v |w_v| ||v||_1^n is the *amplification* of the identity
(:func:`amplification`): 1 for a pure axis derivative, 2 for d^2u/dxdy, 3 for d^4u/dx^2dy^2,
~10.7 for d^4u/dxdydzdw; 1/d^2 times the amplification of Delta^2 stays below 3 for every d
(Delta^2 u itself is a sum of d^2 terms of size max |d^beta u|). So in float64 the combination
costs a few digits at most below the 1e-16 of the jets; in float32 the same few-ulp bound at
1e-7, which tests/general/test_operators.py checks against float64.

Exact fallback
--------------
Models the jets cannot trace (and orders above 4, when asked for with ``fallback="autograd"``)
run nested ``torch.autograd.grad``, one backward per (output component, prefix of the sorted
axis sequence of alpha) -- shared prefixes are differentiated once -- with ``torch.func``'s
nested ``jvp`` where reverse mode cannot run f or its graph ends, under the same exact stand-ins
(torchhessdiag/fallback_ops.py) and the same rules for once-differentiable custom Functions as
:func:`torchhessdiag.laplacian`. No polarization there: the partials are differentiated directly.

Where things are: _polarization.py (multi-indices, the identity, plans), _nested_autograd.py (the
exact fallback), _sampled_laplacian.py, _path_common.py (what these paths share with
general.py's); this module runs a plan on the jets or the fallback and shapes its result, and
holds the public functions.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch

from . import _precision, fallback_ops, taylor
from ._nested_autograd import _nested_partials
from ._path_common import (
    PathInfo,
    _check_module,
    _check_output,
    _constant_of,
    _diagnose_shapes,
    _dims,
    _done,
    _log_slow_path,
    _Outcome,
    _prepare,
    _run_paths,
    _slow_path_reason,
    _stacklevel,
    _try_jets,
    _warn_piecewise_linear,
)
from ._polarization import (
    _biharmonic_terms,
    _check_alpha,
    _check_coef,
    _Plan,
    _seq,
    _Term,
    amplification,
    polarization,
)
from ._sampled_laplacian import _SAMPLED_ENGINE_MAX_D, sampled_laplacian  # noqa: F401  (re-exported; tests read the constant)
from .api import _ints

Tensor = torch.Tensor

__all__ = ["biharmonic", "partials", "operator", "divergence", "polarization", "amplification", "sampled_laplacian"]

#: the largest total order the jets carry
MAX_ORDER = taylor.MAX_ORDER


# ---- the dispatch: a table of paths, as in _dispatch.py ---------------------------------------


class _PlanCall(NamedTuple):
    """One checked call of a plan, as every path reads it."""

    f: Any
    x_shape: Tuple[int, ...]  # as given
    x2: Tensor  # (N, d)
    unbatched: bool
    plan: _Plan
    kind: str  # "partials" (-> f(x).shape + (P,)) or "operator" (-> f(x).shape)
    where: str
    explicit: bool  # fallback="autograd" was passed (allows orders above the jets')
    dry: bool  # explain: say which path, compute nothing
    allow_zeros: bool

    @property
    def N(self) -> int:
        return self.x2.shape[0]

    def shaped(self, out: Tensor) -> Tensor:
        return out.squeeze(0) if self.unbatched else out


def _run_plan(f, x, plan_fn, where: str, fallback, return_info: bool, allow_zeros: bool, dry: bool = False):
    """Compute a plan (:class:`_Plan`) on the first path of ``_PLAN_PATHS`` that takes it, else
    on the exact fallback. ``plan_fn(d)`` returns (plan, kind) with kind "partials" (-> f(x).shape
    + (P,)) or "operator" (-> f(x).shape)."""
    mode, x2, unbatched = _prepare(f, x, where, fallback, allow_zeros)
    plan, kind = plan_fn(x2.shape[1])
    _check_module(f, x2, where)
    explicit = fallback == "autograd"
    if plan.order:
        _precision.warn_if_tf32(x2)
    call = _PlanCall(f, tuple(x.shape), x2, unbatched, plan, kind, where, explicit, dry, allow_zeros)
    slow_mode = "autograd" if explicit else mode
    result, info = _run_paths(
        _PLAN_PATHS, call, lambda reasons: _plan_autograd_path(call, _slow_path_allowed(slow_mode, where, reasons, f))
    )
    return _done(result, info, return_info, dry)


def _slow_path_allowed(mode: str, where: str, reasons: List[str], f) -> str:
    reason = _slow_path_reason(mode, where, reasons)
    _log_slow_path(where, f, reason)
    return reason


def _plan_forward_path(c: _PlanCall) -> _Outcome:
    """Order 0: the value only."""
    if c.plan.order != 0:
        return ""
    info = PathInfo("forward", "order 0: f(x) only")
    if c.dry:
        return None, info
    value = _check_output(c.f(c.x2), c.N, c.where)
    return c.shaped(_assemble(c.plan, value, [], c.kind)), info


def _plan_jet_path(c: _PlanCall) -> _Outcome:
    """Taylor jets along the plan's directions over the traced graph (polarization), the top order
    collapsed where one combination of it is needed; orders up to MAX_ORDER."""
    plan, n = c.plan, c.plan.order
    if n > MAX_ORDER:
        if not c.explicit:
            raise ValueError(
                f"{c.where}: total order {n} is above the {MAX_ORDER} the Taylor jets carry; pass fallback='autograd' to "
                "compute it exactly by nested autograd (one backward per output component and derivative, slow)"
            )
        return f"order {n} is above the jets' {MAX_ORDER}"
    V = plan.V(c.x2)
    collapsed = plan.collapse_out is not None
    Wtop = plan.W(n, c.x2) if collapsed else None
    weights = Wtop[plan.collapse_out] if collapsed else None
    reasons: List[str] = []
    got = _try_jets(c.f, c.x2, V, n, collapsed, weights, c.where, c.x_shape, reasons)
    if got is None:
        return reasons[0]
    out_jet, ctx, program = got
    rows = 1 + (n - 1) * plan.K + 1 if collapsed else 1 + n * plan.K
    info = PathInfo(
        "jet",
        f"traced graph of supported pieces ({len(program.activations)} activation nodes): Taylor jets of order {n} "
        f"along {plan.K} directions (polarization), {rows} rows per point" + (", top order collapsed" if collapsed else ""),
    )
    if c.dry:
        return None, info
    value = _check_output(out_jet.value if isinstance(out_jet, taylor.Jet) else out_jet, c.N, c.where)
    coefs = out_jet.coefs if isinstance(out_jet, taylor.Jet) else [None] * n
    if n >= 2 and ctx.piecewise_linear_seen and all(co is None for co in coefs[1:]):
        _warn_piecewise_linear(_stacklevel() + 1)
    return c.shaped(_assemble(plan, value, coefs, c.kind)), info


_PLAN_PATHS = (_plan_forward_path, _plan_jet_path)


def _plan_autograd_path(c: _PlanCall, reason: str) -> Tuple[Any, PathInfo]:
    """Nested autograd per multi-index (``reason``: why no fast path applied), under the exact
    stand-ins of fallback_ops.py; no polarization: the partials are differentiated directly."""
    info = PathInfo("autograd", reason, "nested torch.autograd.grad per multi-index (torch.func nested jvp where it cannot)")
    if c.dry:
        return None, info
    plan = c.plan
    seqs = sorted({_seq(t.alpha) for t in plan.terms if sum(t.alpha)})
    with fallback_ops.ExactDerivatives():
        try:
            y = c.f(c.x2)
        except RuntimeError as e:
            _diagnose_shapes(c.f, c.x2, c.where, e)
            raise
        value = _check_output(y, c.N, c.where)
        derivs, method = _nested_partials(c.f, c.x2, seqs, c.allow_zeros, c.where)
    by_seq = {s: _constant_of(t, value) for s, t in zip(seqs, derivs)}
    return c.shaped(_combine_direct(plan, value, by_seq, c.kind)), PathInfo("autograd", reason, method)


def _assemble(plan: _Plan, value: Tensor, coefs: List[Optional[Tensor]], kind: str) -> Tensor:
    """output[..., p] = c0[p] u + sum_n sum_k W_n[p, k] D^n_(v_k) u, from the output jet."""
    N, S = value.shape[0], tuple(value.shape[1:])
    n = plan.order
    out: Optional[Tensor] = None
    c0 = plan.c0(value)
    if c0 is not None:
        out = value.unsqueeze(-1) * c0
    for k, c in enumerate(coefs, start=1):
        if c is None:
            continue
        if plan.collapse_out is not None and k == n:  # (N, *S): already the weighted sum
            if c.dim() == value.dim() - 1:
                c = c.unsqueeze(0).expand((N,) + tuple(c.shape))
            onehot = torch.zeros(plan.P, dtype=value.dtype, device=value.device)
            onehot[plan.collapse_out] = 1.0
            term = c.unsqueeze(-1) * onehot
        else:
            W = plan.W(k, value)
            if W is None:
                continue
            if c.dim() == value.dim():  # shared first order (K, *S)
                c = c.unsqueeze(0).expand((N,) + tuple(c.shape))
            term = torch.matmul(c.movedim(1, -1), W.t())  # (N, *S, K) @ (K, P)
        out = term if out is None else out + term
    if out is None:
        out = _constant_of(value.new_zeros((N,) + S + (plan.P,)), value)
    elif out.shape != (N,) + S + (plan.P,):
        out = out.expand((N,) + S + (plan.P,))
    if 0 in out.stride():
        out = out.contiguous()
    return out.squeeze(-1) if kind == "operator" else out


def _combine_direct(plan: _Plan, value: Tensor, derivs: Dict[Tuple[int, ...], Tensor], kind: str) -> Tensor:
    """The same output from the partials themselves (the exact fallback: no polarization)."""
    cols: List[Optional[Tensor]] = [None] * plan.P
    for t in plan.terms:
        part = value if not sum(t.alpha) else derivs[_seq(t.alpha)]
        c = t.coef
        if isinstance(c, Tensor):
            term = part * c.to(dtype=value.dtype, device=value.device)
        else:
            term = part * float(c) if c != 1 else part
        cols[t.out] = term if cols[t.out] is None else cols[t.out] + term
    cols = [c if c is not None else _constant_of(torch.zeros_like(value), value) for c in cols]
    out = torch.stack(cols, -1)
    return out.squeeze(-1) if kind == "operator" else out


# ---- public functions ----------------------------------------------------------------------------


def partials(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    alphas,
    *,
    fallback: Optional[str] = None,
    return_info: bool = False,
    allow_unconfirmed_zeros: bool = False,
):
    """Mixed partial derivatives d^alpha u for a list of multi-indices, per point, in one call.

    Args:
        f: an ``nn.Module`` or any callable mapping x (N, d) to (N,) or (N, m), rows independent
            (as for :func:`torchhessdiag.laplacian`).
        x: (N, d) points, or one unbatched (d,) point; float32 or float64.
        alphas: a sequence of multi-indices, each a tuple of d non-negative ints: alpha = (2, 2)
            is d^4u/dx^2dy^2 of a 2-input model, (1, 0, 1) is d^2u/dx dz, (0, ..., 0) is u.
            Total order |alpha| <= 4 (the jets); higher orders only with ``fallback="autograd"``
            (exact nested autograd, slow).
        fallback, return_info, allow_unconfirmed_zeros: as for :func:`torchhessdiag.laplacian`.

    Returns:
        ``f(x).shape + (len(alphas),)``: out[..., j] = d^(alphas[j]) u. Differentiable w.r.t. the
        parameters (and x) when grad mode is on; never ``None``.

    On the jet path every alpha is a fixed rational combination of directional derivatives
    (module docstring: the central polarization identity; :func:`polarization` shows it), with
    the directions of all alphas pooled into one propagation.
    """
    where = "torchhessdiag.partials"

    def plan_fn(d: int):
        if isinstance(alphas, (str, bytes, Mapping)) or not hasattr(alphas, "__iter__"):
            raise TypeError(f"{where}: alphas must be a list of multi-indices (tuples of {d} ints), got {type(alphas).__name__}")
        items = list(alphas.tolist() if isinstance(alphas, Tensor) else alphas)
        if not items:
            raise ValueError(f"{where}: alphas is empty; give at least one multi-index")
        if all(isinstance(a, numbers.Integral) for a in items):
            raise TypeError(
                f"{where}: alphas must be a list of multi-indices, got the flat sequence {tuple(items)!r}; for one "
                f"multi-index pass [{tuple(items)!r}]"
            )
        terms = [_Term(_check_alpha(a, d, where, f"alphas[{j}]"), j, 1) for j, a in enumerate(items)]
        return _Plan(d, terms, len(terms)), "partials"

    return _run_plan(f, x, plan_fn, where, fallback, return_info, allow_unconfirmed_zeros)


def operator(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    terms: Mapping,
    *,
    fallback: Optional[str] = None,
    return_info: bool = False,
    allow_unconfirmed_zeros: bool = False,
):
    """A linear differential operator with constant coefficients, sum_alpha c_alpha d^alpha u,
    per point, in one call.

    Args:
        f, x: as for :func:`partials`.
        terms: ``{alpha: coefficient}``; alpha a multi-index (tuple of d ints >= 0, the zero
            multi-index being u itself), the coefficient a real number or a 0-d tensor (which
            may require grad: a learned PDE coefficient gets its gradient). E.g. the plate
            operator Delta^2 in 2-D: ``{(4, 0): 1, (2, 2): 2, (0, 4): 1}``; Helmholtz
            ``{(2, 0): 1, (0, 2): 1, (0, 0): k**2}``.
        fallback, return_info, allow_unconfirmed_zeros: as for :func:`torchhessdiag.laplacian`.

    Returns:
        A tensor shaped like ``f(x)``.

    One propagation of order max |alpha| along the pooled directions of every term; the top
    order is carried collapsed (only its weighted sum), so e.g. Delta^2 + k Delta costs the same
    rows as Delta^2.
    """
    where = "torchhessdiag.operator"

    def plan_fn(d: int):
        if not isinstance(terms, Mapping):
            raise TypeError(f"{where}: terms must be a dict {{alpha: coefficient}}, got {type(terms).__name__}")
        if not terms:
            raise ValueError(f"{where}: terms is empty; give at least one {{alpha: coefficient}}")
        ts = []
        for j, (a, c) in enumerate(terms.items()):
            alpha = _check_alpha(a, d, where, f"the multi-index {a!r}")
            ts.append(_Term(alpha, 0, _check_coef(c, where, f"{alpha}")))
        return _Plan(d, ts, 1), "operator"

    return _run_plan(f, x, plan_fn, where, fallback, return_info, allow_unconfirmed_zeros)


def biharmonic(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    dims=None,
    *,
    fallback: Optional[str] = None,
    return_info: bool = False,
    allow_unconfirmed_zeros: bool = False,
):
    """The biharmonic (bi-Laplacian) Delta^2 u = sum_i sum_j d^4 u / dx_i^2 dx_j^2 per point.

    Args:
        f, x: as for :func:`torchhessdiag.laplacian`.
        dims: the input dimensions i, j run over (default all): ``[1, 2]`` for the spatial
            biharmonic of a (t, x, y) model.
        fallback, return_info, allow_unconfirmed_zeros: as for :func:`torchhessdiag.laplacian`.

    Returns:
        A tensor shaped like ``f(x)``, differentiable for training.

    Jet path: D = len(dims) axes and the D(D-1) directions e_i +- e_j, with weights
    1 - (D-1)/3 and 1/6 (:func:`polarization` of each term, pooled), fourth order, top order
    collapsed: 3 D^2 + 2 rows per point. Exact fallback: nested autograd over the multi-indices
    (4 e_i and 2 e_i + 2 e_j, shared prefixes once).
    """
    where = "torchhessdiag.biharmonic"

    def plan_fn(d: int):
        dl = _dims(dims, d, where)
        return _Plan(d, _biharmonic_terms(d, dl), 1), "operator"

    return _run_plan(f, x, plan_fn, where, fallback, return_info, allow_unconfirmed_zeros)


def divergence(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    dims=None,
    *,
    components=None,
    fallback: Optional[str] = None,
    return_info: bool = False,
):
    """The divergence sum_k d f_(c_k) / dx_(i_k) of a vector field, per point.

    Args:
        f: maps x (N, d) to (N, m) (rows independent).
        x: (N, d) points, or one unbatched (d,) point; float32 or float64.
        dims: the input dimensions i_k differentiated (default all d).
        components: the output components c_k paired with them, one per entry of ``dims``.
            Default: ``dims`` itself when m = d (f: (N, d) -> (N, d), the usual vector field);
            else ``range(len(dims))`` when m = len(dims) (e.g. a (t, x, y) -> (u, v) model with
            ``dims=[1, 2]``); otherwise give them, e.g. ``dims=[1, 2], components=[0, 1]`` for
            a (t, x, y) -> (u, v, p) model's div (u, v).
        fallback, return_info: as for :func:`torchhessdiag.laplacian`.

    Returns:
        (N,) (unbatched: ()), differentiable for training.

    Jet path: first-order jets along the K = len(dims) axes (forward mode: K + 1 rows per point,
    shared by every point until the first nonlinearity), the diagonal entries summed. Exact
    fallback: one backward per output component.
    """
    return _divergence(f, x, dims, components, fallback, return_info, "torchhessdiag.divergence")


def _divergence(f, x, dims, components, fallback, return_info: bool, where: str, dry: bool = False):
    mode, x2, unbatched = _prepare(f, x, where, fallback, False)
    N, d = x2.shape
    dl = _dims(dims, d, where)
    axes = list(range(d)) if dl is None else dl
    _check_module(f, x2, where)
    comps_given = None if components is None else _ints(components, "components", where)
    if comps_given is not None and len(comps_given) != len(axes):
        raise ValueError(
            f"{where}: components has {len(comps_given)} entries but dims has {len(axes)}; give one output "
            "component per differentiated input dimension"
        )

    def comps_for(m: int) -> List[int]:
        if comps_given is not None:
            bad = [c for c in comps_given if not -m <= c < m]
            if bad:
                raise ValueError(f"{where}: components {bad} out of range for f(x) with m = {m} outputs")
            return [c % m for c in comps_given]
        if m == d:
            return list(axes)
        if m == len(axes):
            return list(range(m))
        raise ValueError(
            f"{where}: f(x) has m = {m} output components but x has d = {d} input dimensions"
            + (f" and dims selects {len(axes)}" if dl is not None else "")
            + "; a divergence pairs output components with input dimensions: pass components=[...] "
            "(one per entry of dims), e.g. dims=[1, 2], components=[0, 1] for (t, x, y) -> (u, v, p)"
        )

    def check_vector(y: Tensor) -> Tensor:
        y = _check_output(y, N, where)
        if y.dim() != 2:
            raise ValueError(f"{where}: f(x) must be a vector field (N, m), got shape {tuple(y.shape)}")
        return y

    reasons: List[str] = []
    _precision.warn_if_tf32(x2)
    got = _try_jets(f, x2, None, 1, False, None, where, x.shape, reasons, axes=torch.tensor(axes, dtype=torch.long))
    if got is not None:
        out_jet, ctx, program = got
        info = PathInfo(
            "jet",
            f"traced graph of supported pieces ({len(program.activations)} activation nodes): first-order jets along {len(axes)} axes",
        )
        if dry:
            return _done(None, info, return_info, dry)
        value = check_vector(out_jet.value if isinstance(out_jet, taylor.Jet) else out_jet)
        comps = comps_for(value.shape[1])
        c1 = out_jet.coefs[0] if isinstance(out_jet, taylor.Jet) else None
        K = len(axes)
        if c1 is None:
            res = _constant_of(value.new_zeros(N), value)
        elif c1.dim() == 2:  # shared (K, m): the same at every point
            res = c1[torch.arange(K, device=c1.device), comps].sum().expand(N).contiguous()
            res = _constant_of(res, value) if not res.requires_grad else res
        else:
            res = c1[:, torch.arange(K, device=c1.device), comps].sum(1)
        return _done(res.squeeze(0) if unbatched else res, info, return_info, dry)
    reason = _slow_path_allowed(mode, where, reasons, f)
    if dry:
        return _done(None, PathInfo("autograd", reason, "nested torch.autograd.grad (one backward per output component)"), return_info, dry)
    with fallback_ops.ExactDerivatives():
        try:
            y = f(x2)
        except RuntimeError as e:
            _diagnose_shapes(f, x2, where, e)
            raise
        value = check_vector(y)
        comps = comps_for(value.shape[1])
        derivs, method = _nested_partials(f, x2, [(i,) for i in axes], False, where)
    res = sum(derivs[k][:, c] for k, c in enumerate(comps))
    res = _constant_of(res, value)
    return _done(res.squeeze(0) if unbatched else res, PathInfo("autograd", reason, method), return_info, dry)


# ---- explain -----------------------------------------------------------------------------------


def explain(f, x, function: str, dims=None, alphas=None, components=None) -> PathInfo:
    """The path of :func:`biharmonic`, :func:`partials` (``alphas``: the multi-indices),
    :func:`operator` (``alphas``: the ``{alpha: coefficient}`` dict) or :func:`divergence`
    (``components``) for (f, x) -- ``torchhessdiag.explain`` calls this. The fast paths run once
    without a graph; the slow path is not run."""
    where = "torchhessdiag.explain"
    with torch.no_grad():
        if function == "divergence":
            return _divergence(f, x, dims, components, "autograd", True, where, dry=True)[1]
        if function == "biharmonic":

            def plan_fn(d: int):
                return _Plan(d, _biharmonic_terms(d, _dims(dims, d, where)), 1), "operator"

        elif function == "partials":
            if alphas is None or isinstance(alphas, Mapping):
                raise ValueError(f"{where}: function='partials' needs alphas=[multi-index, ...]")
            items = list(alphas)

            def plan_fn(d: int):
                terms = [_Term(_check_alpha(a, d, where, f"alphas[{j}]"), j, 1) for j, a in enumerate(items)]
                return _Plan(d, terms, len(terms)), "partials"

        elif function == "operator":
            if not isinstance(alphas, Mapping) or not alphas:
                raise ValueError(f"{where}: function='operator' needs alphas={{alpha: coefficient, ...}}")

            def plan_fn(d: int):
                terms = [
                    _Term(_check_alpha(a, d, where, f"the multi-index {a!r}"), 0, _check_coef(c, where, str(a))) for a, c in alphas.items()
                ]
                return _Plan(d, terms, 1), "operator"

        else:
            raise ValueError(f"{where}: unknown function {function!r}")
        return _run_plan(f, x, plan_fn, where, "autograd", True, False, dry=True)[1]
