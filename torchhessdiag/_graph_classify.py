"""What the traced nodes mean: the tables from torch functions, Tensor methods and torch.nn
modules to op kinds (the rules of taylor.RULES, or constants), the table activations as
functions (:func:`function_spec`), and :func:`classify_all`, which turns a traced graph into
:class:`~torchhessdiag._graph_program.Step` s or refuses it with
:class:`~torchhessdiag._graph_program.Unsupported` naming the node.

The activations' functions, methods and modules come from the registry (torchhessdiag/_registry.py).

Sits above _graph_program and activations; _graph_trace and _graph_codegen use it.
"""

from __future__ import annotations

import builtins
import operator
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import _graph_fuse, _registry, activations
from ._graph_program import Step, Unsupported
from .activations import ActivationSpec, make_spec, spec_from_module

# ---- what the nodes mean --------------------------------------------------------------------

#: call_function targets -> op kind (a rule of taylor.RULES, or "meta"/"like" = constant results)
_FUNCTION_KINDS: Dict[Any, str] = {
    operator.add: "add",
    torch.add: "add",
    operator.sub: "sub",
    torch.sub: "sub",
    torch.subtract: "sub",
    operator.mul: "mul",
    _graph_fuse.gate: "gate",
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
    F.rms_norm: "rms_norm",  # F.rms_norm, torch.rms_norm and nn.RMSNorm: torch >= 2.4 (setup.py)
    torch.rms_norm: "rms_norm",
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

# Table activations as functions: target -> (table name, names of the arguments after the input),
# and as Tensor methods: name -> table name. Both derived from the registry (its ``functions`` and
# ``methods``); their derivatives come from the table (_op_autograd._derivs).
_ACT_FUNCTIONS: Dict[Any, Tuple[str, Tuple[str, ...]]] = _registry.FUNCTIONS
_ACT_METHODS: Dict[str, str] = _registry.METHODS


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
    select = _registry.TABLE[name].select
    if select is not None:  # F.gelu(x, approximate=...): the argument picks the table entry
        value = params.pop(select.arg, select.default)
        chosen = select.name_for(value)
        if chosen is None:
            raise Unsupported(f"{name} with {select.arg}={value!r}")
        name = chosen
    # arguments that are not parameters of the entry (inplace) are ignored
    takes = _registry.TABLE[name].param_names
    params = {k: v for k, v in params.items() if k in takes}
    for k, v in params.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise Unsupported(f"{name} with a non-constant argument {k}={v!r}")
    return make_spec(name, **params)


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


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
    nn.RMSNorm: "rms_norm_module",
}


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


def classify_all(graph: fx.Graph, root: nn.Module) -> Tuple[List[Step], List[ActivationSpec]]:
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
