"""Activation specs: parsing names, modules and parameters into :class:`ActivationSpec`, and
torch's own function of each. What an activation is (its parameters, the torch functions and
torch.nn modules it stands for, ...) is written once in the registry, torchhessdiag/_registry.py;
everything here derives from it.

An activation is identified by an :class:`ActivationSpec` -- the table name (as in
``csrc/activations.h``) plus up to two float parameters ``a`` and ``b``:

============  ==========================  =====================================
name          parameters (a, b)           torch equivalent
============  ==========================  =====================================
identity      --                          ``x``
tanh          --                          ``torch.tanh``
sigmoid       --                          ``torch.sigmoid``
softplus      beta, threshold             ``F.softplus(x, beta, threshold)``
silu          --                          ``F.silu``
gelu          --                          ``F.gelu(x)``
gelu_tanh     --                          ``F.gelu(x, approximate="tanh")``
sin           w (frequency)               ``torch.sin(w * x)``
cos           w (frequency)               ``torch.cos(w * x)``
exp           --                          ``torch.exp``
elu           alpha                       ``F.elu(x, alpha)``
celu          alpha                       ``F.celu(x, alpha)``
relu          --                          ``F.relu``
leaky_relu    negative_slope              ``F.leaky_relu(x, negative_slope)``
============  ==========================  =====================================

User activations registered with :func:`torchhessdiag.register_activation` (torchhessdiag/custom.py)
are specs too: their name is the registered name, ``a`` and ``b`` hold their (up to two) declared
parameters, and ``spec.is_user`` is True. They are served from the user's callables, never from the
compiled table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from . import _registry

# Everything below about what an activation is comes from torchhessdiag/_registry.py.

#: name -> (parameter names, defaults), in the order of the table's enum (derived from the registry)
_PARAMS: Dict[str, Tuple[Tuple[str, ...], Tuple[float, ...]]] = {
    e.name: (e.param_names, e.defaults) for e in _registry.BUILTINS
}

NAMES: Tuple[str, ...] = _registry.TABLE_NAMES

#: Activations whose derivatives of order >= 2 vanish identically (piecewise linear or linear).
PIECEWISE_LINEAR = _registry.PIECEWISE_LINEAR
LINEAR = _registry.LINEAR


@dataclass(frozen=True)
class ActivationSpec:
    """An activation -- of the derivative table, or registered by the user -- with its parameters."""

    name: str
    a: float = 0.0
    b: float = 0.0

    @property
    def is_user(self) -> bool:
        """True for an activation registered with ``register_activation`` (not in the table)."""
        return self.name not in _registry.TABLE

    @property
    def params(self) -> Dict[str, float]:
        entry = _registry.TABLE.get(self.name)
        if entry is not None:
            names = entry.param_names
        else:
            from .custom import entry_of

            names = entry_of(self).param_names
        return dict(zip(names, (self.a, self.b)))

    @property
    def piecewise_linear(self) -> bool:
        return self.name in PIECEWISE_LINEAR

    @property
    def linear(self) -> bool:
        return self.name in LINEAR

    def __str__(self) -> str:
        try:
            params = self.params
        except ValueError:  # a user activation that is not registered (any more)
            return f"{self.name}(unregistered)"
        p = ", ".join(f"{k}={v:g}" for k, v in params.items())
        return f"{self.name}({p})" if p else self.name


def make_spec(act, **params) -> ActivationSpec:
    """Build an :class:`ActivationSpec` from a name (or a spec, a supported module, or a
    :class:`~torchhessdiag.custom.RegisteredActivation`).

    Names are those of the table and of the activations registered with
    ``register_activation`` (case-insensitive). Raises ``ValueError`` for unknown names or invalid
    parameter values and ``TypeError`` for parameters the activation does not take.
    """
    from . import custom

    if isinstance(act, custom.RegisteredActivation):
        return act.spec(**params)
    if isinstance(act, ActivationSpec):
        if params:
            raise TypeError("make_spec: pass parameters either in the spec or as keywords, not both")
        return act
    if isinstance(act, nn.Module):
        spec = spec_from_module(act)
        if spec is None:
            raise NotImplementedError(
                f"{type(act).__name__} is not in torchhessdiag's derivative table; supported: "
                + ", ".join(NAMES)
            )
        return spec
    if not isinstance(act, str):
        raise TypeError(f"act must be an activation name (str), got {type(act).__name__}")
    name = act.lower()
    entry = _registry.TABLE.get(name)
    if entry is None:
        user = custom.lookup(name)
        if user is not None:
            return user.spec(**params)
        registered = custom.registered_names()
        raise ValueError(
            f"unknown activation {act!r}; supported: {', '.join(NAMES)}"
            + (f"; registered: {', '.join(registered)}" if registered else "")
            + " (add your own with torchhessdiag.register_activation)"
        )
    names, defaults = entry.param_names, entry.defaults
    unknown = set(params) - set(names)
    if unknown:
        takes = ", ".join(names) if names else "no parameters"
        raise TypeError(f"activation {name!r} takes {takes}; got unexpected {sorted(unknown)}")
    values = [float(params.get(n, d)) for n, d in zip(names, defaults)]
    for n, v in zip(names, values):
        if not math.isfinite(v):
            raise ValueError(f"activation {name!r}: {n} must be finite, got {v}")
    for p, v in zip(entry.params, values):
        if p.nonzero and v == 0.0:
            raise ValueError(f"{name}: {p.name} must be non-zero")
    values += [0.0] * (2 - len(values))
    return ActivationSpec(name, values[0], values[1])


def torch_function(spec: ActivationSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch's own implementation of the activation (the oracle of the tests, and the function
    the slow path differentiates past the table's last order)."""
    if spec.is_user:
        from .custom import entry_of

        e = entry_of(spec)
        fn, kw = e.fn, e.kwargs(spec)
        return (lambda z: fn(z, **kw)) if kw else fn
    return _registry.TABLE[spec.name].torch_fn(spec.a, spec.b)


# the parameterless torch.nn activations, resolved without make_spec (parsing a model is on the
# path of every call)
_FIXED: Dict[type, ActivationSpec] = {
    t: ActivationSpec(name) for t, (name, attrs) in _registry.MODULES.items() if not attrs
}


def spec_from_module(m: nn.Module) -> Optional[ActivationSpec]:
    """The table entry a module computes, or None if it is not a supported activation.

    Recognises torch.nn's Tanh, Sigmoid, Softplus, SiLU, GELU, ELU, CELU, ReLU, LeakyReLU and
    every torchhessdiag.nn drop-in, including ``torchhessdiag.nn.UserActivation`` (a registered
    user activation: its spec has ``is_user`` True). ``nn.Identity`` is not treated as an
    activation here.
    """
    t = type(m)
    fixed = _FIXED.get(t)
    if fixed is not None:
        return fixed
    spec = getattr(m, "_thd_spec", None)
    if isinstance(spec, ActivationSpec):
        return spec
    hit = _registry.MODULES.get(t)
    if hit is None:
        return None
    name, attrs = hit
    # a selector value the table lacks (nn.GELU(approximate=...)) keeps the entry itself, as before
    chosen, _, params = _registry.resolve(name, {a: getattr(m, a) for a in attrs})
    return make_spec(chosen if chosen is not None else name, **params)


def user_spec_for_function(fn) -> Optional[ActivationSpec]:
    """The spec of a registered user activation, given the callable ``register_activation``
    returned (the one a model calls in its forward), or None for anything else.

    The spec carries the activation's default parameters; for a call with keyword parameters
    (``act(h, beta=2.0)``) use ``make_spec(spec.name, **kwargs)``. Only the returned
    :class:`~torchhessdiag.custom.RegisteredActivation` objects are recognised -- not the ``fn``
    they were built from, which may be a torch function used elsewhere with its own meaning.
    """
    from .custom import RegisteredActivation

    if isinstance(fn, RegisteredActivation) and fn.registered:
        return fn.spec()
    return None


def registered_functions() -> tuple:
    """The callables of all registered user activations (for torch.fx's ``autowrap_functions``);
    each maps to its spec through :func:`user_spec_for_function`."""
    return tuple(e.user for e in _registry.users())
