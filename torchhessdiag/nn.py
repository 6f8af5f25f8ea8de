"""Drop-in activation modules with fused, exact higher derivatives.

Each module computes the same values as its torch.nn namesake (torch's own kernel does the
forward, so outputs are bit-for-bit identical), but its backward, double backward and every higher
derivative run the fused kernels of the derivative table. For code that computes PDE residuals,
Hessian diagonals or Laplacians with nested ``torch.autograd.grad(create_graph=True)`` this makes
double backward through an MLP cheaper (one fused kernel per activation instead of a chain of
elementwise ops), and it never returns ``None``: the derivative ops keep their dependency on the
input, so a vanishing second derivative comes back as zeros.

``convert(model)`` swaps the torch.nn activations of an existing model for these.

``inplace=True`` is accepted for signature compatibility and ignored: the derivatives need the
activation's input, so it is never overwritten (the values are the same).
"""

from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
from torch import nn

from . import _registry, custom, ops
from .activations import ActivationSpec, make_spec, spec_from_module, torch_function

_functorch_probe = getattr(torch._C, "_are_functorch_transforms_active", None)


def _functorch_active() -> bool:
    return bool(_functorch_probe()) if _functorch_probe is not None else False


_FLOATS = (torch.float32, torch.float64)

# the op overload itself (one attribute lookup and the packet's overload resolution less per call)
_act_forward = ops._ops.act_forward.default

__all__ = [
    "Tanh",
    "Sigmoid",
    "Softplus",
    "SiLU",
    "GELU",
    "Sine",
    "Cosine",
    "Exp",
    "ELU",
    "CELU",
    "ReLU",
    "LeakyReLU",
    "Identity",
    "UserActivation",
    "convert",
]


class _DropIn(nn.Module):
    """Base: a table activation applied through the torchhessdiag ops.

    The activation lives in one immutable ActivationSpec; the familiar attributes (``beta``,
    ``alpha``, ``negative_slope``, ...) read it, and assigning one rebuilds (and validates) it,
    so a changed attribute always changes what the module computes.
    """

    def __init__(self, spec: ActivationSpec):
        super().__init__()
        self._thd_spec = spec

    @property
    def spec(self) -> ActivationSpec:
        return self._thd_spec

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (isinstance(input, torch.Tensor) and input.dtype in _FLOATS):
            ops.check_float_tensor(input, "input", f"torchhessdiag.nn.{type(self).__name__}")
        s = self._thd_spec
        if _functorch_active():
            # torch.func transforms (vmap, grad, jacrev, hessian) cannot see through custom-op
            # autograd; under them, use torch's own function (same value, torch's derivatives).
            return torch_function(s)(input)
        return _act_forward(input, s.name, s.a, s.b)

    # the constructor arguments as (attribute, table parameter) pairs, in order
    _ARGS: tuple = ()

    def extra_repr(self) -> str:
        return ", ".join(f"{attr}={getattr(self, attr)!r}" for attr, _ in self._ARGS)


class _SpecParam:
    """A module attribute backed by a parameter of the module's ActivationSpec."""

    def __init__(self, param: str):
        self.param = param

    def __set_name__(self, owner, name):
        self.attr = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return obj._thd_spec.params[self.param]

    def __set__(self, obj, value):
        spec = obj._thd_spec
        params = dict(spec.params)
        params[self.param] = value
        obj._thd_spec = make_spec(spec.name, **params)


class Tanh(_DropIn):
    """tanh, as ``torch.nn.Tanh``."""

    def __init__(self):
        super().__init__(make_spec("tanh"))


class Sigmoid(_DropIn):
    """logistic sigmoid, as ``torch.nn.Sigmoid``."""

    def __init__(self):
        super().__init__(make_spec("sigmoid"))


class Softplus(_DropIn):
    """softplus, as ``torch.nn.Softplus(beta, threshold)``: linear where ``beta * x > threshold``."""

    beta = _SpecParam("beta")
    threshold = _SpecParam("threshold")
    _ARGS = (("beta", "beta"), ("threshold", "threshold"))

    def __init__(self, beta: float = 1.0, threshold: float = 20.0):
        super().__init__(make_spec("softplus", beta=beta, threshold=threshold))


class SiLU(_DropIn):
    """x * sigmoid(x), as ``torch.nn.SiLU``."""

    def __init__(self, inplace: bool = False):
        super().__init__(make_spec("silu"))
        self.inplace = inplace


class GELU(_DropIn):
    """GELU, as ``torch.nn.GELU(approximate='none' | 'tanh')``."""

    _ARGS = (("approximate", None),)

    def __init__(self, approximate: str = "none"):
        super().__init__(make_spec(self._name_for(approximate)))

    # approximate -> table entry: the registry's select of "gelu"
    _SELECT = _registry.TABLE["gelu"].select

    @classmethod
    def _name_for(cls, approximate: str) -> str:
        name = cls._SELECT.name_for(approximate)
        if name is None:
            allowed = " or ".join(repr(v) for v, _ in cls._SELECT.names)
            raise ValueError(f"GELU: approximate must be {allowed}, got {approximate!r}")
        return name

    @property
    def approximate(self) -> str:
        return next(v for v, n in self._SELECT.names if n == self._thd_spec.name)

    @approximate.setter
    def approximate(self, value: str) -> None:
        self._thd_spec = make_spec(self._name_for(value))


class Sine(_DropIn):
    """sin(w0 * x) (SIREN-style; w0 = 1 gives plain sin)."""

    w0 = _SpecParam("w")
    _ARGS = (("w0", "w"),)

    def __init__(self, w0: float = 1.0):
        super().__init__(make_spec("sin", w=w0))


class Cosine(_DropIn):
    """cos(w0 * x)."""

    w0 = _SpecParam("w")
    _ARGS = (("w0", "w"),)

    def __init__(self, w0: float = 1.0):
        super().__init__(make_spec("cos", w=w0))


class Exp(_DropIn):
    """exp(x)."""

    def __init__(self):
        super().__init__(make_spec("exp"))


class ELU(_DropIn):
    """ELU, as ``torch.nn.ELU(alpha)``."""

    alpha = _SpecParam("alpha")
    _ARGS = (("alpha", "alpha"),)

    def __init__(self, alpha: float = 1.0, inplace: bool = False):
        super().__init__(make_spec("elu", alpha=alpha))
        self.inplace = inplace


class CELU(_DropIn):
    """CELU, as ``torch.nn.CELU(alpha)``."""

    alpha = _SpecParam("alpha")
    _ARGS = (("alpha", "alpha"),)

    def __init__(self, alpha: float = 1.0, inplace: bool = False):
        super().__init__(make_spec("celu", alpha=alpha))
        self.inplace = inplace


class ReLU(_DropIn):
    """ReLU, as ``torch.nn.ReLU``. Its second and higher derivatives are exactly zero; taking one
    warns once, since a purely piecewise-linear network has a zero Hessian almost everywhere."""

    def __init__(self, inplace: bool = False):
        super().__init__(make_spec("relu"))
        self.inplace = inplace


class LeakyReLU(_DropIn):
    """LeakyReLU, as ``torch.nn.LeakyReLU(negative_slope)``; second derivatives as for ReLU."""

    negative_slope = _SpecParam("negative_slope")
    _ARGS = (("negative_slope", "negative_slope"),)

    def __init__(self, negative_slope: float = 1e-2, inplace: bool = False):
        super().__init__(make_spec("leaky_relu", negative_slope=negative_slope))
        self.inplace = inplace


class Identity(_DropIn):
    """The identity, as ``torch.nn.Identity`` (arguments are ignored), but with derivatives that
    stay attached to the input: the second derivative is a tensor of zeros, never ``None``."""

    def __init__(self, *args, **kwargs):
        super().__init__(make_spec("identity"))


class UserActivation(_DropIn):
    """A user activation registered with ``torchhessdiag.register_activation``, as a module.

    ``UserActivation("my_act", beta=2.0)`` (or ``act.module(beta=2.0)`` on the object
    ``register_activation`` returned). The forward is your ``fn``; the backward multiplies by
    your d1, the double backward uses d2, and so on (past the last derivative given: exact
    autograd of the last one), so nested ``torch.autograd.grad(create_graph=True)`` through it is
    exact to any order and never returns ``None``. The engine (``mlp_laplacian`` etc.) uses d1
    and d2 for it.

    The module holds only the activation's name and parameters: deepcopy and pickle work (load a
    pickled model in a process where the activation is registered under the same name). Under
    torch.func transforms it applies ``fn`` itself and torch.func differentiates ``fn`` (as the
    table drop-ins run torch's own function there; see torchhessdiag/custom.py for why).
    """

    def __init__(self, act, **params):
        spec = make_spec(act, **params)
        if not spec.is_user:
            raise ValueError(
                f"UserActivation: {spec.name!r} is an activation of the table; use its drop-in "
                "(e.g. torchhessdiag.nn.Tanh()) or torchhessdiag.nn.convert"
            )
        super().__init__(spec)

    @property
    def name(self) -> str:
        return self._thd_spec.name

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        ops.check_float_tensor(input, "input", f"torchhessdiag.nn.UserActivation({self._thd_spec.name!r})")
        return custom.apply(input, self._thd_spec)

    def extra_repr(self) -> str:
        s = self._thd_spec
        try:
            params = s.params
        except ValueError:
            return f"{s.name!r} (unregistered)"
        return ", ".join([repr(s.name)] + [f"{k}={v!r}" for k, v in params.items()])


def _dropin_maker(entry: _registry.Activation):
    """spec -> a new drop-in of the registry entry's class: the spec's parameters as the keywords
    the class's ``_ARGS`` name, plus the entry's fixed ``dropin_kwargs``."""
    cls = globals()[entry.dropin]
    fixed = dict(entry.dropin_kwargs)
    args = tuple((attr, p) for attr, p in cls._ARGS if p is not None)

    def make(s: ActivationSpec) -> _DropIn:
        params = s.params
        return cls(**{attr: params[p] for attr, p in args}, **fixed)

    return make


#: table name -> spec -> its drop-in (derived from the registry's ``dropin`` entries)
_DROPIN_OF = {e.name: _dropin_maker(e) for e in _registry.BUILTINS if e.dropin is not None}


def _dropin_for(m: nn.Module) -> Optional[nn.Module]:
    if isinstance(m, _DropIn):
        return None  # already one
    spec = spec_from_module(m)
    return None if spec is None else _DROPIN_OF[spec.name](spec)


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every torch.nn activation in ``model`` by its torchhessdiag.nn drop-in.

    Recognised: Tanh, Sigmoid, Softplus, SiLU, GELU, ELU, CELU, ReLU, LeakyReLU (with their
    parameters), at any depth of nesting. Outputs do not change (the drop-ins' forward is torch's
    own kernel). Other activations from ``torch.nn`` stay as they are (their derivatives remain
    torch's) and are named in one warning.

    Args:
        model: the module to convert; may itself be an activation.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The converted module (``model`` itself when ``inplace=True``, unless ``model`` is a bare
        activation, which cannot be replaced in place and is returned as a new drop-in).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    root = _dropin_for(model)
    if root is not None:
        return root.train(model.training)
    if not inplace:
        model = copy.deepcopy(model)
    left = []

    def walk(m: nn.Module) -> None:
        for name, child in list(m._modules.items()):
            if child is None:
                continue
            r = _dropin_for(child)
            if r is not None:
                r.train(child.training)
                m._modules[name] = r
                continue
            if type(child).__module__ == "torch.nn.modules.activation" and not isinstance(
                child, nn.MultiheadAttention
            ):
                left.append(type(child).__name__)
            walk(child)

    walk(model)
    if left:
        warnings.warn(
            "torchhessdiag.nn.convert: no drop-in for " + ", ".join(sorted(set(left)))
            + "; these keep torch's own derivatives (still exact where torch's are).",
            UserWarning,
            stacklevel=2,
        )
    return model
