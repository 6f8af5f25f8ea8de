"""laplacian / hessian_diag / axis_derivatives: the issue's examples, dispatch, the exact autograd
fallback, zeros (never None), the piecewise-linear warning, and bad arguments.

Expected values are closed forms from the issue or nested torch.autograd.grad (tests/
_general_helpers.oracle), float64; tolerance 1e-10 relative to the quantity's scale unless said.
"""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchhessdiag as thd

from _general_helpers import assert_close, ln_r2, oracle, poly_product, poly_product_traceable

DT = torch.float64


# ---- the examples ----------------------------------------------------------------------


def test_log_derivatives_0_to_4_and_beyond():
    f = lambda x: torch.log(x + 2).sum(-1)  # noqa: E731  (log has no jet rule: the fallback)
    x = torch.ones(1, 1, dtype=DT)
    out, info = thd.axis_derivatives(f, x, 4, return_info=True)
    assert info.path == "autograd" and "log" in info.reason
    want = [math.log(3.0), 1 / 3, -1 / 9, 2 / 27, -6 / 81]
    assert out.shape == (5, 1, 1)
    for k in range(5):
        assert abs(float(out[k, 0, 0]) - want[k]) <= 1e-15 * max(1, abs(want[k])), k
    assert abs(float(out[0, 0, 0]) - 1.0986123) < 1e-7
    # beyond: d^k log(x + 2) = (-1)^(k+1) (k-1)! / 3^k
    out6 = thd.axis_derivatives(f, x, 6)
    for k in range(1, 7):
        want_k = (-1) ** (k + 1) * math.factorial(k - 1) / 3**k
        assert abs(float(out6[k, 0, 0]) - want_k) <= 1e-14 * abs(want_k), k


def test_laplacian_of_log_r2_is_2_over_r2():
    torch.manual_seed(0)
    x = torch.randn(20, 3, dtype=DT)
    lap, info = thd.laplacian(ln_r2, x, return_info=True)
    assert info.path == "autograd"
    r2 = (x * x).sum(-1)
    assert_close(lap, 2 / r2, 1e-12, "2/r^2")


@pytest.mark.parametrize("f", [poly_product, poly_product_traceable], ids=["prod", "traced"])
def test_hessian_diag_of_product(f):
    x = torch.tensor([[1.0, 2.0, 0.0]], dtype=DT)
    hd, info = thd.hessian_diag(f, x, return_info=True)
    assert info.path == ("jet" if f is poly_product_traceable else "autograd"), info
    assert hd.tolist() == [[-2.0, -2.0, 2.0]]
    assert thd.laplacian(f, x).tolist() == [-2.0]


# ---- dispatch and the engine path ----------------------------------------------------------------


def test_mlp_goes_to_the_engine_and_agrees_with_mlp_functions():
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 2)).double()
    x = torch.randn(6, 3, dtype=DT)
    lap, info = thd.laplacian(mlp, x, return_info=True)
    assert info.path == "engine"
    assert torch.equal(lap, thd.mlp_laplacian(mlp, x))
    hd, info = thd.hessian_diag(mlp, x, dims=[2, 0], return_info=True)
    assert info.path == "engine"
    assert torch.equal(hd, thd.mlp_hessian_diag(mlp, x, dims=[2, 0]))
    want = oracle(mlp, x, 2, dims=[2, 0])
    assert_close(hd, want[2], 1e-10, "hessian_diag")
    ax, info = thd.axis_derivatives(mlp, x, 2, dims=[2, 0], return_info=True)
    assert info.path == "engine"
    assert_close(ax, want, 1e-10, "axis order 2")
    assert thd.explain(mlp, x).path == "engine"
    assert thd.explain(mlp, x, "axis_derivatives", order=3).path == "jet"
    assert thd.explain(mlp, x, "axis_derivatives", order=5).path == "autograd"


def test_explain_names_the_unsupported_node():
    model = nn.Sequential(nn.Linear(3, 4), nn.Mish(), nn.Tanh(), nn.Linear(4, 1)).double()  # Mish: not in the table
    info = thd.explain(model, torch.randn(2, 3, dtype=DT))
    assert info.path == "autograd"
    assert "Mish" in info.reason and "'1'" in info.reason


# ---- the exact fallback --------------------------------------------------------------------------


class Branchy(nn.Module):
    """Python control flow on tensor values: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = self.lin(x)
        if bool((h > 100).any()):  # never true here, but data-dependent
            h = h.clamp(max=100)
        return self.out(torch.tanh(h) * torch.sigmoid(h))


class WithUnsupportedOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 6)
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x))) + torch.log1p(x.square()).sum(-1, keepdim=True)


class MyExp(torch.autograd.Function):
    """No forward-mode rule: torch.func.jvp cannot run it, nested backward can."""

    @staticmethod
    def forward(ctx, z):
        y = z.exp()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * y


class OnceExp(torch.autograd.Function):
    """A backward that is not recorded for double backward (@once_differentiable): nested
    reverse mode sees no graph at order 2, and torch.func's nested forward mode gives silent
    zeros through custom Functions (pytorch/pytorch#197867) -- nobody can compute its Hessian."""

    @staticmethod
    def forward(ctx, z):
        y = z.exp()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * y


def _layer_norm_by_hand(h):
    mean = h.mean(-1, keepdim=True)
    var = ((h - mean) ** 2).mean(-1, keepdim=True)
    return (h - mean) / torch.sqrt(var + 1e-5)


@pytest.mark.parametrize("case", ["branch", "unsupported_op", "no_forward_ad", "layernorm"])
def test_fallback_is_exact(case, device):
    torch.manual_seed(2)
    orders = (2, 4, 5)
    if case == "branch":
        f = Branchy().to(device, DT)
        f_ref = f
    elif case == "unsupported_op":
        f = WithUnsupportedOp().to(device, DT)
        f_ref = f
    elif case == "layernorm":
        # nested reverse mode of F.layer_norm is right to order 2 only in torch 2.13 (orders >= 3
        # treat its saved mean/rstd as constants, and its nested forward mode is wrong already at
        # order 2: pytorch/pytorch#196700); log1p sends the model to the fallback, which runs
        # layer_norm as elementary ops (torchhessdiag/fallback_ops.py): exact at every order
        # (before issue 15 orders 3-4 were off by 10-100 %, silently)
        lin, ln, out = nn.Linear(3, 6).to(device, DT), nn.LayerNorm(6).to(device, DT), nn.Linear(6, 2).to(device, DT)
        f = lambda x: out(torch.tanh(ln(lin(x)))) + torch.log1p(x.square()).sum(-1, keepdim=True)  # noqa: E731
        f_ref = lambda x: out(torch.tanh(_layer_norm_by_hand(lin(x)) * ln.weight + ln.bias)) + torch.log1p(x.square()).sum(-1, keepdim=True)  # noqa: E731
    else:
        lin = nn.Linear(3, 2).to(device, DT)
        f = lambda x: MyExp.apply(lin(x) / 2)  # noqa: E731
        f_ref = lambda x: torch.exp(lin(x) / 2)  # noqa: E731
    x = torch.randn(5, 3, dtype=DT, device=device)
    want = oracle(f_ref, x, 4)
    for order in orders:
        got, info = thd.axis_derivatives(f, x, order, return_info=True)
        assert info.path == "autograd"
        assert "autograd.grad" in info.method, info
        if order <= 4:
            assert_close(got, want[: order + 1], 1e-10, f"order {order}")
    lap, info = thd.laplacian(f, x, return_info=True)
    assert info.path == "autograd"
    assert_close(lap, want[2].sum(-1), 1e-10, "laplacian")
    hd = thd.hessian_diag(f, x, dims=[1])
    assert_close(hd, want[2][..., [1]], 1e-10, "hessian_diag")
    if case == "branch":
        assert "torch.fx could not trace" in info.reason
    if case == "unsupported_op":
        assert "log1p" in info.reason


def test_uncomputable_second_derivative_is_not_silent():
    """Where neither reverse nor forward mode can give a second derivative, the zeros come with a
    warning; where only the backward graph ends (a polynomial), forward mode confirms them."""
    lin = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=DT)
    # issue 15: an error naming the Function (before: zeros and a warning), in both cases: the
    # backward graph just ends (the incoming gradient needs no grad), and -- worse -- the graph
    # goes on through the product with x, so nested reverse mode silently dropped OnceExp's part
    # (before: Hessian entries of axes 1 and 2 were 0, no warning)
    for f in (lambda x: OnceExp.apply(lin(x)), lambda x: OnceExp.apply(lin(x)) * x[:, :1]):
        match = "OnceExp.*once_differentiable.*cannot be differentiated again.*allow_unconfirmed_zeros"
        with pytest.raises(NotImplementedError, match=match):
            thd.hessian_diag(f, x)
        with pytest.raises(NotImplementedError, match="OnceExp"):
            thd.axis_derivatives(f, x, 3)
    # zeros only on request, and then with the warning
    with pytest.warns(UserWarning, match="once_differentiable.*OnceExp"):
        hd, info = thd.hessian_diag(lambda x: OnceExp.apply(lin(x)), x, return_info=True, allow_unconfirmed_zeros=True)
    assert "unconfirmed" in info.method and bool((hd == 0).all())
    f = lambda x: torch.flip(x, dims=[-1]) * 2.0 + 1.0  # noqa: E731  (flip: no jet rule; linear)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # (torch.func itself may raise a DeprecationWarning)
        got, info = thd.axis_derivatives(f, x, 3, return_info=True)
    assert "torch.func" in info.method  # the zeros of orders 2, 3 confirmed by forward mode
    assert_close(got, oracle(f, x, 3), 1e-12, "linear")
    assert bool((got[2:] == 0).all())


def test_fallback_parameter_gradients():
    torch.manual_seed(3)
    model = WithUnsupportedOp().double()
    x = torch.randn(4, 3, dtype=DT)
    params = list(model.parameters())
    lap = thd.laplacian(model, x)
    got = torch.autograd.grad((lap**2).sum(), params, materialize_grads=True)
    ref = oracle(model, x, 2, create_graph=True)[2].sum(-1)
    want = torch.autograd.grad((ref**2).sum(), params, materialize_grads=True)
    for g, r in zip(got, want):
        assert_close(g, r, 1e-10, "gradient")


def test_fallback_error_mode_and_global_setting():
    model = WithUnsupportedOp().double()
    x = torch.randn(2, 3, dtype=DT)
    with pytest.raises(NotImplementedError, match="log1p"):
        thd.laplacian(model, x, fallback="error")
    prev = thd.set_fallback("error")
    try:
        assert thd.get_fallback() == "error"
        with pytest.raises(NotImplementedError, match="no fast path"):
            thd.hessian_diag(model, x)
        thd.laplacian(model, x, fallback="autograd")  # the per-call option wins
        # fast paths are unaffected
        thd.laplacian(nn.Sequential(nn.Linear(3, 2), nn.Tanh()).double(), x)
    finally:
        thd.set_fallback(prev)
    with pytest.raises(ValueError, match="fallback"):
        thd.laplacian(model, x, fallback="slow")
    with pytest.raises(ValueError, match="mode"):
        thd.set_fallback("never")


def test_fallback_logs_once_per_cause(caplog):
    class Once(WithUnsupportedOp):
        pass

    model = Once().double()
    x = torch.randn(2, 3, dtype=DT)
    with caplog.at_level(logging.DEBUG, logger="torchhessdiag"):
        thd.laplacian(model, x)
        thd.laplacian(model, x)
    msgs = [r.getMessage() for r in caplog.records if "slow path" in r.getMessage()]
    assert len(msgs) == 1 and "log1p" in msgs[0]


# ---- zeros, never None ---------------------------------------------------------------------------


class LinearTraced(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(3, 4)

    def forward(self, x):
        return self.a(x) - 2 * self.b(x[:, [2, 1, 0]]) + 1.0


class LinearUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)

    def forward(self, x):
        return self.a(torch.flip(x, dims=[-1]))


@pytest.mark.parametrize("kind", ["engine", "jet", "autograd"])
def test_linear_models_give_zeros_with_a_graph(kind):
    torch.manual_seed(4)
    model = {
        "engine": lambda: nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 4)),
        "jet": LinearTraced,
        "autograd": LinearUnsupported,
    }[kind]().double()
    x = torch.randn(6, 3, dtype=DT)
    calls = [
        (lambda: thd.laplacian(model, x, return_info=True), (6, 4)),
        (lambda: thd.hessian_diag(model, x, return_info=True), (6, 4, 3)),
        (lambda: thd.hessian_diag(model, x, dims=[1], return_info=True), (6, 4, 1)),
        (lambda: thd.axis_derivatives(model, x, 4, return_info=True), (5, 6, 4, 3)),
    ]
    for call, shape in calls:
        out, info = call()
        assert out is not None and out.shape == shape
        if out.dim() == 4:  # axis derivatives: value and gradient are not zero, orders >= 2 are
            want = oracle(model, x, 4)
            assert_close(out, want, 1e-12, "axis")
            assert bool((out[2:] == 0).all())
        else:
            assert bool((out == 0).all())
        if kind != "engine" or out.dim() != 4:
            assert info.path == (kind if not (kind == "engine" and out.dim() == 4) else "jet")
        model.zero_grad()
        (out**2 + out).sum().backward()  # a loss on the zeros backpropagates
        for p in model.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()


def test_output_independent_of_x():
    c = torch.randn(1, dtype=DT, requires_grad=True)
    f = lambda x: c * torch.ones(x.shape[0], dtype=x.dtype)  # noqa: E731
    x = torch.randn(3, 2, dtype=DT)
    lap = thd.laplacian(f, x)
    assert lap.shape == (3,) and bool((lap == 0).all())
    ax = thd.axis_derivatives(f, x, 3)
    assert ax.shape == (4, 3, 2) and bool((ax[1:] == 0).all())
    (lap.sum() + ax.sum()).backward()
    assert c.grad is not None


# ---- piecewise-linear nets -----------------------------------------------------------------------


class ReluResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 6)
        self.b = nn.Linear(6, 6)
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        h = F.relu(self.a(x))
        h = h + F.leaky_relu(self.b(h), 0.1)
        return self.out(h)


@pytest.mark.parametrize("kind", ["engine", "jet"])
def test_relu_nets_give_zeros_and_warn(kind):
    torch.manual_seed(5)
    model = (nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 1)) if kind == "engine" else ReluResidual()).double()
    x = torch.randn(5, 3, dtype=DT)
    for call in (thd.laplacian, thd.hessian_diag, lambda f, x: thd.axis_derivatives(f, x, 3)[2:]):
        with pytest.warns(UserWarning, match="piecewise linear|piecewise-linear") as rec:
            out = call(model, x)
        assert bool((out == 0).all())
        assert any(r.filename == __file__ for r in rec), [(r.filename, str(r.message)[:50]) for r in rec]
    _, info = thd.laplacian(model, x, return_info=True)
    assert info.path == kind
    # first order is not affected, and does not warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = thd.axis_derivatives(model, x, 1)
    assert_close(g, oracle(model, x, 1), 1e-12, "gradient")


def test_relu_times_smooth_does_not_warn():
    lin = nn.Linear(2, 3).double()
    f = lambda x: (F.relu(lin(x)) * torch.tanh(x[:, :1])).sum(-1)  # noqa: E731
    x = torch.randn(4, 2, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hd = thd.hessian_diag(f, x)
    assert_close(hd, oracle(f, x, 2)[2], 1e-12, "relu * tanh")


# ---- arguments -----------------------------------------------------------------------------------


def test_bad_arguments():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(2, 3, dtype=DT)
    for order in (-1, 1.5, True, "2", None):
        with pytest.raises(ValueError, match="order"):
            thd.axis_derivatives(model, x, order)
    for fn in (thd.laplacian, thd.hessian_diag, lambda f, x, dims: thd.axis_derivatives(f, x, 3, dims=dims)):
        for dims, exc in (([3], ValueError), ([0, 0], ValueError), ([], ValueError), ("a", TypeError), ([-4], ValueError)):
            with pytest.raises(exc, match="dims"):
                fn(model, x, dims)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        thd.laplacian(model, [[1.0, 2.0, 3.0]])
    with pytest.raises(TypeError, match="float32 or float64"):
        thd.laplacian(model, torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="half precision"):
        thd.hessian_diag(model, torch.ones(2, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        thd.laplacian(model, torch.ones(2, 3, 1, dtype=DT))
    with pytest.raises(ValueError, match="no features"):
        thd.laplacian(lambda x: x.sum(-1), torch.ones(2, 0, dtype=DT))
    with pytest.raises(TypeError, match="callable"):
        thd.laplacian("model", x)
    with pytest.raises(TypeError, match="float32"):  # model float64, x float32
        thd.laplacian(model, x.float())
    with pytest.raises(ValueError, match="features"):  # the engine names the layer
        thd.laplacian(model, torch.ones(2, 5, dtype=DT))
    with pytest.raises(ValueError, match=r"\(N,\) or \(N, m\)"):
        thd.laplacian(lambda x: x.unsqueeze(-1), x)
    with pytest.raises(ValueError, match=r"\(N,\) or \(N, m\)"):
        thd.hessian_diag(lambda x: torch.tanh(x).sum(), x)
    with pytest.raises(TypeError, match="must return a tensor"):
        thd.laplacian(lambda x: float(x.sum()), x)
    with pytest.raises(ValueError, match="function must be"):
        thd.explain(model, x, "jacobian")
    train_dropout = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Tanh()).double()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = train_dropout

        def forward(self, x):
            return self.m(x) * 2

    with pytest.raises(NotImplementedError, match="eval"):
        thd.laplacian(Wrap(), x)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh()).double()
    before = bn[1].num_batches_tracked.clone()
    with pytest.raises(ValueError, match="BatchNorm1d at '1' is in training mode.*not independent"):
        thd.hessian_diag(bn, x)
    assert torch.equal(bn[1].num_batches_tracked, before)  # refused before f ran
    bn.eval()
    hd, info = thd.hessian_diag(bn, x, return_info=True)  # eval mode: an affine map per row
    assert info.path == "autograd" and "BatchNorm1d" in info.reason
    assert_close(hd, oracle(bn, x, 2)[2], 1e-10, "batchnorm eval")


def test_unbatched_point_and_bound_forward():
    torch.manual_seed(6)
    model = ReluResidual().double()
    lin = nn.Linear(3, 2).double()
    f = lambda x: torch.sin(lin(x)).sum(-1)  # noqa: E731
    x = torch.randn(3, dtype=DT)
    want = oracle(f, x.unsqueeze(0), 4)[:, 0]
    assert_close(thd.axis_derivatives(f, x, 4), want, 1e-12, "unbatched")
    assert thd.laplacian(f, x).shape == ()
    assert thd.hessian_diag(f, x, dims=[0]).shape == (1,)
    # a bound forward traces like the module itself
    _, info = thd.axis_derivatives(model.forward, torch.randn(2, 3, dtype=DT), 1, return_info=True)
    assert info.path == "jet"


def test_custom_function_on_a_constant_while_tracing(device):
    """A custom autograd.Function applied to a constant (no tensor from x) while the model is traced
    runs as itself: the tracer's guard around Function.apply hands it through. (torch 2.14 made
    Function.apply a C classmethod_descriptor; calling the saved original as a Python classmethod
    raised AttributeError there.) The rest of the model is supported, so the jet path is taken."""
    lin = nn.Linear(3, 2).to(device, DT)
    scale = torch.tensor(0.5, dtype=DT, device=device)

    def f(x):
        return torch.tanh(lin(x)) * MyExp.apply(scale)

    def f_ref(x):
        return torch.tanh(lin(x)) * torch.exp(scale)

    x = torch.randn(5, 3, dtype=DT, device=device)
    lap, info = thd.laplacian(f, x, return_info=True)
    assert info.path == "jet", info
    assert_close(lap, oracle(f_ref, x, 2)[2].sum(-1), 1e-10, "laplacian")
