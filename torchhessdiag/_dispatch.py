"""The dispatch of ``laplacian`` / ``hessian_diag`` / ``axis_derivatives`` (general.py): a table of
paths tried in order -- the MLP engine, the value alone (order 0), Taylor jets over the traced
graph -- each of which returns its result with its :class:`PathInfo` or declines with a reason;
when all decline, exact nested autograd (or NotImplementedError in ``fallback="error"`` mode).
Each path shapes its own result.

Import direction: above ``_path_common``, ``_nested_autograd``, the engine and the jets; below
``_sampled_laplacian``, ``operators`` and ``general``.
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from . import _precision, engine, fallback_ops, taylor
from ._nested_autograd import _autograd_derivatives
from ._path_common import (
    PathInfo,
    _check_module,
    _check_output,
    _constant_of,
    _diagnose_shapes,
    _log_slow_path,
    _Outcome,
    _prepare,
    _run_paths,
    _slow_path_reason,
    _stacklevel,
    _try_jets,
    _warn_piecewise_linear,
)
from .api import _dims_list, _dims_matrix

Tensor = torch.Tensor



class _Call(NamedTuple):
    """One checked call, as every path reads it."""

    f: Any
    x: Tensor  # as given
    x2: Tensor  # (N, d)
    unbatched: bool
    dims: Any  # as given (None: all)
    axes: Tensor  # (K,) the dims as axis indices
    what: str  # "laplacian", "diag" or "axis"
    order: int
    where: str
    dry: bool  # explain: say which path, compute nothing
    allow_zeros: bool
    weights: Optional[Tensor]  # (K,): the weighted partial Laplacian
    use_engine: bool

    @property
    def N(self) -> int:
        return self.x2.shape[0]

    @property
    def d(self) -> int:
        return self.x2.shape[1]

    @property
    def K(self) -> int:
        return self.axes.shape[0]


def _compute(
    f, x, dims, what: str, order: int, fallback, return_info: bool, where: str, dry: bool = False, allow_zeros: bool = False,
    weights: Optional[Tensor] = None, path_note: str = "", use_engine: bool = True,
):
    """The dispatch of every public function of general.py. ``weights`` (K,) >= 0, with ``what ==
    "laplacian"`` and explicit ``dims``: the weighted partial Laplacian sum_k w_k d^2 f/dx_(i_k)^2
    (the sampled Laplacian, torchhessdiag/_sampled_laplacian.py); ``path_note`` is appended to the
    PathInfo's reason; ``use_engine=False`` skips the MLP engine (the sampled Laplacian at large d on
    the CPU, see sampled_laplacian)."""
    mode, x2, unbatched = _prepare(f, x, where, fallback, allow_zeros)
    d = x2.shape[1]
    # validated here; the (d, K) selection matrix is built only where a path needs it (the engine,
    # the fallback): the jets take the axes themselves (memory flat in d for a few axes of many)
    _dims_matrix(dims, d, torch.empty(0, device="meta"), where)
    axes = torch.arange(d) if dims is None else torch.tensor(_dims_list(dims, d), dtype=torch.long)
    _check_module(f, x2, where)
    if weights is not None:  # internal: checked by the caller
        if what != "laplacian" or dims is None or weights.shape != (axes.shape[0],):
            raise ValueError(f"{where}: weights need a Laplacian over explicit dims, one per axis")
        weights = weights.to(dtype=x2.dtype, device=x2.device)
    call = _Call(f, x, x2, unbatched, dims, axes, what, order, where, dry, allow_zeros, weights, use_engine)

    result, info = _run_paths(_FAST_PATHS, call, lambda reasons: _autograd_path(call, _slow_path_reason(mode, where, reasons)))
    if path_note:
        info = info._replace(reason=f"{info.reason}; {path_note}")
    return (result, info) if (return_info or dry) else result


# ---- the paths -----------------------------------------------------------------------------------


def _engine_path(c: _Call) -> _Outcome:
    """An ``nn.Sequential`` MLP that the engine accepts: the K+2-row reverse sweep."""
    if not (c.use_engine and (c.what in ("laplacian", "diag") or (c.what == "axis" and c.order == 2))):
        return ""
    if not isinstance(c.f, nn.Module):
        return ""
    try:
        layers = engine.parse_mlp(c.f, c.where)
    except NotImplementedError as e:
        why = str(e).split("; supported")[0].replace(f"{c.where}: ", "")
        return f"not an MLP the engine accepts ({why})"
    engine.check_input(layers, c.x2, c.where)
    Vsel = _dims_matrix(c.dims, c.d, c.x2, c.where)
    info = PathInfo("engine", "an nn.Sequential MLP: the K+2-row engine")
    if c.dry:
        return None, info
    if engine.all_piecewise_linear(layers):  # frames walked only when it warns (and
        # sys._getframe is a graph break under torch.compile)
        engine._warn_if_piecewise_linear(layers, stacklevel=_stacklevel() + 1)
    if c.what == "axis":
        res = engine.run(layers, c.x2, Vsel, "diag", need_gradient=True)
        grad = res.gradient if Vsel is None else res.gradient[..., Vsel.argmax(0)]  # (N, m, D)
        out = torch.stack([res.value.unsqueeze(-1).expand_as(res.second), grad, res.second])
        return (out.squeeze(1) if c.unbatched else out), info
    Veng = Vsel if c.weights is None else Vsel * c.weights.sqrt()  # sum_k (sqrt(w_k) e_k)^T H (...)
    res = engine.run(layers, c.x2, Veng, "sum" if c.what == "laplacian" else "diag")
    return (res.second.squeeze(0) if c.unbatched else res.second), info


def _forward_path(c: _Call) -> _Outcome:
    """Order 0 of ``axis_derivatives``: the value only."""
    if not (c.what == "axis" and c.order == 0):
        return ""
    info = PathInfo("forward", "order 0: f(x) only")
    if c.dry:
        return None, info
    y = _check_output(c.f(c.x2), c.N, c.where)
    out = y.unsqueeze(-1).expand(tuple(y.shape) + (c.K,)).unsqueeze(0).clone()
    return (out.squeeze(1) if c.unbatched else out), info


def _jet_path(c: _Call) -> _Outcome:
    """Taylor jets along the axes over the traced graph, orders up to taylor.MAX_ORDER."""
    # the TF32 policy (torchhessdiag/_precision.py) for this path and the autograd one after it;
    _precision.warn_if_tf32(c.x2)
    if c.order > taylor.MAX_ORDER:
        return f"order {c.order} is above the jets' {taylor.MAX_ORDER}"
    reasons: List[str] = []
    got = _try_jets(c.f, c.x2, None, c.order, c.what == "laplacian", c.weights, c.where, c.x.shape, reasons, axes=c.axes)
    if got is None:
        return reasons[0]
    out, ctx, program = got
    info = PathInfo("jet", f"traced graph of supported pieces ({len(program.activations)} activation nodes)")
    if c.dry:
        return None, info
    N, K = c.N, c.K
    value = _check_output(out.value if isinstance(out, taylor.Jet) else out, N, c.where)
    coefs = out.coefs if isinstance(out, taylor.Jet) else [None] * c.order
    if c.order >= 2 and ctx.piecewise_linear_seen and all(co is None for co in coefs[1:]):
        _warn_piecewise_linear(_stacklevel() + 1)
    S = tuple(value.shape[1:])
    derivs = []
    for k, co in enumerate(coefs, start=1):
        summed = c.what == "laplacian" and k == 2
        if co is None:
            co = value.new_zeros((N,) + S if summed else (N, K) + S)
        elif not summed and co.dim() == value.dim():  # shared first order (K, *S)
            co = co.unsqueeze(0).expand((N,) + tuple(co.shape))
        derivs.append(_constant_of(co, value))
    return _finish(c.what, value, derivs, c.unbatched), info


_FAST_PATHS = (_engine_path, _forward_path, _jet_path)


def _autograd_path(c: _Call, reason: str) -> Tuple[Any, PathInfo]:
    """Exact nested autograd (``reason``: why no fast path applied), under the exact stand-ins of
    fallback_ops.py."""
    if c.dry:
        return None, PathInfo("autograd", reason, "nested torch.autograd.grad (torch.func nested jvp where it cannot)")
    x2, where = c.x2, c.where
    V = torch.eye(c.d, dtype=x2.dtype, device=x2.device) if c.dims is None else _dims_matrix(c.dims, c.d, x2, where)
    _log_slow_path(where, c.f, reason)
    with fallback_ops.ExactDerivatives():  # layer_norm & co. with exact higher derivatives
        try:
            y = c.f(x2)
        except RuntimeError as e:
            _diagnose_shapes(c.f, x2, where, e)
            raise
        value = _check_output(y, c.N, where)
        derivs, method = _autograd_derivatives(c.f, x2, V, c.order, c.allow_zeros, where)
    derivs = [_constant_of(t, value) for t in derivs]
    if c.what == "laplacian":
        d2 = derivs[1]
        if c.weights is not None:
            d2 = d2 * c.weights.reshape((1, -1) + (1,) * (d2.dim() - 2))
        derivs = [derivs[0], d2.sum(1)]
    return _finish(c.what, value, derivs, c.unbatched), PathInfo("autograd", reason, method)


def _finish(what: str, value: Tensor, derivs: List[Tensor], unbatched: bool):
    """Assemble the public result of the jet and autograd paths from the value (N, *S) and the
    derivatives: for "laplacian" derivs = [d1 (N, K, *S) or None, sum (N, *S)]; otherwise each
    (N, K, *S)."""
    if what == "laplacian":
        out = derivs[1]
    elif what == "diag":
        out = derivs[1].movedim(1, -1)
    else:
        K = derivs[0].shape[1] if derivs else None
        rows = [value.unsqueeze(-1).expand(tuple(value.shape) + (K,))] + [t.movedim(1, -1) for t in derivs]
        out = torch.stack(rows)
        return out.squeeze(1) if unbatched else out
    if 0 in out.stride():  # an expanded constant: give the caller memory of its own
        out = out.contiguous()
    return out.squeeze(0) if unbatched else out
