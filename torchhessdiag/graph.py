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

The pieces, bottom to top: ``_graph_program`` (:class:`Program`, :class:`Step`, the errors),
``_graph_classify`` (what the nodes mean), ``_graph_trace`` (the torch.fx tracer),
``_graph_codegen`` (:func:`build_program` and the generated ``run``), ``_graph_cache`` (the
programs per model). This module is their face: what the rest of the package and the tests use.
"""

from ._graph_cache import cache_info, clear_cache, get_program, remember_failure, signature
from ._graph_codegen import build_program
from ._graph_program import Program, ShapeError, Step, Unsupported
from ._graph_trace import traced_callable

__all__ = [
    "Unsupported", "ShapeError", "Step", "Program", "build_program", "get_program", "clear_cache", "cache_info",
    "signature", "remember_failure", "traced_callable",
]
