"""Tracing a model (or a plain function) into a small program of pieces the jet rules support.

:func:`build_program` traces ``f`` with ``torch.fx`` and classifies every node:

* nodes that do not depend on the input (parameters, buffers, tensor constants, arithmetic on
  Python numbers, ``x.shape``, ``torch.zeros_like(x)``) are *constants*: they are simply evaluated
  when the program runs;
* every node that depends on the input must map to one of the op kinds of
  ``torchhessdiag.taylor.RULES`` (linear layers, table activations, add/sub/mul/div, products,
  powers, indexing and concatenation of feature dims, sums, reshapes ...), or the whole program is
  refused with :class:`Unsupported` naming the node -- the caller then falls back to autograd.

The tracer treats table activations (torch.nn modules and ``torchhessdiag.nn`` drop-ins, and any
module :func:`torchhessdiag.activations.spec_from_module` recognises), ``nn.Linear``,
``nn.Identity`` and ``nn.Dropout`` as leaves, and every other ``torch.nn`` module as a leaf too (so
that an unsupported one, e.g. ``nn.LayerNorm``, is named in the reason). User modules and
``nn.Sequential`` are traced through. Functions registered as user activations (when
``torchhessdiag.activations.registered_functions`` exists) are kept as single nodes.

Whether a step is really supported can also depend on runtime shapes (a broadcast that would mix
the batch dimension into the features, say); the rules check that while the program runs and raise
:class:`Unsupported` as well.
"""

from __future__ import annotations

import builtins
import inspect
import operator
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import activations
from .activations import ActivationSpec, make_spec, spec_from_module

__all__ = ["Unsupported", "Step", "Program", "build_program"]


class Unsupported(Exception):
    """The jet propagation cannot handle this model; the message says which node and why."""


# ---- what the nodes mean --------------------------------------------------------------------

#: call_function targets -> op kind (a rule of taylor.RULES, or "meta"/"like" = constant results)
_FUNCTION_KINDS: Dict[Any, str] = {
    operator.add: "add",
    torch.add: "add",
    operator.sub: "sub",
    torch.sub: "sub",
    torch.subtract: "sub",
    operator.mul: "mul",
    torch.mul: "mul",
    torch.multiply: "mul",
    operator.truediv: "div",
    torch.div: "div",
    torch.divide: "div",
    torch.true_divide: "div",
    operator.neg: "neg",
    torch.neg: "neg",
    torch.negative: "neg",
    operator.pos: "identity",
    operator.pow: "pow",
    torch.pow: "pow",
    torch.square: "square",
    operator.getitem: "getitem",
    operator.matmul: "matmul",
    torch.matmul: "matmul",
    torch.mm: "matmul",
    F.linear: "linear",
    torch.cat: "cat",
    torch.concat: "cat",
    torch.concatenate: "cat",
    torch.stack: "stack",
    torch.sum: "sum",
    torch.mean: "mean",
    torch.reshape: "reshape",
    torch.flatten: "flatten",
    torch.unsqueeze: "unsqueeze",
    torch.squeeze: "squeeze",
    builtins.getattr: "meta",
    torch.zeros_like: "like",
    torch.ones_like: "like",
    torch.full_like: "like",
}

#: call_method names -> op kind
_METHOD_KINDS: Dict[str, str] = {
    "add": "add",
    "sub": "sub",
    "subtract": "sub",
    "mul": "mul",
    "multiply": "mul",
    "div": "div",
    "divide": "div",
    "true_divide": "div",
    "neg": "neg",
    "negative": "neg",
    "pow": "pow",
    "square": "square",
    "matmul": "matmul",
    "mm": "matmul",
    "sum": "sum",
    "mean": "mean",
    "reshape": "reshape",
    "view": "reshape",
    "flatten": "flatten",
    "unsqueeze": "unsqueeze",
    "squeeze": "squeeze",
    "contiguous": "identity",
    "clone": "identity",
    "size": "meta",
    "dim": "meta",
    "new_zeros": "like",
    "new_ones": "like",
    "new_full": "like",
}

#: attributes of an x-dependent tensor that are plain constants
_META_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda"})

# Table activations as functions: target -> (table name, names of the arguments after the input).
# Their derivatives come from the table (ops._derivs); nothing here knows a formula.
_ACT_FUNCTIONS: Dict[Any, Tuple[str, Tuple[str, ...]]] = {
    torch.tanh: ("tanh", ()),
    F.tanh: ("tanh", ()),
    torch.sigmoid: ("sigmoid", ()),
    F.sigmoid: ("sigmoid", ()),
    torch.special.expit: ("sigmoid", ()),
    F.silu: ("silu", ("inplace",)),
    F.softplus: ("softplus", ("beta", "threshold")),
    F.gelu: ("gelu", ("approximate",)),
    torch.sin: ("sin", ()),
    torch.cos: ("cos", ()),
    torch.exp: ("exp", ()),
    F.elu: ("elu", ("alpha", "inplace")),
    F.celu: ("celu", ("alpha", "inplace")),
    F.relu: ("relu", ("inplace",)),
    torch.relu: ("relu", ()),
    F.leaky_relu: ("leaky_relu", ("negative_slope", "inplace")),
}
_ACT_METHODS = {"tanh": "tanh", "sigmoid": "sigmoid", "sin": "sin", "cos": "cos", "exp": "exp", "relu": "relu"}


def function_spec(target: Any, args: tuple, kwargs: dict) -> Optional[ActivationSpec]:
    """The activation a call ``target(input, *args, **kwargs)`` computes, or None.

    Table functions (``torch.tanh``, ``F.softplus(x, beta, threshold)``, ``F.gelu(x,
    approximate=...)``, ...) map to their table entry; other functions are looked up with
    ``torchhessdiag.activations.user_spec_for_function`` when that exists (user-registered
    activations). Raises :class:`Unsupported` for a table function with arguments the table cannot
    represent (e.g. a tensor-valued ``beta``).
    """
    try:
        entry = _ACT_FUNCTIONS.get(target)
    except TypeError:  # unhashable target
        entry = None
    if entry is None:
        lookup = getattr(activations, "user_spec_for_function", None)
        if lookup is None:
            return None
        try:
            spec = lookup(target)
        except TypeError:
            return None
        if spec is None or not (args or kwargs):
            return spec
        if args:
            raise Unsupported(f"user activation {spec.name} called with positional parameters")
        for k, v in kwargs.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise Unsupported(f"user activation {spec.name} with a non-constant argument {k}={v!r}")
        return make_spec(spec.name, **kwargs)
    name, names = entry
    if len(args) > len(names):
        raise Unsupported(f"{name} called with {len(args) + 1} positional arguments")
    params = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in names:
            raise Unsupported(f"{name} called with the unsupported argument {k}=")
        params[k] = v
    params.pop("inplace", None)
    if name == "gelu":
        approx = params.pop("approximate", "none")
        if approx not in ("none", "tanh"):
            raise Unsupported(f"gelu with approximate={approx!r}")
        name = "gelu_tanh" if approx == "tanh" else "gelu"
    for k, v in params.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise Unsupported(f"{name} with a non-constant argument {k}={v!r}")
    return make_spec(name, **params)


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


# ---- the tracer -------------------------------------------------------------------------------


class _Root(nn.Module):
    """Holds the callable being traced, so that modules and parameters it reaches (also ones that
    are not its submodules, e.g. a model captured by a lambda) can be registered on this wrapper
    rather than on the user's own module."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


# torch.fx tracing is process-global: while it runs it replaces torch.nn.Module.__call__ and
# __getattr__ on the class (and _trace below replaces torch.autograd.Function.apply), restoring
# them when it ends. Two traces in two threads would restore each other's patches in the wrong
# order and leave them installed for good (seen: every later module call returned a torch.fx
# Proxy), and a module called by another thread mid-trace would land in this trace's graph. So
# (1) one trace at a time in the process (this lock), and (2) the tracer hands calls that come
# from other threads straight through (_Tracer.call_module / getattr).
_TRACE_LOCK = threading.RLock()


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        get = getattr(activations, "registered_functions", None)
        fns = tuple(get()) if get is not None else ()
        super().__init__(autowrap_functions=fns)
        self._n_ext = 0
        self._thread = threading.get_ident()

    def call_module(self, m, forward, args, kwargs):
        if threading.get_ident() != self._thread:  # another thread's module call: run it as is
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self._thread:  # another thread's attribute read: the value
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if spec_from_module(m) is not None or _is_linear(m):
            return True
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict, _Root)):
            return False
        return super().is_leaf_module(m, qualname)

    def _fresh(self, base: str) -> str:
        while True:
            name = f"{base}{self._n_ext}"
            self._n_ext += 1
            if not hasattr(self.root, name):
                return name

    def path_of_module(self, mod: nn.Module) -> str:
        try:
            return super().path_of_module(mod)
        except NameError:
            # a module reached through a closure or a plain attribute: register it on the root
            # (always our own wrapper or a fresh module, never the user's module)
            name = self._fresh("_thd_module")
            self.root.add_module(name, mod)
            if self.submodule_paths is not None:
                for n, m in mod.named_modules(prefix=name):
                    self.submodule_paths.setdefault(m, n)
            return name

    def create_arg(self, a: Any):
        if isinstance(a, nn.Parameter) and not any(a is p for p in self.root.parameters()):
            name = self._fresh("_thd_param")
            self.root.register_parameter(name, a)
            return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)


def _trace(f: Callable) -> Tuple[fx.Graph, nn.Module]:
    """(graph, root) of f, or raise Unsupported with torch.fx's reason. One trace at a time in
    the process (see _TRACE_LOCK)."""
    with _TRACE_LOCK:
        return _trace_locked(f)


def _trace_locked(f: Callable) -> Tuple[fx.Graph, nn.Module]:
    if inspect.ismethod(f) and isinstance(f.__self__, nn.Module) and f.__func__ is type(f.__self__).forward:
        f = f.__self__
    tracer = _Tracer()
    fn_cls = torch.autograd.Function
    orig_apply = fn_cls.__dict__["apply"]

    def apply(cls, *args, **kwargs):
        # torch.fx would trace through a custom autograd.Function's forward and silently drop its
        # backward; its derivatives are what the user defined, so leave it to autograd
        if any(isinstance(a, fx.Proxy) for a in list(args) + list(kwargs.values())):
            raise Unsupported(
                f"custom torch.autograd.Function {cls.__name__}: its derivatives are defined by its "
                "backward, which the jet propagation cannot see"
            )
        # orig_apply is a classmethod (torch <= 2.13) or a C classmethod_descriptor (torch 2.14):
        # binding it to cls works for both
        return orig_apply.__get__(None, cls)(*args, **kwargs)

    fn_cls.apply = classmethod(apply)
    try:
        if isinstance(f, nn.Module) or not isinstance(f, types.FunctionType):
            root = _Root(f)
            graph = tracer.trace(root)
        else:
            graph = tracer.trace(f)
            root = tracer.root
    except Unsupported:
        raise
    except Exception as e:  # noqa: BLE001 - any tracing failure means "not traceable"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise Unsupported(
            f"torch.fx could not trace it ({type(e).__name__}: {msg[:300]}); typical causes are "
            "Python control flow on tensor values or calls torch.fx cannot follow"
        ) from None
    finally:
        fn_cls.apply = orig_apply
    return graph, root


# ---- the program --------------------------------------------------------------------------------


@dataclass
class Step:
    """One node of the program. ``kind`` names the rule (taylor.RULES) for x-dependent nodes, or
    "input" / "attr" / "const" / "meta" / "like" / "output"."""

    node: fx.Node
    kind: str
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Program:
    steps: List[Step]
    root: nn.Module
    activations: List[ActivationSpec]

    def describe(self) -> str:
        """One line per x-dependent step: node name and kind."""
        return "\n".join(f"{s.node.name}: {s.kind}" for s in self.steps if s.kind not in ("attr", "const"))


def fetch_attr(root: nn.Module, target: str) -> Any:
    obj = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


_NAMESPACES = (
    ("torch", torch),
    ("torch.nn.functional", F),
    ("torch.special", torch.special),
    ("torch.linalg", torch.linalg),
    ("operator", operator),
    ("math", __import__("math")),
)


def _user_path(target: str) -> str:
    """A submodule path as the user sees it (without our wrapper's "fn." prefix)."""
    return target[3:] if target.startswith("fn.") else target


def _what(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return f"module {type(fetch_attr(root, node.target)).__name__} '{_user_path(node.target)}'"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    t = node.target
    name = getattr(t, "__name__", None) or repr(t)
    for label, namespace in _NAMESPACES:
        if getattr(namespace, name, None) is t:
            return f"function {label}.{name}"
    mod = getattr(t, "__module__", None) or ""
    qual = getattr(t, "__qualname__", None) or name
    return f"function {mod + '.' if mod else ''}{qual}"


def _method_call(name: str) -> Callable:
    def call(self_, *args, **kwargs):
        return getattr(self_, name)(*args, **kwargs)

    call.__name__ = name
    return call


def _classify(node: fx.Node, root: nn.Module, dep: set) -> Step:
    """The step for an x-dependent node, or raise Unsupported."""
    if node.op == "call_module":
        m = fetch_attr(root, node.target)
        if len(node.args) != 1 or node.kwargs:
            raise Unsupported(f"module {type(m).__name__} '{_user_path(node.target)}' is called with more than one argument")
        if _is_linear(m):
            return Step(node, "linear", {"module": m})
        if isinstance(m, nn.Dropout) and type(m) is nn.Dropout:
            if m.training and m.p > 0:
                raise NotImplementedError(
                    f"Dropout at '{_user_path(node.target)}' is in training mode, so the network is random and "
                    "has no Hessian; call model.eval() (dropout is the identity in eval mode)"
                )
            return Step(node, "identity")
        if isinstance(m, nn.Identity) and spec_from_module(m) is None:
            return Step(node, "identity")
        spec = spec_from_module(m)
        if spec is not None:
            return Step(node, "activation", {"spec": spec})
        raise Unsupported(f"{_what(node, root)} is not supported by the jet propagation")
    if node.op == "call_method":
        name = node.target
        if name in _ACT_METHODS and len(node.args) == 1 and not node.kwargs:
            return Step(node, "activation", {"spec": make_spec(_ACT_METHODS[name])})
        kind = _METHOD_KINDS.get(name)
        if kind is None:
            raise Unsupported(f"{_what(node, root)} is not supported by the jet propagation")
        if kind in ("meta", "like"):
            return Step(node, kind, {"fn": _method_call(name)})
        return Step(node, kind)
    if node.op == "call_function":
        t = node.target
        spec = function_spec(t, tuple(node.args[1:]), dict(node.kwargs)) if node.args else None
        if spec is not None:
            if not isinstance(node.args[0], fx.Node) or any(
                isinstance(a, fx.Node) and a.name in dep for a in list(node.args[1:]) + list(node.kwargs.values())
            ):
                raise Unsupported(f"{_what(node, root)}: only its first argument may depend on the input")
            return Step(node, "activation", {"spec": spec})
        try:
            kind = _FUNCTION_KINDS.get(t)
        except TypeError:
            kind = None
        if kind is None:
            raise Unsupported(f"{_what(node, root)} is not supported by the jet propagation")
        if kind == "meta":
            attr = node.args[1] if len(node.args) > 1 else None
            if attr not in _META_ATTRS:
                raise Unsupported(f"attribute Tensor.{attr} of an input-dependent value is not supported")
            return Step(node, "meta", {"fn": t})
        if kind == "like":
            return Step(node, "like", {"fn": t})
        return Step(node, kind)
    raise Unsupported(f"node '{node.name}' ({node.op}) is not supported")


def build_program(f: Callable) -> Program:
    """Trace ``f`` and classify its nodes; raise :class:`Unsupported` (with the offending node)
    when some input-dependent node has no jet rule."""
    graph, root = _trace(f)
    try:
        graph.eliminate_dead_code()
    except Exception:  # noqa: BLE001 - only an optimisation
        pass
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise Unsupported(f"f must take exactly one tensor argument; its traced form takes {len(placeholders)}")
    steps: List[Step] = []
    dep: set = set()
    acts: List[ActivationSpec] = []
    for node in graph.nodes:
        if node.op == "placeholder":
            steps.append(Step(node, "input"))
            dep.add(node.name)
            continue
        if node.op == "get_attr":
            steps.append(Step(node, "attr"))
            continue
        if node.op == "output":
            steps.append(Step(node, "output"))
            continue
        depends = False

        def see(a):
            nonlocal depends
            if a.name in dep:
                depends = True
            return a

        fx.node.map_arg((node.args, node.kwargs), see)
        if not depends:
            if node.op == "call_module":
                fn = fetch_attr(root, node.target)
            elif node.op == "call_method":
                fn = _method_call(node.target)
            else:
                fn = node.target
            steps.append(Step(node, "const", {"fn": fn}))
            continue
        step = _classify(node, root, dep)
        steps.append(step)
        if step.kind == "activation":
            acts.append(step.params["spec"])
        if step.kind not in ("meta", "like"):  # those give constants (shapes, zeros of x's shape)
            dep.add(node.name)
    return Program(steps, root, acts)
