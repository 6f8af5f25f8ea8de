"""The derivative table (csrc/activations.h), compiled and as its pure-PyTorch mirror
(torchhessdiag/reference.py), against independent oracles:

* torch's own nested autograd of torch's own function, where that is finite;
* mpmath (exact to far beyond float64), at large |z| and at random points -- this is where the
  stable forms matter: torch's autograd loses exponentially small derivatives to cancellation;
* each other (the mirror test), on a dense grid, in float32 and float64.

Every test runs on cpu and, when one is visible, on cuda.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import torchhessdiag
from torchhessdiag import reference
from torchhessdiag.activations import make_spec, torch_function

from _helpers import (
    KINKED,
    SMOOTH,
    SPEC_IDS,
    SPECS,
    devices,
    mp_derivatives_many,
    nested_autograd,
    softplus_threshold_point,
    torch_tolerance,
)

DEVICES = devices()
EPS64 = torch.finfo(torch.float64).eps  # 2.2e-16
IMPLS = ["compiled", "reference"]

spec_params = pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
device_params = pytest.mark.parametrize("device", DEVICES)
impl_params = pytest.mark.parametrize("impl", IMPLS)


def table(z: torch.Tensor, spec, impl: str, n: int = 4) -> torch.Tensor:
    """Orders 0..n from the compiled op (public API) or from the reference mirror."""
    if impl == "compiled":
        return torchhessdiag.activation_derivatives(z, spec.name, order=n, **spec.params)
    return torch.stack(reference.derivatives(z, spec.name, spec.a, spec.b, n))


def _close_report(ours, expected, bad, z):
    idx = bad.nonzero()[:5].tolist()
    return "; ".join(
        f"order {n}, z={z[i].item()!r}: ours={ours[n, i].item()!r} expected={expected[n, i].item()!r}"
        for n, i in idx
    )


# ---- 1a. against torch's nested autograd --------------------------------------------------------


def torch_grid(spec, device) -> torch.Tensor:
    """linspace(-40, 40) plus the special points; the softplus threshold point is left out here
    (it has its own test below, test_softplus_threshold_point_matches_torch)."""
    pts = [0.0, 1e-8, -1e-8, 100.0, -100.0, 1.0, -1.0, 20.0, -20.0]
    if spec.name == "softplus":
        zt = softplus_threshold_point(spec)
        pts += [math.nextafter(zt, -math.inf), math.nextafter(zt, math.inf)]
    z = torch.cat([torch.linspace(-40, 40, 4001, dtype=torch.float64), torch.tensor(pts, dtype=torch.float64)])
    if spec.name == "softplus":
        z = z[z * spec.a != spec.b]
    return z.to(device)


@spec_params
@device_params
@impl_params
def test_orders_0_to_4_match_torch_nested_autograd(spec, device, impl):
    z = torch_grid(spec, device)
    expected = nested_autograd(torch_function(spec), z, 4)
    ours = table(z, spec, impl)
    assert ours.shape == expected.shape and ours.dtype == torch.float64
    # torch's own autograd is NaN/inf at large |z| for some activations (gelu_tanh, order 3+ at
    # |z| ~ 30: 0 * inf in its formula): compare only where torch is finite -- ours is then
    # checked against mpmath below, and for finiteness everywhere in test_finite_at_large_z.
    finite = torch.isfinite(expected)
    assert finite[:2].all(), "torch's value and first derivative are finite on this grid"
    assert torch.isfinite(ours).all()
    bad = finite & ((ours - expected).abs() > torch_tolerance(spec, expected, z))
    assert not bad.any(), _close_report(ours, expected, bad, z)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.name == "softplus"], ids=lambda s: str(s).replace(" ", ""))
@device_params
@impl_params
def test_softplus_threshold_point_matches_torch(spec, device, impl):
    """At beta*z == threshold exactly, torch's softplus is on the log1p branch for the value and
    the first derivative (softplus / softplus_backward test ``beta*z > threshold``), but its
    double backward masks with ``beta*z < threshold`` (FunctionsManual
    softplus_double_backward), so torch's derivatives of order >= 2 there are exactly 0. The
    header promises derivatives that agree with nested torch autograd, branch for branch.
    (The library is not even consistent with itself there: its orders 5 and 6, which come from
    torch's autograd, are 0 at that point, while its table orders 2..4 are not.)"""
    zt = softplus_threshold_point(spec)
    z = torch.tensor([zt], dtype=torch.float64, device=device)
    expected = nested_autograd(torch_function(spec), z, 4)
    ours = table(z, spec, impl)
    bad = (ours - expected).abs() > torch_tolerance(spec, expected, z)
    assert not bad.any(), _close_report(ours, expected, bad, z)


# ---- 1b. against mpmath -------------------------------------------------------------------------


def mp_points(spec) -> list:
    """Large |z| (where the stable forms matter) plus seeded random points in [-40, 40].
    Kinks of elu/celu/relu/leaky_relu (z = 0) are left out: the derivatives there are
    conventions, tested against torch in test_kink_at_zero_follows_torch."""
    pts = [-100.0, -40.0, -37.0, -30.0, -20.0, -10.0, -1e-8, 1e-8, 10.0, 20.0, 30.0, 37.0, 40.0, 100.0]
    if spec.name in SMOOTH:
        pts.append(0.0)
    rng = np.random.default_rng(1234)
    pts += rng.uniform(-40, 40, 14).round(6).tolist()
    if spec.name == "softplus":  # both sides of the threshold; the point itself, where torch's
        # orders >= 2 are 0 by convention, is tested against torch in
        # test_softplus_threshold_point_matches_torch
        zt = softplus_threshold_point(spec)
        pts += [math.nextafter(zt, -math.inf), math.nextafter(zt, math.inf), zt - 0.25]
        pts = [p for p in pts if spec.a * p != spec.b]
    return pts


@functools.lru_cache(maxsize=None)
def mp_expected(spec):
    pts = mp_points(spec)
    return pts, mp_derivatives_many(spec, pts, 5)  # order 5 too: for the tolerance


def mp_tolerance(z: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """|ours - true| <= 1e-13 |true| + 4 eps |z| |f^(n+1)(z)|, orders n = 0..4.

    The first term is the accuracy the header promises ("a few ulp", with room for CUDA's
    libm, whose exp/erfc/tanh are 1-5 ulp). The second is the error that is unavoidable for any
    float64 evaluation: computing w*z (sin(3z)), z*z (gelu's exp(-z^2/2)) or u = k0(z + k1 z^3)
    (gelu_tanh) rounds the argument by ~|z| eps, which moves f^(n) by |z| eps |f^(n+1)|. This
    term also absorbs the cancellation at a root of f^(n) (e.g. gelu''' at z = 2), where no
    relative bound can hold. It is not a loophole for the stable forms: where the derivatives
    decay exponentially, |f^(n+1)| ~ |f^(n)|, so it only adds ~|z| eps relative (tanh'' at
    z = 20 is -3.4e-17; returning 0 there fails by 13 orders of magnitude). Measured worst case
    over 300 random points in [-40, 40]: 0.46 of this tolerance (gelu at z = -34).
    """
    n = true.shape[0] - 1
    return 1e-13 * true[:n].abs() + 4 * EPS64 * z.abs() * true[1:].abs()


@spec_params
@device_params
@impl_params
def test_orders_0_to_4_match_mpmath(spec, device, impl):
    pts, true = mp_expected(spec)
    z = torch.tensor(pts, dtype=torch.float64, device=device)
    true = true.to(device)
    ours = table(z, spec, impl)
    # relative accuracy where the true value is a normal float64 (|true| > 1e-290); an
    # underflowed or exactly zero true value only asks ours to be below 1e-290 too (plus the
    # argument-rounding term: at a zero of f^(n) away from z = 0 that is all any float64
    # evaluation can promise).
    err = (ours - true[:5]).abs()
    bad = ~(err <= mp_tolerance(z, true) + 1e-290)  # NaN fails too
    assert not bad.any(), _close_report(ours, true, bad, z)


@device_params
@impl_params
@pytest.mark.parametrize(
    "name,z,order,expected",
    [
        # tanh''(20) = -2 tanh sech^2 = -8 e^-40 / (1 + e^-40)^2 (1 - e^-40)/(1 + e^-40)
        ("tanh", 20.0, 2, -8 * math.exp(-40)),
        ("tanh", -20.0, 2, 8 * math.exp(-40)),
        # sigmoid''(40) = p q (q - p) ~ -e^-40
        ("sigmoid", 40.0, 2, -math.exp(-40)),
        # tanh'''(30) = sech^2 (4 - 6 sech^2) ~ 16 e^-60
        ("tanh", 30.0, 3, 16 * math.exp(-60)),
    ],
)
def test_stable_forms_closed_form(device, impl, name, z, order, expected):
    """A few spot values that 1 - tanh^2 style formulas get wrong (they return 0), from closed
    forms whose corrections (relative e^-40 and smaller) are far below float64 resolution."""
    spec = make_spec(name)
    ours = table(torch.tensor([z], dtype=torch.float64, device=device), spec, impl)[order].item()
    assert ours == pytest.approx(expected, rel=1e-14)


@device_params
@impl_params
def test_softplus_threshold_disabled_users_report(device, impl):
    """Users' report: softplus'' with the threshold disabled (threshold=1e9) at z = 100 was
    -inf/NaN. True values: softplus^(n)(100) = sigmoid^(n-1)(100) = e^-100 (1 + O(e^-100)) with
    alternating signs -- e^-100 = 3.7e-44 is a normal float64."""
    spec = make_spec("softplus", threshold=1e9)
    z = torch.tensor([100.0, -100.0], dtype=torch.float64, device=device)
    ours = table(z, spec, impl)
    assert torch.isfinite(ours).all(), ours
    e = math.exp(-100)
    assert ours[0, 0].item() == pytest.approx(100.0, rel=1e-15)
    assert ours[1, 0].item() == pytest.approx(1.0, rel=1e-15)
    for n, sign in [(2, 1.0), (3, -1.0), (4, 1.0)]:
        assert ours[n, 0].item() == pytest.approx(sign * e, rel=1e-14), (n, ours[n, 0].item())
        assert ours[n, 1].item() == pytest.approx(e, rel=1e-14), (n, ours[n, 1].item())


@device_params
def test_softplus_threshold_disabled_through_autograd(device):
    """Same report, through torchhessdiag.activation and two nested autograd.grad calls."""
    z = torch.tensor([100.0], dtype=torch.float64, device=device, requires_grad=True)
    y = torchhessdiag.activation(z, "softplus", threshold=1e9)
    (d1,) = torch.autograd.grad(y.sum(), z, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), z)
    assert torch.isfinite(d2).all()
    assert d2.item() == pytest.approx(math.exp(-100), rel=1e-14)


def test_mp_gelu_closed_form_matches_mpmath_diff():
    """Self-check of the oracle: the closed form used for gelu in _helpers agrees with plain
    numerical differentiation (mpmath.diffs at 60 digits) at moderate points."""
    import mpmath

    from _helpers import _mp_gelu_derivatives

    for z0 in [-3.7, -0.4, 0.9, 2.6]:
        closed = _mp_gelu_derivatives(z0, 6)
        with mpmath.workdps(60):
            f = lambda z: z * mpmath.erfc(-z / mpmath.sqrt(2)) / 2  # noqa: E731
            num = [float(v) for v in mpmath.diffs(f, mpmath.mpf(z0), 6)]
        assert closed == pytest.approx(num, rel=1e-14, abs=1e-300)


# ---- 2. finite at |z| = 1e4 ---------------------------------------------------------------------


@spec_params
@device_params
@impl_params
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_finite_at_large_z(spec, device, impl, dtype):
    z = torch.tensor([1e4, -1e4], dtype=dtype, device=device)
    ours = table(z, spec, impl)
    if spec.name == "exp":
        # e^z overflows to inf at z = 1e4, as torch.exp does; every order is e^z.
        assert torch.equal(ours, torch.exp(z).expand(5, 2))
        return
    assert torch.isfinite(ours).all(), f"{spec} at +-1e4 ({dtype}): {ours.tolist()}"
    # and the values are the asymptotes (true values below float32/64 resolution are 0):
    # order 0 is torch's function; order 1 is torch's first derivative there.
    expected = nested_autograd(torch_function(spec), z.double(), 1).to(dtype)
    torch.testing.assert_close(ours[:2], expected, rtol=2 * torch.finfo(dtype).eps, atol=0)


# ---- 3. mirror: compiled kernel vs reference ------------------------------------------------------


def mirror_grid(spec, dtype, device) -> torch.Tensor:
    tiny = torch.finfo(dtype).tiny
    special = [0.0, -0.0, 1e-8, -1e-8, tiny, -tiny, 1e-30, -1e-30, 1.0, -1.0, 1e4, -1e4, 100.0, -100.0]
    special += [math.inf, -math.inf]
    if spec.name == "softplus":
        zt = softplus_threshold_point(spec)
        special += [zt, math.nextafter(zt, math.inf), math.nextafter(zt, -math.inf)]
    z = torch.cat([torch.linspace(-50, 50, 20001, dtype=torch.float64), torch.tensor(special, dtype=torch.float64)])
    return z.sort().values.to(dtype).to(device)  # sorted: local_scale looks at neighbours in z


def local_scale(a: torch.Tensor, block: int = 100) -> torch.Tensor:
    """Per row (order): max |a| over the block of `block` grid points holding each point and the
    two blocks beside it -- on the sorted mirror grid (step 0.005), the points within 0.5 to 1.0
    of z. NaN/inf do not count."""
    a = torch.nan_to_num(a.abs(), nan=0.0, posinf=0.0)
    rows, n = a.shape
    nb = -(-n // block)
    padded = torch.zeros(rows, nb * block, dtype=a.dtype, device=a.device)
    padded[:, :n] = a
    m = padded.view(rows, nb, block).amax(-1)
    m = torch.nn.functional.pad(m, (1, 1))
    m = torch.maximum(torch.maximum(m[:, :-2], m[:, 1:-1]), m[:, 2:])
    return m.repeat_interleave(block, dim=1)[:, :n]


def next_order(z: torch.Tensor, spec) -> torch.Tensor:
    """f^(1..5) at z, from the reference and one autograd step on its 4th order -- used only to
    size the tolerance (the sensitivity of f^(n) to a rounding of its argument)."""
    zz = z.detach().clone().requires_grad_(True)
    d = reference.derivatives(zz, spec.name, spec.a, spec.b, 4)
    d5 = None
    if d[4].requires_grad:  # identity, relu, leaky_relu: exact zeros without a graph
        (d5,) = torch.autograd.grad(d[4].sum(), zz, allow_unused=True)
    d5 = torch.zeros_like(z) if d5 is None else d5
    return torch.stack([t.detach() for t in d[1:]] + [d5.detach()])


@spec_params
@device_params
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_matches_reference(spec, device, dtype):
    """Same formulas, same branches; they may differ only by libm (glibc / CUDA vs torch's own
    vectorised exp, tanh, erfc, sin: ~1 ulp each) and by how constants are folded (gelu_tanh's
    6 k0 k1 and 3 k1 are folded in double by Python, in T by C++: 1 ulp apart in float32).

    Such ulp-level differences in intermediates move a result by a few ulp of the *terms* it is
    assembled from, and by its sensitivity to its (rounded) argument:
      * at a root of f^(n) (tanh's 4th derivative at z = 0.66, gelu's 3rd at z = 2) the result
        is a cancellation of terms that are of the size of the derivative within O(1) of z:
        hence the local scale, max |reference| over the grid points within ~0.5-1 of z;
      * internal cancellations amplify one ulp of exp: 1 - 6 pq and 1 - 12 pq at pq -> 1/4
        (sigmoid's 3rd/4th derivative, gelu_tanh at z ~ 0) by up to 6 -- measured up to 9 eps
        on CPU (gelu_tanh's 4th derivative at z = 0.015, 0.41 of the bound below for softplus's
        4th) -- so 16 eps, and twice that for headroom on CUDA, whose libm is 1-2 ulp (glibc's
        < 1) and whose compiler contracts a*b+c into FMAs that torch's separate kernels cannot;
      * a 1-ulp difference in an argument (2u = 2 k0 (z + k1 z^3) for gelu_tanh, w z, z/alpha)
        moves f^(n) by ~|z| eps |f^(n+1)|: hence the second term, f^(n+1) from the reference.
    So |compiled - reference| <= 32 eps (max(|ref|, local scale) + |z| local |f^(n+1)|)
    + 32 tiny (tiny: results in the subnormal range, where a rounding is an absolute error).
    NaN and inf must match exactly (same branches at +-inf and NaN).
    """
    z = mirror_grid(spec, dtype, device)
    ref = torch.stack(reference.derivatives(z, spec.name, spec.a, spec.b, 4))
    ours = torchhessdiag.activation_derivatives(z, spec.name, order=4, **spec.params)
    assert ours.dtype == dtype and ref.dtype == dtype
    same_nan = torch.isnan(ours) == torch.isnan(ref)
    assert same_nan.all(), _close_report(ours, ref, ~same_nan, z)
    inf = torch.isinf(ref) | torch.isinf(ours)
    assert torch.equal(ours[inf], ref[inf]), _close_report(ours, ref, inf & (ours != ref), z)
    fin = torch.isfinite(ref) & torch.isfinite(ours)
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    zf = torch.nan_to_num(z.abs(), posinf=0.0)
    scale = torch.maximum(ref.abs(), local_scale(ref)) + zf * local_scale(next_order(z, spec))
    tol = 32 * eps * scale + 32 * tiny
    bad = fin & ((ours - ref).abs() > tol)
    assert not bad.any(), _close_report(ours, ref, bad, z)


# ---- 4. beyond the table ------------------------------------------------------------------------

BEYOND = [
    make_spec("tanh"),
    make_spec("sigmoid"),
    make_spec("sin"),
    make_spec("sin", w=3.0),
    make_spec("cos", w=3.0),
    make_spec("exp"),
    make_spec("gelu"),
    make_spec("gelu_tanh"),
    make_spec("silu"),
    make_spec("softplus", beta=2.0, threshold=5.0),
    make_spec("elu", alpha=0.7),
    make_spec("celu", alpha=0.7),
]


@pytest.mark.parametrize("spec", BEYOND, ids=lambda s: str(s).replace(" ", ""))
@device_params
def test_orders_5_and_6_match_mpmath(spec, device):
    """Orders past the table come from nested autograd of torch's own function. At moderate z
    that is accurate to ~1e-14 relative (measured <= 1.2e-13, gelu_tanh); 1e-9 relative is the
    bound asked for, and the points are far from every root of f^(5), f^(6) (the smallest |true|
    is > 4e-3 of the largest of the same order; exact zeros where the activation is linear) so
    the relative bound is meaningful. For celu the torch formula rounds 1/alpha to float32 (see
    torch_tolerance), so 1e-9 is not reachable there: 2e-6."""
    pts = [-3.1, -1.2, -0.45, 0.35, 0.9, 2.2]
    if spec.name == "softplus":
        pts.append(3.0)  # above the threshold: linear, orders >= 2 are 0
    z = torch.tensor(pts, dtype=torch.float64, device=device)
    ours = torchhessdiag.activation_derivatives(z, spec.name, orders=[5, 6], **spec.params)
    assert ours.shape == (2, len(pts))
    true = mp_derivatives_many(spec, pts, 6)[5:].to(device)
    rel = 2e-6 if spec.name == "celu" else 1e-9
    torch.testing.assert_close(ours, true, rtol=rel, atol=1e-300)


@spec_params
@device_params
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_orders_5_and_6_finite_at_large_z(spec, device, dtype):
    """The beyond-table orders promise to "never return a wrong number": like orders 0..4
    (test_finite_at_large_z) they must be finite at large |z| -- every true value there is a
    finite number (0 after underflow). exp overflows at +1e4 (and at +100 in float32) exactly
    like torch.exp: every order equals torch.exp there."""
    z = torch.tensor([10.0, -10.0, 20.0, -20.0, 30.0, -30.0, 100.0, -100.0, 1e4, -1e4], dtype=dtype, device=device)
    ours = torchhessdiag.activation_derivatives(z, spec.name, orders=[5, 6], **spec.params)
    if spec.name == "exp":
        # every order is exp(z): overflow exactly where torch.exp overflows, and the finite values
        # within 2 ulp of the float64 exp rounded to dtype (torch.exp itself is not correctly
        # rounded everywhere: CUDA's expf is off by up to 2 ulp, so no bitwise comparison)
        theirs = torch.exp(z).expand(2, -1)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        exact = torch.exp(z.double()).to(dtype).expand(2, -1)
        fin = torch.isfinite(exact)
        torch.testing.assert_close(ours[fin], exact[fin], rtol=2 * torch.finfo(dtype).eps, atol=0)
        return
    bad = ~torch.isfinite(ours)
    assert not bad.any(), [(5 + n, z[i].item(), ours[n, i].item()) for n, i in bad.nonzero().tolist()]


LARGE_Z_BEYOND = [make_spec(n) for n in ("tanh", "sigmoid", "silu", "gelu", "gelu_tanh", "softplus")]


@pytest.mark.parametrize("spec", LARGE_Z_BEYOND, ids=str)
@device_params
def test_orders_5_and_6_at_large_z_match_mpmath(spec, device):
    """Orders 5 and 6 at |z| = 10, 20 -- where orders 0..4 are exact thanks to the stable forms
    -- against mpmath, with the 1e-9 relative bound of the beyond-table orders plus the
    unavoidable argument-rounding term of mp_tolerance (4 eps |z| |f^(n+1)|). The true values
    are normal float64 numbers (tanh^(5)(20) = 2.7e-16, sigmoid^(5)(20) = 2.1e-9)."""
    pts = [10.0, -10.0, 20.0, -20.0]
    if spec.name == "softplus":  # 20 is the threshold point, a convention (tested on its own)
        pts[2] = 19.5
    z = torch.tensor(pts, dtype=torch.float64, device=device)
    ours = torchhessdiag.activation_derivatives(z, spec.name, orders=[5, 6], **spec.params)
    true = mp_derivatives_many(spec, pts, 7).to(device)
    tol = 1e-9 * true[5:7].abs() + 4 * EPS64 * z.abs() * true[6:8].abs() + 1e-290
    bad = ~((ours - true[5:7]).abs() <= tol)  # NaN fails too
    assert not bad.any(), [
        (5 + n, z[i].item(), ours[n, i].item(), true[5 + n, i].item()) for n, i in bad.nonzero().tolist()
    ]


@device_params
@pytest.mark.parametrize("name", ["relu", "leaky_relu", "identity"])
def test_orders_beyond_table_piecewise_linear_are_zero(device, name):
    z = torch.tensor([-2.0, -0.5, 0.5, 3.0], dtype=torch.float64, device=device)
    ours = torchhessdiag.activation_derivatives(z, name, orders=[5, 6])
    assert torch.equal(ours, torch.zeros_like(ours))


@device_params
def test_mixed_orders_in_any_order(device):
    """orders=[6, 0, 5, 4, 2] returns exactly those, in that order (table and beyond mixed)."""
    spec = make_spec("tanh")
    pts = [-1.3, 0.2, 0.8]
    z = torch.tensor(pts, dtype=torch.float64, device=device)
    ours = torchhessdiag.activation_derivatives(z, "tanh", orders=[6, 0, 5, 4, 2])
    true = mp_derivatives_many(spec, pts, 6).to(device)
    torch.testing.assert_close(ours, true[[6, 0, 5, 4, 2]], rtol=1e-9, atol=0)


# ---- 5. NaN ---------------------------------------------------------------------------------------


@spec_params
@device_params
@impl_params
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nan_propagates(spec, device, impl, dtype):
    z = torch.tensor([math.nan, -1.5, 0.5, math.nan], dtype=dtype, device=device)
    ours = table(z, spec, impl)
    if spec.name in SMOOTH:
        assert torch.isnan(ours[0, [0, 3]]).all(), ours[0]
        assert not torch.isnan(ours[:, [1, 2]]).any()
    else:
        # piecewise: the NaN takes one branch, as in torch -- same NaN pattern and same values
        # as torch's function and its first derivative.
        expected = nested_autograd(torch_function(spec), z, 1)
        assert torch.equal(torch.isnan(ours[:2]), torch.isnan(expected)), (ours[:2], expected)
        # values: a couple of ulp; celu: torch's float32 1/alpha (see torch_tolerance)
        rtol = 1e-7 if (spec.name == "celu" and spec.a != 1.0) else 2 * torch.finfo(dtype).eps
        torch.testing.assert_close(ours[:2], expected, equal_nan=True, rtol=rtol, atol=0)


# ---- 6. kinks at z = 0 ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [s for s in SPECS if s.name in KINKED], ids=lambda s: str(s).replace(" ", ""))
@device_params
@impl_params
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kink_at_zero_follows_torch(spec, device, impl, dtype):
    """At z = 0 (and -0.0) the derivatives are conventions; ELU/CELU take torch's: the first
    derivative from the negative branch (alpha * e^0 / alpha^0 ...), the second and higher 0.
    Exact, except for celu's float32 1/alpha in torch's formula (see torch_tolerance)."""
    z = torch.tensor([0.0, -0.0], dtype=dtype, device=device)
    expected = nested_autograd(torch_function(spec), z, 4)
    ours = table(z, spec, impl)
    rtol = 1e-7 if (spec.name == "celu" and spec.a != 1.0) else 0.0
    torch.testing.assert_close(ours, expected, rtol=rtol, atol=0)
    if spec.name in ("elu", "celu"):
        d1 = torch.tensor(spec.a if spec.name == "elu" else 1.0, dtype=dtype).item()  # alpha, as T
        assert ours[1].tolist() == [d1, d1]
        assert (ours[2:] == 0).all()


# ---- widths and sizes that make every CUDA loop iterate (issue 17) ----------------------------
#
# The table ops (act_derivatives, act_grad, mul_pair, mul_pair_backward) run one grid-stride
# kernel over the elements (csrc/cuda/act_ops.cu, 32 blocks of 256 threads per SM). On (N, w)
# inputs with w in {1, 31, 33, 100} and, on CUDA, more elements than one pass of that grid (on
# the CPU several parallel grains of 2048), at random points in [-4, 4] (well conditioned; no
# neighbour is close to another, so a misplaced element is an O(1) error):
# * against the reference, within 32 eps (max |f^(k)| + 4 max |f^(k+1)|) per order k -- the bound of
#   test_compiled_matches_reference with the local scales replaced by global maxima;
# * mul_pair's products exactly (one product, or two in the same order, on both sides);
# * exact indexing: the same op over chunks of rows (each within one grid pass) gives
#   bit-identical results.

from _helpers import THREADS_PER_BLOCK, WIDE_WIDTHS, beyond_one_pass, grid_pass  # noqa: E402

WIDE_SPECS = [make_spec("tanh"), make_spec("softplus", beta=2.0, threshold=5.0), make_spec("sin", w=3.0)]


def _wide_rows(device, w):
    if torch.device(device).type == "cuda":
        return beyond_one_pass(grid_pass(device, THREADS_PER_BLOCK), w)
    return 3 * max(1, 2048 // w) + 7


@pytest.mark.parametrize("spec", WIDE_SPECS, ids=lambda s: s.name)
@device_params
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("w", WIDE_WIDTHS)
def test_wide_shapes(spec, device, dtype, w):
    N = _wide_rows(device, w)
    if torch.device(device).type == "cuda":
        assert N * w > grid_pass(device, THREADS_PER_BLOCK)
    g = torch.Generator().manual_seed(w)
    z, gg, gr = ((torch.rand(N, w, generator=g, dtype=torch.float64) * 8 - 4).to(device=device, dtype=dtype) for _ in range(3))
    ops = torch.ops.torchhessdiag
    eps = torch.finfo(dtype).eps
    ref = torch.stack(reference.derivatives(z, spec.name, spec.a, spec.b, 4))
    nxt = next_order(z.double(), spec).to(dtype)  # f^(1..5)
    tol = [32 * eps * (ref[k].abs().max() + 4 * nxt[k].abs().max()) for k in range(5)]

    def close(ours, k, scale=None, what=""):
        expected = ref[k] if scale is None else scale * ref[k]
        t = tol[k] if scale is None else tol[k] * scale.abs()
        bad = (ours - expected).abs() > t
        assert not bad.any(), f"{what} order {k}: {bad.sum().item()} elements off, max err {(ours - expected).abs().max().item():.3g}"

    D = ops.act_derivatives(z, spec.name, spec.a, spec.b, [0, 1, 2, 3, 4])
    for k in range(5):
        close(D[k], k, what="act_derivatives")
    D31 = ops.act_derivatives(z, spec.name, spec.a, spec.b, [3, 1])  # any order, any subset
    assert torch.equal(D31[0], D[3]) and torch.equal(D31[1], D[1])
    G = ops.act_grad(gr, z, spec.name, spec.a, spec.b, 2)
    close(G, 2, scale=gr, what="act_grad")
    m1, m2 = ops.mul_pair(gg, gr, D[1], D[2])
    assert torch.equal(m1, gg * D[1]) and torch.equal(m2, gg * gr * D[2])
    # its backward (g1 = gr, g2 = z as upstream): sums of two products, FMA-contracted or not
    B = ops.mul_pair_backward(gr, z, gg, gr, D[1], D[2], D[3])
    E = (gr * D[1] + z * gr * D[2], z * gg * D[2], gg * (gr * D[2] + z * gr * D[3]))
    S = ((gr * D[1]).abs() + (z * gr * D[2]).abs(), (z * gg * D[2]).abs(),
         gg.abs() * ((gr * D[2]).abs() + (z * gr * D[3]).abs()))
    for b, e, sc, what in zip(B, E, S, ("ow", "og", "oz")):
        assert ((b - e).abs() <= 4 * eps * sc + torch.finfo(dtype).tiny).all(), f"mul_pair_backward {what}"
    step = max(1, N // 5)
    for r0 in range(0, N, step):
        sl = slice(r0, min(N, r0 + step))
        assert torch.equal(ops.act_derivatives(z[sl], spec.name, spec.a, spec.b, [0, 1, 2, 3, 4]), D[:, sl])
        assert torch.equal(ops.act_grad(gr[sl], z[sl], spec.name, spec.a, spec.b, 2), G[sl])
        C = ops.mul_pair_backward(gr[sl], z[sl], gg[sl], gr[sl], D[1, sl], D[2, sl], D[3, sl])
        assert all(torch.equal(c, b[sl]) for c, b in zip(C, B))
