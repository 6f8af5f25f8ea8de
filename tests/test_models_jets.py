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

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchhessdiag as thd

from _general_helpers import assert_close, oracle

DT = torch.float64
TOL = 1e-10


# ---- elementary definitions (the twins) -----------------------------------------------------------


def ln_e(h, shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(shape), 0))
    mean = h.mean(dims, keepdim=True)
    var = ((h - mean) ** 2).mean(dims, keepdim=True)
    y = (h - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def rms_e(h, shape, weight=None, eps=None):
    eps = torch.finfo(h.dtype).eps if eps is None else eps
    dims = tuple(range(-len(shape), 0))
    y = h / torch.sqrt((h * h).mean(dims, keepdim=True) + eps)
    return y * weight if weight is not None else y


def softmax_e(h, dim):
    e = torch.exp(h)
    return e / e.sum(dim, keepdim=True)


def log_softmax_e(h, dim):
    return h - torch.log(torch.exp(h).sum(dim, keepdim=True))


def attention_e(q, k, v, add_mask=None, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if add_mask is not None:
        s = s + add_mask
    return torch.matmul(softmax_e(s, -1), v)


def additive(mask_true_means_blocked: torch.Tensor, dtype) -> torch.Tensor:
    return torch.zeros(mask_true_means_blocked.shape, dtype=dtype).masked_fill(mask_true_means_blocked, float("-inf"))


# ---- the models -------------------------------------------------------------------------------------


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial norm weights and biases (torch initialises them to 1 and 0)."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("n1.weight", "n2.weight", "rms.weight", "rmsw", "ln.weight")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif name.endswith(("n1.bias", "n2.bias", "lnb", "ln.bias")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


class NormNet(nn.Module):
    """The issue's model: a tanh MLP with LayerNorm layers; plus RMSNorm (module and function),
    F.layer_norm with a partial affine, and a 2-d normalized_shape."""

    def __init__(self, d=3, w=6, m=2):
        super().__init__()
        self.l1, self.l2, self.l3, self.l4 = nn.Linear(d, w), nn.Linear(w, w), nn.Linear(w, w), nn.Linear(w, m)
        self.n1 = nn.LayerNorm(w)
        self.n2 = nn.LayerNorm(w, elementwise_affine=False, eps=1e-3)
        self.rms = nn.RMSNorm(w, eps=1e-4)
        self.lnb = nn.Parameter(torch.zeros(w))
        self.rmsw = nn.Parameter(torch.ones(w // 2))

    def forward(self, x, elementary=False):
        N = x.shape[0]
        if not elementary:
            h = torch.tanh(self.n1(self.l1(x)))
            h = F.silu(self.n2(self.l2(h)))
            h = self.rms(self.l3(h))
            h = F.layer_norm(h, (h.shape[-1],), None, self.lnb, 1e-5) + h
            h2 = F.rms_norm(torch.sin(h).reshape(N, 2, -1), (h.shape[-1] // 2,), self.rmsw)  # eps None
            h = h * F.layer_norm(h2, (2, h.shape[-1] // 2)).reshape(N, -1)
        else:
            h = torch.tanh(ln_e(self.l1(x), (self.n1.normalized_shape[0],), self.n1.weight, self.n1.bias))
            h = F.silu(ln_e(self.l2(h), (h.shape[-1],), eps=1e-3))
            h = rms_e(self.l3(h), (h.shape[-1],), self.rms.weight, 1e-4)
            h = ln_e(h, (h.shape[-1],), None, self.lnb) + h
            h2 = rms_e(torch.sin(h).reshape(N, 2, -1), (h.shape[-1] // 2,), self.rmsw)
            h = h * ln_e(h2, (2, h.shape[-1] // 2)).reshape(N, -1)
        return self.l4(h)


class SoftmaxNet(nn.Module):
    """softmax and log_softmax over feature dims: functions, Tensor methods and modules."""

    def __init__(self, d=3, w=6):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(d, w), nn.Linear(d, w), nn.Linear(w, 1)
        self.sm = nn.Softmax(dim=-1)
        self.lsm = nn.LogSoftmax(dim=2)

    def forward(self, x, elementary=False):
        h, g = self.l1(x), self.l2(x)
        N = x.shape[0]
        if not elementary:
            p = F.softmax(h, dim=-1) + self.sm(torch.tanh(g)) + h.softmax(1)
            q = self.lsm(g.reshape(N, 2, -1)).reshape(N, -1) + torch.log_softmax(h, -1)
        else:
            p = softmax_e(h, -1) + softmax_e(torch.tanh(g), -1) + softmax_e(h, 1)
            q = log_softmax_e(g.reshape(N, 2, -1), 2).reshape(N, -1) + log_softmax_e(h, -1)
        return self.l3(p * torch.tanh(q))[:, 0]


class SDPANet(nn.Module):
    """Psiformer-like: the d = P * 3 coordinates as P particles (tokens), embedded, pre-LayerNorm
    multi-head self-attention with F.scaled_dot_product_attention, residual, mean over tokens."""

    def __init__(self, P=3, w=8, heads=2, variant="plain"):
        super().__init__()
        self.P, self.w, self.heads, self.variant = P, w, heads, variant
        self.embed = nn.Linear(3, w)
        self.n1 = nn.LayerNorm(w)
        self.q, self.k, self.v = nn.Linear(w, w), nn.Linear(w, w), nn.Linear(w, w)
        self.out = nn.Linear(w, 1)
        self.register_buffer("keep", torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)[:P, :P])
        self.register_buffer("bias_mask", 0.3 * torch.randn(P, P))

    def _heads(self, t):
        N = t.shape[0]
        return t.reshape(N, self.P, self.heads, -1).transpose(1, 2)

    def forward(self, x, elementary=False):
        N = x.shape[0]
        t = self.embed(x.reshape(N, self.P, 3))
        a = self.n1(t) if not elementary else ln_e(t, (self.w,), self.n1.weight, self.n1.bias)
        q, k, v = self._heads(self.q(a)), self._heads(self.k(a)), self._heads(self.v(a))
        var = self.variant
        if not elementary:
            if var == "plain":
                o = F.scaled_dot_product_attention(q, k, v)
            elif var == "causal":
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            elif var == "bool_mask":
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.keep)
            elif var == "float_mask_scale":
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias_mask, scale=0.7)
        else:
            if var == "plain":
                o = attention_e(q, k, v)
            elif var == "causal":
                o = attention_e(q, k, v, additive(~torch.ones(self.P, self.P, dtype=torch.bool).tril(), x.dtype))
            elif var == "bool_mask":
                o = attention_e(q, k, v, additive(~self.keep, x.dtype))
            elif var == "float_mask_scale":
                o = attention_e(q, k, v, self.bias_mask, scale=0.7)
        h = t + o.transpose(1, 2).reshape(N, self.P, self.w)
        return self.out(torch.tanh(h).mean(1))


class MHANet(nn.Module):
    """nn.MultiheadAttention (batch_first) over the particles, with the module's options."""

    def __init__(self, P=3, w=8, heads=2, variant="plain"):
        super().__init__()
        self.P, self.w, self.variant = P, w, variant
        self.embed = nn.Linear(3, w)
        cross = variant == "cross"
        self.mha = nn.MultiheadAttention(w, heads, batch_first=True, kdim=5 if cross else None, vdim=4 if cross else None)
        self.kv_k, self.kv_v = nn.Linear(3, 5), nn.Linear(3, 4)
        self.out = nn.Linear(w, 2)
        self.register_buffer("blocked", torch.tensor([[0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.bool)[:P, :P])
        self.register_buffer("float_mask", 0.5 * torch.randn(P, P))
        with torch.no_grad():  # torch initialises the in-projection bias to 0
            self.mha.in_proj_bias.normal_(0, 0.2) if self.mha.in_proj_bias is not None else None

    def forward(self, x, elementary=False):
        N = x.shape[0]
        r = x.reshape(N, self.P, 3)
        t = torch.tanh(self.embed(r))
        var = self.variant
        kw = {}
        key, value = t, t
        if var == "cross":
            key, value = torch.sin(self.kv_k(r)), self.kv_v(r)
        if var == "bool_mask":
            kw["attn_mask"] = self.blocked
        if var == "float_mask":
            kw["attn_mask"] = self.float_mask
        if var == "causal":
            kw["attn_mask"], kw["is_causal"] = ~torch.ones(self.P, self.P, dtype=torch.bool, device=x.device).tril(), True
        if var == "key_padding":
            kw["key_padding_mask"] = (torch.arange(self.P, device=x.device) == self.P - 1).expand(N, self.P)
        weights = None
        if not elementary:
            if var == "weights":
                o, weights = self.mha(t, t, t)  # need_weights=True by default: averaged over heads
            elif var == "weights_per_head":
                o, weights = self.mha(t, t, t, average_attn_weights=False)
            else:
                o = self.mha(t if var != "cross" else t, key, value, need_weights=False, **kw)[0]
        else:
            o, weights = self._mha_e(t, key, value, kw)
        h = torch.tanh(o + t).mean(1)
        y = self.out(h)
        if weights is not None:
            y = y + weights.reshape(N, -1).square().sum(-1, keepdim=True)
        return y

    def _mha_e(self, q_in, k_in, v_in, kw):
        m = self.mha
        E, H = m.embed_dim, m.num_heads
        if m._qkv_same_embed_dim:
            Wq, Wk, Wv = m.in_proj_weight.chunk(3)
        else:
            Wq, Wk, Wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
        bq, bk, bv = m.in_proj_bias.chunk(3)
        N, L, _ = q_in.shape
        S = k_in.shape[1]

        def heads(t):
            return t.reshape(N, t.shape[1], H, E // H).transpose(1, 2)

        q, k, v = heads(q_in @ Wq.t() + bq), heads(k_in @ Wk.t() + bk), heads(v_in @ Wv.t() + bv)
        mask = None
        if "attn_mask" in kw:
            am = kw["attn_mask"]
            mask = additive(am, q_in.dtype) if am.dtype == torch.bool else am
        if "key_padding_mask" in kw:
            mask = additive(kw["key_padding_mask"], q_in.dtype).reshape(N, 1, 1, S)
        s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(E // H)
        if mask is not None:
            s = s + mask
        P = softmax_e(s, -1)
        o = torch.matmul(P, v).transpose(1, 2).reshape(N, L, E) @ m.out_proj.weight.t() + m.out_proj.bias
        weights = None
        if self.variant == "weights":
            weights = P.mean(1)
        elif self.variant == "weights_per_head":
            weights = P
        return o, weights


class HandAttention(nn.Module):
    """Attention written by hand: products of input-dependent matrices (q @ k.mT), permute,
    Tensor.softmax, division by an input-dependent norm. Its own elementary form."""

    def __init__(self, P=3, w=6):
        super().__init__()
        self.P = P
        self.embed, self.q, self.k, self.out = nn.Linear(3, w), nn.Linear(w, w), nn.Linear(w, w), nn.Linear(w, 1)

    def forward(self, x, elementary=False):
        N = x.shape[0]
        t = torch.tanh(self.embed(x.reshape(N, self.P, 3)))
        q, k = self.q(t), self.k(t)
        s = (q @ k.mT) / (1 + (q * q).sum(-1, keepdim=True)).sqrt()
        p = s.softmax(-1) if not elementary else softmax_e(s, -1)
        o = p @ t.permute(0, 1, 2) + torch.matmul(p.transpose(1, 2), t)
        return self.out(o.mean(1))[:, 0]


def _build(cls, seed, **kw):
    torch.manual_seed(seed)
    return _randomise(cls(**kw).double(), seed)


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
