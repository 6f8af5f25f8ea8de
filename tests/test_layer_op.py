"""The engine's per-layer op jet_layer (and jet_layer_, jet_layer_backward) against the
pure-PyTorch formulas of reference.py, autograd checks and torch.library.opcheck.

Tolerance: the op sums w products per (i, n, k) in a different order than einsum; 1e-13 relative
(float64) / 1e-5 (float32) to the largest entry covers that and catches any wrong term.
"""

from __future__ import annotations

import pytest
import torch

from torchhessdiag import reference

ops = torch.ops.torchhessdiag


def _args(device, dtype, N=3, K=4, w=5, m=2, seed=0):
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
    J, s1, c = _args(device, dtype, m=m)
    Ja, acc = ops.jet_layer(J, s1, c, need_ja)
    rJa, racc = reference.jet_layer(J, s1, c, need_ja)
    _close(acc, racc, dtype)
    assert acc.shape == (m, 3, 4)
    if need_ja:
        _close(Ja, rJa, dtype)
    else:
        assert Ja.numel() == 0


def test_forward_non_contiguous(device):
    J, s1, c = _args(device, torch.float64, N=4, K=3, w=6)
    Jt = J.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    s1t = s1.t().contiguous().t()
    Ja, acc = ops.jet_layer(Jt, s1t, c[:, :, :], True)
    rJa, racc = reference.jet_layer(J, s1, c, True)
    _close(acc, racc, torch.float64)
    _close(Ja, rJa, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inplace_variant(device, dtype):
    J, s1, c = _args(device, dtype, m=2)
    rJa, racc = reference.jet_layer(J, s1, c, True)
    Jw = J.clone()
    acc = ops.jet_layer_(Jw, s1, c)
    _close(acc, racc, dtype)
    _close(Jw, rJa, dtype)  # J was overwritten with s1 * J


@pytest.mark.parametrize("with_gja", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_matches_reference(device, dtype, with_gja):
    J, s1, c = _args(device, dtype, m=2)
    g = torch.Generator().manual_seed(9)
    gJa = torch.randn(J.shape, generator=g, dtype=torch.float64).to(device, dtype) if with_gja else None
    gacc = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).to(device, dtype)
    got = ops.jet_layer_backward(gJa, gacc, J, s1, c)
    ref = reference.jet_layer_backward(gJa, gacc, J, s1, c)
    for a, b in zip(got, ref):
        _close(a, b, dtype)


def test_gradcheck_and_gradgradcheck(device):
    J, s1, c = (t.requires_grad_() for t in _args(device, torch.float64, N=2, K=3, w=4, m=2))
    f = lambda J, s1, c: ops.jet_layer(J, s1, c, True)  # noqa: E731
    assert torch.autograd.gradcheck(f, (J, s1, c))
    assert torch.autograd.gradgradcheck(f, (J, s1, c))
    f_last = lambda J, s1, c: ops.jet_layer(J, s1, c, False)[1]  # noqa: E731
    assert torch.autograd.gradcheck(f_last, (J, s1, c))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(device, dtype):
    J, s1, c = _args(device, dtype)
    torch.library.opcheck(ops.jet_layer, (J, s1, c, True))
    torch.library.opcheck(ops.jet_layer, (J, s1, c, False))
    gacc = torch.randn(2, 3, 4, dtype=dtype, device=device)
    torch.library.opcheck(ops.jet_layer_backward, (torch.randn_like(J), gacc, J, s1, c))
    torch.library.opcheck(ops.jet_layer_backward, (None, gacc, J, s1, c))
    torch.library.opcheck(ops.jet_layer_, (J.clone(), s1, c), test_utils=("test_schema", "test_faketensor"))


def test_bad_arguments(device):
    J, s1, c = _args(device, torch.float64)
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
