"""The activation registry: names, parameters, and how torch.nn modules map onto the table.

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
import torch.nn.functional as F
from torch import nn

# name -> (parameter names, defaults). The order of names is the order of the table's enum.
_PARAMS: Dict[str, Tuple[Tuple[str, ...], Tuple[float, ...]]] = {
    "identity": ((), ()),
    "tanh": ((), ()),
    "sigmoid": ((), ()),
    "softplus": (("beta", "threshold"), (1.0, 20.0)),
    "silu": ((), ()),
    "gelu": ((), ()),
    "gelu_tanh": ((), ()),
    "sin": (("w",), (1.0,)),
    "cos": (("w",), (1.0,)),
    "exp": ((), ()),
    "elu": (("alpha",), (1.0,)),
    "celu": (("alpha",), (1.0,)),
    "relu": ((), ()),
    "leaky_relu": (("negative_slope",), (0.01,)),
}

NAMES: Tuple[str, ...] = tuple(_PARAMS)

#: Activations whose derivatives of order >= 2 vanish identically (piecewise linear or linear).
PIECEWISE_LINEAR = frozenset({"relu", "leaky_relu"})
LINEAR = frozenset({"identity"})


@dataclass(frozen=True)
class ActivationSpec:
    """An activation -- of the derivative table, or registered by the user -- with its parameters."""

    name: str
    a: float = 0.0
    b: float = 0.0

    @property
    def is_user(self) -> bool:
        """True for an activation registered with ``register_activation`` (not in the table)."""
        return self.name not in _PARAMS

    @property
    def params(self) -> Dict[str, float]:
        if self.name in _PARAMS:
            names, _ = _PARAMS[self.name]
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
    if name not in _PARAMS:
        user = custom.lookup(name)
        if user is not None:
            return user.spec(**params)
        registered = custom.registered_names()
        raise ValueError(
            f"unknown activation {act!r}; supported: {', '.join(NAMES)}"
            + (f"; registered: {', '.join(registered)}" if registered else "")
            + " (add your own with torchhessdiag.register_activation)"
        )
    names, defaults = _PARAMS[name]
    unknown = set(params) - set(names)
    if unknown:
        takes = ", ".join(names) if names else "no parameters"
        raise TypeError(f"activation {name!r} takes {takes}; got unexpected {sorted(unknown)}")
    values = [float(params.get(n, d)) for n, d in zip(names, defaults)]
    for n, v in zip(names, values):
        if not math.isfinite(v):
            raise ValueError(f"activation {name!r}: {n} must be finite, got {v}")
    if name == "softplus" and values[0] == 0.0:
        raise ValueError("softplus: beta must be non-zero")
    if name == "celu" and values[0] == 0.0:
        raise ValueError("celu: alpha must be non-zero")
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
    n, a, b = spec.name, spec.a, spec.b
    table: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "identity": lambda z: z,
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "softplus": lambda z: F.softplus(z, beta=a, threshold=b),
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
        "sin": (lambda z: torch.sin(z)) if a == 1.0 else (lambda z: torch.sin(z * a)),
        "cos": (lambda z: torch.cos(z)) if a == 1.0 else (lambda z: torch.cos(z * a)),
        "exp": torch.exp,
        "elu": lambda z: F.elu(z, alpha=a),
        "celu": lambda z: F.celu(z, alpha=a),
        "relu": F.relu,
        "leaky_relu": lambda z: F.leaky_relu(z, negative_slope=a),
    }
    return table[n]


# the parameterless torch.nn activations, resolved without make_spec (parsing a model is on the
# path of every call)
_FIXED: Dict[type, ActivationSpec] = {
    nn.Tanh: ActivationSpec("tanh"),
    nn.Sigmoid: ActivationSpec("sigmoid"),
    nn.SiLU: ActivationSpec("silu"),
    nn.ReLU: ActivationSpec("relu"),
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
    if t is nn.Softplus:
        return make_spec("softplus", beta=m.beta, threshold=m.threshold)
    if t is nn.GELU:
        return make_spec("gelu_tanh" if m.approximate == "tanh" else "gelu")
    if t is nn.ELU:
        return make_spec("elu", alpha=m.alpha)
    if t is nn.CELU:
        return make_spec("celu", alpha=m.alpha)
    if t is nn.LeakyReLU:
        return make_spec("leaky_relu", negative_slope=m.negative_slope)
    return None


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
    from .custom import _REGISTRY

    return tuple(_REGISTRY.values())
