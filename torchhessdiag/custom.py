"""User-defined activations with their own derivative functions: ``register_activation``.

A registered activation is a name, an elementwise function ``fn`` and its derivatives
``derivatives = [d1, d2, ...]`` (as many orders as you have, at least one), all written with torch
ops (or anything that maps a tensor to a tensor of the same shape, dtype and device). From then on
the name works wherever a table activation does:

* in the engine (``mlp_laplacian``, ``mlp_hessian_diag``, ...) as a module of an ``nn.Sequential``
  (``act.module()`` or ``torchhessdiag.nn.UserActivation(name)``), with your d1 and d2 as sigma'
  and sigma'';
* as a drop-in module or a function (``act(x)``) whose backward multiplies by d1, whose double
  backward uses d2, and so on: differentiating the order-k derivative gives order k+1;
* in ``activation_derivatives(x, name, order)`` and the other internals that ask for
  sigma^(k) (``_op_autograd._derivs``), for any k.

Past the last derivative you gave (order n), sigma^(n+j) is computed by j-fold exact autograd of
your last callable ``d_n``. That is exact only where torch can differentiate ``d_n`` (it is made of
differentiable torch ops and its formula is smooth there); give more derivatives if it is not.

Under torch.func transforms (vmap, grad, jacrev, jacfwd, hessian) the function is applied as the
plain callable -- ``fn`` for the value, ``d_k`` for sigma^(k) -- and the transforms differentiate
those callables with torch's own rules (as the table drop-ins do under torch.func, see
torchhessdiag/nn.py). The reason: torch.func cannot nest forward mode through a custom
``autograd.Function`` (jacfwd(jacfwd(f)) silently returns zeros, pytorch/pytorch#197867), so the
exact, given-derivative path is kept for torch.autograd (nested ``grad`` / ``backward``, forward
AD through ``torch.autograd.forward_ad``) and the engine.

Activations are identified by name: an :class:`~torchhessdiag.activations.ActivationSpec` holds
only the name and the parameter values, so modules pickle and deepcopy without pickling your
callables; in a new process, register the activation again (under the same name) before loading
a pickled model.
"""

from __future__ import annotations

import math
import numbers
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import _registry
from ._checks import check_float_tensor
from .activations import NAMES, ActivationSpec

Tensor = torch.Tensor

__all__ = [
    "RegisteredActivation",
    "register_activation",
    "unregister_activation",
    "get_activation",
    "check_activation",
    "registered_names",
]

#: at most this many parameters per activation (they live in ActivationSpec.a and .b)
MAX_PARAMS = 2

_lock = threading.Lock()  # guards the user entries of the registry (torchhessdiag/_registry.py)
#: incremented by every register / replace / unregister (part of the trace cache's signature:
#: torchhessdiag/graph.py)
_GENERATION = 0

DEFAULT_CHECK_POINTS: Tuple[float, ...] = tuple(-4.9 + 0.5 * i for i in range(21))
DEFAULT_RTOL = 1e-6
DEFAULT_ATOL = 1e-9


def _functorch_active() -> bool:
    probe = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(probe()) if probe is not None else False


def _callable_name(f) -> str:
    return getattr(f, "__qualname__", None) or getattr(f, "__name__", None) or type(f).__name__


class RegisteredActivation:
    """A user activation registered with :func:`register_activation`.

    * ``act(x, **params)`` applies it to a tensor (differentiable to any order, with your
      derivatives);
    * ``act.module(**params)`` returns a ``torchhessdiag.nn.UserActivation`` module for an
      ``nn.Sequential``;
    * ``act.spec(**params)`` returns its :class:`~torchhessdiag.activations.ActivationSpec`.

    ``params`` are the activation's float parameters (declared at registration, with defaults).
    Attributes: ``name``, ``fn``, ``derivatives`` (tuple of callables), ``param_names``,
    ``defaults``, ``order`` (the highest order given).

    The object is identified by its name: copying returns it unchanged, pickling stores the name
    (unpickling looks it up in the registry of the loading process).
    """

    def __init__(self, name, fn, derivatives, param_names, defaults):
        self._set(name, fn, derivatives, param_names, defaults)

    def _set(self, name, fn, derivatives, param_names, defaults) -> None:
        self.name: str = name
        self.fn: Callable = fn
        self.derivatives: Tuple[Callable, ...] = tuple(derivatives)
        self.param_names: Tuple[str, ...] = tuple(param_names)
        self.defaults: Tuple[float, ...] = tuple(defaults)
        # torch.fx and friends look for these on a call_function target
        self.__name__ = name if name.isidentifier() else "user_activation"
        self.__qualname__ = self.__name__

    @property
    def order(self) -> int:
        """The highest derivative order given at registration."""
        return len(self.derivatives)

    @property
    def registered(self) -> bool:
        """Whether this object is (still) the registry's entry for its name."""
        e = _registry.user(self.name)
        return e is not None and e.user is self

    def _live(self) -> "RegisteredActivation":
        if not self.registered:
            raise ValueError(
                f"activation {self.name!r} was unregistered; register it again with "
                "torchhessdiag.register_activation"
            )
        return self

    def spec(self, **params) -> ActivationSpec:
        """The ActivationSpec of this activation with the given parameters (defaults otherwise).

        Raises TypeError for a parameter the activation does not declare or a value that is not a
        real number, ValueError for a non-finite value."""
        self._live()
        unknown = sorted(set(params) - set(self.param_names))
        if unknown:
            takes = ", ".join(self.param_names) if self.param_names else "no parameters"
            raise TypeError(f"activation {self.name!r} takes {takes}; got unexpected {unknown}")
        values = []
        for n, d in zip(self.param_names, self.defaults):
            values.append(_param_value(self.name, n, params.get(n, d)))
        values += [0.0] * (MAX_PARAMS - len(values))
        return ActivationSpec(self.name, values[0], values[1])

    def _default_kwargs(self) -> Dict[str, float]:
        return dict(zip(self.param_names, self.defaults))

    def kwargs(self, spec: ActivationSpec) -> Dict[str, float]:
        """The keyword arguments the callables get for ``spec``."""
        return dict(zip(self.param_names, (spec.a, spec.b)))

    def module(self, **params):
        """A ``torchhessdiag.nn.UserActivation`` module applying this activation."""
        from .nn import UserActivation

        return UserActivation(self, **params)

    def __call__(self, x, **params) -> Tensor:
        """Apply the activation to ``x`` (float32/float64 tensor, any shape, any device).

        Differentiable to any order with torch.autograd: the k-th derivative is your ``d_k``;
        beyond the last one given, exact autograd of it."""
        if isinstance(x, torch.fx.Proxy):  # symbolic tracing: one call_function node
            return x.tracer.create_proxy("call_function", self, (x,), dict(params))
        check_float_tensor(x, "x", f"torchhessdiag activation {self.name!r}")
        return apply(x, self.spec(**params))

    def __repr__(self) -> str:
        p = ", ".join(f"{n}={d:g}" for n, d in zip(self.param_names, self.defaults))
        state = "" if self.registered else ", unregistered"
        return f"RegisteredActivation({self.name!r}{', ' + p if p else ''}, order={self.order}{state})"

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (get_activation, (self.name,))


def _param_value(act: str, name: str, v) -> float:
    if isinstance(v, torch.Tensor):
        raise TypeError(
            f"activation {act!r}: parameter {name} must be a Python number, got a tensor; "
            "parameters are fixed constants (a trainable parameter is not supported -- put a "
            "trainable scale into the preceding nn.Linear instead)"
        )
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"activation {act!r}: parameter {name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"activation {act!r}: parameter {name} must be finite, got {v}")
    return v


# ---- registry ----------------------------------------------------------------------------------


def lookup(name: str) -> Optional[RegisteredActivation]:
    """The registered activation called ``name`` (case-insensitive), or None."""
    e = _registry.user(name) if isinstance(name, str) else None
    return None if e is None else e.user


def entry_of(spec: ActivationSpec) -> RegisteredActivation:
    """The registered activation of a user spec; ValueError if none is registered."""
    e = lookup(spec.name)
    if e is None:
        raise ValueError(
            f"activation {spec.name!r} is not registered in this process; call "
            "torchhessdiag.register_activation(...) for it first (e.g. before loading a pickled "
            f"model). Registered: {', '.join(registered_names()) or 'none'}"
        )
    return e


def registered_names() -> Tuple[str, ...]:
    """Names of the registered user activations, in registration order."""
    return tuple(e.user.name for e in _registry.users())


def get_activation(name: str) -> RegisteredActivation:
    """The :class:`RegisteredActivation` called ``name``; ValueError if there is none."""
    if not isinstance(name, str):
        raise TypeError(f"get_activation: name must be a str, got {type(name).__name__}")
    return entry_of(ActivationSpec(name))


def unregister_activation(name: str) -> None:
    """Remove a registered activation. Modules and specs naming it fail with a clear error until
    it is registered again. ValueError if it is not registered."""
    if isinstance(name, RegisteredActivation):
        name = name.name
    if not isinstance(name, str):
        raise TypeError(f"unregister_activation: name must be a str, got {type(name).__name__}")
    global _GENERATION
    with _lock:
        if _registry.remove_user(name) is None:
            raise ValueError(f"unregister_activation: no activation {name!r} is registered")
        _GENERATION += 1


def register_activation(
    name: str,
    fn: Callable[..., Tensor],
    derivatives: Sequence[Callable[..., Tensor]],
    *,
    params: Optional[Dict[str, float]] = None,
    check: bool = False,
    check_points=None,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    replace: bool = False,
) -> RegisteredActivation:
    """Register an elementwise activation with its own derivative functions.

    Args:
        name: a new name (case-insensitive; not one of the table's names such as ``"tanh"``).
        fn: sigma, a callable ``fn(z, **params) -> Tensor`` of z's shape, dtype and device.
        derivatives: ``[d1, d2, ...]``, the callables sigma', sigma'', ... (same signature), at
            least one, as many orders as you need exactly: orders past the last one are exact
            autograd of the last one (exact only if torch can differentiate it). The engine uses
            orders 1 and 2; nested autograd of order k uses order k + 1; axis derivatives up to 4.
        params: ``{"beta": 1.0, ...}``: up to two float parameters with their defaults; every
            callable then receives them as keyword arguments. They are constants (not trainable).
        check: compare every given derivative with autograd of the previous callable (d1 with
            autograd of fn, d2 with autograd of d1, ...) in float64 at ``check_points`` (default:
            21 points from -4.9 to 5.1, 0.5 apart, avoiding 0 and the integers where piecewise
            functions have kinks) before registering; raise ValueError with the worst mismatch.
            See :func:`check_activation`.
        check_points, rtol, atol: the check's points and tolerance |given - autograd| <=
            atol + rtol * |autograd|.
        replace: redefine an activation already registered under this name. The existing
            :class:`RegisteredActivation` object is updated in place and returned, so modules and
            specs that name it use the new definition from then on.

    Returns:
        The :class:`RegisteredActivation`: call it on a tensor, or ``.module()`` for an nn.Module.

    Without ``check`` the derivatives are used exactly as given: a wrong d2 gives wrong second
    derivatives everywhere (engine, drop-ins, ``activation_derivatives``), silently. Run
    ``check=True`` (or :func:`check_activation`) once when you write them.

    Example::

        gauss = thd.register_activation(
            "gauss", lambda z: torch.exp(-z * z),
            [lambda z: -2 * z * torch.exp(-z * z), lambda z: (4 * z * z - 2) * torch.exp(-z * z)],
            check=True,
        )
        model = nn.Sequential(nn.Linear(3, 32), gauss.module(), nn.Linear(32, 1))
        thd.mlp_laplacian(model, x)
    """
    where = "register_activation"
    if not isinstance(name, str):
        raise TypeError(f"{where}: name must be a str, got {type(name).__name__}")
    if not name or name != name.strip() or any(c.isspace() for c in name):
        raise ValueError(f"{where}: name must be a non-empty string without whitespace, got {name!r}")
    if name.lower() in _registry.TABLE:
        raise ValueError(
            f"{where}: {name!r} is the name of an activation of the derivative table "
            f"({', '.join(NAMES)}); choose another name, e.g. 'my_{name.lower()}'"
        )
    if not callable(fn):
        raise TypeError(f"{where}: fn must be callable (sigma itself), got {type(fn).__name__}")
    if callable(derivatives) or isinstance(derivatives, (str, bytes, torch.Tensor)):
        raise TypeError(
            f"{where}: derivatives must be a sequence of callables [d1, d2, ...]; to give only "
            "the first derivative, pass [d1]"
        )
    try:
        derivatives = list(derivatives)
    except TypeError:
        raise TypeError(
            f"{where}: derivatives must be a sequence of callables [d1, d2, ...], got "
            f"{type(derivatives).__name__}"
        ) from None
    if not derivatives:
        raise ValueError(
            f"{where}: derivatives is empty; give at least the first derivative [d1] (for an "
            "activation whose derivatives torch computes, there is nothing to register: use it as is)"
        )
    for i, d in enumerate(derivatives):
        if not callable(d):
            raise TypeError(f"{where}: derivatives[{i}] (order {i + 1}) must be callable, got {type(d).__name__}")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise TypeError(f"{where}: params must be a dict of name -> default value, got {type(params).__name__}")
    if len(params) > MAX_PARAMS:
        raise ValueError(f"{where}: at most {MAX_PARAMS} parameters are supported, got {len(params)}: {list(params)}")
    for p in params:
        if not isinstance(p, str) or not p.isidentifier():
            raise ValueError(f"{where}: parameter names must be identifiers, got {p!r}")
    defaults = [_param_value(name, p, v) for p, v in params.items()]
    if not isinstance(replace, bool):
        raise TypeError(f"{where}: replace must be a bool, got {type(replace).__name__}")

    candidate = RegisteredActivation(name, fn, derivatives, list(params), defaults)
    with _lock:
        existing = lookup(name)
    if existing is not None and not replace:
        raise ValueError(
            f"{where}: an activation {existing.name!r} is already registered; pass replace=True "
            "to redefine it (modules using it will use the new definition), or "
            "unregister_activation(name) first"
        )
    if check:
        _check(candidate, candidate._default_kwargs(), check_points, rtol, atol, where=f"{where}({name!r}, check=True)")
    global _GENERATION
    with _lock:
        existing = lookup(name)
        _GENERATION += 1
        if existing is not None:
            if not replace:
                raise ValueError(f"{where}: an activation {existing.name!r} is already registered")
            existing._set(name, fn, derivatives, list(params), defaults)
            _registry.add_user(existing)  # the entry's parameters follow the new definition
            return existing
        _registry.add_user(candidate)
    return candidate


# ---- evaluation --------------------------------------------------------------------------------


def _checked(r, z: Tensor, e: RegisteredActivation, k: int) -> Tensor:
    """The callable's result as a tensor of z's shape, dtype and device, or a clear error."""
    what = "fn" if k == 0 else f"derivatives[{k - 1}] (order {k})"
    if not isinstance(r, torch.Tensor):
        if isinstance(r, numbers.Real) and not isinstance(r, bool):
            return torch.full_like(z, float(r))
        raise TypeError(
            f"activation {e.name!r}: {what} returned {type(r).__name__}, expected a tensor like its input"
        )
    if r.dtype != z.dtype:
        raise TypeError(
            f"activation {e.name!r}: {what} returned {r.dtype} for a {z.dtype} input; return the "
            "input's dtype (e.g. build constants with torch.full_like(z, c) or torch.ones_like(z))"
        )
    if r.device != z.device:
        raise ValueError(
            f"activation {e.name!r}: {what} returned a tensor on {r.device} for an input on "
            f"{z.device}; build constants with torch.full_like(z, c)"
        )
    if r.shape != z.shape:
        try:
            ok = torch.broadcast_shapes(r.shape, z.shape) == z.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"activation {e.name!r}: {what} returned shape {tuple(r.shape)} for an input of shape "
                f"{tuple(z.shape)}; an activation is elementwise and keeps its input's shape"
            )
        r = r.expand(z.shape).contiguous()
    if r is z:
        r = r.clone()
    return r


def _jvp_derivative(f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """t -> f'(t) for an elementwise f, by forward mode (composes with torch.func transforms)."""

    def df(t: Tensor) -> Tensor:
        return torch.func.jvp(f, (t,), (torch.ones_like(t),))[1]

    return df


def _evaluate(z: Tensor, spec: ActivationSpec, k: int, functorch: bool = False) -> Tensor:
    """sigma^(k)(z) of a user activation as a plain tensor (no custom autograd node).

    k <= order: the given callable. k > order: exact autograd of the last given callable -- by
    nested reverse mode on a detached copy (outside torch.func), or nested torch.func.jvp (inside
    torch.func transforms, where torch.autograd.grad may not be called).
    """
    e = entry_of(spec)
    kw = e.kwargs(spec)
    n = e.order
    if k == 0:
        return _checked(e.fn(z, **kw), z, e, 0)
    if k <= n:
        return _checked(e.derivatives[k - 1](z, **kw), z, e, k)
    last = e.derivatives[n - 1]
    if functorch:
        f = lambda t: _checked(last(t, **kw), t, e, n)  # noqa: E731
        for _ in range(k - n):
            f = _jvp_derivative(f)
        return f(z)
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        y = _checked(last(zz, **kw), zz, e, n)
        for i in range(k - n):
            if not y.requires_grad:
                return torch.zeros_like(z)
            (y,) = torch.autograd.grad(y, zz, torch.ones_like(y), create_graph=i < k - n - 1, allow_unused=True)
            if y is None:
                return torch.zeros_like(z)
    return y.detach()


class _UserDeriv(torch.autograd.Function):
    """sigma^(k)(z) of a user activation; its derivative is sigma^(k+1)(z), again a _UserDeriv, so
    differentiation to any order uses the given callables (and autograd of the last beyond them).

    Like the table ops (their autograd: csrc/act_autograd.h, _op_autograd.py), a node computes sigma^(k+1) once and reuses it when nested
    autograd comes back through it (once per input dimension): with a graph when one is being
    recorded, without otherwise."""

    @staticmethod
    def forward(z, spec, k):
        return _evaluate(z, spec, k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, spec, k = inputs
        ctx.spec, ctx.k = spec, k
        ctx.save_for_backward(z)
        ctx.save_for_forward(z)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        if torch.is_grad_enabled():
            D = getattr(ctx, "_thd_next_graph", None)
            if D is None:
                D = _UserDeriv.apply(z, ctx.spec, ctx.k + 1)
                ctx._thd_next_graph = D
        else:
            D = getattr(ctx, "_thd_next_graph", None)
            if D is None:
                D = getattr(ctx, "_thd_next", None)
            if D is None:
                D = _evaluate(z, ctx.spec, ctx.k + 1)
                ctx._thd_next = D
        return g * D, None, None

    @staticmethod
    def jvp(ctx, z_t, _spec_t, _k_t):
        (z,) = ctx.saved_tensors
        return z_t * _UserDeriv.apply(z, ctx.spec, ctx.k + 1)


def derivatives(z: Tensor, spec: ActivationSpec, orders: Sequence[int]) -> List[Tensor]:
    """[sigma^(k)(z) for k in orders] of a user activation, differentiable to any order."""
    if _functorch_active():
        return [_evaluate(z, spec, k, functorch=True) for k in orders]
    return [_UserDeriv.apply(z, spec, int(k)) for k in orders]


def apply(z: Tensor, spec: ActivationSpec) -> Tensor:
    """sigma(z) of a user activation, differentiable to any order (see the module docstring)."""
    return derivatives(z, spec, [0])[0]


# ---- checking the given derivatives -------------------------------------------------------------


def check_activation(act, points=None, *, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL, **params) -> Dict[int, float]:
    """Compare each given derivative of a registered activation with autograd of the previous one.

    d1 is compared with autograd of fn, d2 with autograd of d1, and so on, in float64 at
    ``points`` (default: 21 points from -4.9 to 5.1, 0.5 apart; a tensor's device is kept, so
    CUDA-only callables can be checked on CUDA), with the given ``params`` (defaults otherwise).
    A point passes when |given - autograd| <= atol + rtol * |autograd|; points where autograd is
    not finite (the previous callable overflows there) are skipped, and an order where every
    point is skipped is an error.

    The defaults (rtol 1e-6, atol 1e-9) sit far above the float64 rounding of two correct
    formulas for the same function (~1e-15 relative at moderate |z|) and far below the O(1)
    relative error of a wrong term.

    Returns:
        ``{order: max |given - autograd|}`` over the points.

    Raises:
        ValueError: naming the order, the worst point, the given and the autograd value, and the
            mismatch, for the first order that fails.
    """
    if isinstance(act, RegisteredActivation):
        e = act._live()
    elif isinstance(act, ActivationSpec):
        e = entry_of(act)
        if params:
            raise TypeError("check_activation: pass parameters either in the spec or as keywords, not both")
        params = e.kwargs(act)
    elif isinstance(act, str):
        e = entry_of(ActivationSpec(act))
    else:
        raise TypeError(
            f"check_activation: act must be a registered activation's name, its RegisteredActivation "
            f"or its ActivationSpec, got {type(act).__name__}"
        )
    kw = e.kwargs(e.spec(**params))
    return _check(e, kw, points, rtol, atol, where=f"check_activation({e.name!r})")


def _check(e: RegisteredActivation, kw, points, rtol, atol, where) -> Dict[int, float]:
    for nm, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"{where}: {nm} must be a finite number >= 0, got {v!r}")
    if points is None:
        z = torch.tensor(DEFAULT_CHECK_POINTS, dtype=torch.float64)
    else:
        try:
            z = torch.as_tensor(points).detach().to(torch.float64).reshape(-1).clone()
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{where}: points must be a sequence of numbers or a tensor, got {type(points).__name__}") from None
        if z.numel() == 0 or not bool(torch.isfinite(z).all()):
            raise ValueError(f"{where}: points must be a non-empty set of finite numbers")
    report: Dict[int, float] = {}
    prev, prev_name = e.fn, "fn"
    for k in range(1, e.order + 1):
        with torch.enable_grad():
            zz = z.clone().requires_grad_(True)
            y = _checked(prev(zz, **kw), zz, e, k - 1)
            ag = None
            if y.requires_grad:
                (ag,) = torch.autograd.grad(y, zz, torch.ones_like(y), allow_unused=True)
        if ag is None:
            ag = torch.zeros_like(z)
        ag = ag.detach()
        given = _checked(e.derivatives[k - 1](z.clone(), **kw), z, e, k).detach()
        ok = torch.isfinite(ag)
        if not bool(ok.any()):
            raise ValueError(
                f"{where}: cannot check derivatives[{k - 1}] (order {k}): autograd of {prev_name} is "
                "not finite at any of the points; pass points where it is"
            )
        diff = (given - ag).abs()
        tol = atol + rtol * ag.abs()
        # a non-finite given value where autograd is finite is an infinite mismatch
        score = torch.where(ok, torch.where(torch.isfinite(diff), diff / tol, torch.full_like(diff, math.inf)), torch.zeros_like(diff))
        bad = score > 1
        report[k] = float(torch.where(ok, diff, torch.zeros_like(diff)).max())
        if bool(bad.any()):
            i = int(torch.argmax(score))
            p = ", ".join(f"{n}={v:g}" for n, v in kw.items())
            raise ValueError(
                f"{where}: derivatives[{k - 1}] (order {k}) disagrees with autograd of {prev_name} "
                f"at {int(bad.sum())} of {int(ok.sum())} points; worst at z = {float(z[i]):.17g}"
                + (f" ({p})" if p else "")
                + f": given {float(given[i]):.17g}, autograd {float(ag[i]):.17g}, mismatch "
                f"|given - autograd| = {float(diff[i]):.3e} > atol + rtol*|autograd| = {float(tol[i]):.3e} "
                f"(rtol={rtol:g}, atol={atol:g})"
            )
        prev, prev_name = e.derivatives[k - 1], f"derivatives[{k - 1}]"
    return report
