"""Tracing f with torch.fx, one trace at a time in the process: the tracer (table activations,
``nn.Linear`` and every other ``torch.nn`` module as leaves; modules and parameters reached
through closures registered on a wrapper root), and :func:`traced_callable`.

Sits above _graph_classify (which modules are leaves); _graph_codegen's ``build_program`` calls it.
"""

from __future__ import annotations

import inspect
import threading
import types
from typing import Any, Callable, Tuple

import torch
import torch.fx as fx
from torch import nn

from . import activations
from ._graph_classify import _is_linear
from ._graph_program import Unsupported
from .activations import spec_from_module

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
