"""The second-order engine (torchhessdiag/engine.py) is exact: mlp_hessian_diag, mlp_laplacian and
mlp_derivatives against torch.func in float64, for every activation of the table, depths 1-6,
widths below and above d, d in {1, 2, 3, 17, 64}, m in {1, 3}, with and without biases, and the
structural variants of nn.Sequential the parser accepts (nesting, Identity, Dropout in eval mode,
an activation on the input, Linear after Linear, a final activation, reused module instances).

The last section is tests/test_mlp_engine.py's sweep (merged here): every activation against
each of six configurations, with its own structures, dims and float32 checks.

Reference: ``torch.func.vmap(torch.func.hessian(model))(x)`` -> (N, m, d, d), and
``vmap(jacrev(model))`` for the gradient. Models holding torchhessdiag.nn drop-ins are their own
reference: under torch.func a drop-in runs torch's own function. One exception: torch's CELU
backward rounds 1/alpha to float32 (derivatives.yaml), so torch.func's Hessian of nn.CELU(0.7) is
itself off by ~3e-8 relative in float64; the reference model replaces CELU by the same function
written with elementary ops (alpha * expm1(z / alpha)), which torch differentiates exactly.

Tolerances.
* float64: max |ours - reference| <= 1e-10 * max |reference| (per quantity). Both sides evaluate
  float64 sums of products of the same weights and activation derivatives in different orders;
  the differences seen are <= 2e-15 relative. Any wrong term -- a dropped layer, a wrong sigma'',
  a missing bias -- is O(1) relative, so the bound has room for rounding and none for a bug.
* float32: compared with torch.func run in float32 on the same float32 model (the same
  computation by torch), |ours - torch32| <= 50 * eps32 * scale, scale = max |exact|, exact =
  the float64 Hessian of the same float32 weights. Each side is a float32 evaluation of the
  same sum over layers and units of products of <= 2 * depth + 3 rounded factors (weights,
  sigma', sigma'') plus the sums of the GEMMs; a first-order bound on each side's error is
  ~(2 * depth + 3 + log2(width * depth)) * eps32 * scale ~ 15 eps32 * scale for the nets below
  (depth <= 3, width <= 16), so 50 eps32 covers both sides with ~1.5x margin; the errors seen
  are ~1-5 eps32 * scale. A wrong term would again be O(1) relative (>> 6e-6).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import torchhessdiag as thd
from torchhessdiag import engine

# tiny tensors: one intra-op thread (conftest.py's fixture; with 2 OpenMP threads the many tiny
# GEMMs of torch.func spin-wait and the file runs ~4x slower on a 2-core machine)
pytestmark = pytest.mark.usefixtures("single_thread", "engine_path")  # and both engine propagations

F64_REL = 1e-10
F32_FACTOR = 50.0
EPS32 = torch.finfo(torch.float32).eps


# ---- the reference ---------------------------------------------------------------------------


class _ExactCELU(nn.Module):
    """celu(z) = z (z > 0), alpha * expm1(z / alpha) (z <= 0), from elementary ops."""

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, z):
        a = self.alpha
        return torch.where(z > 0, z, a * torch.expm1(torch.clamp_max(z, 0.0) / a))


def reference_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every CELU replaced by _ExactCELU (see the module docstring).

    deepcopy keeps shared instances shared, so reused modules stay reused."""
    ref = copy.deepcopy(model)

    def swap(m: nn.Module) -> nn.Module:
        if isinstance(m, (nn.CELU, thd.nn.CELU)):
            return _ExactCELU(m.alpha)
        for name, child in list(m._modules.items()):
            if child is not None:
                m._modules[name] = swap(child)
        return m

    return swap(ref)


def torch_reference(model: nn.Module, x: torch.Tensor):
    """(value, gradient, Hessian) by torch.func: (N, m), (N, m, d), (N, m, d, d); unbatched x
    (d,) gives (m,), (m, d), (m, d, d)."""
    ref = reference_model(model)
    with torch.no_grad():
        value = ref(x)
    jac, hess = torch.func.jacrev(ref), torch.func.hessian(ref)
    if x.dim() == 1:
        return value, jac(x).detach(), hess(x).detach()
    return value, torch.func.vmap(jac)(x).detach(), torch.func.vmap(hess)(x).detach()


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = F64_REL, what: str = ""):
    """Same shape/dtype/device, finite, and max |actual - expected| <= rel * max |expected|.
    An all-zero reference requires exact zeros."""
    assert isinstance(actual, torch.Tensor), f"{what}: got {type(actual).__name__}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.device == expected.device, f"{what}: device {actual.device} != {expected.device}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite entries"
    err = (actual.detach() - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= rel * scale, f"{what}: max error {err:.3e} > {rel:.1e} * {scale:.3e}"


def _norm_dims(dims, d):
    if dims is None:
        return list(range(d))
    if isinstance(dims, torch.Tensor):
        dims = dims.tolist()
    return [i % d for i in dims]


def check_model(model: nn.Module, x: torch.Tensor, dims=None, rel: float = F64_REL):
    """Every engine quantity of ``model`` at ``x`` against torch.func, on the graph path (grad
    mode, parameters require grad) and on the no-grad in-place path."""
    value, grad, hess = torch_reference(model, x)
    d = x.shape[-1]
    sel = _norm_dims(dims, d)
    hd = hess.diagonal(dim1=-2, dim2=-1)[..., sel]
    lap = hd.sum(-1)
    params_need_grad = any(p.requires_grad for p in model.parameters())
    for path in ("graph", "no_grad"):
        ctx = torch.no_grad() if path == "no_grad" else contextlib.nullcontext()
        with ctx:
            out_hd = thd.mlp_hessian_diag(model, x, dims=dims)
            out_lap = thd.mlp_laplacian(model, x, dims=dims)
            der_d = thd.mlp_derivatives(model, x, second="diag", dims=dims)
            der_l = thd.mlp_derivatives(model, x, second="laplacian", dims=dims)
        assert isinstance(der_d, thd.MLPDerivatives)
        tag = f"[{path}]"
        assert_rel(out_hd, hd, rel, f"{tag} mlp_hessian_diag")
        assert_rel(out_lap, lap, rel, f"{tag} mlp_laplacian")
        for name, der in (("diag", der_d), ("laplacian", der_l)):
            assert_rel(der.value, value, rel, f"{tag} mlp_derivatives({name}).value")
            assert_rel(der.gradient, grad, rel, f"{tag} mlp_derivatives({name}).gradient")
        assert_rel(der_d.second, hd, rel, f"{tag} mlp_derivatives(diag).second")
        assert_rel(der_l.second, lap, rel, f"{tag} mlp_derivatives(laplacian).second")
        if path == "no_grad":
            assert not out_hd.requires_grad and not out_lap.requires_grad
        elif params_need_grad and hess.abs().max() > 0:
            # the parameters require grad: the results carry a graph to them
            assert out_hd.requires_grad and out_lap.requires_grad and der_d.second.requires_grad


def _x(N, d, device, scale=1.0, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(N, d, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)


def _mlp(acts, d, width, m, bias=True, seed=0):
    """Linear(d, width), acts[0], Linear(width, width), acts[1], ..., Linear(width, m).
    ``bias`` is a bool for every Linear or a list of bools, one per Linear."""
    torch.manual_seed(seed)
    n_lin = len(acts) + 1
    biases = [bias] * n_lin if isinstance(bias, bool) else list(bias)
    assert len(biases) == n_lin
    layers, w_in = [], d
    for act, b in zip(acts, biases):
        layers += [nn.Linear(w_in, width, bias=b), act]
        w_in = width
    layers.append(nn.Linear(w_in, m, bias=biases[-1]))
    return nn.Sequential(*layers).double()


# ---- every activation ------------------------------------------------------------------------

ACTIVATIONS = {
    "Tanh": nn.Tanh,
    "Sigmoid": nn.Sigmoid,
    "Softplus": nn.Softplus,
    "Softplus(beta=2,threshold=5)": lambda: nn.Softplus(beta=2.0, threshold=5.0),
    "SiLU": nn.SiLU,
    "GELU(none)": nn.GELU,
    "GELU(tanh)": lambda: nn.GELU(approximate="tanh"),
    "ELU(0.7)": lambda: nn.ELU(alpha=0.7),
    "CELU(0.7)": lambda: nn.CELU(0.7),
    "thd.Sine(w0=2)": lambda: thd.nn.Sine(w0=2.0),
    "thd.Cosine": thd.nn.Cosine,
    "thd.Exp": thd.nn.Exp,
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_every_activation(device, name):
    """Three hidden layers of one activation (layer 1: the point-independent first-layer path;
    layer 2: jet_layer with need_ja; layer 3: the last, without), d=3, m=2."""
    make = ACTIVATIONS[name]
    model = _mlp([make(), make(), make()], d=3, width=6, m=2).to(device)
    x = _x(6, 3, device, scale=1.5)
    if name == "thd.Exp":  # small weights: exp of exp of exp stays moderate
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.3)
    if name.startswith("Softplus(beta=2"):
        # spread the first pre-activations over both sides of the threshold beta*z = 5
        with torch.no_grad():
            model[0].weight.mul_(2.0)
            model[0].bias.copy_(torch.tensor([3.0, -3.0, 3.0, -3.0, 0.0, 0.0]))
            z1 = model[0](x)
        assert (2.0 * z1 > 5.0).any() and (2.0 * z1 < 5.0).any(), "threshold not straddled"
    if name in ("ELU(0.7)", "CELU(0.7)"):
        with torch.no_grad():
            z1 = model[0](x)
        assert (z1 < 0).any() and (z1 > 0).any(), "both pieces must be exercised"
    check_model(model, x)


def test_mixed_activations_in_one_net(device):
    """torch.nn modules and drop-ins of different kinds in one net."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(4, 7), nn.Tanh(),
        nn.Linear(7, 6), thd.nn.SiLU(),
        nn.Linear(6, 8), nn.GELU(approximate="tanh"),
        nn.Linear(8, 5), thd.nn.Softplus(beta=1.5),
        nn.Linear(5, 6), nn.CELU(0.7),
        nn.Linear(6, 5), thd.nn.Sine(w0=2.0),
        nn.Linear(5, 3),
    ).double().to(device)
    check_model(model, _x(5, 4, device))


# ---- depth, width, d, m, bias ----------------------------------------------------------------

_ACT_CYCLE = [nn.Tanh, nn.SiLU, lambda: nn.GELU(approximate="tanh"), nn.Sigmoid, nn.Softplus, nn.GELU]

# (depth = hidden layers, d, width, m, bias): widths below and above d, d in {1, 2, 3, 17, 64}
CONFIGS = [
    (1, 1, 5, 1, True),
    (1, 64, 16, 3, True),  # d > width: Laplacian compression, single hidden layer
    (2, 2, 1, 3, True),  # width 1 < d
    (2, 17, 8, 1, False),  # no bias at all, width < d
    (3, 3, 2, 1, [True, False, True, False]),  # bias on some layers
    (3, 17, 32, 3, [False, True, True, True]),  # width > d
    (4, 1, 3, 3, [True, True, False, True, False]),
    (4, 64, 80, 1, True),  # width > d = 64
    (5, 2, 7, 3, [False, False, False, False, False, True]),
    (6, 3, 9, 1, True),
    (6, 64, 16, 3, False),  # deep, d > width, no bias
]


@pytest.mark.parametrize("depth,d,width,m,bias", CONFIGS, ids=lambda v: str(v).replace(" ", ""))
def test_depth_width_bias(device, depth, d, width, m, bias):
    acts = [_ACT_CYCLE[i % len(_ACT_CYCLE)]() for i in range(depth)]
    model = _mlp(acts, d, width, m, bias=bias, seed=depth * 100 + d).to(device)
    N = 4 if d == 64 else 6
    check_model(model, _x(N, d, device, seed=d))


# ---- structural variants of nn.Sequential ----------------------------------------------------


def _nested():
    return nn.Sequential(
        nn.Sequential(nn.Linear(3, 6), nn.Tanh()),
        nn.Sequential(nn.Sequential(nn.Linear(6, 5), nn.SiLU()), nn.Sequential()),
        nn.Linear(5, 2),
    )


def _identity_dropout():
    return nn.Sequential(
        nn.Linear(3, 6), nn.Identity(), nn.Tanh(), nn.Dropout(0.5),
        nn.Linear(6, 5), thd.nn.Identity(), nn.GELU(), nn.Dropout(0.0), nn.Identity(),
        nn.Linear(5, 2), nn.Dropout(0.3),
    ).eval()


def _act_on_input():
    return nn.Sequential(nn.Tanh(), nn.Linear(3, 5), nn.SiLU(), nn.Linear(5, 2))


def _act_on_input_only():
    return nn.Sequential(thd.nn.Sine(w0=2.0), nn.Linear(3, 2))


def _two_linear():
    return nn.Sequential(
        nn.Linear(3, 6), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4, bias=False), nn.Linear(4, 6),
        nn.Softplus(), nn.Linear(6, 4), nn.Linear(4, 2),
    )


def _ends_with_activation():
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2), nn.Sigmoid())


def _two_activations_in_a_row():
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.SiLU(), nn.Linear(6, 2), nn.GELU(), nn.Tanh())


def _reused_activation():
    t = nn.Tanh()  # one instance, three places (named_children() would yield it once)
    return nn.Sequential(nn.Linear(3, 6), t, nn.Linear(6, 5), t, nn.Linear(5, 2), t)


def _reused_dropin():
    s = thd.nn.SiLU()
    return nn.Sequential(nn.Linear(3, 6), s, nn.Linear(6, 6), s, nn.Linear(6, 2))


def _reused_linear():
    lin = nn.Linear(5, 5)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), lin, nn.SiLU(), lin, nn.Tanh(), nn.Linear(5, 2))


def _reused_block():
    blk = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), blk, blk, nn.Linear(4, 2))


def _activation_only():
    return nn.Sequential(nn.Tanh())  # u_i = tanh(x_i): m = d = 3


def _bare_activation():
    return nn.Softplus(beta=2.0)  # not wrapped in a Sequential


# name -> (builder, number of activation layers the engine must see)
STRUCTURES = {
    "nested": (_nested, 2),
    "identity_dropout_eval": (_identity_dropout, 2),
    "activation_on_input": (_act_on_input, 2),
    "activation_on_input_only": (_act_on_input_only, 1),
    "two_linear_in_a_row": (_two_linear, 2),
    "ends_with_activation": (_ends_with_activation, 2),
    "two_activations_in_a_row": (_two_activations_in_a_row, 4),
    "reused_activation_instance": (_reused_activation, 3),
    "reused_dropin_instance": (_reused_dropin, 2),
    "reused_linear_instance": (_reused_linear, 3),
    "reused_sequential_block": (_reused_block, 3),
    "activation_only": (_activation_only, 1),
    "bare_activation_module": (_bare_activation, 1),
}


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_structures(device, name):
    build, n_acts = STRUCTURES[name]
    torch.manual_seed(7)
    model = build().double().to(device)
    layers = engine.parse_mlp(model, "test")
    assert sum(isinstance(layer, engine.ActLayer) for layer in layers) == n_acts
    check_model(model, _x(5, 3, device, scale=1.2))


def test_reused_activation_is_applied_every_time(device):
    """Regression: a module instance used twice was once visited once (named_children dedups),
    which silently dropped a layer. The parser must see all three Tanh and both Linear uses."""
    model = _reused_activation().double().to(device)
    layers = engine.parse_mlp(model, "test")
    assert [type(layer).__name__ for layer in layers] == ["LinearLayer", "ActLayer", "LinearLayer", "ActLayer", "LinearLayer", "ActLayer"]
    model = _reused_block().double().to(device)
    assert sum(isinstance(layer, engine.ActLayer) for layer in engine.parse_mlp(model, "test")) == 3


# ---- dims, negative dims, unbatched ----------------------------------------------------------


def _small_model(device, d=3, m=2, seed=11):
    return _mlp([nn.Tanh(), nn.SiLU(), nn.GELU()], d=d, width=5, m=m, seed=seed).to(device)


@pytest.mark.parametrize(
    "dims",
    [[1, 2], [2, 0], [-1], [-3, -1], (1,), torch.tensor([0, 2]), [0, 1, 2], [-1, -2, -3]],
    ids=["[1,2]", "[2,0]", "[-1]", "[-3,-1]", "(1,)", "tensor[0,2]", "all", "reversed-negative"],
)
def test_dims_subsets(device, dims):
    """Hessian diag in the order of ``dims`` (negative dims count from the end), Laplacian over
    those dims only; the gradient keeps all d components."""
    model = _small_model(device)
    check_model(model, _x(5, 3, device), dims=dims)


def test_dims_order_follows_request(device):
    model = _small_model(device)
    x = _x(4, 3, device)
    a = thd.mlp_hessian_diag(model, x, dims=[2, 0])
    b = thd.mlp_hessian_diag(model, x)
    assert a.shape == (4, 2, 2)
    assert_rel(a, b[..., [2, 0]].detach(), what="dims=[2,0]")


@pytest.mark.parametrize("d,m", [(3, 2), (1, 1), (17, 3)])
def test_unbatched(device, d, m):
    """x of shape (d,) gives (m,) / (m, d) results, equal to torch.func at that point."""
    model = _small_model(device, d=d, m=m)
    x = _x(1, d, device)[0]
    value, grad, hess = torch_reference(model, x)
    hd = hess.diagonal(dim1=-2, dim2=-1)
    for path in ("graph", "no_grad"):
        ctx = torch.no_grad() if path == "no_grad" else contextlib.nullcontext()
        with ctx:
            out_hd = thd.mlp_hessian_diag(model, x)
            out_lap = thd.mlp_laplacian(model, x)
            der = thd.mlp_derivatives(model, x, second="diag")
            der_l = thd.mlp_derivatives(model, x, second="laplacian", dims=[0])
        assert out_hd.shape == (m, d) and out_lap.shape == (m,)
        assert der.value.shape == (m,) and der.gradient.shape == (m, d) and der.second.shape == (m, d)
        assert der_l.second.shape == (m,)
        assert_rel(out_hd, hd, what=f"[{path}] unbatched hessian_diag")
        assert_rel(out_lap, hd.sum(-1), what=f"[{path}] unbatched laplacian")
        assert_rel(der.value, value, what=f"[{path}] unbatched value")
        assert_rel(der.gradient, grad, what=f"[{path}] unbatched gradient")
        assert_rel(der.second, hd, what=f"[{path}] unbatched second")
        assert_rel(der_l.second, hd[..., 0], what=f"[{path}] unbatched dims=[0]")


# ---- the Laplacian's compression path (more directions than the first layer is wide) ----------


@pytest.fixture
def qr_calls(monkeypatch):
    """Count the engine's QR compressions (torch.linalg.qr is looked up at call time)."""
    calls = []
    real = torch.linalg.qr

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "qr", spy)
    return calls


@pytest.mark.parametrize(
    "d,width,depth,dims",
    [(64, 16, 2, None), (64, 16, 3, list(range(0, 64, 2))), (17, 4, 1, None), (9, 3, 4, [-1, 0, 3, 4, 5, 7])],
)
def test_laplacian_compression_is_exact(device, reverse_path, qr_calls, d, width, depth, dims):
    acts = [_ACT_CYCLE[i % len(_ACT_CYCLE)]() for i in range(depth)]
    model = _mlp(acts, d, width, m=3, seed=d + width).to(device)
    x = _x(4, d, device, seed=5)
    _, _, hess = torch_reference(model, x)
    sel = _norm_dims(dims, d)
    lap = hess.diagonal(dim1=-2, dim2=-1)[..., sel].sum(-1)
    for path in ("graph", "no_grad"):
        ctx = torch.no_grad() if path == "no_grad" else contextlib.nullcontext()
        qr_calls.clear()
        with ctx:
            out = thd.mlp_laplacian(model, x, dims=dims)
            der = thd.mlp_derivatives(model, x, second="laplacian", dims=dims)
        assert len(qr_calls) == 2, f"[{path}] the compression path was not taken: {qr_calls}"
        assert_rel(out, lap, what=f"[{path}] compressed mlp_laplacian")
        assert_rel(der.second, lap, what=f"[{path}] compressed mlp_derivatives")


# ---- the no-grad (in-place, chunked) path ----------------------------------------------------


class _OpSpy:
    """Stands in for torch.ops.torchhessdiag inside engine.py and records the ops called."""

    def __init__(self, real):
        self.real, self.called = real, []

    def __getattr__(self, name):
        self.called.append(name)
        return getattr(self.real, name)


@pytest.mark.parametrize("no_grad_how", ["no_grad", "inference_mode", "frozen_params"])
def test_no_grad_in_place_path_same_numbers(device, reverse_path, monkeypatch, no_grad_how):
    """torch.no_grad() / inference_mode / nothing requiring grad: the engine takes the in-place
    jet_layer_ path, with the same numbers as torch.func (and as the graph path)."""
    model = _mlp([nn.Tanh(), nn.SiLU(), nn.GELU(), nn.Sigmoid()], d=5, width=7, m=3).to(device)
    x = _x(6, 5, device)
    value, grad, hess = torch_reference(model, x)
    hd = hess.diagonal(dim1=-2, dim2=-1)
    graph = thd.mlp_derivatives(model, x, second="diag")
    assert graph.second.requires_grad
    spy = _OpSpy(engine._ops)
    monkeypatch.setattr(engine, "_ops", spy)
    if no_grad_how == "no_grad":
        ctx = torch.no_grad()
    elif no_grad_how == "inference_mode":
        ctx = torch.inference_mode()
    else:
        model.requires_grad_(False)
        ctx = contextlib.nullcontext()
    with ctx:
        out_hd = thd.mlp_hessian_diag(model, x)
        out_lap = thd.mlp_laplacian(model, x)
        der = thd.mlp_derivatives(model, x, second="diag")
    assert "jet_layer_" in spy.called and "jet_layer" not in spy.called, spy.called
    assert not out_hd.requires_grad
    assert_rel(out_hd, hd, what="no-grad hessian_diag")
    assert_rel(out_lap, hd.sum(-1), what="no-grad laplacian")
    assert_rel(der.value, value, what="no-grad value")
    assert_rel(der.gradient, grad, what="no-grad gradient")
    assert_rel(der.second, hd, what="no-grad second")
    assert_rel(der.second, graph.second.detach(), rel=1e-12, what="no-grad vs graph path")


def test_graph_path_uses_out_of_place_op(device, reverse_path, monkeypatch):
    model = _mlp([nn.Tanh(), nn.SiLU(), nn.GELU()], d=3, width=5, m=1).to(device)
    spy = _OpSpy(engine._ops)
    monkeypatch.setattr(engine, "_ops", spy)
    out = thd.mlp_laplacian(model, _x(4, 3, device))
    assert out.requires_grad
    assert "jet_layer" in spy.called and "jet_layer_" not in spy.called, spy.called


def test_no_grad_chunked(device, reverse_path, monkeypatch):
    """Many points in small chunks through reused buffers: same numbers as torch.func."""
    model = _mlp([nn.Tanh(), nn.SiLU(), nn.Softplus()], d=4, width=6, m=2).to(device)
    x = _x(29, 4, device)
    _, grad, hess = torch_reference(model, x)
    hd = hess.diagonal(dim1=-2, dim2=-1)
    monkeypatch.setattr(engine, "_CHUNK_ELEMENTS", 3 * 4 * 6)  # 3 points per chunk
    monkeypatch.setattr(engine, "_CHUNK_ELEMENTS_GPU", 3 * 4 * 6)
    with torch.no_grad():
        der = thd.mlp_derivatives(model, x, second="diag")
        lap = thd.mlp_laplacian(model, x)
    assert_rel(der.second, hd, what="chunked second")
    assert_rel(der.gradient, grad, what="chunked gradient")
    assert_rel(lap, hd.sum(-1), what="chunked laplacian")


# ---- float32 ---------------------------------------------------------------------------------


F32_CASES = {
    "tanh-silu-gelu d=3 m=2": (lambda: _mlp([nn.Tanh(), nn.SiLU(), nn.GELU()], 3, 8, 2, seed=21), 3),
    "softplus-sigmoid-celu d=17 m=1": (lambda: _mlp([nn.Softplus(), nn.Sigmoid(), nn.CELU(0.5)], 17, 16, 1, seed=22), 17),
    "sine-tanh d=64 w=16 (compression) m=3": (lambda: _mlp([thd.nn.Sine(w0=2.0), nn.Tanh()], 64, 16, 3, seed=23), 64),
}


@pytest.mark.parametrize("name", list(F32_CASES))
def test_float32_close_to_torch_func_float32(device, name):
    build, d = F32_CASES[name]
    model64 = build().to(device)
    model32 = copy.deepcopy(model64).float()
    model64 = copy.deepcopy(model32).double()  # exactly the float32 weights, in float64
    x32 = _x(5, d, device, dtype=torch.float32)
    x64 = x32.double()
    _, _, hess64 = torch_reference(model64, x64)
    v32, g32, h32 = torch_reference(model32, x32)
    hd64, hd32 = hess64.diagonal(dim1=-2, dim2=-1), h32.diagonal(dim1=-2, dim2=-1)
    scale_hd = hd64.abs().max().item()
    scale_lap = hd64.abs().sum(-1).max().item()  # a sum's natural error scale: sum of |terms|
    bound = F32_FACTOR * EPS32
    for path in ("graph", "no_grad"):
        ctx = torch.no_grad() if path == "no_grad" else contextlib.nullcontext()
        with ctx:
            der = thd.mlp_derivatives(model32, x32, second="diag")
            lap = thd.mlp_laplacian(model32, x32)
        assert der.second.dtype == torch.float32 and lap.dtype == torch.float32
        for what, ours, torch32, scale in (
            ("hessian diag", der.second, hd32, scale_hd),
            ("laplacian", lap, hd32.sum(-1), scale_lap),
            ("value", der.value, v32, v32.abs().max().item()),
            ("gradient", der.gradient, g32, g32.abs().max().item()),
        ):
            err = (ours.detach() - torch32).abs().max().item()
            assert err <= bound * scale, f"[{path}] float32 {what}: {err:.3e} > {bound:.2e} * {scale:.3e}"
        # and both are float32 approximations of the exact (float64) numbers of these weights
        err64 = (der.second.detach().double() - hd64).abs().max().item()
        assert err64 <= bound * scale_hd, f"[{path}] float32 vs exact: {err64:.3e}"


# ---- a compact sweep: activation x configuration, structures, dims (was tests/test_mlp_engine.py) ---

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

MLP_ACTIVATIONS = [
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
MLP_CONFIGS = [
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


@pytest.mark.parametrize("act", MLP_ACTIVATIONS, ids=lambda a: repr(a))
@pytest.mark.parametrize("cfg", MLP_CONFIGS, ids=lambda c: "depth{}-d{}-w{}-m{}-bias{}".format(*c))
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


def test_float32_within_10x_torch_float32_error(device):
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
