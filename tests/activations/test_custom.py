"""register_activation: user activations with their own derivative functions.

Expected values never come from the code under test: they are torch's own autograd / torch.func
applied to the plain user function (written with differentiable torch ops), in float64.

Activations under test (none is in the derivative table):

* ``gauss``   exp(-z^2) with d1..d4 given (every order the engine and the drop-in need);
* ``poly``    z + a z^2/2 + b z^3/6 with parameters (a, b) and d1..d3 given, d3 returning a Python
  number (a constant) -- so orders >= 4 are exactly 0 and must come back as zeros, never None;
* ``logcosh`` log(cosh z) with only d1 = tanh given: every order >= 2 goes through exact autograd
  of the last given callable;
* ``opaque``  exp(-z^2) and d1..d4 computed in NumPy, which torch cannot differentiate at all:
  if anything used autograd of fn instead of the given derivatives, it would get no gradient.

Tolerances (float64): |ours - reference| <= 1e-10 * max|reference| per quantity (as in
tests/engine/test_engine.py). Both sides evaluate the same mathematical expression -- the same
derivative polynomials, the same weights -- in different orders of float64 operations; the
differences seen are <= 1e-15 relative. A wrong derivative, a missed layer or a swapped order is an
O(1) relative error. float32: |ours - torch.func float32| <= 50 eps32 * scale, the bound of
tests/engine/test_engine.py (same reasoning: both sides are float32 evaluations of the same sums).
"""

from __future__ import annotations

import copy
import pickle
import re

import numpy as np
import pytest
import torch
from torch import nn

import torchhessdiag as thd
from torchhessdiag import activations, custom, ops
from torchhessdiag.activations import make_spec, spec_from_module

pytestmark = pytest.mark.usefixtures("single_thread")

REL = 1e-10
EPS32 = torch.finfo(torch.float32).eps


# ---- the activations under test ------------------------------------------------------------------


def _e(z):
    return torch.exp(-z * z)


GAUSS = (
    _e,
    [
        lambda z: -2 * z * _e(z),
        lambda z: (4 * z * z - 2) * _e(z),
        lambda z: (12 * z - 8 * z**3) * _e(z),
        lambda z: (16 * z**4 - 48 * z * z + 12) * _e(z),
    ],
)


def _poly(z, a, b):
    return z + a * z * z / 2 + b * z**3 / 6


POLY = (
    _poly,
    [lambda z, a, b: 1 + a * z + b * z * z / 2, lambda z, a, b: a + b * z, lambda z, a, b: b],
)


def _logcosh(z):
    return torch.log(torch.cosh(z))


LOGCOSH = (_logcosh, [torch.tanh])


def _np(f):
    """f evaluated in NumPy: a tensor function torch cannot differentiate."""

    def g(z):
        return torch.from_numpy(np.ascontiguousarray(f(z.detach().cpu().numpy()))).to(z.device)

    return g


OPAQUE = (
    _np(lambda z: np.exp(-z * z)),
    [
        _np(lambda z: -2 * z * np.exp(-z * z)),
        _np(lambda z: (4 * z * z - 2) * np.exp(-z * z)),
        _np(lambda z: (12 * z - 8 * z**3) * np.exp(-z * z)),
        _np(lambda z: (16 * z**4 - 48 * z * z + 12) * np.exp(-z * z)),
    ],
)

POLY_PARAMS = {"a": 0.5, "b": -0.25}

# name -> (the plain torch function with the parameters used, its registration)
PLAIN = {
    "t_gauss": _e,
    "t_poly": lambda z: _poly(z, **POLY_PARAMS),
    "t_logcosh": _logcosh,
}


@pytest.fixture(scope="module", autouse=True)
def registered():
    acts = {
        "t_gauss": thd.register_activation("t_gauss", *GAUSS, check=True),
        "t_poly": thd.register_activation("t_poly", *POLY, params={"a": 1.0, "b": 0.0}, check=True),
        "t_logcosh": thd.register_activation("t_logcosh", *LOGCOSH, check=True),
        "t_opaque": thd.register_activation("t_opaque", *OPAQUE),
    }
    yield acts
    for name in acts:
        if custom.lookup(name) is not None:
            thd.unregister_activation(name)


def _spec(name):
    return make_spec(name, **POLY_PARAMS) if name == "t_poly" else make_spec(name)


def _module(name):
    return thd.nn.UserActivation(name, **POLY_PARAMS) if name == "t_poly" else thd.nn.UserActivation(name)


class Plain(nn.Module):
    """The same activation as a plain torch function (the reference's model)."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, z):
        return self.f(z)


def nested(f, x, n):
    """[f(x), f'(x), ..., f^(n)(x)] of an elementwise f by nested torch.autograd.grad; a level that
    no longer depends on x is zeros."""
    xx = x.detach().clone().requires_grad_(True)
    y = f(xx)
    out = [y.detach()]
    for _ in range(n):
        if y is not None and y.requires_grad:
            (y,) = torch.autograd.grad(y, xx, torch.ones_like(y), create_graph=True, allow_unused=True)
        else:
            y = None  # a constant: every further derivative is 0
        out.append(torch.zeros_like(x) if y is None else y.detach())
    return torch.stack(out)


def assert_rel(actual, expected, rel=REL, what=""):
    assert isinstance(actual, torch.Tensor), f"{what}: got {type(actual).__name__}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype and actual.device == expected.device, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite"
    err = (actual.detach() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3e} > {rel:.1e} * {scale:.3e}"


def _points(device, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(40, generator=g, dtype=torch.float64) * 2).to(device=device, dtype=dtype)


# ---- values and derivatives of every order ---------------------------------------------------------


@pytest.mark.parametrize("name", ["t_gauss", "t_poly", "t_logcosh"])
def test_derivatives_every_order_match_autograd(device, name):
    """activation() is fn bit for bit; activation_derivatives for orders 0..6 (given ones and the
    autograd continuation past them) equal nested torch autograd of the plain function; orders up
    to the given ones are exactly the given callables' values."""
    z = _points(device)
    spec = _spec(name)
    e = custom.get_activation(name)
    y = thd.activation(z, spec)
    assert torch.equal(y, PLAIN[name](z))
    ours = thd.activation_derivatives(z, spec, order=6)
    ref = nested(PLAIN[name], z, 6)
    for k in range(7):
        if ref[k].abs().max() == 0:
            assert torch.equal(ours[k], torch.zeros_like(z)), f"{name} order {k}: not exact zeros"
        else:
            assert_rel(ours[k], ref[k], what=f"{name} order {k}")
    for k in range(1, e.order + 1):
        given = e.derivatives[k - 1](z, **e.kwargs(spec))
        assert torch.equal(ours[k], torch.as_tensor(given, dtype=z.dtype, device=device).expand_as(z)), k


@pytest.mark.parametrize("name", ["t_gauss", "t_poly", "t_logcosh"])
def test_nested_autograd_through_the_function(device, name):
    """Differentiating act(x) again and again (create_graph=True) walks the derivative chain:
    orders 1..5 equal nested autograd of the plain function; vanishing orders are zeros, not None."""
    z = _points(device).requires_grad_(True)
    act = custom.get_activation(name)
    y = act(z, **POLY_PARAMS) if name == "t_poly" else act(z)
    ref = nested(PLAIN[name], z, 5)
    for k in range(1, 6):
        (y,) = torch.autograd.grad(y.sum(), z, create_graph=True)
        assert y is not None and y.requires_grad
        if ref[k].abs().max() == 0:
            assert torch.equal(y.detach(), torch.zeros_like(z))
        else:
            assert_rel(y, ref[k], what=f"{name} order {k}")


def test_opaque_function_uses_the_given_derivatives(device):
    """fn and its derivatives in NumPy (torch sees no graph inside them): the derivatives of orders
    1..4 through the drop-in equal those of the torch-written gauss, so they come from the given
    callables."""
    z = _points(device).requires_grad_(True)
    y = custom.get_activation("t_opaque")(z)
    ref = nested(_e, z, 4)
    assert_rel(y, ref[0], what="value")
    for k in range(1, 5):
        (y,) = torch.autograd.grad(y.sum(), z, create_graph=True)
        assert_rel(y, ref[k], what=f"order {k}")


def test_forward_ad_through_the_dropin():
    import torch.autograd.forward_ad as fwAD

    z = _points("cpu")
    with fwAD.dual_level():
        out = custom.get_activation("t_gauss")(fwAD.make_dual(z, torch.ones_like(z)))
        tangent = fwAD.unpack_dual(out).tangent
    assert_rel(tangent, nested(_e, z, 1)[1])


# ---- the engine -------------------------------------------------------------------------------------


def _mlp(d, widths, m, acts, seed, dtype=torch.float64):
    torch.manual_seed(seed)
    layers, w_in = [], d
    for i, w in enumerate(widths):
        lin = nn.Linear(w_in, w)
        a = acts[i % len(acts)]
        layers += [lin, _module(a) if a in PLAIN else nn.Tanh()]
        w_in = w
    layers.append(nn.Linear(w_in, m))
    model = nn.Sequential(*layers).to(dtype)
    plain = copy.deepcopy(model)
    for i, mod in enumerate(plain):
        if isinstance(mod, thd.nn.UserActivation):
            plain[i] = Plain(PLAIN[mod.name])
    return model, plain


def _torch_func(plain, x):
    value = plain(x).detach()
    grad = torch.func.vmap(torch.func.jacrev(plain))(x).detach()
    hess = torch.func.vmap(torch.func.hessian(plain))(x).detach()
    return value, grad, hess


ENGINE_CASES = [
    # (d, widths, m, activations, seed)
    (3, [8], 1, ["t_gauss"], 0),
    (2, [6, 5], 2, ["t_poly", "t_logcosh"], 1),
    (4, [5, 7, 3], 1, ["t_logcosh", "tanh", "t_gauss"], 2),
    (5, [3, 4], 3, ["t_gauss", "t_poly"], 3),
    (1, [4, 4, 4, 4], 1, ["t_gauss", "t_logcosh", "t_poly", "tanh"], 4),
]


@pytest.mark.parametrize("case", ENGINE_CASES, ids=lambda c: f"d{c[0]}-w{'x'.join(map(str, c[1]))}-m{c[2]}")
def test_engine_matches_torch_func(case):
    """mlp_hessian_diag, mlp_laplacian, mlp_derivatives (value, gradient) of MLPs holding user
    activations (mixed with table ones) equal torch.func on the same MLP built with the plain
    functions -- on the graph path and on the no-grad in-place path."""
    d, widths, m, acts, seed = case
    model, plain = _mlp(d, widths, m, acts, seed)
    x = torch.randn(6, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    value, grad, hess = _torch_func(plain, x)
    hd = hess.diagonal(dim1=-2, dim2=-1)
    for ctx in (torch.enable_grad, torch.no_grad):
        with ctx():
            assert_rel(thd.mlp_hessian_diag(model, x), hd, what="hessian_diag")
            assert_rel(thd.mlp_laplacian(model, x), hd.sum(-1), what="laplacian")
            out = thd.mlp_derivatives(model, x, second="diag")
            assert_rel(out.value, value, what="value")
            assert_rel(out.gradient, grad, what="gradient")
            if d > 1:
                assert_rel(thd.mlp_laplacian(model, x, dims=[0]), hd[..., 0], what="partial laplacian")


def test_engine_parameter_gradients_match_nested_autograd():
    """Gradients of a Laplacian loss w.r.t. every weight (needs sigma''' of the user activations:
    given for gauss, autograd past d1 for logcosh) equal nested autograd on the plain model."""
    d = 3
    model, plain = _mlp(d, [6, 5], 1, ["t_gauss", "t_logcosh"], seed=7)
    x = torch.randn(5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    loss = (thd.mlp_laplacian(model, x) - 1).pow(2).sum()
    # (the output bias does not enter the Laplacian: both sides report it unused)
    ours = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(plain(xx).sum(), xx, create_graph=True)
    lap = sum(torch.autograd.grad(g[:, i].sum(), xx, create_graph=True)[0][:, i] for i in range(d))
    ref = torch.autograd.grad((lap.unsqueeze(1) - 1).pow(2).sum(), list(plain.parameters()), allow_unused=True)
    assert [o is None for o in ours] == [r is None for r in ref] == [False] * 5 + [True]
    for o, r in zip(ours[:5], ref[:5]):
        assert_rel(o, r, what="parameter gradient")


def test_engine_float32(device):
    """float32 engine vs torch.func in float32 on the same float32 model: within 50 eps32 * scale
    (tests/engine/test_engine.py's bound), scale from the float64 Hessian of the same weights."""
    model32, plain32 = _mlp(3, [8, 6], 2, ["t_gauss", "t_logcosh"], seed=11, dtype=torch.float32)
    model32, plain32 = model32.to(device), plain32.to(device)
    x32 = torch.randn(5, 3, generator=torch.Generator().manual_seed(11)).to(device)
    hd32 = thd.mlp_hessian_diag(model32, x32)
    assert hd32.dtype == torch.float32
    ref32 = _torch_func(plain32, x32)[2].diagonal(dim1=-2, dim2=-1)
    exact = _torch_func(copy.deepcopy(plain32).double(), x32.double())[2].diagonal(dim1=-2, dim2=-1)
    scale = exact.abs().max().item()
    assert (hd32.double() - exact).abs().max().item() <= 50 * EPS32 * scale
    assert (hd32 - ref32).abs().max().item() <= 50 * EPS32 * scale


# ---- the drop-in module: double and triple backward ------------------------------------------------


def _hess_diag_and_third(f, x):
    """(d^2 u/dx_i^2, d^3 u/dx_i^3) of u = f(x).sum() by nested torch.autograd.grad."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
    h, t = [], []
    for i in range(x.shape[1]):
        (hi,) = torch.autograd.grad(g[:, i].sum(), x, create_graph=True)
        (ti,) = torch.autograd.grad(hi[:, i].sum(), x, retain_graph=True)
        h.append(hi[:, i])
        t.append(ti[:, i])
    return torch.stack(h, 1).detach(), torch.stack(t, 1).detach()


@pytest.mark.parametrize("acts", [["t_gauss"], ["t_poly", "t_logcosh"], ["t_opaque", "tanh"]], ids=str)
def test_dropin_double_and_triple_backward(device, acts):
    """Nested autograd Hessian diagonal and third axis derivatives through drop-ins equal those of
    the plain model (t_opaque's plain counterpart is the torch-written gauss)."""
    model, plain = _mlp(3, [6, 5], 1, acts, seed=5)
    for i, mod in enumerate(model):
        if isinstance(mod, thd.nn.UserActivation) and mod.name == "t_opaque":
            plain[i] = Plain(_e)
    model, plain = model.to(device), plain.to(device)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(device)
    h, t = _hess_diag_and_third(model, x)
    h_ref, t_ref = _hess_diag_and_third(plain, x)
    assert_rel(h, h_ref, what="hessian diagonal")
    assert_rel(t, t_ref, what="third derivatives")


def test_vanishing_derivatives_are_zeros_not_none():
    """poly with a = b = 0 is the identity: its second and third derivatives through the drop-in
    are tensors of zeros that still depend on x (never None, never an error)."""
    act = thd.nn.UserActivation("t_poly", a=0.0, b=0.0)
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(act(x).sum(), x, create_graph=True)
    assert torch.equal(g.detach(), torch.ones_like(x))
    (h,) = torch.autograd.grad(g.sum(), x, create_graph=True)
    assert h is not None and torch.equal(h.detach(), torch.zeros_like(x))
    (t,) = torch.autograd.grad(h.sum(), x)
    assert t is not None and torch.equal(t, torch.zeros_like(x))


def test_torch_func_over_the_dropin_uses_the_plain_callables():
    """Under torch.func the drop-in applies fn and torch.func differentiates it; hessian and
    jacfwd(jacfwd) (which a custom autograd.Function would silently get wrong) are exact."""
    model, plain = _mlp(2, [5], 1, ["t_gauss"], seed=9)
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    ref = torch.func.vmap(torch.func.hessian(plain))(x)
    assert_rel(torch.func.vmap(torch.func.hessian(model))(x), ref, what="hessian")
    fwd2 = torch.func.vmap(torch.func.jacfwd(torch.func.jacfwd(model)))(x)
    assert_rel(fwd2, ref, what="jacfwd(jacfwd)")
    # sigma^(k) past the given orders under a transform: nested jvp of the last callable
    spec = make_spec("t_logcosh")
    z = _points("cpu")
    third = torch.func.vmap(torch.func.grad(lambda t: ops._derivs(t, spec, [2])[0]))(z)
    assert_rel(third, nested(_logcosh, z, 3)[3], what="order 3 under vmap(grad)")


# ---- checking given derivatives -------------------------------------------------------------------


def _wrong_gauss():
    fn, ds = GAUSS
    wrong = list(ds)
    wrong[1] = lambda z: (4 * z * z + 2) * _e(z)  # sign error in d2
    return fn, wrong


def test_check_raises_with_the_worst_mismatch():
    fn, wrong = _wrong_gauss()
    with pytest.raises(ValueError) as info:
        thd.register_activation("t_wrong", fn, wrong, check=True)
    msg = str(info.value)
    assert "derivatives[1] (order 2)" in msg and "autograd of derivatives[0]" in msg
    # the worst point: the largest |given - true| / (atol + rtol |true|) over the default points,
    # computed here from the true d2 written independently
    z = torch.tensor(custom.DEFAULT_CHECK_POINTS, dtype=torch.float64)
    true = nested(_e, z, 2)[2]
    given = wrong[1](z)
    score = (given - true).abs() / (custom.DEFAULT_ATOL + custom.DEFAULT_RTOL * true.abs())
    i = int(score.argmax())
    found = re.search(r"worst at z = (\S+): given (\S+), autograd (\S+), mismatch \|given - autograd\| = (\S+) >", msg)
    assert found, msg
    zw, g, a, mis = (float(v.rstrip(",")) for v in found.groups())
    assert zw == float(z[i]) and g == float(given[i])
    assert a == pytest.approx(float(true[i]), rel=1e-14)  # autograd of d1 vs the true d2
    assert mis == pytest.approx(float((given[i] - true[i]).abs()), rel=1e-3)  # printed to 4 digits
    assert f"at {int((score > 1).sum())} of 21 points" in msg
    assert custom.lookup("t_wrong") is None, "a failed check must not register"


def test_check_finds_wrong_first_and_later_orders():
    fn, ds = GAUSS
    with pytest.raises(ValueError, match=r"derivatives\[0\] \(order 1\) disagrees with autograd of fn"):
        thd.register_activation("t_wrong", fn, [lambda z: 2 * z * _e(z)] + ds[1:], check=True)
    with pytest.raises(ValueError, match=r"derivatives\[3\] \(order 4\)"):
        thd.register_activation("t_wrong", fn, ds[:3] + [lambda z: 16 * z**4 * _e(z)], check=True)
    # a slightly wrong derivative (relative 1e-3) is caught too; a custom tolerance lets it pass
    off = ds[:1] + [lambda z: (4 * z * z - 2) * _e(z) * (1 + 1e-3)]
    with pytest.raises(ValueError, match=r"order 2"):
        thd.register_activation("t_wrong", fn, off, check=True)
    thd.register_activation("t_wrong", fn, off, check=True, rtol=1e-2)
    thd.unregister_activation("t_wrong")
    # custom points, with a parameter
    report = thd.check_activation("t_poly", points=[-1.0, 0.25, 3.0], a=2.0, b=3.0)
    assert set(report) == {1, 2, 3} and max(report.values()) < 1e-12


def test_without_check_wrong_derivatives_are_used_as_given():
    """Documented behaviour: without the check a wrong derivative is used as given, in the
    drop-in and in the engine; check_activation on the registered activation reports it."""
    fn, wrong = _wrong_gauss()
    act = thd.register_activation("t_wrong", fn, wrong)
    try:
        z = _points("cpu")
        assert torch.equal(thd.activation_derivatives(z, "t_wrong", orders=[2])[0], wrong[1](z))
        with pytest.raises(ValueError, match=r"order 2"):
            thd.check_activation(act)
        with pytest.raises(ValueError, match=r"order 2"):
            thd.check_activation("t_wrong")
    finally:
        thd.unregister_activation("t_wrong")


def test_check_reports_and_skips_nonfinite_autograd():
    report = thd.check_activation("t_gauss")
    assert set(report) == {1, 2, 3, 4} and max(report.values()) < 1e-12
    # autograd of a sqrt at 0 is inf: that point is skipped, the others are checked
    act = thd.register_activation("t_sqrt", torch.sqrt, [lambda z: 0.5 / torch.sqrt(z)])
    try:
        assert thd.check_activation(act, points=[0.0, 1.0, 4.0])[1] < 1e-15
        with pytest.raises(ValueError, match="not finite at any"):
            thd.check_activation(act, points=[0.0])
    finally:
        thd.unregister_activation("t_sqrt")


# ---- bad arguments -----------------------------------------------------------------------------------


def test_bad_arguments():
    fn, ds = GAUSS
    reg = thd.register_activation
    with pytest.raises(TypeError, match="name must be a str"):
        reg(3, fn, ds)
    with pytest.raises(ValueError, match="non-empty string"):
        reg("", fn, ds)
    with pytest.raises(ValueError, match="non-empty string"):
        reg("my act", fn, ds)
    with pytest.raises(ValueError, match="derivative table"):
        reg("Tanh", fn, ds)
    with pytest.raises(TypeError, match="fn must be callable"):
        reg("t_bad", 1.0, ds)
    with pytest.raises(TypeError, match="sequence of callables"):
        reg("t_bad", fn, ds[0])
    with pytest.raises(TypeError, match="sequence of callables"):
        reg("t_bad", fn, 3)
    with pytest.raises(ValueError, match="at least the first derivative"):
        reg("t_bad", fn, [])
    with pytest.raises(TypeError, match=r"derivatives\[1\] \(order 2\) must be callable"):
        reg("t_bad", fn, [ds[0], None])
    with pytest.raises(ValueError, match="at most 2 parameters"):
        reg("t_bad", fn, ds, params={"a": 1, "b": 2, "c": 3})
    with pytest.raises(ValueError, match="must be finite"):
        reg("t_bad", fn, ds, params={"a": float("nan")})
    with pytest.raises(ValueError, match="already registered.*replace=True"):
        reg("T_GAUSS", fn, ds)
    assert custom.lookup("t_bad") is None
    # using a registered activation wrongly
    with pytest.raises(TypeError, match="takes a, b; got unexpected"):
        make_spec("t_poly", c=1.0)
    with pytest.raises(TypeError, match="takes no parameters"):
        thd.nn.UserActivation("t_gauss", beta=2.0)
    with pytest.raises(TypeError, match="Python number, got a tensor"):
        make_spec("t_poly", a=torch.tensor(1.0, requires_grad=True))
    with pytest.raises(ValueError, match="unknown activation 'nope'.*registered: .*t_gauss"):
        make_spec("nope")
    with pytest.raises(ValueError, match="is an activation of the table"):
        thd.nn.UserActivation("tanh")
    with pytest.raises(TypeError, match="float32 or float64"):
        thd.nn.UserActivation("t_gauss")(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="not registered"):
        thd.activation(torch.ones(2), activations.ActivationSpec("never_registered"))


def test_callables_returning_the_wrong_thing():
    z = torch.ones(4, dtype=torch.float64)
    cases = [
        (lambda t: t.float(), TypeError, "fn returned torch.float32 for a torch.float64 input"),
        (lambda t: t[:2], ValueError, r"returned shape \(2,\) for an input of shape \(4,\)"),
        (lambda t: "x", TypeError, "returned str"),
    ]
    for i, (bad, exc, match) in enumerate(cases):
        act = thd.register_activation(f"t_bad{i}", bad, [torch.ones_like])
        try:
            with pytest.raises(exc, match=match):
                act(z)
        finally:
            thd.unregister_activation(f"t_bad{i}")
    # a broadcastable or scalar result is expanded to the input's shape
    act = thd.register_activation("t_const", lambda t: t * 2, [lambda t: torch.tensor(2.0, dtype=t.dtype), lambda t: 0])
    try:
        d = thd.activation_derivatives(z, act, order=3)
        assert torch.equal(d, torch.stack([2 * z, 2 * torch.ones_like(z), torch.zeros_like(z), torch.zeros_like(z)]))
    finally:
        thd.unregister_activation("t_const")


def test_replace_and_unregister():
    fn, ds = GAUSS
    act = thd.register_activation("t_re", fn, ds)
    mod = act.module()
    z = _points("cpu")
    assert torch.equal(mod(z), _e(z))
    again = thd.register_activation("t_re", _logcosh, LOGCOSH[1], replace=True)
    assert again is act and act.fn is _logcosh
    assert torch.equal(mod(z), _logcosh(z)), "an existing module uses the new definition"
    thd.unregister_activation("t_re")
    with pytest.raises(ValueError, match="not registered"):
        mod(z)
    with pytest.raises(ValueError, match="unregistered"):
        act(z)
    assert "unregistered" in repr(mod) and "unregistered" in str(mod.spec)
    with pytest.raises(ValueError, match="no activation"):
        thd.unregister_activation("t_re")


# ---- identity, pickling, integration points ---------------------------------------------------------


def test_specs_modules_and_registry_lookups(registered):
    act = registered["t_poly"]
    spec = make_spec("T_Poly", a=0.5, b=-0.25)
    assert spec.is_user and spec == act.spec(**POLY_PARAMS) == make_spec(act, **POLY_PARAMS)
    assert str(spec) == "t_poly(a=0.5, b=-0.25)" and spec.params == POLY_PARAMS
    assert not spec.piecewise_linear and not spec.linear
    assert str(make_spec("t_poly")) == "t_poly(a=1, b=0)"
    mod = act.module(**POLY_PARAMS)
    assert isinstance(mod, thd.nn.UserActivation) and spec_from_module(mod) == spec
    assert repr(mod) == "UserActivation('t_poly', a=0.5, b=-0.25)"
    assert activations.user_spec_for_function(act) == make_spec("t_poly")
    assert activations.user_spec_for_function(act.fn) is None  # the raw fn is not recognised
    assert activations.user_spec_for_function(torch.tanh) is None
    assert act in activations.registered_functions()
    assert "t_poly" in thd.backend_info()["user_activations"]
    assert activations.torch_function(spec)(torch.tensor([2.0])).item() == _poly(torch.tensor([2.0]), **POLY_PARAMS).item()
    assert copy.deepcopy(act) is act and pickle.loads(pickle.dumps(act)) is act


def test_pickle_and_deepcopy_of_a_model():
    model, _ = _mlp(3, [5], 1, ["t_poly"], seed=2)
    x = torch.randn(4, 3, dtype=torch.float64)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(x), model(x))
        assert clone[1].spec == model[1].spec
        assert torch.equal(thd.mlp_laplacian(clone, x), thd.mlp_laplacian(model, x))


def test_fx_traces_the_function_as_one_node(registered):
    act = registered["t_gauss"]

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x):
            return act(self.lin(x))

    m = M().double()
    gm = torch.fx.symbolic_trace(m)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [act]
    x = torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(gm(x), m(x))


@pytest.mark.skipif(not hasattr(thd, "axis_derivatives"), reason="the traced-model path (general.py) is not in this build")
def test_traced_model_path_with_user_activations(registered):
    """laplacian / axis_derivatives over a traced model holding a user drop-in and a call of the
    registered function (residual connection): equal to torch autograd of the plain model, orders
    0..4 (orders 3 and 4 of t_logcosh come from autograd past its only given derivative)."""
    act = registered["t_logcosh"]

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(2, 6), nn.Linear(6, 6), nn.Linear(6, 1)
            self.act = thd.nn.UserActivation("t_gauss")

        def forward(self, x):
            h = self.act(self.a(x))
            return self.c(act(self.b(h)) + h)

    torch.manual_seed(13)
    m = Res().double()

    def plain(x):
        h = _e(m.a(x))
        return m.c(_logcosh(m.b(h)) + h)

    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    hd = torch.func.vmap(torch.func.hessian(plain))(x).diagonal(dim1=-2, dim2=-1)
    assert_rel(thd.laplacian(m, x), hd.sum(-1), what="laplacian")
    ad = thd.axis_derivatives(m, x, order=4)  # (order + 1,) + f(x).shape + (d,)
    for i in range(2):
        t = x[:, i].clone().requires_grad_(True)
        y = plain(torch.stack([t, x[:, 1 - i]], 1) if i == 0 else torch.stack([x[:, 0], t], 1))[:, 0]
        for k in range(5):
            assert_rel(ad[k, :, 0, i], y.detach(), what=f"order {k} along x{i}")
            (y,) = torch.autograd.grad(y.sum(), t, create_graph=True)
