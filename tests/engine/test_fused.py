"""The fused forward-mode MLP op (``torchhessdiag::mlp_jet`` / ``mlp_jet_backward``, torchhessdiag/fused.py).

The op is called directly here, on networks of every shape it accepts (first layers without an
activation, an activation last, linear layers between activations, layers without bias, several
outputs), along coordinate axes and general directions V, summed and per-direction second-order
rows, with and without the first-order rows, in chunks of every size and on 1 and 2 threads.
The expected rows come from torch alone: torch.func's Hessian and gradient of the same network
written with torch's own activation functions (``_oracle``). Tolerances: float64, 1e-12 of the
quantity's scale (the op and torch.func differ only by rounding: a few ulp per layer); the
gradients of a random functional of the rows, 1e-11 (one more differentiation). The public
functions are covered against torch.func through both engine paths in test_engine*.py.

Also here: the SIMD builds of the CPU kernels against the scalar build, the op's argument checks,
torch.library.opcheck, the reference kernels, double backward, and the chunk the op reports.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchhessdiag as thd
from torchhessdiag import engine, fused, ops
from torchhessdiag.activations import NAMES

from _random_models import ACT_BY_LABEL, ACTS, func_hessian, func_value_grad, nested_hessian, rel_err

pytestmark = pytest.mark.usefixtures("single_thread")
_ops = torch.ops.torchhessdiag
TOL = 1e-12
TOL_GRAD = 1e-11
SMOOTH = [a for a in ACTS if not a.piecewise_linear and a.label != "identity"]
# The engine takes the fused op only where a compiled mlp_jet kernel serves the device
# (fused.available); under the reference backend it takes the reverse sweep, so checks that the
# engine chose the op (or of the compiled op's own buffers) need the compiled extension.
NEEDS_COMPILED_FUSED = pytest.mark.skipif(
    not ops.COMPILED, reason="the engine takes the fused op only with the compiled extension's mlp_jet kernel "
    "(fused.available); the reference backend takes the reverse sweep")


def _spec_of(act):
    """(table id, a, b) of a test activation, through its torchhessdiag.nn drop-in."""
    from torchhessdiag.activations import spec_from_module

    s = spec_from_module(act.dropin())
    return NAMES.index(s.name), s.a, s.b


class Net:
    """A network in the op's form with its torch oracle: layer l = Linear(W_l, b_l), then
    activation acts[l] (None: none)."""

    def __init__(self, d, widths, acts, *, bias=None, seed=0, dtype=torch.float64, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        dims = [d] + list(widths)
        self.W, self.b, self.acts = [], [], list(acts)
        for i in range(len(widths)):
            bound = 1.3 / math.sqrt(dims[i])
            W = ((torch.rand(dims[i + 1], dims[i], generator=g) * 2 - 1) * bound).to(dtype=dtype, device=device)
            has_b = bias[i] if bias is not None else True
            b = ((torch.rand(dims[i + 1], generator=g) * 2 - 1) * bound).to(dtype=dtype, device=device) if has_b else None
            self.W.append(W.requires_grad_())
            self.b.append(b.requires_grad_() if b is not None else None)
        ids = [_spec_of(a) if a is not None else (-1, 0.0, 0.0) for a in acts]
        self.ids = [i for i, _, _ in ids]
        self.pa = [a for _, a, _ in ids]
        self.pb = [b for _, _, b in ids]

    def params(self):
        return self.W + [b for b in self.b if b is not None]

    def oracle(self, x):
        h = x
        for W, b, a in zip(self.W, self.b, self.acts):
            h = torch.nn.functional.linear(h, W, b)
            if a is not None:
                h = a.fn(h)
        return h

    def call(self, x, V=None, axes=(), sel=None, diag=False, grad_rows=False, chunk=0, save=False):
        K = len(axes) if V is None else V.shape[1]
        sel = list(range(K)) if sel is None else list(sel)
        bs = [b if b is not None else x.new_empty(0) for b in self.b]
        out, saved = _ops.mlp_jet(x, self.W, bs, self.ids, self.pa, self.pb, V, list(axes), sel, diag, grad_rows, chunk,
                                  save)
        return out, saved

    def expected(self, x, V, sel, diag, grad_rows, differentiable=False):
        """out rows from torch on the oracle: value, v^T H v (summed over sel or one row per sel
        entry), and (grad_rows) the gradient along every direction. torch.func (no graph), or --
        differentiable -- nested torch.autograd.grad with create_graph (a graph to the weights and
        x, for the gradient tests)."""
        if differentiable:
            u, G, H = nested_hessian(self.oracle, x)
        else:
            u, G = func_value_grad(self.oracle, x)  # (N, m), (N, m, d)
            H = func_hessian(self.oracle, x)  # (N, m, d, d)
        q = torch.einsum("nmij,ik,jk->knm", H, V, V)  # (K, N, m): v_k^T H v_k
        second = q[sel] if diag else q[sel].sum(0, keepdim=True)
        rows = [u.unsqueeze(0), second]
        if grad_rows:
            rows.append(torch.einsum("nmi,ik->knm", G, V))
        return torch.cat(rows)


def _x(n, d, seed=1, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def _check(got, want, tol=TOL, what=""):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = max(want.abs().max().item(), 1e-300)
    err = rel_err(got.detach(), want.detach(), scale)
    assert err <= tol, f"{what}: rel. error {err:.3e} > {tol:.1e}"


T, S, SP, G = ACT_BY_LABEL["tanh"], ACT_BY_LABEL["silu"], ACT_BY_LABEL["softplus(2,5)"], ACT_BY_LABEL["gelu"]

# (d, widths, acts, bias): every structure the op accepts
STRUCTURES = {
    "plain 3 layers": (3, [7, 9, 2], [T, S, None], None),
    "no bias anywhere": (2, [6, 5, 1], [S, G, None], [False, False, False]),
    "first layer linear": (3, [5, 8, 6, 2], [None, T, SP, None], None),
    "two linear first": (2, [4, 5, 7, 1], [None, None, G, None], None),
    "linear between acts": (3, [6, 7, 5, 3], [T, None, S, None], None),
    "ends with act": (2, [8, 3], [S, T], None),
    "one layer with act": (3, [4], [T], None),
    "trailing linears": (2, [6, 5, 4, 2], [G, None, None, None], None),
    "wide d": (9, [5, 6, 1], [T, S, None], None),
}


@pytest.mark.parametrize("name", list(STRUCTURES))
@pytest.mark.parametrize("diag", [False, True], ids=["sum", "diag"])
@pytest.mark.parametrize("grad_rows", [False, True], ids=["no-J", "J"])
def test_structures_along_axes(device, name, diag, grad_rows):
    d, widths, acts, bias = STRUCTURES[name]
    net = Net(d, widths, acts, bias=bias, seed=sum(map(ord, name)), device=device)
    x = _x(11, d, device=device)
    sel = list(range(d)) if d < 5 else [0, 3, 4]
    with torch.no_grad():
        out, _ = net.call(x, axes=range(d), sel=sel, diag=diag, grad_rows=grad_rows)
    want = net.expected(x, torch.eye(d, dtype=x.dtype, device=device), sel, diag, grad_rows)
    _check(out, want, what=name)


@pytest.mark.parametrize("act", SMOOTH + [ACT_BY_LABEL["relu"], ACT_BY_LABEL["leaky_relu(0.2)"]], ids=lambda a: a.label)
@pytest.mark.parametrize("diag", [False, True], ids=["sum", "diag"])
def test_every_activation(act, diag):
    net = Net(3, [8, 7, 2], [act, act, None], seed=5)
    x = _x(9, 3, seed=2)
    with torch.no_grad():
        out, _ = net.call(x, axes=[0, 1, 2], diag=diag, grad_rows=True)
    _check(out, net.expected(x, torch.eye(3, dtype=x.dtype), [0, 1, 2], diag, True), what=act.label)


def test_axes_subset_and_order():
    """axes pick coordinate directions in the given order; sel picks the second-order ones."""
    net = Net(5, [6, 7, 1], [T, S, None], seed=3)
    x = _x(7, 5)
    axes = [4, 1, 2]
    V = torch.eye(5, dtype=x.dtype)[:, axes]
    for diag, sel in ((False, [0, 2]), (True, [2, 0])):
        with torch.no_grad():
            out, _ = net.call(x, axes=axes, sel=sel, diag=diag, grad_rows=True)
        _check(out, net.expected(x, V, sel, diag, True), what=f"diag={diag}")


def test_general_directions():
    """V instead of axes (weighted Laplacians, Hutchinson probes): v^T H v for any V."""
    net = Net(4, [6, 5, 2], [T, G, None], seed=4)
    x = _x(8, 4)
    V = torch.randn(4, 3, generator=torch.Generator().manual_seed(9), dtype=x.dtype)
    for diag in (False, True):
        with torch.no_grad():
            out, _ = net.call(x, V=V, diag=diag, grad_rows=True)
        _check(out, net.expected(x, V, [0, 1, 2], diag, True), what=f"V diag={diag}")


@pytest.mark.parametrize("chunk", [1, 3, 7, 0])
@pytest.mark.parametrize("threads", [1, 2])
def test_chunks_and_threads(chunk, threads):
    """Every chunk size (0: automatic) and thread count: the same rows; the op reports the chunk
    it used (the user's limit caps it) in the last saved tensor."""
    net = Net(3, [8, 6, 2], [T, S, None], seed=6)
    x = _x(23, 3)
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, saved = net.call(x, axes=[0, 1, 2], diag=True, grad_rows=True, chunk=chunk, save=True)
    finally:
        torch.set_num_threads(n)
    _check(out, net.expected(x, torch.eye(3, dtype=x.dtype), [0, 1, 2], True, True), what=f"chunk {chunk}")
    used = int(saved[-1].item())
    assert 1 <= used <= 23 and (chunk == 0 or used <= chunk)


# ---- gradients --------------------------------------------------------------------------------


def _functional(out, seed=11):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
    return (out * w).sum() + 0.3 * (out[1:2] ** 2).sum()


@pytest.mark.parametrize("name", ["plain 3 layers", "no bias anywhere", "first layer linear", "linear between acts",
                                  "ends with act", "two linear first"])
@pytest.mark.parametrize("diag", [False, True], ids=["sum", "diag"])
@pytest.mark.parametrize("chunk", [0, 4])
def test_gradients_to_weights_biases_and_x(device, name, diag, chunk):
    """The compiled backward against nested autograd on the oracle."""
    d, widths, acts, bias = STRUCTURES[name]
    net = Net(d, widths, acts, bias=bias, seed=7, device=device)
    x = _x(10, d, device=device).requires_grad_()
    out, _ = net.call(x, axes=range(d), diag=diag, grad_rows=True, chunk=chunk, save=True)
    got = torch.autograd.grad(_functional(out), net.params() + [x])
    want_out = net.expected(x, torch.eye(d, dtype=x.dtype, device=device), list(range(d)), diag, True,
                            differentiable=True)
    want = torch.autograd.grad(_functional(want_out), net.params() + [x])
    for i, (a, b) in enumerate(zip(got, want)):
        _check(a, b, TOL_GRAD, what=f"{name} gradient {i}")


def test_gradients_general_directions():
    net = Net(3, [6, 5, 1], [S, T, None], seed=8)
    x = _x(9, 3)
    V = torch.randn(3, 2, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    out, _ = net.call(x, V=V, diag=False, grad_rows=False, save=True)
    got = torch.autograd.grad(_functional(out), net.params())
    want = torch.autograd.grad(_functional(net.expected(x, V, [0, 1], False, False, True)), net.params())
    for a, b in zip(got, want):
        _check(a, b, TOL_GRAD, what="V gradient")


def test_double_backward(device):
    """create_graph through the op's backward (its Python derivative recomputes the jet with
    torch ops): d/dW of |dL/dW|^2 with a loss quadratic in the jet (so the incoming gradient
    depends on the weights too), against nested autograd on the oracle."""
    net = Net(2, [5, 4, 1], [T, SP, None], seed=9, device=device)
    x = _x(6, 2, device=device)

    def second(out):
        g = torch.autograd.grad(_functional(out), net.params(), create_graph=True)
        return torch.autograd.grad(sum((t * t).sum() for t in g), net.params())

    out, _ = net.call(x, axes=[0, 1], diag=False, grad_rows=True, save=True)
    got = second(out)
    want = second(net.expected(x, torch.eye(2, dtype=x.dtype, device=device), [0, 1], False, True, True))
    for a, b in zip(got, want):
        _check(a, b, 1e-10, what="double backward")


def test_backward_of_no_graph_call_is_refused():
    """A call without save has nothing to differentiate: its outputs carry no graph."""
    net = Net(2, [4, 1], [T, None])
    x = _x(3, 2)
    with torch.no_grad():
        out, saved = net.call(x, axes=[0, 1])
    assert not out.requires_grad and all(t.numel() == 0 for t in saved[:-1])


# ---- the SIMD builds against the scalar build ---------------------------------------------------


def _isas():
    C = ops._C
    have = []
    for isa in ("scalar", "avx2", "avx512"):
        if C.set_cpu_isa(isa) == isa:
            have.append(isa)
    C.set_cpu_isa("avx512")
    return have


@pytest.fixture
def isa_restore():
    if not ops.COMPILED:
        pytest.skip("compiled extension not loaded")
    yield
    ops._C.set_cpu_isa("avx512")


Z_GRID = torch.cat([
    torch.linspace(-40, 40, 4001, dtype=torch.float64),
    torch.tensor([0.0, -0.0, 1e-8, -1e-8, 1e-300, 0.5, 1.0, 30.0, -30.0, 100.0, -100.0, 600.0, -600.0]),
])


@pytest.mark.parametrize("act", [a for a in ACTS], ids=lambda a: a.label)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_simd_table_matches_scalar(isa_restore, act, dtype):
    """act_derivatives (orders 0..4) from every SIMD build against the scalar build (libm). They
    differ by the math library's rounding (SLEEF: <= 1 ulp, erfc 1.5) and FMA contraction; per
    entry: relative 64 eps of the entry, or absolute 64 eps of that order's scale (an entry that
    is a small difference of O(scale) terms)."""
    name, a, b = NAMES[_spec_of(act)[0]], _spec_of(act)[1], _spec_of(act)[2]
    z = Z_GRID.to(dtype)
    z = torch.cat([z, torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)])
    C = ops._C
    C.set_cpu_isa("scalar")
    want = _ops.act_derivatives(z, name, a, b, [0, 1, 2, 3, 4])
    eps = torch.finfo(dtype).eps
    for isa in _isas():
        C.set_cpu_isa(isa)
        got = _ops.act_derivatives(z, name, a, b, [0, 1, 2, 3, 4])
        assert torch.equal(got.isnan(), want.isnan()), isa
        assert torch.equal(got.isinf(), want.isinf()) and torch.equal(got[got.isinf()], want[want.isinf()]), isa
        fin = want.isfinite()
        for k in range(5):
            f = fin[k]
            g_, w_ = got[k][f].double(), want[k][f].double()
            scale = w_.abs().max().item()
            bound = 64 * eps * torch.maximum(w_.abs(), torch.full_like(w_, scale))
            bad = (g_ - w_).abs() > bound
            # relative to the entry itself unless it is far below the order's scale
            rel_ok = (g_ - w_).abs() <= 64 * eps * w_.abs() + 64 * eps * scale
            assert rel_ok.all() and not bad.any(), (isa, k, z[f][~rel_ok][:5], g_[~rel_ok][:5], w_[~rel_ok][:5])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("act", SMOOTH, ids=lambda a: a.label)
def test_simd_mlp_jet_matches_scalar(isa_restore, act, dtype):
    """The fused layer kernels, forward and backward, from every SIMD build against the scalar
    build: float64 1e-13, float32 1e-5 of the scale (three layers of ulp-level differences)."""
    net = Net(3, [33, 17, 2], [act, act, None], seed=12, dtype=dtype)  # 33, 17: partial vectors
    x = _x(13, 3, dtype=dtype)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    res = {}
    for isa in _isas():
        ops._C.set_cpu_isa(isa)
        for diag in (False, True):
            out, _ = net.call(x, axes=[0, 1, 2], diag=diag, grad_rows=True, chunk=5, save=True)
            grads = torch.autograd.grad(_functional(out), net.params())
            res[(isa, diag)] = [out.detach()] + list(grads)
    for (isa, diag), vals in res.items():
        for i, (a, b) in enumerate(zip(vals, res[("scalar", diag)])):
            _check(a.double(), b.double(), tol, what=f"{isa} diag={diag} item {i}")


# ---- the op's contract ------------------------------------------------------------------------


def test_opcheck():
    net = Net(3, [5, 4, 2], [T, S, None], seed=13)
    x = _x(6, 3).requires_grad_()
    bs = [b for b in net.b]
    args = (x, net.W, bs, net.ids, net.pa, net.pb, None, [0, 1, 2], [0, 2], True, True, 0, True)
    torch.library.opcheck(_ops.mlp_jet.default, args)
    with torch.no_grad():
        out, saved = _ops.mlp_jet(*args)
    bargs = (torch.randn_like(out), x.detach(), [W.detach() for W in net.W], [b.detach() for b in bs], net.ids, net.pa,
             net.pb, None, [0, 1, 2], [0, 2], True, True, 0, saved, True)
    torch.library.opcheck(_ops.mlp_jet_backward.default, bargs)


@pytest.mark.skipif(not ops.COMPILED, reason="compares the reference kernel with the compiled mlp_jet kernel")
def test_reference_kernel_matches_compiled():
    """The pure-PyTorch kernel (devices without a compiled one, or no extension) gives the same
    rows and gradients."""
    net = Net(3, [6, 5, 2], [G, T, None], seed=14)
    x = _x(8, 3)
    bs = [b if b is not None else x.new_empty(0) for b in net.b]
    a = (x, net.W, bs, net.ids, net.pa, net.pb, None, [0, 1, 2], [0, 1, 2], True, True, 0, True)
    with torch.no_grad():
        got, _ = fused._ref_jet(*a)
        want, saved = _ops.mlp_jet(*a)
    _check(got, want, 1e-13, what="reference rows")
    gout = torch.randn_like(want)
    ref = fused._ref_jet_backward(gout, x, net.W, bs, net.ids, net.pa, net.pb, None, [0, 1, 2], [0, 1, 2], True, True, 0,
                                  saved, True)
    comp = _ops.mlp_jet_backward(gout, x, [W.detach() for W in net.W], [b.detach() for b in bs], net.ids, net.pa, net.pb,
                                 None, [0, 1, 2], [0, 1, 2], True, True, 0, saved, True)
    _check(ref[0], comp[0], 1e-12, what="gx")
    for u, v in zip(ref[1] + ref[2], comp[1] + comp[2]):
        _check(u, v, 1e-12, what="gW/gb")


@pytest.mark.parametrize(
    "change, exc, pattern",
    [
        (lambda a: a.update(x=a["x"].float()), TypeError, "weight 0 must have x's dtype"),
        (lambda a: a.update(x=a["x"][:, :2].contiguous()), ValueError, r"weight 0 must be a contiguous \(out, 2\)"),
        (lambda a: a.update(acts=[1, 99, -1]), ValueError, r"acts\[1\] = 99 is not an activation id"),
        (lambda a: a.update(acts=[-1, -1, -1]), ValueError, "no activation"),
        (lambda a: a.update(acts=[1, 1]), ValueError, "one entry per layer"),
        (lambda a: a.update(sel=[0, 0]), ValueError, "distinct direction indices"),
        (lambda a: a.update(sel=[]), ValueError, "sel is empty"),
        (lambda a: a.update(axes=[0, 5]), ValueError, r"axes must lie in \[0, 3\)"),
        (lambda a: a.update(axes=[]), ValueError, "at least one direction"),
        (lambda a: a.update(V=torch.ones(3, 2, dtype=torch.float64)), ValueError, "either V or axes"),
        (lambda a: a.update(axes=[], V=torch.ones(2, 2, dtype=torch.float64)), ValueError, r"V must be \(d, K\)"),
        (lambda a: a.update(bs=[torch.zeros(5, dtype=torch.float64)] + a["bs"][1:]), ValueError, "bias 0 must be a contiguous"),
        (lambda a: a.update(chunk=-1), ValueError, "chunk must be >= 0"),
        (lambda a: a.update(pa=[0.0, 0.0, 0.0], acts=[3, 1, -1]), ValueError, "softplus needs beta != 0"),
        (lambda a: a.update(x=a["x"].t()), ValueError, "contiguous"),
    ],
)
def test_bad_arguments(change, exc, pattern):
    net = Net(3, [4, 5, 1], [T, T, None], seed=15)
    x = _x(5, 3)
    a = dict(x=x, W=[W.detach() for W in net.W], bs=[b.detach() for b in net.b], acts=net.ids, pa=net.pa, pb=net.pb,
             V=None, axes=[0, 1, 2], sel=[0, 1, 2], chunk=0)
    change(a)
    with pytest.raises(exc, match=pattern):
        _ops.mlp_jet(a["x"], a["W"], a["bs"], a["acts"], a["pa"], a["pb"], a["V"], a["axes"], a["sel"], False, False,
                     a["chunk"], False)


def test_inf_weight_does_not_spill_into_other_axes():
    """Along coordinate axes the first layer's rows are W0's columns: an inf in W0[:, 2] leaves the
    rows of axes 0 and 1 finite (V^T W0^T would multiply it by the identity's zeros: NaN)."""
    net = Net(3, [4, 1], [T, None], seed=16)
    with torch.no_grad():
        net.W[0][1, 2] = float("inf")
    x = _x(4, 3).abs()  # x_2 > 0: unit 1 saturates at +1
    with torch.no_grad():
        out, _ = net.call(x, axes=[0, 1, 2], diag=True, grad_rows=True)
    S_and_J = out[1:]
    assert torch.isfinite(S_and_J[[0, 1, 3, 4]]).all()  # axes 0, 1: second-order and gradient rows
    # and equal to the network with that unit replaced by its limit (tanh(+inf) = 1, flat)
    lim = Net(3, [4, 1], [T, None], seed=16)
    with torch.no_grad():
        lim.W[0][1] = 0.0
        lim.b[0][1] = 1000.0
        want, _ = lim.call(x, axes=[0, 1, 2], diag=True, grad_rows=True)
    _check(out[[0, 1, 2, 4, 5]], want[[0, 1, 2, 4, 5]], what="saturated unit")


@NEEDS_COMPILED_FUSED
def test_engine_uses_the_fused_op_where_it_applies(monkeypatch):
    """The engine's choice: sums with K no larger than the first width, diagonals up to
    FUSED_DIAG_MAX_K directions, always with the table's activations; never for mixed partials
    or registered user activations."""
    calls = []
    real = fused.run
    monkeypatch.setattr(fused, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x = _x(5, 3)
    for f in (thd.mlp_laplacian, thd.mlp_hessian_diag, lambda m, x: thd.mlp_derivatives(m, x).second):
        calls.clear()
        f(model, x)
        assert calls == [1]
    calls.clear()
    thd.mlp_mixed_partials(model, x, [(0, 1)])
    assert calls == []
    wide = nn.Sequential(nn.Linear(12, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    thd.mlp_laplacian(wide, _x(3, 12))  # K = 12 > width 4: compressed to 4 directions
    assert calls == [1]
    calls.clear()
    thd.mlp_hessian_diag(wide, _x(3, 12))  # 12 > FUSED_DIAG_MAX_K
    thd.mlp_derivatives(wide, _x(3, 12))  # the gradient needs all 12 first-order rows
    assert calls == []


# d larger than the width at the first activation: the sum's directions are compressed to that
# width (engine._row_space_directions) -- whole-API results against torch.func, with gradients
COMPRESS = {
    "plain": (12, [4, 5, 1], [T, S, None]),
    "first layers linear": (15, [9, 3, 6, 2], [None, G, T, None]),
    "d 40": (40, [6, 6, 1], [SP, T, None]),
}


def _model(d, widths, acts, _bias, seed):
    """nn.Sequential of Linear layers (widths[-1] outputs) and torch.nn / drop-in activations."""
    g = torch.Generator().manual_seed(seed)
    layers, dims = [], [d] + list(widths)
    for i, a in enumerate(acts):
        lin = nn.Linear(dims[i], dims[i + 1]).double()
        with torch.no_grad():
            bound = 1.3 / math.sqrt(dims[i])
            lin.weight.copy_((torch.rand(lin.weight.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound)
            lin.bias.copy_((torch.rand(lin.bias.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound)
        layers.append(lin)
        if a is not None:
            layers.append(a.module())
    return nn.Sequential(*layers).double()


@NEEDS_COMPILED_FUSED
@pytest.mark.parametrize("name", list(COMPRESS))
@pytest.mark.parametrize("dims", ["all", "subset"])
def test_compressed_sums_match_torch_func(monkeypatch, name, dims):
    d, widths, acts = COMPRESS[name]
    calls = []
    real = fused.run
    monkeypatch.setattr(fused, "run", lambda *a, **k: calls.append(a[2].shape) or real(*a, **k))
    model = _model(d, widths, acts, None, seed=5)
    x = _x(7, d, seed=2).requires_grad_(True)
    sel = list(range(d)) if dims == "all" else [d - 1, 0, 3, 2, 5, 7, 9]
    got = thd.mlp_laplacian(model, x, dims=None if dims == "all" else sel)
    first = next(w for w, a in zip(widths, acts) if a is not None)
    assert calls and calls[0] == (d, min(len(sel), first)), calls  # V: (d, r) directions
    H = func_hessian(model, x.detach())  # (N, m, d, d)
    want = H[..., sel, sel].sum(-1)
    _check(got, want, what=f"{name} lap")
    # training: gradients to every weight and bias and to x, against nested autograd's
    loss = (got ** 2).sum()
    params = [p for p in model.parameters()] + [x]
    g_got = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    monkeypatch.setattr(engine, "FUSED_ENABLED", False)  # the reverse sweep, itself tested vs torch.func
    lap_ref = thd.mlp_laplacian(model, x, dims=None if dims == "all" else sel)
    g_ref = torch.autograd.grad((lap_ref ** 2).sum(), params, allow_unused=True, materialize_grads=True)
    for a, b in zip(g_got, g_ref):
        _check(a, b, tol=TOL_GRAD, what=f"{name} grad")


def test_compressed_weighted_laplacian_general_directions(monkeypatch):
    """mlp_weighted_laplacian with A = B B^T of rank 9 > width 4: compressed, exact."""
    model = _model(10, [4, 3, 1], [T, G, None], None, seed=3)
    x = _x(6, 10, seed=4)
    g = torch.Generator().manual_seed(0)
    B = torch.randn(10, 9, generator=g, dtype=torch.float64)
    A = B @ B.T
    got = thd.mlp_weighted_laplacian(model, x, A)
    H = func_hessian(model, x)
    want = (H * A).sum((-1, -2))
    _check(got, want, what="weighted")


def test_compression_skipped_for_non_finite_first_layer():
    """An inf in the first layer's weights: no QR of inf (the reverse sweep takes the call)."""
    model = nn.Sequential(nn.Linear(6, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    with torch.no_grad():
        model[0].weight[0, 5] = math.inf
    net = engine.fused_net(engine.parse_mlp(model, "test"))
    assert engine._row_space_directions(net, None, list(range(6)), 6) is None


@pytest.mark.skipif(not ops.COMPILED, reason="the buffer pool (csrc/buffer_pool.h) belongs to the compiled extension")
def test_saved_buffers_reused_across_steps_and_released():
    """Training steps of the same shape reuse the saved-row buffers (no new allocation once the
    previous step's graph is gone); a graph still alive keeps its buffers out of reach;
    empty_cache() releases the pool."""
    net = Net(3, [16, 16, 1], [T, S, None], seed=17)
    x = _x(40, 3)

    def step():
        out, saved = net.call(x, axes=[0, 1, 2], save=True)
        ptrs = [t.data_ptr() for t in saved[:-1] if t.numel()]
        torch.autograd.grad(_functional(out), net.params())
        return ptrs

    thd.empty_cache()
    first = step()
    assert thd.backend_info()["cache_bytes"] > 0
    assert step() == first  # the same buffers again
    out, saved = net.call(x, axes=[0, 1, 2], save=True)  # graph alive: its buffers are busy
    held = [t.data_ptr() for t in saved[:-1] if t.numel()]
    assert not set(held) & set(step())
    del out, saved
    assert thd.empty_cache() > 0 and thd.backend_info()["cache_bytes"] == 0
