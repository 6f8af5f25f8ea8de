"""Autograd of the torchhessdiag ops: gradcheck / gradgradcheck of every op for every
activation, third and higher nested derivatives through torchhessdiag.activation against torch's
own nested autograd and mpmath, torch.library.opcheck, and the needs_input_grad paths.

Every test runs on cpu and, when one is visible, on cuda.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import torchhessdiag
from torchhessdiag.activations import NAMES, make_spec, torch_function

from _helpers import (
    SPEC_IDS,
    SPECS,
    devices,
    mp_derivatives_many,
    nested_autograd,
    torch_tolerance,
)

DEVICES = devices()
ops = torch.ops.torchhessdiag

device_params = pytest.mark.parametrize("device", DEVICES)

# gradcheck runs every activation with its default parameters, plus the non-default parameter
# sets whose formulas differ (beta != 1 scales every order, alpha != 1 in celu divides).
GC_SPECS = [make_spec(n) for n in NAMES] + [
    make_spec("softplus", beta=2.0, threshold=5.0),
    make_spec("sin", w=3.0),
    make_spec("celu", alpha=0.7),
]
GC_IDS = [str(s).replace(" ", "") for s in GC_SPECS]

# relu & co are piecewise linear: their (exact, zero) higher derivatives come with a warning that
# is part of the API, not of these tests.
pytestmark = pytest.mark.filterwarnings("ignore:torchhessdiag. second and higher derivatives")


def kink_free_inputs(n: int, device, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Random z with 0.2 <= |z| <= 2.2, alternating signs: both branches of elu/relu/leaky_relu,
    never within gradcheck's finite-difference step (1e-6) of the kink at 0, and below every
    softplus threshold point used here (beta*z = 4.4 < 5)."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.rand(n, generator=g, dtype=torch.float64) * 2.0 + 0.2
    sign = torch.tensor([1.0, -1.0]).repeat((n + 1) // 2)[:n].to(torch.float64)
    return (mag * sign).to(dtype=dtype, device=device)


def randn(n: int, device, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


# ---- 1. gradcheck / gradgradcheck of every op ----------------------------------------------------

OP_CASES = (
    [("act_forward", None)]
    + [("act_derivatives", o) for o in ([0, 2, 4], [3, 4], [1])]  # [3, 4]: backward needs 5, 6
    + [("act_grad", k) for k in range(5)]  # k = 4: z-gradient needs order 5 (beyond the table)
)
OP_IDS = [f"{op}-{arg}" if arg is not None else op for op, arg in OP_CASES]


def op_fn_and_inputs(op: str, arg, spec, device):
    """The op as a function of its tensor inputs (all requiring grad), and those inputs."""
    a = (spec.name, spec.a, spec.b)
    z = kink_free_inputs(4, device, seed=1).requires_grad_(True)
    g = randn(4, device, seed=2).requires_grad_(True)
    if op == "act_forward":
        return (lambda z: ops.act_forward(z, *a)), (z,)
    if op == "act_derivatives":
        return (lambda z: ops.act_derivatives(z, *a, arg)), (z,)
    if op == "act_grad":
        return (lambda g, z: ops.act_grad(g, z, *a, arg)), (g, z)
    raise KeyError(op)


@pytest.mark.parametrize("spec", GC_SPECS, ids=GC_IDS)
@pytest.mark.parametrize("op,arg", OP_CASES, ids=OP_IDS)
@device_params
def test_gradcheck_and_gradgradcheck(op, arg, spec, device):
    """First and second derivatives of each op (w.r.t. every tensor input, both outputs of
    the pair act_grad's backward gives) against central finite differences, float64, default tolerances
    (atol 1e-5, rtol 1e-3 on a 1e-6 step). fast_mode: a random projection u^T J v of the
    Jacobian instead of all of it -- an error in any entry changes it with probability 1, and
    it keeps the whole matrix of ops x activations fast."""
    f, inputs = op_fn_and_inputs(op, arg, spec, device)
    assert gradcheck(f, inputs, fast_mode=True)
    assert gradgradcheck(f, inputs, fast_mode=True)


# ---- 2. third and higher orders through torchhessdiag.activation --------------------------------


@pytest.mark.parametrize("spec", GC_SPECS, ids=GC_IDS)
@device_params
def test_third_order_gradgradcheck(spec, device):
    """gradgradcheck of z -> d/dz activation(z) (itself computed with create_graph=True) checks
    the second derivative of the first derivative: the 3rd derivative's consistency."""
    z = kink_free_inputs(4, device, seed=4).requires_grad_(True)

    def first_derivative(z):
        y = torchhessdiag.activation(z, spec.name, **spec.params)
        (d1,) = torch.autograd.grad(y.sum(), z, create_graph=True)
        return d1

    assert gradcheck(first_derivative, (z,), fast_mode=True)
    assert gradgradcheck(first_derivative, (z,), fast_mode=True)


def nested_grid(spec, device) -> torch.Tensor:
    z = torch.cat(
        [
            torch.linspace(-40, 40, 801, dtype=torch.float64),
            torch.tensor([0.0, 1e-8, -1e-8, 100.0, -100.0, 0.3, -0.7], dtype=torch.float64),
        ]
    )
    if spec.name == "softplus":  # the exact threshold point has its own (failing) test in test_table
        z = z[z * spec.a != spec.b]
    return z.to(device)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@device_params
def test_four_nested_grads_match_torch(spec, device):
    """Four nested torch.autograd.grad calls through torchhessdiag.activation (forward ->
    act_grad -> the fused pair -> its backward -> ...) reproduce torch's own nested
    autograd of torch's own function, where torch's is finite, within torch_tolerance
    (1e-12 * max(1, |torch|), torch's own formula error; celu: torch's float32 1/alpha)."""
    z = nested_grid(spec, device)
    ours = nested_autograd(lambda x: torchhessdiag.activation(x, spec.name, **spec.params), z, 4)
    expected = nested_autograd(torch_function(spec), z, 4)
    assert torch.isfinite(ours).all(), "the stable table is finite everywhere on this grid"
    finite = torch.isfinite(expected)
    bad = finite & ((ours - expected).abs() > torch_tolerance(spec, expected, z))
    idx = bad.nonzero()[:5].tolist()
    assert not bad.any(), [(n, z[i].item(), ours[n, i].item(), expected[n, i].item()) for n, i in idx]
    # the value itself is torch's kernel, bit for bit
    assert torch.equal(ours[0], expected[0])


@pytest.mark.parametrize("spec", [make_spec("tanh"), make_spec("sin"), make_spec("sin", w=3.0)], ids=str)
@device_params
def test_nested_orders_5_and_6_match_mpmath(spec, device):
    """Six nested autograd.grad calls through torchhessdiag.activation: orders 5 and 6 leave the
    table (nested autograd of torch's own function underneath). At moderate z that is exact up to
    rounding: 1e-11 relative (a few dozen roundings of O(1) terms, x w^6 = 729 for sin(3z) --
    measured <= 1e-14), at points away from the roots of f^(5), f^(6)."""
    pts = [-2.3, -0.9, -0.2, 0.45, 1.1, 1.9]
    z = torch.tensor(pts, dtype=torch.float64, device=device)
    ours = nested_autograd(lambda x: torchhessdiag.activation(x, spec.name, **spec.params), z, 6)
    true = mp_derivatives_many(spec, pts, 6).to(device)
    torch.testing.assert_close(ours, true, rtol=1e-11, atol=0)


# ---- 3. torch.library.opcheck --------------------------------------------------------------------


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as a (4, 5) tensor: contiguous, transposed (dense, permuted strides) or
    sliced (non-dense, every other column of a (4, 10) tensor)."""
    t = t.reshape(4, 5)
    if kind == "contiguous":
        return t.contiguous()
    if kind == "transposed":
        return t.t().contiguous().t()
    if kind == "sliced":
        wide = torch.zeros(4, 10, dtype=t.dtype, device=t.device)
        wide[:, ::2] = t
        return wide[:, ::2]
    raise KeyError(kind)


OPCHECK_CASES = [
    # (op, spec, dtype, layout, order argument)
    ("act_forward", make_spec("tanh"), torch.float64, "contiguous", None),
    ("act_forward", make_spec("gelu_tanh"), torch.float32, "sliced", None),
    ("act_forward", make_spec("softplus", beta=2.0, threshold=5.0), torch.float64, "transposed", None),
    ("act_forward", make_spec("identity"), torch.float32, "transposed", None),
    ("act_derivatives", make_spec("sigmoid"), torch.float64, "contiguous", [0, 1, 3]),
    ("act_derivatives", make_spec("silu"), torch.float32, "transposed", [2, 3]),
    ("act_derivatives", make_spec("elu", alpha=0.7), torch.float64, "sliced", [1, 2]),
    ("act_grad", make_spec("gelu"), torch.float64, "contiguous", 1),
    # k = 4 / k = 3: the backward leaves the table (nested autograd of torch's function),
    # which AOT dispatch then traces
    ("act_grad", make_spec("sin", w=3.0), torch.float32, "transposed", 4),
    ("act_grad", make_spec("relu"), torch.float64, "sliced", 0),
    ("act_beyond_table", make_spec("tanh"), torch.float64, "contiguous", 5),
    ("act_beyond_table", make_spec("celu", alpha=0.7), torch.float32, "transposed", 2),
]
OPCHECK_IDS = [f"{op}-{s}-{str(d)[6:]}-{lay}-{arg}".replace(" ", "") for op, s, d, lay, arg in OPCHECK_CASES]


@pytest.mark.parametrize("op,spec,dtype,lay,arg", OPCHECK_CASES, ids=OPCHECK_IDS)
@device_params
def test_opcheck(op, spec, dtype, lay, arg, device):
    """torch.library.opcheck with its default test utilities (schema, autograd registration,
    fake tensor vs real kernel -- shapes, dtypes and strides --, and AOT dispatch with dynamic
    shapes), inputs requiring grad so the backward formulas are traced too."""
    a = (spec.name, spec.a, spec.b)
    z = layout(kink_free_inputs(20, device, seed=5, dtype=dtype), lay).requires_grad_(True)
    g = layout(randn(20, device, seed=6, dtype=dtype), lay).requires_grad_(True)
    args = {
        "act_forward": (z, *a),
        "act_derivatives": (z, *a, arg),
        "act_grad": (g, z, *a, arg),
        "act_beyond_table": (z, *a, arg),
    }[op]
    torch.library.opcheck(getattr(ops, op), args)


@pytest.mark.parametrize("lay", ["transposed", "sliced"])
@device_params
def test_fake_kernel_strides_match_real_kernel(lay, device):
    """The fake (meta) kernel of every op must describe the real output exactly -- shape, dtype
    and strides -- or torch.compile / export trace a wrong layout (opcheck's test_faketensor,
    here for every activation at once). For a transposed (dense, permuted) input, ATen's
    elementwise kernels, which act_forward calls, keep the input's strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    z = layout(kink_free_inputs(20, device, seed=16), lay)
    mismatches = []
    for name in NAMES:
        spec = make_spec(name)
        a = (spec.name, spec.a, spec.b)
        calls = {
            "act_forward": lambda z: ops.act_forward(z, *a),
            "act_derivatives": lambda z: ops.act_derivatives(z, *a, [0, 2]),
            "act_grad": lambda z: ops.act_grad(z, z, *a, 1),
            "mul_pair": lambda z: ops.mul_pair(z, z, z, z)[1],
            "mul_pair_backward": lambda z: ops.mul_pair_backward(z, None, z, z, z, z, z)[2],
        }
        for op, call in calls.items():
            real = call(z)
            with FakeTensorMode() as mode:
                fake = call(mode.from_tensor(z))
            if (fake.shape, fake.dtype, fake.stride()) != (real.shape, real.dtype, real.stride()):
                mismatches.append(f"{op}({name}): fake strides {fake.stride()}, real {real.stride()}")
    assert not mismatches, mismatches


# ---- 4. needs_input_grad paths ---------------------------------------------------------------------

NIG_SPECS = [make_spec(n) for n in NAMES if n not in ("relu", "leaky_relu", "identity")] + [
    make_spec("softplus", beta=2.0, threshold=5.0),
    make_spec("celu", alpha=0.7),
]
NIG_IDS = [str(s).replace(" ", "") for s in NIG_SPECS]


def torch_derivs(spec, z, n):
    """sigma^(0..n)(z) from torch's own nested autograd (moderate z: accurate to ~1e-15)."""
    return nested_autograd(torch_function(spec), z, n)


def nig_close(actual, expected, spec):
    # moderate z (|z| <= 2.2): torch's formulas are accurate to a few ulp of O(1) terms; the
    # products with g, gg ~ N(0, 1) keep that: 1e-12 relative, 1e-13 absolute (for entries that
    # are sums of terms of opposite sign). celu: torch's float32 1/alpha, ~1e-7 relative.
    rtol = 1e-6 if (spec.name == "celu" and spec.a != 1.0) else 1e-12
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-13)


@pytest.mark.parametrize("spec", NIG_SPECS, ids=NIG_IDS)
@pytest.mark.parametrize("k", range(5))
@pytest.mark.parametrize("wrt", ["g", "z", "both"])
@device_params
def test_act_grad_needs_input_grad(spec, k, wrt, device):
    """out = g sigma^(k)(z): d/dg = gout sigma^(k), d/dz = gout g sigma^(k+1), whichever of g
    and z require grad (the backward takes a different path for each combination: fused
    the fused pair for both, act_grad of order k or k+1 -- or beyond the table -- for one)."""
    a = (spec.name, spec.a, spec.b)
    z = kink_free_inputs(6, device, seed=8).requires_grad_(wrt in ("z", "both"))
    g = randn(6, device, seed=9).requires_grad_(wrt in ("g", "both"))
    gout = randn(6, device, seed=10)
    out = ops.act_grad(g, z, *a, k)
    d = torch_derivs(spec, z.detach(), k + 1)
    nig_close(out.detach(), g.detach() * d[k], spec)
    wanted = [t for t in (g, z) if t.requires_grad]
    grads = torch.autograd.grad(out, wanted, gout)
    expected = {"g": gout * d[k], "z": gout * g.detach() * d[k + 1]}
    for name, got in zip([n for n, t in (("g", g), ("z", z)) if t.requires_grad], grads):
        nig_close(got, expected[name], spec)


@pytest.mark.parametrize("spec", NIG_SPECS, ids=NIG_IDS)
@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("wrt", ["gg", "g", "z", "gg+z", "g+z", "all"])
@device_params
def test_fused_double_backward_needs_input_grad(spec, k, wrt, device):
    """The recorded backward of out = g sigma^(k)(z) w.r.t. (g, z) with upstream gg is the fused
    pair (o1, o2) = (gg sigma^(k), gg g sigma^(k+1)) (one node; compiled: GradBackwardNode).
    Its backward with upstream (w1, w2): d/dgg = w1 sigma^(k) + w2 g sigma^(k+1),
    d/dg = w2 gg sigma^(k+1), d/dz = w1 gg sigma^(k+1) + w2 gg g sigma^(k+2) -- for each subset
    of (gg, g, z) asked for, and for each output alone (the other's gradient None)."""
    a = (spec.name, spec.a, spec.b)
    ask = {"gg": "gg" in wrt or wrt == "all", "g": wrt in ("g", "g+z", "all"), "z": "z" in wrt or wrt == "all"}
    z = kink_free_inputs(6, device, seed=11).requires_grad_(True)
    g = randn(6, device, seed=12).requires_grad_(True)
    gg = randn(6, device, seed=13).requires_grad_(True)
    w1, w2 = randn(6, device, seed=14), randn(6, device, seed=15)
    out = ops.act_grad(g, z, *a, k)
    o1, o2 = torch.autograd.grad(out, (g, z), gg, create_graph=True)
    d = torch_derivs(spec, z.detach(), k + 2)
    G, GG = g.detach(), gg.detach()
    nig_close(o1.detach(), GG * d[k], spec)
    nig_close(o2.detach(), GG * G * d[k + 1], spec)
    names = [n for n in ("gg", "g", "z") if ask[n]]
    tensors = {"gg": gg, "g": g, "z": z}
    for upstream in [(w1, w2), (w1, None), (None, w2)]:
        u1 = upstream[0] if upstream[0] is not None else torch.zeros_like(w1)
        u2 = upstream[1] if upstream[1] is not None else torch.zeros_like(w2)
        outs = [o for o, u in zip((o1, o2), upstream) if u is not None]
        ups = [u for u in upstream if u is not None]
        grads = torch.autograd.grad(outs, [tensors[n] for n in names], ups, retain_graph=True, allow_unused=True)
        expected = {
            "gg": u1 * d[k] + u2 * G * d[k + 1],
            "g": u2 * GG * d[k + 1],
            "z": u1 * GG * d[k + 1] + u2 * GG * G * d[k + 2],
        }
        for n, got in zip(names, grads):
            got = torch.zeros_like(w1) if got is None else got  # unused: a zero gradient
            nig_close(got, expected[n], spec)
