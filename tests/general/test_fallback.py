"""The autograd fallback, never silently wrong (issue 15, goals 4 and 5).

Models here contain something the jets do not support (torch.log1p, F.instance_norm, a
batch_first=False attention), so ``laplacian`` / ``axis_derivatives`` take the autograd fallback.
Where torch's own higher derivatives are wrong (F.layer_norm and F.instance_norm: nested reverse
mode from order 3, nested forward mode from order 2) or missing (the flash-attention kernel's
backward on the CPU), the fallback runs exact stand-ins (torchhessdiag/fallback_ops.py). Expected
values: nested autograd (float64) of an elementary twin of the model (tests/_twin_models.py),
tolerance 1e-10 of the quantity's scale (float64 rounding). Each test fails on the code before
issue 15 (silently wrong numbers, or torch's raw error).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchhessdiag as thd
from torchhessdiag import fallback_ops, general

from _general_helpers import assert_close, oracle
from _twin_models import MHANet, _build, ln_e

DT = torch.float64
TOL = 1e-10


def _extra(x):  # no jet rule: sends the model to the fallback
    return torch.log1p(x.square()).sum(-1, keepdim=True)


class LNPlusLog1p(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.n1, self.l2, self.n2, self.l3 = nn.Linear(3, 6), nn.LayerNorm(6), nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 2)
        with torch.no_grad():
            for n in (self.n1, self.n2):
                n.weight.normal_(1, 0.3)
                n.bias.normal_(0, 0.3)

    def forward(self, x, elementary=False):
        ln = (lambda m, h: ln_e(h, (h.shape[-1],), m.weight, m.bias)) if elementary else (lambda m, h: m(h))
        h = torch.tanh(ln(self.n1, self.l1(x)))
        return self.l3(F.silu(ln(self.n2, self.l2(h)))) + _extra(x)


@pytest.mark.parametrize("seed", [0, 1])
def test_layer_norm_in_the_fallback_orders_2_to_4_and_training(seed):
    torch.manual_seed(seed)
    model = LNPlusLog1p().double()
    x = torch.randn(5, 3, dtype=DT)
    twin = lambda z: model(z, elementary=True)  # noqa: E731
    want = oracle(twin, x, 4, create_graph=True)
    got, info = thd.axis_derivatives(model, x, 4, return_info=True)
    assert info.path == "autograd" and "log1p" in info.reason
    assert_close(got, want, TOL, "axis_derivatives")
    lap = thd.laplacian(model, x)
    assert_close(lap, want[2].sum(-1), TOL, "laplacian")
    # training: the parameter gradients of a Laplacian loss need third derivatives
    params = list(model.parameters())
    g = torch.autograd.grad(lap.square().mean(), params, materialize_grads=True, allow_unused=True)
    g_w = torch.autograd.grad(want[2].sum(-1).square().mean(), params, materialize_grads=True, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), g, g_w):
        assert_close(a, b, TOL, f"gradient of {name}")
    # what torch's own nested autograd gives (the fallback before issue 15): wrong at order 3
    torchs = oracle(model, x, 3)
    assert float((torchs[3] - want[3]).abs().max()) > 1e-3 * float(want[3].abs().max())


def test_instance_norm_per_point_in_the_fallback():
    """F.instance_norm over (N, C, L): each point's channels normalised over L (rows
    independent). Same torch bug as layer_norm; no jet rule, so the fallback runs it as
    elementary ops."""
    torch.manual_seed(2)
    lin, out = nn.Linear(3, 8).double(), nn.Linear(8, 1).double()
    w, b = torch.randn(2, dtype=DT), torch.randn(2, dtype=DT)

    def f(x):
        h = lin(x).reshape(x.shape[0], 2, 4)
        return out(torch.tanh(F.instance_norm(h, weight=w, bias=b)).reshape(x.shape[0], 8))

    def twin(x):
        h = lin(x).reshape(x.shape[0], 2, 4)
        h = ln_e(h, (4,)) * w.reshape(1, 2, 1) + b.reshape(1, 2, 1)
        return out(torch.tanh(h).reshape(x.shape[0], 8))

    x = torch.randn(4, 3, dtype=DT)
    got, info = thd.axis_derivatives(f, x, 4, return_info=True)
    assert info.path == "autograd"
    assert_close(got, oracle(twin, x, 4), TOL, "instance_norm")


def test_multihead_attention_in_the_fallback():
    """nn.MultiheadAttention (need_weights=False: torch runs the flash kernel on the CPU, whose
    backward has no derivative) in a model that takes the fallback: before issue 15 torch's raw
    'derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented'; now exact, for need_weights False and True."""
    for variant in ("plain", "weights", "key_padding"):
        model = _build(MHANet, 3, variant=variant)
        f = lambda z: model(z) + _extra(z)  # noqa: E731
        twin = lambda z: model(z, elementary=True) + _extra(z)  # noqa: E731
        x = torch.randn(3, 9, dtype=DT)
        got, info = thd.axis_derivatives(f, x, 3, dims=[0, 5], return_info=True)
        assert info.path == "autograd", variant
        assert_close(got, oracle(twin, x, 3, [0, 5]), TOL, variant)


def test_sdpa_4d_float32_in_the_fallback_runs():
    """float32 4-d attention in the fallback: no raw flash-attention error, and the float32
    result agrees with the float64 one to float32 accuracy (1e-4 relative: the Hessian of a
    width-4 attention model in float32 loses ~3-4 digits to cancellation)."""
    torch.manual_seed(4)
    qkv = nn.Linear(3, 12)

    def f(x):
        t = qkv(x.reshape(x.shape[0], 2, 3)).reshape(x.shape[0], 2, 3, 2, 2).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(t[0], t[1], t[2])
        return o.sum((1, 2, 3)) + _extra(x)[:, 0]

    x = torch.randn(3, 6)
    lap32 = thd.laplacian(f, x)
    qkv.double()
    lap64 = thd.laplacian(f, x.double())
    assert_close(lap32.double(), lap64, 1e-4, "float32 vs float64")


def test_exact_mode_fixes_forward_mode_too():
    """The stand-ins serve torch.func's nested forward mode as well (the fallback's second
    method), where torch's layer_norm is wrong from order 2."""
    torch.manual_seed(5)
    model = LNPlusLog1p().double()
    x = torch.randn(3, 3, dtype=DT)
    V = torch.eye(3, dtype=DT)
    want = oracle(lambda z: model(z, elementary=True), x, 3)
    wrong, _ = general._func_derivatives(model, x, V, 3)
    assert float((wrong[1] - want[2].movedim(-1, 1)).abs().max()) > 1e-3  # torch's forward mode
    with fallback_ops.ExactDerivatives():
        fixed, _ = general._func_derivatives(model, x, V, 3)
    for k in range(3):
        assert_close(fixed[k], want[k + 1].movedim(-1, 1), TOL, f"order {k + 1}")


def test_exact_mode_is_per_thread_and_values_match_torch():
    import threading

    h = torch.randn(4, 6, dtype=DT)
    seen = []
    with fallback_ops.ExactDerivatives():
        t = threading.Thread(target=lambda: seen.append(torch.overrides._get_current_function_mode_stack()))
        t.start()
        t.join()
        inside = F.layer_norm(h, (6,))
    assert seen == [[]]  # the other thread does not see the mode
    assert_close(inside, F.layer_norm(h, (6,)), 1e-14, "value")


def test_feature_mismatch_in_the_fallback_names_the_layer():
    """A model that takes the fallback, called with the wrong number of features: a ValueError
    naming the layer and the counts (before: torch's raw 'mat1 and mat2 shapes cannot be
    multiplied' from laplacian / hessian_diag / axis_derivatives)."""
    model = LNPlusLog1p().double()
    x = torch.randn(4, 5, dtype=DT)
    for fn in (thd.laplacian, thd.hessian_diag, lambda m, z: thd.axis_derivatives(m, z, 3)):
        with pytest.raises(ValueError, match=r"Linear 'l1' takes 3 input features, but gets shape \(4, 5\)"):
            fn(model, x)


@pytest.mark.parametrize("fn", ["mlp_laplacian", "mlp_hessian_diag"])
def test_mlp_functions_point_to_the_general_functions(fn):
    """The mlp_* error for a model that is not a plain MLP names laplacian / hessian_diag (it
    pointed to torch.func before issue 15)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1)).double()
    with pytest.raises(NotImplementedError, match=r"LayerNorm at '1'.*torchhessdiag\.laplacian / hessian_diag"):
        getattr(thd, fn)(model, torch.randn(2, 3, dtype=DT))


def test_feature_mismatch_in_a_plain_function_names_the_layer():
    """The same for a plain function that calls a model (found in its closure)."""
    model = LNPlusLog1p().double()
    f = lambda z: model(z) * 2.0  # noqa: E731
    with pytest.raises(ValueError, match=r"Linear 'LNPlusLog1p:l1' takes 3 input features, but gets shape \(4, 5\)"):
        thd.laplacian(f, torch.randn(4, 5, dtype=DT))
