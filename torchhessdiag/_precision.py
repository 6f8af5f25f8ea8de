"""The TF32 policy: float32 derivatives on CUDA and torch's reduced-precision matmul setting.

The engine and the Taylor-jet path compute their GEMMs with torch's own matmul, so they follow
torch's global float32 matmul setting. With ``torch.backends.cuda.matmul.allow_tf32 = True``,
``torch.set_float32_matmul_precision("high")`` (or ``"medium"``), or
``torch.backends.cuda.matmul.fp32_precision = "tf32"``, cuBLAS rounds the operands of float32
GEMMs to TF32 (10 explicit mantissa bits) on Ampere and newer GPUs: Hessian diagonals and
Laplacians then carry relative errors around 1e-3 instead of 1e-6 -- about three digits fewer,
silently.

Policy (issue 17; chosen over forcing full precision, which would mean flipping that
process-wide setting around every call: racy with the user's other threads, and with torch >= 2.9
flipping it through one of its two APIs makes reads through the other one raise): **respect the
user's setting and say so once**. :func:`warn_if_tf32` issues one :class:`TF32Warning` per
process the first time float32 CUDA tensors reach the engine or the jet path while TF32 is
enabled for CUDA matmuls. float64, CPU tensors and TF32 off are never affected and never warned.
Silence it with ``warnings.filterwarnings("ignore", category=torchhessdiag.TF32Warning)``; get
full precision with ``torch.backends.cuda.matmul.fp32_precision = "ieee"`` (torch >= 2.9) or
``torch.set_float32_matmul_precision("highest")``, or use float64.

Inside ``torch.compile`` tracing the check is skipped (no graph break); the first eager call or
the user's own setting is where it shows.
"""

from __future__ import annotations

import sys
import threading
import warnings

import torch

__all__ = ["TF32Warning", "tf32_enabled", "warn_if_tf32"]


class TF32Warning(UserWarning):
    """float32 CUDA derivatives computed with TF32 GEMMs (about 3 fewer correct digits)."""


_lock = threading.Lock()
_warned = False


def tf32_enabled() -> bool:
    """Whether torch currently lets cuBLAS use TF32 (or a lower precision) for float32 GEMMs.

    Reads torch's setting without changing it: the per-backend ``fp32_precision`` of torch >= 2.9
    (which also reflects ``set_float32_matmul_precision``, ``allow_tf32`` and the generic
    ``torch.backends.fp32_precision``), else the legacy ``allow_tf32``. If neither can be read
    (torch raises when the two APIs were mixed), True: a needless warning beats a silent one."""
    try:
        precision = torch.backends.cuda.matmul.fp32_precision
    except (AttributeError, RuntimeError):
        precision = None
    if precision is not None:
        return precision == "tf32"
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        return True


def _is_compiling() -> bool:
    f = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(f and f())


def _meets_tf32(t) -> bool:
    """A float32 CUDA tensor: the inputs TF32 GEMMs would round."""
    return isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cuda"


def _stacklevel() -> int:
    """stacklevel for warnings.warn called right here that points at the first frame outside
    the torchhessdiag package (the user's call, however deep the library's own chain is). The
    package's one frame walk: every warning of the library that names the user's line uses it."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "torchhessdiag":
        frame = frame.f_back
        level += 1
    return level


def warn_if_tf32(*tensors) -> bool:
    """Warn once per process if a float32 CUDA tensor among ``tensors`` will meet TF32 GEMMs; the
    warning points at the user's call (the first frame outside the package).

    Cheap enough for every call: after the warning (or for float64 / CPU inputs) it is a few
    attribute reads; the stack is walked only when it warns (``sys._getframe`` would be a graph
    break under torch.compile, which never warns). Returns True when it warned now (tests)."""
    global _warned
    if _warned:
        return False
    if not any(_meets_tf32(t) for t in tensors):
        return False
    if _is_compiling() or not tf32_enabled():
        return False
    with _lock:
        if _warned:
            return False
        _warned = True
    warnings.warn(
        "torchhessdiag: float32 CUDA inputs while TF32 is enabled for CUDA matmuls "
        "(torch.set_float32_matmul_precision('high'/'medium'), "
        "torch.backends.cuda.matmul.allow_tf32 = True or fp32_precision = 'tf32'): the GEMMs of "
        "these derivatives round their operands to TF32, so Hessian diagonals and Laplacians "
        "lose about 3 digits (relative error ~1e-3 instead of ~1e-6). For full float32 precision "
        "set torch.backends.cuda.matmul.fp32_precision = 'ieee' (torch >= 2.9) or "
        "torch.set_float32_matmul_precision('highest'), or use float64. This warning is shown "
        "once (category torchhessdiag.TF32Warning).",
        TF32Warning,
        stacklevel=_stacklevel(),
    )
    return True


def _reset() -> None:
    """Let the warning fire again (tests)."""
    global _warned
    with _lock:
        _warned = False
