"""The jet rules of issue 15: LayerNorm, RMSNorm, softmax / log_softmax, scaled dot-product
attention and nn.MultiheadAttention (torchhessdiag/taylor_nn.py), exact to order 4 and for training.

Every model here has an *elementary twin*: the same parameters, with layer norm, RMS norm, softmax
and attention written out in elementary torch ops (mean, sqrt, exp, sum, matmul, ...), whose
derivatives torch composes exactly. The expected values are nested torch.autograd.grad of the twin
in float64 (tests/_general_helpers.oracle) -- never torch's own nested derivatives of
F.layer_norm, which are wrong from order 3 on (pytorch/pytorch#196700; the first test shows it).
Tolerance: 1e-10 relative to the largest entry of the quantity (what is left is float64 rounding
of two different summation orders; observed <= 1e-13). Training gradients: the parameter gradients
of a loss on the Laplacian and the 3rd/4th axis derivatives, against the same loss on the twin's
oracle built with create_graph=True.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchhessdiag as thd

from _general_helpers import assert_close, oracle
from _twin_models import (
    HandAttention,
    MHANet,
    NormNet,
    SDPANet,
    SoftmaxNet,
    _build,
    attention_e,
    ln_e,
)

DT = torch.float64
TOL = 1e-10


def _check_jets(model, x, dims=None, order=4, grad_orders=(3,)):
    """thd on the model vs the oracle of its elementary twin: values of laplacian, hessian_diag,
    axis_derivatives (orders 0..order), and the parameter gradients of a loss on them."""
    f = model
    twin = lambda z: model(z, elementary=True)  # noqa: E731
    want = oracle(twin, x, order, dims, create_graph=True)
    ax, info = thd.axis_derivatives(f, x, order, dims=dims, return_info=True)
    assert info.path == "jet", info
    assert_close(ax, want, TOL, "axis_derivatives")
    hd, info = thd.hessian_diag(f, x, dims=dims, return_info=True)
    assert info.path == "jet", info
    assert_close(hd, want[2], TOL, "hessian_diag")
    lap, info = thd.laplacian(f, x, dims=dims, return_info=True)
    assert info.path == "jet", info
    assert_close(lap, want[2].sum(-1), TOL, "laplacian")
    params = [p for p in model.parameters() if p.requires_grad]
    loss = lap.square().mean() + sum(ax[k].square().mean() for k in grad_orders)
    loss_w = want[2].sum(-1).square().mean() + sum(want[k].square().mean() for k in grad_orders)
    g = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    g_w = torch.autograd.grad(loss_w, params, allow_unused=True, materialize_grads=True)
    for (name, _), a, b in zip(model.named_parameters(), g, g_w):
        assert_close(a, b, TOL, f"gradient of {name}")
    assert any(float(b.abs().max()) > 0 for b in g_w)


# ---- LayerNorm: the bug of the issue ------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_layer_norm_mlp_orders_3_4_and_training_gradients(seed):
    """A tanh MLP with two nn.LayerNorm layers (the issue's case): before issue 15 it went to the
    fallback, whose nested derivative of layer_norm is torch's -- wrong by 10-100 % at orders 3-4
    and in the training gradients of a Laplacian loss. Now the jet path is exact; torch's own
    nested autograd of the model is shown to be wrong, so this test cannot pass by agreeing with
    torch's layer_norm derivative."""
    model = _build(NormNet, seed)
    x = torch.randn(5, 3, dtype=DT)
    _check_jets(model, x, grad_orders=(3, 4))
    torchs_own = oracle(model, x, 4)
    twin = oracle(lambda z: model(z, elementary=True), x, 4)
    assert float((torchs_own[3] - twin[3]).abs().max()) > 1e-3 * float(twin[3].abs().max())


class LN3d(nn.Module):
    """LayerNorm of a linear map of x (shared first-order rows), over the last two dims of a 3-d
    value, times an input coordinate."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 6)
        self.ln = nn.LayerNorm((2, 3))

    def forward(self, x, elementary=False):
        h = self.lin(x).reshape(x.shape[0], 2, 3)
        h = self.ln(h) if not elementary else ln_e(h, (2, 3), self.ln.weight, self.ln.bias)
        return torch.tanh(h).sum((-1, -2)) + h[:, 0, 0] * x[:, 1]


def test_layer_norm_shared_rows_and_2d_normalized_shape():
    _check_jets(_build(LN3d, 3), torch.randn(4, 2, dtype=DT))


@pytest.mark.parametrize("seed", [0, 1])
def test_softmax_and_log_softmax(seed):
    model = _build(SoftmaxNet, seed)
    _check_jets(model, torch.randn(4, 3, dtype=DT))


# ---- attention --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["plain", "causal", "bool_mask", "float_mask_scale"])
def test_scaled_dot_product_attention(variant):
    model = _build(SDPANet, 4, variant=variant)
    x = torch.randn(3, 9, dtype=DT)
    _check_jets(model, x, dims=[0, 4, 8], grad_orders=(3,))


@pytest.mark.parametrize("variant", ["plain", "weights", "weights_per_head", "bool_mask", "float_mask", "causal", "key_padding", "cross"])
def test_multihead_attention(variant):
    model = _build(MHANet, 5, variant=variant)
    x = torch.randn(3, 9, dtype=DT)
    _check_jets(model, x, dims=[1, 5], grad_orders=(3,))


@pytest.mark.parametrize("seed", [0, 1])
def test_hand_written_attention(seed):
    model = _build(HandAttention, seed)
    _check_jets(model, torch.randn(3, 9, dtype=DT), dims=[0, 3, 7])


def test_attention_models_full_laplacian_order_4():
    """All axes, order 4, on the two attention modules at once (a larger d = 12: 4 particles)."""
    model = _build(SDPANet, 7, P=4, variant="causal")
    _check_jets(model, torch.randn(2, 12, dtype=DT), order=4, grad_orders=(4,))


# ---- what is refused, and how ------------------------------------------------------------------------


def test_batch_first_false_attention_falls_back_exactly():
    """nn.MultiheadAttention with batch_first=False needs the points in dim 1 (a transpose of the
    batch dim, which the jets refuse: it would mix points), so the model goes to the fallback,
    which computes it exactly: it runs attention on torch's math path (before issue 15 it raised
    torch's 'derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented')."""
    torch.manual_seed(8)
    embed = nn.Linear(3, 4).double()
    mha = nn.MultiheadAttention(4, 2).double()  # batch_first=False
    with torch.no_grad():
        mha.in_proj_bias.normal_(0, 0.2)

    def f(x):
        t = torch.tanh(embed(x.reshape(x.shape[0], 3, 3))).transpose(0, 1)  # (tokens, N, E)
        return mha(t, t, t, need_weights=False)[0].sum((0, 2))

    def twin(x):
        t = torch.tanh(embed(x.reshape(x.shape[0], 3, 3)))
        Wq, Wk, Wv = mha.in_proj_weight.chunk(3)
        bq, bk, bv = mha.in_proj_bias.chunk(3)
        N = t.shape[0]
        heads = lambda z: z.reshape(N, 3, 2, 2).transpose(1, 2)  # noqa: E731
        o = attention_e(heads(t @ Wq.t() + bq), heads(t @ Wk.t() + bk), heads(t @ Wv.t() + bv))
        o = o.transpose(1, 2).reshape(N, 3, 4) @ mha.out_proj.weight.t() + mha.out_proj.bias
        return o.sum((1, 2))

    x = torch.randn(3, 9, dtype=DT)
    got, info = thd.axis_derivatives(f, x, 3, dims=[0, 4], return_info=True)
    assert info.path == "autograd" and "batch dimension" in info.reason
    assert_close(got, oracle(twin, x, 3, [0, 4]), TOL, "fallback attention")


def test_dropout_in_attention_is_refused_in_training_mode():
    model = _build(MHANet, 1, variant="plain")
    model.mha.dropout = 0.1
    x = torch.randn(2, 9, dtype=DT)
    model.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        thd.laplacian(model, x)
    model.eval()
    assert thd.laplacian(model, x, return_info=True)[1].path == "jet"


def test_normalised_shape_mismatch_names_the_layer():
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(4), nn.Linear(4, 1)).double()
    with pytest.raises(ValueError, match=r"LayerNorm '1'.*\(4,\).*\(2, 5\)"):
        thd.laplacian(model, torch.randn(2, 3, dtype=DT))
