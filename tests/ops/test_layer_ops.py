"""The engine's per-layer ops (csrc/engine_ops.h, csrc/engine_ops.cpp, torchhessdiag/ops.py):

    torch.ops.torchhessdiag.jet_layer(J, s1, c, need_ja) -> (Ja, acc)
    torch.ops.torchhessdiag.jet_layer_(J, s1, c) -> acc           (J overwritten with s1 * J)
    torch.ops.torchhessdiag.jet_layer_backward(gJa?, gacc, J, s1, c) -> (dJ, ds1, dc)

against the pure-PyTorch formulas of torchhessdiag.reference, gradcheck / gradgradcheck,
torch.library.opcheck, the fake kernels, and argument checking; the last section is the compact
set of tests/test_layer_op.py (merged here: forward, in-place, backward, gradcheck, opcheck, bad
arguments, with its own 1e-13 / 1e-5 tolerance).

Tolerances. acc[i, n, k] = sum_j c[i,n,j] J[n,k,j]^2 and the backward's sums over i / k are
w-term sums evaluated in a different order than einsum. Their rounding error is bounded by
~(w + 2) eps * S, with S the sum of the magnitudes of the terms (the sum's natural scale, which
also covers cancellation); with w <= 16 here that is <= 18 eps * S per side.
* float64: |op - reference| <= 1e-10 * max |reference| (the suite's bound; seen: ~1e-16), and
  additionally <= 50 eps64 * S.
* float32 (reference also in float32): |op - reference| <= 50 eps32 * S: both sides' bounds
  together with ~1.4x margin; any wrong term is O(1) relative.
* Ja = s1 * J and the gJa * s1 part are single multiplications, correctly rounded on both
  sides: compared for exact equality.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from torchhessdiag import ops as thd_ops, reference

ops = torch.ops.torchhessdiag

# tiny tensors: one intra-op thread (tests/conftest.py); test_large_parallel raises it again
pytestmark = pytest.mark.usefixtures("single_thread")

F64_REL = 1e-10
FACTOR = 50.0


def _args(device, dtype, N=3, K=4, w=5, m=2, seed=0, layout="contiguous"):
    """(J (N, K, w), s1 (N, w), c (m, N, w)); layout "strided" gives the same values in
    permuted / sliced storage (not contiguous)."""
    g = torch.Generator().manual_seed(seed)

    def mk(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    J, s1, c = mk(N, K, w), mk(N, w), mk(m, N, w)
    if layout == "strided":
        J = J.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # w-major storage
        s1 = s1.t().contiguous().t()
        c = torch.cat([c, torch.zeros_like(c)], dim=2)[:, :, :w]  # a slice of wider rows
        assert not (J.is_contiguous() or s1.is_contiguous() or c.is_contiguous())
    return J, s1, c


def _assert_sum_close(actual, expected, terms_scale, dtype, what):
    """actual vs expected for w-term sums; terms_scale: the sum of |terms| (same shape)."""
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype and actual.device == expected.device, what
    if actual.numel() == 0:
        return
    assert torch.isfinite(actual).all(), what
    err = (actual - expected).abs()
    eps = torch.finfo(dtype).eps
    assert (err <= FACTOR * eps * terms_scale).all(), f"{what}: max err {err.max().item():.3e}"
    if dtype == torch.float64:
        assert err.max().item() <= F64_REL * expected.abs().max().item(), what


def _acc_scale(J, s1, c):
    return torch.einsum("inj,nkj->ink", c.abs(), J * J)


def _bwd_scales(gJa, gacc, J, s1, c):
    """Sums of |terms| of dJ, ds1, dc (see reference.jet_layer_backward)."""
    t = torch.einsum("ink,inj->nkj", gacc.abs(), c.abs())
    sJ = 2 * J.abs() * t + (0 if gJa is None else (gJa * s1.unsqueeze(1)).abs())
    ss1 = torch.zeros_like(s1) if gJa is None else (gJa * J).abs().sum(1)
    sc = torch.einsum("ink,nkj->inj", gacc.abs(), J * J)
    return sJ, ss1, sc


# ---- forward against the reference -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("need_ja", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_jet_layer_matches_reference(device, dtype, m, need_ja, layout):
    J, s1, c = _args(device, dtype, N=4, K=3, w=7, m=m, layout=layout)
    Ja, acc = ops.jet_layer(J, s1, c, need_ja)
    rJa, racc = reference.jet_layer(J, s1, c, need_ja)
    assert acc.shape == (m, 4, 3) and acc.is_contiguous()
    _assert_sum_close(acc, racc, _acc_scale(J, s1, c), dtype, "acc")
    if need_ja:
        assert Ja.shape == J.shape and Ja.dtype == dtype and Ja.device == J.device
        assert torch.equal(Ja, rJa), "Ja = s1 * J is one correctly rounded product"
    else:
        assert Ja.shape == (0,) and Ja.dtype == dtype and Ja.device == J.device
    # the inputs are not modified
    J0, s10, c0 = _args(device, dtype, N=4, K=3, w=7, m=m, layout=layout)
    assert torch.equal(J, J0) and torch.equal(s1, s10) and torch.equal(c, c0)


def test_jet_layer_float32_vs_exact(device):
    """float32 op vs the float64 reference of the same float32 inputs: within the sum bound."""
    J, s1, c = _args(device, torch.float32, N=5, K=4, w=16, m=2, seed=3)
    _, acc = ops.jet_layer(J, s1, c, True)
    _, racc = reference.jet_layer(J.double(), s1.double(), c.double(), False)
    err = (acc.double() - racc).abs()
    assert (err <= 25 * torch.finfo(torch.float32).eps * _acc_scale(J.double(), s1.double(), c.double())).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m", [1, 3])
def test_jet_layer_inplace(device, dtype, m):
    """jet_layer_ overwrites J with s1 * J (same storage) and returns acc, a new tensor."""
    J, s1, c = _args(device, dtype, N=4, K=3, w=6, m=m)
    rJa, racc = reference.jet_layer(J, s1, c, True)
    scale = _acc_scale(J, s1, c)
    ptr = J.data_ptr()
    acc = ops.jet_layer_(J, s1, c)
    assert J.data_ptr() == ptr
    assert torch.equal(J, rJa), "J must now hold s1 * J"
    assert acc.data_ptr() != ptr and acc.shape == (m, 4, 3)
    _assert_sum_close(acc, racc, scale, dtype, "acc (in place)")
    # non-contiguous s1 / c are fine (only J is written)
    J2, s12, c2 = _args(device, dtype, N=4, K=3, w=6, m=m, layout="strided")
    J2 = J2.contiguous()
    rJa2, racc2 = reference.jet_layer(J2, s12, c2, True)
    scale2 = _acc_scale(J2, s12, c2)
    acc2 = ops.jet_layer_(J2, s12, c2)
    assert torch.equal(J2, rJa2)
    _assert_sum_close(acc2, racc2, scale2, dtype, "acc2")


def test_jet_layer_inplace_same_as_out_of_place(device):
    J, s1, c = _args(device, torch.float64, N=6, K=5, w=8, m=2, seed=4)
    Ja, acc = ops.jet_layer(J, s1, c, True)
    J2 = J.clone()
    acc2 = ops.jet_layer_(J2, s1, c)
    assert torch.equal(acc, acc2) and torch.equal(Ja, J2)


def test_jet_layer_inplace_non_contiguous_J_refused(device):
    J, s1, c = _args(device, torch.float64, layout="strided")
    J0 = J.clone()
    with pytest.raises(ValueError, match="contiguous"):
        ops.jet_layer_(J, s1, c)
    assert torch.equal(J, J0)


# ---- backward against the reference ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("with_gJa", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_jet_layer_backward_matches_reference(device, dtype, m, with_gJa, layout):
    J, s1, c = _args(device, dtype, N=4, K=3, w=7, m=m, layout=layout)
    g = torch.Generator().manual_seed(11)
    gacc = torch.randn(m, 4, 3, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    gJa = torch.randn(4, 3, 7, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) if with_gJa else None
    if layout == "strided":
        gacc = gacc.transpose(0, 2).contiguous().transpose(0, 2)
        gJa = None if gJa is None else gJa.transpose(0, 1).contiguous().transpose(0, 1)
    dJ, ds1, dc = ops.jet_layer_backward(gJa, gacc, J, s1, c)
    rdJ, rds1, rdc = reference.jet_layer_backward(gJa, gacc, J, s1, c)
    sJ, ss1, sc = _bwd_scales(gJa, gacc, J, s1, c)
    _assert_sum_close(dJ, rdJ, sJ, dtype, "dJ")
    _assert_sum_close(dc, rdc, sc, dtype, "dc")
    if with_gJa:
        _assert_sum_close(ds1, rds1, ss1, dtype, "ds1")
    else:
        assert torch.equal(ds1, torch.zeros_like(s1)), "no gJa: ds1 is exactly zero"
    assert ds1.shape == s1.shape and dc.shape == c.shape and dJ.shape == J.shape


def test_jet_layer_backward_gacc_zero(device):
    """gacc = 0: dJ = gJa * s1 exactly (one product), dc = 0 exactly."""
    J, s1, c = _args(device, torch.float64, N=3, K=2, w=4, m=2)
    gJa = torch.randn_like(J)
    dJ, ds1, dc = ops.jet_layer_backward(gJa, torch.zeros(2, 3, 2, dtype=torch.float64, device=device), J, s1, c)
    assert torch.equal(dJ, gJa * s1.unsqueeze(1))
    assert torch.equal(dc, torch.zeros_like(c))


def test_large_parallel(device):
    """Enough points that the CPU kernels split the work over threads (grain 16384 / (K w) =
    512 points here), with the default thread count."""
    torch.set_num_threads(max(2, min(4, os.cpu_count() or 2)))  # restored by single_thread
    dtype = torch.float64
    J, s1, c = _args(device, dtype, N=3000, K=4, w=8, m=2, seed=5)
    Ja, acc = ops.jet_layer(J, s1, c, True)
    rJa, racc = reference.jet_layer(J, s1, c, True)
    _assert_sum_close(acc, racc, _acc_scale(J, s1, c), dtype, "acc")
    assert torch.equal(Ja, rJa)
    gacc, gJa = torch.randn_like(acc), torch.randn_like(J)
    out = ops.jet_layer_backward(gJa, gacc, J, s1, c)
    ref = reference.jet_layer_backward(gJa, gacc, J, s1, c)
    for a, b, s, name in zip(out, ref, _bwd_scales(gJa, gacc, J, s1, c), ("dJ", "ds1", "dc")):
        _assert_sum_close(a, b, s, dtype, name)
    J2 = J.clone()
    assert torch.equal(ops.jet_layer_(J2, s1, c), acc) and torch.equal(J2, Ja)


@pytest.mark.parametrize("N,K,w,m", [(0, 3, 4, 2), (3, 0, 4, 2), (3, 2, 0, 2), (3, 2, 4, 0), (0, 0, 0, 0)])
def test_empty_sizes(device, N, K, w, m):
    """Every size may be 0: results of the right shapes, equal to the reference (zeros where a
    sum is empty); Ja is s1 * J also when there are no outputs to accumulate (m = 0)."""
    J, s1, c = _args(device, torch.float64, N=N, K=K, w=w, m=m, seed=6)
    Ja, acc = ops.jet_layer(J, s1, c, True)
    rJa, racc = reference.jet_layer(J, s1, c, True)
    assert acc.shape == racc.shape == (m, N, K)
    assert torch.equal(acc, racc)  # exact zeros where w = 0; empty otherwise
    assert Ja.shape == J.shape
    assert torch.equal(Ja, rJa), "Ja must be s1 * J"
    J2 = J.clone()
    acc2 = ops.jet_layer_(J2, s1, c)
    assert acc2.shape == (m, N, K) and torch.equal(acc2, racc)
    assert torch.equal(J2, rJa), "jet_layer_ must leave s1 * J in J"
    gacc = torch.ones(m, N, K, dtype=torch.float64, device=device)
    gJa = torch.ones_like(J)
    for gj in (None, gJa):
        out = ops.jet_layer_backward(gj, gacc, J, s1, c)
        ref = reference.jet_layer_backward(gj, gacc, J, s1, c)
        for a, b in zip(out, ref):
            assert a.shape == b.shape and torch.equal(a, b)


# ---- autograd --------------------------------------------------------------------------------


def _grad_inputs(device, N=2, K=3, w=4, m=2, seed=7):
    J, s1, c = _args(device, torch.float64, N=N, K=K, w=w, m=m, seed=seed)
    return J.requires_grad_(True), s1.requires_grad_(True), c.requires_grad_(True)


@pytest.mark.parametrize("need_ja", [True, False])
@pytest.mark.parametrize("m", [1, 3])
def test_gradcheck(device, need_ja, m):
    """First derivatives (the backward runs the fused jet_layer_backward op)."""
    inputs = _grad_inputs(device, m=m)
    fn = lambda J, s1, c: ops.jet_layer(J, s1, c, need_ja)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("need_ja", [True, False])
def test_gradgradcheck(device, need_ja):
    """Second derivatives (the backward with create_graph runs differentiable torch formulas)."""
    inputs = _grad_inputs(device, m=2)
    fn = lambda J, s1, c: ops.jet_layer(J, s1, c, need_ja)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_backward_uses_fused_op_and_matches_reference_autograd(device):
    """torch.autograd.grad through jet_layer == autograd through reference.jet_layer."""
    J, s1, c = _grad_inputs(device, N=3, K=4, w=5, m=2)
    Ja, acc = ops.jet_layer(J, s1, c, True)
    rJa, racc = reference.jet_layer(J, s1, c, True)
    gJa, gacc = torch.randn_like(Ja), torch.randn_like(acc)
    got = torch.autograd.grad((Ja, acc), (J, s1, c), (gJa, gacc))
    want = torch.autograd.grad((rJa, racc), (J, s1, c), (gJa, gacc))
    for a, b, s in zip(got, want, _bwd_scales(gJa, gacc, J.detach(), s1.detach(), c.detach())):
        _assert_sum_close(a, b, s, torch.float64, "grad")


# ---- opcheck ---------------------------------------------------------------------------------


def _opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck_jet_layer(device, layout, requires_grad):
    for need_ja in (True, False):
        J, s1, c = _args(device, torch.float64, N=3, K=2, w=4, m=2, layout=layout)
        if requires_grad:
            for t in (J, s1, c):
                t.requires_grad_(True)
        _opcheck(ops.jet_layer, (J, s1, c, need_ja))


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_opcheck_jet_layer_backward(device, layout):
    """The fake kernel must describe the real outputs, strides included."""
    for with_gJa in (True, False):
        J, s1, c = _args(device, torch.float64, N=3, K=2, w=4, m=2, layout=layout)
        gacc = torch.randn(2, 3, 2, dtype=torch.float64, device=device)
        gJa = torch.randn_like(J) if with_gJa else None
        _opcheck(ops.jet_layer_backward, (gJa, gacc, J, s1, c))


@pytest.mark.parametrize("s1_layout", ["contiguous", "strided"])
def test_opcheck_jet_layer_inplace(device, s1_layout):
    """opcheck handles mutating ops (schema: J is Tensor(a!) and is the only input mutated)."""
    J, s1, c = _args(device, torch.float64, N=3, K=2, w=4, m=2, layout=s1_layout)
    _opcheck(ops.jet_layer_, (J.contiguous(), s1, c))


def test_fake_kernels_shapes(device):
    J, s1, c = _args(device, torch.float64, N=3, K=2, w=4, m=2)
    gacc = torch.randn(2, 3, 2, dtype=torch.float64, device=device)
    with FakeTensorMode() as mode:
        fJ, fs1, fc, fg = (mode.from_tensor(t) for t in (J, s1, c, gacc))
        Ja, acc = ops.jet_layer(fJ, fs1, fc, True)
        assert Ja.shape == (3, 2, 4) and acc.shape == (2, 3, 2)
        Ja0, _ = ops.jet_layer(fJ, fs1, fc, False)
        assert Ja0.shape == (0,)
        assert ops.jet_layer_(fJ, fs1, fc).shape == (2, 3, 2)
        dJ, ds1, dc = ops.jet_layer_backward(None, fg, fJ, fs1, fc)
        assert (dJ.shape, ds1.shape, dc.shape) == (J.shape, s1.shape, c.shape)


def test_fake_kernel_refuses_what_the_kernel_refuses_inplace_non_contiguous(device):
    """_checks.py promises that its checks (used by the fake kernels and the reference backend) are
    "the same argument checks as the C++ ops": the compiled jet_layer_ refuses a non-contiguous
    J with ValueError, so tracing (fake tensors) must refuse it too rather than succeed and fail
    only when the compiled graph runs."""
    J, s1, c = _args(device, torch.float64, layout="strided")
    with pytest.raises(ValueError, match="contiguous"):
        ops.jet_layer_(J, s1, c)
    with FakeTensorMode() as mode:
        fJ, fs1, fc = (mode.from_tensor(t) for t in (J, s1, c))
        with pytest.raises(ValueError, match="contiguous"):
            ops.jet_layer_(fJ, fs1, fc)


# ---- bad arguments ---------------------------------------------------------------------------


def _bad_cases(device):
    """(name, op, args, exception, regex). Shapes N=3, K=2, w=4, m=2."""
    f64 = dict(dtype=torch.float64, device=device)
    J, s1, c = torch.randn(3, 2, 4, **f64), torch.randn(3, 4, **f64), torch.randn(2, 3, 4, **f64)
    gacc, gJa = torch.randn(2, 3, 2, **f64), torch.randn(3, 2, 4, **f64)
    cases = []
    for name, op, pre in (
        ("jet_layer", lambda J, s1, c: ops.jet_layer(J, s1, c, True), ()),
        ("jet_layer_", lambda J, s1, c: ops.jet_layer_(J, s1, c), ()),
        ("jet_layer_backward", lambda gJa, gacc, J, s1, c: ops.jet_layer_backward(gJa, gacc, J, s1, c), (gJa, gacc)),
    ):
        cases += [
            (f"{name}: J 2-D", op, pre + (J[0], s1, c), ValueError, r"J must be \(N, K, w\)"),
            (f"{name}: J 4-D", op, pre + (J[None], s1, c), ValueError, "J must be"),
            (f"{name}: s1 wrong w", op, pre + (J, torch.randn(3, 5, **f64), c), ValueError, "s1 must be"),
            (f"{name}: s1 wrong N", op, pre + (J, torch.randn(2, 4, **f64), c), ValueError, "s1 must be"),
            (f"{name}: s1 3-D", op, pre + (J, s1[None], c), ValueError, "s1 must be"),
            (f"{name}: c wrong N", op, pre + (J, s1, torch.randn(2, 4, 4, **f64)), ValueError, "c must be"),
            (f"{name}: c wrong w", op, pre + (J, s1, torch.randn(2, 3, 3, **f64)), ValueError, "c must be"),
            (f"{name}: c 2-D", op, pre + (J, s1, c[0]), ValueError, "c must be"),
            (f"{name}: J int64", op, pre + (J.long(), s1.long(), c.long()), TypeError, "float32 or float64"),
            (f"{name}: J float16", op, pre + (J.half(), s1.half(), c.half()), TypeError, "float32 or float64"),
            (f"{name}: s1 float32", op, pre + (J, s1.float(), c), TypeError, "dtypes differ"),
            (f"{name}: c bool", op, pre + (J, s1, c > 0), TypeError, "float32 or float64"),
            (f"{name}: J complex", op, pre + (J.cdouble(), s1, c), TypeError, "float32 or float64"),
        ]
    bwd = cases[-1][1]
    cases += [
        ("jet_layer_backward: gacc wrong shape", bwd, (gJa, gacc[:, :, :1], J, s1, c), ValueError, "gacc"),
        ("jet_layer_backward: gacc 2-D", bwd, (None, gacc[0], J, s1, c), ValueError, "gacc"),
        ("jet_layer_backward: gJa wrong shape", bwd, (gJa[:, :1], gacc, J, s1, c), ValueError, "gJa"),
    ]
    return cases


def _bad_dtype_grad_cases(device):
    """(name, args of jet_layer_backward): a gradient of another dtype than J, s1, c."""
    f64 = dict(dtype=torch.float64, device=device)
    J, s1, c = torch.randn(3, 2, 4, **f64), torch.randn(3, 4, **f64), torch.randn(2, 3, 4, **f64)
    gacc, gJa = torch.randn(2, 3, 2, **f64), torch.randn(3, 2, 4, **f64)
    return {
        "gacc float32": (gJa, gacc.float(), J, s1, c),
        "gacc int64": (None, gacc.long(), J, s1, c),
        "gJa float32": (gJa.float(), gacc, J, s1, c),
        "gJa int64": (gJa.long(), gacc, J, s1, c),
    }


def _fake(mode, args):
    return tuple(None if a is None else mode.from_tensor(a) for a in args)


def test_bad_arguments(device):
    """TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE -> TypeError, with messages naming the
    argument; the fake kernels (_fake_kernels.py) refuse the same arguments with the same exception."""
    for name, op, args, exc, regex in _bad_cases(device):
        with pytest.raises(exc, match=regex):
            op(*args)
        with FakeTensorMode() as mode:
            fargs = _fake(mode, args)
            with pytest.raises(exc, match=regex):
                op(*fargs)


@pytest.mark.parametrize("kernel", ["real", "fake"])
def test_bad_gradient_dtypes(device, kernel):
    """jet_layer_backward checks the dtype of J, s1 and c with TORCH_CHECK_TYPE (TypeError),
    but not that of the incoming gradients gacc / gJa: a float32 or int64 gradient with float64
    J must be refused the same way (TypeError), not reach the kernel's data_ptr<double>() (an
    internal RuntimeError "expected scalar type Double but found Float"), and the fake kernel
    must refuse it too instead of tracing it."""
    wrong = []
    for case, args in _bad_dtype_grad_cases(device).items():
        with FakeTensorMode() if kernel == "fake" else contextlib.nullcontext() as mode:
            if mode is not None:
                args = _fake(mode, args)
            try:
                ops.jet_layer_backward(*args)
                wrong.append(f"{case}: accepted")
            except TypeError:
                pass
            except Exception as e:  # noqa: BLE001 -- the point is which exception
                wrong.append(f"{case}: {type(e).__name__}: {e}")
    assert not wrong, wrong


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_cuda():
    f64 = dict(dtype=torch.float64)
    J, s1, c = torch.randn(3, 2, 4, **f64), torch.randn(3, 4, **f64), torch.randn(2, 3, 4, **f64)
    gacc = torch.randn(2, 3, 2, **f64)
    with pytest.raises(ValueError, match="devices differ"):
        ops.jet_layer(J.cuda(), s1, c.cuda(), True)
    with pytest.raises(ValueError, match="devices differ"):
        ops.jet_layer_(J.cuda(), s1.cuda(), c)
    with pytest.raises(ValueError, match="devices differ"):
        ops.jet_layer_backward(None, gacc.cuda(), J.cuda(), s1, c.cuda())
    # the incoming gradients on another device than J: must be refused, not read
    with pytest.raises(ValueError):
        ops.jet_layer_backward(None, gacc, J.cuda(), s1.cuda(), c.cuda())
    with pytest.raises(ValueError):
        ops.jet_layer_backward(torch.randn(3, 2, 4, **f64), gacc.cuda(), J.cuda(), s1.cuda(), c.cuda())


# ---- widths and sizes that make every CUDA loop iterate (issue 17) ----------------------------
#
# Widths {1, 31, 33, 100} (tests/_helpers.py WIDE_WIDTHS), m = 3 outputs, K = 3 directions, and on
# CUDA enough points that the grid-stride loops of the forward kernel (rows N*K, 8 warps of 32/G
# rows per block) and of the backward kernel (N*w threads) run a second, ragged pass over the
# capped grid (32 blocks per SM, csrc/cuda/engine_ops.cu). On the CPU the same widths with several
# parallel grains (16384 / (K w) points each). Tolerance: the w-term sums of acc carry up to
# (w + 2) eps S of rounding on each side, so 2.2 (w + 2) eps S (S: sum of |terms|) -- FACTOR's
# 50 eps S assumed w <= 16; the backward's sums have K = 3 or m = 3 terms, within FACTOR.

from _helpers import THREADS_PER_BLOCK, WARPS_PER_BLOCK, WIDE_WIDTHS, beyond_one_pass, grid_pass, lanes_per_row  # noqa: E402

WIDE_K, WIDE_M = 3, 3


def _wide_N(device, w, K=WIDE_K):
    if torch.device(device).type == "cuda":
        fwd_rows = grid_pass(device, WARPS_PER_BLOCK * (32 // lanes_per_row(w)))
        bwd_items = grid_pass(device, THREADS_PER_BLOCK)
        return max(beyond_one_pass(fwd_rows, K), beyond_one_pass(bwd_items, w))
    return 3 * max(1, 16384 // (K * w)) + 7


def _assert_wide_acc(acc, racc, scale, dtype, w, what):
    err = (acc - racc).abs()
    bound = max(FACTOR, 2.2 * (w + 2)) * torch.finfo(dtype).eps * scale
    assert torch.isfinite(acc).all(), what
    assert (err <= bound).all(), f"{what}: max err/bound {(err / bound.clamp_min(1e-300)).max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("w", WIDE_WIDTHS)
def test_wide_forward_inplace_backward(device, dtype, w):
    N = _wide_N(device, w)
    if torch.device(device).type == "cuda":  # every loop has a second pass on this GPU
        assert N * WIDE_K > grid_pass(device, WARPS_PER_BLOCK * (32 // lanes_per_row(w)))
        assert N * w > grid_pass(device, THREADS_PER_BLOCK)
    J, s1, c = _args(device, dtype, N=N, K=WIDE_K, w=w, m=WIDE_M, seed=w)
    rJa, racc = reference.jet_layer(J, s1, c, True)
    scale = _acc_scale(J, s1, c)
    # forward, out of place (with and without Ja)
    Ja, acc = ops.jet_layer(J, s1, c, True)
    assert torch.equal(Ja, rJa), "Ja = s1 * J: one correctly rounded product per element"
    _assert_wide_acc(acc, racc, scale, dtype, w, "acc")
    _, acc_nj = ops.jet_layer(J, s1, c, False)
    assert torch.equal(acc_nj, acc)
    # in place: the same numbers, J overwritten
    J2 = J.clone()
    acc2 = ops.jet_layer_(J2, s1, c)
    assert torch.equal(acc2, acc) and torch.equal(J2, Ja)
    # backward, with and without gJa
    g = torch.Generator().manual_seed(100 + w)
    gacc = torch.randn(WIDE_M, N, WIDE_K, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    gJa = torch.randn(N, WIDE_K, w, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    for gj in (gJa, None):
        out = ops.jet_layer_backward(gj, gacc, J, s1, c)
        ref = reference.jet_layer_backward(gj, gacc, J, s1, c)
        for a, b, s, name in zip(out, ref, _bwd_scales(gj, gacc, J, s1, c), ("dJ", "ds1", "dc")):
            _assert_sum_close(a, b, s, dtype, f"{name} (gJa {'given' if gj is not None else 'None'})")


@pytest.mark.parametrize("m", [5, 6])
def test_backward_many_outputs(device, m):
    """m > 4 outputs: the CUDA backward's generic path (m <= 4 keeps c in registers)."""
    dtype = torch.float64
    J, s1, c = _args(device, dtype, N=7, K=3, w=33, m=m, seed=m)
    gacc = torch.randn(m, 7, 3, dtype=dtype, device=device)
    gJa = torch.randn_like(J)
    out = ops.jet_layer_backward(gJa, gacc, J, s1, c)
    ref = reference.jet_layer_backward(gJa, gacc, J, s1, c)
    for a, b, s, name in zip(out, ref, _bwd_scales(gJa, gacc, J, s1, c), ("dJ", "ds1", "dc")):
        _assert_sum_close(a, b, s, dtype, name)


# ---- the in-place op and memory shared with J (issue 17) ---------------------------------------
#
# jet_layer_ overwrites J while it still reads s1 and c (row by row; the CUDA kernel declares them
# __restrict__): a contiguous s1 or c that shares memory with J is refused with a ValueError, by
# the compiled op, the reference backend and the fake kernel alike, before anything is written. A
# non-contiguous one is copied by the op first, so it is accepted and gives the right numbers.


def _aliased(device, what, how):
    """(J, s1, c) with `what` ("s1" or "c") sharing memory with J: "partial" overlaps J's tail,
    "full" is J's own memory (K = 1, m = 1: s1 / c are views of J)."""
    N, K, w, m = (4, 1, 5, 1) if how == "full" else (4, 3, 5, 2)
    g = torch.Generator().manual_seed(7)
    buf = torch.randn(N * K * w + m * N * w, generator=g, dtype=torch.float64).to(device)
    J = buf[: N * K * w].view(N, K, w)
    other = torch.randn(m * N * w + N * w, generator=g, dtype=torch.float64).to(device)
    s1 = other[: N * w].view(N, w)
    c = other[N * w :].view(m, N, w)
    if how == "full":
        alias = J.view(N, w) if what == "s1" else J.view(1, N, w)
    else:
        start = N * K * w - 3  # three elements inside J, the rest after it
        alias = buf[start : start + (N * w if what == "s1" else m * N * w)]
        alias = alias.view(N, w) if what == "s1" else alias.view(m, N, w)
    return (J, alias, c) if what == "s1" else (J, s1, alias)


@pytest.mark.parametrize("what", ["s1", "c"])
@pytest.mark.parametrize("how", ["partial", "full"])
@pytest.mark.parametrize("kernel", ["compiled", "reference", "fake"])
def test_inplace_refuses_inputs_sharing_memory_with_J(device, what, how, kernel):
    J, s1, c = _aliased(device, what, how)
    J0 = J.clone()
    match = f"{what} shares memory with J.*{what}.clone\\(\\)"
    if kernel == "compiled":
        with pytest.raises(ValueError, match=match):
            ops.jet_layer_(J, s1, c)
    elif kernel == "reference":
        with pytest.raises(ValueError, match=match):
            thd_ops._ref_jet_layer_(J, s1, c)  # the reference backend's kernel
    else:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fbuf = mode.from_tensor(J._base if J._base is not None else J)
            # rebuild the same aliasing on fake tensors (views of one fake storage)
            fJ = fbuf.as_strided(J.shape, J.stride(), J.storage_offset())
            alias = s1 if what == "s1" else c
            fA = fbuf.as_strided(alias.shape, alias.stride(), alias.storage_offset())
            fo = mode.from_tensor(c if what == "s1" else s1)
            args = (fJ, fA, fo) if what == "s1" else (fJ, fo, fA)
            with pytest.raises(ValueError, match=match):
                ops.jet_layer_(*args)
    assert torch.equal(J, J0), "nothing may be written before the refusal"


def test_inplace_accepts_disjoint_views_and_non_contiguous_aliases(device):
    """Views of one buffer that do not overlap J are fine; so is a non-contiguous s1 that reads
    J's own memory (the op copies it before writing J)."""
    N, K, w, m = 4, 3, 5, 2
    buf = torch.randn(N * K * w + N * w + m * N * w, dtype=torch.float64, device=device)
    J = buf[: N * K * w].view(N, K, w)
    s1 = buf[N * K * w : N * K * w + N * w].view(N, w)
    c = buf[N * K * w + N * w :].view(m, N, w)
    rJa, racc = reference.jet_layer(J.clone(), s1.clone(), c.clone(), True)
    scale = _acc_scale(J, s1, c)
    acc = ops.jet_layer_(J, s1, c)
    assert torch.equal(J, rJa)
    _assert_sum_close(acc, racc, scale, torch.float64, "acc (disjoint views)")
    J = torch.randn(N, K, w, dtype=torch.float64, device=device)
    s1_alias = J[:, 1, :]  # (N, w) view of J with row stride K*w: not contiguous -> copied
    assert not s1_alias.is_contiguous()
    c = torch.randn(m, N, w, dtype=torch.float64, device=device)
    rJa, racc = reference.jet_layer(J.clone(), s1_alias.clone(), c, True)
    scale = _acc_scale(J, s1_alias, c)
    acc = ops.jet_layer_(J, s1_alias, c)
    assert torch.equal(J, rJa), "J = (copy of J[:, 1]) * J"
    _assert_sum_close(acc, racc, scale, torch.float64, "acc (non-contiguous alias)")


# ---- a second, compact set (was tests/test_layer_op.py) ------------------------------------------
# Tolerance: the op sums w products per (i, n, k) in a different order than einsum; 1e-13 relative
# (float64) / 1e-5 (float32) to the largest entry covers that and catches any wrong term.


def _simple_args(device, dtype, N=3, K=4, w=5, m=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
    return mk(N, K, w), mk(N, w), mk(m, N, w)


def _tol(dtype):
    return 1e-13 if dtype == torch.float64 else 1e-5


def _close(a, b, dtype):
    assert ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() <= _tol(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("need_ja", [True, False])
def test_forward_matches_reference(device, dtype, m, need_ja):
    J, s1, c = _simple_args(device, dtype, m=m)
    Ja, acc = ops.jet_layer(J, s1, c, need_ja)
    rJa, racc = reference.jet_layer(J, s1, c, need_ja)
    _close(acc, racc, dtype)
    assert acc.shape == (m, 3, 4)
    if need_ja:
        _close(Ja, rJa, dtype)
    else:
        assert Ja.numel() == 0


def test_forward_non_contiguous(device):
    J, s1, c = _simple_args(device, torch.float64, N=4, K=3, w=6)
    Jt = J.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    s1t = s1.t().contiguous().t()
    Ja, acc = ops.jet_layer(Jt, s1t, c[:, :, :], True)
    rJa, racc = reference.jet_layer(J, s1, c, True)
    _close(acc, racc, torch.float64)
    _close(Ja, rJa, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inplace_variant(device, dtype):
    J, s1, c = _simple_args(device, dtype, m=2)
    rJa, racc = reference.jet_layer(J, s1, c, True)
    Jw = J.clone()
    acc = ops.jet_layer_(Jw, s1, c)
    _close(acc, racc, dtype)
    _close(Jw, rJa, dtype)  # J was overwritten with s1 * J


@pytest.mark.parametrize("with_gja", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_matches_reference(device, dtype, with_gja):
    J, s1, c = _simple_args(device, dtype, m=2)
    g = torch.Generator().manual_seed(9)
    gJa = torch.randn(J.shape, generator=g, dtype=torch.float64).to(device, dtype) if with_gja else None
    gacc = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).to(device, dtype)
    got = ops.jet_layer_backward(gJa, gacc, J, s1, c)
    ref = reference.jet_layer_backward(gJa, gacc, J, s1, c)
    for a, b in zip(got, ref):
        _close(a, b, dtype)


def test_gradcheck_and_gradgradcheck(device):
    J, s1, c = (t.requires_grad_() for t in _simple_args(device, torch.float64, N=2, K=3, w=4, m=2))
    f = lambda J, s1, c: ops.jet_layer(J, s1, c, True)  # noqa: E731
    assert torch.autograd.gradcheck(f, (J, s1, c))
    assert torch.autograd.gradgradcheck(f, (J, s1, c))
    f_last = lambda J, s1, c: ops.jet_layer(J, s1, c, False)[1]  # noqa: E731
    assert torch.autograd.gradcheck(f_last, (J, s1, c))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(device, dtype):
    J, s1, c = _simple_args(device, dtype)
    torch.library.opcheck(ops.jet_layer, (J, s1, c, True))
    torch.library.opcheck(ops.jet_layer, (J, s1, c, False))
    gacc = torch.randn(2, 3, 4, dtype=dtype, device=device)
    torch.library.opcheck(ops.jet_layer_backward, (torch.randn_like(J), gacc, J, s1, c))
    torch.library.opcheck(ops.jet_layer_backward, (None, gacc, J, s1, c))
    torch.library.opcheck(ops.jet_layer_, (J.clone(), s1, c), test_utils=("test_schema", "test_faketensor"))


def test_bad_arguments_basic(device):
    J, s1, c = _simple_args(device, torch.float64)
    with pytest.raises(ValueError, match="J must be"):
        ops.jet_layer(J[0], s1, c, True)
    with pytest.raises(ValueError, match="s1 must be"):
        ops.jet_layer(J, s1[:, :2], c, True)
    with pytest.raises(ValueError, match="c must be"):
        ops.jet_layer(J, s1, c[:, :2], True)
    with pytest.raises(TypeError, match="dtype|float"):
        ops.jet_layer(J, s1.float(), c, True)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.jet_layer(J.long(), s1.long(), c.long(), True)
    with pytest.raises(ValueError, match="gacc"):
        ops.jet_layer_backward(None, torch.zeros(1, 1, 1, dtype=torch.float64, device=device), J, s1, c)
