"""The public second-order functions (the mlp_* functions: engine.py, fused.py) where the answer is
degenerate or the call is wrong: linear and piecewise-linear networks (zeros, never None; the
piecewise-linear warning), unsupported modules, bad arguments, empty batches. Split from
tests/engine/test_engine_api.py; with the matching tests of tests/test_mlp_engine.py.

References: torch.func.vmap(torch.func.hessian) and nested torch.autograd, float64; tolerance
1e-10 relative to the largest |entry| of the reference (tests/engine/test_engine_api.py says why).
"""

from __future__ import annotations

import warnings

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

def _rel(a, b):
    scale = b.abs().max().clamp_min(1e-300)
    return ((a - b).abs().max() / scale).item()


def _ref(model, x):
    """(value, gradient, Hessian) per point by torch.func: (N, m), (N, m, d), (N, m, d, d)."""
    val = model(x)
    jac = torch.func.vmap(torch.func.jacrev(model))(x)
    hess = torch.func.vmap(torch.func.hessian(model))(x)
    return val, jac, hess


# ---- the public functions, uniformly ---------------------------------------------------------


def _gen(x):
    return torch.Generator(device=getattr(x, "device", "cpu")).manual_seed(0)


def _factor(x):
    """A (d, 2) factor matching x's feature count (3 where x has none: the x checks come first)."""
    d = x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() >= 1 else 3
    return torch.ones(d, 2, dtype=torch.float64, device=getattr(x, "device", "cpu"))


# name -> (call(model, x), output shape for x (N, d) with m outputs)
FUNCS = {
    "mlp_laplacian": (lambda mdl, x: thd.mlp_laplacian(mdl, x), lambda N, m, d: (N, m)),
    "mlp_hessian_diag": (lambda mdl, x: thd.mlp_hessian_diag(mdl, x), lambda N, m, d: (N, m, d)),
    "mlp_derivatives(diag)": (lambda mdl, x: thd.mlp_derivatives(mdl, x, second="diag").second, lambda N, m, d: (N, m, d)),
    "mlp_derivatives(laplacian)": (lambda mdl, x: thd.mlp_derivatives(mdl, x).second, lambda N, m, d: (N, m)),
    "mlp_weighted_laplacian": (
        lambda mdl, x: thd.mlp_weighted_laplacian(mdl, x, factor=_factor(x)),
        lambda N, m, d: (N, m),
    ),
    "mlp_mixed_partials": (lambda mdl, x: thd.mlp_mixed_partials(mdl, x, [(0, 1), (2, 2), (1, 0)]), lambda N, m, d: (N, m, 3)),
    "mlp_laplacian_hutchinson": (
        lambda mdl, x: thd.mlp_laplacian_hutchinson(mdl, x, num_samples=3, generator=_gen(x)),
        lambda N, m, d: (N, m),
    ),
}


# ---- linear and piecewise-linear networks ----------------------------------------------------


LINEAR_MODELS = {
    "Linear-Linear": lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)),
    "with nn.Identity / thd.nn.Identity": lambda: nn.Sequential(
        nn.Linear(3, 4), nn.Identity(), thd.nn.Identity(), nn.Linear(4, 2, bias=False), nn.Dropout(0.2)
    ).eval(),
    "bare nn.Linear": lambda: nn.Linear(3, 2),
}


@pytest.mark.parametrize("model_name", list(LINEAR_MODELS))
@pytest.mark.parametrize("fn", list(FUNCS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_network_gives_zeros(device, model_name, fn, dtype):
    torch.manual_seed(0)
    model = LINEAR_MODELS[model_name]().to(device=device, dtype=dtype)
    x = _x(4, 3, device, dtype=dtype)
    call, shape = FUNCS[fn]
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode):
            out = call(model, x)
            out1 = call(model, x[0])
        assert out is not None and out1 is not None
        assert out.shape == shape(4, 2, 3), (fn, tuple(out.shape))
        assert out1.shape == shape(4, 2, 3)[1:]
        assert out.dtype == dtype and out.device == x.device
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.equal(out1, torch.zeros_like(out1))


def test_linear_network_value_and_gradient(device):
    model = LINEAR_MODELS["with nn.Identity / thd.nn.Identity"]().double().to(device)
    x = _x(4, 3, device)
    out = thd.mlp_derivatives(model, x, second="diag")
    W = model[3].weight @ model[0].weight
    assert_rel(out.value, model(x).detach(), what="value")
    assert_rel(out.gradient, W.detach().expand(4, 2, 3), what="gradient")


def test_linear_network_laplacian_loss_is_differentiable(device):
    """mlp_laplacian is documented as differentiable w.r.t. the parameters in grad mode, and the
    README's training pattern is ``loss = ((lap + 1) ** 2).mean(); loss.backward()``. For a
    purely linear model the Laplacian is 0 and its gradient w.r.t. every parameter is 0 -- the
    same answer the ReLU model below gives -- so the call must not break the training step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)).double().to(device)
    x = _x(5, 3, device)
    lap = thd.mlp_laplacian(model, x)
    loss = ((lap + 1.0) ** 2).mean()
    # the piecewise-linear model's zeros do carry a graph:
    relu = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).double().to(device)
    with pytest.warns(UserWarning, match="piecewise linear"):
        assert thd.mlp_laplacian(relu, x).requires_grad
    assert lap.requires_grad, "zero Laplacian of a linear model is detached from the parameters"
    grads = _param_grads(loss, list(model.parameters()))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("fn", list(FUNCS))
def test_linear_network_results_are_differentiable(device, fn):
    """In grad mode every function's zeros for a linear model are connected to whatever
    requires grad (parameters, x), with zero derivatives: a loss on them backpropagates."""
    call, shape = FUNCS[fn]
    torch.manual_seed(0)
    model = LINEAR_MODELS["with nn.Identity / thd.nn.Identity"]().double().to(device)
    x = _x(4, 3, device).requires_grad_(True)
    out = call(model, x)
    assert out.requires_grad
    loss = (out**2 + out).sum()
    grads = torch.autograd.grad(loss, [x] + list(model.parameters()), allow_unused=True, materialize_grads=True)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    # x alone requiring grad (frozen parameters)
    model.requires_grad_(False)
    out = call(model, x)
    assert out.requires_grad
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(gx, torch.zeros_like(x))
    # nothing requires grad / no-grad mode: no graph
    with torch.no_grad():
        assert not call(model.requires_grad_(True), x).requires_grad
    assert not call(model.requires_grad_(False), x.detach()).requires_grad


PWL_MODELS = {
    "ReLU": lambda: nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)),
    "LeakyReLU(0.1)": lambda: nn.Sequential(nn.Linear(3, 5), nn.LeakyReLU(0.1), nn.Linear(5, 2)),
    "thd.nn.ReLU + LeakyReLU + Identity": lambda: nn.Sequential(
        nn.Linear(3, 5), thd.nn.ReLU(), nn.Linear(5, 4), thd.nn.LeakyReLU(0.2), thd.nn.Identity(), nn.Linear(4, 2)
    ),
}


@pytest.mark.parametrize("model_name", list(PWL_MODELS))
@pytest.mark.parametrize("fn", list(FUNCS))
def test_piecewise_linear_network_zeros_and_warning(device, model_name, fn):
    torch.manual_seed(1)
    model = PWL_MODELS[model_name]().double().to(device)
    x = _x(4, 3, device)
    call, shape = FUNCS[fn]
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode):
            with pytest.warns(UserWarning, match="piecewise linear") as rec:
                out = call(model, x)
        assert out.shape == shape(4, 2, 3) and out.dtype == torch.float64
        assert torch.equal(out, torch.zeros_like(out))
        assert len([w for w in rec if "piecewise linear" in str(w.message)]) == 1


@pytest.mark.parametrize("fn", list(FUNCS))
def test_piecewise_linear_warning_points_at_caller(device, fn):
    """The warning is raised with stacklevel=3 so that it names the user's line (as every
    library warning should, and as the default filter needs to show it once per call site);
    it must do so for every public function, not only for those that call the check directly."""
    torch.manual_seed(1)
    model = PWL_MODELS["ReLU"]().double().to(device)
    call, _ = FUNCS[fn]
    with pytest.warns(UserWarning, match="piecewise linear") as rec:
        call(model, _x(2, 3, device))
    files = [w.filename for w in rec if "piecewise linear" in str(w.message)]
    assert files == [__file__], files


def test_piecewise_linear_value_and_gradient_still_right(device):
    torch.manual_seed(1)
    model = PWL_MODELS["ReLU"]().double().to(device)
    x = _x(4, 3, device)
    with pytest.warns(UserWarning, match="piecewise linear"):
        out = thd.mlp_derivatives(model, x, second="diag")
    jac = torch.func.vmap(torch.func.jacrev(model))(x).detach()
    assert jac.abs().max() > 0
    assert_rel(out.value, model(x).detach(), what="value")
    assert_rel(out.gradient, jac, what="gradient")


def test_relu_plus_tanh_network_no_warning_and_exact(device):
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.LeakyReLU(0.1), nn.Linear(4, 2)
    ).double().to(device)
    x = _x(5, 3, device)
    H = torch_hessian(model, x).detach()
    hd = H.diagonal(dim1=-2, dim2=-1)
    assert hd.abs().max() > 1e-3
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        outs = {name: call(model, x) for name, (call, _) in FUNCS.items() if name != "mlp_laplacian_hutchinson"}
    assert not [str(w.message) for w in rec if "piecewise linear" in str(w.message)]
    assert_rel(outs["mlp_hessian_diag"], hd, what="relu+tanh hessian diag")
    assert_rel(outs["mlp_laplacian"], hd.sum(-1), what="relu+tanh laplacian")
    assert_rel(outs["mlp_mixed_partials"], torch.stack([H[..., 0, 1], H[..., 2, 2], H[..., 1, 0]], -1), what="mixed")


# ---- errors ----------------------------------------------------------------------------------


class _MyAct(nn.Module):
    def forward(self, z):
        return torch.tanh(z) * 2


class _MLP(nn.Module):
    """A perfectly ordinary MLP that is not an nn.Sequential."""

    def __init__(self):
        super().__init__()
        self.l1, self.act, self.l2 = nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)

    def forward(self, x):
        return self.l2(self.act(self.l1(x)))


UNSUPPORTED = {
    "Conv1d": lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Conv1d(1, 1, 1), nn.Linear(4, 2)),
    "LayerNorm": lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)),
    "Mish": lambda: nn.Sequential(nn.Linear(3, 4), nn.Mish(), nn.Linear(4, 2)),
    "_MyAct": lambda: nn.Sequential(nn.Linear(3, 4), nn.Sequential(_MyAct()), nn.Linear(4, 2)),
    "Softsign": lambda: nn.Sequential(nn.Linear(3, 4), nn.Softsign(), nn.Linear(4, 2)),
}


@pytest.mark.parametrize("fn", list(FUNCS))
def test_unsupported_modules(device, fn):
    call, _ = FUNCS[fn]
    x = _x(2, 3, device)
    for name, build in UNSUPPORTED.items():
        model = build().double().to(device)
        with pytest.raises(NotImplementedError, match=name):
            call(model, x)
    # not an nn.Sequential: a custom MLP class, a ModuleList, a plain function
    with pytest.raises((NotImplementedError, TypeError), match="_MLP"):
        call(_MLP().double().to(device), x)
    with pytest.raises((NotImplementedError, TypeError)):
        call(nn.ModuleList([nn.Linear(3, 2)]).double().to(device), x)
    with pytest.raises(TypeError):
        call(lambda t: t.sum(-1, keepdim=True), x)
    with pytest.raises(NotImplementedError):
        call(nn.Sequential(nn.Identity()), x)  # nothing the engine can use


@pytest.mark.parametrize("fn", list(FUNCS))
def test_dropout_training_mode(device, fn):
    call, shape = FUNCS[fn]
    x = _x(3, 3, device)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.1), nn.Linear(4, 2)).double().to(device)
    assert model.training
    with pytest.raises(NotImplementedError, match=r"eval\(\)"):
        call(model, x)
    # p = 0 in training mode is the identity: accepted
    model0 = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.0), nn.Linear(4, 2)).double().to(device)
    assert call(model0, x).shape == shape(3, 2, 3)
    model.eval()
    assert call(model, x).shape == shape(3, 2, 3)


@pytest.mark.parametrize("fn", list(FUNCS))
def test_bad_x(device, fn):
    call, _ = FUNCS[fn]
    model = _mlp([nn.Tanh()], 3, 4, 2).to(device)
    with pytest.raises(ValueError, match=r"\(2, 4, 3\)"):
        call(model, torch.zeros(2, 4, 3, dtype=torch.float64, device=device))  # 3-D
    with pytest.raises(ValueError):
        call(model, torch.tensor(1.0, dtype=torch.float64, device=device))  # 0-D
    with pytest.raises(ValueError) as ei:
        call(model, torch.zeros(2, 5, dtype=torch.float64, device=device))  # 5 features, model wants 3
    assert "5" in str(ei.value) and "3" in str(ei.value), str(ei.value)
    with pytest.raises(ValueError) as ei:
        call(model, torch.zeros(7, dtype=torch.float64, device=device))  # unbatched, 7 features
    assert "7" in str(ei.value) and "3" in str(ei.value), str(ei.value)
    for dt in (torch.int64, torch.int32, torch.bool, torch.float16, torch.complex128):
        with pytest.raises(TypeError):
            call(model, torch.zeros(2, 3, device=device).to(dt))
    with pytest.raises(TypeError, match="Tensor"):
        call(model, [[0.0, 1.0, 2.0]])  # not a tensor
    with pytest.raises(TypeError, match="float32"):
        call(model.float(), torch.zeros(2, 3, dtype=torch.float64, device=device))  # float64 x, float32 model
    with pytest.raises(TypeError, match="float64"):
        call(model.double(), torch.zeros(2, 3, dtype=torch.float32, device=device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
@pytest.mark.parametrize("fn", list(FUNCS))
def test_x_on_other_device(fn):
    call, _ = FUNCS[fn]
    model = _mlp([nn.Tanh()], 3, 4, 2)
    with pytest.raises(ValueError, match="cuda"):
        call(model, torch.zeros(2, 3, dtype=torch.float64, device="cuda"))


DIMS_FUNCS = {
    "mlp_laplacian": lambda mdl, x, dims: thd.mlp_laplacian(mdl, x, dims=dims),
    "mlp_hessian_diag": lambda mdl, x, dims: thd.mlp_hessian_diag(mdl, x, dims=dims),
    "mlp_derivatives": lambda mdl, x, dims: thd.mlp_derivatives(mdl, x, second="diag", dims=dims),
    "mlp_laplacian_hutchinson": lambda mdl, x, dims: thd.mlp_laplacian_hutchinson(mdl, x, 2, dims=dims),
}


@pytest.mark.parametrize("fn", list(DIMS_FUNCS))
def test_bad_dims(device, fn):
    call = DIMS_FUNCS[fn]
    model = _mlp([nn.Tanh()], 3, 4, 1).to(device)
    x = _x(2, 3, device)
    for bad in ([3], [-4], [0, 7], [0, 0], [1, 2, 1], [0, -3], [2, -1], [], ()):
        with pytest.raises(ValueError, match="dims"):
            call(model, x, bad)
    with pytest.raises(ValueError, match="dims"):
        call(model, x, torch.tensor([], dtype=torch.int64))
    with pytest.raises(TypeError, match="dims"):
        call(model, x, ["a"])


def test_bad_second(device):
    model = _mlp([nn.Tanh()], 3, 4, 1).to(device)
    for bad in ("foo", "Laplacian", "hessian", None):
        with pytest.raises(ValueError, match="second"):
            thd.mlp_derivatives(model, _x(2, 3, device), second=bad)


# ---- empty batch -----------------------------------------------------------------------------


@pytest.mark.parametrize("fn", list(FUNCS))
def test_empty_batch(device, fn):
    call, shape = FUNCS[fn]
    model = _mlp([nn.Tanh(), nn.SiLU()], 3, 4, 2).to(device)
    x = torch.zeros(0, 3, dtype=torch.float64, device=device)
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode):
            out = call(model, x)
        assert out.shape == shape(0, 2, 3), (grad_mode, tuple(out.shape))
        assert out.dtype == torch.float64 and out.device == x.device
    der = thd.mlp_derivatives(model, x, second="laplacian")
    assert der.value.shape == (0, 2) and der.gradient.shape == (0, 2, 3) and der.second.shape == (0, 2)
    # and a loss over an empty batch backpropagates (zero gradients)
    loss = call(model, x).sum()
    if loss.requires_grad:
        grads = _param_grads(loss, list(model.parameters()))
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


# ---- linear, piecewise-linear, unsupported, bad inputs, empty (was tests/test_mlp_engine.py) -----

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


def test_empty_batch_shapes_with_and_without_grad(device):
    model = _mlp([nn.Tanh()], 3, 4, 2).to(device)
    x = torch.zeros(0, 3, dtype=torch.float64, device=device)
    assert thd.mlp_laplacian(model, x).shape == (0, 2)
    assert thd.mlp_hessian_diag(model, x).shape == (0, 2, 3)
    with torch.no_grad():
        assert thd.mlp_laplacian(model, x).shape == (0, 2)
