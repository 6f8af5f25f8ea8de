"""torchhessdiag: exact Hessian diagonals, Laplacians and higher input derivatives of neural
networks, with fused C++/CUDA kernels.

What is here (README.md and the pages of docs/ have the whole tour):

* ``mlp_laplacian``, ``mlp_hessian_diag``, ``mlp_derivatives`` and the other ``mlp_*`` functions
  -- the engine for ``nn.Sequential`` MLPs (one fused op for the whole network at small d, the
  reverse sweep at large d), differentiable for training;
* ``laplacian``, ``hessian_diag``, ``axis_derivatives`` -- any model or function (the engine,
  Taylor jets over the traced graph, or exact autograd), with ``explain`` / ``PathInfo``;
* ``biharmonic``, ``partials``, ``operator``, ``divergence`` -- beyond the Laplacian;
* ``torchhessdiag.nn`` -- drop-in activations (Tanh, SiLU, GELU, Softplus, ...) whose backward,
  double backward and higher derivatives run fused kernels; ``torchhessdiag.nn.convert(model)``;
* ``activation(x, act, **params)`` / ``activation_derivatives(x, act, order)`` -- the derivative
  table as functions; ``register_activation`` for your own;
* ``backend_info()`` -- which implementation (compiled CPU/CUDA kernels or the pure-PyTorch
  reference) serves the ops; ``empty_cache()`` releases the pooled CPU buffers.
"""

__version__ = "0.1.0"

# import order is load order here: the op layer (ops) before what builds on it
# isort: off
from . import activations, reference  # noqa: E402
from . import ops  # noqa: E402, F401  (loads the compiled extension and registers the ops)
from . import nn  # noqa: E402
# isort: on
from ._precision import TF32Warning  # noqa: E402
from .activations import ActivationSpec, make_spec  # noqa: E402
from .api import (  # noqa: E402
    MLPDerivatives,
    mlp_derivatives,
    mlp_hessian_diag,
    mlp_laplacian,
    mlp_laplacian_hutchinson,
    mlp_mixed_partials,
    mlp_weighted_laplacian,
)
from .custom import (  # noqa: E402
    RegisteredActivation,
    check_activation,
    register_activation,
    unregister_activation,
)
from .general import (  # noqa: E402
    PathInfo,
    axis_derivatives,
    clear_trace_cache,
    explain,
    get_fallback,
    hessian_diag,
    laplacian,
    set_fallback,
    trace_cache_info,
)
from .operators import biharmonic, divergence, operator, partials  # noqa: E402
from .ops import activation, activation_derivatives, backend_info, empty_cache  # noqa: E402

__all__ = [
    "PathInfo",
    "TF32Warning",
    "axis_derivatives",
    "biharmonic",
    "divergence",
    "operator",
    "partials",
    "clear_trace_cache",
    "trace_cache_info",
    "explain",
    "get_fallback",
    "hessian_diag",
    "laplacian",
    "set_fallback",
    "MLPDerivatives",
    "mlp_derivatives",
    "mlp_hessian_diag",
    "mlp_laplacian",
    "mlp_laplacian_hutchinson",
    "mlp_mixed_partials",
    "mlp_weighted_laplacian",
    "ActivationSpec",
    "RegisteredActivation",
    "check_activation",
    "register_activation",
    "unregister_activation",
    "activation",
    "activation_derivatives",
    "activations",
    "backend_info",
    "empty_cache",
    "make_spec",
    "nn",
    "reference",
]
