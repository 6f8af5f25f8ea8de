"""Which CUDA devices can run this build's kernels: the kernel-image probe (issue 17).

A build's CUDA kernels exist for the architectures it was compiled for (``setup.py``:
``TORCH_CUDA_ARCH_LIST``, else the visible GPUs, else sm_70..sm_90 + PTX; reported by
``torchhessdiag._C.cuda_archs()``). On any other GPU every launch would fail with "no kernel image
is available for execution on the device".

How a device is served (the C++ half is csrc/cuda_probe.h / csrc/cuda_gate.h): every CUDA op is
registered through a gate that, the first time a call reaches a device, calls
:func:`on_first_use` here. That launches one empty kernel on the device (``_C.cuda_probe_launch``,
compiled with the same targets as every other kernel), once per compute capability, and answers:

* it launched: the compiled kernels serve the device (the gate caches the answer; later calls
  cost one atomic load);
* the launch failed for want of a kernel image (``cudaErrorNoKernelImageForDevice``, its older
  name ``cudaErrorInvalidDeviceFunction``, or a driver too old for the PTX,
  ``cudaErrorUnsupportedPtxVersion``): every torchhessdiag op on that device runs the pure-PyTorch
  reference implementation of the same op (``torchhessdiag_ref::<op>``, registered by _reference_kernels.py;
  exact, slower), and one ``RuntimeWarning`` per compute capability names the device, its sm_XY,
  the architectures built and the command that rebuilds for it;
* any other launch error (e.g. out of memory while creating the context): the compiled kernels
  stay in charge and the op reports its own error.

Nothing runs at import: a process that never hands a CUDA tensor to torchhessdiag creates no CUDA
context for it (important for fork-based data loaders and one-process-per-GPU jobs).
"""

from __future__ import annotations

import threading
import warnings
from typing import Dict, Optional, Tuple

import torch

from . import _backend

# cudaError_t names that mean "no kernel image of this build can run on that device"
IMAGE_ERRORS = frozenset(
    {"cudaErrorNoKernelImageForDevice", "cudaErrorInvalidDeviceFunction", "cudaErrorUnsupportedPtxVersion"}
)

_lock = threading.Lock()
_by_capability: Dict[Tuple[int, int], Optional[str]] = {}  # None: fits; else why it does not
_fallback: Dict[int, str] = {}  # device index -> why it runs the reference
_warned: set = set()  # capabilities warned about


def compiled_archs() -> str:
    """The -gencode targets of this build's CUDA kernels, e.g. ``"sm_80 sm_90 compute_90"``
    (``""`` without compiled CUDA kernels)."""
    return _backend._C.cuda_archs() if _backend.CUDA_KERNELS else ""


def fallback_devices() -> Dict[str, str]:
    """``{"cuda:i": why}`` for the devices that run the reference kernels."""
    with _lock:
        return {f"cuda:{i}": why for i, why in sorted(_fallback.items())}


# The two calls that touch the GPU; tests replace them to simulate a device without an image.
def _launch(device: int) -> Tuple[int, str, str]:
    return _backend._C.cuda_probe_launch(device)


def _capability(device: int) -> Tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))


def _device_name(device: int) -> str:
    try:
        return torch.cuda.get_device_name(device)
    except Exception:  # only for the message
        return "unknown GPU"


def on_first_use(device: int) -> bool:
    """Called by the compiled ops (csrc/cuda_gate.h) on their first call on CUDA device
    ``device``: True means "run the reference kernels on this device". Thread-safe."""
    with _lock:
        cap = _capability(device)
        if cap not in _by_capability:
            code, name, message = _launch(device)
            if code != 0 and name not in IMAGE_ERRORS:
                return False  # not an image problem: the op runs and reports it
            _by_capability[cap] = None if code == 0 else f"{name}: {message}"
        why = _by_capability[cap]
        if why is None:
            return False
        sm = f"sm_{cap[0]}{cap[1]}"
        _fallback[device] = f"{sm} not in this build ({why})"
        if cap not in _warned:
            _warned.add(cap)
            warnings.warn(
                f"torchhessdiag: cuda:{device} ({_device_name(device)}, {sm}) cannot run the CUDA "
                f"kernels of this build ({why}); they were compiled for "
                f"{compiled_archs() or 'unknown architectures'}. Every torchhessdiag op on this GPU "
                "now runs the pure-PyTorch reference implementation (exact, slower). To compile "
                f"the kernels for it: TORCH_CUDA_ARCH_LIST={cap[0]}.{cap[1]} pip install "
                "--no-build-isolation --no-deps -e .  (or rebuild without TORCH_CUDA_ARCH_LIST "
                "where this GPU is visible: setup.py builds for the visible GPUs).",
                RuntimeWarning,
                stacklevel=2,
            )
        return True


def _reset() -> None:
    """Forget every answer (tests), here and in the compiled gate."""
    with _lock:
        _by_capability.clear()
        _fallback.clear()
        _warned.clear()
    if _backend.COMPILED:
        _backend._C.cuda_probe_reset()
