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
import itertools
import linecache
import math
import operator
import threading
import types
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import activations
from .activations import ActivationSpec, make_spec, spec_from_module

__all__ = ["Unsupported", "ShapeError", "Step", "Program", "build_program", "get_program", "clear_cache", "cache_info"]

Tensor = torch.Tensor


class Unsupported(Exception):
    """The jet propagation cannot handle this model; the message says which node and why."""


class ShapeError(ValueError):
    """x (or a value computed from it) does not fit a layer of the model: the message names the
    layer and the sizes. Raised to the caller as it is (the model cannot run on x at all)."""


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
    # torchhessdiag/taylor_nn.py
    torch.sqrt: "sqrt",
    torch.rsqrt: "rsqrt",
    torch.reciprocal: "reciprocal",
    torch.transpose: "transpose",
    torch.swapaxes: "transpose",
    torch.swapdims: "transpose",
    torch.permute: "permute",
    F.softmax: "softmax",
    torch.softmax: "softmax",
    F.log_softmax: "log_softmax",
    torch.log_softmax: "log_softmax",
    F.layer_norm: "layer_norm",
    torch.layer_norm: "layer_norm",
    F.scaled_dot_product_attention: "sdpa",
}
if hasattr(F, "rms_norm"):
    _FUNCTION_KINDS[F.rms_norm] = "rms_norm"
if hasattr(torch, "rms_norm"):
    _FUNCTION_KINDS[torch.rms_norm] = "rms_norm"

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
    # torchhessdiag/taylor_nn.py
    "sqrt": "sqrt",
    "rsqrt": "rsqrt",
    "reciprocal": "reciprocal",
    "transpose": "transpose",
    "swapaxes": "transpose",
    "swapdims": "transpose",
    "permute": "permute",
    "softmax": "softmax",
    "log_softmax": "log_softmax",
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


def traced_callable(f: Callable) -> Callable:
    """What is traced for f: a module's bound ``forward`` is traced (and run) as the module."""
    if inspect.ismethod(f) and isinstance(f.__self__, nn.Module) and f.__func__ is type(f.__self__).forward:
        return f.__self__
    return f


def _trace_locked(f: Callable) -> Tuple[fx.Graph, nn.Module]:
    f = traced_callable(f)
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
    "input" / "attr" / "const" / "meta" / "like" / "output". A rule whose kind ends in
    ``_module`` gets the module (looked up by ``params["target"]`` on every run, never kept) as
    its first argument after the parameters."""

    node: fx.Node
    kind: str
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Program:
    """A traced model: its steps, and ``run``, the straight-line Python function generated from
    them (:func:`_codegen`) that calls one rule per step and drops each value after its last use.

    The program holds no reference to the traced module itself: attributes under it (targets
    ``fn.*``) are read from the module passed to ``run`` on every call, so weights, buffers and
    replaced parameters are always current. ``root`` keeps only what the trace itself created
    (tensor constants captured from closures, modules reached through closures or plain lists)."""

    steps: List[Step]
    root: nn.Module
    activations: List[ActivationSpec]
    run: Optional[Callable] = None
    source: str = ""
    fn_ref: Optional[Callable[[], Any]] = None  # weak reference to the traced f (for tests)
    slot: Optional[str] = None  # its attribute of _SLOTS, once torch.compile has used it

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


#: torch.nn modules with a jet rule that reads the module (its weights and hyper-parameters) when
#: the program runs: class -> rule kind (taylor.RULES). Exact classes only: a subclass may
#: override forward.
_MODULE_KINDS: Dict[type, str] = {
    nn.LayerNorm: "layer_norm_module",
    nn.Softmax: "softmax_module",
    nn.LogSoftmax: "log_softmax_module",
    nn.MultiheadAttention: "mha_module",
}
if hasattr(nn, "RMSNorm"):
    _MODULE_KINDS[nn.RMSNorm] = "rms_norm_module"


def _classify(node: fx.Node, root: nn.Module, dep: set) -> Step:
    """The step for an x-dependent node, or raise Unsupported."""
    if node.op == "call_module":
        m = fetch_attr(root, node.target)
        kind = _MODULE_KINDS.get(type(m))
        if kind is not None:
            if kind == "mha_module":
                return Step(node, kind, {"target": node.target, "name": _user_path(node.target)})
            if len(node.args) != 1 or node.kwargs:
                raise Unsupported(f"module {type(m).__name__} '{_user_path(node.target)}' is called with more than one argument")
            return Step(node, kind, {"target": node.target, "name": _user_path(node.target)})
        if len(node.args) != 1 or node.kwargs:
            raise Unsupported(f"module {type(m).__name__} '{_user_path(node.target)}' is called with more than one argument")
        if _is_linear(m):
            return Step(node, "linear_module", {"target": node.target, "name": _user_path(node.target)})
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
            if attr == "mT":
                return Step(node, "mT")
            if attr not in _META_ATTRS:
                raise Unsupported(f"attribute Tensor.{attr} of an input-dependent value is not supported")
            return Step(node, "meta", {"fn": t})
        if kind == "like":
            return Step(node, "like", {"fn": t})
        return Step(node, kind)
    raise Unsupported(f"node '{node.name}' ({node.op}) is not supported")


def _classify_all(graph: fx.Graph, root: nn.Module) -> Tuple[List[Step], List[ActivationSpec]]:
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
                steps.append(Step(node, "const_module", {"target": node.target}))
            else:
                fn = _method_call(node.target) if node.op == "call_method" else node.target
                steps.append(Step(node, "const", {"fn": fn}))
            continue
        step = _classify(node, root, dep)
        steps.append(step)
        if step.kind == "activation":
            acts.append(step.params["spec"])
        if step.kind not in ("meta", "like"):  # those give constants (shapes, zeros of x's shape)
            dep.add(node.name)
    return steps, acts


def build_program(f: Callable) -> Program:
    """Trace ``f`` and classify its nodes; raise :class:`Unsupported` (with the offending node)
    when some input-dependent node has no jet rule. Not cached (see :func:`get_program`)."""
    graph, root = _trace(f)
    try:
        graph.eliminate_dead_code()
    except Exception:  # noqa: BLE001 - only an optimisation
        pass
    steps, acts = _classify_all(graph, root)
    traced = root._modules.get("fn") if isinstance(root, _Root) else None
    if isinstance(root, _Root):
        # the program must not hold the user's f: attributes under "fn." are read from the f
        # passed to run() (so a cached program never keeps a model alive, nor serves stale weights)
        root._modules.pop("fn", None)
        root.__dict__.pop("fn", None)
    source, consts = _codegen(steps, uses_fn=traced is not None)
    namespace: Dict[str, Any] = {}
    filename = f"<torchhessdiag program {next(_PROGRAM_IDS)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), {"C": consts, "_RUNTIME": _RUNTIME}, namespace)
    ref = None
    if traced is not None:
        ref = weakref.ref(traced)
    elif isinstance(f, types.FunctionType):
        try:
            ref = weakref.ref(f)
        except TypeError:
            ref = None
    return Program(steps, root, acts, run=namespace["run"], source=source, fn_ref=ref)


# ---- code generation -------------------------------------------------------------------------------

_PROGRAM_IDS = itertools.count()


class _Runtime:
    """What the generated code calls: filled in by torchhessdiag.taylor (the rules, the input
    jet, the layout check) so that graph.py does not import taylor.py."""

    rules: Dict[str, Callable] = {}
    input: Callable = None  # type: ignore[assignment]
    check: Callable = None  # type: ignore[assignment]
    plain: Callable = None  # type: ignore[assignment]


_RUNTIME = _Runtime()

_LITERALS = (bool, int, str, type(None))


def _codegen(steps: List[Step], uses_fn: bool) -> Tuple[str, List[Any]]:
    """Python source of ``run(ctx, x, V, f, root)``: one line per step, values in local variables,
    each deleted after its last use (so that without a graph only the live jets are in memory).

    Constants that are not literals (dtypes, tensors, functions, parameters of the steps) go to
    the list ``C``; rules are looked up in ``_RUNTIME.rules`` by kind on every call (so a test can
    replace one). Module attributes are read with getattr chains from ``f`` (targets under
    ``fn.``) or ``root``."""
    consts: List[Any] = []
    var: Dict[str, str] = {}

    def const(obj: Any) -> str:
        consts.append(obj)
        return f"C[{len(consts) - 1}]"

    def render(a: Any, plain: bool = False) -> str:
        if isinstance(a, fx.Node):
            return f"plain({var[a.name]})" if plain else var[a.name]
        if isinstance(a, tuple):
            return "(" + "".join(render(e, plain) + ", " for e in a) + ")"
        if isinstance(a, list):
            return "[" + ", ".join(render(e, plain) for e in a) + "]"
        if isinstance(a, dict) and all(isinstance(k, str) for k in a):
            return "{" + ", ".join(f"{k!r}: {render(v, plain)}" for k, v in a.items()) + "}"
        if isinstance(a, slice):
            return f"slice({render(a.start, plain)}, {render(a.stop, plain)}, {render(a.step, plain)})"
        if type(a) in _LITERALS or (type(a) is float and math.isfinite(a)):
            return repr(a)
        return const(a)

    def call_args(node: fx.Node, plain: bool = False) -> str:
        parts = [render(a, plain) for a in node.args]
        parts += [f"{k}={render(v, plain)}" for k, v in node.kwargs.items()]
        return ", ".join(parts)

    def fetch(target: str) -> str:
        atoms = target.split(".")
        if uses_fn and atoms[0] == "fn":
            expr, atoms = "f", atoms[1:]
        else:
            expr = "root"
        for a in atoms:
            expr = f"getattr({expr}, {a!r})"
        return expr

    # last use of every value: delete it right after
    last: Dict[str, int] = {}
    for i, step in enumerate(steps):
        def use(a, i=i):
            last[a.name] = i
            return a

        fx.node.map_arg((step.node.args, step.node.kwargs), use)
    dels: Dict[int, List[str]] = {}
    lines = ["def run(ctx, x, V, f, root):", "    rules = _RUNTIME.rules", "    check = _RUNTIME.check", "    plain = _RUNTIME.plain"]
    for i, step in enumerate(steps):
        node = step.node
        v = f"v{i}"
        var[node.name] = v
        kind = step.kind
        if kind == "input":
            line = f"{v} = _RUNTIME.input(ctx, x, V)"
        elif kind == "attr":
            line = f"{v} = {fetch(node.target)}"
        elif kind == "output":
            line = f"return {render(node.args[0])}"
        elif kind == "const":
            line = f"{v} = {const(step.params['fn'])}({call_args(node)})"
        elif kind == "const_module":
            line = f"{v} = {fetch(step.params['target'])}({call_args(node)})"
        elif kind in ("meta", "like"):
            line = f"{v} = {const(step.params['fn'])}({call_args(node, plain=True)})"
        else:
            args = call_args(node)
            mod = f"{fetch(step.params['target'])}, " if kind.endswith("_module") else ""
            lines.append(f"    ctx.node = {node.name!r}; ctx.kind = {kind!r}")
            line = f"{v} = check(ctx, rules[{kind!r}](ctx, {const(step.params)}, {mod}{args}))"
        lines.append("    " + line)
        for name in dels.pop(i, []):
            lines.append(f"    del {name}")
        if kind != "output":
            if node.name not in last:
                lines.append(f"    del {v}")
            else:
                dels.setdefault(last[node.name], []).append(v)
    return "\n".join(lines) + "\n", consts


# ---- the trace cache ------------------------------------------------------------------------------
#
# A program is traced once per model and reused while the model is unchanged. "Unchanged" is
# decided on every call by a signature computed from the model, cheap next to a trace (one walk
# over its modules):
#
# * the input: feature count, dtype, device, and grad mode (a forward may branch on it);
# * every module reached (the model's own tree, and modules the trace reached through closures
#   or plain lists): path, class, train/eval flag, names of its parameters and buffers and which
#   are None, its hooks, and its hyper-parameters -- every public attribute that is not a tensor
#   or module (ints, floats, strings, tuples, ...; callables by identity);
# * for a plain function: its code, defaults, the objects in its closure and the globals it names
#   directly (modules among them walked as above, anything else by identity);
# * the registered user activations (custom.py counts every (un)registration).
#
# Weights and buffers are not in it -- the program reads them on every run -- so training between
# calls never retraces. Entries are held weakly per model (a model that is garbage-collected
# takes its programs with it); at most _PER_MODEL signatures per model, least recently used first
# out. Failures (the model is not traceable to supported pieces) are cached the same way, so an
# unsupported model is not re-traced on every call either.

_PER_MODEL = 8
_CACHE_LOCK = threading.Lock()
_CACHE: "weakref.WeakKeyDictionary[Any, OrderedDict]" = weakref.WeakKeyDictionary()
_STATS = {"hits": 0, "misses": 0}


class _Failure:
    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


_PLAIN_TYPES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size, torch.memory_format, torch.layout)


def _freeze(v: Any, depth: int = 0) -> Any:
    """A hashable stand-in for an attribute value, equal for equal (or identical) values."""
    if isinstance(v, _PLAIN_TYPES) or isinstance(v, (ActivationSpec,)):
        return v
    if isinstance(v, Tensor):
        return _TENSOR
    if isinstance(v, (tuple, list)):
        if depth > 3 or len(v) > 256:
            return ("seq-id", id(v), len(v))
        return (type(v).__name__,) + tuple(_freeze(e, depth + 1) for e in v)
    if isinstance(v, dict):
        if depth > 3 or len(v) > 256:
            return ("dict-id", id(v), len(v))
        return ("dict",) + tuple((_freeze(k, depth + 1), _freeze(e, depth + 1)) for k, e in v.items())
    if isinstance(v, (set, frozenset)):
        try:
            return ("set", frozenset(v))
        except TypeError:
            return ("set-id", id(v))
    if inspect.ismethod(v):  # a bound method is a new object on every access: its parts
        return ("method", _freeze(v.__self__, depth + 1), v.__func__)
    try:
        return weakref.ref(v)  # identity (or the referent's equality) while alive
    except TypeError:
        pass
    try:
        hash(v)
        return v
    except TypeError:
        return ("id", id(v), type(v))


class _TensorMarker:
    def __repr__(self) -> str:
        return "<tensor>"


_TENSOR = _TensorMarker()

# Module.__dict__ entries that are torch's bookkeeping, read separately (or not at all)
_MODULE_INTERNALS = frozenset({"training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})


def _module_sig(m: nn.Module, out: list, path: str, seen: set) -> None:
    d = m.__dict__
    if id(m) in seen:  # a module reachable twice (shared, or a cycle): its path and identity
        out.append((path, weakref.ref(m)))
        return
    seen.add(id(m))
    hp = []
    for k, v in d.items():
        if k[0] == "_":
            if k in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs") and v:
                hp.append((k, tuple(v)))
            continue
        if k == "training":
            continue
        hp.append((k, _freeze(v)))
    out.append(
        (
            path,
            type(m),
            d.get("training"),
            tuple((k, p is None) for k, p in d["_parameters"].items()),
            tuple((k, b is None) for k, b in d["_buffers"].items()),
            tuple(hp),
        )
    )
    for k, c in d["_modules"].items():
        if c is None:
            out.append((f"{path}.{k}", None))
        else:
            _module_sig(c, out, f"{path}.{k}", seen)


def _object_sig(v: Any, out: list) -> None:
    """A closure cell's or a global's value: modules walked, everything else by identity."""
    if isinstance(v, nn.Module):
        out.append(weakref.ref(v))
        _module_sig(v, out, "", set())
    elif isinstance(v, Tensor):  # captured by the trace as a constant: by identity
        out.append(weakref.ref(v))
    else:
        out.append(_freeze(v))


def _registry_generation() -> int:
    from . import custom

    return getattr(custom, "_GENERATION", 0)


def cache_key(f: Any) -> Tuple[Any, Any]:
    """(the object the cache holds the entry under, extra identity) for f; (None, None) when f
    cannot be cached (not weakly referenceable)."""
    if inspect.ismethod(f):
        owner = f.__self__
        if isinstance(owner, nn.Module) and f.__func__ is type(owner).forward:
            return owner, None
        return owner, f.__func__
    return f, None


def signature(f: Any, x: Tensor) -> tuple:
    """The cache signature of (f, x): see the comment above."""
    out: list = [x.shape[-1], x.dtype, x.device, torch.is_grad_enabled(), _registry_generation()]
    target = f
    if inspect.ismethod(f):
        target = f.__self__
        out.append(weakref.ref(f.__func__) if not isinstance(f.__func__, types.BuiltinFunctionType) else f.__func__)
    if isinstance(target, nn.Module):
        _module_sig(target, out, "", set())
    elif isinstance(target, types.FunctionType):
        code = target.__code__
        out.append(code)
        out.append(_freeze(target.__defaults__))
        out.append(_freeze(target.__kwdefaults__))
        for cell in target.__closure__ or ():
            try:
                v = cell.cell_contents
            except ValueError:  # an empty cell
                out.append(None)
                continue
            _object_sig(v, out)
        g = target.__globals__
        for name in code.co_names:
            if name in g:
                v = g[name]
                if isinstance(v, (types.ModuleType, type)):
                    out.append(v)
                else:
                    _object_sig(v, out)
    else:
        out.append(type(target))
        for k, v in getattr(target, "__dict__", {}).items():
            if isinstance(v, nn.Module):
                out.append(k)
                _object_sig(v, out)
            else:
                out.append((k, _freeze(v)))
    return tuple(out)


def _extras_sig(program: Program) -> tuple:
    """Signature of what the trace registered on its own root (modules reached through closures
    or plain lists): walked on every call like the model itself."""
    out: list = []
    for k, m in program.root._modules.items():
        if m is not None:
            _module_sig(m, out, k, set())
    return tuple(out)


def get_program(f: Callable, x: Tensor) -> Program:
    """The program of f for inputs like x: from the cache when f is unchanged (see above), else
    traced and cached. Raises :class:`Unsupported` (cached as well) when f is not traceable to
    supported pieces."""
    owner, _ = cache_key(f)
    if torch.compiler.is_compiling():
        return _compiling_lookup(owner, f, x)
    return _get_program_eager(owner, f, x)


def _get_program_eager(owner: Any, f: Callable, x: Tensor) -> Program:
    try:
        sig = signature(f, x)
        hash(sig)
    except Exception:  # noqa: BLE001 - an attribute we cannot fingerprint: no caching for f
        return build_program(f)
    with _CACHE_LOCK:
        try:
            entries = _CACHE.get(owner)
        except TypeError:  # not weakly referenceable: not cached
            entries = None
            owner = None
        hit = entries.get(sig) if entries is not None else None
        if hit is not None:
            entries.move_to_end(sig)
    if hit is not None:
        prog, extras = hit
        if isinstance(prog, _Failure):
            _STATS["hits"] += 1
            raise Unsupported(prog.reason)
        if not extras or _extras_sig(prog) == extras:
            _STATS["hits"] += 1
            return prog
    _STATS["misses"] += 1
    try:
        prog = build_program(f)
    except Unsupported as e:
        _store(owner, sig, (_Failure(str(e)), None))
        raise
    _store(owner, sig, (prog, _extras_sig(prog)))
    return prog


class _InputSpec:
    """What the signature reads of x: its feature count, dtype and device."""

    __slots__ = ("shape", "dtype", "device")

    def __init__(self, d: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = (0, d), dtype, device


class _Slots:
    """Programs by token, as attributes: what compiled code reads (see _compiling_lookup)."""


_SLOTS = _Slots()
_TOKENS = itertools.count()


def _slot_of(owner: Any, prog: Program) -> str:
    name = getattr(prog, "slot", None)
    if name is None:
        name = f"p{next(_TOKENS)}"
        prog.slot = name
        setattr(_SLOTS, name, prog)
        try:  # dropped with the model
            weakref.finalize(owner, _SLOTS.__dict__.pop, name, None)
        except TypeError:
            pass
    return name


def _compiling_lookup(owner: Any, f: Callable, x: Tensor) -> Program:
    """get_program while torch.compile traces the caller.

    The signature is computed in the traced code only so that dynamo guards on everything it
    reads (a changed model fails a guard and recompiles). The lookup itself runs in
    :func:`_slot_as_constant`, which dynamo calls once, eagerly, at trace time, and whose result
    (the name of the program's slot) it bakes into the compiled code as a constant; the compiled
    code then reads the program from that slot. (Dynamo cannot enter the cache's lock, and guards
    on the cache's containers would follow every unrelated model's insertion and removal.)"""
    signature(f, x)
    name, reason = _slot_as_constant(f, x.shape[-1], x.dtype, x.device, torch.is_grad_enabled())
    if name is None:
        raise Unsupported(reason)
    return getattr(_SLOTS, name)


def _slot_as_constant(f: Callable, d: int, dtype: torch.dtype, device: torch.device, grad: bool) -> Tuple[Optional[str], str]:
    owner = cache_key(f)[0]
    with torch.set_grad_enabled(grad):
        try:
            prog = _get_program_eager(owner, f, _InputSpec(d, dtype, device))
        except Unsupported as e:
            return None, str(e)
    return _slot_of(owner, prog), ""


if hasattr(torch, "compiler") and hasattr(torch.compiler, "assume_constant_result"):
    _slot_as_constant = torch.compiler.assume_constant_result(_slot_as_constant)


def remember_failure(f: Callable, x: Tensor, reason: str) -> None:
    """Cache that f's program cannot run on inputs like x (a rule refused a step at run time),
    so that the next call goes to the fallback without running the jets first."""
    owner, _ = cache_key(f)
    try:
        sig = signature(f, x)
        hash(sig)
    except Exception:  # noqa: BLE001
        return
    _store(owner, sig, (_Failure(reason), None))


def _store(owner: Any, sig: tuple, value: tuple) -> None:
    if owner is None:
        return
    with _CACHE_LOCK:
        try:
            entries = _CACHE.get(owner)
            if entries is None:
                entries = OrderedDict()
                _CACHE[owner] = entries
        except TypeError:
            return
        entries[sig] = value
        entries.move_to_end(sig)
        while len(entries) > _PER_MODEL:
            entries.popitem(last=False)


def clear_cache(f: Optional[Callable] = None) -> None:
    """Forget the traced programs of f (an ``nn.Module`` or function), or of every model."""
    with _CACHE_LOCK:
        if f is None:
            _CACHE.clear()
            return
        owner, _ = cache_key(f)
        try:
            _CACHE.pop(owner, None)
        except TypeError:
            pass


def cache_info() -> Dict[str, int]:
    """{"models": models with cached programs, "programs": cached signatures (failures
    included), "hits": ..., "misses": ...} since the process started (or the last clear)."""
    with _CACHE_LOCK:
        n = sum(len(v) for v in _CACHE.values())
        return {"models": len(_CACHE), "programs": n, "hits": _STATS["hits"], "misses": _STATS["misses"]}
