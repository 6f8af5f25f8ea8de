"""The Taylor-jet activation op taylor_act (Faa di Bruno, csrc/taylor.h) and its backward.

Checked three ways:
* against the chain rule itself, independently of our formulas: sigma(h(t)) for a polynomial path
  h(t) = h0 + h1 t + h2 t^2/2 + ..., differentiated n times in t by nested torch.autograd.grad of
  torch's own activation (float64; 1e-12 relative to the largest entry -- the two sides evaluate
  the same polynomial in a different order, a wrong coefficient is O(1));
* the compiled kernels against the torch-ops mirror reference.taylor_act / taylor_act_backward
  (float64 1e-13, float32 1e-5 of the largest entry: same products, different summation order);
* gradcheck / gradgradcheck and torch.library.opcheck.
"""

from __future__ import annotations

import math

import pytest
import torch

from torchhessdiag import activations, ops as thd_ops, reference

ops = torch.ops.torchhessdiag


def _rand(*shape, seed=0, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _args(n, device, dtype, N=3, K=4, w=5, seed=0):
    return _rand(n, N, w, seed=seed, device=device, dtype=dtype), _rand(
        n, N, K, w, seed=seed + 1, device=device, dtype=dtype
    )


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "silu", "gelu", "softplus", "sin", "exp"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_faa_di_bruno_against_nested_autograd(name, n):
    spec = activations.make_spec(name)
    N, K, w = 2, 3, 4
    h0 = _rand(N, w, seed=1)
    H = _rand(n, N, K, w, seed=2)
    D = thd_ops.activation_derivatives(h0, spec, orders=list(range(1, n + 1)))
    Y = ops.taylor_act(D, H)
    expected = _path_derivatives(spec, h0, H, n)
    assert _rel(Y, expected) <= 1e-12, name


def _path_derivatives(spec, h0, H, n):
    """d^k/dt^k sigma(h(t)) at t = 0, k = 1..n, elementwise, by nested forward mode (torch.func)."""
    f = activations.torch_function(spec)

    def along(t):
        return f(h0.unsqueeze(1) + sum(H[k - 1] * t**k / math.factorial(k) for k in range(1, n + 1)))

    out = []
    g = along
    for _ in range(n):
        g = _derivative_of(g)
        out.append(g(torch.zeros((), dtype=torch.float64)))
    return torch.stack(out)


def _derivative_of(g):
    def dg(t):
        return torch.func.jvp(g, (t,), (torch.ones((), dtype=t.dtype),))[1]

    return dg


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_kernel_matches_reference(device, dtype, n):
    D, H = _args(n, device, dtype)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    assert _rel(ops.taylor_act(D, H), reference.taylor_act(D, H)) <= tol
    gY = _rand(*H.shape, seed=7, device=device, dtype=dtype)
    dD, dH = ops.taylor_act_backward(gY, D, H)
    rD, rH = reference.taylor_act_backward(gY, D, H)
    assert _rel(dD, rD) <= tol and _rel(dH, rH) <= tol


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_reference_backward_is_the_vjp(n):
    # the hand-written backward (both the kernel's and the mirror's) against autograd of the
    # mirror's forward: an independent check of every partial derivative in csrc/taylor.h
    D, H = _args(n, "cpu", torch.float64)
    D.requires_grad_(True)
    H.requires_grad_(True)
    gY = _rand(*H.shape, seed=5)
    aD, aH = torch.autograd.grad(reference.taylor_act(D, H), (D, H), gY)
    rD, rH = reference.taylor_act_backward(gY, D.detach(), H.detach())
    assert _rel(rD, aD) <= 1e-13 and _rel(rH, aH) <= 1e-13


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_gradcheck(n):
    D, H = _args(n, "cpu", torch.float64, N=2, K=2, w=3)
    D.requires_grad_(True)
    H.requires_grad_(True)
    assert torch.autograd.gradcheck(ops.taylor_act, (D, H))
    assert torch.autograd.gradgradcheck(ops.taylor_act, (D, H))


@pytest.mark.parametrize("n", [1, 4])
def test_opcheck(device, n):
    D, H = _args(n, device, torch.float64, N=2, K=3, w=4)
    torch.library.opcheck(ops.taylor_act, (D, H))
    torch.library.opcheck(ops.taylor_act, (D.requires_grad_(True), H.requires_grad_(True)))
    gY = _rand(*H.shape, seed=3, device=device)
    torch.library.opcheck(ops.taylor_act_backward, (gY, D.detach(), H.detach()))


def test_empty(device):
    D, H = _args(2, device, torch.float64, N=0)
    assert ops.taylor_act(D, H).shape == (2, 0, 4, 5)
    dD, dH = ops.taylor_act_backward(torch.zeros_like(H), D, H)
    assert dD.shape == D.shape and dH.shape == H.shape


def test_non_contiguous(device):
    D, H = _args(3, device, torch.float64, N=4, K=3, w=6)
    Ht = H.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert _rel(ops.taylor_act(D[:, ::1], Ht), reference.taylor_act(D, H)) <= 1e-13


def _bad_cases(device):
    D, H = _args(2, device, torch.float64)
    return [
        ((D, H[0]), ValueError, r"H must be \(n, N, K, w\)"),
        ((D[:1], H), ValueError, "D must be"),
        ((D[:, :2], H), ValueError, "D must be"),
        ((torch.cat([D] * 3), torch.cat([H] * 3)), ValueError, "must be 1..4"),
        ((D.float(), H), TypeError, "dtypes differ"),
        ((D.long(), H.long()), TypeError, "float32 or float64"),
        ((D.half(), H.half()), TypeError, "float32 or float64"),
    ]


def test_bad_arguments(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    for args, exc, regex in _bad_cases(device):
        with pytest.raises(exc, match=regex):
            ops.taylor_act(*args)
        with FakeTensorMode() as mode:
            fargs = tuple(mode.from_tensor(a) for a in args)
            with pytest.raises(exc, match=regex):
                ops.taylor_act(*fargs)
    D, H = _args(2, device, torch.float64)
    with pytest.raises(ValueError, match="gY must have H's shape"):
        ops.taylor_act_backward(H[:, :1], D, H)
    with pytest.raises(TypeError, match="gY has dtype"):
        ops.taylor_act_backward(H.float(), D, H)


# ---- widths and sizes that make every CUDA loop iterate (issue 17) ----------------------------
#
# Widths {1, 31, 33, 100} and K = 3 directions; on CUDA enough points that the grid-stride loops
# of the forward kernel (N*K*w threads, with the (p, k, j) index advanced by carries) and of the
# backward kernel (N*w threads) run a second, ragged pass over the capped grid (32 blocks of 256
# threads per SM); on the CPU several parallel grains (16384 / (n K w) points). Same tolerances as
# test_kernel_matches_reference; the indices must also be exact: a chunked call (each chunk one
# grid pass or less) gives bit-identical results.

from _helpers import THREADS_PER_BLOCK, WIDE_WIDTHS, beyond_one_pass, grid_pass  # noqa: E402


def _wide_N(device, n, K, w):
    if torch.device(device).type == "cuda":
        return beyond_one_pass(grid_pass(device, THREADS_PER_BLOCK), w)  # N*w, so N*K*w too
    return 3 * max(1, 16384 // (n * K * w)) + 7


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("w", WIDE_WIDTHS)
@pytest.mark.parametrize("n", [1, 2, 4])
def test_wide_shapes(device, dtype, w, n):
    K = 3
    N = _wide_N(device, n, K, w)
    if torch.device(device).type == "cuda":
        assert N * w > grid_pass(device, THREADS_PER_BLOCK)
    D, H = _args(n, device, dtype, N=N, K=K, w=w, seed=w)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    Y = ops.taylor_act(D, H)
    assert _rel(Y, reference.taylor_act(D, H)) <= tol
    gY = _rand(*H.shape, seed=50 + w, device=device, dtype=dtype)
    dD, dH = ops.taylor_act_backward(gY, D, H)
    rD, rH = reference.taylor_act_backward(gY, D, H)
    assert _rel(dD, rD) <= tol and _rel(dH, rH) <= tol
    # exact indexing: the same op over chunks of points, each within one grid pass
    step = max(1, N // 5)
    for p0 in range(0, N, step):
        sl = slice(p0, min(N, p0 + step))
        assert torch.equal(ops.taylor_act(D[:, sl], H[:, sl]), Y[:, sl])
        cD, cH = ops.taylor_act_backward(gY[:, sl], D[:, sl], H[:, sl])
        assert torch.equal(cD, dD[:, sl]) and torch.equal(cH, dH[:, sl])
