"""What a trace becomes: the :class:`Program` of :class:`Step` s (one per fx node), and the two
errors of the jet path (:class:`Unsupported`, :class:`ShapeError`).

The bottom of the tracing modules (graph.py is their face): _graph_classify makes the steps,
_graph_codegen the program's ``run``, _graph_cache keeps programs per model, and the jet rules
(taylor.py) raise these errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch.fx as fx
from torch import nn

from .activations import ActivationSpec


class Unsupported(Exception):
    """The jet propagation cannot handle this model; the message says which node and why."""


class ShapeError(ValueError):
    """x (or a value computed from it) does not fit a layer of the model: the message names the
    layer and the sizes. Raised to the caller as it is (the model cannot run on x at all)."""


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
