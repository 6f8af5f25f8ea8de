"""The one-pass collapsed second-order jet ops (torchhessdiag/jet2.py, csrc/jet2_ops.cpp).

* The C++ kernels (forward and backward, every activation of the table, float32 and float64,
  widths that are and are not a multiple of the SIMD width, K = 1..3, weights or none) against
  the torch formulas of jet2.py, which are checked in turn against torch.autograd.
* Autograd through jet2.mul / jet2.act: gradcheck, and gradgradcheck (the recorded backward).
* opcheck of the four ops; bad input names the argument.
* The traced path uses them on gated / residual models, and every result -- Laplacian, a weighted
  operator, training gradients -- still matches torch.func / nested autograd in float64; a
  learned operator coefficient keeps its gradient (the ops decline weights that require grad).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchhessdiag as thd
from torchhessdiag import jet2, ops
from torchhessdiag.activations import NAMES, make_spec
from torchhessdiag.bench import models as M

pytestmark = pytest.mark.skipif(not ops.COMPILED, reason="the jet2 ops have compiled CPU kernels only")
_ops = torch.ops.torchhessdiag

# float64: the kernels and the formulas do the same arithmetic in a different order (the sum over
# the directions in a register vs a torch reduction, SIMD vs torch's vectorised transcendental
# functions): a few ulp per element, far below 1e-12 relative; a formula error is O(1).
RTOL64 = 1e-12
SMOOTH = [n for n in NAMES if n not in ("identity", "relu", "leaky_relu")]


def _jet(N, K, S, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *sh: torch.randn(*sh, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return r(N, *S), r(N, K, *S), r(N, *S)


def _close(got, want, rtol):
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        scale = b.abs().max().clamp_min(1e-300)
        assert float((a - b).abs().max() / scale) <= rtol


def _spec_args(name):
    spec = make_spec(name)
    return spec.name, spec.a, spec.b


@pytest.mark.parametrize("S", [(1,), (7,), (16,), (33,), (3, 5)])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_mul_kernels_match_formulas(S, K, weighted):
    a = _jet(37, K, S, torch.float64, 1)
    b = _jet(37, K, S, torch.float64, 2)
    w = torch.tensor([0.5, -1.25, 2.0][:K], dtype=torch.float64) if weighted else None
    _close(_ops.jet2_mul(*a, *b, w), jet2.mul_formulas(*a, *b, w), RTOL64)
    g = _jet(37, K, S, torch.float64, 3)
    for present in ([True] * 3, [True, False, True], [False, True, False]):
        gs = [t if p else None for t, p in zip(g, present)]
        _close(_ops.jet2_mul_backward(*gs, *a, *b, w), jet2.mul_backward_formulas(*gs, *a, *b, w), RTOL64)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("weighted", [False, True])
def test_act_kernels_match_formulas(name, weighted):
    h = _jet(29, 2, (19,), torch.float64, 4)
    w = torch.tensor([1.5, -0.5], dtype=torch.float64) if weighted else None
    args = _spec_args(name)
    _close(_ops.jet2_act(*h, *args, w), jet2.act_formulas(*h, *args, w), RTOL64)
    g = _jet(29, 2, (19,), torch.float64, 5)
    for present in ([True] * 3, [False, True, True], [True, False, False]):
        gs = [t if p else None for t, p in zip(g, present)]
        _close(_ops.jet2_act_backward(*gs, *h, *args, w), jet2.act_backward_formulas(*gs, *h, *args, w), RTOL64)


@pytest.mark.parametrize("name", ["tanh", "silu", "gelu"])
def test_float32_kernels_match_float64_formulas(name):
    """float32 within float32 rounding of the float64 truth (the same as the torch formulas in float32)."""
    h64, a64 = _jet(64, 2, (40,), torch.float64, 6), _jet(64, 2, (40,), torch.float64, 7)
    h32, a32 = [t.float() for t in h64], [t.float() for t in a64]
    args = _spec_args(name)
    want = jet2.act_formulas(*h64, *args, None)
    ours = _ops.jet2_act(*h32, *args, None)
    torchs = jet2.act_formulas(*h32, *args, None)
    for o, t, w in zip(ours, torchs, want):
        e_ours = float((o.double() - w).abs().max() / w.abs().max())
        e_torch = float((t.double() - w).abs().max() / w.abs().max())
        assert e_ours <= max(4 * e_torch, 1e-6)
    want = jet2.mul_formulas(*h64, *a64, None)
    for o, w in zip(_ops.jet2_mul(*h32, *a32, None), want):
        assert float((o.double() - w).abs().max() / w.abs().max()) <= 1e-6


def test_formulas_are_the_derivatives_of_the_jet():
    """The torch formulas against torch.autograd: propagate the 2-jet of h(x) = x W (a point per
    row, K = 3 axes) through sigma and through a product, and compare with nested autograd."""
    torch.manual_seed(0)
    N, d, w = 5, 3, 4
    W1, W2 = torch.randn(d, w, dtype=torch.float64), torch.randn(d, w, dtype=torch.float64)
    x = torch.randn(N, d, dtype=torch.float64)

    def f(xx):
        return torch.tanh(xx @ W1) * torch.sin(xx @ W2)

    y0, y1, sy = jet2.mul_formulas(*jet2.act_formulas(*_linear_jet(x, W1), "tanh", 0.0, 0.0, None),
                                   *jet2.act_formulas(*_linear_jet(x, W2), "sin", 1.0, 0.0, None), None)
    J = torch.autograd.functional.jacobian(lambda xx: f(xx).sum(0), x)  # (w, N, d)
    H = torch.stack([torch.autograd.functional.hessian(lambda xi: f(xi.unsqueeze(0))[0, j], x[i])
                     for i in range(N) for j in range(w)]).reshape(N, w, d, d)
    torch.testing.assert_close(y0, f(x), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(y1, J.permute(1, 2, 0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sy, H.diagonal(dim1=-2, dim2=-1).sum(-1), rtol=1e-12, atol=1e-12)


def _linear_jet(x, W):
    N = x.shape[0]
    return x @ W, W.unsqueeze(0).expand(N, -1, -1).contiguous(), torch.zeros(N, W.shape[1], dtype=x.dtype)


def test_autograd_gradcheck_and_gradgradcheck():
    a = [t.requires_grad_() for t in _jet(4, 2, (5,), torch.float64, 8)]
    b = [t.requires_grad_() for t in _jet(4, 2, (5,), torch.float64, 9)]
    w = torch.tensor([0.75, -1.5], dtype=torch.float64)
    spec = make_spec("softplus", beta=1.5)

    def fm(*t):
        return jet2.mul(*t, w)

    def fa(*t):
        return jet2.act(*t, spec, w)

    assert fm(*a, *b) is not None and fa(*a) is not None  # the ops apply here
    torch.autograd.gradcheck(fm, (*a, *b))
    torch.autograd.gradgradcheck(fm, (*a, *b))
    torch.autograd.gradcheck(fa, tuple(a))
    torch.autograd.gradgradcheck(fa, tuple(a))


def test_opcheck():
    a, b = _jet(6, 2, (5,), torch.float64, 10), _jet(6, 2, (5,), torch.float64, 11)
    g = _jet(6, 2, (5,), torch.float64, 12)
    w = torch.tensor([2.0, 0.5], dtype=torch.float64)
    torch.library.opcheck(_ops.jet2_mul.default, (*a, *b, w), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(_ops.jet2_mul_backward.default, (*g, *a, *b, None), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(_ops.jet2_act.default, (*a, "gelu", 0.0, 0.0, w), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(_ops.jet2_act_backward.default, (*g, *a, "tanh", 0.0, 0.0, None),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_input_names_the_argument():
    a, b = _jet(6, 2, (5,), torch.float64, 13), _jet(6, 2, (5,), torch.float64, 14)
    with pytest.raises(ValueError, match=r"jet2_mul: a0, a1, sa must be shaped"):
        _ops.jet2_mul(a[0], a[1][:, :, :4], a[2], *b, None)
    with pytest.raises(ValueError, match=r"jet2_mul: a1 and b1 must have one K"):
        _ops.jet2_mul(*a, b[0], torch.zeros(6, 3, 5, dtype=torch.float64), b[2], None)
    with pytest.raises(TypeError, match=r"jet2_mul: the two jets must share one dtype"):
        _ops.jet2_mul(*a, *[t.float() for t in b], None)
    with pytest.raises(ValueError, match=r"jet2_act: weights must be a \(K,\) = \(2,\) tensor"):
        _ops.jet2_act(*a, "tanh", 0.0, 0.0, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"unknown activation 'tanhh'"):
        _ops.jet2_act(*a, "tanhh", 0.0, 0.0, None)
    with pytest.raises(ValueError, match=r"jet2_act_backward: gy1 must have shape"):
        _ops.jet2_act_backward(None, a[0], None, *a, "tanh", 0.0, 0.0, None)
    with pytest.raises(TypeError, match=r"must be float32 or float64"):
        _ops.jet2_act(*[t.to(torch.int64) for t in a], "tanh", 0.0, 0.0, None)


def test_declined_where_the_torch_formulas_must_serve():
    a, b = _jet(6, 2, (5,), torch.float64, 15), _jet(6, 2, (5,), torch.float64, 16)
    assert jet2.mul(*a, *b, None) is not None
    assert jet2.mul(a[0], a[1][0], a[2], *b, None) is None  # a shared (K, *S) coefficient
    assert jet2.mul(a[0], a[1], None, *b, None) is None  # a structurally zero coefficient
    assert jet2.mul(*a, *b, torch.ones(2, dtype=torch.float64, requires_grad=True)) is None
    assert jet2.act(*a, make_spec("relu"), None) is None  # piecewise linear: keep its zeros
    assert jet2.act(*a, make_spec("tanh"), None) is not None


# ---- the traced path ---------------------------------------------------------------------------


def _counting(monkeypatch):
    calls = {"mul": 0, "act": 0}
    real_mul, real_act = jet2._Mul.apply, jet2._Act.apply

    def mul(*t):
        calls["mul"] += 1
        return real_mul(*t)

    def act(*t):
        calls["act"] += 1
        return real_act(*t)

    monkeypatch.setattr(jet2._Mul, "apply", mul)
    monkeypatch.setattr(jet2._Act, "apply", act)
    return calls


def _nested_laplacian(model, x, create_graph=False):
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    return sum(torch.autograd.grad(g[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(x.shape[1]))


@pytest.mark.parametrize("name", ["modified_mlp", "piratenet", "fourier_resnet"])
def test_gated_models_laplacian_and_training_gradients(name, monkeypatch):
    calls = _counting(monkeypatch)
    model = M.build_model(name, 2, 12, 0).double()
    x = torch.randn(23, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lap = thd.laplacian(model, x).reshape(-1)
    assert calls["act"] > 0 and (calls["mul"] > 0 or name == "fourier_resnet")
    ref = M._func_laplacian(model, x)
    assert float((lap.detach() - ref).abs().max() / ref.abs().max()) <= 1e-12
    params = [p for p in model.parameters() if p.requires_grad]
    g_thd = torch.autograd.grad(((thd.laplacian(model, x).reshape(-1) - 1) ** 2).mean(), params, allow_unused=True)
    g_ref = torch.autograd.grad(((_nested_laplacian(model, x) - 1) ** 2).mean(), params, allow_unused=True)
    for p, a, b in zip(params, g_thd, g_ref):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        assert float((a - b).abs().max()) <= 1e-10 * max(1.0, float(b.abs().max()))


def test_weighted_operator_and_learned_coefficient():
    """operator() with coefficients: the collapsed sum is weighted; a coefficient that requires
    grad gets its gradient (the ops decline it, the torch formulas serve)."""
    model = M.build_model("modified_mlp", 2, 10, 1).double()
    x = torch.randn(17, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xx).sum(), xx, create_graph=True)
    uxx = torch.autograd.grad(g[:, 0].sum(), xx, create_graph=True)[0][:, 0]
    uyy = torch.autograd.grad(g[:, 1].sum(), xx, create_graph=True)[0][:, 1]
    got = thd.operator(model, x, {(2, 0): 1.5, (0, 2): -0.7}).reshape(-1)
    want = 1.5 * uxx - 0.7 * uyy
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-12
    c = torch.tensor(-0.7, dtype=torch.float64, requires_grad=True)
    (gc,) = torch.autograd.grad(thd.operator(model, x, {(2, 0): 1.5, (0, 2): c}).sum(), c)
    torch.testing.assert_close(gc, uyy.sum().detach(), rtol=1e-12, atol=0)


def test_float32_model_within_torch_float32_error():
    model = M.build_model("modified_mlp", 3, 16, 2)
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(3))
    truth = M._func_laplacian(model.double(), x.double())
    ours = thd.laplacian(model.float(), x).reshape(-1).double()
    nested = _nested_laplacian(model.float(), x).detach().double()
    e_ours = float((ours - truth).abs().max() / truth.abs().max())
    e_nested = float((nested - truth).abs().max() / truth.abs().max())
    assert e_ours <= max(4 * e_nested, 1e-6)


def test_relu_gated_model_matches_torch_func():
    """ReLU jets keep the torch formulas (structural zeros); a product of two ReLU branches has a
    nonzero Laplacian (2 u' v'), which the path must still get exactly."""

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.u, self.v = nn.Linear(2, 6), nn.Linear(2, 6)
            self.head = nn.Linear(6, 1)

        def forward(self, x):
            return self.head(torch.relu(self.u(x)) * torch.relu(self.v(x)) + torch.tanh(self.u(x)))

    torch.manual_seed(4)
    model = Gate().double()
    x = torch.randn(9, 2, dtype=torch.float64)
    lap = thd.laplacian(model, x).reshape(-1)
    ref = M._func_laplacian(model, x)
    assert float(ref.abs().max()) > 1e-3
    torch.testing.assert_close(lap, ref, rtol=1e-12, atol=1e-12)
