"""Property-based sweeps (hypothesis): random MLPs and traced models against torch.func.

Each example draws a network -- depth 1-3 hidden layers, widths 1-9, one activation per layer
from the whole table (torch.nn modules or torchhessdiag.nn drop-ins, non-default parameters,
piecewise-linear ones too), bias or not per layer, optional nesting, m = 1-3 outputs -- and
points (N = 1-5, d = 1-5, sometimes one unbatched point), dims, chunk_size, grad mode. Every
public function is compared with an oracle that runs only torch: the *twin* of the model with
torch's own activation functions and the same nn.Linear modules (tests/_random_models.py).

Tolerances, float64: max |ours - torch.func| <= 1e-10 * (largest |entry| of the quantity's
natural scale: the full input Hessian for second-order results, the value / gradient for
those). Both sides evaluate the same exact expressions in different orders; their rounding is a
few ulp of the largest terms (observed <= 3e-14 over the slow profile, the largest for tr(A H)
with A factored by eigh; ~2e-15 elsewhere); 1e-10 leaves room for unlucky cancellation without
letting a wrong formula (an O(1) relative error) through. Parameter and input gradients: the
gradient of sum(w * result) (random w) against the same expression built on the nested-autograd
Hessian, 1e-10 relative to the largest gradient entry. float32: ours vs the float64 truth on the
same (rounded) weights and points, within 8x torch.func's own float32 error plus 64 float32 eps
of the scale (both compute in float32; ours may round differently, not worse).

Profiles (tests/conftest.py): "fast" by default (20 examples per property; the file runs in
~12-25 s on 2 CPU cores), "slow" with --slow or HYPOTHESIS_PROFILE=slow (300 per property). Both
are derandomized, so CI is reproducible.
"""

from __future__ import annotations

import warnings

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import torchhessdiag as thd  # noqa: E402

from _random_models import (  # noqa: E402
    ACTS,
    SMOOTH_ACTS,
    axis_nested,
    build_mlp,
    build_residual,
    func_hessian,
    func_value_grad,
    nested_hessian,
    rel_err,
)

TOL = 1e-10
# the device fixture is a constant per test item; hypothesis may reuse it across examples
_fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def mlp_cases(draw, max_depth: int = 3, smooth_only: bool = False):
    """A random MLP description plus points: a dict consumed by ``_make``."""
    depth = draw(st.integers(1, max_depth))
    pool = SMOOTH_ACTS if smooth_only else ACTS
    acts = draw(st.lists(st.sampled_from(pool), min_size=depth, max_size=depth))
    return dict(
        d=draw(st.integers(1, 5)),
        widths=draw(st.lists(st.integers(1, 9), min_size=depth, max_size=depth)),
        m=draw(st.integers(1, 3)),
        acts=acts,
        bias=draw(st.lists(st.booleans(), min_size=depth + 1, max_size=depth + 1)),
        dropins=draw(st.lists(st.booleans(), min_size=depth, max_size=depth)),
        nest=draw(st.booleans()),
        N=draw(st.integers(1, 5)),
        unbatched=draw(st.integers(0, 5)) == 0,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _make(case, device, dtype=torch.float64):
    model, oracle = build_mlp(
        case["d"], case["widths"], case["m"], case["acts"], bias=case["bias"], dropins=case["dropins"],
        nest=case["nest"], seed=case["seed"], dtype=dtype, device=device,
    )
    g = torch.Generator().manual_seed(case["seed"] + 1)
    x = torch.randn(case["N"], case["d"], generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    return model, oracle, x


def _dims(draw, d):
    """None, or a non-empty list of distinct axes (negative indices allowed)."""
    if draw(st.booleans()):
        return None
    axes = draw(st.lists(st.integers(0, d - 1), min_size=1, max_size=d, unique=True))
    return [a - d if draw(st.booleans()) else a for a in axes]


def _quiet():
    """Piecewise-linear nets warn (by design); the properties check the numbers."""
    w = warnings.catch_warnings()
    w.__enter__()
    warnings.simplefilter("ignore")
    return w


def _call(fn, x, unbatched):
    """fn on x, or on each row as one unbatched point, restacked (both must agree)."""
    if not unbatched:
        return fn(x)
    outs = [fn(x[n]) for n in range(x.shape[0])]
    if isinstance(outs[0], tuple):
        return type(outs[0])(*[torch.stack([o[j] for o in outs]) for j in range(len(outs[0]))])
    return torch.stack(outs)


# ---- 1. values against torch.func ------------------------------------------------------------


@_fixture_ok
@given(case=mlp_cases(), data=st.data())
def test_mlp_second_order_matches_torch_func(device, case, data):
    model, oracle, x = _make(case, device)
    d = case["d"]
    dims = _dims(data.draw, d)
    sel = list(range(d)) if dims is None else [i % d for i in dims]
    chunk = data.draw(st.one_of(st.none(), st.integers(1, 6)))
    no_grad = data.draw(st.booleans())
    H = func_hessian(oracle, x)  # (N, m, d, d)
    value, grad = func_value_grad(oracle, x)
    diag = H.diagonal(dim1=-2, dim2=-1)[..., sel]
    hscale = H.abs().max().item()
    w = _quiet()
    try:
        with torch.set_grad_enabled(not no_grad):
            lap = _call(lambda p: thd.mlp_laplacian(model, p, dims=dims, chunk_size=chunk), x, case["unbatched"])
            hd = _call(lambda p: thd.mlp_hessian_diag(model, p, dims=dims, chunk_size=chunk), x, case["unbatched"])
            second = data.draw(st.sampled_from(["laplacian", "diag"]))
            out = _call(lambda p: thd.mlp_derivatives(model, p, second=second, dims=dims, chunk_size=chunk), x, case["unbatched"])
    finally:
        w.__exit__(None, None, None)
    assert lap.shape == (case["N"], case["m"]) and hd.shape == (case["N"], case["m"], len(sel))
    assert rel_err(hd, diag, hscale) <= TOL
    assert rel_err(lap, diag.sum(-1), hscale) <= TOL
    assert rel_err(out.value, value) <= TOL
    assert rel_err(out.gradient, grad) <= TOL
    want = diag.sum(-1) if second == "laplacian" else diag
    assert rel_err(out.second, want, hscale) <= TOL
    if all(a.piecewise_linear or a.label == "identity" for a in case["acts"]):
        assert not lap.any() and not hd.any()  # exact zeros, not rounding noise


@_fixture_ok
@given(case=mlp_cases(), data=st.data())
def test_weighted_laplacian_and_mixed_partials_match_torch_func(device, case, data):
    model, oracle, x = _make(case, device)
    d = case["d"]
    H = func_hessian(oracle, x)
    hscale = H.abs().max().item()
    g = torch.Generator().manual_seed(case["seed"] + 2)
    r = data.draw(st.integers(1, d + 2))
    Fm = torch.randn(d, r, generator=g, dtype=torch.float64).to(device)
    A = Fm @ Fm.T
    chunk = data.draw(st.one_of(st.none(), st.integers(1, 6)))
    pairs = data.draw(st.lists(st.tuples(st.integers(-d, d - 1), st.integers(-d, d - 1)), min_size=1, max_size=6))
    w = _quiet()
    try:
        with torch.set_grad_enabled(data.draw(st.booleans())):
            wl_f = thd.mlp_weighted_laplacian(model, x, factor=Fm, chunk_size=chunk)
            wl_a = thd.mlp_weighted_laplacian(model, x, A=A, chunk_size=chunk)
            mp = thd.mlp_mixed_partials(model, x, pairs, chunk_size=chunk)
    finally:
        w.__exit__(None, None, None)
    want = torch.einsum("ij,nmji->nm", A, H)
    wscale = hscale * A.abs().sum().item()
    assert rel_err(wl_f, want, wscale) <= TOL
    assert rel_err(wl_a, want, wscale) <= TOL
    idx_i = [i % d for i, _ in pairs]
    idx_j = [j % d for _, j in pairs]
    assert rel_err(mp, H[:, :, idx_i, idx_j], hscale) <= TOL


@_fixture_ok
@given(case=mlp_cases(), data=st.data())
def test_hutchinson_exact_cases(device, case, data):
    """Hutchinson's only error is sampling error: along one axis a Rademacher probe is +-e_i, so
    the estimate is H_ii exactly; for a separable model (one hidden layer whose units each read
    one coordinate) H is diagonal, so every Rademacher probe gives the Laplacian exactly."""
    model, oracle, x = _make(case, device)
    d = case["d"]
    H = func_hessian(oracle, x)
    hscale = H.abs().max().item()
    i = data.draw(st.integers(-d, d - 1))
    s = data.draw(st.integers(1, 5))
    gen = torch.Generator(device=device).manual_seed(case["seed"])
    w = _quiet()
    try:
        est = thd.mlp_laplacian_hutchinson(model, x, num_samples=s, generator=gen, dims=[i])
        # separable: Linear(d, d*k) with unit j reading coordinate j % d only
        k = data.draw(st.integers(1, 3))
        act = data.draw(st.sampled_from(SMOOTH_ACTS))
        sep, sep_oracle = build_mlp(d, [d * k], case["m"], [act], seed=case["seed"], device=device)
        with torch.no_grad():
            mask = torch.zeros(d * k, d, dtype=torch.float64, device=device)
            mask[torch.arange(d * k), torch.arange(d * k) % d] = 1.0
            sep[0].weight.mul_(mask)
        chunk_size = data.draw(st.one_of(st.none(), st.integers(1, 4)))
        est_sep = thd.mlp_laplacian_hutchinson(model=sep, x=x, num_samples=s, generator=gen, chunk_size=chunk_size)
    finally:
        w.__exit__(None, None, None)
    assert rel_err(est, H[:, :, i % d, i % d], hscale) <= TOL
    Hs = func_hessian(sep_oracle, x)
    assert rel_err(Hs - torch.diag_embed(Hs.diagonal(dim1=-2, dim2=-1)), torch.zeros_like(Hs), 1.0) == 0.0
    assert rel_err(est_sep, Hs.diagonal(dim1=-2, dim2=-1).sum(-1), Hs.abs().max().item()) <= TOL


# ---- 2. gradients w.r.t. the parameters (and x) against nested autograd ----------------------

_FUNCS = ["laplacian", "hessian_diag", "derivatives", "weighted", "mixed", "general_laplacian", "general_diag"]


@_fixture_ok
@given(case=mlp_cases(max_depth=2), fn=st.sampled_from(_FUNCS), data=st.data())
def test_parameter_and_input_gradients_match_nested_autograd(device, case, fn, data):
    model, oracle, x = _make(case, device)
    d = case["d"]
    x = x.requires_grad_(data.draw(st.booleans()))
    dims = _dims(data.draw, d)
    sel = list(range(d)) if dims is None else [i % d for i in dims]
    chunk = data.draw(st.one_of(st.none(), st.integers(1, 6)))
    g = torch.Generator().manual_seed(case["seed"] + 3)
    Fm = torch.randn(d, 2, generator=g, dtype=torch.float64).to(device)
    pairs = [(0, d - 1), (d - 1, d - 1)]
    w = _quiet()
    try:
        if fn == "laplacian":
            ours = [thd.mlp_laplacian(model, x, dims=dims, chunk_size=chunk)]
        elif fn == "hessian_diag":
            ours = [thd.mlp_hessian_diag(model, x, dims=dims, chunk_size=chunk)]
        elif fn == "derivatives":
            ours = list(thd.mlp_derivatives(model, x, second="diag", dims=dims, chunk_size=chunk))
        elif fn == "weighted":
            ours = [thd.mlp_weighted_laplacian(model, x, factor=Fm, chunk_size=chunk)]
        elif fn == "mixed":
            ours = [thd.mlp_mixed_partials(model, x, pairs, chunk_size=chunk)]
        elif fn == "general_laplacian":
            ours = [thd.laplacian(model, x, dims=dims)]
        else:
            ours = [thd.hessian_diag(model, x, dims=dims)]
    finally:
        w.__exit__(None, None, None)
    u, G, H = nested_hessian(oracle, x)
    diag = H.diagonal(dim1=-2, dim2=-1)[..., sel]
    want = {
        "laplacian": [diag.sum(-1)],
        "hessian_diag": [diag],
        "derivatives": [u, G, diag],
        "weighted": [torch.einsum("ir,nmij,jr->nm", Fm, H, Fm)],
        "mixed": [H[:, :, [p[0] for p in pairs], [p[1] for p in pairs]]],
        "general_laplacian": [diag.sum(-1)],
        "general_diag": [diag],
    }[fn]
    gw = torch.Generator().manual_seed(case["seed"] + 4)
    weights = [torch.randn(t.shape, generator=gw, dtype=torch.float64).to(device) for t in want]
    wrt = list(model.parameters()) + ([x] if x.requires_grad else [])
    assert len(wrt) == len(list(oracle.parameters())) + int(x.requires_grad)  # shared Linear modules

    def grads(outs):
        loss = sum((wt * o).sum() for wt, o in zip(weights, outs))
        if not loss.requires_grad:
            return [torch.zeros_like(p) for p in wrt]
        gs = torch.autograd.grad(loss, wrt, allow_unused=True)
        return [torch.zeros_like(p) if gg is None else gg for p, gg in zip(wrt, gs)]

    hscale = H.abs().max().item()
    scales = [None, None, hscale] if fn == "derivatives" else [hscale * (Fm.abs().sum().item() ** 2 if fn == "weighted" else 1.0)]
    for o, t, sc in zip(ours, want, scales):
        assert o.shape == t.shape
        assert rel_err(o, t.detach(), sc) <= TOL
    got, exp = grads(ours), grads(want)
    scale = max(e.abs().max().item() for e in exp)
    for a, b in zip(got, exp):
        assert rel_err(a, b, scale) <= TOL


# ---- 3. float32: as accurate as torch's own float32 ------------------------------------------


@_fixture_ok
@given(case=mlp_cases(smooth_only=True))
def test_float32_within_torch_float32_error(device, case):
    model32, oracle32, x32 = _make(case, device, torch.float32)
    _, oracle64 = build_mlp(
        case["d"], case["widths"], case["m"], case["acts"], bias=case["bias"], seed=case["seed"], device=device
    )
    with torch.no_grad():  # the float64 twin holds the float32 weights exactly
        for p64, p32 in zip(oracle64.parameters(), oracle32.parameters()):
            p64.copy_(p32.double())
    x64 = x32.double()
    truth = func_hessian(oracle64, x64).diagonal(dim1=-2, dim2=-1)
    torch32 = func_hessian(oracle32, x32).diagonal(dim1=-2, dim2=-1).double()
    with torch.no_grad():
        ours = thd.mlp_hessian_diag(model32, x32)
    assert ours.dtype == torch.float32
    scale = max(truth.abs().max().item(), 1e-30)
    torch_err = (torch32 - truth).abs().max().item()
    our_err = (ours.double() - truth).abs().max().item()
    assert our_err <= 8 * torch_err + 64 * torch.finfo(torch.float32).eps * scale, (our_err, torch_err, scale)


# ---- 4. the general functions: traced models, orders 0-4 ---------------------------------------


@_fixture_ok
@given(
    acts=st.lists(st.sampled_from(SMOOTH_ACTS), min_size=1, max_size=3),
    d=st.integers(1, 4),
    width=st.integers(1, 8),
    m=st.integers(1, 2),
    N=st.integers(1, 4),
    product=st.booleans(),
    order=st.integers(0, 4),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_general_functions_on_traced_models_match_torch_func(device, acts, d, width, m, N, product, order, seed, data):
    model, oracle = build_residual(d, width, m, acts, product=product, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(N, d, generator=g, dtype=torch.float64).to(device)
    dims = _dims(data.draw, d)
    sel = list(range(d)) if dims is None else [i % d for i in dims]
    ref = axis_nested(oracle, x, sel, max(order, 2))  # (K+1, N, m, D)
    lap = thd.laplacian(model, x, dims=dims)
    hd = thd.hessian_diag(model, x, dims=dims)
    ad = thd.axis_derivatives(model, x, order=order, dims=dims)
    assert ad.shape == (order + 1, N, m, len(sel))
    for k in range(order + 1):
        assert rel_err(ad[k], ref[k]) <= TOL, k
    assert rel_err(hd, ref[2]) <= TOL
    assert rel_err(lap, ref[2].sum(-1), ref[2].abs().max().item()) <= TOL
