"""The elementary twins of the norm / softmax / attention models (was the top half of
tests/test_models_jets.py, now tests/general/test_taylor_nn.py; shared with tests/general/test_fallback.py
and tests/general/test_operators.py).

Every model here has an *elementary twin*: the same parameters, with layer norm, RMS norm, softmax
and attention written out in elementary torch ops (mean, sqrt, exp, sum, matmul, ...); call a model
with ``elementary=True`` for the twin. The oracle differentiates the twin, never torch's own nested
derivatives of the fused functions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

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
