"""The C++ autograd of the activation ops (csrc/act_autograd.h), as the drop-ins use it.

* Exactness: four nested torch.autograd.grad calls through each drop-in module, at points out to
  |z| = 600, against mpmath (the stable tails), float64; a PINN training step through a
  converted MLP (loss on the nested-autograd Laplacian, backward to the weights) against the
  same step through torch's own functions, for every activation of the table, float64.
* The derivative table is evaluated once per activation, not once per visit: a d-dimensional
  nested-autograd Hessian diagonal (and a training step) runs act_derivatives exactly once per
  activation layer and no other table op; every later visit is arithmetic (mul, mul_pair,
  mul_pair_backward) -- counted with a TorchDispatchMode, which sees the ops the C++ nodes call.
* Autograd hygiene: in-place modification of the saved input is detected, backward twice
  without retain_graph raises torch's message, the nodes' names.
* The ops added for it: mul_pair_backward and act_beyond_table (opcheck, gradcheck, bad input).
* Training through the drop-ins against torch.nn in float64, with the derivative values cached
  per graph node (the last section; was tests/test_dropin_training.py).
"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torchhessdiag
import torchhessdiag as thd
import torchhessdiag.nn as thnn
from torchhessdiag import ops
from torchhessdiag.activations import make_spec

from _helpers import mp_derivatives_many

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:torchhessdiag. second and higher derivatives"),
]
_ops = torch.ops.torchhessdiag
EPS64 = torch.finfo(torch.float64).eps
COMPILED = pytest.mark.skipif(not ops.COMPILED, reason="the C++ autograd belongs to the compiled extension")
# forward-mode AD is set by the C++ Autograd kernels; the reference backend's torch.library autograd
# has backward formulas only (its tangents are None / zero, as every register_autograd op's)
FORWARD_AD = pytest.mark.skipif(not ops.COMPILED, reason="forward-mode AD through the ops needs the compiled "
                                "extension (torch.library.register_autograd has no forward-mode formulas)")


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


# drop-in -> the same function in torch ops (the oracle of the training-step test)
DROPINS = {
    "tanh": (thnn.Tanh, torch.tanh),
    "sigmoid": (thnn.Sigmoid, torch.sigmoid),
    "softplus_b2_t5": (lambda: thnn.Softplus(2.0, 5.0), lambda x: nn.functional.softplus(x, 2.0, 5.0)),
    "silu": (thnn.SiLU, nn.functional.silu),
    "gelu": (thnn.GELU, nn.functional.gelu),
    "gelu_tanh": (lambda: thnn.GELU("tanh"), lambda x: nn.functional.gelu(x, approximate="tanh")),
    "sin_3": (lambda: thnn.Sine(3.0), lambda x: torch.sin(3.0 * x)),
    "cos_2.5": (lambda: thnn.Cosine(2.5), lambda x: torch.cos(2.5 * x)),
    "exp": (thnn.Exp, torch.exp),
    "elu_0.7": (lambda: thnn.ELU(0.7), lambda x: nn.functional.elu(x, 0.7)),
    # CELU through its exact formula (torch's own CELU backward is float32-accurate only)
    "celu_0.7": (lambda: thnn.CELU(0.7), lambda x: torch.where(x > 0, x, 0.7 * torch.expm1(x.clamp(max=0) / 0.7))),
}


def _nested(module, z, n):
    """[f(z), f'(z), ..., f^(n)(z)] by nested torch.autograd.grad through the module."""
    zz = z.detach().clone().requires_grad_(True)
    y = module(zz)
    out, cur = [y.detach()], y
    for _ in range(n):
        (cur,) = torch.autograd.grad(cur.sum(), zz, create_graph=True)
        out.append(cur.detach())
    return torch.stack(out)


# ---- exactness: the stable tails through nested autograd ------------------------------------------

TAIL_POINTS = [-600.0, -300.0, -100.0, -37.0, -20.0, -3.3, -0.7, 0.0, 0.45, 2.2, 10.0, 30.0, 100.0, 300.0, 600.0]
SMOOTH_SPECS = {
    "tanh": make_spec("tanh"), "sigmoid": make_spec("sigmoid"), "silu": make_spec("silu"),
    "gelu": make_spec("gelu"), "gelu_tanh": make_spec("gelu_tanh"),
    "softplus_b2": make_spec("softplus", beta=2.0, threshold=1e4),
    "sin_3": make_spec("sin", w=3.0), "exp": make_spec("exp"),
}
MODULE_OF = {
    "tanh": thnn.Tanh, "sigmoid": thnn.Sigmoid, "silu": thnn.SiLU, "gelu": thnn.GELU,
    "gelu_tanh": lambda: thnn.GELU("tanh"), "softplus_b2": lambda: thnn.Softplus(2.0, 1e4),
    "sin_3": lambda: thnn.Sine(3.0), "exp": thnn.Exp,
}


@pytest.mark.parametrize("name", list(SMOOTH_SPECS))
def test_four_nested_grads_through_dropin_match_mpmath_in_the_tails(name, device):
    """Orders 1..4 by nested autograd through the drop-in, float64, against mpmath (50 digits):
    |ours - true| <= 1e-13 |true| + 4 eps |z| |f^(n+1)| + 1e-290 -- test_table.py's tolerance for
    the table itself (see mp_tolerance there): the nested-autograd chain multiplies the table's
    values by exact ones, so it must keep the table's accuracy. torch.nn's nested autograd gives
    0 or NaN at most of these points (tanh''(20) = -3.4e-17, not -0). Order 0 is torch's own
    function, bit for bit (tested in test_nn.py); it is not held to mpmath here (torch's gelu(-20)
    is -0.0, softplus(600, beta=2) overflows to inf)."""
    spec = SMOOTH_SPECS[name]
    pts = TAIL_POINTS  # exp(600) = 3.8e260: finite in float64
    z = torch.tensor(pts, dtype=torch.float64, device=device)
    true = mp_derivatives_many(spec, pts, 5).to(device)
    ours = _nested(MODULE_OF[name](), z, 4)
    tol = 1e-13 * true[1:5].abs() + 4 * EPS64 * z.abs() * true[2:].abs() + 1e-290
    bad = ~((ours[1:] - true[1:5]).abs() <= tol)
    idx = bad.nonzero()[:5].tolist()
    assert not bad.any(), [(n + 1, pts[i], ours[n + 1, i].item(), true[n + 1, i].item()) for n, i in idx]


# ---- exactness: a training step through a converted MLP ------------------------------------------


def _mlp(act_factory, d, w, depth, seed):
    torch.manual_seed(seed)
    layers, fan = [], d
    for _ in range(depth):
        layers += [nn.Linear(fan, w), act_factory()]
        fan = w
    layers.append(nn.Linear(fan, 1))
    return nn.Sequential(*layers).double()


def _pinn_step(model, x):
    """Weight gradients of mean((lap - 1)^2), lap by nested autograd (create_graph on every level)."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    lap = sum(torch.autograd.grad(g[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(x.shape[1]))
    loss = ((lap - 1.0) ** 2).mean()
    return torch.autograd.grad(loss, list(model.parameters()), allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("name", list(DROPINS))
def test_training_step_through_dropins_matches_torch_functions(name, device):
    """1e-10 relative to the largest entry of each gradient (the standard of the suite for float64
    against torch: the two sides round differently, ~1e-14 observed)."""
    dropin, fn = DROPINS[name]
    model = _mlp(dropin, 3, 12, 3, seed=5).to(device)
    ref = _mlp(lambda: Fn(fn), 3, 12, 3, seed=5).to(device)
    x = (torch.rand(9, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 2 - 1).to(device)
    for ours, theirs in zip(_pinn_step(model, x), _pinn_step(ref, x)):
        scale = theirs.abs().max().clamp_min(1e-300)
        assert ((ours - theirs).abs().max() / scale).item() <= 1e-10


# ---- the table once per activation ---------------------------------------------------------------


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@COMPILED
@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_table_evaluated_once_per_activation(train):
    """d = 5 input dimensions, 3 activation layers: the table runs 3 times (sigma', sigma'',
    sigma''' in one pass each, at the first create_graph backward), not once per visit (the
    Python autograd before this ran it per node: 3 + 3 per loop). No act_grad (it evaluates the
    table per call) on this path."""
    model = _mlp(thnn.SiLU, 5, 8, 3, seed=1)
    if not train:
        model.requires_grad_(False)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    with OpCounter() as c:
        (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        lap = sum(torch.autograd.grad(g[:, i].sum(), x, retain_graph=True, create_graph=train)[0][:, i]
                  for i in range(5))
        if train:
            ((lap - 1) ** 2).mean().backward()
    assert c.counts["act_derivatives"] == 3, c.counts
    assert c.counts["act_grad"] == 0, c.counts
    assert c.counts["act_forward"] == 3
    assert c.counts["mul_pair"] >= 5 * 2  # the fused double backward, per visit
    if train:
        assert c.counts["mul_pair_backward"] >= 5 * 2  # the fused triple backward


@COMPILED
@pytest.mark.parametrize("act", [thnn.ReLU, thnn.Identity, thnn.Exp], ids=["relu", "identity", "exp"])
def test_no_table_work_where_none_is_needed(act):
    """ReLU/Identity: derivatives of order >= 2 are identically 0 -- the products with sigma'',
    sigma''' are zeros without a graph (no mul_pair, no mul_pair_backward; torch's own
    threshold_backward does the same), and g sigma' is one fused act_grad pass per visit (sigma'
    is a compare: nothing worth keeping). exp: every derivative is the forward's output. No
    act_derivatives pass for any of them. Training step, d = 4, 3 activation layers."""
    model = _mlp(act, 4, 8, 3, seed=3)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    with OpCounter() as c:
        (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        lap = sum(torch.autograd.grad(g[:, i].sum(), x, create_graph=True, allow_unused=True,
                                      materialize_grads=True)[0][:, i] for i in range(4))
        loss = ((lap - 1) ** 2).mean()
        if loss.requires_grad:
            loss.backward()
    assert c.counts["act_derivatives"] == 0, c.counts
    if act is not thnn.Exp:
        assert c.counts["act_grad"] >= 3 * 5, c.counts
        assert c.counts["mul_pair"] == 0 and c.counts["mul_pair_backward"] == 0, c.counts


@COMPILED  # (the reference backend's autograd computes exp's derivatives from z: nothing to detect)
def test_exp_output_modified_in_place_is_detected(device):
    x = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    y = thnn.Exp()(x * 0.5)
    y.mul_(2.0)  # the saved output (every derivative of exp) changed
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y.sum(), x)


# ---- forward-mode AD (torch.autograd.forward_ad, torch.func.jvp / jacfwd) ----------------------------


@FORWARD_AD
@pytest.mark.parametrize("name", list(DROPINS))
def test_forward_ad_through_dropins(name, device):
    """Tangent of the output (jvp) and, forward over reverse, of the gradient (the Hessian-vector
    product H v) through a converted MLP, against torch.func on the same model written with torch
    functions; float64, 1e-11 of the largest entry. Before the C++ autograd the tangents came back
    None (forward_ad) or silently zero (torch.func.jvp of thd.activation)."""
    import torch.autograd.forward_ad as fwAD

    dropin, fn = DROPINS[name]
    model = _mlp(dropin, 3, 10, 2, seed=8).to(device).requires_grad_(False)
    ref = _mlp(lambda: Fn(fn), 3, 10, 2, seed=8).to(device).requires_grad_(False)
    gen = torch.Generator().manual_seed(9)
    x = (torch.rand(7, 3, generator=gen, dtype=torch.float64) * 2 - 1).to(device)
    v = torch.randn(7, 3, generator=gen, dtype=torch.float64).to(device)
    f = lambda xi: ref(xi).squeeze(-1)  # noqa: E731
    jvp_ref = torch.func.vmap(lambda xi, vi: torch.func.jvp(f, (xi,), (vi,))[1])(x, v)
    hvp_ref = torch.func.vmap(lambda xi, vi: torch.func.hessian(f)(xi) @ vi)(x, v)
    with fwAD.dual_level():
        xd = fwAD.make_dual(x.clone().requires_grad_(True), v)
        u = model(xd)
        (g,) = torch.autograd.grad(u.sum(), xd)
        jvp, hvp = fwAD.unpack_dual(u).tangent[:, 0], fwAD.unpack_dual(g).tangent
    for ours, theirs, what in ((jvp, jvp_ref, "jvp"), (hvp, hvp_ref, "hvp")):
        assert ours is not None, what
        scale = theirs.abs().max().clamp_min(1e-300)
        assert ((ours - theirs).abs().max() / scale).item() <= 1e-11, what


@FORWARD_AD
@pytest.mark.parametrize("spec", [make_spec("tanh"), make_spec("gelu"), make_spec("softplus", beta=2.0, threshold=5.0),
                                  make_spec("sin", w=3.0), make_spec("exp")], ids=str)
def test_torch_func_forward_mode_of_activation(spec, device):
    """torch.func.jvp / jacfwd(jacfwd) / jacrev(jacfwd) of thd.activation (an op call, no drop-in
    module to switch to torch's function): sigma', sigma'' from the table, to 1e-13."""
    z = torch.linspace(-3, 3, 9, dtype=torch.float64, device=device)
    f = lambda t: torchhessdiag.activation(t, spec.name, **spec.params)  # noqa: E731
    D = torchhessdiag.activation_derivatives(z, spec.name, order=2, **spec.params)
    (_, t1) = torch.func.jvp(f, (z,), (torch.ones_like(z),))
    torch.testing.assert_close(t1, D[1], rtol=1e-13, atol=1e-13)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap's "no batching rule" performance warning
        h_ff = torch.einsum("iii->i", torch.func.jacfwd(torch.func.jacfwd(f))(z))
        h_rf = torch.einsum("iii->i", torch.func.jacrev(torch.func.jacfwd(f))(z))
    torch.testing.assert_close(h_ff, D[2], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(h_rf, D[2], rtol=1e-13, atol=1e-13)


@FORWARD_AD
def test_forward_ad_of_the_ops(device):
    """Tangents of act_grad (both arguments dual, k = 4: the z-part leaves the table) and
    act_derivatives, against the formulas."""
    import torch.autograd.forward_ad as fwAD

    z = _rand(6, device, 20)
    g = _rand(6, device, 21)
    tz, tg = _rand(6, device, 22), _rand(6, device, 23)
    D = torchhessdiag.activation_derivatives(z, "sin", orders=[0, 1, 2, 3, 4, 5], w=3.0)
    with fwAD.dual_level():
        out = _ops.act_grad(fwAD.make_dual(g, tg), fwAD.make_dual(z, tz), "sin", 3.0, 0.0, 4)
        t = fwAD.unpack_dual(out).tangent
        Dd = _ops.act_derivatives(fwAD.make_dual(z, tz), "sin", 3.0, 0.0, [0, 2])
        tD = fwAD.unpack_dual(Dd).tangent
    torch.testing.assert_close(t, tg * D[4] + g * D[5] * tz, rtol=1e-12, atol=1e-12 * 3.0**5)
    torch.testing.assert_close(tD, torch.stack([D[1] * tz, D[3] * tz]), rtol=1e-13, atol=1e-13 * 27)


# ---- autograd hygiene ------------------------------------------------------------------------------


@COMPILED
def test_node_names():
    z = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = thnn.Tanh()(z)
    assert y.grad_fn.name() == "ThdActivationBackward"
    (g,) = torch.autograd.grad(y.sum(), z, create_graph=True)
    assert g.grad_fn.name() == "ThdActGradBackward"
    assert g.grad_fn.next_functions[1][0] is z.grad_fn or g.grad_fn.next_functions[1][0] is not None
    D = _ops.act_derivatives(z, "tanh", 0.0, 0.0, [1, 2])
    assert D.grad_fn.name() == "ThdActDerivativesBackward"


def test_inplace_change_of_the_input_is_detected(device):
    x = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    z = x * 2.0
    y = thnn.SiLU()(z)
    z.add_(1.0)  # the activation's input changed after it was saved
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_backward_twice_without_retain_graph_raises(device):
    x = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    y = thnn.GELU()(x * 1.5)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()


def test_first_order_training_matches_torch(device):
    """Plain training (one backward, no create_graph) through a converted model: same gradients as
    torch.nn to 1e-13 (sigma' from the stable table vs torch's formula)."""
    ref = _mlp(nn.Tanh, 4, 16, 2, seed=2).to(device)
    model = thnn.convert(ref)
    x = torch.randn(10, 4, dtype=torch.float64, device=device)
    ga = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    gb = torch.autograd.grad(ref(x).square().sum(), list(ref.parameters()))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13 * b.abs().max().item())


# ---- the ops added for the C++ autograd --------------------------------------------------------------


def _rand(n, device, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


@pytest.mark.parametrize("present", ["both", "g1", "g2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_mul_pair_backward_opcheck(present, dtype, device):
    args = [_rand(12, device, s, dtype).reshape(3, 4).t().requires_grad_(True) for s in range(7)]  # non-contiguous
    if present == "g2":
        args[0] = None
    if present == "g1":
        args[1] = None
    torch.library.opcheck(_ops.mul_pair_backward, args)


def test_mul_pair_backward_values_and_gradcheck(device):
    args = [_rand(7, device, 10 + s).requires_grad_(True) for s in range(7)]
    g1, g2, w, g, d1, d2, d3 = args
    ow, og, oz = _ops.mul_pair_backward(*args)
    torch.testing.assert_close(ow, g1 * d1 + g2 * g * d2, rtol=1e-15, atol=0)
    torch.testing.assert_close(og, g2 * w * d2, rtol=1e-15, atol=0)
    torch.testing.assert_close(oz, w * (g1 * d2 + g2 * g * d3), rtol=1e-15, atol=0)
    assert torch.autograd.gradcheck(lambda *a: _ops.mul_pair_backward(*a), args)
    assert torch.autograd.gradgradcheck(lambda *a: _ops.mul_pair_backward(*a), args)
    ow, og, oz = _ops.mul_pair_backward(None, g2, w, g, d1, d2, d3)
    torch.testing.assert_close(ow, g2 * g * d2, rtol=1e-15, atol=0)


def test_mul_pair_backward_bad_input_names_the_argument(device):
    x = _rand(5, device, 1)
    with pytest.raises(TypeError, match=r"\bd3\b.*float32"):
        _ops.mul_pair_backward(x, x, x, x, x, x, x.to(torch.int32))
    with pytest.raises(ValueError, match=r"\bg1\b.*shape"):
        _ops.mul_pair_backward(_rand(4, device, 2), x, x, x, x, x, x)
    with pytest.raises(TypeError, match=r"\bg2\b.*dtype"):
        _ops.mul_pair_backward(x, x.float(), x, x, x, x, x)


@pytest.mark.parametrize("n", [2, 5, 6])
def test_act_beyond_table(n, device):
    """sigma^(n) by the exact composite path (the table where it reaches): sin^(n)(3z) =
    3^n sin(3z + n pi/2); differentiable (its derivative is sigma^(n+1))."""
    import math

    z = _rand(6, device, 3).requires_grad_(True)
    d = _ops.act_beyond_table(z, "sin", 3.0, 0.0, n)
    torch.testing.assert_close(d, 3.0**n * torch.sin(3 * z + n * math.pi / 2), rtol=1e-13, atol=1e-13 * 3.0**n)
    (dd,) = torch.autograd.grad(d.sum(), z)
    torch.testing.assert_close(dd, 3.0 ** (n + 1) * torch.sin(3 * z + (n + 1) * math.pi / 2), rtol=1e-12,
                               atol=1e-12 * 3.0 ** (n + 1))


def test_act_beyond_table_bad_input(device):
    x = _rand(3, device, 4)
    with pytest.raises(ValueError, match="order"):
        _ops.act_beyond_table(x, "tanh", 0.0, 0.0, -1)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        _ops.act_beyond_table(x, "swish", 0.0, 0.0, 5)
    with pytest.raises(TypeError, match=r"\bz\b.*float32"):
        _ops.act_beyond_table(x.to(torch.int64), "tanh", 0.0, 0.0, 5)


# ---- the CPU buffer pool the ops' outputs come from (csrc/buffer_pool.h) ---------------------------


@COMPILED
def test_op_outputs_reuse_only_free_buffers():
    """An output nobody holds any more is handed out again (no fresh pages); one still held never
    is: the kept tensor keeps its values while later calls write theirs."""
    z = torch.linspace(-3, 3, 5000, dtype=torch.float64)
    g = torch.linspace(1, 2, 5000, dtype=torch.float64)
    torchhessdiag.empty_cache()
    kept = _ops.act_derivatives(z, "tanh", 0.0, 0.0, [1, 2])
    before = kept.clone()
    p_kept = kept.data_ptr()
    for _ in range(3):  # same size, while `kept` is alive: other buffers, `kept` untouched
        other = _ops.act_derivatives(-z, "tanh", 0.0, 0.0, [1, 2])
        assert other.data_ptr() != p_kept
    assert torch.equal(kept, before)
    del kept
    again = _ops.act_derivatives(z, "tanh", 0.0, 0.0, [1, 2])
    assert torch.equal(again, before)
    o1, o2 = _ops.mul_pair(z, g, z, g)
    assert o1.data_ptr() != o2.data_ptr() and again.data_ptr() not in (o1.data_ptr(), o2.data_ptr())
    torch.testing.assert_close(o1, z * z, rtol=0, atol=0)
    torch.testing.assert_close(o2, z * g * g, rtol=0, atol=0)
    assert torchhessdiag.backend_info()["cache_bytes"] > 0
    assert torchhessdiag.empty_cache() > 0 and torchhessdiag.backend_info()["cache_bytes"] == 0


def _storage_refs(t: torch.Tensor) -> int:
    st = t.untyped_storage()  # (this Python storage holds one reference itself)
    return torch._C._storage_Use_Count(st._cdata)


@COMPILED
def test_pooled_outputs_are_held_by_their_tensor_alone():
    """The pool holds no reference to a storage it handed out: a pooled output's storage is
    referenced as often as a plain tensor's. (The autograd engine sums two gradients of one input in
    place only when it holds the last reference to the storage; a pool keeping a reference made
    every such sum allocate a fresh tensor.) After empty_cache a tensor in use keeps its values, and
    its block is freed, not kept, when it goes."""
    z = torch.linspace(-3, 3, 5000, dtype=torch.float64)
    plain = z * 2
    o1, o2 = _ops.mul_pair(z, z, z, z)
    d = _ops.act_derivatives(z, "tanh", 0.0, 0.0, [1, 2])
    for t in (o1, o2, d):
        assert _storage_refs(t) == _storage_refs(plain) == 2
    before = o1.clone()
    torchhessdiag.empty_cache()
    assert torchhessdiag.backend_info()["cache_bytes"] == 0
    _ops.mul_pair(-z, z, z, z)  # a new block, not o1's
    assert torch.equal(o1, before)
    del o1, o2, d
    torchhessdiag.empty_cache()
    assert torchhessdiag.backend_info()["cache_bytes"] == 0


@COMPILED
def test_profiler_sees_pooled_outputs_allocated_and_freed():
    """profile_memory counts a pooled output as allocated while a tensor holds it and freed when it
    goes (live tensor bytes, as for torch's own CPU tensors), whether the block is new or reused."""
    from torch.profiler import ProfilerActivity, profile

    z = torch.linspace(-3, 3, 5000, dtype=torch.float64)
    nbytes = z.numel() * 8
    for _ in range(2):  # the second round reuses the first round's blocks
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            o1, o2 = _ops.mul_pair(z, z, z, z)
            del o1
        events = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage]
        assert sum(m for m in events if m > 0) == 2 * nbytes
        assert sum(m for m in events if m < 0) == -nbytes
        del o2


@COMPILED
def test_repeated_nested_autograd_is_bitwise_stable_with_pooled_buffers():
    """The same nested-autograd training step, run repeatedly (so the pool hands the previous
    steps' buffers out again), gives bit-identical Hessian diagonals and weight gradients."""
    torch.manual_seed(3)
    model = thnn.convert(nn.Sequential(nn.Linear(3, 24), nn.Tanh(), nn.Linear(24, 24), nn.SiLU(),
                                       nn.Linear(24, 1))).double()
    x = torch.randn(200, 3, dtype=torch.float64)

    def step():
        model.zero_grad()
        xx = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xx).sum(), xx, create_graph=True)
        h = torch.stack([torch.autograd.grad(g[:, i].sum(), xx, create_graph=True)[0][:, i]
                         for i in range(3)], 1)
        (h.sum(1) ** 2).mean().backward()
        return h.detach(), torch.cat([p.grad.flatten() for p in model.parameters()
                                      if p.grad is not None])

    first = step()
    for _ in range(3):
        h, gw = step()
        assert torch.equal(h, first[0]) and torch.equal(gw, first[1])


# ---- training through drop-ins, derivative values cached per node (was tests/test_dropin_training.py) ---
# The drop-ins evaluate the derivative table once per autograd node and reuse the values on later
# passes through the same node (nested-autograd loops pass once per input dimension); every such
# path against torch.nn's own autograd in float64: the Hessian diagonal by nested autograd (second
# level without and with create_graph), parameter gradients of a PDE-style loss built with
# create_graph=True on every level (where a wrong backward of mul_pair once gave wrong gradients
# while values were right), third derivatives w.r.t. x through the same loop, gradcheck /
# gradgradcheck of mul_pair itself. Tolerance: 1e-12 relative to the largest entry (same float64
# expressions in a different order; observed <= 2e-15 relative).

TRAIN_ACTS = [nn.Tanh(), nn.SiLU(), nn.GELU(), nn.Softplus(beta=2.0), nn.Sigmoid(), nn.ELU(alpha=0.7)]
TRAIN_REL = 1e-12


def _act_mlp(act, d, w, depth, m, seed):
    torch.manual_seed(seed)
    layers = [nn.Linear(d, w), act]
    for _ in range(depth - 1):
        layers += [nn.Linear(w, w), act]
    layers += [nn.Linear(w, m)]
    return nn.Sequential(*layers).double()


def _hess_diag(model, x, create_graph):
    """d^2 (sum of outputs) / dx_i^2 by nested autograd: one grad, then one per input dim."""
    u = model(x).sum()
    (g,) = torch.autograd.grad(u, x, create_graph=True)
    cols = []
    for i in range(x.shape[1]):
        (h,) = torch.autograd.grad(g[:, i].sum(), x, retain_graph=True, create_graph=create_graph)
        cols.append(h[:, i])
    return torch.stack(cols, 1)


def _close(a, b):
    scale = b.abs().max().clamp_min(1e-300)
    assert ((a - b).abs().max() / scale).item() <= TRAIN_REL, ((a - b).abs().max() / scale).item()


@pytest.mark.parametrize("act", TRAIN_ACTS, ids=lambda a: type(a).__name__)
@pytest.mark.parametrize("create_graph", [False, True])
def test_hessian_diag_matches_torch_nn(device, act, create_graph):
    ref_model = _act_mlp(act, 3, 8, 2, 1, seed=0).to(device)
    model = thd.nn.convert(ref_model)
    x = torch.randn(5, 3, dtype=torch.float64, device=device)
    ref = _hess_diag(ref_model, x.clone().requires_grad_(), create_graph)
    ours = _hess_diag(model, x.clone().requires_grad_(), create_graph)
    _close(ours, ref)


@pytest.mark.parametrize("act", TRAIN_ACTS, ids=lambda a: type(a).__name__)
def test_training_gradients_match_torch_nn(device, act):
    ref_model = _act_mlp(act, 3, 8, 2, 2, seed=1).to(device)
    model = thd.nn.convert(ref_model)
    x = torch.randn(6, 3, dtype=torch.float64, device=device)

    def grads(mdl):
        loss = (_hess_diag(mdl, x.clone().requires_grad_(), True) ** 2).sum()
        return torch.autograd.grad(loss, list(mdl.parameters()), allow_unused=True, materialize_grads=True)

    for ours, ref in zip(grads(model), grads(ref_model)):
        _close(ours, ref)


@pytest.mark.parametrize("act", TRAIN_ACTS, ids=lambda a: type(a).__name__)
def test_third_derivative_through_the_loop(device, act):
    ref_model = _act_mlp(act, 2, 6, 2, 1, seed=2).to(device)
    model = thd.nn.convert(ref_model)
    x = torch.randn(4, 2, dtype=torch.float64, device=device)

    def third(mdl):
        xx = x.clone().requires_grad_()
        return torch.autograd.grad(_hess_diag(mdl, xx, True).sum(), xx)[0]

    _close(third(model), third(ref_model))


def test_repeated_passes_reuse_the_same_answer(device):
    """Many backward passes through the same nodes (cached derivatives) give the same numbers as
    a fresh graph each time."""
    ref_model = _act_mlp(nn.Tanh(), 4, 8, 3, 1, seed=3).to(device)
    model = thd.nn.convert(ref_model)
    x = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    u = model(x).sum()
    (g,) = torch.autograd.grad(u, x, create_graph=True)
    first = [torch.autograd.grad(g[:, 0].sum(), x, retain_graph=True)[0] for _ in range(3)]
    for f in first[1:]:
        assert torch.equal(f, first[0])


def test_mul_pair_gradcheck(device):
    ops = torch.ops.torchhessdiag
    gen = torch.Generator().manual_seed(4)
    args = [torch.randn(7, generator=gen, dtype=torch.float64).to(device).requires_grad_() for _ in range(4)]
    assert torch.autograd.gradcheck(lambda *a: ops.mul_pair(*a), args)
    assert torch.autograd.gradgradcheck(lambda *a: ops.mul_pair(*a), args)
    o1, o2 = ops.mul_pair(*args)
    w, g, d1, d2 = args
    assert torch.equal(o1, w * d1)
    torch.testing.assert_close(o2, w * g * d2, rtol=1e-15, atol=0)


def test_mul_pair_opcheck(device):
    args = [torch.randn(3, 5, dtype=torch.float64, device=device) for _ in range(4)]
    torch.library.opcheck(torch.ops.torchhessdiag.mul_pair, args)
    args32 = [a.float().t() for a in args]  # non-contiguous float32
    torch.library.opcheck(torch.ops.torchhessdiag.mul_pair, args32)
