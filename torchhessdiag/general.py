"""Laplacians, Hessian diagonals and axis derivatives of arbitrary models and functions.

Each call takes the first of these exact paths that applies:

1. ``engine`` -- an ``nn.Sequential`` MLP that the MLP engine accepts (torchhessdiag/engine.py):
   K+2 rows per point, fused layer kernels (``laplacian``, ``hessian_diag``, and
   ``axis_derivatives`` of order 2);
2. ``jet`` -- a model or function that torch.fx traces into supported pieces (linear layers,
   table activations as modules or functions, add/sub, products, division, real powers,
   indexing/concatenation of feature dims, sums, residual connections, input normalisation,
   sin/cos/exp features, LayerNorm/RMSNorm, softmax, attention): Taylor jets along the
   coordinate axes, propagated over the traced graph (torchhessdiag/graph.py, taylor.py,
   taylor_nn.py), orders 1-4. The trace is cached per model (graph.get_program; see
   :func:`clear_trace_cache`);
3. ``autograd`` -- everything else (Python control flow on tensor values, ops without a jet rule,
   custom autograd.Functions, orders above 4): nested ``torch.autograd.grad`` (reverse over
   reverse, one backward per output component, axis and order), with ``torch.func``'s nested
   ``jvp`` (vmapped over the axes) where reverse mode cannot run ``f`` or where its backward graph
   ends (see :func:`_autograd_derivatives` for why in this order), while f's layer_norm,
   instance_norm and attention run as exact stand-ins (torchhessdiag/fallback_ops.py: torch's own
   higher derivatives of those are wrong or missing). Once-differentiable custom Functions raise
   (``allow_unconfirmed_zeros=True``: zeros with a warning). It says so once per cause in a
   debug-level message of the ``"torchhessdiag"`` logger; ``fallback="error"`` (or
   :func:`set_fallback`, or the environment variable ``TORCHHESSDIAG_FALLBACK=error``) turns it
   into a ``NotImplementedError``.

``return_info=True`` returns ``(result, PathInfo)``; :func:`explain` tells which path a call
takes without computing the slow path.

Assumption: the rows of ``x`` are independent points -- row n of ``f(x)`` depends on row n of
``x`` only (true for MLPs and pointwise models; false e.g. for BatchNorm in training mode).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import nn

from . import engine, fallback_ops, graph, ops, taylor
from ._nested_autograd import _autograd_derivatives, _func_derivatives  # noqa: F401  (tests, benchmarks)
from ._path_common import (
    PathInfo,
    _check_mode,
    _check_module,
    _check_output,
    _constant_of,
    _diagnose_shapes,
    _logged,
    _stacklevel,
    _warn_piecewise_linear,
    get_fallback,
    logger,
    set_fallback,
)
from .api import _dims_list, _dims_matrix

Tensor = torch.Tensor

__all__ = [
    "PathInfo",
    "laplacian",
    "hessian_diag",
    "axis_derivatives",
    "explain",
    "set_fallback",
    "get_fallback",
    "clear_trace_cache",
    "trace_cache_info",
]


def clear_trace_cache(f: Optional[Callable] = None) -> None:
    """Forget the traced programs of ``f`` (a model or function), or of every model.

    ``laplacian`` / ``hessian_diag`` / ``axis_derivatives`` trace a model with torch.fx once and
    reuse the program while the model is unchanged: the cache checks on every call the model's
    structure (submodules, their classes, train/eval, hyper-parameters, hooks, which parameters
    are None), the input's feature count, dtype and device, grad mode and the registered
    activations; weights are read on every run. Entries live as long as their model. Clearing is
    never needed for correctness after changes to the model's own attributes; it is after changes
    the signature cannot see (e.g. rebinding a global that a helper called by a plain function
    reads, or monkey-patching a class's forward)."""
    graph.clear_cache(f)


def trace_cache_info() -> dict:
    """Counters of the trace cache: ``models`` and ``programs`` cached now (failures included),
    ``hits`` and ``misses`` since the process started."""
    return graph.cache_info()


# ---- public functions --------------------------------------------------------------------------


def laplacian(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    dims=None,
    *,
    num_samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    sample_weights=None,
    fallback: Optional[str] = None,
    return_info: bool = False,
    allow_unconfirmed_zeros: bool = False,
):
    """Exact Laplacian sum_i d^2 f / dx_i^2 of any model or function, per point (or, with
    ``num_samples``, an unbiased estimate from sampled axes).

    Args:
        f: an ``nn.Module`` or any callable mapping x (N, d) to (N,) or (N, m), whose rows are
            independent (row n of f(x) depends only on row n of x).
        x: (N, d) points, or one unbatched (d,) point; float32 or float64.
        dims: the input dimensions to sum over (default all), e.g. ``[1, 2]`` for the spatial
            Laplacian of a (t, x, y) model.
        fallback: ``"autograd"`` or ``"error"`` when no fast path applies (default: the global
            mode, see :func:`set_fallback`).
        num_samples: S >= 1: the sampled Laplacian -- S axes of ``dims`` drawn (uniformly
            without replacement, the same axes for every point of the call), each second
            derivative exact, scaled so that the estimate is unbiased; cost grows with S, not d.
            Variance and importance sampling: :func:`torchhessdiag.operators.sampled_laplacian`.
        generator: a ``torch.Generator`` for that draw (default: torch's global generator).
        sample_weights: (len(dims),) positive weights: draw the S axes with replacement with
            probabilities proportional to them (importance sampling; still unbiased).
        return_info: also return a :class:`PathInfo` saying which path ran.
        allow_unconfirmed_zeros: on the autograd fallback, a derivative of order >= 2 through a
            custom ``torch.autograd.Function`` whose backward cannot be differentiated again
            (``@once_differentiable``, a backward that detaches) is unknown: by default that raises
            a NotImplementedError naming the Function; True returns 0 there with a warning.

    Returns:
        A tensor shaped like ``f(x)``: (N,) or (N, m) (unbatched: () or (m,)). Never ``None``; zeros
        where f is linear in x. Differentiable w.r.t. the parameters (and x) when grad mode is on.
    """
    if num_samples is not None:
        from .operators import sampled_laplacian

        return sampled_laplacian(
            f, x, dims, num_samples=num_samples, generator=generator, sample_weights=sample_weights,
            fallback=fallback, return_info=return_info, allow_unconfirmed_zeros=allow_unconfirmed_zeros,
        )
    if generator is not None or sample_weights is not None:
        raise ValueError("torchhessdiag.laplacian: generator and sample_weights belong to the sampled Laplacian; pass num_samples=S too")
    return _compute(f, x, dims, "laplacian", 2, fallback, return_info, "torchhessdiag.laplacian", allow_zeros=allow_unconfirmed_zeros)


def hessian_diag(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    dims=None,
    *,
    fallback: Optional[str] = None,
    return_info: bool = False,
    allow_unconfirmed_zeros: bool = False,
):
    """Exact Hessian diagonal d^2 f / dx_i^2 for i in ``dims`` (default all), per point.

    Same arguments as :func:`laplacian`. Returns ``f(x).shape + (D,)`` with D = len(dims): (N, D)
    for a scalar f, (N, m, D) for m outputs (unbatched: no N). Never builds the d x d Hessian.
    """
    return _compute(f, x, dims, "diag", 2, fallback, return_info, "torchhessdiag.hessian_diag", allow_zeros=allow_unconfirmed_zeros)


def axis_derivatives(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    order: int = 4,
    dims=None,
    *,
    fallback: Optional[str] = None,
    return_info: bool = False,
    allow_unconfirmed_zeros: bool = False,
):
    """Derivatives d^k f / dx_i^k along the coordinate axes, for k = 0..order, in one tensor.

    Layout: ``out[k]`` has the shape of :func:`hessian_diag`, ``f(x).shape + (D,)``:
    ``out[k][n, ..., j] = d^k f / dx_i^k`` at point n for i = dims[j]. So ``out[0]`` is f(x)
    repeated over the D axes, ``out[1]`` the gradient entries, ``out[2]`` the Hessian diagonal,
    ``out[3]``, ``out[4]`` the third and fourth derivatives. Shape ``(order + 1,) + f(x).shape +
    (D,)`` (unbatched x: no N).

    Orders up to 4 propagate Taylor jets (Faa di Bruno's formula with sigma'''' from the
    derivative table) on supported models (an MLP is a trivial graph; order 2 on an MLP runs the
    engine); higher orders, and unsupported models, use exact nested autograd. Any order >= 0.
    """
    where = "torchhessdiag.axis_derivatives"
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(f"{where}: order must be an int >= 0, got {order!r}")
    return _compute(f, x, dims, "axis", order, fallback, return_info, where, allow_zeros=allow_unconfirmed_zeros)


_OPERATOR_FUNCTIONS = ("biharmonic", "partials", "operator", "divergence")


def explain(
    f: Callable[[Tensor], Tensor], x: Tensor, function: str = "laplacian", order: int = 4, dims=None, *, alphas=None, components=None
) -> PathInfo:
    """Which path ``laplacian`` / ``hessian_diag`` / ``axis_derivatives`` / ``biharmonic`` /
    ``partials`` / ``operator`` / ``divergence`` (``function``) takes for (f, x), and why. The
    fast paths are run once (without a graph) to be sure they apply; the slow path is not run, so
    ``method`` is not known then. ``alphas``: the multi-indices of ``partials`` or the
    ``{alpha: coefficient}`` dict of ``operator``; ``components``: those of ``divergence``."""
    if function in _OPERATOR_FUNCTIONS:
        from . import operators

        return operators.explain(f, x, function, dims=dims, alphas=alphas, components=components)
    what = {"laplacian": "laplacian", "hessian_diag": "diag", "axis_derivatives": "axis"}.get(function)
    if what is None:
        raise ValueError(
            "explain: function must be 'laplacian', 'hessian_diag', 'axis_derivatives', 'biharmonic', 'partials', "
            f"'operator' or 'divergence', got {function!r}"
        )
    if what != "axis":
        order = 2
    elif isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(f"explain: order must be an int >= 0, got {order!r}")
    # no warnings.catch_warnings() here: it swaps the process-wide filter list, so two threads
    # in it at once restore each other's lists and can leave every warning of the process
    # silenced. The dry run warns of nothing itself (the piecewise-linear warnings are skipped).
    with torch.no_grad():
        _, info = _compute(f, x, dims, what, order, "autograd", True, "torchhessdiag.explain", dry=True)
    return info


# ---- dispatch ------------------------------------------------------------------------------------


def _finish(what: str, value: Tensor, derivs: List[Tensor], unbatched: bool):
    """Assemble the public result from the value (N, *S) and the derivatives: for "laplacian"
    derivs = [d1 (N, K, *S) or None, sum (N, *S)]; otherwise each (N, K, *S)."""
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


def _compute(
    f, x, dims, what: str, order: int, fallback, return_info: bool, where: str, dry: bool = False, allow_zeros: bool = False,
    weights: Optional[Tensor] = None, path_note: str = "", use_engine: bool = True,
):
    """The dispatch of every public function here. ``weights`` (K,) >= 0, with ``what ==
    "laplacian"`` and explicit ``dims``: the weighted partial Laplacian sum_k w_k d^2 f/dx_(i_k)^2
    (the sampled Laplacian of torchhessdiag/operators.py); ``path_note`` is appended to the
    PathInfo's reason; ``use_engine=False`` skips the MLP engine (the sampled Laplacian at large d on
    the CPU, see operators.sampled_laplacian)."""
    mode = _check_mode(fallback, where)
    if not isinstance(allow_zeros, bool):
        raise TypeError(f"{where}: allow_unconfirmed_zeros must be a bool, got {type(allow_zeros).__name__}")
    if not callable(f):
        raise TypeError(f"{where}: f must be a callable (an nn.Module or a function of x), got {type(f).__name__}")
    ops.check_float_tensor(x, "x", where)
    if x.dim() not in (1, 2):
        raise ValueError(f"{where}: x must be (N, d) or unbatched (d,), got shape {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"{where}: x has no features (d = 0)")
    unbatched = x.dim() == 1
    x2 = x.unsqueeze(0) if unbatched else x
    N, d = x2.shape
    # validated here; the (d, K) selection matrix is built only where a path needs it (the engine,
    # the fallback): the jets take the axes themselves (memory flat in d for a few axes of many)
    _dims_matrix(dims, d, torch.empty(0, device="meta"), where)
    axes = torch.arange(d) if dims is None else torch.tensor(_dims_list(dims, d), dtype=torch.long)
    K = axes.shape[0]
    _check_module(f, x2, where)
    reasons: List[str] = []

    if weights is not None:  # internal: checked by the caller
        if what != "laplacian" or dims is None or weights.shape != (K,):
            raise ValueError(f"{where}: weights need a Laplacian over explicit dims, one per axis")
        weights = weights.to(dtype=x2.dtype, device=x2.device)

    def done(result, info: PathInfo):
        if path_note and info is not None:
            info = info._replace(reason=f"{info.reason}; {path_note}")
        return (result, info) if (return_info or dry) else result

    # 1. the MLP engine ---------------------------------------------------------------------------
    if use_engine and (what in ("laplacian", "diag") or (what == "axis" and order == 2)):
        layers = None
        if isinstance(f, nn.Module):
            try:
                layers = engine.parse_mlp(f, where)
            except NotImplementedError as e:
                why = str(e).split("; supported")[0].replace(f"{where}: ", "")
                reasons.append(f"not an MLP the engine accepts ({why})")
        if layers is not None:
            engine.check_input(layers, x2, where)
            Vsel = _dims_matrix(dims, d, x2, where)
            info = PathInfo("engine", "an nn.Sequential MLP: the K+2-row engine")
            if dry:
                return done(None, info)
            if engine.all_piecewise_linear(layers):  # frames walked only when it warns (and
                # sys._getframe is a graph break under torch.compile)
                engine._warn_if_piecewise_linear(layers, stacklevel=_stacklevel() + 1)
            if what == "axis":
                res = engine.run(layers, x2, Vsel, "diag", need_gradient=True)
                grad = res.gradient if Vsel is None else res.gradient[..., Vsel.argmax(0)]  # (N, m, D)
                out = torch.stack([res.value.unsqueeze(-1).expand_as(res.second), grad, res.second])
                return done(out.squeeze(1) if unbatched else out, info)
            Veng = Vsel if weights is None else Vsel * weights.sqrt()  # sum_k (sqrt(w_k) e_k)^T H (...)
            res = engine.run(layers, x2, Veng, "sum" if what == "laplacian" else "diag")
            return done(res.second.squeeze(0) if unbatched else res.second, info)

    # order 0: the value only ------------------------------------------------------------------------
    if what == "axis" and order == 0:
        info = PathInfo("forward", "order 0: f(x) only")
        if dry:
            return done(None, info)
        y = _check_output(f(x2), N, where)
        out = y.unsqueeze(-1).expand(tuple(y.shape) + (K,)).unsqueeze(0).clone()
        return done(out.squeeze(1) if unbatched else out, info)

    ops.warn_if_tf32(x2, stacklevel=4)  # TF32 policy (torchhessdiag/_precision.py): jets, autograd
    # 2. Taylor jets over the traced graph --------------------------------------------------------
    if order <= taylor.MAX_ORDER:
        try:
            program = graph.get_program(f, x2)
            out, ctx = taylor.propagate_chunked(
                program, x2, None, order, collapsed=(what == "laplacian"), f=graph.traced_callable(f), weights=weights,
                axes=axes,
            )
        except graph.ShapeError as e:
            raise ValueError(f"{where}: x has shape {tuple(x.shape)}, which does not fit the model: {e}") from None
        except graph.Unsupported as e:
            reasons.append(f"not traceable to supported pieces: {e}")
            if N > 1 and not torch.compiler.is_compiling():  # a rule refused a step at run time: remember it
                graph.remember_failure(f, x2, str(e))
        else:
            info = PathInfo("jet", f"traced graph of supported pieces ({len(program.activations)} activation nodes)")
            if dry:
                return done(None, info)
            value = _check_output(out.value if isinstance(out, taylor.Jet) else out, N, where)
            coefs = out.coefs if isinstance(out, taylor.Jet) else [None] * order
            if order >= 2 and ctx.piecewise_linear_seen and all(c is None for c in coefs[1:]):
                _warn_piecewise_linear(_stacklevel() + 1)
            S = tuple(value.shape[1:])
            derivs = []
            for k, c in enumerate(coefs, start=1):
                summed = what == "laplacian" and k == 2
                if c is None:
                    c = value.new_zeros((N,) + S if summed else (N, K) + S)
                elif not summed and c.dim() == value.dim():  # shared first order (K, *S)
                    c = c.unsqueeze(0).expand((N,) + tuple(c.shape))
                derivs.append(_constant_of(c, value))
            return done(_finish(what, value, derivs, unbatched), info)
    else:
        reasons.append(f"order {order} is above the jets' {taylor.MAX_ORDER}")

    # 3. exact autograd ------------------------------------------------------------------------------
    reason = "; ".join(reasons)
    if mode == "error":
        raise NotImplementedError(
            f"{where}: no fast path applies ({reason}); pass fallback='autograd' (or "
            "torchhessdiag.set_fallback('autograd')) to compute it exactly with autograd"
        )
    if dry:
        return done(None, PathInfo("autograd", reason, "nested torch.autograd.grad (torch.func nested jvp where it cannot)"))
    V = torch.eye(d, dtype=x2.dtype, device=x2.device) if dims is None else _dims_matrix(dims, d, x2, where)
    cause = (where, type(f).__name__, reason)
    if cause not in _logged:
        _logged.add(cause)
        logger.debug("%s: slow path (exact autograd) for %s: %s", where, type(f).__name__, reason)
    with fallback_ops.ExactDerivatives():  # layer_norm & co. with exact higher derivatives
        try:
            y = f(x2)
        except RuntimeError as e:
            _diagnose_shapes(f, x2, where, e)
            raise
        value = _check_output(y, N, where)
        derivs, method = _autograd_derivatives(f, x2, V, order, allow_zeros, where)
    derivs = [_constant_of(t, value) for t in derivs]
    if what == "laplacian":
        d2 = derivs[1]
        if weights is not None:
            d2 = d2 * weights.reshape((1, -1) + (1,) * (d2.dim() - 2))
        derivs = [derivs[0], d2.sum(1)]
    return done(_finish(what, value, derivs, unbatched), PathInfo("autograd", reason, method))
