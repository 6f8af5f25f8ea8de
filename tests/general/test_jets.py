"""The jet path of laplacian / hessian_diag / axis_derivatives: traced models are exact and take it.

Every expected value comes from nested torch.autograd.grad of the same model (tests/
_general_helpers.oracle), float64, relative tolerance 1e-10 of the quantity's scale (what is left
is rounding: the jets and nested autograd sum the same terms in different orders; observed
errors are ~1e-15). Every test asserts the path taken (``return_info``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchhessdiag as thd
from torchhessdiag import _rules_activation, graph, taylor
from torchhessdiag.activations import torch_function

from _general_helpers import SPECS, RandomNet, assert_close, oracle, torch_module

DT = torch.float64


# ---- the models of the issue -----------------------------------------------------------------


class ResidualMLP(nn.Module):
    def __init__(self, d=3, w=8, m=2, blocks=2):
        super().__init__()
        self.inp = nn.Linear(d, w)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(w, w), nn.Tanh()) for _ in range(blocks)])
        self.out = nn.Linear(w, m)

    def forward(self, x):
        h = F.silu(self.inp(x))
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


class FourierMLP(nn.Module):
    def __init__(self, d=3, n_freq=4, w=8, m=1):
        super().__init__()
        self.register_buffer("B", torch.randn(d, n_freq))
        self.net = nn.Sequential(nn.Linear(2 * n_freq, w), nn.SiLU(), nn.Linear(w, w), nn.GELU(), nn.Linear(w, m))

    def forward(self, x):
        z = 2 * math.pi * x @ self.B
        return self.net(torch.cat([torch.sin(z), torch.cos(z)], dim=-1))


class NormalisedMLP(nn.Module):
    def __init__(self, d=3, w=8):
        super().__init__()
        self.register_buffer("mean", torch.randn(d))
        self.register_buffer("std", torch.rand(d) + 0.5)
        self.net = nn.Sequential(nn.Linear(d, w), nn.Softplus(beta=2.0), nn.Linear(w, w), nn.Sigmoid(), nn.Linear(w, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)[:, 0]


class SpaceTimeModel(nn.Module):
    """u(t, x) = t * net(t, x) + sum_i sin(pi x_i): a hard initial condition; x = inp[:, 1:]."""

    def __init__(self, ds=2, w=8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1 + ds, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 1))

    def forward(self, inp):
        t, xs = inp[:, :1], inp[:, 1:]
        return t * self.net(torch.cat([t, xs], dim=1)) + torch.sin(math.pi * xs).sum(-1, keepdim=True)


MODELS = {
    "residual": lambda: ResidualMLP(),
    "fourier": lambda: FourierMLP(),
    "normalised": lambda: NormalisedMLP(),
    "spacetime": lambda: SpaceTimeModel(),
}


def _check_all(f, x, dims=None, order=4, rtol=1e-10):
    """laplacian, hessian_diag and axis_derivatives of f at x: exact, via the jet path."""
    want = oracle(f, x, order, dims)
    axis, info = thd.axis_derivatives(f, x, order, dims=dims, return_info=True)
    assert info.path == "jet", info
    assert_close(axis, want, rtol, "axis_derivatives")
    hd, info = thd.hessian_diag(f, x, dims=dims, return_info=True)
    assert info.path == "jet", info
    assert_close(hd, want[2], rtol, "hessian_diag")
    lap, info = thd.laplacian(f, x, dims=dims, return_info=True)
    assert info.path == "jet", info
    assert_close(lap, want[2].sum(-1), rtol, "laplacian")


@pytest.mark.parametrize("name", list(MODELS))
def test_traced_models_take_the_jet_path_and_are_exact(name, device):
    torch.manual_seed(1)
    model = MODELS[name]().to(device=device, dtype=DT)
    x = torch.randn(6, 3, dtype=DT, device=device)
    _check_all(model, x)
    assert thd.explain(model, x).path == "jet"


def test_spacetime_partial_laplacian_over_space_only():
    torch.manual_seed(2)
    model = SpaceTimeModel(ds=2).double()
    x = torch.rand(7, 3, dtype=DT)
    _check_all(model, x, dims=[1, 2])
    _check_all(model, x, dims=[-1])
    lap, info = thd.laplacian(model, x, dims=[1, 2], return_info=True)
    assert info.path == "jet" and lap.shape == (7, 1)


@pytest.mark.parametrize("seed", range(10))
def test_random_graphs(seed):
    g = torch.Generator().manual_seed(1000 + seed)
    d = int(torch.randint(1, 4, (1,), generator=g))
    m = [None, 1, 2][seed % 3]
    depth = 1 + seed % 4
    width = int(torch.randint(3, 7, (1,), generator=g))
    model = RandomNet(seed, d, m, depth, width).double()
    x = torch.randn(4, d, dtype=DT, generator=g)
    dims = None if seed % 2 == 0 or d == 1 else [d - 1, 0]
    _check_all(model, x, dims=dims)


def _oracle_act(spec):
    if spec.name == "celu":
        # torch's own nested autograd of F.celu with alpha != 1 is off by ~6e-8 in float64
        # (checked against mpmath, where the table is right to 1e-16), so the oracle
        # differentiates the closed form alpha * expm1(z / alpha) (z < 0) instead
        a = spec.a
        return lambda z: torch.where(z > 0, z, a * torch.expm1(z.clamp(max=0) / a))
    return torch_function(spec)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("form", ["function", "torch_module", "dropin"])
def test_every_activation(spec, form):
    """Each activation as a torch function, a torch.nn module and a torchhessdiag.nn drop-in;
    the oracle differentiates torch's function (never the drop-in)."""
    torch.manual_seed(3)
    if form == "torch_module":
        act = torch_module(spec)
        if act is None:
            pytest.skip(f"torch.nn has no module for {spec}")
    elif form == "dropin":
        act = thd.nn._DROPIN_OF[spec.name](spec)
    else:
        act = torch_function(spec)
    lin1, lin2 = nn.Linear(2, 5).double(), nn.Linear(5, 2).double()

    def make(act):
        def f(x):  # an activation between two layers, times a smooth branch: orders 1-4 nonzero
            h = act(lin1(x))
            return lin2(h) * torch.tanh(x[:, :1]) + h[:, 1:3]

        return f

    x = torch.randn(5, 2, dtype=DT)
    want = oracle(make(_oracle_act(spec)), x, 4)
    f = make(act)
    got, info = thd.axis_derivatives(f, x, 4, return_info=True)
    assert info.path == "jet", info
    assert_close(got, want, 1e-10, "axis_derivatives")
    hd, info = thd.hessian_diag(f, x, return_info=True)
    assert info.path == "jet"
    assert_close(hd, want[2], 1e-10, "hessian_diag")
    lap, info = thd.laplacian(f, x, return_info=True)
    assert info.path == "jet"
    assert_close(lap, want[2].sum(-1), 1e-10, "laplacian")


def test_mlp_axis_derivatives_orders():
    torch.manual_seed(4)
    mlp = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 8), nn.Softplus(), nn.Linear(8, 2)).double()
    x = torch.randn(5, 3, dtype=DT)
    want = oracle(mlp, x, 4)
    for order in range(5):
        got, info = thd.axis_derivatives(mlp, x, order, return_info=True)
        # order 2 is the engine (value, gradient, Hessian diagonal in one pass), 0 needs f only
        assert info.path == {0: "forward", 2: "engine"}.get(order, "jet"), info
        assert_close(got, want[: order + 1], 1e-10, f"order {order}")


def test_plain_function_with_captured_model_and_parameter():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    w = torch.randn(1, dtype=DT, requires_grad=True)

    def f(x):
        return net(x) * w + x[:, :1] ** 3 - x[:, 1:] * x[:, :1]

    x = torch.randn(5, 2, dtype=DT)
    _check_all(f, x)
    lap, info = thd.laplacian(f, x, return_info=True)
    assert info.path == "jet"
    (gw,) = torch.autograd.grad(lap.sum(), w)
    (gw_ref,) = torch.autograd.grad(oracle(f, x, 2, create_graph=True)[2].sum(), w)
    assert_close(gw, gw_ref, 1e-10, "dL/dw")


def test_parameter_and_input_gradients_through_the_jets():
    torch.manual_seed(6)
    model = FourierMLP(d=2, n_freq=3, w=6).double()
    x = torch.randn(5, 2, dtype=DT, requires_grad=True)
    params = list(model.parameters())
    for fn, pick in (
        (thd.laplacian, lambda o: o[2].sum(-1)),
        (thd.hessian_diag, lambda o: o[2]),
        (lambda f, x: thd.axis_derivatives(f, x, 4), lambda o: o),
    ):
        out = fn(model, x)
        loss = (out**2).sum()
        got = torch.autograd.grad(loss, params + [x], materialize_grads=True)
        ref_out = pick(oracle(model, x, 4 if fn not in (thd.laplacian, thd.hessian_diag) else 2, create_graph=True))
        want = torch.autograd.grad((ref_out**2).sum(), params + [x], materialize_grads=True)
        for g, r in zip(got, want):
            assert_close(g, r, 1e-9, "gradient")


def test_float32_matches_torch_float32_accuracy():
    torch.manual_seed(7)
    model = ResidualMLP(d=3, w=16, m=1).double()
    x64 = torch.randn(64, 3, dtype=DT)
    want = oracle(model, x64, 4)
    m32 = ResidualMLP(d=3, w=16, m=1)
    m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    x32 = x64.float()
    torch_err = (oracle(m32, x32, 4).double() - want).abs().amax(dim=(1, 2, 3))  # per order
    got, info = thd.axis_derivatives(m32, x32, 4, return_info=True)
    assert info.path == "jet" and got.dtype == torch.float32
    err = (got.double() - want).abs().amax(dim=(1, 2, 3))
    scale = want.abs().amax(dim=(1, 2, 3)).clamp_min(1.0)
    # the jets' float32 error is of the size of torch's own float32 nested-autograd error
    assert bool((err <= 10 * torch_err + 1e-5 * scale).all()), (err, torch_err)


def test_unbatched_and_scalar_outputs():
    torch.manual_seed(8)
    model = NormalisedMLP(d=3).double()  # (N,) output
    x = torch.randn(3, dtype=DT)
    want = oracle(model, x.unsqueeze(0), 4)
    assert_close(thd.axis_derivatives(model, x), want[:, 0], 1e-10, "axis unbatched")
    assert thd.hessian_diag(model, x).shape == (3,)
    assert thd.laplacian(model, x).shape == ()
    assert_close(thd.laplacian(model, x), want[2, 0].sum(), 1e-10, "laplacian unbatched")
    model2 = ResidualMLP(d=3, m=2).double()
    assert thd.hessian_diag(model2, x).shape == (2, 3)
    assert thd.axis_derivatives(model2, x, 3, dims=[2]).shape == (4, 2, 1)


def test_no_grad_results_have_no_graph():
    model = ResidualMLP().double()
    x = torch.randn(4, 3, dtype=DT)
    with torch.no_grad():
        out = thd.axis_derivatives(model, x, 4)
    assert not out.requires_grad
    assert_close(out, oracle(model, x, 4), 1e-10, "no_grad")


# ---- the pieces --------------------------------------------------------------------------------


def test_supported_pieces_trace_to_a_program():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.register_buffer("c", torch.randn(4))

        def forward(self, x):
            n = x.shape[0]
            h = torch.tanh(self.lin(x)).reshape(n, 2, 2).flatten(1)
            h = torch.stack([h, -h], dim=-1).sum(-1) + h.unsqueeze(-1).squeeze(-1) * self.c
            h = h.mean(-1, keepdim=True) - torch.ones_like(h) / 2 + F.linear(h, self.lin.weight.t()[:1])
            return (x[..., [0, 2]] @ torch.ones(2, 1, dtype=x.dtype)).square() + h.pow(3).div(4)

    m = M().double()
    prog = graph.build_program(m)
    kinds = {s.kind for s in prog.steps}
    assert {"linear", "activation", "reshape", "flatten", "stack", "sum", "mean", "getitem", "matmul", "pow", "square"} <= kinds
    x = torch.randn(5, 3, dtype=DT)
    _check_all(m, x)


def test_shared_first_order_rows_before_the_first_nonlinearity():
    """Up to the first activation the first-order rows are the same for every point: the jet
    keeps them as one (K, w) tensor."""
    m = NormalisedMLP().double()
    prog = graph.build_program(m)
    x = torch.randn(5, 3, dtype=DT)
    V = torch.eye(3, dtype=DT)
    seen = {}
    orig = taylor.RULES["linear_module"]  # nn.Linear modules: the rule gets the module first

    def spy(ctx, p, m, h, *a, **k):
        seen.setdefault("first", h.coefs[0].shape)
        return orig(ctx, p, m, h, *a, **k)

    taylor.RULES["linear_module"] = spy
    try:
        taylor.propagate(prog, x, V, 2)
    finally:
        taylor.RULES["linear_module"] = orig
    assert seen["first"] == (3, 3)  # (K, d), not (N, K, d)


def test_activation_jet_matches_composition_of_polynomials():
    """activation_jet against the exact Taylor coefficients of exp(p(t)) along one direction:
    y(t) = exp(h(t)) with h(t) a cubic; its derivatives at 0 by nested autograd of t."""
    coeffs = torch.tensor([0.3, -0.7, 1.1, 0.4, -0.9], dtype=DT)  # h0, h1..h4 (derivative form)
    t = torch.zeros((), dtype=DT, requires_grad=True)
    h_t = sum(coeffs[k] * t**k / math.factorial(k) for k in range(5))
    y = torch.exp(h_t)
    want = []
    cur = y
    for _ in range(4):
        (cur,) = torch.autograd.grad(cur, t, create_graph=True)
        want.append(cur.detach())
    h0 = coeffs[0].reshape(1, 1)
    D = [torch.exp(h0)] * 4
    H = [coeffs[k].reshape(1, 1, 1) for k in range(1, 5)]
    got = taylor.activation_jet(D, H)
    for k in range(4):
        assert abs(float(got[k]) - float(want[k])) <= 1e-12 * max(1.0, abs(float(want[k])))
    # collapsed form: s_y = sum over directions of the second coefficient
    H2 = [torch.tensor([[[0.5], [-1.5]]], dtype=DT), torch.tensor([[[0.2], [0.3]]], dtype=DT)]
    full = taylor.activation_jet(D[:2], H2)
    col = taylor.activation_jet(D[:2], [H2[0], H2[1].sum(1)], collapsed=True)
    assert torch.allclose(col[1], full[1].sum(1), rtol=1e-14, atol=0)


def test_numbers_on_either_side_and_alpha():
    torch.manual_seed(9)
    lin = nn.Linear(2, 3).double()

    def f(x):
        h = torch.tanh(lin(x))
        y = 2 + (1 - h) * 3
        y = y.add(h, alpha=2).sub(x[:, :1], alpha=0.5)
        y = (1 + 0 * h + 1) * y / 2 - (-h)
        return y[..., 0] * y[..., 1] + y[..., 2]

    _check_all(f, torch.randn(4, 2, dtype=DT))


def test_division_sqrt_and_real_powers_of_input_dependent_values():
    """1/h, a/h, sqrt, rsqrt, reciprocal, h ** -1.5 (Faa di Bruno with the closed-form derivatives of
    t^p): the jet path, exact to order 4 (before issue 15 division by an input-dependent value went
    to the fallback)."""
    torch.manual_seed(12)
    lin = nn.Linear(2, 3).double()

    def f(x):
        h = 2 + torch.tanh(lin(x))
        y = 1.0 / h + x[:, :1] / h + torch.sqrt(h) * torch.rsqrt(h + 1) + h.reciprocal() + h ** -1.5 + h.pow(0.5)
        return y.sum(-1)

    x = torch.randn(4, 2, dtype=DT)
    _check_all(f, x)


def test_fused_taylor_act_and_torch_ops_paths_agree(monkeypatch):
    """After the first nonlinearity activation_jet runs the fused taylor_act op; the torch-ops
    formulas serve the rest. Both paths against the oracle, and the op is really used."""
    if _rules_activation._TAYLOR_ACT is None:
        pytest.skip("this build has no taylor_act op")
    torch.manual_seed(10)
    model = ResidualMLP(d=2, w=5, m=1, blocks=2).double()
    x = torch.randn(4, 2, dtype=DT, requires_grad=True)
    want = oracle(model, x, 4)
    calls = []
    op = _rules_activation._TAYLOR_ACT

    def counting(D, H):
        calls.append(H.shape)
        return op(D, H)

    monkeypatch.setattr(_rules_activation, "_TAYLOR_ACT", counting)
    fused = thd.axis_derivatives(model, x, 4)
    assert len(calls) == 2 and calls[0][0] == 4  # the two residual blocks' tanh, order 4
    monkeypatch.setattr(_rules_activation, "_TAYLOR_ACT", None)
    plain = thd.axis_derivatives(model, x, 4)
    assert_close(fused, want, 1e-10, "fused")
    assert_close(plain, want, 1e-10, "torch ops")
    g_fused = torch.autograd.grad(fused.square().sum(), list(model.parameters()) + [x])
    g_plain = torch.autograd.grad(plain.square().sum(), list(model.parameters()) + [x])
    for a, b in zip(g_fused, g_plain):
        assert_close(a, b, 1e-10, "gradients")


@pytest.mark.parametrize("grad", [False, True])
def test_chunks_of_points_give_the_same_result(monkeypatch, grad):
    """Without a graph the jets run over chunks of points (rows are independent); forced tiny
    chunks here, against the oracle and against one block."""
    torch.manual_seed(11)
    model = SpaceTimeModel(ds=2, w=6).double()
    x = torch.rand(37, 3, dtype=DT)
    want = oracle(model, x, 3)
    one_block = thd.axis_derivatives(model, x, 3)
    monkeypatch.setattr(taylor, "_FIRST_CHUNK", 4)
    monkeypatch.setattr(taylor, "_CHUNK_ELEMENTS", 50)
    with torch.set_grad_enabled(grad):
        got = thd.axis_derivatives(model, x, 3)
        lap = thd.laplacian(model, x, dims=[1, 2])
        hd = thd.hessian_diag(model, x)
        lin = thd.hessian_diag(lambda x: x[:, :2] * 3.0 - 1.0, x)  # shared rows only, zeros
    assert_close(got, want, 1e-10, "chunked axis")
    assert_close(got, one_block, 1e-13, "chunked vs one block")
    assert_close(lap, want[2][..., 1:].sum(-1), 1e-10, "chunked laplacian")
    assert_close(hd, want[2], 1e-10, "chunked hessian_diag")
    assert lin.shape == (37, 2, 3) and bool((lin == 0).all())
    assert got.requires_grad == grad
