"""What every path of the derivative functions shares (``laplacian`` / ``hessian_diag`` /
``axis_derivatives`` in general.py, ``partials`` / ``operator`` / ``biharmonic`` /
``divergence`` in operators.py): :class:`PathInfo`, the fallback mode, the checks of f, x and
f(x), the jet step that can decline, the slow path's refusal and log, and the warnings.

Import direction: above the engine, graph, taylor and ops; below ``_nested_autograd``,
``_dispatch``, ``operators`` and ``general``.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import engine, graph, ops, taylor
from ._precision import _stacklevel  # noqa: F401  (re-exported: the paths' warnings use it)
from .api import _dims_matrix, _ints

Tensor = torch.Tensor

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


#: what a path returns: (result, PathInfo) when it ran (result None on a dry run), or the reason it
#: declined ("": it does not apply, nothing to report)
_Outcome = Union[Tuple[Any, PathInfo], str]


def _run_paths(paths: Sequence[Callable[[Any], _Outcome]], call, slow: Callable[[List[str]], Tuple[Any, PathInfo]]):
    """The dispatch of general.py and operators.py: the first path of ``paths`` that takes
    ``call`` gives (result, PathInfo); when all decline, ``slow(reasons)`` (the exact fallback, or
    its refusal), with the reasons the paths gave."""
    reasons: List[str] = []
    for path in paths:
        got = path(call)
        if not isinstance(got, str):
            return got
        if got:
            reasons.append(got)
    return slow(reasons)


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


def _check_mode(fallback: Optional[str], where: str) -> str:
    mode = _fallback_mode if fallback is None else fallback
    if mode not in _MODES:
        raise ValueError(f"{where}: fallback must be one of {_MODES} (or None for the global mode), got {fallback!r}")
    return mode


# ---- checks of the call ----------------------------------------------------------------------


def _prepare(f, x, where: str, fallback, allow_zeros):
    """The checks of every public function's f, x, fallback and allow_unconfirmed_zeros: (the
    fallback mode, x as (N, d), whether x came unbatched)."""
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
    return mode, x2, unbatched


def _dims(dims, d: int, where: str) -> Optional[List[int]]:
    """``dims`` checked, as a list of axes in 0..d-1 (None: all)."""
    if dims is None:
        return None
    _dims_matrix(dims, d, torch.zeros(1, d), where)  # validates (type, range, repeats, empty)
    return [i % d for i in _ints(dims, "dims", where)]


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


# ---- steps and results shared by the paths ---------------------------------------------------


def _try_jets(
    f, x2: Tensor, V: Tensor, order: int, collapsed: bool, weights: Optional[Tensor], where: str, x_shape, reasons: List[str],
    axes: Optional[Tensor] = None,
):
    """Run the traced jets: (out, ctx, program) or None (the reason appended)."""
    try:
        program = graph.get_program(f, x2)
        out, ctx = taylor.propagate_chunked(
            program, x2, V, order, collapsed=collapsed, f=graph.traced_callable(f), weights=weights, axes=axes
        )
    except graph.ShapeError as e:
        raise ValueError(f"{where}: x has shape {tuple(x_shape)}, which does not fit the model: {e}") from None
    except graph.Unsupported as e:
        reasons.append(f"not traceable to supported pieces: {e}")
        if x2.shape[0] > 1 and not torch.compiler.is_compiling():
            graph.remember_failure(f, x2, str(e))
        return None
    return out, ctx, program


def _slow_path_reason(mode: str, where: str, reasons: List[str]) -> str:
    """Why no fast path applied (the reasons joined); NotImplementedError in mode "error"."""
    reason = "; ".join(reasons)
    if mode == "error":
        raise NotImplementedError(
            f"{where}: no fast path applies ({reason}); pass fallback='autograd' (or "
            "torchhessdiag.set_fallback('autograd')) to compute it exactly with autograd"
        )
    return reason


def _log_slow_path(where: str, f, reason: str) -> None:
    """The slow path's debug message, once per cause."""
    cause = (where, type(f).__name__, reason)
    if cause not in _logged:
        _logged.add(cause)
        logger.debug("%s: slow path (exact autograd) for %s: %s", where, type(f).__name__, reason)


def _done(result, info: PathInfo, return_info: bool, dry: bool):
    return (result, info) if (return_info or dry) else result


# ---- warnings and diagnoses ------------------------------------------------------------------


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

    kinds = (nn.Linear, nn.LayerNorm, nn.MultiheadAttention, nn.RMSNorm)
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
