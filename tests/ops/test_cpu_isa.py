"""The SIMD builds of the CPU kernels (csrc/cpu/: AVX2, AVX-512, SLEEF's vector math) against the
scalar build (libm), for every activation and every kernel of the table:

* the derivative-table ops act_derivatives (orders 0..4) and act_grad (k = 0..4), float32 and
  float64, on a grid with the tails up to |z| = 600,
  +-0, subnormals, +-inf and NaN, of a length that leaves a partial vector at the end;
* the arithmetic of the drop-ins' backward passes, mul_pair and mul_pair_backward (with either
  incoming gradient absent), with +-0, inf and NaN among the inputs;
* the drop-ins themselves: nested autograd through a converted MLP gives the same Hessian
  diagonal with every build.

The builds evaluate the same formulas (csrc/activations.h) and may differ only by their math
library -- SLEEF's 1-ulp exp/expm1/log1p/sin/cos and 1.5-ulp erfc against glibc's < 1 ulp -- and
by FMA contraction, which the SIMD builds may use and the scalar one cannot. Tolerance, as for
the compiled-vs-reference mirror in test_table.py (see there for the reasoning):
32 eps (max(|ref|, local scale) + |z| local |f^(n+1)|) + 32 tiny; NaN and inf must match exactly.
CPU only: the CUDA kernels have one (scalar) build.
"""

from __future__ import annotations

import math

import pytest
import torch

import torchhessdiag
from torchhessdiag import ops, reference

from _helpers import SPEC_IDS, SPECS, softplus_threshold_point

pytestmark = [
    pytest.mark.skipif(not ops.COMPILED, reason="the CPU kernel builds belong to the compiled extension"),
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:torchhessdiag. second and higher derivatives"),
]
_ops = torch.ops.torchhessdiag


def _isas():
    """The SIMD builds this CPU (and this torch's SLEEF) can run, by the name set_cpu_isa gives."""
    if not ops.COMPILED:
        return []
    C = ops._C
    before = C.cpu_isa()
    try:
        got = {C.set_cpu_isa(name) for name in ("avx2", "avx512")}
    finally:
        C.set_cpu_isa(before)
    return sorted(got - {"scalar"})


SIMD = _isas()


@pytest.fixture
def isa_switch():
    """Run the ops under a given build: isa_switch(name) -> the build in use; restores after."""
    C = ops._C
    before = C.cpu_isa()

    def use(name):
        got = C.set_cpu_isa(name)
        assert got == name, f"asked for {name}, got {got}"
        return got

    yield use
    C.set_cpu_isa(before)


def test_set_cpu_isa_reports_and_refuses():
    C = ops._C
    before = C.cpu_isa()
    try:
        assert C.set_cpu_isa("scalar") == "scalar" == C.cpu_isa()
        with pytest.raises(ValueError, match="expected 'scalar', 'avx2' or 'avx512'"):
            C.set_cpu_isa("sse9")
    finally:
        C.set_cpu_isa(before)
    assert C.cpu_isa() == before


def test_a_simd_build_runs_here():
    """This suite compares SIMD against scalar: on an x86-64 CPU with AVX2 at least one SIMD build
    must be usable (else the comparisons below are skipped and nothing was tested)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("not an x86-64 CPU")
    flags = open("/proc/cpuinfo").read() if platform.system() == "Linux" else ""
    if " avx2" not in flags:
        pytest.skip("this CPU has no AVX2")
    assert SIMD, "AVX2 CPU, but no SIMD kernel build is usable (SLEEF not found in libtorch_cpu?)"


# ---- the grid and the tolerance ------------------------------------------------------------------


def grid(spec, dtype) -> torch.Tensor:
    tiny = torch.finfo(dtype).tiny
    special = [0.0, -0.0, tiny, -tiny, tiny / 8, -tiny / 8, 1e-30, -1e-30, 1e-8, -1e-8, 1.0, -1.0,
               88.0, -88.0, 300.0, -300.0, 600.0, -600.0, 1e4, -1e4, math.inf, -math.inf]
    if spec.name == "softplus":
        zt = softplus_threshold_point(spec)
        special += [zt, math.nextafter(zt, math.inf), math.nextafter(zt, -math.inf)]
    z = torch.cat([torch.linspace(-600, 600, 2401, dtype=torch.float64),
                   torch.linspace(-8, 8, 3201, dtype=torch.float64),
                   torch.tensor(special, dtype=torch.float64)])
    z = z.to(dtype).sort().values  # sorted: the local scale looks at neighbours
    z = torch.cat([z, torch.tensor([math.nan], dtype=dtype)])
    assert z.numel() % 16 != 0  # a partial vector at the end, for both widths
    return z


def local_scale(a: torch.Tensor, block: int = 50) -> torch.Tensor:
    """Per row: max |a| over the block of grid points holding each point and the blocks beside it
    (NaN/inf not counted)."""
    a = torch.nan_to_num(a.abs(), nan=0.0, posinf=0.0)
    rows, n = a.shape
    nb = -(-n // block)
    padded = torch.zeros(rows, nb * block, dtype=a.dtype)
    padded[:, :n] = a
    m = padded.view(rows, nb, block).amax(-1)
    m = torch.nn.functional.pad(m, (1, 1))
    m = torch.maximum(torch.maximum(m[:, :-2], m[:, 1:-1]), m[:, 2:])
    return m.repeat_interleave(block, dim=1)[:, :n]


def table_tolerance(z: torch.Tensor, spec) -> torch.Tensor:
    """(6, n): the tolerance of orders 0..5 at z (row 5 only sizes row 4's |z| term). Built from
    the float64 reference mirror."""
    zz = z.double()
    d = torch.stack(reference.derivatives(zz, spec.name, spec.a, spec.b, 4))
    d = torch.cat([d, d[4:]])  # order 5's scale: order 4's (only the |z| term uses row n + 1)
    eps, tiny = torch.finfo(z.dtype).eps, torch.finfo(z.dtype).tiny
    zf = torch.nan_to_num(zz.abs(), posinf=0.0)
    loc = local_scale(d)
    nxt = torch.cat([loc[1:], loc[-1:]])
    return (32 * eps * (torch.maximum(d.abs(), loc) + zf * nxt) + 32 * tiny).to(z.dtype)


def assert_same(ours, ref, tol, what):
    """NaN where ref has NaN, the same infinities, and |ours - ref| <= tol elsewhere."""
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(ours), nan), f"{what}: NaN pattern differs"
    inf = torch.isinf(ref) | torch.isinf(ours)
    assert torch.equal(ours[inf], ref[inf]), f"{what}: infinities differ"
    fin = ~nan & ~inf
    err = (ours - ref).abs()
    bad = fin & (err > tol)
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: at {i}: {ours[tuple(i)].item()!r} vs scalar "
                             f"{ref[tuple(i)].item()!r} (tol {tol[tuple(i)].item():.3g})")


def run_both(isa_switch, name, fn):
    isa_switch("scalar")
    ref = fn()
    isa_switch(name)
    return fn(), ref


# ---- the table ops -------------------------------------------------------------------------------

isa_params = pytest.mark.parametrize("isa", SIMD or [pytest.param("none", marks=pytest.mark.skip("no SIMD build here"))])
dtype_params = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])


@isa_params
@dtype_params
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_act_derivatives_simd_vs_scalar(spec, dtype, isa, isa_switch):
    z = grid(spec, dtype)
    a = (spec.name, spec.a, spec.b)
    ours, ref = run_both(isa_switch, isa, lambda: _ops.act_derivatives(z, *a, [0, 1, 2, 3, 4]))
    tol = table_tolerance(z, spec)[:5]
    assert_same(ours, ref, tol, f"{spec} {dtype} {isa} act_derivatives")
    # a single order through the same kernel (another instantiation of the table: N = k)
    for k in range(5):
        o1, r1 = run_both(isa_switch, isa, lambda: _ops.act_derivatives(z, *a, [k]))
        assert_same(o1[0], r1[0], tol[k], f"{spec} {dtype} {isa} act_derivatives [{k}]")


@isa_params
@dtype_params
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_act_grad_simd_vs_scalar(spec, dtype, isa, isa_switch):
    z = grid(spec, dtype)
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(z.numel(), generator=gen, dtype=torch.float64).to(dtype)
    g[::97] = 0.0
    g[1::97] = -0.0
    a = (spec.name, spec.a, spec.b)
    tol = table_tolerance(z, spec)
    for k in range(5):
        ours, ref = run_both(isa_switch, isa, lambda: _ops.act_grad(g, z, *a, k))
        assert_same(ours, ref, g.abs() * tol[k] + torch.finfo(dtype).tiny,
                    f"{spec} {dtype} {isa} act_grad k={k}")


@isa_params
def test_the_builds_really_differ(isa, isa_switch):
    """Guard for the comparisons above: switching the build really changes the code that runs
    (SLEEF and libm round differently somewhere on the grid: 1239 of 3201 tanh values in
    float64 when this was written); equal results everywhere would mean nothing was compared."""
    z = torch.linspace(-8, 8, 3201, dtype=torch.float64)
    ours, ref = run_both(isa_switch, isa, lambda: _ops.act_derivatives(z, "tanh", 0.0, 0.0, [0, 1, 2]))
    assert (ours != ref).any()


# ---- the arithmetic ops --------------------------------------------------------------------------


def _operands(n, dtype, count, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for j in range(count):
        t = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
        t[j::53] = 0.0
        t[j + 1::59] = -0.0
        t[j + 2::61] = math.inf
        t[j + 3::67] = -math.inf
        t[j + 4::71] = math.nan
        out.append(t)
    return out


@isa_params
@dtype_params
@pytest.mark.parametrize("n", [1, 7, 15, 17, 33, 1000, 20011])
def test_mul_pair_simd_vs_scalar(n, dtype, isa, isa_switch):
    """(w d1, w g d2): the same products in the same order in every build -- bitwise equal."""
    w, g, d1, d2 = _operands(n, dtype, 4, seed=n)
    (o1, o2), (r1, r2) = run_both(isa_switch, isa, lambda: _ops.mul_pair(w, g, d1, d2))
    assert torch.equal(torch.isnan(o1), torch.isnan(r1)) and torch.equal(torch.isnan(o2), torch.isnan(r2))
    ok = ~torch.isnan(r1)
    assert torch.equal(o1[ok], r1[ok]) and torch.equal(torch.signbit(o1[ok]), torch.signbit(r1[ok]))
    ok = ~torch.isnan(r2)
    assert torch.equal(o2[ok], r2[ok]) and torch.equal(torch.signbit(o2[ok]), torch.signbit(r2[ok]))
    # and what they compute
    torch.testing.assert_close(r1, w * d1, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(r2, w * g * d2, equal_nan=True, rtol=0, atol=0)


@isa_params
@dtype_params
@pytest.mark.parametrize("n", [1, 15, 17, 1000, 20011])
@pytest.mark.parametrize("present", ["both", "g1", "g2", "none"])
def test_mul_pair_backward_simd_vs_scalar(present, n, dtype, isa, isa_switch):
    """ow = g1 d1 + g2 g d2, og = g2 w d2, oz = w (g1 d2 + g2 g d3): the SIMD builds may contract
    a product and a sum into one FMA (one rounding less), so 4 eps of the terms' magnitude."""
    g1, g2, w, g, d1, d2, d3 = _operands(n, dtype, 7, seed=n + 1)
    if present in ("g2", "none"):
        g1 = None
    if present in ("g1", "none"):
        g2 = None
    outs, refs = run_both(isa_switch, isa, lambda: _ops.mul_pair_backward(g1, g2, w, g, d1, d2, d3))
    eps = torch.finfo(dtype).eps
    z = torch.zeros_like(w)
    a1 = (g1 * d1).abs() if g1 is not None else z
    a2 = (g2 * g * d2).abs() if g2 is not None else z
    b1 = (g1 * d2).abs() if g1 is not None else z
    b2 = (g2 * g * d3).abs() if g2 is not None else z
    tols = [4 * eps * (a1 + a2), 4 * eps * (g2 * w * d2).abs() if g2 is not None else z,
            4 * eps * w.abs() * (b1 + b2)]
    for o, r, t, name in zip(outs, refs, tols, ("ow", "og", "oz")):
        assert_same(o, r, torch.nan_to_num(t, nan=0.0, posinf=0.0), f"mul_pair_backward {present} {name}")
    # the scalar build computes the formulas (torch ops, same operation order)
    expected = ops._mul_pair_backward_math(g1, g2, w, g, d1, d2, d3)
    for r, e, t, name in zip(refs, expected, tols, ("ow", "og", "oz")):
        assert_same(r, e, torch.nan_to_num(t, nan=0.0, posinf=0.0), f"scalar mul_pair_backward {name} vs formula")


# ---- the drop-ins end to end ---------------------------------------------------------------------


def _hessian_diag(model, x):
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    return torch.stack([torch.autograd.grad(g[:, i].sum(), x, retain_graph=True)[0][:, i]
                        for i in range(x.shape[1])], 1)


@isa_params
@pytest.mark.parametrize("act", ["tanh", "silu", "gelu", "softplus"])
def test_dropin_hessian_diagonal_same_with_every_build(act, isa, isa_switch):
    torch.manual_seed(0)
    mods = {"tanh": torch.nn.Tanh, "silu": torch.nn.SiLU, "gelu": torch.nn.GELU, "softplus": torch.nn.Softplus}
    m = torch.nn.Sequential(torch.nn.Linear(3, 24), mods[act](), torch.nn.Linear(24, 24), mods[act](),
                            torch.nn.Linear(24, 1)).double()
    model = torchhessdiag.nn.convert(m)
    x = torch.randn(37, 3, dtype=torch.float64)
    ours, ref = run_both(isa_switch, isa, lambda: _hessian_diag(model, x))
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=1e-13 * ref.abs().max().item())
