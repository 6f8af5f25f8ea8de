"""The trace cache: a program per model (and per structural signature of it, computed on every
call), held weakly, failures included; under torch.compile the lookup runs as a constant-result
function and the program is read from a named slot.

The top of the tracing modules: it calls _graph_codegen's ``build_program``; graph.py re-exports
its functions.
"""

from __future__ import annotations

import inspect
import itertools
import threading
import types
import weakref
from collections import OrderedDict
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from . import custom
from ._graph_codegen import build_program
from ._graph_program import Program, Unsupported
from .activations import ActivationSpec

Tensor = torch.Tensor


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
    return custom._GENERATION


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
