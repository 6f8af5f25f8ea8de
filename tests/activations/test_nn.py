"""torchhessdiag.nn: drop-in activation modules and ``convert``.

What is checked, and against what:

1. every drop-in against its torch.nn namesake (or the torch expression it stands for): the
   forward bit for bit (torch.equal) in float32 and float64, the first and second derivative by
   nested autograd in float64;
2. Hessian diagonals of random MLPs by nested autograd, drop-ins vs the same weights with torch.nn
   activations, and vs ``torch.func`` (vmap of hessian) on the torch.nn model; torch.func
   through the drop-ins themselves;
3. ``convert``: outputs unchanged, copy vs in place, parameters carried, unsupported activations
   left alone with one warning, train/eval flags kept;
4. "never None": linear and piecewise-linear networks give zero second derivatives, not None;
5. module plumbing: repr, pickle, deepcopy, state_dict, use inside nn.Sequential.
"""

from __future__ import annotations

import ast
import copy
import io
import pickle
import re
import warnings

import pytest
import torch
from torch import nn

import torchhessdiag
import torchhessdiag.nn as thnn
from torchhessdiag import _op_autograd, ops

F = torch.nn.functional
# Small tensors only: one intra-op thread (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


class Fn(nn.Module):
    """A torch.nn stand-in for drop-ins that have no torch.nn namesake (Sine, Cosine, Exp)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _exact_celu(alpha):
    # torch's own CELU backward is only ~float32-accurate even in float64 (derivatives.yaml
    # differentiates it as elu with input_scale 1.0 / alpha.toFloat(): relative error ~1e-7),
    # so the derivative oracle for CELU is this formula, which autograd differentiates exactly.
    return Fn(lambda x: torch.where(x > 0, x, alpha * torch.expm1(x.clamp(max=0) / alpha)))


# name -> (drop-in factory, torch factory, kinks: points where sigma is not C^2[, derivative
# oracle factory when torch's own derivatives are not accurate enough to be one])
PAIRS = {
    "Tanh": (lambda: thnn.Tanh(), lambda: nn.Tanh(), []),
    "Sigmoid": (lambda: thnn.Sigmoid(), lambda: nn.Sigmoid(), []),
    "Softplus": (lambda: thnn.Softplus(), lambda: nn.Softplus(), [20.0]),
    "Softplus_b2_t5": (
        lambda: thnn.Softplus(beta=2.0, threshold=5.0),
        lambda: nn.Softplus(beta=2.0, threshold=5.0),
        [2.5],  # beta * x = threshold: switches to the identity
    ),
    "SiLU": (lambda: thnn.SiLU(), lambda: nn.SiLU(), []),
    "GELU_none": (lambda: thnn.GELU(), lambda: nn.GELU(), []),
    "GELU_tanh": (lambda: thnn.GELU("tanh"), lambda: nn.GELU("tanh"), []),
    "ELU_0.7": (lambda: thnn.ELU(alpha=0.7), lambda: nn.ELU(alpha=0.7), [0.0]),
    "CELU_0.7": (
        lambda: thnn.CELU(alpha=0.7), lambda: nn.CELU(alpha=0.7), [0.0], lambda: _exact_celu(0.7)
    ),
    "ReLU": (lambda: thnn.ReLU(), lambda: nn.ReLU(), [0.0]),
    "LeakyReLU_0.2": (lambda: thnn.LeakyReLU(0.2), lambda: nn.LeakyReLU(0.2), [0.0]),
    "Sine_1": (lambda: thnn.Sine(), lambda: Fn(torch.sin), []),
    "Sine_30": (lambda: thnn.Sine(30.0), lambda: Fn(lambda x: torch.sin(30.0 * x)), []),
    "Cosine_2.5": (lambda: thnn.Cosine(2.5), lambda: Fn(lambda x: torch.cos(2.5 * x)), []),
    "Exp": (lambda: thnn.Exp(), lambda: Fn(torch.exp), []),
    "Identity": (lambda: thnn.Identity(), lambda: nn.Identity(), []),
}


def _with_oracle(entry):
    return entry if len(entry) == 4 else (*entry, entry[1])


PIECEWISE_LINEAR = {"ReLU", "LeakyReLU_0.2"}
# Everything with a non-trivial second derivative (a.e.): the MLP Hessian tests use these.
SMOOTH = [n for n in PAIRS if n not in PIECEWISE_LINEAR and n != "Identity"]


def _forward_inputs(dtype, device):
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(4, 257, generator=g, dtype=torch.float64) * 4  # odd size: vector tails
    special = torch.tensor(
        [0.0, -0.0, 1e-8, -1e-8, 2.5, 5.0, 19.99, 20.0, 20.01, 25.0, -25.0, 80.0, -80.0, 1e-30],
        dtype=torch.float64,
    )
    return torch.cat([x.flatten(), special]).to(dtype=dtype, device=device)


def _grid_away_from_kinks(kinks, device, lo=-6.0, hi=6.0, n=2001, gap=1e-3):
    x = torch.linspace(lo, hi, n, dtype=torch.float64)
    keep = torch.ones_like(x, dtype=torch.bool)
    for k in kinks:
        keep &= (x - k).abs() > gap
    return x[keep].to(device)


def _first_second(module, x):
    """sigma'(x), sigma''(x) elementwise by nested autograd (None where torch cannot give one)."""
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    (g1,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    if not g1.requires_grad:
        return g1, None
    (g2,) = torch.autograd.grad(g1.sum(), x)
    return g1.detach(), g2


def _assert_close_scaled(actual, expected, tol, what):
    """|actual - expected| <= tol * (|expected| + max|expected|) elementwise."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=tol, atol=tol * max(scale, 1e-300), msg=lambda m: f"{what}: {m}"
    )


# ---- 1. each drop-in vs its torch namesake ----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(PAIRS))
def test_forward_bitwise_equal_to_torch(name, dtype, device):
    ours, theirs = PAIRS[name][:2]
    x = _forward_inputs(dtype, device)
    y, y_ref = ours()(x), theirs()(x)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape and y.device == y_ref.device
    assert torch.equal(y, y_ref), (
        f"{name}: forward differs from torch's at "
        f"{x[y != y_ref][:5].tolist()} (ours {y[y != y_ref][:5].tolist()}, "
        f"torch {y_ref[y != y_ref][:5].tolist()})"
    )


@pytest.mark.parametrize("name", list(PAIRS))
def test_first_and_second_derivative_match_torch(name, device):
    # float64, away from the kinks. Tolerance 1e-13 relative, plus 1e-13 * max|ref| absolute:
    # torch's own formulas (1 - tanh^2, s (1 - s), ...) have absolute errors of a few eps times
    # the largest value of the derivative where they cancel (e.g. tanh'(6) ~ 2.5e-5 comes out
    # of 1 - t^2 with ~1e-16 absolute error), and the table's formulas a few eps relative;
    # 1e-13 leaves a factor ~100 of margin over both while catching any wrong formula or branch.
    ours, _, kinks, oracle = _with_oracle(PAIRS[name])
    x = _grid_away_from_kinks(kinks, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ReLU/LeakyReLU warn about their zero 2nd derivative
        d1, d2 = _first_second(ours(), x)
    d1_ref, d2_ref = _first_second(oracle(), x)
    _assert_close_scaled(d1, d1_ref, 1e-13, f"{name} first derivative")
    assert d2 is not None, f"{name}: second derivative came back None"
    if d2_ref is None:  # torch.nn.Identity: torch cannot differentiate the constant 1
        assert torch.equal(d2, torch.zeros_like(x))
    else:
        _assert_close_scaled(d2, d2_ref, 1e-13, f"{name} second derivative")


# ---- 2. Hessian diagonals of random MLPs ------------------------------------------------------


def _mlp(seed, d, width, depth, act_factory):
    torch.manual_seed(seed)
    layers = [nn.Linear(d, width), act_factory()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), act_factory()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers).double()


def _same_weights_other_acts(model, act_factory):
    """A copy of `model` whose activations are replaced by act_factory() (weights shared)."""
    return nn.Sequential(*[m if isinstance(m, nn.Linear) else act_factory() for m in model])


def hessian_diag_nested(model, x):
    """d^2 u / dx_i^2 for u = model(x).sum(): one backward of the gradient per input dimension."""
    x = x.detach().clone().requires_grad_(True)
    u = model(x).sum()
    (g,) = torch.autograd.grad(u, x, create_graph=True)
    cols = []
    for i in range(x.shape[1]):
        (h,) = torch.autograd.grad(g[:, i].sum(), x, retain_graph=i < x.shape[1] - 1)
        cols.append(h[:, i])
    return torch.stack(cols, dim=1)


def hessian_diag_func(model, x):
    f = lambda xi: model(xi).squeeze(-1)  # noqa: E731
    return torch.func.vmap(torch.func.hessian(f))(x).diagonal(dim1=-2, dim2=-1)


# (seed, width, depth, input dim): covers widths 5/32/64, depths 1..4, d 1/3/7, several seeds
MLP_CONFIGS = [
    (0, 5, 1, 1),
    (1, 32, 2, 3),
    (2, 64, 3, 7),
    (3, 5, 4, 7),
    (4, 32, 4, 1),
    (5, 64, 1, 3),
    (6, 32, 3, 3),
]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("cfg", MLP_CONFIGS, ids=lambda c: "s{}-w{}-L{}-d{}".format(*c))
@pytest.mark.parametrize("name", SMOOTH)
def test_mlp_hessian_diagonal(name, cfg, device):
    # 1e-12 relative to the largest entry in float64: the drop-in and torch evaluate the same
    # chain rule with different (but each few-ulp accurate) elementwise formulas; through <= 4
    # layers of width <= 64 the rounding differences add up to ~1e-14 relative, so 1e-12 is a
    # 100x margin, while any wrong derivative order/sign/factor in a kernel is O(1).
    seed, width, depth, d = cfg
    ours_f, theirs_f, _, oracle_f = _with_oracle(PAIRS[name])
    model = _mlp(seed, d, width, depth, ours_f).to(device)
    same = _same_weights_other_acts(model, theirs_f).to(device)
    ref = _same_weights_other_acts(model, oracle_f).to(device)
    x = (torch.rand(16, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
         * 2 - 1).to(device)

    assert torch.equal(model(x), same(x))  # same weights, bitwise-equal activations

    h = hessian_diag_nested(model, x)
    h_ref = hessian_diag_nested(ref, x)
    h_func = hessian_diag_func(ref, x)
    assert h.shape == (16, d)
    assert h.abs().max() > 0, "degenerate test: Hessian diagonal is identically zero"
    # The two torch references can disagree by more than 1e-12 themselves: on CUDA, float64
    # sin/cos are not correctly rounded and SIREN layers (w0 = 30) amplify each ulp by w0 per
    # layer (seen on an H100: nested autograd vs torch.func 2.6e-11 for Sine_30). Ours must then
    # be within 4x the references' own spread.
    scale = h_func.abs().max().item()
    tol = max(1e-12, 4 * (h_ref - h_func).abs().max().item() / scale)
    _assert_close_scaled(h, h_ref, tol, f"{name} vs torch.nn nested autograd")
    _assert_close_scaled(h, h_func, tol, f"{name} vs torch.func hessian")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", SMOOTH)
def test_torch_func_through_dropins(name, device):
    # torch.func transforms cannot see through custom-op autograd; the drop-ins then run torch's
    # own function, so vmap(hessian) of a drop-in model must work and give what it gives for the
    # torch.nn model (1e-12 of the largest entry: same ops, at most reassociated by vmap), and
    # agree with the drop-ins' nested-autograd Hessian diagonal (oracle as in the test above).
    ours_f, theirs_f, _, oracle_f = _with_oracle(PAIRS[name])
    model = _mlp(7, 3, 32, 3, ours_f).to(device)
    same = _same_weights_other_acts(model, theirs_f).to(device)
    x = (torch.rand(8, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
         * 2 - 1).to(device)
    h_func = hessian_diag_func(model, x)
    _assert_close_scaled(h_func, hessian_diag_func(same, x), 1e-12, f"{name}: torch.func")
    if oracle_f is theirs_f:  # CELU: torch's own CELU derivatives are float32-accurate only
        _assert_close_scaled(h_func, hessian_diag_nested(model, x), 1e-12, f"{name}: nested")


# ---- 3. convert -------------------------------------------------------------------------------


class Net(nn.Module):
    """Activations as attributes, inside nested Sequentials, a ModuleList and a ModuleDict."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 16)
        self.act1 = nn.Tanh()
        self.block = nn.Sequential(
            nn.Linear(16, 16),
            nn.Softplus(beta=2.0, threshold=5.0),
            nn.Sequential(nn.Linear(16, 16), nn.GELU("tanh"), nn.Sequential(nn.Sigmoid())),
        )
        self.layers = nn.ModuleList([nn.Linear(16, 16), nn.SiLU(), nn.ELU(0.7), nn.GELU()])
        self.acts = nn.ModuleDict({"c": nn.CELU(0.7), "l": nn.LeakyReLU(0.2), "r": nn.ReLU()})
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        h = self.block(self.act1(self.l1(x)))
        for m in self.layers:
            h = m(h)
        h = self.acts["r"](self.acts["l"](self.acts["c"](h)))
        return self.out(h)


TORCH_TO_DROPIN = {
    nn.Tanh: thnn.Tanh, nn.Sigmoid: thnn.Sigmoid, nn.Softplus: thnn.Softplus, nn.SiLU: thnn.SiLU,
    nn.GELU: thnn.GELU, nn.ELU: thnn.ELU, nn.CELU: thnn.CELU, nn.ReLU: thnn.ReLU,
    nn.LeakyReLU: thnn.LeakyReLU,
}


def _convert_quietly(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fully supported model must convert without warnings
        return thnn.convert(model, **kw)


def test_convert_nested_model_same_output(device):
    torch.manual_seed(0)
    model = Net().double().to(device)
    x = torch.randn(32, 3, dtype=torch.float64, device=device)
    before = {n: type(m) for n, m in model.named_modules()}
    out = model(x)
    conv = _convert_quietly(model)
    assert conv is not model
    assert torch.equal(conv(x), out)
    # every supported activation was replaced by its drop-in, at the same place
    after = dict(conv.named_modules())
    assert set(after) == set(before)
    n_converted = 0
    for name, t in before.items():
        if t in TORCH_TO_DROPIN:
            assert type(after[name]) is TORCH_TO_DROPIN[t], name
            n_converted += 1
        else:
            assert type(after[name]) is t, name
    assert n_converted == 10
    # state_dict keys and values unchanged (activations carry no state)
    sd, sd_conv = model.state_dict(), conv.state_dict()
    assert list(sd) == list(sd_conv)
    assert all(torch.equal(sd[k], sd_conv[k]) for k in sd)


def test_convert_returns_copy_and_leaves_original_untouched(device):
    torch.manual_seed(0)
    model = Net().double().to(device)
    types_before = [(n, type(m)) for n, m in model.named_modules()]
    conv = _convert_quietly(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == types_before
    # deep copy: parameters are not shared
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(model.parameters(), conv.parameters()))


def test_convert_inplace(device):
    torch.manual_seed(0)
    model = Net().double().to(device)
    x = torch.randn(8, 3, dtype=torch.float64, device=device)
    out = model(x)
    params = [p.data_ptr() for p in model.parameters()]
    conv = _convert_quietly(model, inplace=True)
    assert conv is model
    assert isinstance(model.act1, thnn.Tanh)
    assert isinstance(model.block[2][2][0], thnn.Sigmoid)
    assert isinstance(model.layers[1], thnn.SiLU)
    assert isinstance(model.acts["c"], thnn.CELU)
    assert [p.data_ptr() for p in model.parameters()] == params
    assert torch.equal(model(x), out)


@pytest.mark.parametrize(
    "module, cls, attrs",
    [
        (nn.Tanh(), thnn.Tanh, {}),
        (nn.Sigmoid(), thnn.Sigmoid, {}),
        (nn.Softplus(), thnn.Softplus, {"beta": 1.0, "threshold": 20.0}),
        (nn.Softplus(beta=2.0, threshold=5.0), thnn.Softplus, {"beta": 2.0, "threshold": 5.0}),
        (nn.Softplus(beta=3, threshold=7), thnn.Softplus, {"beta": 3.0, "threshold": 7.0}),
        (nn.SiLU(), thnn.SiLU, {}),
        (nn.GELU(), thnn.GELU, {"approximate": "none"}),
        (nn.GELU(approximate="tanh"), thnn.GELU, {"approximate": "tanh"}),
        (nn.ELU(alpha=0.7), thnn.ELU, {"alpha": 0.7}),
        (nn.CELU(alpha=0.7), thnn.CELU, {"alpha": 0.7}),
        (nn.ReLU(), thnn.ReLU, {}),
        (nn.ReLU(inplace=True), thnn.ReLU, {}),
        (nn.LeakyReLU(), thnn.LeakyReLU, {"negative_slope": 0.01}),
        (nn.LeakyReLU(0.2), thnn.LeakyReLU, {"negative_slope": 0.2}),
    ],
    ids=lambda v: repr(v) if isinstance(v, nn.Module) else "",
)
def test_convert_bare_activation_carries_parameters(module, cls, attrs, device):
    conv = _convert_quietly(module)
    assert type(conv) is cls
    for k, v in attrs.items():
        assert getattr(conv, k) == v, k
    x = torch.linspace(-8, 8, 101, dtype=torch.float64, device=device)
    assert torch.equal(conv(x), module(x))
    # inplace=True cannot replace a bare module in place: the drop-in is returned
    assert type(_convert_quietly(module, inplace=True)) is cls


def test_convert_already_converted_is_unchanged():
    model = nn.Sequential(nn.Linear(2, 2), thnn.Tanh(), thnn.Sine(3.0))
    conv = _convert_quietly(model)
    assert type(conv[1]) is thnn.Tanh and type(conv[2]) is thnn.Sine and conv[2].w0 == 3.0
    assert type(_convert_quietly(thnn.Softplus(2.0, 5.0))) is thnn.Softplus


def test_convert_unsupported_activations_stay_with_one_warning(device):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 8), nn.Mish(), nn.Sequential(nn.Linear(8, 8), nn.Hardtanh(), nn.Tanh()),
        nn.Mish(), nn.Linear(8, 1),
    ).double().to(device)
    x = torch.randn(5, 3, dtype=torch.float64, device=device)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        conv = thnn.convert(model)
    msgs = [str(w.message) for w in rec if issubclass(w.category, UserWarning)]
    assert len(msgs) == 1, msgs
    assert "Mish" in msgs[0] and "Hardtanh" in msgs[0]
    assert "Tanh," not in msgs[0] and not re.search(r"\bTanh\b", msgs[0])  # converted: not named
    assert type(conv[1]) is nn.Mish and type(conv[3]) is nn.Mish
    assert type(conv[2][1]) is nn.Hardtanh
    assert type(conv[2][2]) is thnn.Tanh
    assert torch.equal(conv(x), model(x))


def test_convert_preserves_training_flags():
    model = Net()
    model.train()
    model.act1.eval()
    model.block[2].eval()  # a whole nested Sequential, with its activations
    model.acts["l"].eval()
    flags = {n: m.training for n, m in model.named_modules()}
    conv = _convert_quietly(model)
    assert {n: m.training for n, m in conv.named_modules()} == flags
    conv_eval = _convert_quietly(model.eval())
    assert not any(m.training for m in conv_eval.modules())


@pytest.mark.parametrize("training", [True, False])
def test_convert_bare_activation_preserves_training_flag(training):
    act = nn.Tanh().train(training)
    conv = _convert_quietly(act)
    assert conv.training is training


def test_convert_rejects_non_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        thnn.convert(torch.tanh)


# ---- 4. never None ----------------------------------------------------------------------------


def _second_derivatives(model, x):
    """[d^2 u / dx_i dx_i] with plain torch.autograd.grad, no allow_unused."""
    x = x.detach().clone().requires_grad_(True)
    u = model(x).sum()
    (g,) = torch.autograd.grad(u, x, create_graph=True)
    return g, [torch.autograd.grad(g[:, i].sum(), x, retain_graph=True)[0] for i in range(x.shape[1])]


def test_linear_identity_network_second_derivative_is_zero_not_none(device):
    torch.manual_seed(0)
    lin = [nn.Linear(3, 8), nn.Linear(8, 4), nn.Linear(4, 1)]
    model = nn.Sequential(lin[0], thnn.Identity(), lin[1], thnn.Identity(), lin[2]).double()
    model = model.to(device)
    x = torch.randn(6, 3, dtype=torch.float64, device=device)
    g, hs = _second_derivatives(model, x)
    # the gradient of a linear map is the product of the weights
    w = (lin[2].weight @ lin[1].weight @ lin[0].weight).detach().to(torch.float64)
    torch.testing.assert_close(g.detach(), w.expand(6, 3), rtol=1e-14, atol=1e-14)
    for h in hs:
        assert h is not None
        assert torch.equal(h, torch.zeros_like(x))
    # control: with torch.nn.Identity the same computation cannot be done at all
    plain = nn.Sequential(lin[0], nn.Identity(), lin[1], nn.Identity(), lin[2]).to(device)
    with pytest.raises(RuntimeError):
        _second_derivatives(plain, x)


@pytest.fixture
def fresh_pwl_warning(monkeypatch):
    """The piecewise-linear warning is emitted once per process per activation: reset it."""
    monkeypatch.setattr(_op_autograd, "_warned_pwl", set())  # the reference backend's (Python) autograd
    if ops.COMPILED:
        ops._C._reset_piecewise_linear_warnings()  # the compiled one's (csrc/act_autograd.h)


def test_relu_network_second_derivative_zero_and_warns(device, fresh_pwl_warning):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), thnn.ReLU(), nn.Linear(16, 1)).double().to(device)
    ref = _same_weights_other_acts(model, nn.ReLU)
    x = torch.randn(10, 3, dtype=torch.float64, device=device)
    with pytest.warns(UserWarning, match="piecewise linear") as rec:
        g, hs = _second_derivatives(model, x)
    assert sum("piecewise linear" in str(w.message) for w in rec) == 1
    assert any("relu" in str(w.message) for w in rec)
    for h in hs:
        assert torch.equal(h, torch.zeros_like(x))
    # the first derivative is ReLU's own
    xr = x.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(ref(xr).sum(), xr)
    torch.testing.assert_close(g.detach(), g_ref, rtol=1e-15, atol=1e-15)
    # once per process: the next second derivative does not warn again
    with warnings.catch_warnings(record=True) as rec2:
        warnings.simplefilter("always")
        _second_derivatives(model, x)
    assert not [w for w in rec2 if "piecewise linear" in str(w.message)]


def test_leaky_relu_second_derivative_zero_and_warns(device, fresh_pwl_warning):
    x = torch.randn(7, dtype=torch.float64, device=device, requires_grad=True)
    y = thnn.LeakyReLU(0.2)(x)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    assert torch.equal(g, torch.where(x > 0, torch.ones_like(x), torch.full_like(x, 0.2)))
    with pytest.warns(UserWarning, match="piecewise linear"):
        (h,) = torch.autograd.grad(g.sum(), x)
    assert torch.equal(h, torch.zeros_like(x))


# ---- 5. module plumbing -----------------------------------------------------------------------

# drop-in instances next to the torch.nn module they mirror (None: no torch namesake)
REPR_PAIRS = [
    (thnn.Tanh(), nn.Tanh()),
    (thnn.Sigmoid(), nn.Sigmoid()),
    (thnn.Softplus(), nn.Softplus()),
    (thnn.Softplus(beta=2.0, threshold=5.0), nn.Softplus(beta=2.0, threshold=5.0)),
    (thnn.SiLU(), nn.SiLU()),
    (thnn.GELU(), nn.GELU()),
    (thnn.GELU("tanh"), nn.GELU("tanh")),
    (thnn.ELU(alpha=0.7), nn.ELU(alpha=0.7)),
    (thnn.CELU(), nn.CELU()),
    (thnn.CELU(alpha=0.7), nn.CELU(alpha=0.7)),
    (thnn.ReLU(), nn.ReLU()),
    (thnn.LeakyReLU(), nn.LeakyReLU()),
    (thnn.LeakyReLU(0.2), nn.LeakyReLU(0.2)),
    (thnn.Identity(), nn.Identity()),
    (thnn.Sine(30.0), None),
    (thnn.Cosine(2.5), None),
    (thnn.Exp(), None),
]
_ids = [repr(p[1]) if p[1] is not None else type(p[0]).__name__ for p in REPR_PAIRS]


def _parse_call(text):
    """'Name(k=v, ...)' -> ('Name', {k: value})."""
    call = ast.parse(text, mode="eval").body
    assert isinstance(call, ast.Call) and not call.args, text
    return call.func.id, {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


@pytest.mark.parametrize("ours, theirs", [p for p in REPR_PAIRS if p[1] is not None], ids=[
    i for i, p in zip(_ids, REPR_PAIRS) if p[1] is not None])
def test_repr_looks_like_torch(ours, theirs):
    # Same class name, same keyword names, equal values (torch prints 1.0 where the drop-in may
    # print 1: the numbers are compared, not their spelling).
    assert _parse_call(repr(ours)) == _parse_call(repr(theirs)), (repr(ours), repr(theirs))


@pytest.mark.parametrize("module", [p[0] for p in REPR_PAIRS], ids=_ids)
def test_repr_rebuilds_module(module):
    # torch.nn activation reprs are constructor calls (Softplus(beta=2.0, threshold=5.0)); the
    # drop-ins' should be too, so that eval(repr(m)) gives the same activation.
    rebuilt = eval(repr(module), {n: getattr(thnn, n) for n in thnn.__all__})
    assert type(rebuilt) is type(module)
    assert rebuilt.spec == module.spec


@pytest.mark.parametrize("module", [p[0] for p in REPR_PAIRS], ids=_ids)
def test_pickle_deepcopy_state_dict(module, device):
    x = torch.linspace(-3, 3, 13, dtype=torch.float64, device=device).reshape(13, 1)
    for clone in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module)):
        assert type(clone) is type(module) and clone.spec == module.spec
        assert repr(clone) == repr(module)
        assert torch.equal(clone(x), module(x))
    buf = io.BytesIO()
    torch.save(nn.Sequential(nn.Linear(1, 2), module), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded[1].spec == module.spec
    assert module.state_dict() == {} and len(module.state_dict()) == 0
    assert list(module.parameters()) == [] and list(module.buffers()) == []


@pytest.mark.parametrize("ours, theirs", [p for p in REPR_PAIRS if p[1] is not None], ids=[
    i for i, p in zip(_ids, REPR_PAIRS) if p[1] is not None])
@pytest.mark.parametrize("shape", [(5, 4), (3, 5, 4)], ids=["2d", "3d"])
def test_inside_sequential_batched(ours, theirs, shape, device):
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(4, 8).double(), nn.Linear(8, 2).double()
    model = nn.Sequential(lin1, copy.deepcopy(ours), lin2).to(device)
    ref = nn.Sequential(lin1, copy.deepcopy(theirs), lin2).to(device)
    x = torch.randn(*shape, dtype=torch.float64, device=device)
    y = model(x)
    assert y.shape == (*shape[:-1], 2)
    assert torch.equal(y, ref(x))
    if isinstance(theirs, nn.CELU):  # torch's CELU backward is float32-accurate only
        ref = nn.Sequential(lin1, _exact_celu(theirs.alpha), lin2).to(device)
    model.zero_grad()
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    ref.zero_grad()
    ref(x).square().sum().backward()
    # the backward uses the table's sigma' instead of torch's: a few ulp apart
    for g, g_ref in zip(grads, (p.grad for p in ref.parameters())):
        _assert_close_scaled(g, g_ref, 1e-13, "parameter gradient")


@pytest.mark.parametrize(
    "module, attr, value, expected",
    [
        (thnn.Softplus(), "beta", 2.0, lambda x: F.softplus(x, beta=2.0)),
        (thnn.Softplus(), "threshold", 1.0, lambda x: F.softplus(x, threshold=1.0)),
        (thnn.ELU(), "alpha", 0.5, lambda x: F.elu(x, alpha=0.5)),
        (thnn.CELU(), "alpha", 0.5, lambda x: F.celu(x, alpha=0.5)),
        (thnn.LeakyReLU(), "negative_slope", 0.3, lambda x: F.leaky_relu(x, 0.3)),
        (thnn.GELU(), "approximate", "tanh", lambda x: F.gelu(x, approximate="tanh")),
        (thnn.Sine(), "w0", 3.0, lambda x: torch.sin(3.0 * x)),
    ],
    ids=["Softplus.beta", "Softplus.threshold", "ELU.alpha", "CELU.alpha",
         "LeakyReLU.negative_slope", "GELU.approximate", "Sine.w0"],
)
def test_setting_a_parameter_attribute_is_honoured_or_refused(module, attr, value, expected,
                                                               device):
    # torch.nn activations read their attributes in forward, so `m.beta = 2.0` after
    # construction changes the function. A drop-in must either do the same or refuse the
    # assignment -- never keep computing the old function while reporting the new value.
    m = copy.deepcopy(module)
    x = torch.linspace(-4, 4, 81, dtype=torch.float64, device=device)
    try:
        setattr(m, attr, value)
    except (AttributeError, TypeError, ValueError):
        return  # refused: fine
    assert getattr(m, attr) == value
    torch.testing.assert_close(m(x), expected(x), rtol=1e-15, atol=1e-15)


def test_gelu_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate"):
        thnn.GELU("erf")


def test_dropins_exported():
    assert set(thnn.__all__) >= {
        "Tanh", "Sigmoid", "Softplus", "SiLU", "GELU", "Sine", "Cosine", "Exp", "ELU", "CELU",
        "ReLU", "LeakyReLU", "Identity", "convert",
    }
    assert torchhessdiag.nn is thnn
