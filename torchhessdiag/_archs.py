"""Which GPU architectures setup.py compiles the CUDA kernels for (pure logic, no torch import:
setup.py loads this file by path before torchhessdiag can be imported; tests/backend/test_cuda_probe.py
tests it).

* ``TORCH_CUDA_ARCH_LIST`` set: exactly that.
* Else the visible GPUs' own architectures (e.g. "8.9+PTX" on an RTX 4090), when this nvcc can
  compile for all of them.
* Else (no GPU visible, as on a build machine or CI) ``DEFAULT_CUDA_ARCHS``: Volta (V100),
  Turing (T4, RTX 20xx), Ampere (A100, RTX 30xx), Ada (L4, RTX 40xx), Hopper (H100/H200), with
  compute_90 PTX that the driver compiles for newer GPUs (Blackwell) at their first use -- minus
  what this nvcc cannot target (CUDA 13 dropped sm_70, so a V100 needs CUDA <= 12.x; CUDA 13
  builds "7.5;8.0;8.6;8.9;9.0+PTX"), plus any visible GPU it can target.
The highest architecture gets +PTX (forward compatibility at no extra compile: the same
compute_XY pass). A GPU outside the build is found at its first use (torchhessdiag/_cuda_probe.py).
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

DEFAULT_CUDA_ARCHS = ("7.0", "7.5", "8.0", "8.6", "8.9", "9.0")


def arch_key(arch: str):
    major, minor = arch.split(".")
    return int(major), minor


def choose_arch_list(
    env: Optional[str], nvcc_archs: Optional[Iterable[str]], gpu_archs: Iterable[str]
) -> Tuple[str, str, List[str]]:
    """(TORCH_CUDA_ARCH_LIST to build with, where it comes from, notes to print).

    env: TORCH_CUDA_ARCH_LIST as set (None/"" if unset); nvcc_archs: the "X.Y" this nvcc can
    compile for (None if unknown: assume all); gpu_archs: the visible GPUs' "X.Y"."""
    if env and env.strip():
        return env.strip(), "TORCH_CUDA_ARCH_LIST", []
    can = None if nvcc_archs is None else set(nvcc_archs)
    ok = (lambda a: True) if can is None else (lambda a: a in can)
    gpus = sorted(set(gpu_archs), key=arch_key)
    notes = []
    if gpus and all(ok(a) for a in gpus):
        archs, why = gpus, "the visible GPUs"
    else:
        for a in gpus:
            if not ok(a):
                notes.append(
                    f"this nvcc cannot compile for the visible GPU sm_{a.replace('.', '')}; building the "
                    "default list (that GPU will run the reference kernels; a CUDA toolkit and torch "
                    "that still support it can build for it)"
                )
        archs = sorted({a for a in DEFAULT_CUDA_ARCHS if ok(a)} | {a for a in gpus if ok(a)}, key=arch_key)
        why = "default + the visible GPUs" if gpus else "default (no GPU visible)"
    if not archs:
        raise ValueError(f"nvcc supports none of {DEFAULT_CUDA_ARCHS}; set TORCH_CUDA_ARCH_LIST")
    return ";".join(archs) + "+PTX", why, notes


def nvcc_archs_from(list_gpu_arch_output: str) -> Optional[List[str]]:
    """The "X.Y" of `nvcc --list-gpu-arch` (compute_75 -> 7.5, compute_100 -> 10.0)."""
    import re

    found = sorted({f"{m[:-1]}.{m[-1]}" for m in re.findall(r"compute_(\d+)\b", list_gpu_arch_output)}, key=arch_key)
    return found or None
