"""From a traced graph to a runnable program: :func:`build_program` (trace, classify, generate) and
the code generator, which writes the straight-line Python ``run(ctx, x, V, f, root)`` -- one rule
call per step, each value deleted after its last use -- against ``_RUNTIME``, the rules and input
jet that taylor.py fills in (so that tracing never imports the jets).

Sits above _graph_trace and _graph_classify; _graph_cache calls :func:`build_program`.
"""

from __future__ import annotations

import itertools
import linecache
import math
import types
import weakref
from typing import Any, Callable, Dict, List, Tuple

import torch.fx as fx

from ._graph_classify import classify_all
from ._graph_fuse import fuse_gates
from ._graph_program import Program, Step
from ._graph_trace import _Root, _trace


def build_program(f: Callable) -> Program:
    """Trace ``f`` and classify its nodes; raise :class:`Unsupported` (with the offending node)
    when some input-dependent node has no jet rule. Not cached (see :func:`get_program`)."""
    graph, root = _trace(f)
    try:
        graph.eliminate_dead_code()
    except Exception:  # noqa: BLE001 - only an optimisation
        pass
    fuse_gates(graph)  # (1 - z) * P + z * Q as one step (_graph_fuse.py)
    steps, acts = classify_all(graph, root)
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
