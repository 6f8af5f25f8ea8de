"""Which implementation serves the torchhessdiag ops: defining them (from ``_schemas``, their one
definition), loading the compiled extension's kernels for them, or the pure-PyTorch reference;
the dispatch keys the reference kernels take; the warning for a device with no compiled kernel.

Import direction: the bottom of the op layer (imports only torch and ``_schemas``); ``_checks``,
``_reference_kernels``, ``_fake_kernels``, ``_op_autograd`` and ``ops`` build on it.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from ._schemas import SCHEMAS

# ---- loading ---------------------------------------------------------------------------------

# The ops, from their one definition (_schemas.py), before the extension is loaded: its kernels
# (and its C++ autograd) attach to these schemas; without it the reference kernels do.
_def_lib = torch.library.Library("torchhessdiag", "DEF")
for _schema in SCHEMAS.values():
    _def_lib.define(_schema)

FORCED_REFERENCE = os.environ.get("TORCHHESSDIAG_BACKEND", "").strip().lower() == "reference"
LOAD_ERROR: Optional[str] = None
_C = None
if FORCED_REFERENCE:
    LOAD_ERROR = "TORCHHESSDIAG_BACKEND=reference was set"
else:
    try:
        from . import _C  # noqa: F811  (loading it registers the ops)
    except (ImportError, OSError) as e:  # missing, or built against another torch
        LOAD_ERROR = f"{type(e).__name__}: {e}"

COMPILED = _C is not None
CUDA_KERNELS = bool(COMPILED and _C.cuda_compiled())

if not COMPILED:
    if not FORCED_REFERENCE:
        warnings.warn(
            "torchhessdiag: the compiled extension torchhessdiag._C could not be loaded "
            f"({LOAD_ERROR}); every op runs the pure-PyTorch reference implementation (exact, "
            "slower). Rebuild with `pip install --no-build-isolation -e .` against the torch you "
            "use.",
            RuntimeWarning,
            stacklevel=3,  # past ops.py's import of this module: where torchhessdiag.ops is imported
        )

_ops = torch.ops.torchhessdiag


# ---- devices with no compiled kernel ---------------------------------------------------------

_warned_devices = set()


def _warn_reference(device: torch.device) -> None:
    if device.type in _warned_devices or FORCED_REFERENCE or not COMPILED:
        return  # without the extension the import already warned
    if device.type == "cpu" or (device.type == "cuda" and CUDA_KERNELS):
        # compiled kernels exist for this device type: the reference runs only as the fallback
        # of a GPU without a kernel image (torchhessdiag_ref::*), and _cuda_probe warned for it
        return
    _warned_devices.add(device.type)
    warnings.warn(
        f"torchhessdiag: no compiled kernel for {device.type} tensors (the extension was built "
        f"{'with' if CUDA_KERNELS else 'without'} CUDA); using the pure-PyTorch reference "
        "implementation (exact, slower).",
        RuntimeWarning,
        stacklevel=3,
    )


# The dispatch keys the reference kernels serve (_reference_kernels.py; fused.py adds mlp_jet's):
# every device without the extension, else the device types it has no kernels for.
_impl_lib = torch.library.Library("torchhessdiag", "IMPL")
if not COMPILED:
    _ref_keys = ["CompositeExplicitAutograd"]
else:
    _ref_keys = ([] if CUDA_KERNELS else ["CUDA"]) + ["MPS", "XPU"]
