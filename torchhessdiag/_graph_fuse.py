"""Patterns of the traced graph that the jets compute better as one step: the gate
``(1 - z) * P + z * Q`` of gated networks (the "modified MLP" of Wang, Teng & Perdikaris 2021
mixes every hidden layer as ``(1 - z) * U + z * V``; PirateNet's blocks as ``f * U + (1 - f) * V``).

Written as it stands, a gate costs the jets two products of jets (Leibniz's rule, every
coefficient) and the jet of ``1 - z``; as ``P + z * (Q - P)`` it costs one product, and ``Q - P`` is
shared by every gate of the same pair (the modified MLP's U and V meet in every layer). The
rewrite replaces the four nodes (sub, two muls, add) by one call of :func:`gate`, whose plain
evaluation is the model's own expression; its jet rule is ``_rules_algebra._rule_gate``.

Applied by _graph_codegen.build_program to every trace; a node the pattern would absorb that has
another user (e.g. ``1 - z`` used again) keeps the graph as it is.
"""

from __future__ import annotations

import operator
from typing import Any, Optional, Tuple

import torch
import torch.fx as fx

__all__ = ["gate", "fuse_gates"]

_ADD = (operator.add, torch.add)
_MUL = (operator.mul, torch.mul, torch.multiply)
_SUB = (operator.sub, torch.sub, torch.subtract)


def gate(z: Any, P: Any, Q: Any) -> Any:
    """(1 - z) * P + z * Q, the model's own expression (the traced form of a gate)."""
    return (1 - z) * P + z * Q


def _plain_call(n: Any, targets: tuple, nargs: int) -> bool:
    return (
        isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets and len(n.args) == nargs and not n.kwargs
    )


def _one_minus(n: Any) -> Optional[fx.Node]:
    """z when n is the node ``1 - z`` with n used once, else None."""
    if not _plain_call(n, _SUB, 2) or len(n.users) != 1:
        return None
    one, z = n.args
    if isinstance(one, bool) or not isinstance(one, (int, float)) or one != 1 or not isinstance(z, fx.Node):
        return None
    return z


def _match(add: fx.Node) -> Optional[Tuple[fx.Node, Any, Any, list]]:
    """(z, P, Q, absorbed nodes) when ``add`` is (1 - z) * P + z * Q in any operand order."""
    if not _plain_call(add, _ADD, 2):
        return None
    m1, m2 = add.args
    if not (_plain_call(m1, _MUL, 2) and _plain_call(m2, _MUL, 2)) or m1 is m2:
        return None
    if len(m1.users) != 1 or len(m2.users) != 1:
        return None
    for ma, mb in ((m1, m2), (m2, m1)):  # ma = (1 - z) * P, mb = z * Q
        for i in (0, 1):
            z = _one_minus(ma.args[i])
            if z is None:
                continue
            P = ma.args[1 - i]
            for j in (0, 1):
                if mb.args[j] is z:
                    return z, P, mb.args[1 - j], [add, ma, mb, ma.args[i]]
    return None


def fuse_gates(graph: fx.Graph) -> int:
    """Replace every gate of ``graph`` by one :func:`gate` node; returns how many."""
    count = 0
    for node in list(graph.nodes):
        if node.graph is not graph or node.op != "call_function":
            continue  # (erased by an earlier match)
        got = _match(node)
        if got is None:
            continue
        z, P, Q, absorbed = got
        with graph.inserting_before(node):
            g = graph.call_function(gate, (z, P, Q))
        g.meta.update(node.meta)
        node.replace_all_uses_with(g)
        for n in absorbed:  # add, the two products, then 1 - z: each used only by the next
            graph.erase_node(n)
        count += 1
    return count
