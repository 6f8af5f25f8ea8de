"""Build torchhessdiag and its compiled extension torchhessdiag._C.

The extension is compiled against the torch that is already installed (its C++ ABI must match
exactly), so build without pip's build isolation:

    pip install --no-build-isolation -e .

With build isolation pip would install a fresh, possibly different torch into a throw-away
environment, compile against it, and the resulting _C would fail to load (or crash) next to the
torch you actually use.

What gets built:
  * the CPU kernels, always;
  * the CUDA kernels too, whenever the installed torch is a CUDA build and nvcc is found
    (CUDA_HOME / PATH). No GPU has to be visible. Architectures (torchhessdiag/_archs.py):
    TORCH_CUDA_ARCH_LIST when set; else the visible GPUs' own (e.g. "8.9+PTX" on an RTX 4090);
    else, with no GPU visible, "7.0;7.5;8.0;8.6;8.9;9.0+PTX" (V100 .. H100, PTX for newer GPUs)
    minus what this nvcc cannot target (CUDA 13 dropped sm_70: "7.5;...;9.0+PTX"). The list
    built is compiled into the extension (torchhessdiag._C.cuda_archs()); a GPU it does not
    cover is found at its first use and served by the reference kernels, with one warning.

Environment switches:
  TORCHHESSDIAG_FORCE_CPU=1   build the CPU kernels only, even where CUDA could be built;
  TORCHHESSDIAG_FORCE_CUDA=1  fail unless the CUDA kernels can be built (used by CI to prove
                              that the CUDA sources compile and link).
"""

import os
import re
import subprocess
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - exercised only on a machine without torch
    sys.exit(
        "torchhessdiag compiles against the torch you have installed, and none was found.\n"
        "Install torch first (e.g. `pip install torch`), then build without build isolation:\n"
        "    pip install --no-build-isolation -e ."
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _resolve_cuda_home():
    """torch guesses CUDA_HOME from the nvcc on PATH; when that nvcc is a wrapper script (e.g.
    /usr/local/bin/nvcc exec'ing the real one) the guess has no headers or libraries. Ask nvcc
    itself where its toolkit is and point torch there."""
    home = cpp_extension.CUDA_HOME
    if home is None or os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        return
    nvcc = os.path.join(home, "bin", "nvcc")
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return
    for line in (out.stdout + out.stderr).splitlines():
        if "TOP=" in line:
            top = os.path.realpath(line.split("TOP=", 1)[1].strip())
            if os.path.exists(os.path.join(top, "include", "cuda_runtime.h")):
                cpp_extension.CUDA_HOME = top
                os.environ["CUDA_HOME"] = top
            return


def _cuda_buildable():
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    _resolve_cuda_home()
    if cpp_extension.CUDA_HOME is None:
        return False, "nvcc / CUDA_HOME not found"
    return True, f"torch CUDA {torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"


def _load_archs_module():
    """torchhessdiag/_archs.py (the choice of architectures), loaded by path: the package itself
    cannot be imported before it is built."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_thd_archs", os.path.join(HERE, "torchhessdiag", "_archs.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _nvcc_archs(archs_mod):
    """The compute capabilities this nvcc can compile for, as "X.Y" strings (None if unknown)."""
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return archs_mod.nvcc_archs_from(out.stdout)


def _visible_gpu_archs():
    try:
        if not torch.cuda.is_available():
            return []
        return [f"{a}.{b}" for a, b in (torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))]
    except Exception as e:  # a broken driver must not break a build that needs no GPU
        print(f"torchhessdiag: could not query the visible GPUs ({e}); building the default list")
        return []


def _cuda_arch_list():
    """(TORCH_CUDA_ARCH_LIST to build with, where it comes from): torchhessdiag/_archs.py."""
    mod = _load_archs_module()
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    nvcc = None if env else _nvcc_archs(mod)
    gpus = [] if env else _visible_gpu_archs()
    try:
        archs, why, notes = mod.choose_arch_list(env, nvcc, gpus)
    except ValueError as e:
        sys.exit(f"torchhessdiag: {e}")
    for note in notes:
        print(f"torchhessdiag: {note}")
    return archs, why


def _compiled_archs_macro():
    """The -gencode targets torch will pass to nvcc for the current TORCH_CUDA_ARCH_LIST, as one
    identifier (e.g. sm_80__sm_90__compute_90) that the extension reports at run time: the probe
    (torchhessdiag/_cuda_probe.py) names them when a GPU has no kernel image."""
    try:
        flags = cpp_extension._get_cuda_arch_flags()
    except Exception:  # a private torch helper: if it moves, report "unknown" rather than fail
        return "unknown"
    codes = sorted(
        {m.group(1) for f in flags for m in [re.search(r"code=((?:sm|compute)_\w+)", f)] if m},
        key=lambda c: (c.startswith("compute"), int(re.sub(r"\D", "", c)), c),
    )
    return "__".join(codes) or "unknown"


def _pip_cuda_include_dirs():
    """Header folders of the nvidia-* wheels that a pip CUDA torch brings (cusparse.h, cublas_v2.h,
    ...). A minimal CUDA toolkit (just nvcc and the runtime) lacks some headers that torch's CUDA
    headers include; these fill the gap. They are searched after the toolkit's own (-isystem)."""
    if cpp_extension.CUDA_HOME and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "include", "cusparse.h")
    ):
        return []
    import glob
    import site

    roots = list(dict.fromkeys(site.getsitepackages() + [site.getusersitepackages()] + sys.path))
    found = []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if os.path.exists(os.path.join(inc, "cusparse.h")) and inc not in found:
                found.append(inc)
    return found


def _extensions():
    sources = [
        os.path.join("csrc", "act_ops.cpp"),
        os.path.join("csrc", "engine_ops.cpp"),
        os.path.join("csrc", "taylor_ops.cpp"),
        os.path.join("csrc", "mlp_ops.cpp"),
        os.path.join("csrc", "jet2_ops.cpp"),
        os.path.join("csrc", "module.cpp"),
        # the CPU kernels of the derivative table, one build per instruction set (chosen at run time)
        os.path.join("csrc", "cpu", "kernels_scalar.cpp"),
        os.path.join("csrc", "cpu", "kernels_avx2.cpp"),
        os.path.join("csrc", "cpu", "kernels_avx512.cpp"),
        os.path.join("csrc", "cpu", "kernels_select.cpp"),
    ]
    # -fopenmp: at::parallel_for is OpenMP in torch's CPU builds and runs serially in a TU compiled
    # without it; the library resolves to the libgomp that torch itself loads. It also honours
    # `#pragma omp simd` (vectorised reductions).
    cxx_flags = ["-O3", "-Wall", "-Wno-unknown-pragmas", "-fopenmp"]
    link_flags = ["-fopenmp"]
    can_cuda, why = _cuda_buildable()
    with_cuda = can_cuda and not _flag("TORCHHESSDIAG_FORCE_CPU")
    if _flag("TORCHHESSDIAG_FORCE_CUDA") and not with_cuda:
        sys.exit(f"TORCHHESSDIAG_FORCE_CUDA=1 but the CUDA kernels cannot be built: {why}")
    print(f"torchhessdiag: building CPU kernels; CUDA kernels: {'yes' if with_cuda else 'no'} ({why})")
    if with_cuda:
        archs, why = _cuda_arch_list()
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        compiled = _compiled_archs_macro()
        print(f"torchhessdiag: CUDA architectures {archs} ({why}): {compiled.replace('__', ' ')}")
        sources += [os.path.join("csrc", "cuda", n) for n in ("act_ops.cu", "engine_ops.cu", "taylor_ops.cu", "mlp_ops.cu", "probe.cu")]
        extra_inc = []
        for inc in _pip_cuda_include_dirs():
            extra_inc += ["-isystem", inc]
        return [
            cpp_extension.CUDAExtension(
                "torchhessdiag._C",
                sources,
                define_macros=[("THD_WITH_CUDA", "1"), ("THD_CUDA_ARCHS", compiled)],
                extra_compile_args={"cxx": cxx_flags + extra_inc, "nvcc": ["-O3", "-lineinfo"] + extra_inc},
                extra_link_args=link_flags,
            )
        ]
    return [
        cpp_extension.CppExtension(
            "torchhessdiag._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    ]


setup(
    name="torchhessdiag",
    version="0.1.0",
    description="Exact Hessian diagonals, Laplacians and higher input derivatives of neural networks",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["torchhessdiag", "torchhessdiag.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={
        "test": ["pytest>=7", "numpy", "mpmath", "hypothesis", "matplotlib"],
        "examples": ["matplotlib"],
        "bench": ["matplotlib", "jet-for-pytorch; python_version >= '3.12'"],
    },
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    zip_safe=False,
)
