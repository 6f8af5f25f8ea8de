"""The second-order engine (mlp_laplacian, mlp_hessian_diag, mlp_derivatives and the wrappers)
against torch.func / nested torch.autograd in float64.

Tolerance: 1e-10 relative to the largest |entry| of the reference (the issue's bound). Both sides
evaluate float64 sums of products of the same weights in different orders; observed worst
differences are ~5e-15 relative, so the bound leaves room for summation order but catches any
wrong term (a missing layer or a wrong sigma'' is O(1) relative).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import torchhessdiag as thd

# every test runs through both propagations of the engine (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("engine_path")


REL = 1e-10


def _rel(a, b):
    scale = b.abs().max().clamp_min(1e-300)
    return ((a - b).abs().max() / scale).item()


def _ref(model, x):
    """(value, gradient, Hessian) per point by torch.func: (N, m), (N, m, d), (N, m, d, d)."""
    val = model(x)
    jac = torch.func.vmap(torch.func.jacrev(model))(x)
    hess = torch.func.vmap(torch.func.hessian(model))(x)
    return val, jac, hess


def _mlp(acts, d, w, m, bias=True, seed=0):
    """Linear(d, w), act, Linear(w, w), act, ..., Linear(w, m); one act per hidden layer."""
    torch.manual_seed(seed)
    layers = []
    width_in = d
    for act in acts:
        layers += [nn.Linear(width_in, w, bias=bias), act]
        width_in = w
    layers.append(nn.Linear(width_in, m, bias=bias))
    return nn.Sequential(*layers).double()


ACTIVATIONS = [
    nn.Tanh(),
    nn.Sigmoid(),
    nn.Softplus(),
    nn.Softplus(beta=2.0, threshold=5.0),
    nn.SiLU(),
    nn.GELU(),
    nn.GELU(approximate="tanh"),
    nn.ELU(alpha=0.7),
    # torch's CELU backward rounds 1/alpha to float32 (derivatives.yaml), which makes torch.func
    # itself wrong by ~1e-8 in float64 for alpha = 0.7; alpha = 0.5 has an exact reciprocal
    nn.CELU(alpha=0.5),
    thd.nn.Sine(2.0),
    thd.nn.Cosine(),
    thd.nn.Tanh(),
]

# (depth, d, width, m, bias): widths below and above d, d in {1, 2, 3, 17, 64}, m in {1, 3}
CONFIGS = [
    (1, 1, 4, 1, True),
    (2, 2, 8, 3, True),
    (3, 3, 16, 1, False),
    (4, 17, 8, 1, True),  # d > width: the Laplacian's QR compression
    (6, 3, 6, 3, True),
    (2, 64, 16, 1, True),
]


def _check_all(model, x):
    val, jac, hess = _ref(model, x)
    diag = hess.diagonal(dim1=-2, dim2=-1)
    assert _rel(thd.mlp_hessian_diag(model, x), diag) <= REL
    assert _rel(thd.mlp_laplacian(model, x), diag.sum(-1)) <= REL
    out = thd.mlp_derivatives(model, x, second="diag")
    assert _rel(out.value, val) <= REL
    assert _rel(out.gradient, jac) <= REL
    assert _rel(out.second, diag) <= REL
    lap = thd.mlp_derivatives(model, x, second="laplacian").second
    assert _rel(lap, diag.sum(-1)) <= REL
    with torch.no_grad():  # the chunked in-place path
        assert _rel(thd.mlp_hessian_diag(model, x), diag) <= REL
        assert _rel(thd.mlp_laplacian(model, x), diag.sum(-1)) <= REL


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: repr(a))
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "depth{}-d{}-w{}-m{}-bias{}".format(*c))
def test_matches_torch_func(device, act, cfg):
    depth, d, w, m, bias = cfg
    model = _mlp([act] * depth, d, w, m, bias).to(device)
    x = torch.randn(4, d, dtype=torch.float64, device=device)
    _check_all(model, x)


def test_mixed_activations_identity_dropout_nesting(device):
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(3, 8),
        nn.Tanh(),
        nn.Dropout(0.3),
        nn.Sequential(nn.Linear(8, 8, bias=False), nn.Identity(), nn.SiLU()),
        nn.Linear(8, 6),
        nn.Linear(6, 8),  # two linears in a row
        nn.GELU(),
        nn.Linear(8, 2),
        nn.Softplus(),  # ends with an activation
    ).double().to(device).eval()
    _check_all(model, torch.randn(5, 3, dtype=torch.float64, device=device))


def test_activation_first_and_reused_instance(device):
    """An activation straight on x, and one nn.Tanh instance used twice (a reused instance was
    once silently dropped by named_children())."""
    torch.manual_seed(2)
    t = nn.Tanh()
    model = nn.Sequential(nn.Tanh(), nn.Linear(3, 7), t, nn.Linear(7, 7), t, nn.Linear(7, 1)).double().to(device)
    _check_all(model, torch.randn(4, 3, dtype=torch.float64, device=device))


def test_dims_and_unbatched(device):
    model = _mlp([nn.Tanh(), nn.SiLU()], 4, 9, 2, seed=3).to(device)
    x = torch.randn(5, 4, dtype=torch.float64, device=device)
    diag = _ref(model, x)[2].diagonal(dim1=-2, dim2=-1)
    assert _rel(thd.mlp_laplacian(model, x, dims=[1, 2, 3]), diag[..., 1:].sum(-1)) <= REL
    assert _rel(thd.mlp_laplacian(model, x, dims=[-1, 0]), diag[..., [3, 0]].sum(-1)) <= REL
    assert _rel(thd.mlp_hessian_diag(model, x, dims=[2, 0]), diag[..., [2, 0]]) <= REL
    assert thd.mlp_hessian_diag(model, x, dims=[2, 0]).shape == (5, 2, 2)
    lap1 = thd.mlp_laplacian(model, x[1])
    assert lap1.shape == (2,) and _rel(lap1, diag[1].sum(-1)) <= REL
    hd1 = thd.mlp_hessian_diag(model, x[1])
    assert hd1.shape == (2, 4) and _rel(hd1, diag[1]) <= REL
    out1 = thd.mlp_derivatives(model, x[1])
    assert out1.value.shape == (2,) and out1.gradient.shape == (2, 4) and out1.second.shape == (2,)


def test_float32_close_to_torch_func_float32(device):
    """float32: compared with torch.func in float32 and both with float64; the engine's error must
    be of the size of torch's own float32 error (bound: 10x torch's error + 1e-5 of the scale)."""
    model64 = _mlp([nn.Tanh()] * 3, 5, 32, 1, seed=4).to(device)
    x64 = torch.randn(16, 5, dtype=torch.float64, device=device)
    exact = _ref(model64, x64)[2].diagonal(dim1=-2, dim2=-1)
    model32 = model64.float()
    x32 = x64.float()
    torch_err = (_ref(model32, x32)[2].diagonal(dim1=-2, dim2=-1).double() - exact).abs().max()
    ours_err = (thd.mlp_hessian_diag(model32, x32).double() - exact).abs().max()
    assert ours_err <= 10 * torch_err + 1e-5 * exact.abs().max()


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
def test_training_gradients_match_nested_autograd(device, act, d, w, m):
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


def test_mixed_partials(device):
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


def test_linear_model_gives_zeros_never_none(device):
    model = nn.Sequential(nn.Linear(3, 5), nn.Identity(), thd.nn.Identity(), nn.Linear(5, 2)).double().to(device)
    x = torch.randn(4, 3, dtype=torch.float64, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a linear net is exactly linear: no warning
        results = {
            "lap": (thd.mlp_laplacian(model, x), (4, 2)),
            "hd": (thd.mlp_hessian_diag(model, x), (4, 2, 3)),
            "mixed": (thd.mlp_mixed_partials(model, x, [(0, 1)]), (4, 2, 1)),
            "weighted": (thd.mlp_weighted_laplacian(model, x, factor=torch.eye(3, dtype=torch.float64, device=device)), (4, 2)),
            "hutch": (thd.mlp_laplacian_hutchinson(model, x, 3), (4, 2)),
            "deriv": (thd.mlp_derivatives(model, x).second, (4, 2)),
        }
    for name, (t, shape) in results.items():
        assert t is not None and t.shape == shape and t.dtype == torch.float64 and t.device.type == torch.device(device).type, name
        assert torch.equal(t, torch.zeros_like(t)), name
    assert _rel(thd.mlp_derivatives(model, x).gradient, _ref(model, x)[1]) <= REL


@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.1), thd.nn.ReLU()], ids=repr)
def test_piecewise_linear_model_zeros_and_warning(device, act):
    model = _mlp([act, act], 3, 8, 1, seed=13).to(device)
    x = torch.randn(4, 3, dtype=torch.float64, device=device)
    with pytest.warns(UserWarning, match="piecewise linear"):
        hd = thd.mlp_hessian_diag(model, x)
    assert torch.equal(hd, torch.zeros_like(hd))


def test_relu_mixed_with_tanh_is_exact_and_silent(device):
    model = _mlp([nn.ReLU(), nn.Tanh()], 3, 8, 1, seed=14).to(device)
    x = torch.randn(4, 3, dtype=torch.float64, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        hd = thd.mlp_hessian_diag(model, x)
    ref = _ref(model, x)[2].diagonal(dim1=-2, dim2=-1)
    assert ref.abs().max() > 0 and _rel(hd, ref) <= REL


class _Custom(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize(
    "bad",
    [nn.Conv1d(1, 1, 1), nn.LayerNorm(4), nn.Mish(), _Custom(), nn.Softmax(dim=-1)],
    ids=lambda m: type(m).__name__,
)
def test_unsupported_module_named(bad):
    model = nn.Sequential(nn.Linear(4, 4), bad, nn.Linear(4, 1))
    with pytest.raises(NotImplementedError, match=type(bad).__name__):
        thd.mlp_laplacian(model, torch.randn(2, 4))


def test_bad_inputs():
    model = _mlp([nn.Tanh()], 3, 4, 1)
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="Dropout.*eval"):
        thd.mlp_laplacian(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 1)).double(), x)
    with pytest.raises(ValueError, match="shape"):
        thd.mlp_laplacian(model, x.unsqueeze(0))
    with pytest.raises(ValueError, match="4 features.*expects 3|expects 3"):
        thd.mlp_laplacian(model, torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32 or float64"):
        thd.mlp_laplacian(model, torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="dtype"):
        thd.mlp_laplacian(model, x.float())
    for dims in ([3], [0, 0], []):
        with pytest.raises(ValueError, match="dims"):
            thd.mlp_laplacian(model, x, dims=dims)
    with pytest.raises(ValueError, match="second"):
        thd.mlp_derivatives(model, x, second="foo")
    with pytest.raises(ValueError, match="pairs"):
        thd.mlp_mixed_partials(model, x, [])
    with pytest.raises(ValueError, match="out of range"):
        thd.mlp_mixed_partials(model, x, [(0, 5)])
    with pytest.raises(TypeError, match="Module"):
        thd.mlp_laplacian(lambda t: t, x)


def test_empty_batch(device):
    model = _mlp([nn.Tanh()], 3, 4, 2).to(device)
    x = torch.zeros(0, 3, dtype=torch.float64, device=device)
    assert thd.mlp_laplacian(model, x).shape == (0, 2)
    assert thd.mlp_hessian_diag(model, x).shape == (0, 2, 3)
    with torch.no_grad():
        assert thd.mlp_laplacian(model, x).shape == (0, 2)
