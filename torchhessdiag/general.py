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

import logging
import os
import sys
import warnings
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from . import engine, fallback_ops, graph, ops, taylor
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

logger = logging.getLogger("torchhessdiag")

_MODES = ("autograd", "error")
_fallback_mode = os.environ.get("TORCHHESSDIAG_FALLBACK", "autograd").strip().lower() or "autograd"
if _fallback_mode not in _MODES:
    _fallback_mode = "autograd"
_logged: set = set()


class PathInfo(NamedTuple):
    """Which path computed a result, and why.

    ``path``: ``"engine"`` (the MLP engine), ``"jet"`` (Taylor jets over the traced graph),
    ``"forward"`` (order 0: f(x) only) or ``"autograd"`` (the exact slow path).
    ``reason``: why this path (for ``"autograd"``: why each faster one did not apply).
    ``method``: for ``"autograd"``, which method ran (torch.autograd.grad, and torch.func for
    what reverse mode could not settle).
    """

    path: str
    reason: str
    method: str = ""


def set_fallback(mode: str) -> str:
    """Set what happens when no fast path applies: ``"autograd"`` (default: compute exactly with
    autograd, logging the cause once at debug level) or ``"error"`` (raise NotImplementedError).
    Returns the previous mode. Per-call ``fallback=`` overrides it."""
    global _fallback_mode
    if mode not in _MODES:
        raise ValueError(f"set_fallback: mode must be one of {_MODES}, got {mode!r}")
    prev, _fallback_mode = _fallback_mode, mode
    return prev


def get_fallback() -> str:
    """The global fallback mode (see :func:`set_fallback`)."""
    return _fallback_mode


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


def _stacklevel() -> int:
    """stacklevel for warnings.warn called right here that points at the first frame outside
    the torchhessdiag package."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "torchhessdiag":
        frame = frame.f_back
        level += 1
    return level


def _warn_piecewise_linear(level: int) -> None:
    warnings.warn(
        "torchhessdiag: the only nonlinearities this model's derivatives see are piecewise-linear "
        "activations (ReLU, LeakyReLU), so its second and higher derivatives are exactly 0 "
        "almost everywhere (the true ones are Dirac deltas on the kinks); the result is all zeros. "
        "Use a smooth activation (Tanh, SiLU, GELU, Softplus) where second derivatives matter, "
        "e.g. in a PDE loss.",
        UserWarning,
        stacklevel=level,
    )


def _check_module(f: Any, x: Tensor, where: str) -> None:
    if not isinstance(f, nn.Module):
        return
    engine.refuse_ddp(f, where)
    for name, m in f.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats):
            state = "in training mode" if m.training else "without running statistics"
            raise ValueError(
                f"{where}: {type(m).__name__} at '{name}' is {state}, so it normalises with the "
                "statistics of the whole batch: the rows of f(x) are not independent and no per-point "
                "Hessian exists; call model.eval() (with running statistics)"
            )
    for name, p in f.named_parameters():
        if not p.is_floating_point():
            continue
        if p.device != x.device:
            raise ValueError(f"{where}: x is on {x.device} but parameter '{name}' is on {p.device}; move the model or x")
        if p.dtype != x.dtype:
            raise TypeError(
                f"{where}: x is {x.dtype} but parameter '{name}' is {p.dtype}; use one dtype (e.g. "
                "model.double() with float64 x)"
            )


def _check_output(y: Any, N: int, where: str) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"{where}: f(x) must return a tensor, got {type(y).__name__}")
    if y.dim() not in (1, 2) or y.shape[0] != N:
        raise ValueError(
            f"{where}: f(x) must return (N,) or (N, m) with N = {N} rows (one per point), got shape "
            f"{tuple(y.shape)}"
        )
    if not y.is_floating_point():
        raise TypeError(f"{where}: f(x) must be a floating-point tensor, got {y.dtype}")
    return y


def _constant_of(t: Tensor, dep: Optional[Tensor]) -> Tensor:
    """t as a function of dep with zero derivatives, so a loss on it backpropagates."""
    if dep is not None and torch.is_grad_enabled() and dep.requires_grad and not t.requires_grad:
        return engine._ZerosOf.apply(t, dep)
    return t


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


def _check_mode(fallback: Optional[str], where: str) -> str:
    mode = _fallback_mode if fallback is None else fallback
    if mode not in _MODES:
        raise ValueError(f"{where}: fallback must be one of {_MODES} (or None for the global mode), got {fallback!r}")
    return mode


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


def _diagnose_shapes(f: Callable, x: Tensor, where: str, err: RuntimeError) -> None:
    """f(x) raised: if f is a module and one of its layers got the wrong number of features, say
    which (run f again with a shape check before every nn.Linear / nn.LayerNorm / nn.RMSNorm /
    nn.MultiheadAttention of f; hooks removed after). Returns silently otherwise."""
    module = graph.traced_callable(f)
    if isinstance(module, nn.Module):
        roots = [("", module)]
    else:  # a plain function: the modules in its closure and the globals it names
        roots = []
        code = getattr(module, "__code__", None)
        cells = [c.cell_contents for c in (getattr(module, "__closure__", None) or ()) if _cell_full(c)]
        named = [getattr(module, "__globals__", {}).get(n) for n in (code.co_names if code else ())]
        for v in cells + named:
            if isinstance(v, nn.Module) and all(v is not r for _, r in roots):
                roots.append((f"{type(v).__name__}:", v))
        if not roots:
            return
    found: List[str] = []

    def check(name: str, m: nn.Module):
        def hook(mod, args):
            if found or not args or not isinstance(args[0], Tensor):
                return
            t = args[0]
            if isinstance(mod, nn.Linear):
                want, got, what = mod.in_features, t.shape[-1] if t.dim() else None, "input features"
            elif isinstance(mod, nn.MultiheadAttention):
                want, got, what = mod.embed_dim, t.shape[-1] if t.dim() else None, "features (embed_dim)"
            else:
                shape = tuple(mod.normalized_shape)
                want, got, what = shape, tuple(t.shape[t.dim() - len(shape):]), "trailing dims (normalized_shape)"
            if got != want:
                found.append(f"{type(mod).__name__} '{name}' takes {want} {what}, but gets shape {tuple(t.shape)}")
                raise _ShapeFound()

        return m.register_forward_pre_hook(hook)

    kinds = (nn.Linear, nn.LayerNorm, nn.MultiheadAttention) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
    handles = [check(prefix + n, m) for prefix, root in roots for n, m in root.named_modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            f(x)
    except _ShapeFound:
        pass
    except Exception:  # noqa: BLE001 - some other failure: the original error stands
        return
    finally:
        for h in handles:
            h.remove()
    if found:
        raise ValueError(f"{where}: x has shape {tuple(x.shape)}, which does not fit the model: {found[0]}") from err


class _ShapeFound(Exception):
    pass


def _cell_full(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


# ---- the exact slow path ------------------------------------------------------------------------


def _jvp_up(fn: Callable, v: Tensor) -> Callable:
    """x -> fn(x) + (the directional derivative along v of fn(x)'s last entry,)."""

    def up(xx):
        p, t = torch.func.jvp(fn, (xx,), (v,))
        return tuple(p) + (t[-1],)

    return up


def _func_derivatives(f: Callable, x: Tensor, V: Tensor, order: int) -> Tuple[List[Tensor], str]:
    """[D^k f along each column of V, (N, K, *S)] for k = 1..order by nested torch.func.jvp."""
    N, d = x.shape

    def along(v: Tensor):
        vv = v.expand(N, d)
        fn: Callable = lambda xx: (f(xx),)  # noqa: E731
        for _ in range(order):
            fn = _jvp_up(fn, vv)
        return fn(x)[1:]

    rows = V.t()  # (K, d)
    try:
        outs = torch.func.vmap(along)(rows)
        return [o.movedim(0, 1) for o in outs], "torch.func: nested jvp along each axis, vmap over the axes"
    except Exception as e:  # noqa: BLE001 - e.g. an op without a batching rule
        logger.debug("torchhessdiag: vmap over the axes failed (%s: %s); one axis at a time", type(e).__name__, e)
    per_axis = [along(rows[k]) for k in range(rows.shape[0])]
    return [torch.stack([p[j] for p in per_axis], 1) for j in range(order)], "torch.func: nested jvp, one axis at a time"


def _grad_derivatives(f: Callable, x: Tensor, V: Tensor, order: int, keep: bool) -> Tuple[List[Tensor], List[Tuple[int, int, int]]]:
    """The same by nested torch.autograd.grad (rows independent: the gradient of the sum over
    rows is the per-row gradient).

    Returns the derivatives and the entries (order index, axis index, output component) that
    reverse mode could not settle: from order 2 on, a derivative whose graph ends (the previous
    level does not require grad, or x is unreachable from it) is exactly 0 if f really is
    polynomial of lower degree there -- or unknown, if a backward was not recorded (a
    ``once_differentiable`` backward, a custom op without double backward). Those are left 0 here
    and listed; the caller settles them another way."""
    dims = [int(i) for i in V.argmax(0).tolist()]
    unknown: List[Tuple[int, int, int]] = []
    with torch.enable_grad():
        xx = x if x.requires_grad else x.detach().requires_grad_(True)
        y = f(xx)
        N = y.shape[0]
        S = tuple(y.shape[1:])
        yf = y.reshape(N, -1)
        M = yf.shape[1]
        zero = yf.new_zeros(N)
        res = [[[zero] * M for _ in dims] for _ in range(order)]
        for i in range(M):
            yi = yf[:, i]
            if not yi.requires_grad:
                continue  # the forward graph does not reach x: every derivative is 0
            (g,) = torch.autograd.grad(yi.sum(), xx, create_graph=order > 1 or keep, retain_graph=True, allow_unused=True)
            if g is None:
                continue
            for kk, k in enumerate(dims):
                cur = g[:, k]
                res[0][kk][i] = cur
                for o in range(1, order):
                    gg = None
                    if cur.requires_grad:
                        (gg,) = torch.autograd.grad(
                            cur.sum(), xx, create_graph=o < order - 1 or keep, retain_graph=True, allow_unused=True
                        )
                    if gg is None:
                        unknown.extend((oo, kk, i) for oo in range(o, order))
                        break
                    cur = gg[:, k]
                    res[o][kk][i] = cur
    out = [torch.stack([torch.stack(res[o][kk], 1) for kk in range(len(dims))], 1).reshape((N, len(dims)) + S) for o in range(order)]
    return (out if keep else [t.detach() for t in out]), unknown


#: the code object of torch's @once_differentiable wrapper (the same for every decorated backward)
_ONCE_CODE = torch.autograd.function.once_differentiable(lambda ctx, *g: g).__code__


def _is_once_differentiable(node: Any) -> bool:
    backward = getattr(getattr(node, "_forward_cls", None), "backward", None)
    return getattr(backward, "__code__", None) is _ONCE_CODE


def _custom_functions(f: Callable, x: Tensor, once_only: bool = False) -> List[str]:
    """Names of the custom torch.autograd.Functions in f's autograd graph at x (walked from the
    output); ``once_only``: only those whose backward is ``@once_differentiable``. torch.func's
    nested forward mode silently returns zeros through custom Functions (pytorch/pytorch#197867),
    so it must not be used to settle their derivatives; a once-differentiable backward can make
    nested reverse mode silently incomplete as well (its part of a higher derivative is dropped
    while other paths keep the graph alive)."""
    with torch.enable_grad():
        y = f(x.detach().requires_grad_(True))
    found, seen = set(), set()
    stack = [y.grad_fn] if isinstance(y, Tensor) and y.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, torch.autograd.function.BackwardCFunction) and (not once_only or _is_once_differentiable(node)):
            found.add(type(node).__name__.replace("Backward", ""))
        stack.extend(n for n, _ in node.next_functions)
    return sorted(found)


def _once_differentiable_error(where: str, customs: List[str], cause: str) -> NotImplementedError:
    return NotImplementedError(
        f"{where}: f uses the custom torch.autograd.Function(s) {', '.join(customs)}, and {cause}: its backward "
        "cannot be differentiated again (e.g. @once_differentiable, or a backward that detaches), so derivatives "
        "of order >= 2 through it are unknown (torch.func's forward mode gives zeros through custom Functions, "
        "pytorch/pytorch#197867). Write the backward with differentiable torch ops, or register the activation "
        "with its derivatives (torchhessdiag.register_activation); pass allow_unconfirmed_zeros=True to take "
        "those derivatives as 0 (with a warning)"
    )


def _autograd_derivatives(
    f: Callable, x: Tensor, V: Tensor, order: int, allow_zeros: bool = False, where: str = "torchhessdiag"
) -> Tuple[List[Tensor], str]:
    """The exact slow path: nested torch.autograd.grad (reverse over reverse), and torch.func's
    nested jvp where reverse mode cannot run f or cannot settle an entry.

    Reverse over reverse comes first because it is the best-checked path of torch's derivative
    rules: forward-over-forward is silently wrong for some ops (e.g. F.layer_norm's second-order
    JVP in torch 2.13, pytorch/pytorch#196700, umbrella #198017), silently zero through custom
    autograd.Functions (#197867), and missing for others (silu_backward has no forward-AD
    formula, so nested jvp of F.silu stops at order 2). The ops known to be wrong are replaced by
    exact stand-ins while f runs (torchhessdiag/fallback_ops.py; the caller activates it).

    Where a custom autograd.Function's backward cannot be differentiated again, the derivatives
    through it are unknown: NotImplementedError naming it, or (``allow_zeros``) 0 with a warning."""
    keep = torch.is_grad_enabled()
    once = _custom_functions(f, x, once_only=True) if order >= 2 else []
    if once and not allow_zeros:
        raise _once_differentiable_error(where, once, "its backward is @once_differentiable")
    if once:
        warnings.warn(
            f"torchhessdiag: derivatives of order >= 2 through {', '.join(once)} (@once_differentiable) are taken "
            "as 0 (allow_unconfirmed_zeros=True)",
            UserWarning,
            stacklevel=_stacklevel(),
        )
    try:
        derivs, unknown = _grad_derivatives(f, x, V, order, keep)
    except Exception as e:  # noqa: BLE001 - e.g. a backward that cannot be differentiated again
        logger.debug("torchhessdiag: nested torch.autograd.grad failed (%s: %s); torch.func nested jvp", type(e).__name__, e)
        customs = _custom_functions(f, x)
        if customs == ["CompiledFunction"]:  # torch.compile's AOTAutograd graph: torch's error says it all
            raise
        if customs:
            # torch.func would give zeros through them: nothing can compute these derivatives
            raise _once_differentiable_error(where, customs, f"differentiating f again failed ({type(e).__name__}: {str(e)[:160]})") from e
        try:
            return _func_derivatives(f, x, V, order)
        except Exception:  # noqa: BLE001 - neither can: report the reverse-mode error, the usual one
            raise e from None
    method = "torch.autograd.grad: nested backward passes"
    if not unknown:
        return derivs, method
    # entries where the backward graph ended: 0 if f is of lower degree there, unknown if a
    # backward was not recorded -- settle them with forward mode, which does not use backwards,
    # unless f holds custom autograd.Functions, where torch.func's nested forward mode is zero
    customs = _custom_functions(f, x)
    why = None
    if customs:
        if not allow_zeros:
            raise _once_differentiable_error(where, customs, "some derivatives of order >= 2 through it had no backward graph")
        why = f"f uses custom autograd.Functions ({', '.join(customs)}), through which torch.func's nested forward mode is unreliable"
    else:
        try:
            fwd, _ = _func_derivatives(f, x, V, order)
        except Exception as e:  # noqa: BLE001
            why = f"torch.func could not run f ({type(e).__name__}: {str(e)[:200]})"
    if why is not None:
        warnings.warn(
            "torchhessdiag: some derivatives of order >= 2 came out of nested torch.autograd.grad "
            "with no graph to differentiate: f is of lower degree there, or a backward in f was "
            "not recorded (e.g. @once_differentiable). They are returned as 0, unconfirmed: "
            f"{why}.",
            UserWarning,
            stacklevel=_stacklevel(),
        )
        return derivs, method + " (entries with no backward graph taken as 0, unconfirmed)"
    N = x.shape[0]
    fixed = []
    for o, (d_rev, d_fwd) in enumerate(zip(derivs, fwd)):
        K = d_rev.shape[1]
        flat_rev = d_rev.reshape(N, K, -1)
        flat_fwd = d_fwd.reshape(N, K, -1).to(flat_rev.dtype)
        idx = [(kk, i) for oo, kk, i in unknown if oo == o]
        if idx:
            mask = torch.zeros(K, flat_rev.shape[2], dtype=torch.bool, device=flat_rev.device)
            for kk, i in idx:
                mask[kk, i] = True
            flat_rev = torch.where(mask, flat_fwd, flat_rev)
        fixed.append(flat_rev.reshape(d_rev.shape))
    return fixed, method + " (entries with no backward graph from torch.func nested jvp)"
