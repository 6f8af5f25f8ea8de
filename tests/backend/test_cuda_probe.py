"""Serving every GPU (issue 17): the architectures a build compiles for (torchhessdiag/_archs.py,
used by setup.py) and the kernel-image probe (torchhessdiag/_cuda_probe.py, csrc/cuda_gate.h).

On a CPU-only machine the probe's decisions are tested with the two calls that touch a GPU
replaced (``_launch``: the empty-kernel launch; ``_capability``): a device whose launch fails for
want of a kernel image must be sent to the reference kernels, with exactly one warning naming its
sm_XY, the architectures built and the rebuild command; a device that launches, or fails for
another reason, keeps the compiled kernels. The reference ops it falls back to
(``torchhessdiag_ref::*``) are checked against the compiled ones on the CPU, and the C++ gate's
fallback path (csrc/cuda_gate.h) is run on the CPU through ``torchhessdiag_gatetest::*`` (the same
gate with the decision fixed to "reference"). With a GPU, the last tests drive the real CUDA
gate: a simulated missing image makes CUDA calls run the reference.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import torchhessdiag
from torchhessdiag import _archs, _cuda_probe, ops, reference

NO_IMAGE = (209, "cudaErrorNoKernelImageForDevice", "no kernel image is available for execution on the device")
CUDA_BUILD = ops.CUDA_KERNELS and torch.cuda.is_available()

pytestmark = pytest.mark.usefixtures("single_thread")


# ---- the architectures setup.py builds --------------------------------------------------------

NVCC13 = ["7.5", "8.0", "8.6", "8.7", "8.8", "8.9", "9.0", "10.0", "11.0", "10.3", "12.0", "12.1"]
NVCC12 = ["5.0", "5.2", "5.3", "6.0", "6.1", "6.2", "7.0", "7.2"] + NVCC13


@pytest.mark.parametrize(
    "env, nvcc, gpus, expected, why",
    [
        ("8.0;9.0+PTX", NVCC13, ["7.5"], "8.0;9.0+PTX", "TORCH_CUDA_ARCH_LIST"),  # the user decides
        (None, NVCC13, ["8.9"], "8.9+PTX", "the visible GPUs"),
        (None, NVCC13, ["9.0", "7.5", "9.0"], "7.5;9.0+PTX", "the visible GPUs"),
        (None, NVCC13, [], "7.5;8.0;8.6;8.9;9.0+PTX", "default (no GPU visible)"),  # no sm_70 in CUDA 13
        (None, NVCC12, [], "7.0;7.5;8.0;8.6;8.9;9.0+PTX", "default (no GPU visible)"),
        (None, None, [], "7.0;7.5;8.0;8.6;8.9;9.0+PTX", "default (no GPU visible)"),  # nvcc unknown
        (None, NVCC13, ["7.0", "8.0"], "7.5;8.0;8.6;8.9;9.0+PTX", "default + the visible GPUs"),  # V100 + CUDA 13
        (None, NVCC13, ["12.0"], "12.0+PTX", "the visible GPUs"),
        ("", NVCC13, [], "7.5;8.0;8.6;8.9;9.0+PTX", "default (no GPU visible)"),  # empty = unset
    ],
)
def test_choose_arch_list(env, nvcc, gpus, expected, why):
    archs, got_why, notes = _archs.choose_arch_list(env, nvcc, gpus)
    assert (archs, got_why) == (expected, why)
    assert bool(notes) == ("7.0" in gpus and nvcc is NVCC13), notes
    if notes:
        assert "sm_70" in notes[0] and "reference kernels" in notes[0]


def test_choose_arch_list_nothing_buildable():
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        _archs.choose_arch_list(None, ["5.0"], [])


def test_nvcc_archs_from():
    out = "compute_75\ncompute_80\ncompute_90\ncompute_100\ncompute_121\n"
    assert _archs.nvcc_archs_from(out) == ["7.5", "8.0", "9.0", "10.0", "12.1"]
    assert _archs.nvcc_archs_from("nvcc fatal: unknown option") is None


def test_build_reports_its_architectures():
    info = torchhessdiag.backend_info()
    if info["cuda_kernels"]:
        assert "sm_" in info["cuda_archs"], info["cuda_archs"]
    else:
        assert info["cuda_archs"] == ""


# ---- the probe's decisions, with the GPU simulated ------------------------------------------------


@pytest.fixture
def probe(monkeypatch):
    """_cuda_probe with a simulated machine: ``probe.caps[device] = (major, minor)``,
    ``probe.results[device] = (code, name, message)``; ``probe.launches`` counts launches."""
    if not ops.COMPILED:
        pytest.skip(f"compiled extension not loaded ({ops.LOAD_ERROR})")

    class Sim:
        caps = {}
        results = {}
        launches = []

    def launch(device):
        Sim.launches.append(device)
        return Sim.results[device]

    _cuda_probe._reset()
    monkeypatch.setattr(_cuda_probe, "_launch", launch)
    monkeypatch.setattr(_cuda_probe, "_capability", lambda d: Sim.caps[d])
    monkeypatch.setattr(_cuda_probe, "_device_name", lambda d: f"Simulated GPU {d}")
    monkeypatch.setattr(_cuda_probe, "compiled_archs", lambda: "sm_80 sm_90 compute_90")
    yield Sim
    _cuda_probe._reset()


def _thd_warnings(record):
    return [w for w in record if "torchhessdiag" in str(w.message)]


def test_no_kernel_image_falls_back_with_one_warning(probe):
    probe.caps = {0: (7, 5), 1: (7, 5)}
    probe.results = {0: NO_IMAGE, 1: NO_IMAGE}
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert _cuda_probe.on_first_use(0) is True
        assert _cuda_probe.on_first_use(0) is True  # (the gate caches; asking again is harmless)
        assert _cuda_probe.on_first_use(1) is True  # same capability: no second launch
    assert probe.launches == [0], "one launch per compute capability"
    (w,) = _thd_warnings(rec)
    assert w.category is RuntimeWarning
    msg = str(w.message)
    for part in ("cuda:0", "Simulated GPU 0", "sm_75", "sm_80 sm_90 compute_90", "cudaErrorNoKernelImageForDevice",
                 "reference implementation", "TORCH_CUDA_ARCH_LIST=7.5 pip install --no-build-isolation"):
        assert part in msg, (part, msg)
    info = torchhessdiag.backend_info()
    assert info["devices"]["cuda"] == "reference"
    assert set(info["cuda_fallback"]) == {"cuda:0", "cuda:1"}
    assert "sm_75" in info["cuda_fallback"]["cuda:1"]


@pytest.mark.parametrize("error", ["cudaErrorInvalidDeviceFunction", "cudaErrorUnsupportedPtxVersion"])
def test_other_image_errors_fall_back_too(probe, error):
    probe.caps = {0: (12, 0)}
    probe.results = {0: (1, error, "no usable image")}
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert _cuda_probe.on_first_use(0) is True
    (w,) = _thd_warnings(rec)
    assert "sm_120" in str(w.message) and "TORCH_CUDA_ARCH_LIST=12.0" in str(w.message)


def test_device_that_launches_keeps_compiled_kernels(probe):
    probe.caps = {0: (9, 0)}
    probe.results = {0: (0, "cudaSuccess", "")}
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert _cuda_probe.on_first_use(0) is False
        assert _cuda_probe.on_first_use(0) is False
    assert probe.launches == [0] and not _thd_warnings(rec)
    info = torchhessdiag.backend_info()
    assert info["cuda_fallback"] == {}
    assert info["devices"]["cuda"] == ("compiled" if ops.CUDA_KERNELS else "reference")


def test_other_launch_errors_keep_compiled_kernels(probe):
    """Not an image problem (here: no memory for the context): no fallback, no warning, and the
    answer is not cached per capability (the op runs and reports its own error)."""
    probe.caps = {0: (9, 0), 1: (9, 0)}
    probe.results = {0: (2, "cudaErrorMemoryAllocation", "out of memory"), 1: (0, "cudaSuccess", "")}
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert _cuda_probe.on_first_use(0) is False
        assert _cuda_probe.on_first_use(1) is False
    assert probe.launches == [0, 1] and not _thd_warnings(rec)
    assert torchhessdiag.backend_info()["cuda_fallback"] == {}


def test_mixed_machine_falls_back_only_where_needed(probe):
    probe.caps = {0: (9, 0), 1: (7, 5), 2: (7, 5)}
    probe.results = {0: (0, "cudaSuccess", ""), 1: NO_IMAGE, 2: NO_IMAGE}
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert [_cuda_probe.on_first_use(d) for d in (0, 1, 2, 0)] == [False, True, True, False]
    (w,) = _thd_warnings(rec)
    assert "cuda:1" in str(w.message) and "sm_75" in str(w.message)
    assert set(torchhessdiag.backend_info()["cuda_fallback"]) == {"cuda:1", "cuda:2"}
    assert probe.launches == [0, 1]


def test_import_runs_no_probe_and_creates_no_cuda_context():
    code = "import torch, torchhessdiag; print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


# ---- the reference ops the fallback runs -------------------------------------------------------


def _op_cases():
    g = torch.Generator().manual_seed(3)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    z, gg, gr = r(4, 5), r(4, 5), r(4, 5)
    J, s1, c = r(4, 3, 5), r(4, 5), r(2, 4, 5)
    D, H = r(2, 4, 5), r(2, 4, 3, 5)
    return [
        ("act_derivatives", (z, "tanh", 1.0, 0.0, [0, 2, 4])),
        ("act_grad", (gr, z, "softplus", 2.0, 5.0, 3)),
        ("mul_pair_backward", (gg, None, gr, z, r(4, 5), r(4, 5), r(4, 5))),
        ("mul_pair", (gg, gr, z, s1[:, :5].expand(4, 5).contiguous())),
        ("jet_layer", (J, s1, c, True)),
        ("jet_layer_backward", (r(4, 3, 5), r(2, 4, 3), J, s1, c)),
        ("taylor_act", (D, H)),
        ("taylor_act_backward", (r(2, 4, 3, 5), D, H)),
    ]


@pytest.mark.parametrize("name, args", _op_cases(), ids=[n for n, _ in _op_cases()])
def test_reference_ops_match_compiled(name, args):
    """torchhessdiag_ref::<op> (what a GPU without a kernel image runs) computes what the compiled
    op computes: float64, 1e-13 relative to the largest entry (same formulas, other summation
    order / libm), and warns nothing on its own."""
    if not ops.COMPILED:
        pytest.skip("the reference ops exist beside a compiled extension only")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ref = getattr(torch.ops.torchhessdiag_ref, name)(*args)
    ours = getattr(torch.ops.torchhessdiag, name)(*args)
    ref, ours = (ref,) if torch.is_tensor(ref) else ref, (ours,) if torch.is_tensor(ours) else ours
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert (a - b).abs().max() <= 1e-13 * b.abs().max().clamp_min(1e-300)
    assert not _thd_warnings(rec)


def test_reference_inplace_op_matches_compiled():
    if not ops.COMPILED:
        pytest.skip("the reference ops exist beside a compiled extension only")
    J, s1, c = (torch.randn(*s, dtype=torch.float64) for s in ((4, 3, 5), (4, 5), (2, 4, 5)))
    J1, J2 = J.clone(), J.clone()
    acc1 = torch.ops.torchhessdiag_ref.jet_layer_(J1, s1, c)
    acc2 = torch.ops.torchhessdiag.jet_layer_(J2, s1, c)
    assert torch.equal(J1, J2)  # s1 * J: one product
    assert (acc1 - acc2).abs().max() <= 1e-13 * acc2.abs().max()


def test_reference_op_schemas_match():
    if not ops.COMPILED:
        pytest.skip("the reference ops exist beside a compiled extension only")
    for name in ops._REF_KERNELS:
        if name == "act_forward":
            continue
        ours = str(getattr(torch.ops.torchhessdiag, name).default._schema)
        ref = str(getattr(torch.ops.torchhessdiag_ref, name).default._schema)
        assert ref.replace("torchhessdiag_ref::", "torchhessdiag::") == ours


# ---- the compiled gate's fallback path, on the CPU --------------------------------------------
#
# torchhessdiag_gatetest::<op> is the CPU kernel of <op> registered through the same C++ Gate
# template as the CUDA ops, with the decision fixed to "reference": each call goes from the C++
# gate through the dispatcher to torchhessdiag_ref::<op> (Python). Spying on the reference
# kernels proves the path was taken; the numbers must be the reference's exactly.


@pytest.mark.parametrize("name, args", _op_cases(), ids=[n for n, _ in _op_cases()])
def test_gate_fallback_path_on_cpu(name, args):
    if not ops.COMPILED:
        pytest.skip("the gate exists in the compiled extension only")
    real = ops._REF_KERNELS[name]
    calls = []

    def spy(*a):
        calls.append(name)
        return real(*a)

    # a CPU kernel of torchhessdiag_ref::<name> (it has only CompositeExplicitAutograd) that counts
    lib = torch.library.Library("torchhessdiag_ref", "IMPL")
    lib.impl(name, spy, "CPU")
    try:
        got = getattr(torch.ops.torchhessdiag_gatetest, name)(*args)
    finally:
        lib._destroy()
    assert calls == [name], "the gate did not run the reference op"
    expected = real(*args)
    got, expected = ((got,), (expected,)) if torch.is_tensor(got) else (got, expected)
    assert len(got) == len(expected)
    for x, y in zip(got, expected):
        assert torch.equal(x, y)


def test_gate_fallback_path_on_cpu_inplace_and_errors():
    """The in-place op through the gate overwrites J as the reference does; the reference's
    ValueError comes back through the C++ gate as a ValueError."""
    if not ops.COMPILED:
        pytest.skip("the gate exists in the compiled extension only")
    J, s1, c = (torch.randn(*s, dtype=torch.float64) for s in ((4, 3, 5), (4, 5), (2, 4, 5)))
    J1, J2 = J.clone(), J.clone()
    acc1 = torch.ops.torchhessdiag_gatetest.jet_layer_(J1, s1, c)
    acc2 = ops._ref_jet_layer_(J2, s1, c)
    assert torch.equal(J1, J2) and torch.equal(acc1, acc2), "J overwritten through the gate"
    alias = J1.view(-1)[:20].view(4, 5)  # contiguous, inside J
    with pytest.raises(ValueError, match="s1 shares memory with J"):
        torch.ops.torchhessdiag_gatetest.jet_layer_(J1, alias, c)
    with pytest.raises(ValueError, match="unknown activation 'nope'"):
        torch.ops.torchhessdiag_gatetest.act_grad(s1, s1, "nope", 1.0, 0.0, 1)


# ---- with a GPU: the compiled gate itself -------------------------------------------------------


@pytest.mark.skipif(not CUDA_BUILD, reason="needs a CUDA device and a build with CUDA kernels")
def test_gate_runs_reference_on_a_device_without_image(monkeypatch):
    """A simulated missing kernel image on the current GPU: the compiled ops' gate asks the probe,
    runs torchhessdiag_ref (spied through reference.jet_layer) with one warning, caches the answer;
    after a reset the real probe finds the real kernels."""
    dev = torch.cuda.current_device()
    calls = []
    real_jet_layer = reference.jet_layer

    def spy(*a, **k):
        calls.append(1)
        return real_jet_layer(*a, **k)

    _cuda_probe._reset()
    try:
        monkeypatch.setattr(_cuda_probe, "_launch", lambda d: NO_IMAGE)
        monkeypatch.setattr(reference, "jet_layer", spy)
        J, s1, c = (torch.randn(*s, dtype=torch.float64, device="cuda") for s in ((40, 3, 33), (40, 33), (3, 40, 33)))
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            Ja, acc = torch.ops.torchhessdiag.jet_layer(J, s1, c, True)
            Ja2, acc2 = torch.ops.torchhessdiag.jet_layer(J, s1, c, True)
            d = torchhessdiag.activation_derivatives(J, "tanh", order=2)
        assert len(calls) == 2, "both calls ran the reference"
        assert len(_thd_warnings(rec)) == 1
        assert ops._C.cuda_probe_state(dev) == 2
        rJa, racc = real_jet_layer(J, s1, c, True)
        assert torch.equal(Ja, rJa) and torch.equal(acc, racc) and torch.equal(acc2, racc)
        ref_d = torch.stack(reference.derivatives(J, "tanh", 1.0, 0.0, 2))
        assert torch.allclose(d, ref_d, rtol=0, atol=1e-15)
        assert torchhessdiag.backend_info()["devices"]["cuda"] == "reference"
    finally:
        monkeypatch.undo()
        _cuda_probe._reset()
    # the real probe: this build's kernels run here
    calls.clear()
    Ja, acc = torch.ops.torchhessdiag.jet_layer(J, s1, c, True)
    assert ops._C.cuda_probe_state(dev) == 1 and torchhessdiag.backend_info()["cuda_fallback"] == {}


@pytest.mark.skipif(not CUDA_BUILD, reason="needs a CUDA device and a build with CUDA kernels")
def test_real_probe_launch_succeeds_here():
    dev = torch.cuda.current_device()
    code, name, message = ops._C.cuda_probe_launch(dev)
    assert (code, name) == (0, "cudaSuccess"), (name, message, ops._C.cuda_archs())
