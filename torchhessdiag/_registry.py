"""The activation registry: one entry per activation, everything Python knows about it.

An :class:`Activation` entry holds the name, the parameters (names, defaults, constraints), torch's
own function for it, the torch functions / Tensor methods / torch.nn module classes it stands for
(and the module attributes that hold its parameters), its drop-in class in ``torchhessdiag.nn``,
whether it is (piecewise) linear, and its table id -- its position in the C++ table
(``csrc/activations.h``: the ``Act`` enum and ``kActInfo``, reported by
``torchhessdiag._C.activations()`` / ``activation_info()``). The built-in entries are written once, in :data:`BUILTINS`,
in table order; user activations (``register_activation``, torchhessdiag/custom.py) are added
with :func:`add_user` and removed with :func:`remove_user` -- their entries have no table id and
carry the :class:`~torchhessdiag.custom.RegisteredActivation` as ``user``.

Everything else derives from here: parsing (``activations.make_spec``, ``spec_from_module``,
``torch_function``), the op argument checks (``_checks._check_act``), the tracer's tables
(``_graph_classify``), ``nn.convert``'s drop-ins, the engine's supported-list text and the
messages that list the supported activations. The derivative formulas are not here: they are
the C++ header and its mirror ``reference.TABLE`` (keyed by these names; tests/activations/test_registry.py
holds the three together).

Import direction: the bottom of the package (imports torch only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


@dataclass(frozen=True)
class Param:
    """A float parameter of an activation. ``nonzero``: the value 0 is refused (the formulas
    divide by it)."""

    name: str
    default: float
    nonzero: bool = False


@dataclass(frozen=True)
class Select:
    """A keyword argument of a torch function / module attribute that selects between table
    entries instead of being a parameter (``F.gelu(x, approximate="tanh")`` is ``gelu_tanh``)."""

    arg: str
    default: str
    names: Tuple[Tuple[str, str], ...]  # (argument value, entry name)

    def name_for(self, value) -> Optional[str]:
        for v, n in self.names:
            if v == value:
                return n
        return None


@dataclass(frozen=True)
class Activation:
    """One activation. Built-in entries have a ``table_id``; user entries have ``user``."""

    name: str
    params: Tuple[Param, ...] = ()
    #: (a, b) -> torch's own implementation z -> sigma(z) (built-in entries)
    torch_fn: Optional[Callable[[float, float], Callable[[Tensor], Tensor]]] = None
    #: call_function targets it stands for, with the names of their arguments after the input
    #: (arguments that are neither parameters nor ``select``'s, e.g. ``inplace``, are ignored)
    functions: Tuple[Tuple[Any, Tuple[str, ...]], ...] = ()
    #: Tensor methods it stands for (called without arguments)
    methods: Tuple[str, ...] = ()
    #: exact torch.nn classes it stands for, with the attributes read as its parameters (named as
    #: the parameters, or ``select.arg``)
    modules: Tuple[Tuple[type, Tuple[str, ...]], ...] = ()
    #: how a function / module argument selects between entries (see :class:`Select`)
    select: Optional[Select] = None
    #: the class name of its drop-in in torchhessdiag.nn, and constructor keywords besides the
    #: parameters (which the class's ``_ARGS`` map)
    dropin: Optional[str] = None
    dropin_kwargs: Tuple[Tuple[str, Any], ...] = ()
    #: every derivative of order >= 2 vanishes (piecewise linear), or of order >= 2 and it is linear
    piecewise_linear: bool = False
    linear: bool = False
    #: position in the C++ table (csrc/activations.h); None for a user activation
    table_id: Optional[int] = None
    #: the RegisteredActivation of a user entry
    user: Any = None

    @property
    def param_names(self) -> Tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def defaults(self) -> Tuple[float, ...]:
        return tuple(p.default for p in self.params)

    @property
    def is_user(self) -> bool:
        return self.table_id is None


def _sin(a, b):
    return (lambda z: torch.sin(z)) if a == 1.0 else (lambda z: torch.sin(z * a))


def _cos(a, b):
    return (lambda z: torch.cos(z)) if a == 1.0 else (lambda z: torch.cos(z * a))


_GELU_SELECT = Select("approximate", "none", (("none", "gelu"), ("tanh", "gelu_tanh")))

#: The built-in activations, in the order of the C++ table (their position is their table id).
#: Adding one: its struct, enum value and name in csrc/activations.h, its formula in
#: reference.TABLE, and one entry here (DEVELOPERS.md, "Adding an activation").
BUILTINS: Tuple[Activation, ...] = tuple(
    Activation(table_id=i, **kw)
    for i, kw in enumerate(
        [
            dict(name="identity", torch_fn=lambda a, b: lambda z: z, dropin="Identity", linear=True),
            dict(
                name="tanh",
                torch_fn=lambda a, b: torch.tanh,
                functions=((torch.tanh, ()), (F.tanh, ())),
                methods=("tanh",),
                modules=((nn.Tanh, ()),),
                dropin="Tanh",
            ),
            dict(
                name="sigmoid",
                torch_fn=lambda a, b: torch.sigmoid,
                functions=((torch.sigmoid, ()), (F.sigmoid, ()), (torch.special.expit, ())),
                methods=("sigmoid",),
                modules=((nn.Sigmoid, ()),),
                dropin="Sigmoid",
            ),
            dict(
                name="softplus",
                params=(Param("beta", 1.0, nonzero=True), Param("threshold", 20.0)),
                torch_fn=lambda a, b: lambda z: F.softplus(z, beta=a, threshold=b),
                functions=((F.softplus, ("beta", "threshold")),),
                modules=((nn.Softplus, ("beta", "threshold")),),
                dropin="Softplus",
            ),
            dict(
                name="silu",
                torch_fn=lambda a, b: F.silu,
                functions=((F.silu, ("inplace",)),),
                modules=((nn.SiLU, ()),),
                dropin="SiLU",
            ),
            dict(
                name="gelu",
                torch_fn=lambda a, b: F.gelu,
                functions=((F.gelu, ("approximate",)),),
                modules=((nn.GELU, ("approximate",)),),
                select=_GELU_SELECT,
                dropin="GELU",
            ),
            dict(
                name="gelu_tanh",
                torch_fn=lambda a, b: lambda z: F.gelu(z, approximate="tanh"),
                dropin="GELU",
                dropin_kwargs=(("approximate", "tanh"),),
            ),  # F.gelu / nn.GELU with approximate="tanh": gelu's select
            dict(name="sin", params=(Param("w", 1.0),), torch_fn=_sin, functions=((torch.sin, ()),), methods=("sin",), dropin="Sine"),
            dict(name="cos", params=(Param("w", 1.0),), torch_fn=_cos, functions=((torch.cos, ()),), methods=("cos",), dropin="Cosine"),
            dict(name="exp", torch_fn=lambda a, b: torch.exp, functions=((torch.exp, ()),), methods=("exp",), dropin="Exp"),
            dict(
                name="elu",
                params=(Param("alpha", 1.0),),
                torch_fn=lambda a, b: lambda z: F.elu(z, alpha=a),
                functions=((F.elu, ("alpha", "inplace")),),
                modules=((nn.ELU, ("alpha",)),),
                dropin="ELU",
            ),
            dict(
                name="celu",
                params=(Param("alpha", 1.0, nonzero=True),),
                torch_fn=lambda a, b: lambda z: F.celu(z, alpha=a),
                functions=((F.celu, ("alpha", "inplace")),),
                modules=((nn.CELU, ("alpha",)),),
                dropin="CELU",
            ),
            dict(
                name="relu",
                torch_fn=lambda a, b: F.relu,
                functions=((F.relu, ("inplace",)), (torch.relu, ())),
                methods=("relu",),
                modules=((nn.ReLU, ()),),
                dropin="ReLU",
                piecewise_linear=True,
            ),
            dict(
                name="leaky_relu",
                params=(Param("negative_slope", 0.01),),
                torch_fn=lambda a, b: lambda z: F.leaky_relu(z, negative_slope=a),
                functions=((F.leaky_relu, ("negative_slope", "inplace")),),
                modules=((nn.LeakyReLU, ("negative_slope",)),),
                dropin="LeakyReLU",
                piecewise_linear=True,
            ),
        ]
    )
)

#: name -> built-in entry, in table order
TABLE: Dict[str, Activation] = {e.name: e for e in BUILTINS}
#: the built-in names in table order (= torchhessdiag._C.activations())
TABLE_NAMES: Tuple[str, ...] = tuple(TABLE)

# ---- derived tables ------------------------------------------------------------------------------

#: call_function target -> (entry name, names of the arguments after the input)
FUNCTIONS: Dict[Any, Tuple[str, Tuple[str, ...]]] = {t: (e.name, args) for e in BUILTINS for t, args in e.functions}
#: Tensor method -> entry name
METHODS: Dict[str, str] = {m: e.name for e in BUILTINS for m in e.methods}
#: exact torch.nn class -> (entry name, attributes read)
MODULES: Dict[type, Tuple[str, Tuple[str, ...]]] = {t: (e.name, attrs) for e in BUILTINS for t, attrs in e.modules}
PIECEWISE_LINEAR = frozenset(e.name for e in BUILTINS if e.piecewise_linear)
LINEAR = frozenset(e.name for e in BUILTINS if e.linear)


def module_class_names() -> Tuple[str, ...]:
    """The torch.nn classes the table stands for, by class name, in table order (no repeats)."""
    out: Dict[str, None] = {}
    for e in BUILTINS:
        for t, _ in e.modules:
            out[t.__name__] = None
    return tuple(out)


def resolve(name: str, values: Mapping[str, Any]) -> Tuple[str, Optional[Any], Dict[str, Any]]:
    """Apply an entry's ``select``: (the selected entry's name, or None for an unknown selector
    value; the selector value; the remaining values, only the selected entry's parameters)."""
    e = TABLE[name]
    sel = e.select
    chosen: Optional[str] = name
    value = None
    if sel is not None:
        value = values.get(sel.arg, sel.default)
        chosen = sel.name_for(value)
    keep = TABLE[chosen].param_names if chosen is not None else ()
    return chosen, value, {k: v for k, v in values.items() if k in keep}


# ---- user activations ----------------------------------------------------------------------------

#: key name.lower() -> user entry, in registration order
_USER: Dict[str, Activation] = {}


def add_user(obj) -> Activation:
    """Add (or, for the same name, replace in place) the entry of a RegisteredActivation. The
    caller (custom.register_activation) holds its lock and has checked the name."""
    e = Activation(name=obj.name, params=tuple(Param(n, d) for n, d in zip(obj.param_names, obj.defaults)), user=obj)
    _USER[obj.name.lower()] = e
    return e


def remove_user(name: str) -> Optional[Activation]:
    """Remove a user entry; returns it, or None if there was none."""
    return _USER.pop(name.lower(), None)


def user(name: str) -> Optional[Activation]:
    """The user entry called ``name`` (case-insensitive), or None."""
    return _USER.get(name.lower())


def users() -> Tuple[Activation, ...]:
    """The user entries, in registration order."""
    return tuple(_USER.values())


def get(name: str) -> Optional[Activation]:
    """The entry called ``name``: a built-in one (exact name) or a user one (case-insensitive)."""
    e = TABLE.get(name)
    return e if e is not None else _USER.get(name.lower())
