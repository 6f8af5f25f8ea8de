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
   ends (see ``_nested_autograd._autograd_derivatives`` for why in this order), while f's layer_norm,
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

Where things are: the dispatch and its paths in _dispatch.py, what they share with operators.py
in _path_common.py (PathInfo, the fallback mode, the checks), the exact slow path in
_nested_autograd.py; this module holds the public functions.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import graph, operators
from ._dispatch import _compute
from ._nested_autograd import _autograd_derivatives, _func_derivatives  # noqa: F401  (tests, benchmarks)
from ._path_common import PathInfo, get_fallback, set_fallback
from ._sampled_laplacian import sampled_laplacian

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
