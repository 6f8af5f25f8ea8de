"""The public second-order functions beyond the plain values (tests/engine/test_engine.py has
those): training gradients (w.r.t. every parameter, and w.r.t. x), the weighted Laplacian tr(A H),
mixed partials, the Hutchinson estimator; with the matching tests of tests/test_mlp_engine.py
(last section). Linear and piecewise-linear networks, errors and empty batches:
tests/engine/test_engine_zeros_and_errors.py.

References: nested torch.autograd (one grad with create_graph=True per output, then one grad per
input dimension, create_graph=True) for training gradients; torch.func.vmap(torch.func.hessian)
for Hessians and for gradients w.r.t. x. All float64.

Tolerance: 1e-10 relative to the largest |entry| of the reference, as in tests/engine/test_engine.py:
both sides are float64 evaluations of the same sums in different orders (differences seen are
~1e-14 relative for the parameter gradients, which pass through one more level of products);
any wrong term is O(1) relative. Where the reference is itself a sum with cancellation (tr(A H)),
the scale is the sum of the magnitudes of its terms, einsum(|A|, |H|), the natural error scale.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchhessdiag as thd

# tiny tensors: one intra-op thread (see tests/conftest.py)
pytestmark = pytest.mark.usefixtures("single_thread", "engine_path")  # and both engine propagations

REL = 1e-10


def assert_rel(actual, expected, rel=REL, what="", scale=None):
    assert isinstance(actual, torch.Tensor), f"{what}: got {type(actual).__name__}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype and actual.device == expected.device, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite entries"
    err = (actual.detach() - expected.detach()).abs().max().item() if actual.numel() else 0.0
    if scale is None:
        scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    assert err <= rel * scale, f"{what}: max error {err:.3e} > {rel:.1e} * {scale:.3e}"


def _x(N, d, device, seed=1, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(N, d, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)


def _mlp(acts, d, width, m, bias=True, seed=0):
    torch.manual_seed(seed)
    biases = [bias] * (len(acts) + 1) if isinstance(bias, bool) else list(bias)
    layers, w_in = [], d
    for act, b in zip(acts, biases):
        layers += [nn.Linear(w_in, width, bias=b), act]
        w_in = width
    layers.append(nn.Linear(w_in, m, bias=biases[-1]))
    return nn.Sequential(*layers).double()


def torch_hessian(model, x):
    f = torch.func.hessian(model)
    return f(x) if x.dim() == 1 else torch.func.vmap(f)(x)


def nested_autograd_hessian_diag(model, x, dims=None):
    """(N, m, len(dims)) by nested torch.autograd: for each output one grad(create_graph=True),
    then one grad per input dimension (create_graph=True, so a loss on it can be differentiated
    w.r.t. the parameters). Unused inputs come back as zeros (materialize_grads)."""
    xx = x.detach().requires_grad_(True)
    u = model(xx)
    d = xx.shape[1]
    dims = list(range(d)) if dims is None else [i % d for i in dims]
    rows = []
    for i in range(u.shape[1]):
        (g,) = torch.autograd.grad(u[:, i].sum(), xx, create_graph=True)
        cols = []
        for j in dims:
            (h,) = torch.autograd.grad(
                g[:, j].sum(), xx, create_graph=True, allow_unused=True, materialize_grads=True
            )
            cols.append(h[:, j])
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, 1)


def _param_grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)


# ---- training gradients ----------------------------------------------------------------------

TRAIN_CASES = {
    # name: (acts, d, width, m, bias, loss kind, dims)
    "laplacian d=3 w=8 m=1": ([nn.Tanh(), nn.SiLU()], 3, 8, 1, True, "laplacian", None),
    "laplacian d=10>w=4 (QR) m=1": ([nn.Tanh(), nn.GELU()], 10, 4, 1, True, "laplacian", None),
    "laplacian d=10>w=4 (QR) m=2 depth3": (
        [nn.Softplus(), nn.Tanh(), thd.nn.SiLU()], 10, 4, 2, [True, False, True, True], "laplacian", None
    ),
    "partial laplacian dims=[0,2,3] m=2": ([nn.Sigmoid(), nn.Tanh()], 5, 6, 2, True, "laplacian", [0, 2, -2]),
    "hessian diag d=3 m=2 depth3": (
        [nn.Tanh(), nn.GELU(approximate="tanh"), nn.ELU(0.7)], 3, 6, 2, [False, True, True, True], "diag", None
    ),
    "hessian diag d=6>w=3 m=1": ([thd.nn.Sine(2.0), nn.SiLU()], 6, 3, 1, True, "diag", None),
    "pinn value+gradient+laplacian m=2": ([nn.Tanh(), nn.Softplus(beta=2.0)], 3, 5, 2, True, "pinn", None),
}


def _loss(kind, model, x, dims, engine: bool, target):
    if kind == "pinn":
        if engine:
            out = thd.mlp_derivatives(model, x, second="laplacian")
            value, grad, lap = out.value, out.gradient, out.second
        else:
            xx = x.detach().requires_grad_(True)
            value = model(xx)
            grad = torch.stack(
                [torch.autograd.grad(value[:, i].sum(), xx, create_graph=True)[0] for i in range(value.shape[1])], 1
            )
            lap = nested_autograd_hessian_diag(model, x).sum(-1)
        return ((lap + value - target) ** 2).mean() + (grad**2).mean()
    if kind == "laplacian":
        lap = thd.mlp_laplacian(model, x, dims=dims) if engine else nested_autograd_hessian_diag(model, x, dims).sum(-1)
        return ((lap - 1.0) ** 2).mean()
    hd = thd.mlp_hessian_diag(model, x, dims=dims) if engine else nested_autograd_hessian_diag(model, x, dims)
    return ((hd - target.unsqueeze(-1)) ** 2).mean() + (hd**3).mean()


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_training_gradients_match_nested_autograd(device, name):
    acts, d, width, m, bias, kind, dims = TRAIN_CASES[name]
    model = _mlp(acts, d, width, m, bias=bias, seed=d * 10 + m).to(device)
    x = _x(6, d, device)
    target = _x(6, m, device, seed=9)
    params = list(model.parameters())
    loss_e = _loss(kind, model, x, dims, True, target)
    loss_r = _loss(kind, model, x, dims, False, target)
    assert_rel(loss_e, loss_r, what="loss")
    g_e = _param_grads(loss_e, params)
    g_r = _param_grads(loss_r, params)
    for k, (a, b) in enumerate(zip(g_e, g_r)):
        assert a is not None
        assert_rel(a, b, what=f"d loss / d param #{k} {tuple(b.shape)}")
    if kind == "laplacian":
        # the output bias does not enter a Laplacian: its gradient is exactly zero
        last = model[-1]
        if last.bias is not None:
            assert torch.equal(g_e[-1], torch.zeros_like(last.bias))


def test_training_step_backward(device):
    """The README's pattern: loss.backward() fills .grad of every weight with the same numbers."""
    model = _mlp([nn.Tanh(), nn.Tanh()], 3, 8, 1).to(device)
    x = _x(5, 3, device)
    ref = _param_grads(((nested_autograd_hessian_diag(model, x).sum(-1) + 1.0) ** 2).mean(), list(model.parameters()))
    loss = ((thd.mlp_laplacian(model, x) + 1.0) ** 2).mean()
    loss.backward()
    for p, r in zip(model.parameters(), ref):
        if p is model[-1].bias:
            assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p))
            continue
        assert_rel(p.grad, r, what="p.grad")


@pytest.mark.parametrize(
    "fn",
    ["hessian_diag", "laplacian QR", "derivatives", "hessian_diag frozen params"],
)
def test_gradient_wrt_x_matches_torch_func(device, fn):
    if fn == "laplacian QR":
        model = _mlp([nn.Tanh(), nn.SiLU()], 9, 4, 2, seed=3).to(device)
        d = 9
    else:
        model = _mlp([nn.Tanh(), nn.GELU(), nn.Softplus()], 3, 6, 2, seed=4).to(device)
        d = 3
    if fn == "hessian_diag frozen params":
        model.requires_grad_(False)  # only x requires grad: the graph path must still be taken
    x = _x(5, d, device).requires_grad_(True)
    R = _x(5, 2 * d, device, seed=8).view(5, 2, d)
    H = torch_hessian(model, x)  # differentiable w.r.t. x (third derivatives by torch.func)
    hd_ref = H.diagonal(dim1=-2, dim2=-1)
    if fn.startswith("hessian_diag"):
        loss_e = (thd.mlp_hessian_diag(model, x) * R).sum()
        loss_r = (hd_ref * R).sum()
    elif fn == "laplacian QR":
        loss_e = (thd.mlp_laplacian(model, x) * R[..., 0]).sum()
        loss_r = (hd_ref.sum(-1) * R[..., 0]).sum()
    else:
        out = thd.mlp_derivatives(model, x, second="diag")
        val_r = model(x)
        jac_r = torch.func.vmap(torch.func.jacrev(model))(x)
        loss_e = (out.second * R).sum() + (out.gradient * R).sum() + (out.value**2).sum()
        loss_r = (hd_ref * R).sum() + (jac_r * R).sum() + (val_r**2).sum()
    (gx_e,) = torch.autograd.grad(loss_e, x)
    (gx_r,) = torch.autograd.grad(loss_r, x)
    assert_rel(gx_e, gx_r, what="d loss / dx")


# ---- weighted Laplacian tr(A H) --------------------------------------------------------------


def _wl_setup(device, d=4, m=2):
    model = _mlp([nn.Tanh(), nn.SiLU(), nn.GELU()], d, 6, m, seed=31).to(device)
    x = _x(5, d, device)
    H = torch_hessian(model, x).detach()
    return model, x, H


def _trAH(A, H):
    return torch.einsum("ij,...ij->...", A, H), torch.einsum("ij,...ij->...", A.abs(), H.abs()).max().item()


@pytest.mark.parametrize("r", [1, 2, 4, 7])
def test_weighted_laplacian_factor_and_A(device, r):
    """A = L L^T given as factor=L (d, r) and as A: r < d is rank-deficient PSD (the eigenvalue
    factorisation sees rounding-level negative eigenvalues and must accept them), r >= d SPD."""
    model, x, H = _wl_setup(device)
    g = torch.Generator().manual_seed(r)
    L = torch.randn(4, r, generator=g, dtype=torch.float64).to(device)
    A = L @ L.t()
    ref, scale = _trAH(A, H)
    out_f = thd.mlp_weighted_laplacian(model, x, factor=L)
    out_a = thd.mlp_weighted_laplacian(model, x, A=A)
    assert out_f.shape == (5, 2)
    assert_rel(out_f, ref, what="factor=L", scale=scale)
    assert_rel(out_a, ref, what="A=L L^T", scale=scale)
    with torch.no_grad():
        assert_rel(thd.mlp_weighted_laplacian(model, x, factor=L), ref, what="no-grad factor", scale=scale)
    # unbatched point
    assert_rel(thd.mlp_weighted_laplacian(model, x[2], A=A), ref[2], what="unbatched", scale=scale)


def test_weighted_laplacian_special_cases(device):
    model, x, H = _wl_setup(device)
    lap = H.diagonal(dim1=-2, dim2=-1).sum(-1)
    eye = torch.eye(4, dtype=torch.float64, device=device)
    assert_rel(thd.mlp_weighted_laplacian(model, x, A=eye), lap, what="A = I")
    assert_rel(thd.mlp_weighted_laplacian(model, x, factor=eye), lap, what="factor = I")
    # a diagonal A weights the Hessian diagonal
    w = torch.tensor([0.5, 0.0, 2.0, 3.0], dtype=torch.float64, device=device)
    hd = H.diagonal(dim1=-2, dim2=-1)
    assert_rel(thd.mlp_weighted_laplacian(model, x, A=torch.diag(w)), (hd * w).sum(-1), what="diag A")
    # A = 0 (PSD, rank 0)
    z = thd.mlp_weighted_laplacian(model, x, A=torch.zeros(4, 4, dtype=torch.float64, device=device))
    assert z.shape == (5, 2) and torch.equal(z, torch.zeros_like(z))
    # the factor may have another dtype: it is converted
    L = torch.randn(4, 3, dtype=torch.float32, device=device)
    ref, scale = _trAH(L.double() @ L.double().t(), H)
    assert_rel(thd.mlp_weighted_laplacian(model, x, factor=L), ref, what="float32 factor", scale=scale)


def test_weighted_laplacian_gradient_wrt_params(device):
    model, x, _ = _wl_setup(device, d=3, m=1)
    L = torch.tensor([[1.0, 0.0], [0.5, 2.0], [-1.0, 0.3]], dtype=torch.float64, device=device)
    A = L @ L.t()
    params = list(model.parameters())
    loss_e = (thd.mlp_weighted_laplacian(model, x, factor=L) ** 2).mean()
    xx = x.detach().requires_grad_(True)
    u = model(xx)
    (g,) = torch.autograd.grad(u.sum(), xx, create_graph=True)
    rows = [torch.autograd.grad(g[:, j].sum(), xx, create_graph=True)[0] for j in range(3)]
    H = torch.stack(rows, 1)  # (N, d, d), symmetric
    loss_r = (torch.einsum("ij,nij->n", A, H) ** 2).mean()
    for a, b in zip(_param_grads(loss_e, params), _param_grads(loss_r, params)):
        assert_rel(a, b, what="weighted-laplacian param grad")


def test_weighted_laplacian_errors(device):
    model, x, _ = _wl_setup(device)
    dd = dict(dtype=torch.float64, device=device)
    L = torch.randn(4, 2, **dd)
    A = L @ L.t() + torch.eye(4, **dd)
    nonsym = A.clone()
    nonsym[0, 1] += 0.5
    with pytest.raises(ValueError, match="symmetric"):
        thd.mlp_weighted_laplacian(model, x, A=nonsym)
    indefinite = torch.diag(torch.tensor([1.0, -0.5, 2.0, 1.0], **dd))
    with pytest.raises(ValueError, match="positive semi-definite"):
        thd.mlp_weighted_laplacian(model, x, A=indefinite)
    with pytest.raises(ValueError, match="positive semi-definite"):
        thd.mlp_weighted_laplacian(model, x, A=-A)
    with pytest.raises(ValueError, match="exactly one"):
        thd.mlp_weighted_laplacian(model, x, A=A, factor=L)
    with pytest.raises(ValueError, match="exactly one"):
        thd.mlp_weighted_laplacian(model, x)
    with pytest.raises(ValueError):
        thd.mlp_weighted_laplacian(model, x, A=torch.eye(3, **dd))  # wrong size
    with pytest.raises(ValueError):
        thd.mlp_weighted_laplacian(model, x, factor=torch.ones(3, 2, **dd))  # wrong d
    with pytest.raises(ValueError):
        thd.mlp_weighted_laplacian(model, x, factor=torch.ones(4, **dd))  # not (d, r)


# ---- mixed partials --------------------------------------------------------------------------

PAIRS = [(0, 0), (0, 1), (1, 0), (2, 1), (1, 2), (-1, 0), (-2, -2), (1, -1), (3, 3)]


@pytest.mark.parametrize("grad_mode", [True, False])
def test_mixed_partials(device, grad_mode):
    model = _mlp([nn.Tanh(), nn.SiLU(), nn.Softplus()], 4, 6, 3, seed=41).to(device)
    x = _x(5, 4, device)
    H = torch_hessian(model, x).detach()
    ref = torch.stack([H[..., i, j] for i, j in PAIRS], -1)  # (N, m, P)
    with torch.set_grad_enabled(grad_mode):
        out = thd.mlp_mixed_partials(model, x, PAIRS)
    assert out.requires_grad == grad_mode
    assert_rel(out, ref, what="mixed partials")
    # symmetric pairs agree; unbatched; a single pair
    assert_rel(out[..., 1], out[..., 2].detach(), rel=1e-13, what="(0,1) vs (1,0)")
    assert_rel(thd.mlp_mixed_partials(model, x[3], PAIRS), ref[3], what="unbatched")
    assert_rel(thd.mlp_mixed_partials(model, x, [(2, 0)]), H[..., 2, 0].unsqueeze(-1), what="one pair")


def test_mixed_partials_gradient_wrt_params(device):
    model = _mlp([nn.Tanh(), nn.GELU()], 3, 5, 1, seed=42).to(device)
    x = _x(4, 3, device)
    pairs = [(0, 1), (2, 2), (1, 2)]
    params = list(model.parameters())
    loss_e = (thd.mlp_mixed_partials(model, x, pairs) ** 2).sum()
    xx = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xx).sum(), xx, create_graph=True)
    hrows = {i: torch.autograd.grad(g[:, i].sum(), xx, create_graph=True)[0] for i in (0, 1, 2)}
    loss_r = sum((hrows[i][:, j] ** 2).sum() for i, j in pairs)
    for a, b in zip(_param_grads(loss_e, params), _param_grads(loss_r, params)):
        assert_rel(a, b, what="mixed-partials param grad")


def _weakly_coupled_model(device, eps):
    """d = 2; units 0-3 see x0 (+ eps * x1 through one weight), units 4-7 see x1 only, every
    later layer block-diagonal: u = f(x0 + eps-coupling) + g(x1), so d2u/dx0dx1 = O(eps) while
    the diagonal entries are O(1). torch.func's H01 is then a sum of O(eps) products (the O(1)
    paths multiply exact zeros): accurate to rounding relative to H01 itself."""
    torch.manual_seed(5)
    l1, l2, l3 = nn.Linear(2, 8), nn.Linear(8, 8), nn.Linear(8, 1)
    with torch.no_grad():
        W1 = torch.zeros(8, 2)
        W1[:4, 0] = torch.randn(4)
        W1[4:, 1] = torch.randn(4)
        W1[0, 1] = eps
        l1.weight.copy_(W1)
        mask = torch.block_diag(torch.ones(4, 4), torch.ones(4, 4))
        l2.weight.mul_(mask)
    return nn.Sequential(l1, nn.Tanh(), l2, nn.Tanh(), l3).double().to(device)


def test_mixed_partials_tiny_off_diagonal(device):
    """The off-diagonal entry is ~1e-9 of the diagonal ones: a polarisation formula
    ((e_i+e_j)^T H (e_i+e_j) - H_ii - H_jj) / 2 would keep only ~7 of its digits; the bilinear
    form keeps all of them, so the bound here is relative to |H01| itself, not to max |H|."""
    model = _weakly_coupled_model(device, eps=1e-9)
    x = _x(5, 2, device)
    H = torch_hessian(model, x).detach()
    h01 = H[:, 0, 0, 1]
    assert (h01.abs() > 0).all()
    assert h01.abs().max() < 1e-7 * H.diagonal(dim1=-2, dim2=-1).abs().max(), "not a tiny off-diagonal"
    out = thd.mlp_mixed_partials(model, x, [(0, 1), (1, 0), (0, 0), (1, 1)])
    rel01 = ((out[:, 0, 0] - h01).abs() / h01.abs()).max().item()
    rel10 = ((out[:, 0, 1] - h01).abs() / h01.abs()).max().item()
    assert rel01 <= REL and rel10 <= REL, (rel01, rel10)
    assert_rel(out[:, 0, 2], H[:, 0, 0, 0], what="H00")
    assert_rel(out[:, 0, 3], H[:, 0, 1, 1], what="H11")


def test_mixed_partials_errors(device):
    model = _mlp([nn.Tanh()], 3, 4, 1).to(device)
    x = _x(2, 3, device)
    with pytest.raises(ValueError, match="empty"):
        thd.mlp_mixed_partials(model, x, [])
    for bad in ([(0, 3)], [(-4, 0)], [(0, 1), (5, 5)]):
        with pytest.raises(ValueError, match="out of range"):
            thd.mlp_mixed_partials(model, x, bad)
    with pytest.raises(TypeError):
        thd.mlp_mixed_partials(model, x, [(0, 1, 2)])


# ---- Hutchinson ------------------------------------------------------------------------------


def _hutch_model(device):
    return _mlp([nn.Tanh(), nn.SiLU()], 5, 6, 2, seed=51).to(device)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dims", [None, [0, 2, -1]], ids=["all", "dims"])
def test_hutchinson_unbiased(device, distribution, dims):
    """200 independent seeded calls with 4 probes: the mean is within 5 standard errors (taken
    from the samples themselves) of the exact Laplacian at every point and output. The seed is
    fixed, so the test is deterministic; for a fresh seed an unbiased estimator would fail it
    with probability ~6e-7 per entry. A bias of the size of a missing off-diagonal term or a wrong
    probe scale is many standard errors (checked through the variance below)."""
    model = _hutch_model(device)
    x = _x(4, 5, device)
    H = torch_hessian(model, x).detach()
    sel = list(range(5)) if dims is None else [i % 5 for i in dims]
    Hs = H[..., sel, :][..., :, sel]
    exact = Hs.diagonal(dim1=-2, dim2=-1).sum(-1)
    gen = torch.Generator(device=device).manual_seed(2024)
    n_calls, S = 200, 4
    with torch.no_grad():
        samples = torch.stack(
            [
                thd.mlp_laplacian_hutchinson(model, x, num_samples=S, distribution=distribution, generator=gen, dims=dims)
                for _ in range(n_calls)
            ]
        )
    assert samples.shape == (n_calls, 4, 2) and samples.dtype == torch.float64
    mean, std = samples.mean(0), samples.std(0)
    se = std / math.sqrt(n_calls)
    assert (se > 0).all(), "the estimator did not vary: probes not random?"
    assert ((mean - exact).abs() < 5 * se).all(), ((mean - exact) / se)
    # the variance of one probe is known: 2 sum_{i != j} H_ij^2 (Rademacher), 2 ||H||_F^2
    # (Gaussian); the mean of S probes has 1/S of it. 200 draws estimate it to ~10-25 %
    # relative (kurtosis-dependent); [0.5, 2] catches wrong probe scales or distributions.
    off = Hs - torch.diag_embed(Hs.diagonal(dim1=-2, dim2=-1))
    var1 = 2 * (off**2).sum((-2, -1)) if distribution == "rademacher" else 2 * (Hs**2).sum((-2, -1))
    ratio = std**2 / (var1 / S)
    assert ((ratio > 0.5) & (ratio < 2.0)).all(), ratio


def _separable_model(device, d=4, h=3, m=2):
    """u(x) = sum_i f_i(x_i): block-diagonal layers, so the Hessian is exactly diagonal and a
    Rademacher probe (v_i^2 = 1) gives the exact Laplacian for any draw."""
    torch.manual_seed(6)
    l1, l2, l3 = nn.Linear(d, d * h), nn.Linear(d * h, d * h), nn.Linear(d * h, m)
    with torch.no_grad():
        l1.weight.mul_(torch.kron(torch.eye(d), torch.ones(h, 1)))
        l2.weight.mul_(torch.kron(torch.eye(d), torch.ones(h, h)))
    return nn.Sequential(l1, nn.Tanh(), l2, nn.GELU(), l3).double().to(device)


@pytest.mark.parametrize("dims", [None, [1, -1]])
def test_hutchinson_rademacher_exact_for_diagonal_hessian(device, dims):
    model = _separable_model(device)
    x = _x(5, 4, device)
    H = torch_hessian(model, x).detach()
    assert torch.equal(H, torch.diag_embed(H.diagonal(dim1=-2, dim2=-1))), "Hessian not diagonal"
    sel = list(range(4)) if dims is None else [i % 4 for i in dims]
    exact = H.diagonal(dim1=-2, dim2=-1)[..., sel].sum(-1)
    gen = torch.Generator(device=device).manual_seed(0)
    for S in (1, 3, 16):
        est = thd.mlp_laplacian_hutchinson(model, x, num_samples=S, generator=gen, dims=dims)
        assert est.shape == (5, 2)
        assert_rel(est, exact, what=f"Rademacher S={S}")
    assert_rel(thd.mlp_laplacian_hutchinson(model, x[1], num_samples=2, generator=gen, dims=dims), exact[1], what="unbatched")


@pytest.mark.parametrize("dim", [0, 3, -1])
def test_hutchinson_rademacher_exact_along_one_dim(device, dim):
    """dims=[i]: a Rademacher probe is v = +-e_i, so v^T H v = H_ii exactly, for any model."""
    model = _hutch_model(device)
    x = _x(4, 5, device)
    H = torch_hessian(model, x).detach()
    gen = torch.Generator(device=device).manual_seed(3)
    est = thd.mlp_laplacian_hutchinson(model, x, num_samples=5, generator=gen, dims=[dim])
    assert_rel(est, H[..., dim, dim], what=f"dims=[{dim}]")


def test_hutchinson_reproducible(device):
    model = _hutch_model(device)
    x = _x(3, 5, device)
    for dist in ("rademacher", "gaussian"):
        a = thd.mlp_laplacian_hutchinson(model, x, 5, dist, torch.Generator(device=device).manual_seed(7))
        b = thd.mlp_laplacian_hutchinson(model, x, 5, dist, torch.Generator(device=device).manual_seed(7))
        c = thd.mlp_laplacian_hutchinson(model, x, 5, dist, torch.Generator(device=device).manual_seed(8))
        assert torch.equal(a, b), dist
        assert not torch.equal(a, c), dist
    # without a generator: the global RNG
    torch.manual_seed(3)
    a = thd.mlp_laplacian_hutchinson(model, x)
    torch.manual_seed(3)
    b = thd.mlp_laplacian_hutchinson(model, x)
    assert torch.equal(a, b)


def test_hutchinson_differentiable(device):
    """The estimate carries a graph to the parameters. On the separable model a Rademacher
    estimate equals the exact Laplacian for any draw, and stays equal under any perturbation that
    keeps the model separable: so its gradient equals mlp_laplacian's on the biases, the output
    weights and the in-block weights (the off-block weights, exact zeros, couple the inputs:
    there the two gradients differ, as they should)."""
    d, h = 3, 2
    model = _separable_model(device, d=d, h=h, m=1)
    x = _x(4, d, device)
    params = list(model.parameters())
    est = thd.mlp_laplacian_hutchinson(model, x, num_samples=3, generator=torch.Generator(device=device).manual_seed(1))
    assert est.requires_grad
    g_e = _param_grads((est**2).mean(), params)
    g_r = _param_grads((thd.mlp_laplacian(model, x) ** 2).mean(), params)
    masks = {
        id(model[0].weight): torch.kron(torch.eye(d), torch.ones(h, 1)),
        id(model[2].weight): torch.kron(torch.eye(d), torch.ones(h, h)),
    }
    for p, a, b in zip(params, g_e, g_r):
        mask = masks.get(id(p))
        if mask is not None:
            mask = mask.to(device=device, dtype=a.dtype)
            a, b = a * mask, b * mask
        assert_rel(a, b, what=f"hutchinson param grad {tuple(p.shape)} (separable model)")


def test_hutchinson_errors(device):
    model = _hutch_model(device)
    x = _x(2, 5, device)
    for bad in (0, -1, 2.5, True, "4", None):
        with pytest.raises(ValueError, match="num_samples"):
            thd.mlp_laplacian_hutchinson(model, x, num_samples=bad)
    for bad in ("uniform", "Rademacher", "normal", None):
        with pytest.raises(ValueError, match="distribution"):
            thd.mlp_laplacian_hutchinson(model, x, distribution=bad)


# ---- training, weighted Laplacian, mixed partials, Hutchinson: a second set (was tests/test_mlp_engine.py) ---

def _rel(a, b):
    scale = b.abs().max().clamp_min(1e-300)
    return ((a - b).abs().max() / scale).item()


def _ref(model, x):
    """(value, gradient, Hessian) per point by torch.func: (N, m), (N, m, d), (N, m, d, d)."""
    val = model(x)
    jac = torch.func.vmap(torch.func.jacrev(model))(x)
    hess = torch.func.vmap(torch.func.hessian(model))(x)
    return val, jac, hess

def _nested_laplacian(model, x):
    x = x.clone().requires_grad_()
    u = model(x)
    cols = []
    for i in range(u.shape[1]):
        (g,) = torch.autograd.grad(u[:, i].sum(), x, create_graph=True)
        lap = sum(torch.autograd.grad(g[:, k].sum(), x, create_graph=True)[0][:, k] for k in range(x.shape[1]))
        cols.append(lap)
    return torch.stack(cols, 1)


@pytest.mark.parametrize("act", [nn.Tanh(), nn.SiLU(), nn.GELU(), nn.Softplus()], ids=repr)
@pytest.mark.parametrize("d,w,m", [(3, 8, 1), (17, 8, 2)], ids=["d<w", "d>w-compressed"])
def test_laplacian_loss_gradients_match_nested_autograd(device, act, d, w, m):
    model = _mlp([act] * 2, d, w, m, seed=5).to(device)
    x = torch.randn(6, d, dtype=torch.float64, device=device)
    params = list(model.parameters())

    def grads(lap):
        loss = ((lap - 1.0) ** 2).mean()
        # the output bias does not change a Laplacian: its gradient is unused
        return torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)

    for ours, ref in zip(grads(thd.mlp_laplacian(model, x)), grads(_nested_laplacian(model, x))):
        assert _rel(ours, ref) <= REL or ref.abs().max() == 0 and ours.abs().max() == 0


def test_hessian_diag_training_and_x_gradient(device):
    model = _mlp([nn.Tanh(), nn.GELU()], 3, 8, 1, seed=6).to(device)
    x = torch.randn(5, 3, dtype=torch.float64, device=device)
    params = list(model.parameters())
    xa = x.clone().requires_grad_()
    hd = thd.mlp_hessian_diag(model, xa)
    loss = (hd**2).sum()
    g_ours = torch.autograd.grad(loss, params + [xa], allow_unused=True, materialize_grads=True)
    xb = x.clone().requires_grad_()
    ref = torch.func.vmap(torch.func.hessian(model))(xb).diagonal(dim1=-2, dim2=-1)
    g_ref = torch.autograd.grad((ref**2).sum(), params + [xb], allow_unused=True, materialize_grads=True)
    for a, b in zip(g_ours, g_ref):
        assert _rel(a, b) <= REL or b.abs().max() == 0 and a.abs().max() == 0


def test_weighted_laplacian(device):
    model = _mlp([nn.Tanh(), nn.SiLU()], 4, 8, 2, seed=7).to(device)
    x = torch.randn(5, 4, dtype=torch.float64, device=device)
    H = _ref(model, x)[2]
    torch.manual_seed(8)
    L = torch.randn(4, 2, dtype=torch.float64, device=device)  # rank-2 PSD A = L L^T
    A = L @ L.t()
    expect = torch.einsum("ij,nmij->nm", A, H)
    assert _rel(thd.mlp_weighted_laplacian(model, x, factor=L), expect) <= REL
    assert _rel(thd.mlp_weighted_laplacian(model, x, A=A), expect) <= 1e-9  # eigh of a PSD A
    spd = A + torch.eye(4, dtype=torch.float64, device=device)
    assert _rel(thd.mlp_weighted_laplacian(model, x, A=spd), torch.einsum("ij,nmij->nm", spd, H)) <= 1e-9
    with pytest.raises(ValueError, match="symmetric"):
        thd.mlp_weighted_laplacian(model, x, A=A + torch.triu(torch.ones_like(A), 1))
    with pytest.raises(ValueError, match="semi-definite"):
        thd.mlp_weighted_laplacian(model, x, A=-spd)
    with pytest.raises(ValueError, match="exactly one"):
        thd.mlp_weighted_laplacian(model, x)
    with pytest.raises(ValueError, match="exactly one"):
        thd.mlp_weighted_laplacian(model, x, A=A, factor=L)


def test_mixed_partials_match_torch_func_hessian(device):
    model = _mlp([nn.Tanh(), nn.Softplus()], 4, 8, 2, seed=9).to(device)
    x = torch.randn(5, 4, dtype=torch.float64, device=device)
    H = _ref(model, x)[2]
    pairs = [(0, 1), (1, 0), (2, 2), (-1, 0), (3, 2)]
    got = thd.mlp_mixed_partials(model, x, pairs)
    assert got.shape == (5, 2, len(pairs))
    for p, (i, j) in enumerate(pairs):
        assert _rel(got[..., p], H[..., i, j]) <= REL


def test_mixed_partial_small_next_to_diagonal(device):
    """u = tanh(a x0) + tanh(b x1) + eps * x0 x1-ish coupling: H01 is tiny next to H00, H11; the
    bilinear form keeps its relative accuracy (polarisation would lose it)."""
    lin = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 3.0], [1e-4, 1e-4]]))
    out = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        out.weight.copy_(torch.tensor([[1.0, 1.0, 1.0]]))
    model = nn.Sequential(lin, nn.Tanh(), out).double().to(device)
    x = torch.tensor([[0.3, -0.2]], dtype=torch.float64, device=device)
    H = _ref(model, x)[2]
    got = thd.mlp_mixed_partials(model, x, [(0, 1)])
    assert abs(H[0, 0, 0, 1].item()) < 1e-6 * abs(H[0, 0, 0, 0].item())
    assert _rel(got[0, 0, 0], H[0, 0, 0, 1]) <= 1e-10


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_unbiased_and_reproducible(device, distribution):
    model = _mlp([nn.Tanh(), nn.SiLU()], 6, 10, 1, seed=10).to(device)
    x = torch.randn(3, 6, dtype=torch.float64, device=device)
    exact = _ref(model, x)[2].diagonal(dim1=-2, dim2=-1).sum(-1)
    gen = torch.Generator(device=device).manual_seed(11)
    runs = torch.stack(
        [thd.mlp_laplacian_hutchinson(model, x, num_samples=4, distribution=distribution, generator=gen) for _ in range(300)]
    )
    mean, se = runs.mean(0), runs.std(0) / runs.shape[0] ** 0.5
    # unbiased: the mean of 300 independent estimates is within 5 standard errors of the truth
    assert ((mean - exact).abs() <= 5 * se + 1e-12).all(), ((mean - exact) / se)
    assert (runs.std(0) > 0).all()  # it is an estimate, not the exact value in disguise
    a = thd.mlp_laplacian_hutchinson(model, x, 5, distribution, torch.Generator(device=device).manual_seed(3))
    b = thd.mlp_laplacian_hutchinson(model, x, 5, distribution, torch.Generator(device=device).manual_seed(3))
    assert torch.equal(a, b)
    sub = thd.mlp_laplacian_hutchinson(model, x, 8, distribution, gen, dims=[0, 1])
    assert sub.shape == (3, 1)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="num_samples"):
            thd.mlp_laplacian_hutchinson(model, x, num_samples=bad)
    with pytest.raises(ValueError, match="distribution"):
        thd.mlp_laplacian_hutchinson(model, x, distribution="uniform")


def test_hutchinson_exact_with_enough_orthogonal_probes(device):
    """Rademacher probes whose outer products sum to d*I (a Hadamard basis) give the exact
    Laplacian: a deterministic check of the scaling. Uses mlp_weighted_laplacian with
    factor = H_d / sqrt(d) as the same engine call the estimator makes."""
    model = _mlp([nn.Tanh()], 4, 8, 1, seed=12).to(device)
    x = torch.randn(3, 4, dtype=torch.float64, device=device)
    had = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64, device=device)
    exact = _ref(model, x)[2].diagonal(dim1=-2, dim2=-1).sum(-1)
    assert _rel(thd.mlp_weighted_laplacian(model, x, factor=had / 2.0), exact) <= REL
