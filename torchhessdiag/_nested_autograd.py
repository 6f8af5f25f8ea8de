"""The exact slow path: derivatives by nested ``torch.autograd.grad`` (reverse over reverse), with
``torch.func``'s nested ``jvp`` where reverse mode cannot run f or cannot settle an entry --
along coordinate axes (``_autograd_derivatives``, for general.py's functions) and per
multi-index (``_nested_partials``, for operators.py's), and the detection of custom
autograd.Functions whose backward cannot be differentiated again.

Import direction: above ``_path_common``; below ``_dispatch``, ``operators`` and ``general``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ._path_common import _check_output, _stacklevel, logger

Tensor = torch.Tensor


# ---- custom autograd.Functions --------------------------------------------------------------------


#: the code object of torch's @once_differentiable wrapper (the same for every decorated backward)
_ONCE_CODE = torch.autograd.function.once_differentiable(lambda ctx, *g: g).__code__


def _is_once_differentiable(node: Any) -> bool:
    backward = getattr(getattr(node, "_forward_cls", None), "backward", None)
    return getattr(backward, "__code__", None) is _ONCE_CODE


def _custom_functions(f: Callable, x: Tensor, once_only: bool = False) -> List[str]:
    """Names of the custom torch.autograd.Functions in f's autograd graph at x (walked from the
    output); ``once_only``: only those whose backward is ``@once_differentiable``. torch.func's
    nested forward mode silently returns zeros through custom Functions (pytorch/pytorch#197867),
    so it must not be used to settle their derivatives; a once-differentiable backward can make
    nested reverse mode silently incomplete as well (its part of a higher derivative is dropped
    while other paths keep the graph alive)."""
    with torch.enable_grad():
        y = f(x.detach().requires_grad_(True))
    found, seen = set(), set()
    stack = [y.grad_fn] if isinstance(y, Tensor) and y.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, torch.autograd.function.BackwardCFunction) and (not once_only or _is_once_differentiable(node)):
            found.add(type(node).__name__.replace("Backward", ""))
        stack.extend(n for n, _ in node.next_functions)
    return sorted(found)


def _once_differentiable_error(where: str, customs: List[str], cause: str) -> NotImplementedError:
    return NotImplementedError(
        f"{where}: f uses the custom torch.autograd.Function(s) {', '.join(customs)}, and {cause}: its backward "
        "cannot be differentiated again (e.g. @once_differentiable, or a backward that detaches), so derivatives "
        "of order >= 2 through it are unknown (torch.func's forward mode gives zeros through custom Functions, "
        "pytorch/pytorch#197867). Write the backward with differentiable torch ops, or register the activation "
        "with its derivatives (torchhessdiag.register_activation); pass allow_unconfirmed_zeros=True to take "
        "those derivatives as 0 (with a warning)"
    )


# ---- along coordinate axes ------------------------------------------------------------------------


def _jvp_up(fn: Callable, v: Tensor) -> Callable:
    """x -> fn(x) + (the directional derivative along v of fn(x)'s last entry,)."""

    def up(xx):
        p, t = torch.func.jvp(fn, (xx,), (v,))
        return tuple(p) + (t[-1],)

    return up


def _func_derivatives(f: Callable, x: Tensor, V: Tensor, order: int) -> Tuple[List[Tensor], str]:
    """[D^k f along each column of V, (N, K, *S)] for k = 1..order by nested torch.func.jvp."""
    N, d = x.shape

    def along(v: Tensor):
        vv = v.expand(N, d)
        fn: Callable = lambda xx: (f(xx),)  # noqa: E731
        for _ in range(order):
            fn = _jvp_up(fn, vv)
        return fn(x)[1:]

    rows = V.t()  # (K, d)
    try:
        outs = torch.func.vmap(along)(rows)
        return [o.movedim(0, 1) for o in outs], "torch.func: nested jvp along each axis, vmap over the axes"
    except Exception as e:  # noqa: BLE001 - e.g. an op without a batching rule
        logger.debug("torchhessdiag: vmap over the axes failed (%s: %s); one axis at a time", type(e).__name__, e)
    per_axis = [along(rows[k]) for k in range(rows.shape[0])]
    return [torch.stack([p[j] for p in per_axis], 1) for j in range(order)], "torch.func: nested jvp, one axis at a time"


def _grad_derivatives(f: Callable, x: Tensor, V: Tensor, order: int, keep: bool) -> Tuple[List[Tensor], List[Tuple[int, int, int]]]:
    """The same by nested torch.autograd.grad (rows independent: the gradient of the sum over
    rows is the per-row gradient).

    Returns the derivatives and the entries (order index, axis index, output component) that
    reverse mode could not settle: from order 2 on, a derivative whose graph ends (the previous
    level does not require grad, or x is unreachable from it) is exactly 0 if f really is
    polynomial of lower degree there -- or unknown, if a backward was not recorded (a
    ``once_differentiable`` backward, a custom op without double backward). Those are left 0 here
    and listed; the caller settles them another way."""
    dims = [int(i) for i in V.argmax(0).tolist()]
    unknown: List[Tuple[int, int, int]] = []
    with torch.enable_grad():
        xx = x if x.requires_grad else x.detach().requires_grad_(True)
        y = f(xx)
        N = y.shape[0]
        S = tuple(y.shape[1:])
        yf = y.reshape(N, -1)
        M = yf.shape[1]
        zero = yf.new_zeros(N)
        res = [[[zero] * M for _ in dims] for _ in range(order)]
        for i in range(M):
            yi = yf[:, i]
            if not yi.requires_grad:
                continue  # the forward graph does not reach x: every derivative is 0
            (g,) = torch.autograd.grad(yi.sum(), xx, create_graph=order > 1 or keep, retain_graph=True, allow_unused=True)
            if g is None:
                continue
            for kk, k in enumerate(dims):
                cur = g[:, k]
                res[0][kk][i] = cur
                for o in range(1, order):
                    gg = None
                    if cur.requires_grad:
                        (gg,) = torch.autograd.grad(
                            cur.sum(), xx, create_graph=o < order - 1 or keep, retain_graph=True, allow_unused=True
                        )
                    if gg is None:
                        unknown.extend((oo, kk, i) for oo in range(o, order))
                        break
                    cur = gg[:, k]
                    res[o][kk][i] = cur
    out = [torch.stack([torch.stack(res[o][kk], 1) for kk in range(len(dims))], 1).reshape((N, len(dims)) + S) for o in range(order)]
    return (out if keep else [t.detach() for t in out]), unknown


def _autograd_derivatives(
    f: Callable, x: Tensor, V: Tensor, order: int, allow_zeros: bool = False, where: str = "torchhessdiag"
) -> Tuple[List[Tensor], str]:
    """The exact slow path: nested torch.autograd.grad (reverse over reverse), and torch.func's
    nested jvp where reverse mode cannot run f or cannot settle an entry.

    Reverse over reverse comes first because it is the best-checked path of torch's derivative
    rules: forward-over-forward is silently wrong for some ops (e.g. F.layer_norm's second-order
    JVP in torch 2.13, pytorch/pytorch#196700, umbrella #198017), silently zero through custom
    autograd.Functions (#197867), and missing for others (silu_backward has no forward-AD
    formula, so nested jvp of F.silu stops at order 2). The ops known to be wrong are replaced by
    exact stand-ins while f runs (torchhessdiag/fallback_ops.py; the caller activates it).

    Where a custom autograd.Function's backward cannot be differentiated again, the derivatives
    through it are unknown: NotImplementedError naming it, or (``allow_zeros``) 0 with a warning."""
    keep = torch.is_grad_enabled()

    def reverse():
        try:
            return _grad_derivatives(f, x, V, order, keep)
        except Exception as e:  # noqa: BLE001
            logger.debug("torchhessdiag: nested torch.autograd.grad failed (%s: %s); torch.func nested jvp", type(e).__name__, e)
            raise

    def settle(derivs, unknown):
        fwd, _ = _func_derivatives(f, x, V, order)
        N = x.shape[0]
        fixed = []
        for o, (d_rev, d_fwd) in enumerate(zip(derivs, fwd)):
            K = d_rev.shape[1]
            flat_rev = d_rev.reshape(N, K, -1)
            flat_fwd = d_fwd.reshape(N, K, -1).to(flat_rev.dtype)
            idx = [(kk, i) for oo, kk, i in unknown if oo == o]
            if idx:
                mask = torch.zeros(K, flat_rev.shape[2], dtype=torch.bool, device=flat_rev.device)
                for kk, i in idx:
                    mask[kk, i] = True
                flat_rev = torch.where(mask, flat_fwd, flat_rev)
            fixed.append(flat_rev.reshape(d_rev.shape))
        return fixed

    return _reverse_then_forward(
        f, x, order, allow_zeros, where, reverse, lambda: _func_derivatives(f, x, V, order), settle,
        "torch.autograd.grad: nested backward passes",
    )


def _reverse_then_forward(
    f: Callable, x: Tensor, order: int, allow_zeros: bool, where: str, reverse: Callable, forward: Callable,
    settle: Callable, method: str,
) -> Tuple[List[Tensor], str]:
    """The order of methods of both exact paths (see _autograd_derivatives for why).

    ``reverse()`` -> (results, the entries reverse mode could not settle) by nested
    torch.autograd.grad; ``forward()`` -> (results, method) by torch.func's nested jvp, where
    reverse mode cannot run f; ``settle(results, entries)`` -> the results with those entries from
    torch.func. ``order``: the highest order asked for; ``method``: what reverse mode reports."""
    if order >= 2:
        once = _custom_functions(f, x, once_only=True)
        if once and not allow_zeros:
            raise _once_differentiable_error(where, once, "its backward is @once_differentiable")
        if once:
            warnings.warn(
                f"torchhessdiag: derivatives of order >= 2 through {', '.join(once)} (@once_differentiable) are taken "
                "as 0 (allow_unconfirmed_zeros=True)",
                UserWarning,
                stacklevel=_stacklevel(),
            )
    try:
        res, unknown = reverse()
    except Exception as e:  # noqa: BLE001 - e.g. a backward that cannot be differentiated again
        customs = _custom_functions(f, x)
        if customs == ["CompiledFunction"]:  # torch.compile's AOTAutograd graph: torch's error says it all
            raise
        if customs:
            # torch.func would give zeros through them: nothing can compute these derivatives
            raise _once_differentiable_error(where, customs, f"differentiating f again failed ({type(e).__name__}: {str(e)[:160]})") from e
        try:
            return forward()
        except Exception:  # noqa: BLE001 - neither can: report the reverse-mode error, the usual one
            raise e from None
    if not unknown:
        return res, method
    # entries where the backward graph ended: 0 if f is of lower degree there, unknown if a
    # backward was not recorded -- settle them with forward mode, which does not use backwards,
    # unless f holds custom autograd.Functions, where torch.func's nested forward mode is zero
    customs = _custom_functions(f, x)
    why = None
    if customs:
        if not allow_zeros:
            raise _once_differentiable_error(where, customs, "some derivatives of order >= 2 through it had no backward graph")
        why = f"f uses custom autograd.Functions ({', '.join(customs)}), through which torch.func's nested forward mode is unreliable"
    else:
        try:
            res = settle(res, unknown)
        except Exception as e:  # noqa: BLE001
            why = f"torch.func could not run f ({type(e).__name__}: {str(e)[:200]})"
    if why is not None:
        warnings.warn(
            "torchhessdiag: some derivatives of order >= 2 came out of nested torch.autograd.grad "
            "with no graph to differentiate: f is of lower degree there, or a backward in f was "
            "not recorded (e.g. @once_differentiable). They are returned as 0, unconfirmed: "
            f"{why}.",
            UserWarning,
            stacklevel=_stacklevel(),
        )
        return res, method + " (entries with no backward graph taken as 0, unconfirmed)"
    return res, method + " (entries with no backward graph from torch.func nested jvp)"


# ---- per multi-index ---------------------------------------------------------------------------


def _func_partial(f: Callable, x: Tensor, seq: Sequence[int]) -> Tensor:
    """d^alpha f (N, *S) by nested torch.func.jvp along the axes of ``seq`` (alpha's sorted axis list)."""
    N, d = x.shape
    fn: Callable = f
    for ax in seq:
        v = torch.zeros(N, d, dtype=x.dtype, device=x.device)
        v[:, ax] = 1.0
        fn = (lambda g, vv: (lambda xx: torch.func.jvp(g, (xx,), (vv,))[1]))(fn, v)
    return fn(x)


def _nested_partials(f: Callable, x: Tensor, seqs: List[Tuple[int, ...]], allow_zeros: bool, where: str) -> Tuple[List[Tensor], str]:
    """[d^alpha f (N, *S) for each sorted axis sequence], exact: nested reverse mode over a trie
    of the sequences (a node's gradient gives all its children at once), torch.func nested jvp
    where reverse mode cannot run f or cannot settle an entry (see _autograd_derivatives
    for why in this order)."""
    keep = torch.is_grad_enabled()

    def reverse():
        res, unknown, _ = _grad_partials(f, x, seqs, keep)
        return res, unknown

    def forward():
        return [_func_partial(f, x, s) for s in seqs], "torch.func: nested jvp along the axes of each multi-index"

    def settle(res, unknown):
        for a in sorted({a for a, _ in unknown}):
            fwd = _func_partial(f, x, seqs[a]).reshape(x.shape[0], -1).to(res[a].dtype)
            cols = [i for aa, i in unknown if aa == a]
            flat = res[a].reshape(x.shape[0], -1)
            mask = torch.zeros(flat.shape[1], dtype=torch.bool, device=flat.device)
            mask[cols] = True
            res[a] = torch.where(mask, fwd, flat).reshape(res[a].shape)
        return res

    top = max((len(s) for s in seqs), default=0)
    return _reverse_then_forward(
        f, x, top, allow_zeros, where, reverse, forward, settle, "torch.autograd.grad: nested backward passes, shared prefixes once"
    )


def _grad_partials(f: Callable, x: Tensor, seqs: List[Tuple[int, ...]], keep: bool):
    """Nested reverse mode over the trie of the axis sequences, per output component. Returns the
    partials, the entries (sequence index, component) that reverse mode could not settle (the
    graph ended below a derivative of order >= 1: zero if f is of lower degree there, unknown if
    a backward was not recorded), and the output's feature shape."""
    with torch.enable_grad():
        xx = x if x.requires_grad else x.detach().requires_grad_(True)
        y = _check_output(f(xx), x.shape[0], "torchhessdiag")
        N = y.shape[0]
        S = tuple(y.shape[1:])
        yf = y.reshape(N, -1)
        M = yf.shape[1]
        zero = yf.new_zeros(N)
        cols: List[List[Tensor]] = [[zero] * M for _ in seqs]
        unknown: List[Tuple[int, int]] = []
        for i in range(M):
            # prefix -> (the derivative, or None where the graph ended; whether that zero is unconfirmed)
            nodes: Dict[Tuple[int, ...], Tuple[Optional[Tensor], bool]] = {(): (yf[:, i], False)}
            grads: Dict[Tuple[int, ...], Optional[Tensor]] = {}
            for a, seq in enumerate(seqs):
                cur: Tuple[int, ...] = ()
                for ax in seq:
                    nxt = cur + (ax,)
                    if nxt not in nodes:
                        v, unk = nodes[cur]
                        if v is None:
                            nodes[nxt] = (None, unk)
                        else:
                            if cur not in grads:
                                g = None
                                if v.requires_grad:
                                    (g,) = torch.autograd.grad(v.sum(), xx, create_graph=True, retain_graph=True, allow_unused=True)
                                grads[cur] = g
                            g = grads[cur]
                            # the gradient of f itself missing: f does not depend on x (a sure 0)
                            nodes[nxt] = (None, len(cur) >= 1) if g is None else (g[:, ax], False)
                    cur = nxt
                v, unk = nodes[cur]
                if v is not None:
                    cols[a][i] = v if keep else v.detach()
                elif unk:
                    unknown.append((a, i))
    res = [torch.stack(c, 1).reshape((N,) + S) for c in cols]
    return res, unknown, S
