"""Taylor jets along K directions, propagated over a traced program (torchhessdiag/graph.py).

For K directions v_1..v_K (the coordinate axes of ``dims``) every input-dependent value h of the
program carries a jet: its value h0 and the derivative coefficients

    h_k = d^k/dt^k h(x + t v) at t = 0,       k = 1..n   (n <= 4; derivative form, not k!-scaled)

stored as a :class:`Jet`. Layouts (S = the value's feature shape, value = (N, *S)):

* ``point``  (N, K, *S): the general case;
* ``shared`` (K, *S), first order only: the same for every point. Until the first nonlinearity
  the first-order coefficients do not depend on the point (x -> x W^T + b -> ... keeps h1 = V^T
  W^T ...), so they are carried once, as the MLP engine does for its first layer;
* ``None``: identically zero (h2, h3, h4 before the first nonlinearity; everything of order >= 2
  through piecewise-linear activations) -- never materialised;
* collapsed top order: the highest coefficient h_n is replaced by the weighted sum
  s = sum_k w_k h_n[k], (N, *S) (w = 1 for a Laplacian, n = 2: K + 2 rows per point -- value, s
  and K first-order rows -- instead of 2K + 1; a biharmonic or a linear operator of order 4 in
  torchhessdiag/operators.py: 3K + 2 instead of 4K + 1). This is exact because h_n enters every
  rule linearly and no lower coefficient depends on it (collapsed Taylor mode).

One rule per op kind, kept in the table :data:`RULES` (as in jax's experimental/jet.py and
microsoft/folx): linear maps act on every coefficient (the bias only on the value); sums are
componentwise; a product uses Leibniz's rule y_n = sum_j C(n, j) a_j b_{n-j} (collapsed:
s_y = a0 s_b + b0 s_a + 2 sum_k a1_k b1_k); an activation uses Faa di Bruno's formula with
sigma^(j)(h0) from the derivative table (:func:`activation_jet`, the one place the combination is
written, so that it can be backed by a fused kernel later).

Everything is built from differentiable torch ops and the table ops, so the results carry a graph
to the parameters (and to x) when grad mode is on. A rule that meets something it cannot represent
(a broadcast that would mix the batch dimension into the features, a product with a tensor that
is itself input-dependent where only constants are allowed, ...) raises
:class:`~torchhessdiag.graph.Unsupported`, and the caller falls back to exact autograd.

This module holds :data:`RULES` and runs a program with them (:func:`propagate`, in chunks of
points: :func:`propagate_chunked`). Below it, bottom to top: ``_jet`` (:class:`Jet`,
:class:`Context`, the layout helpers), the rules by family -- ``_rules_activation`` (Faa di Bruno),
``_rules_algebra`` (linear maps, sums, products, powers), ``_rules_shape`` (indexing, joins,
reductions, reshapes) -- and ``taylor_nn`` (norms, softmax, attention, composed from those).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch

from . import _rules_algebra as _algebra, _rules_shape as _shape, taylor_nn as _nn
from ._graph_codegen import _RUNTIME
from ._graph_program import Program, ShapeError, Unsupported
from ._jet import Context, Jet, _AxisInput, _check
from ._rules_activation import _rule_activation, activation_jet
from .ops import MAX_ORDER

Tensor = torch.Tensor

__all__ = ["Jet", "Context", "activation_jet", "propagate", "RULES", "MAX_ORDER"]

#: op kind (graph.py's classification) -> rule(ctx, params, [module,] *args, **kwargs)
RULES: Dict[str, Callable[..., Any]] = {
    "activation": _rule_activation,
    "linear": _algebra._rule_linear,
    "linear_module": _algebra._rule_linear_module,
    "matmul": _nn._rule_matmul,  # _rules_algebra's (jet @ constant), and products of per-point matrices
    "identity": _algebra._rule_identity,
    "neg": _algebra._rule_neg,
    "add": _algebra._rule_add,
    "sub": _algebra._rule_sub,
    "mul": _algebra._rule_mul,
    "gate": _algebra._rule_gate,
    "div": _nn._rule_div,  # _rules_algebra's (by a constant), and by an input-dependent value
    "pow": _nn._rule_pow,  # _rules_algebra's (integer exponents >= 0), and real exponents
    "square": _algebra._rule_square,
    "getitem": _shape._rule_getitem,
    "cat": _shape._rule_cat,
    "stack": _shape._rule_stack,
    "sum": _shape._rule_sum,
    "mean": _shape._rule_mean,
    "reshape": _shape._rule_reshape,
    "flatten": _shape._rule_flatten,
    "unsqueeze": _shape._rule_unsqueeze,
    "squeeze": _shape._rule_squeeze,
    # taylor_nn.py
    "sqrt": _nn._rule_sqrt,
    "rsqrt": _nn._rule_rsqrt,
    "reciprocal": _nn._rule_reciprocal,
    "transpose": _nn._rule_transpose,
    "permute": _nn._rule_permute,
    "mT": _nn._rule_mT,
    "softmax": _nn._rule_softmax,
    "log_softmax": _nn._rule_log_softmax,
    "softmax_module": _nn._rule_softmax_module,
    "log_softmax_module": _nn._rule_log_softmax_module,
    "layer_norm": _nn._rule_layer_norm,
    "layer_norm_module": _nn._rule_layer_norm_module,
    "rms_norm": _nn._rule_rms_norm,
    "rms_norm_module": _nn._rule_rms_norm_module,
    "sdpa": _nn._rule_sdpa,
    "mha_module": _nn._rule_mha_module,
}


# ---- running a program ---------------------------------------------------------------------------


def _plain(a: Any) -> Any:
    """A Jet used where only its value matters (shape queries, *_like constructors)."""
    return a.value if isinstance(a, Jet) else a


def _input_jet(ctx: Context, x: Tensor, V: Optional[Tensor]) -> Jet:
    if V is None:
        return _AxisInput(ctx, x)
    rows = V.t().to(dtype=x.dtype, device=x.device)
    ctx.input_rows = rows
    return Jet(x, [rows] + [None] * (ctx.order - 1))


def _check_if_jet(ctx: Context, res: Any) -> Any:
    return _check(ctx, res) if isinstance(res, Jet) else res


_RUNTIME.rules = RULES
_RUNTIME.input = _input_jet
_RUNTIME.check = _check_if_jet
_RUNTIME.plain = _plain

#: errors that are the caller's or the machine's, never "this model is not supported"
_PASS_THROUGH = (ShapeError, NotImplementedError, MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))


def propagate(
    program: Program, x: Tensor, V: Tensor, order: int, collapsed: bool = False, f: Any = None,
    weights: Optional[Tensor] = None, axes: Optional[Tensor] = None,
):
    """Run ``program`` on x (N, d) with jets along the K columns of V (d, K), orders 1..order;
    ``collapsed``: the top order as the sum over directions, weighted by ``weights`` (K,) if given;
    ``axes``: when the directions are the coordinate axes e_(axes[k]) (a LongTensor (K,); then V
    may be None and is made only if a rule other than a linear layer reads the input's rows), so
    that a linear layer on the input gathers weight columns (cost K x out, not K x d x out).

    ``f`` is the model (or function) the program was traced from: its weights and submodules are
    read from it on every run (default: the one it was traced from, if it is still alive).

    Returns ``(out, ctx)``: ``out`` is the output :class:`Jet` (or a plain tensor when the output
    does not depend on x), ``ctx.piecewise_linear_seen`` tells whether a piecewise-linear
    activation was met. Raises :class:`~torchhessdiag.graph.Unsupported` when some step cannot be
    represented, :class:`ShapeError` (a ValueError) when x does not fit the model.
    """
    if not 1 <= order <= MAX_ORDER:
        raise ValueError(f"propagate: order must be 1..{MAX_ORDER}, got {order}")
    if V is None and axes is None:
        raise ValueError("propagate: give the directions V or the axes")
    ctx = Context(x.shape[0], V.shape[1] if V is not None else axes.shape[0], order, collapsed, weights)
    if axes is not None:
        ctx.axes = axes.to(device=x.device)
    if f is None and program.fn_ref is not None:
        f = program.fn_ref()
    try:
        out = program.run(ctx, x, V, f, program.root)
    except (Unsupported, *_PASS_THROUGH):
        raise
    except Exception as e:  # noqa: BLE001 - a form of the op the rule does not handle
        # (a genuine error of f itself is raised again, unchanged, by the autograd fallback)
        raise Unsupported(f"node '{ctx.node}' ({ctx.kind}): {type(e).__name__}: {str(e)[:200]}") from None
    if isinstance(out, (tuple, list, dict)):
        raise Unsupported("f returns a tuple/list/dict; it must return one tensor")
    return out, ctx


# Points per chunk: about this many elements of the largest jet row block, so that the working set
# of an elementwise step stays in cache on the CPU (measured on this project's 2-core CPU: a
# FourierResNet of width 128, K=16, N=1024 ran ~1.6-2.4x faster in chunks of 256 points than in
# one block); on a GPU large blocks are what keeps the device busy.
_CHUNK_ELEMENTS = 1 << 19
_CHUNK_ELEMENTS_GPU = 1 << 27
_FIRST_CHUNK = 128


def _cat_outputs_ctx(parts: List[Any], ctx: Context) -> Any:
    """The outputs of several chunks as one (shared first-order rows are the same in each)."""
    first = parts[0]
    if not isinstance(first, Jet):
        return torch.cat(parts) if isinstance(first, Tensor) and first.dim() >= 1 else first
    coefs = []
    for k, c0 in enumerate(first.coefs, start=1):
        if c0 is None:
            coefs.append(None)
        elif not ctx.is_sum(k) and c0.dim() == first.value.dim():
            coefs.append(c0)  # shared (K, *S)
        else:
            coefs.append(torch.cat([p.coefs[k - 1] for p in parts]))
    return Jet(torch.cat([p.value for p in parts]), coefs)


def _graph_wanted(x: Tensor, f: Any) -> bool:
    """Will the result carry an autograd graph? (grad mode on, and x or a parameter of f needs
    grad; for a plain function, whose parameters are not known, assumed so)."""
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad:
        return True
    if isinstance(f, torch.nn.Module):
        return any(p.requires_grad for p in f.parameters())
    return True


def chunk_points(x: Tensor, ctx: Context, first: int) -> int:
    """Points per chunk after a first chunk of ``first`` points measured the jet sizes (ctx).

    CPU: about ``_CHUNK_ELEMENTS`` elements per coefficient tensor, so that an elementwise step
    stays in cache. CUDA: as many points as fit in half the free device memory
    (``torch.cuda.mem_get_info``), counting every jet the program creates as if all were alive at
    once (values are freed after their last use, so fewer are), capped at
    ``_CHUNK_ELEMENTS_GPU`` elements per coefficient tensor."""
    N = x.shape[0]
    rows = max(1, ctx.max_row)
    if x.device.type != "cuda":
        return max(_FIRST_CHUNK, _CHUNK_ELEMENTS // rows)
    chunk = max(_FIRST_CHUNK, _CHUNK_ELEMENTS_GPU // rows)
    try:
        free, _ = torch.cuda.mem_get_info(x.device)
    except Exception:  # noqa: BLE001 - no information: the element cap alone
        return chunk
    per_point = max(1, ctx.total_row) * x.element_size()
    fit = int(0.5 * free // per_point)
    return max(min(first, N), min(chunk, fit))


def propagate_chunked(
    program: Program, x: Tensor, V: Tensor, order: int, collapsed: bool = False, f: Any = None,
    weights: Optional[Tensor] = None, axes: Optional[Tensor] = None,
):
    """:func:`propagate` over chunks of points (rows are independent), concatenated.

    With an autograd graph to keep (training) all points go in one block: the graph is kept
    whole either way, and one block has the least overhead. Without one, a first chunk of
    ``_FIRST_CHUNK`` points tells the jet sizes, and the rest go in chunks of
    :func:`chunk_points` (bounded memory; on CUDA sized from the free device memory)."""
    N = x.shape[0]
    if _graph_wanted(x, f):
        return propagate(program, x, V, order, collapsed, f, weights, axes)
    first = min(N, _FIRST_CHUNK)
    out, ctx = propagate(program, x[:first], V, order, collapsed, f, weights, axes)
    if first == N:
        return out, ctx
    parts = [out]
    chunk = chunk_points(x, ctx, first)
    for i in range(first, N, chunk):
        part, c = propagate(program, x[i : i + chunk], V, order, collapsed, f, weights, axes)
        ctx.piecewise_linear_seen |= c.piecewise_linear_seen
        parts.append(part)
    ctx.N = N
    return _cat_outputs_ctx(parts, ctx), ctx
