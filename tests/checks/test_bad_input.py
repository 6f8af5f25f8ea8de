"""Bad and unusual inputs: every case is either a clear error naming the bad argument, or the
correct result.

Covers the functional API (``torchhessdiag.activation`` / ``activation_derivatives``), the drop-in
modules, and direct calls of the ops (``torch.ops.torchhessdiag.*``), whose argument checks live
in csrc/act_ops_impl.h (TORCH_CHECK_TYPE -> TypeError, TORCH_CHECK_VALUE -> ValueError).
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

import torchhessdiag
import torchhessdiag.nn as thnn
from torchhessdiag.activations import NAMES, make_spec, torch_function

F = torch.nn.functional
# Small tensors only: one intra-op thread (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")
ops = torch.ops.torchhessdiag

# dtype -> (how Python spells it, how c10 spells it in the C++ messages)
BAD_DTYPES = {
    torch.int32: ("torch.int32", "Int"),
    torch.int64: ("torch.int64", "Long"),
    torch.uint8: ("torch.uint8", "Byte"),
    torch.bool: ("torch.bool", "Bool"),
    torch.complex64: ("torch.complex64", "ComplexFloat"),
    torch.complex128: ("torch.complex128", "ComplexDouble"),
}
HALF_DTYPES = [torch.float16, torch.bfloat16]


def _dtype_re(dtype):
    py, c10 = BAD_DTYPES.get(dtype, (str(dtype), None))
    return "|".join(re.escape(s) for s in (py, c10) if s)


def _tensor(dtype, device, shape=(5,)):
    return torch.ones(shape, device=device).to(dtype)


def _x(device, dtype=torch.float64, shape=(5,)):
    return torch.linspace(-2, 2, math.prod(shape), dtype=dtype, device=device).reshape(shape)


# ---- dtypes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(BAD_DTYPES), ids=str)
def test_activation_rejects_non_float(dtype, device):
    with pytest.raises(TypeError, match=_dtype_re(dtype)) as e:
        torchhessdiag.activation(_tensor(dtype, device), "tanh")
    assert "float32" in str(e.value)
    with pytest.raises(TypeError, match=_dtype_re(dtype)):
        torchhessdiag.activation_derivatives(_tensor(dtype, device), "tanh", order=2)


@pytest.mark.parametrize("dtype", list(BAD_DTYPES), ids=str)
@pytest.mark.parametrize(
    "module", [thnn.Tanh(), thnn.Softplus(2.0, 5.0), thnn.ReLU(), thnn.Identity()], ids=repr
)
def test_dropin_rejects_non_float(module, dtype, device):
    with pytest.raises(TypeError, match=_dtype_re(dtype)):
        module(_tensor(dtype, device))


@pytest.mark.parametrize("dtype", list(BAD_DTYPES) + HALF_DTYPES, ids=str)
@pytest.mark.parametrize(
    "op, bad_arg",
    [
        ("act_forward", "z"),
        ("act_derivatives", "z"),
        ("act_grad", "z"),
        ("act_grad", "g"),
        ("mul_pair_backward", "w"),
        ("mul_pair_backward", "g1"),
        ("mul_pair_backward", "d3"),
    ],
)
def test_ops_reject_bad_dtype_naming_argument(op, bad_arg, dtype, device):
    good = _x(device, torch.float32)
    args = {"z": good, "g": good.clone(), "w": good.clone(), "g1": good.clone(), "d3": good.clone()}
    args[bad_arg] = _tensor(dtype, device)
    call = {
        "act_forward": lambda: ops.act_forward(args["z"], "tanh", 0.0, 0.0),
        "act_derivatives": lambda: ops.act_derivatives(args["z"], "tanh", 0.0, 0.0, [0, 1]),
        "act_grad": lambda: ops.act_grad(args["g"], args["z"], "tanh", 0.0, 0.0, 1),
        "mul_pair_backward": lambda: ops.mul_pair_backward(
            args["g1"], good, args["w"], good, good, good, args["d3"]
        ),
    }[op]
    with pytest.raises(TypeError) as e:
        call()
    msg = str(e.value)
    assert re.search(rf"\b{bad_arg}\b", msg), f"error does not name {bad_arg!r}: {msg}"
    assert "float32" in msg, msg
    if dtype in BAD_DTYPES:
        assert re.search(_dtype_re(dtype), msg), msg


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_precision_rejected_mentioning_float32(dtype, device):
    x = _tensor(dtype, device)
    for call in (
        lambda: torchhessdiag.activation(x, "silu"),
        lambda: torchhessdiag.activation_derivatives(x, "silu"),
        lambda: thnn.GELU()(x),
    ):
        with pytest.raises(TypeError, match="float32") as e:
            call()
        assert str(dtype).split(".")[-1] in str(e.value)


def test_non_tensor_input_rejected():
    with pytest.raises(TypeError, match="Tensor"):
        torchhessdiag.activation([0.5, 1.0], "tanh")
    with pytest.raises(TypeError, match="Tensor"):
        thnn.Tanh()(0.5)


# ---- names and parameters ---------------------------------------------------------------------


def test_unknown_activation_lists_supported(device):
    x = _x(device)
    for call in (
        lambda: torchhessdiag.activation(x, "swish"),
        lambda: torchhessdiag.activation_derivatives(x, "swish"),
        lambda: ops.act_forward(x, "swish", 0.0, 0.0),
        lambda: ops.act_derivatives(x, "swish", 0.0, 0.0, [1]),
        lambda: ops.act_grad(x, x, "swish", 0.0, 0.0, 1),
        lambda: ops.act_beyond_table(x, "swish", 0.0, 0.0, 5),
    ):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "swish" in msg
        assert all(n in msg for n in NAMES), msg


def test_activation_name_must_be_str_or_supported_module(device):
    x = _x(device)
    with pytest.raises(TypeError, match="name"):
        torchhessdiag.activation(x, 3)
    with pytest.raises((NotImplementedError, ValueError), match="Mish"):
        torchhessdiag.activation(x, torch.nn.Mish())


def test_activation_accepts_supported_modules_and_specs(device):
    x = _x(device)
    ref = F.softplus(x, beta=2.0, threshold=5.0)
    for act in (torch.nn.Softplus(2.0, 5.0), thnn.Softplus(2.0, 5.0), make_spec("softplus", beta=2,
                                                                               threshold=5)):
        assert torch.equal(torchhessdiag.activation(x, act), ref)


@pytest.mark.parametrize(
    "act, params, exc, word",
    [
        ("softplus", {"beta": 0.0}, ValueError, "beta"),
        ("softplus", {"beta": float("nan")}, ValueError, "beta"),
        ("softplus", {"threshold": float("inf")}, ValueError, "threshold"),
        ("celu", {"alpha": 0.0}, ValueError, "alpha"),
        ("elu", {"alpha": float("nan")}, ValueError, "alpha"),
        ("leaky_relu", {"negative_slope": float("-inf")}, ValueError, "negative_slope"),
        ("sin", {"w": float("nan")}, ValueError, "w"),
        ("tanh", {"beta": 1.0}, TypeError, "beta"),
        ("softplus", {"alpha": 1.0}, TypeError, "alpha"),
        ("elu", {"alpha": 1.0, "negative_slope": 0.1}, TypeError, "negative_slope"),
        ("elu", {"alpha": "big"}, ValueError, "big"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_parameters(act, params, exc, word, device):
    x = _x(device)
    with pytest.raises(exc, match=re.escape(word)):
        torchhessdiag.activation(x, act, **params)
    with pytest.raises(exc, match=re.escape(word)):
        torchhessdiag.activation_derivatives(x, act, order=2, **params)


@pytest.mark.parametrize(
    "factory, word",
    [
        (lambda: thnn.Softplus(beta=0.0), "beta"),
        (lambda: thnn.CELU(alpha=0.0), "alpha"),
        (lambda: thnn.ELU(alpha=float("nan")), "alpha"),
        (lambda: thnn.LeakyReLU(float("inf")), "negative_slope"),
        (lambda: thnn.Sine(float("nan")), "w"),
        (lambda: thnn.GELU("fast"), "approximate"),
    ],
    ids=["Softplus-beta0", "CELU-alpha0", "ELU-nan", "LeakyReLU-inf", "Sine-nan", "GELU-fast"],
)
def test_dropin_bad_parameters(factory, word):
    with pytest.raises(ValueError, match=word):
        factory()


@pytest.mark.parametrize(
    "act, a, word", [("softplus", 0.0, "beta"), ("celu", 0.0, "alpha")]
)
def test_ops_reject_zero_parameters(act, a, word, device):
    x = _x(device)
    for call in (
        lambda: ops.act_forward(x, act, a, 20.0),
        lambda: ops.act_derivatives(x, act, a, 20.0, [1]),
        lambda: ops.act_grad(x, x, act, a, 20.0, 1),
        lambda: ops.act_beyond_table(x, act, a, 20.0, 5),
    ):
        with pytest.raises(ValueError, match=word):
            call()


# ---- orders -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda x: ops.act_grad(x, x, "tanh", 0.0, 0.0, 5),
        lambda x: ops.act_grad(x, x, "tanh", 0.0, 0.0, -1),
        lambda x: ops.act_beyond_table(x, "tanh", 0.0, 0.0, -1),
        lambda x: ops.act_derivatives(x, "tanh", 0.0, 0.0, [7]),
        lambda x: ops.act_derivatives(x, "tanh", 0.0, 0.0, [0, 1, -1]),
        lambda x: ops.act_derivatives(x, "tanh", 0.0, 0.0, []),
        lambda x: ops.act_derivatives(x, "tanh", 0.0, 0.0, [0, 1, 2, 3, 4] * 4),  # 20 > 16 orders
    ],
    ids=["grad-k5", "grad-k-1", "beyond_table-k-1", "derivatives-7",
         "derivatives-neg", "derivatives-empty", "derivatives-20-orders"],
)
def test_ops_order_out_of_range(call, device):
    with pytest.raises(ValueError, match="order"):
        call(_x(device))


@pytest.mark.parametrize(
    "kw",
    [{"order": -1}, {"order": 1.5}, {"order": True}, {"orders": []}, {"orders": [0, -2]},
     {"orders": [1.0]}],
    ids=["order-1", "order1.5", "orderTrue", "orders-empty", "orders-neg", "orders-float"],
)
def test_activation_derivatives_bad_order(kw, device):
    with pytest.raises(ValueError, match="order"):
        torchhessdiag.activation_derivatives(_x(device), "tanh", **kw)


def test_activation_derivatives_beyond_table_is_correct(device):
    # orders past the table (> 4) are a correct result, not an error: sin^(k)(x) = sin(x + k pi/2)
    x = _x(device, shape=(9,))
    d = torchhessdiag.activation_derivatives(x, "sin", orders=[5, 6, 0, 7])
    expected = torch.stack([torch.sin(x + k * math.pi / 2) for k in (5, 6, 0, 7)])
    # 1e-14 absolute: sin/cos of arguments <= 2 + 7 pi / 2 in float64 (the shift adds ~1e-15)
    torch.testing.assert_close(d, expected, rtol=0, atol=1e-14)


# ---- shapes, dtypes, devices of g vs z ---------------------------------------------------------


def test_act_grad_shape_mismatch(device):
    z = _x(device, shape=(3,))
    for g in (_x(device, shape=(4,)), _x(device, shape=(1, 3)), _x(device, shape=(3, 1))):
        with pytest.raises(ValueError, match=r"\bg\b.*shape"):
            ops.act_grad(g, z, "tanh", 0.0, 0.0, 1)
    with pytest.raises(ValueError, match=r"\bg1\b.*shape"):
        ops.mul_pair_backward(_x(device, shape=(4,)), z, z, z, z, z, z)


def test_act_grad_dtype_mismatch(device):
    z = _x(device, torch.float64)
    g = _x(device, torch.float32)
    with pytest.raises(TypeError, match=r"\bg\b.*(Float|float32)"):
        ops.act_grad(g, z, "tanh", 0.0, 0.0, 1)
    with pytest.raises(TypeError, match=r"\bg\b"):
        ops.act_grad(z, g, "tanh", 0.0, 0.0, 1)
    with pytest.raises(TypeError, match=r"\bg2\b"):
        ops.mul_pair_backward(z, g, z, z, z, z, z)


def _other_device(device, kind):
    """A device that differs from `device`: "meta", or "cross" (cuda <-> cpu, needs a GPU)."""
    if kind == "meta":
        return torch.device("meta")
    if not torch.cuda.is_available():
        pytest.skip("cpu vs cuda mismatch needs a GPU (the meta case covers CPU-only machines)")
    return torch.device("cpu") if device.type == "cuda" else torch.device("cuda")


@pytest.mark.parametrize("kind", ["meta", "cross"])
@pytest.mark.parametrize("which", ["g", "z"])
def test_act_grad_device_mismatch(which, kind, device):
    other = _other_device(device, kind)
    z, g = _x(device), _x(device)
    if which == "g":
        g = g.to(other)
    else:
        z = z.to(other)
    # Expected: an error that names the device problem (ValueError from the compiled checks,
    # RuntimeError from torch where the reference kernels run) -- not a result on one of the
    # two devices.
    with pytest.raises((ValueError, RuntimeError), match="device"):
        out = ops.act_grad(g, z, "tanh", 0.0, 0.0, 1)
        pytest.fail(f"act_grad(g on {g.device}, z on {z.device}) returned a tensor on "
                    f"{out.device} instead of raising")


@pytest.mark.parametrize("kind", ["meta", "cross"])
@pytest.mark.parametrize("which", ["g1", "w", "d3"])
def test_mul_pair_backward_device_mismatch(which, kind, device):
    other = _other_device(device, kind)
    names = ["g1", "g2", "w", "g", "d1", "d2", "d3"]
    args = {n: _x(device) for n in names}
    args[which] = args[which].to(other)
    with pytest.raises((ValueError, RuntimeError), match="device"):
        out = ops.mul_pair_backward(*[args[n] for n in names])
        pytest.fail(f"mul_pair_backward with {which} on {other} and the rest on {device} "
                    f"returned tensors on {out[0].device} instead of raising")


def test_meta_tensors_give_shapes():
    # all inputs on meta (the fake kernels): right shapes and dtypes, no data (meta-only, so not
    # parametrised over the device fixture)
    z = torch.empty(4, 3, dtype=torch.float64, device="meta")
    assert ops.act_forward(z, "tanh", 0.0, 0.0).shape == (4, 3)
    assert ops.act_derivatives(z, "tanh", 0.0, 0.0, [0, 2, 3]).shape == (3, 4, 3)
    assert ops.act_grad(z, z, "tanh", 0.0, 0.0, 2).dtype == torch.float64
    o1, o2, o3 = ops.mul_pair_backward(None, z, z, z, z, z, z)
    assert o1.shape == o2.shape == o3.shape == (4, 3) and o1.device.type == "meta"


# ---- layouts: non-contiguous, empty, 0-dim ------------------------------------------------------


def _noncontiguous_views(device):
    base = torch.randn(6, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base = base.to(device) * 3
    return {
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "expanded": base[2].expand(4, 10),
        "negative-offset": base[1:, 3:7],
        "channels-last": base.reshape(1, 6, 5, 2).to(memory_format=torch.channels_last),
    }


NONCONTIG_ACTS = [
    ("tanh", {}), ("softplus", {"beta": 2.0, "threshold": 5.0}), ("gelu", {}), ("sin", {"w": 3.0}),
    ("celu", {"alpha": 0.7}),
]


@pytest.mark.parametrize("act, params", NONCONTIG_ACTS, ids=[a for a, _ in NONCONTIG_ACTS])
@pytest.mark.parametrize(
    "layout", ["transposed", "strided", "expanded", "negative-offset", "channels-last"]
)
def test_noncontiguous_inputs_same_values(act, params, layout, device):
    view = _noncontiguous_views(device)[layout]
    dense = view.contiguous()
    assert not view.is_contiguous()
    spec = make_spec(act, **params)
    # The value is torch's own kernel, and torch itself is not bitwise layout-invariant (its
    # vectorised contiguous loop and strided loop round differently, e.g. celu, silu): the value
    # must be bitwise torch's on the same view, and within 4 ulp of the contiguous result.
    y = torchhessdiag.activation(view, act, **params)
    assert torch.equal(y, torch_function(spec)(view))
    eps = torch.finfo(view.dtype).eps
    torch.testing.assert_close(y, torchhessdiag.activation(dense, act, **params),
                               rtol=4 * eps, atol=4 * eps)
    # the derivative table's kernels are elementwise and position-independent: bitwise equal
    assert torch.equal(torchhessdiag.activation_derivatives(view, act, order=4, **params),
                       torchhessdiag.activation_derivatives(dense, act, order=4, **params))
    # direct op calls with every tensor argument non-contiguous
    w = view * 0.5 + 1
    wd = w.contiguous()
    assert torch.equal(ops.act_grad(w, view, spec.name, spec.a, spec.b, 2),
                       ops.act_grad(wd, dense, spec.name, spec.a, spec.b, 2))
    o = ops.mul_pair(w, view, view, w)
    od = ops.mul_pair(wd, dense, dense, wd)
    assert torch.equal(o[0], od[0]) and torch.equal(o[1], od[1])
    o = ops.mul_pair_backward(view, w, w, view, view, w, view)
    od = ops.mul_pair_backward(dense, wd, wd, dense, dense, wd, dense)
    assert all(torch.equal(a, b) for a, b in zip(o, od))


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
def test_noncontiguous_nested_autograd(layout, device):
    views = _noncontiguous_views(device)
    leaf = torch.randn(6, 10, dtype=torch.float64, device=device, requires_grad=True)
    # the leaf's derivative through a non-contiguous view vs through a contiguous copy
    make = {
        "transposed": lambda t: t.t(),
        "strided": lambda t: t[::2, 1::3],
        "expanded": lambda t: t[2].expand(4, 10),
    }[layout]
    assert views[layout].shape == make(leaf).shape
    results = []
    for contiguous in (False, True):
        v = make(leaf)
        v = v.contiguous() if contiguous else v
        y = thnn.SiLU()(v)
        (g,) = torch.autograd.grad(y.sum(), leaf, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), leaf)
        results.append((y.detach(), g.detach(), h))
    (y, g, h), (y_dense, g_dense, h_dense) = results
    # value: torch's own silu on that layout (bitwise); see test_noncontiguous_inputs_same_values
    assert torch.equal(y, F.silu(make(leaf.detach())))
    eps = torch.finfo(y.dtype).eps
    torch.testing.assert_close(y, y_dense, rtol=4 * eps, atol=4 * eps)
    # derivatives: the table kernels, position-independent, so bitwise equal
    assert torch.equal(g, g_dense)
    assert torch.equal(h, h_dense)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 2)], ids=str)
@pytest.mark.parametrize("act", ["tanh", "softplus", "relu", "identity"])
def test_empty_tensors(shape, act, device):
    x = torch.empty(shape, dtype=torch.float32, device=device, requires_grad=True)
    y = torchhessdiag.activation(x, act)
    assert y.shape == shape and y.dtype == x.dtype and y.device == x.device
    d = torchhessdiag.activation_derivatives(x, act, order=6)
    assert d.shape == (7, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # relu's piecewise-linear warning
        (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        assert g.shape == shape
        (h,) = torch.autograd.grad(g.sum(), x)
        assert h.shape == shape
        m = torch.nn.Sequential(torch.nn.Linear(4, 3), thnn.Tanh()).to(device)
        out = m(torch.empty(0, 4, device=device))
        assert out.shape == (0, 3)
        out.sum().backward()
        assert torch.equal(m[0].weight.grad, torch.zeros_like(m[0].weight))


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "softplus", "silu", "gelu", "exp", "elu"])
def test_zero_dim_scalars(act, device):
    x = torch.tensor(0.75, dtype=torch.float64, device=device, requires_grad=True)
    y = torchhessdiag.activation(x, act)
    assert y.dim() == 0
    ref_fn = torch_function(make_spec(act))
    assert torch.equal(y, ref_fn(x))
    (g,) = torch.autograd.grad(y, x, create_graph=True)
    (h,) = torch.autograd.grad(g, x)
    assert g.dim() == 0 and h.dim() == 0
    d = torchhessdiag.activation_derivatives(x.detach(), act, order=2)
    assert d.shape == (3,)
    # the autograd derivatives and the table agree (same kernels: ~ulp)
    torch.testing.assert_close(torch.stack([y.detach(), g.detach(), h]), d, rtol=1e-14, atol=1e-15)


def test_zero_dim_through_dropin_and_ops(device):
    x = torch.tensor(-1.25, dtype=torch.float32, device=device)
    assert torch.equal(thnn.SiLU()(x), F.silu(x))
    assert ops.act_grad(torch.tensor(2.0, device=device), x, "silu", 0.0, 0.0, 1).dim() == 0
    assert ops.act_derivatives(x, "silu", 0.0, 0.0, [1, 2]).shape == (2,)


# ---- NaN / Inf ----------------------------------------------------------------------------------

SPECIAL = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.0, 30.0, -30.0, 800.0,
           -800.0]
TORCH_FNS = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "silu": F.silu,
    "relu": F.relu,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", list(TORCH_FNS))
def test_nan_inf_propagate_like_torch(act, dtype, device):
    x = torch.tensor(SPECIAL, dtype=dtype, device=device)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    y = torchhessdiag.activation(xa, act)
    y_ref = TORCH_FNS[act](xb)
    (g,) = torch.autograd.grad(y.sum(), xa)
    (g_ref,) = torch.autograd.grad(y_ref.sum(), xb)
    # values: torch's own kernel, so bit for bit (NaN where torch gives NaN)
    assert torch.equal(y.isnan(), y_ref.isnan())
    assert torch.equal(y.nan_to_num(), y_ref.nan_to_num()), (y, y_ref)
    # first derivative: NaN exactly where torch has NaN, the same infinities, and otherwise the
    # same number up to a few ulp of the largest value (torch's 1 - tanh^2 and s (1 - s) round to
    # 0 where the table keeps the tiny true value, e.g. tanh'(30) = 3.5e-26, so an absolute
    # tolerance of 8 eps * max|sigma'| with max|sigma'| = 1 for these five functions)
    assert torch.equal(g.isnan(), g_ref.isnan()), f"NaN pattern: {g} vs torch {g_ref}"
    assert torch.equal(g.isinf(), g_ref.isinf()), f"Inf pattern: {g} vs torch {g_ref}"
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(g, g_ref, rtol=8 * eps, atol=8 * eps, equal_nan=True)


# ---- reference-kernel fallbacks warn but work ---------------------------------------------------


def test_all_names_work_on_device(device):
    # every activation, every order of the table, through the public API on this device
    x = _x(device, shape=(11,)) * 1.3 + 0.05
    for name in NAMES:
        spec = make_spec(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reference-kernel fallback warning on some devices
            d = torchhessdiag.activation_derivatives(x, name, order=4)
        assert d.shape == (5, 11) and torch.isfinite(d).all()
        # order 0 of the table vs torch's kernel: ulp-level (the table is test_table.py's job)
        torch.testing.assert_close(d[0], torch_function(spec)(x), rtol=1e-14, atol=1e-15)
