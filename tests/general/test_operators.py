"""biharmonic, partials, operator, divergence and the sampled Laplacian (issue 16).

Oracle: torch.func -- the full derivative tensors of the one-point function up to order 4 by
nested jacrev/jacfwd (vmapped over the points), indexed or contracted here; nothing of
torchhessdiag computes an expected value. float64 results must match to 1e-10 relative to the
largest entry of the expected tensor: the jets and the oracle each carry a few ulps times the
network's conditioning (~1e-15), and the polarization adds at most eps * A(alpha) times the
largest partial of that order (A <= 3 d^2 for the biharmonic, module docstring of
torchhessdiag/operators.py) -- well below 1e-10 for the sizes here.

The sampled Laplacian is checked statistically: over R seeded draws the mean lies within 5
standard errors of the exact Laplacian (the standard error from the variance formula the docs
state, computed from the exact Hessian diagonal), and the empirical variance within 5 standard
errors of that formula (its own standard error from the estimator's fourth moment, enumerated
exactly). A false alarm has probability < 1e-5 per comparison.
"""

from __future__ import annotations

import itertools
import math
import warnings
from fractions import Fraction

import pytest
import torch
from torch import nn

import torchhessdiag as thd
from torchhessdiag import operators as O

from _helpers import devices

F64 = torch.float64


# ---- models ----------------------------------------------------------------------------------------


def mlp(d, m=1, width=16, depth=2, act=nn.Tanh, seed=0, dtype=F64):
    torch.manual_seed(seed)
    layers, w = [], d
    for _ in range(depth):
        layers += [nn.Linear(w, width), act()]
        w = width
    layers.append(nn.Linear(w, m))
    return nn.Sequential(*layers).to(dtype)


class FourierResNet(nn.Module):
    """Random Fourier features, a linear embedding, residual tanh/SiLU blocks, a linear head."""

    def __init__(self, d, m=1, width=16, n_freq=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.register_buffer("B", torch.randn(d, n_freq))
        self.embed = nn.Linear(2 * n_freq, width)
        self.block = nn.Linear(width, width)
        self.head = nn.Linear(width, m)

    def forward(self, x):
        z = 2 * math.pi * x @ self.B
        h = torch.tanh(self.embed(torch.cat([torch.sin(z), torch.cos(z)], dim=-1)))
        h = h + nn.functional.silu(self.block(h))
        return self.head(h)


class Untraceable(nn.Module):
    """log1p has no jet rule: the exact fallback runs."""

    def __init__(self, d, m=1, seed=0):
        super().__init__()
        self.net = mlp(d, m, seed=seed)

    def forward(self, x):
        return self.net(x) * torch.log1p(x[:, :1] ** 2)


def one_point(f, m_out):
    def g(p):
        y = f(p.unsqueeze(0))
        return y.reshape(-1) if y.dim() == 2 else y.reshape(1)

    return g


def tensors(f, x, n):
    """[T_0 (N, m), T_1 (N, m, d), ..., T_n (N, m, d, ..., d)] by nested torch.func."""
    g = one_point(f, None)
    fns = [g]
    for k in range(n):
        fns.append(torch.func.jacrev(fns[-1]) if k < 2 else torch.func.jacfwd(fns[-1]))
    return [torch.func.vmap(F)(x) for F in fns]


def ref_partial(T, alpha):
    seq = [i for i, a in enumerate(alpha) for _ in range(a)]
    return T[len(seq)][(slice(None), slice(None)) + tuple(seq)]  # (N, m)


def ref_biharmonic(T4, dims=None):
    d = T4.shape[-1]
    idx = list(range(d)) if dims is None else list(dims)
    sub = T4[:, :, idx][:, :, :, idx][:, :, :, :, idx][:, :, :, :, :, idx]
    return torch.einsum("nmiijj->nm", sub)


def rel(got, want):
    got, want = got.detach(), want.detach()
    scale = float(want.abs().max())
    return float((got - want).abs().max()) / (scale if scale > 0 else 1.0)


def shaped(t, m):
    """(N, m) reference as the public shape: (N, 1) stays, a model returning (N,) -> (N,)."""
    return t if m is not None else t[:, 0]


MODELS = {
    "mlp_tanh": lambda d, m, s: mlp(d, m, seed=s),
    "mlp_silu_wide": lambda d, m, s: mlp(d, m, width=24, depth=3, act=nn.SiLU, seed=s),
    "fourier_resnet": lambda d, m, s: FourierResNet(d, m, seed=s).double(),
}


# ---- the polarization identity itself ---------------------------------------------------------------


@pytest.mark.parametrize(
    "alpha", [(1,), (4,), (1, 1), (2, 1), (2, 2), (3, 1), (1, 1, 1), (2, 1, 1), (1, 1, 1, 1), (0, 2, 0, 2), (5, 1), (3, 3)]
)
def test_polarization_extracts_one_coefficient(alpha):
    """sum_v w_v D_v^n applied to every monomial x^beta of degree n gives alpha! delta(alpha, beta):
    D_v^n x^beta = n! v^beta, so the identity must satisfy sum_v w_v n! v^beta = alpha! [beta = alpha]
    -- checked in exact rationals for every beta of the same degree."""
    n, d = sum(alpha), len(alpha)
    pol = O.polarization(alpha)
    assert pol and all(isinstance(w, Fraction) for _, w in pol)
    for beta in itertools.product(range(n + 1), repeat=d):
        if sum(beta) != n:
            continue
        got = sum(w * math.factorial(n) * math.prod(Fraction(vi) ** bi for vi, bi in zip(v, beta)) for v, w in pol)
        want = math.prod(math.factorial(a) for a in alpha) if tuple(beta) == tuple(alpha) else 0
        assert got == want, (beta, got)
    for v, _ in pol:  # primitive, first nonzero positive, support within alpha's
        nz = [e for e in v if e]
        assert nz[0] > 0 and math.gcd(*[abs(e) for e in nz]) == 1
        assert all(alpha[i] or not v[i] for i in range(d))


def test_known_identities_and_amplification():
    assert O.polarization((1, 1)) == [((1, -1), Fraction(-1, 4)), ((1, 1), Fraction(1, 4))]
    assert O.polarization((2, 2)) == [
        ((0, 1), Fraction(-1, 6)), ((1, -1), Fraction(1, 12)), ((1, 0), Fraction(-1, 6)), ((1, 1), Fraction(1, 12))
    ]
    assert O.polarization((0, 3, 0)) == [((0, 1, 0), Fraction(1))]
    assert O.polarization((0, 0)) == []
    assert O.amplification((4, 0)) == 1.0 and O.amplification((1, 1)) == 2.0 and O.amplification((2, 2)) == 3.0


# ---- exactness against torch.func --------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("d,m,seed", [(2, 1, 0), (3, 2, 1), (4, 1, 2)])
def test_biharmonic_matches_torch_func(model, d, m, seed):
    f = MODELS[model](d, m, seed)
    x = torch.rand(6, d, dtype=F64, generator=torch.Generator().manual_seed(seed))
    T = tensors(f, x, 4)
    got, info = thd.biharmonic(f, x, return_info=True)
    assert info.path == "jet" and "collapsed" in info.reason
    assert got.shape == (6, m)
    assert rel(got, ref_biharmonic(T[4])) <= 1e-10
    dims = [0, d - 1]
    got = thd.biharmonic(f, x, dims=dims)
    assert rel(got, ref_biharmonic(T[4], dims)) <= 1e-10


ALPHAS = {
    2: [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (3, 0), (2, 1), (1, 2), (4, 0), (3, 1), (2, 2), (1, 3), (0, 4)],
    3: [(0, 0, 0), (1, 1, 1), (2, 1, 1), (0, 2, 2), (1, 0, 3), (2, 0, 0), (0, 1, 1), (1, 1, 0), (0, 0, 1)],
    4: [(1, 1, 1, 1), (2, 0, 1, 1), (0, 2, 0, 2), (1, 0, 0, 1), (0, 0, 3, 1)],
}


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("d,m,seed", [(2, 1, 3), (3, 2, 4), (4, 1, 5)])
def test_partials_match_torch_func(model, d, m, seed):
    f = MODELS[model](d, m, seed)
    x = torch.randn(5, d, dtype=F64, generator=torch.Generator().manual_seed(seed))
    alphas = ALPHAS[d]
    T = tensors(f, x, max(sum(a) for a in alphas))
    got, info = thd.partials(f, x, alphas, return_info=True)
    assert info.path == "jet" and got.shape == (5, m, len(alphas))
    for j, a in enumerate(alphas):
        assert rel(got[..., j], ref_partial(T, a)) <= 1e-10, a
    # one alpha of the top order: the top is carried collapsed, same numbers
    top = max(alphas, key=sum)
    one, info = thd.partials(f, x, [top, (0,) * d, (1,) + (0,) * (d - 1)], return_info=True)
    assert "collapsed" in info.reason
    assert rel(one[..., 0], ref_partial(T, top)) <= 1e-10
    assert rel(one[..., 1], T[0]) <= 1e-12 and rel(one[..., 2], T[1][:, :, 0]) <= 1e-10


@pytest.mark.parametrize("model", sorted(MODELS))
def test_operator_matches_torch_func(model):
    d = 3
    f = MODELS[model](d, 2, 7)
    x = torch.rand(6, d, dtype=F64, generator=torch.Generator().manual_seed(7))
    T = tensors(f, x, 4)
    terms = {(4, 0, 0): 1.0, (2, 2, 0): 2, (0, 1, 3): -0.25, (1, 0, 1): 3.5, (0, 2, 0): Fraction(1, 3), (1, 0, 0): -2, (0, 0, 0): 7.0}
    got, info = thd.operator(f, x, terms, return_info=True)
    want = sum(float(c) * ref_partial(T, a) for a, c in terms.items())
    assert info.path == "jet" and "collapsed" in info.reason and got.shape == (6, 2)
    assert rel(got, want) <= 1e-10
    # order <= 2 operators: the Helmholtz operator
    helm = thd.operator(f, x, {(2, 0, 0): 1, (0, 2, 0): 1, (0, 0, 2): 1, (0, 0, 0): 4.0})
    assert rel(helm, thd.laplacian(f, x) + 4.0 * T[0]) <= 1e-10
    # the biharmonic as an operator
    plate = {(4, 0, 0): 1, (0, 4, 0): 1, (0, 0, 4): 1, (2, 2, 0): 2, (2, 0, 2): 2, (0, 2, 2): 2}
    assert rel(thd.operator(f, x, plate), thd.biharmonic(f, x)) <= 1e-12


def test_scalar_output_shapes_and_unbatched():
    net = mlp(2, 1, seed=1)
    f = lambda x: net(x)[:, 0]  # noqa: E731
    x = torch.rand(4, 2, dtype=F64)
    T = tensors(net, x, 4)
    bh = thd.biharmonic(f, x)
    assert bh.shape == (4,) and rel(bh, ref_biharmonic(T[4])[:, 0]) <= 1e-10
    p = thd.partials(f, x, [(2, 2), (1, 0)])
    assert p.shape == (4, 2)
    assert thd.operator(f, x, {(1, 1): 1}).shape == (4,)
    # unbatched: one point, no N
    assert thd.biharmonic(net, x[0]).shape == (1,)
    torch.testing.assert_close(thd.biharmonic(net, x[0]), thd.biharmonic(net, x)[0], rtol=1e-13, atol=1e-15)
    assert thd.partials(f, x[0], [(2, 2), (1, 0)]).shape == (2,)
    torch.testing.assert_close(thd.partials(net, x[1], [(3, 1)]), thd.partials(net, x, [(3, 1)])[1], rtol=1e-13, atol=1e-15)
    assert thd.divergence(mlp(2, 2), x[0]).shape == ()


@pytest.mark.parametrize("d", [2, 3, 5])
def test_divergence_matches_torch_func(d):
    for f in (mlp(d, d, seed=d), FourierResNet(d, d, seed=d).double()):
        x = torch.randn(7, d, dtype=F64)
        J = tensors(f, x, 1)[1]  # (N, m, d)
        got, info = thd.divergence(f, x, return_info=True)
        assert info.path == "jet" and got.shape == (7,)
        assert rel(got, J.diagonal(dim1=1, dim2=2).sum(1)) <= 1e-10
        dims = [d - 1, 0]
        assert rel(thd.divergence(f, x, dims), J[:, d - 1, d - 1] + J[:, 0, 0]) <= 1e-10


def test_divergence_components():
    """(t, x, y) -> (u, v, p): div(u, v) = du/dx + dv/dy with explicit components; (t, x, y) ->
    (u, v) pairs by position."""
    f = mlp(3, 3, seed=2)
    x = torch.randn(5, 3, dtype=F64)
    J = tensors(f, x, 1)[1]
    got = thd.divergence(f, x, dims=[1, 2], components=[0, 1])
    assert rel(got, J[:, 0, 1] + J[:, 1, 2]) <= 1e-10
    g = mlp(3, 2, seed=3)
    Jg = tensors(g, x, 1)[1]
    assert rel(thd.divergence(g, x, dims=[1, 2]), Jg[:, 0, 1] + Jg[:, 1, 2]) <= 1e-10
    with pytest.raises(ValueError, match="components"):
        thd.divergence(g, x)  # m = 2, d = 3: which pairs?
    with pytest.raises(ValueError, match="one output component per"):
        thd.divergence(f, x, dims=[1, 2], components=[0])
    with pytest.raises(ValueError, match="out of range"):
        thd.divergence(f, x, dims=[1, 2], components=[0, 3])
    with pytest.raises(ValueError, match="vector field"):
        thd.divergence(lambda z: f(z)[:, 0], x)


def test_a_linear_vector_field_has_shared_rows():
    """Before any nonlinearity the first-order rows are shared by every point: the divergence of
    an affine field is its trace, a constant that still backpropagates to the weights."""
    lin = nn.Linear(4, 4).double()
    x = torch.randn(3, 4, dtype=F64)
    div = thd.divergence(lin, x)
    torch.testing.assert_close(div, lin.weight.diagonal().sum().expand(3), rtol=1e-14, atol=0)
    div.sum().backward()
    torch.testing.assert_close(lin.weight.grad, 3 * torch.eye(4, dtype=F64))


# ---- training: gradients to the parameters --------------------------------------------------------


def _param_grads(model, loss):
    """The gradient of loss w.r.t. every parameter, flat (zeros for parameters it does not use:
    the output bias has no part in a derivative of order >= 1)."""
    ps = [p for p in model.parameters() if p.requires_grad]
    gs = torch.autograd.grad(loss, ps, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(ps, gs)])


@pytest.mark.parametrize("model", ["mlp_tanh", "fourier_resnet"])
def test_training_gradients(model):
    d = 2
    f = MODELS[model](d, 1, 11)
    x = torch.rand(5, d, dtype=F64)
    src = torch.randn(5, 1, dtype=F64)

    def ref_loss(T):
        return ((ref_biharmonic(T[4]) - src) ** 2).mean() + (ref_partial(T, (1, 1)) ** 2).mean() + (ref_partial(T, (3, 0)) * 0.5).sum()

    want = _param_grads(f, ref_loss(tensors(f, x, 4)))
    loss = ((thd.biharmonic(f, x) - src) ** 2).mean()
    p = thd.partials(f, x, [(1, 1), (3, 0)])
    loss = loss + (p[..., 0] ** 2).mean() + (p[..., 1] * 0.5).sum()
    assert rel(_param_grads(f, loss), want) <= 1e-10
    # the divergence's gradient
    v = MODELS[model](d, d, 12)
    J = tensors(v, x, 1)[1]
    want = _param_grads(v, (J.diagonal(dim1=1, dim2=2).sum(1) ** 2).sum())
    assert rel(_param_grads(v, (thd.divergence(v, x) ** 2).sum()), want) <= 1e-10


def test_learned_coefficient_gets_its_gradient():
    """A 0-d tensor coefficient (an inverse problem's PDE parameter) is differentiable: d/dk of
    sum (Delta^2 u + k Delta u)^2 through the collapsed weights."""
    f = mlp(2, 1, seed=5)
    x = torch.rand(6, 2, dtype=F64)
    k = torch.tensor(0.7, dtype=F64, requires_grad=True)
    out = thd.operator(f, x, {(4, 0): 1, (2, 2): 2, (0, 4): 1, (2, 0): k, (0, 2): k})
    (gk,) = torch.autograd.grad((out**2).sum(), k)
    T = tensors(f, x, 4)
    bh, lap = ref_biharmonic(T[4]), ref_partial(T, (2, 0)) + ref_partial(T, (0, 2))
    assert rel(out, bh + 0.7 * lap) <= 1e-10
    assert abs(float(gk) - float((2 * (bh + 0.7 * lap) * lap).sum())) <= 1e-10 * abs(float(gk))


# ---- paths: fallback, chunks, dtypes, devices --------------------------------------------------------


def test_untraceable_models_take_the_exact_fallback():
    d = 2
    f = Untraceable(d, 2, seed=3).double()
    x = torch.rand(5, d, dtype=F64) + 0.1
    T = tensors(f, x, 4)
    bh, info = thd.biharmonic(f, x, return_info=True)
    assert info.path == "autograd" and "log1p" in info.reason
    assert rel(bh, ref_biharmonic(T[4])) <= 1e-10
    alphas = ALPHAS[2]
    p = thd.partials(f, x, alphas)
    for j, a in enumerate(alphas):
        assert rel(p[..., j], ref_partial(T, a)) <= 1e-10
    assert rel(thd.operator(f, x, {(2, 2): 3.0, (0, 1): -1}), 3 * ref_partial(T, (2, 2)) - ref_partial(T, (0, 1))) <= 1e-10
    assert thd.explain(f, x, "biharmonic").path == "autograd"
    with pytest.raises(NotImplementedError, match="no fast path"):
        thd.biharmonic(f, x, fallback="error")
    # training through the fallback
    want = _param_grads(f, (ref_biharmonic(T[4]) ** 2).sum())
    assert rel(_param_grads(f, (thd.biharmonic(f, x) ** 2).sum()), want) <= 1e-10
    v = Untraceable(d, d, seed=4).double()
    J = tensors(v, x, 1)[1]
    div, info = thd.divergence(v, x, return_info=True)
    assert info.path == "autograd" and rel(div, J.diagonal(dim1=1, dim2=2).sum(1)) <= 1e-10


def test_fallback_zeros_of_low_degree_are_confirmed():
    """Untraceable (Python control flow) polynomials: u = x0^2 x1, whose fourth derivatives
    reverse mode gives as exact zeros, and u = 3 x0 + x1, whose second derivatives it cannot give
    at all (the gradient is a constant with no graph): torch.func confirms those zeros, with no
    warning."""

    def cubic(x):
        if bool(x.sum() > -1e9):
            return (x[:, 0] ** 2 * x[:, 1]).unsqueeze(1)
        return x[:, :1]

    def linear(x):
        if bool(x.sum() > -1e9):
            return 3 * x[:, :1] + x[:, 1:]
        return x[:, :1]

    x = torch.randn(4, 2, dtype=F64)
    zero = 0 * x[:, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p, info = thd.partials(cubic, x, [(2, 2), (2, 1), (1, 1), (0, 2)], return_info=True)
        q, info2 = thd.partials(linear, x, [(1, 1), (1, 0), (0, 3)], return_info=True)
    assert info.path == "autograd"
    torch.testing.assert_close(p[:, 0], torch.stack([zero, 2 + zero, 2 * x[:, 0], zero], -1), rtol=0, atol=1e-14)
    assert info2.path == "autograd" and "torch.func" in info2.method
    torch.testing.assert_close(q[:, 0], torch.stack([zero, 3 + zero, zero], -1), rtol=0, atol=0)


class OnceSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return z * z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return 2 * z * g


def test_once_differentiable_is_not_silent():
    lin = nn.Linear(2, 1).double()
    x = torch.randn(3, 2, dtype=F64)
    with pytest.raises(NotImplementedError, match="OnceSquare"):
        thd.biharmonic(lambda z: OnceSquare.apply(lin(z)), x)
    with pytest.warns(UserWarning, match="OnceSquare"):
        thd.partials(lambda z: OnceSquare.apply(lin(z)), x, [(1, 1)], allow_unconfirmed_zeros=True)


def test_orders_above_four_need_the_exact_fallback():
    f = mlp(2, 1, seed=9)
    x = torch.rand(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="fallback='autograd'"):
        thd.partials(f, x, [(3, 2)])
    with pytest.raises(ValueError, match="order 5"):
        thd.operator(f, x, {(5, 0): 1})
    got, info = thd.partials(f, x, [(3, 2), (2, 0)], fallback="autograd", return_info=True)
    assert info.path == "autograd" and "above the jets" in info.reason
    T = tensors(f, x, 5)
    assert rel(got[..., 0], T[5][:, :, 0, 0, 0, 1, 1]) <= 1e-10
    assert rel(got[..., 1], T[2][:, :, 0, 0]) <= 1e-10


def test_chunks_without_a_graph_match_one_block():
    f = FourierResNet(3, 1, seed=2).double()
    x = torch.rand(300, 3, dtype=F64)  # > the first chunk of 128 points
    with torch.no_grad():
        a = thd.biharmonic(f, x)
        p = thd.partials(f, x, [(1, 1, 2), (0, 0, 1)])
        v = thd.divergence(FourierResNet(3, 3, seed=2).double(), x)
    b = thd.biharmonic(f, x)  # with a graph: one block
    assert b.requires_grad and not a.requires_grad
    torch.testing.assert_close(a, b.detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(p, thd.partials(f, x, [(1, 1, 2), (0, 0, 1)]).detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(v, thd.divergence(FourierResNet(3, 3, seed=2).double(), x).detach(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("device", devices())
def test_float32_within_the_rounding_bound(device):
    """float32 against float64: the jets carry ~1e-6 relative (the network's conditioning times
    eps32 = 1.2e-7), the polarization at most A(alpha)/d^2 <= 3 times that of the largest fourth
    partial: 2e-4 relative to the largest entry covers both with margin."""
    f64 = mlp(3, 1, width=32, seed=4)
    x = torch.rand(64, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    want = thd.biharmonic(f64, x).detach()
    f32 = mlp(3, 1, width=32, seed=4, dtype=torch.float32).to(device)
    got = thd.biharmonic(f32, x.float().to(device))
    assert got.dtype == torch.float32 and got.device.type == torch.device(device).type
    assert rel(got.double().cpu(), want) <= 2e-4
    p64 = thd.partials(f64, x, [(1, 1, 2), (0, 3, 1)]).detach()
    p32 = thd.partials(f32, x.float().to(device), [(1, 1, 2), (0, 3, 1)])
    assert rel(p32.double().cpu(), p64) <= 2e-4


@pytest.mark.parametrize("device", devices())
def test_devices_float64(device):
    f = FourierResNet(2, 1, seed=6).double().to(device)
    x = torch.rand(8, 2, dtype=F64, device=device)
    T = tensors(f, x, 4)
    assert rel(thd.biharmonic(f, x), ref_biharmonic(T[4])) <= 1e-10
    assert rel(thd.partials(f, x, [(2, 1)])[..., 0], ref_partial(T, (2, 1))) <= 1e-10
    g = torch.Generator(device=device).manual_seed(0)
    est = thd.laplacian(f, x, num_samples=2, generator=g)
    assert rel(est, thd.laplacian(f, x)) <= 1e-12  # S = D = 2: exact


def test_explain():
    f = mlp(3, 1)
    x = torch.rand(4, 3, dtype=F64)
    assert thd.explain(f, x, "biharmonic").path == "jet"
    assert "29 rows per point, top order collapsed" in thd.explain(f, x, "biharmonic").reason  # 3 d^2 + 2
    assert thd.explain(f, x, "partials", alphas=[(1, 1, 0)]).path == "jet"
    assert thd.explain(f, x, "operator", alphas={(2, 0, 0): 1}).path == "jet"
    assert thd.explain(mlp(3, 3), x, "divergence").path == "jet"
    assert thd.explain(Untraceable(3, 3), x, "divergence").path == "autograd"
    with pytest.raises(ValueError, match="alphas"):
        thd.explain(f, x, "partials")
    with pytest.raises(ValueError, match="function must be"):
        thd.explain(f, x, "bilaplacian")


def test_relu_net_zeros_warn():
    f = mlp(2, 1, act=nn.ReLU)
    with pytest.warns(UserWarning, match="piecewise-linear"):
        bh = thd.biharmonic(f, torch.rand(4, 2, dtype=F64))
    assert bh.abs().max() == 0


def test_linear_model_gives_zeros_that_backpropagate():
    lin = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=F64)
    bh = thd.biharmonic(lin, x)
    assert bh.shape == (4, 2) and bh.abs().max() == 0
    p = thd.partials(lin, x, [(1, 0, 0), (2, 0, 0)])
    torch.testing.assert_close(p[..., 0], lin.weight[:, 0].expand(4, 2))
    (bh.sum() + p.sum()).backward()
    assert lin.weight.grad is not None


# ---- bad input ---------------------------------------------------------------------------------------


def test_bad_multi_indices():
    f = mlp(2, 1)
    x = torch.rand(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="length 3.*d = 2"):
        thd.partials(f, x, [(1, 1, 0)])
    with pytest.raises(ValueError, match="negative"):
        thd.partials(f, x, [(2, -1)])
    with pytest.raises(TypeError, match="non-negative ints"):
        thd.partials(f, x, [(2.0, 1)])
    with pytest.raises(TypeError, match="non-negative ints"):
        thd.partials(f, x, [(0.5, 1)])
    with pytest.raises(TypeError, match="bool"):
        thd.partials(f, x, [(True, 1)])
    with pytest.raises(TypeError, match="flat sequence"):
        thd.partials(f, x, (2, 2))
    with pytest.raises(ValueError, match="empty"):
        thd.partials(f, x, [])
    with pytest.raises(TypeError, match="list of multi-indices"):
        thd.partials(f, x, "xy")
    with pytest.raises(TypeError, match="dict"):
        thd.operator(f, x, [(2, 0)])
    with pytest.raises(ValueError, match="empty"):
        thd.operator(f, x, {})
    with pytest.raises(TypeError, match="coefficient"):
        thd.operator(f, x, {(2, 0): "1"})
    with pytest.raises(ValueError, match="finite"):
        thd.operator(f, x, {(2, 0): float("nan")})
    with pytest.raises(TypeError, match="0-d"):
        thd.operator(f, x, {(2, 0): torch.ones(2)})
    with pytest.raises(ValueError, match="length 1"):
        thd.operator(f, x, {(2,): 1.0})
    # numpy / tensor multi-indices are fine
    np = pytest.importorskip("numpy")
    a = thd.partials(f, x, [np.array([1, 1]), torch.tensor([2, 0])])
    torch.testing.assert_close(a, thd.partials(f, x, [(1, 1), (2, 0)]))


def test_bad_arguments():
    f = mlp(2, 1)
    x = torch.rand(3, 2, dtype=F64)
    with pytest.raises(TypeError, match="float32 or float64"):
        thd.biharmonic(f, x.half())
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        thd.biharmonic(f, x.reshape(3, 1, 2))
    with pytest.raises(ValueError, match="out of range"):
        thd.biharmonic(f, x, dims=[2])
    with pytest.raises(ValueError, match="repeated"):
        thd.biharmonic(f, x, dims=[0, 0])
    with pytest.raises(TypeError, match="callable"):
        thd.biharmonic(3, x)
    with pytest.raises(ValueError, match="fallback"):
        thd.biharmonic(f, x, fallback="fast")
    with pytest.raises(TypeError, match="float32"):
        thd.divergence(mlp(2, 2), x.long())
    with pytest.raises(ValueError, match="does not fit the model"):
        thd.biharmonic(f, torch.rand(3, 3, dtype=F64))


# ---- the sampled Laplacian -------------------------------------------------------------------------


def _exact_hessian_diag(f, x):
    return tensors(f, x, 2)[2].diagonal(dim1=-2, dim2=-1)  # (N, m, d)


def _moments_uniform(h, S):
    """Exact mean, variance and 4th central moment of (D/S) sum over S-subsets (uniform)."""
    D = h.shape[-1]
    vals = torch.stack([h[..., list(c)].sum(-1) * (D / S) for c in itertools.combinations(range(D), S)])
    mu = vals.mean(0)
    return mu, ((vals - mu) ** 2).mean(0), ((vals - mu) ** 4).mean(0)


def _check_stats(est, mu, var, mu4, R):
    """mean within 5 standard errors, empirical variance within 5 of its standard errors."""
    mean = est.mean(0)
    se = (var / R).sqrt()
    assert bool(((mean - mu).abs() <= 5 * se + 1e-12).all()), (mean, mu, se)
    s2 = est.var(0)
    se_var = ((mu4 - var**2) / R).clamp_min(0).sqrt()
    assert bool(((s2 - var).abs() <= 5 * se_var + 1e-12).all()), (s2, var, se_var)


def test_sampled_laplacian_is_unbiased_uniform():
    d, S, R = 6, 2, 400
    f = mlp(d, 2, seed=13)
    x = torch.rand(3, d, dtype=F64)
    h = _exact_hessian_diag(f, x)
    lap = h.sum(-1)
    mu, var, mu4 = _moments_uniform(h, S)
    torch.testing.assert_close(mu, lap)  # the estimator's exact mean is the Laplacian (enumeration)
    # the documented variance formula
    sigma2 = ((h - lap.unsqueeze(-1) / d) ** 2).mean(-1)
    torch.testing.assert_close(var, d**2 * sigma2 * (d - S) / (S * (d - 1)))
    with torch.no_grad():
        est = torch.stack([thd.laplacian(f, x, num_samples=S, generator=torch.Generator().manual_seed(r)) for r in range(R)])
    _check_stats(est, lap, var, mu4, R)
    # the same seed, the same axes
    a = thd.laplacian(f, x, num_samples=S, generator=torch.Generator().manual_seed(5))
    b = thd.laplacian(f, x, num_samples=S, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # S = D is the exact Laplacian; the default generator works
    torch.manual_seed(0)
    assert rel(thd.laplacian(f, x, num_samples=d), lap) <= 1e-12
    thd.laplacian(f, x, num_samples=1)


def test_sampled_laplacian_is_unbiased_importance_weighted():
    d, S, R = 5, 3, 400
    f = FourierResNet(d, 1, seed=14).double()
    x = torch.rand(2, d, dtype=F64)
    dims = [0, 2, 3, 4]
    h = _exact_hessian_diag(f, x)[..., dims]
    lap = h.sum(-1)
    w = torch.tensor([1.0, 2.0, 0.5, 4.0], dtype=F64)
    p = w / w.sum()
    X = h / p  # one draw: h_I / p_I with probability p_I
    muX = (p * X).sum(-1)
    torch.testing.assert_close(muX, lap)
    varX = (p * (X - muX.unsqueeze(-1)) ** 2).sum(-1)
    torch.testing.assert_close(varX, (h**2 / p).sum(-1) - lap**2)  # the documented formula (S = 1)
    m4X = (p * (X - muX.unsqueeze(-1)) ** 4).sum(-1)
    var = varX / S  # mean of S iid draws
    mu4 = (m4X + 3 * (S - 1) * varX**2) / S**3
    with torch.no_grad():
        est = torch.stack([
            thd.laplacian(f, x, dims, num_samples=S, sample_weights=w, generator=torch.Generator().manual_seed(r)) for r in range(R)
        ])
    _check_stats(est, lap, var, mu4, R)


def test_sampled_laplacian_paths_agree():
    """The same draw on the engine (an nn.Sequential MLP), the jets (the same MLP behind a
    lambda) and the exact fallback (an untraceable no-op added): the same numbers, uniform and
    weighted, with training gradients."""
    d = 7
    net = mlp(d, 1, seed=15)
    x = torch.rand(5, d, dtype=F64)

    def untraceable(z):
        return net(z) + 0.0 * torch.log1p(z[:, :1] ** 2)

    for kw in (dict(num_samples=3), dict(num_samples=4, sample_weights=torch.arange(1.0, d + 1))):
        outs = []
        for f, path in ((net, "engine"), (lambda z: net(z), "jet"), (untraceable, "autograd")):
            res, info = thd.laplacian(f, x, generator=torch.Generator().manual_seed(3), return_info=True, **kw)
            assert info.path == path and "sampled Laplacian" in info.reason
            outs.append(res)
        for o in outs[1:]:
            assert rel(o, outs[0]) <= 1e-12
        grads = [_param_grads(net, (o**2).sum()) for o in outs]
        for g in grads[1:]:
            assert rel(g, grads[0]) <= 1e-10


def test_sampled_laplacian_bad_arguments():
    f = mlp(4, 1)
    x = torch.rand(3, 4, dtype=F64)
    for bad, exc, msg in [
        (dict(num_samples=0), ValueError, "between 1 and the 4"),
        (dict(num_samples=5), ValueError, "between 1 and the 4"),
        (dict(num_samples=2.0), TypeError, "int"),
        (dict(num_samples=True), TypeError, "int"),
        (dict(num_samples=2, generator=3), TypeError, "Generator"),
        (dict(num_samples=2, sample_weights=[1.0, 2.0]), ValueError, "4 entries"),
        (dict(num_samples=2, sample_weights=[1.0, 0.0, 1.0, 1.0]), ValueError, "> 0"),
        (dict(num_samples=2, sample_weights=[1.0, -1.0, 1.0, 1.0]), ValueError, "> 0"),
        (dict(num_samples=2, sample_weights=[1.0, float("inf"), 1.0, 1.0]), ValueError, "finite"),
        (dict(num_samples=0, sample_weights=[1.0] * 4), ValueError, ">= 1"),
        (dict(generator=torch.Generator()), ValueError, "num_samples"),
        (dict(sample_weights=[1.0] * 4), ValueError, "num_samples"),
    ]:
        with pytest.raises(exc, match=msg):
            thd.laplacian(f, x, **bad)
    with pytest.raises(ValueError, match="between 1 and the 2"):
        thd.laplacian(f, x, dims=[0, 1], num_samples=3)
    # with replacement, more draws than axes is fine
    thd.laplacian(f, x, dims=[0, 1], num_samples=3, sample_weights=[1.0, 1.0])


def test_sampled_laplacian_at_large_d_takes_the_jets():
    """Above _SAMPLED_ENGINE_MAX_D input features an MLP's sampled Laplacian runs on the jets
    (the engine's chunks shrink there): same numbers as the engine's partial Laplacian, and the
    first layer gathers weight columns instead of a (S, d) GEMM."""
    d = O._SAMPLED_ENGINE_MAX_D + 100
    net = mlp(d, 1, width=8, seed=16)
    x = torch.rand(4, d, dtype=F64)
    dims = [3, 17, 2000, d - 1]
    got, info = thd.laplacian(net, x, dims, num_samples=4, generator=torch.Generator().manual_seed(0), return_info=True)
    assert info.path == "jet"
    want, info2 = thd.laplacian(net, x, dims, return_info=True)
    assert info2.path == "engine" and rel(got, want) <= 1e-12
    lap_jets = thd.laplacian(lambda z: net(z), x, dims)  # an axis selection through the jets
    assert rel(lap_jets, want) <= 1e-12
    # divergence (an axis selection too) on a field with a wide input
    v = mlp(d, d, width=8, seed=17)
    J = torch.autograd.functional.jacobian(lambda z: v(z[None])[0], x[0])
    assert rel(thd.divergence(v, x[:1], dims), J[dims, dims].sum().reshape(1)) <= 1e-12


# ---- collapsed fourth order through the composed rules (norms, softmax, attention) ---------------------


def _twin_models():
    from _twin_models import HandAttention, NormNet, SDPANet, SoftmaxNet, _build

    return [
        ("norm", _build(NormNet, 0), 3, None),
        ("softmax", _build(SoftmaxNet, 1), 3, None),
        ("sdpa_bool_mask", _build(SDPANet, 2, variant="bool_mask"), 9, [0, 4, 8]),
        ("hand_attention", _build(HandAttention, 3), 9, [1, 5]),
    ]


@pytest.mark.parametrize("i", range(4))
def test_operators_through_norms_softmax_attention(i):
    """The weighted top-order collapse through LayerNorm / RMSNorm (powers and products), softmax
    (exp, sums, reciprocals) and attention (bilinear products of per-point matrices): biharmonic and
    a mixed-order operator (collapsed) and partials (not collapsed) of the torch.nn models against
    torch.func on their elementary twins (torch's own nested derivatives of layer_norm are wrong),
    with the training gradient of a biharmonic loss."""
    name, model, d, dims = _twin_models()[i]
    x = torch.randn(3, d, dtype=F64, generator=torch.Generator().manual_seed(i))
    twin = lambda z: model(z, elementary=True)  # noqa: E731
    T = tensors(twin, x, 4)
    got, info = thd.biharmonic(model, x, dims=dims, return_info=True)
    assert info.path == "jet" and "collapsed" in info.reason, info
    want = ref_biharmonic(T[4], dims)
    want = want if got.dim() == 2 else want[:, 0]
    assert rel(got, want) <= 1e-10, name
    a, b = (0, 1) if dims is None else (dims[0], dims[1])
    al = [0] * d
    al[a], al[b] = 3, 1
    terms = {tuple(al): 1.5, tuple(2 if j == b else 0 for j in range(d)): -1.0, (0,) * d: 0.5}
    op = thd.operator(model, x, terms)
    want_op = 1.5 * ref_partial(T, tuple(al)) - ref_partial(T, tuple(2 if j == b else 0 for j in range(d))) + 0.5 * T[0]
    assert rel(op, want_op if op.dim() == 2 else want_op[:, 0]) <= 1e-10, name
    ab = [0] * d
    ab[a], ab[b] = 2, 2
    p = thd.partials(model, x, [tuple(ab), tuple(al)])
    for j, alpha in enumerate([tuple(ab), tuple(al)]):
        w = ref_partial(T, alpha)
        assert rel(p[..., j], w if p.dim() == 3 else w[:, 0]) <= 1e-10, (name, alpha)
    params = [q for q in model.parameters() if q.requires_grad]
    g = torch.autograd.grad((got**2).sum(), params, allow_unused=True, materialize_grads=True)
    g_w = torch.autograd.grad((want**2).sum(), params, allow_unused=True, materialize_grads=True)
    assert rel(torch.cat([t.reshape(-1) for t in g]), torch.cat([t.reshape(-1) for t in g_w])) <= 1e-10, name


def test_empty_batch_and_unbatched_sampled():
    m = mlp(3, 3, width=8, seed=18)
    x = torch.rand(0, 3, dtype=F64)
    assert thd.biharmonic(m, x).shape == (0, 3)
    assert thd.partials(m, x, [(1, 1, 0), (0, 0, 0)]).shape == (0, 3, 2)
    assert thd.divergence(m, x).shape == (0,)
    assert thd.laplacian(m, x, num_samples=2).shape == (0, 3)
    p = torch.rand(3, dtype=F64)
    torch.testing.assert_close(thd.laplacian(m, p, num_samples=3), thd.laplacian(m, p), rtol=1e-12, atol=1e-14)
    est = thd.laplacian(m, p, num_samples=2, sample_weights=[1.0, 2.0, 3.0], generator=torch.Generator().manual_seed(1))
    assert est.shape == (3,)
