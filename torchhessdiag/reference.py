"""Pure-PyTorch reference of the derivative table, mirrored 1:1 from ``csrc/activations.h``.

Same building blocks, same names, same branches, same algebra as the C++ header, written with
torch ops so that it runs on any device and is itself differentiable. It is

* the oracle the tests hold the compiled kernels against (tests/ops/test_table.py), and
* the kernel of the torchhessdiag ops wherever no compiled kernel exists (torchhessdiag/_reference_kernels.py).

Keep it in step with the header: a change to one formula is a change to both, and
tests/ops/test_table.py compares the two on a dense grid in float32 and float64.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

Tensor = torch.Tensor

MAX_ORDER = 4  # kMaxOrder


# ---- shared building blocks ------------------------------------------------------------------


def exp_pair(a: Tensor):
    """e = exp(-a), em = e - 1, both accurate, for a >= 0 (ExpPair)."""
    small = a < 1.0
    em_s = torch.expm1(-a)
    e_l = torch.exp(-a)
    e = torch.where(small, 1.0 + em_s, e_l)
    em = torch.where(small, em_s, e_l - 1.0)
    return e, em


def tanh_parts(z: Tensor):
    """tanh(z) = sign(z)(1-e)/(1+e), sech^2(z) = 4e/(1+e)^2, e = exp(-2|z|) (TanhParts)."""
    e, em = exp_pair(2.0 * z.abs())
    r = 1.0 + e
    t = torch.copysign(-em / r, z)
    s = 4.0 * e / (r * r)
    return t, s


def sigmoid_parts(z: Tensor):
    """p = sigmoid(z), q = 1 - p, pq = p q, w = q - p = -tanh(z/2) (SigmoidParts)."""
    e, em = exp_pair(z.abs())
    r = 1.0 / (1.0 + e)
    pos = z >= 0
    p = torch.where(pos, r, e * r)
    q = torch.where(pos, e * r, r)
    pq = e * r * r
    w = torch.copysign(-em * r, -z)
    return p, q, pq, w


def sigmoid_derivs(P, n: int) -> List[Tensor]:
    p, _q, pq, w = P
    d = [p]
    if n >= 1:
        d.append(pq)
    if n >= 2:
        d.append(pq * w)
    if n >= 3:
        d.append(pq * (1.0 - 6.0 * pq))
    if n >= 4:
        d.append(pq * w * (1.0 - 12.0 * pq))
    return d


def times_z(z: Tensor, h: List[Tensor]) -> List[Tensor]:
    """(z h)^(n) = z h^(n) + n h^(n-1)."""
    out = list(h)
    for n in range(len(h) - 1, 0, -1):
        out[n] = z * h[n] + n * h[n - 1]
    out[0] = z * h[0]
    return out


def _pad(d: List[Tensor], z: Tensor, n: int) -> List[Tensor]:
    """zero_from: orders past those given are exactly zero."""
    return (d + [torch.zeros_like(z)] * (n + 1 - len(d)))[: n + 1]


# ---- the table -------------------------------------------------------------------------------


def identity(z, a, b, n):
    return _pad([z.clone(), torch.ones_like(z)], z, n)


def tanh(z, a, b, n):
    t, s = tanh_parts(z)
    d = [t, s, -2.0 * t * s, s * (4.0 - 6.0 * s), 8.0 * t * s * (3.0 * s - 1.0)]
    return d[: n + 1]


def sigmoid(z, a, b, n):
    return sigmoid_derivs(sigmoid_parts(z), n)


def softplus(z, beta, threshold, n):
    u = beta * z
    above = u > threshold
    P = sigmoid_parts(u)
    sg = sigmoid_derivs(P, max(n - 1, 0))
    lin = _pad([z, torch.ones_like(z)], z, n)
    d = [(torch.clamp_min(u, 0.0) + torch.log1p(torch.exp(-u.abs()))) / beta]
    curved = u < threshold
    bp = 1.0
    for k in range(1, n + 1):
        dk = bp * sg[k - 1]
        d.append(dk if k == 1 else torch.where(curved, dk, torch.zeros_like(dk)))
        bp *= beta
    return [torch.where(above, lin[k], d[k]) for k in range(n + 1)]


def silu(z, a, b, n):
    return times_z(z, sigmoid_derivs(sigmoid_parts(z), n))


def gelu(z, a, b, n):
    inv_sqrt2 = 0.70710678118654752440
    inv_sqrt2pi = 0.39894228040143267794
    phi = torch.exp(-0.5 * z * z) * inv_sqrt2pi
    z2 = z * z
    h = [0.5 * torch.erfc(-z * inv_sqrt2), phi, -z * phi, (z2 - 1.0) * phi, z * (3.0 - z2) * phi]
    return times_z(z, h[: n + 1])


def gelu_tanh(z, a, b, n):
    k0 = 0.79788456080286535588
    k1 = 0.044715
    z2 = z * z
    u = k0 * (z + k1 * z2 * z)
    u1 = k0 * (1.0 + 3.0 * k1 * z2)
    u2 = 6.0 * k0 * k1 * z
    u3 = 6.0 * k0 * k1
    S = sigmoid_derivs(sigmoid_parts(2.0 * u), n)
    h = [S[0]]
    if n >= 1:
        h.append(2.0 * S[1] * u1)
    if n >= 2:
        h.append(4.0 * S[2] * u1 * u1 + 2.0 * S[1] * u2)
    if n >= 3:
        h.append(8.0 * S[3] * u1 * u1 * u1 + 3.0 * 4.0 * S[2] * u1 * u2 + 2.0 * S[1] * u3)
    if n >= 4:
        h.append(
            16.0 * S[4] * u1 * u1 * u1 * u1
            + 6.0 * 8.0 * S[3] * u1 * u1 * u2
            + 4.0 * S[2] * (3.0 * u2 * u2 + 4.0 * u1 * u3)
        )
    return times_z(z, h)


def sin(z, w, b, n):
    s, c = torch.sin(w * z), torch.cos(w * z)
    return [s, w * c, -w * w * s, -w * w * w * c, w * w * w * w * s][: n + 1]


def cos(z, w, b, n):
    s, c = torch.sin(w * z), torch.cos(w * z)
    return [c, -w * s, -w * w * c, w * w * w * s, w * w * w * w * c][: n + 1]


def exp(z, a, b, n):
    e = torch.exp(z)
    return [e] * (n + 1)


def elu(z, alpha, b, n):
    neg1, neg2 = z <= 0, z < 0
    zn = torch.where(neg1, z, torch.zeros_like(z))  # the header never evaluates exp(z > 0)
    e = torch.where(neg1, alpha * torch.exp(zn), torch.zeros_like(z))
    d = [torch.where(neg1, alpha * torch.expm1(zn), z)]
    if n >= 1:
        d.append(torch.where(neg1, e, torch.ones_like(z)))
    for _ in range(2, n + 1):
        d.append(torch.where(neg2, e, torch.zeros_like(z)))
    return d


def celu(z, alpha, b, n):
    neg1, neg2 = z <= 0, z < 0
    inv = 1.0 / alpha
    zn = torch.where(neg1, z, torch.zeros_like(z))  # the header never evaluates exp(z > 0)
    e = torch.where(neg1, torch.exp(zn * inv), torch.zeros_like(z))
    d = [torch.where(neg1, alpha * torch.expm1(zn * inv), z)]
    if n >= 1:
        d.append(torch.where(neg1, e, torch.ones_like(z)))
    for _ in range(2, n + 1):
        e = e * inv
        d.append(torch.where(neg2, e, torch.zeros_like(z)))
    return d


def relu(z, a, b, n):
    neg = z <= 0
    zero = torch.zeros_like(z)
    return _pad([torch.where(neg, zero, z), torch.where(neg, zero, torch.ones_like(z))], z, n)


def leaky_relu(z, slope, b, n):
    pos = z > 0
    return _pad([torch.where(pos, z, z * slope), torch.where(pos, torch.ones_like(z), torch.full_like(z, slope))], z, n)


TABLE: Dict[str, Callable] = {
    "identity": identity,
    "tanh": tanh,
    "sigmoid": sigmoid,
    "softplus": softplus,
    "silu": silu,
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "sin": sin,
    "cos": cos,
    "exp": exp,
    "elu": elu,
    "celu": celu,
    "relu": relu,
    "leaky_relu": leaky_relu,
}


def derivatives(z: Tensor, act: str, a: float, b: float, n: int) -> List[Tensor]:
    """[sigma(z), sigma'(z), ..., sigma^(n)(z)] for 0 <= n <= 4, from the reference table."""
    if not 0 <= n <= MAX_ORDER:
        raise ValueError(f"reference.derivatives: order {n} is outside the table (0..{MAX_ORDER})")
    return [t.contiguous() for t in TABLE[act](z, a, b, n)]


# ---- the engine's per-layer op (csrc/engine_ops.h), in torch ops ------------------------------


def jet_layer(J: Tensor, s1: Tensor, c: Tensor, need_ja: bool):
    """(Ja, acc) = (s1 * J, sum_j c[i,n,j] J[n,k,j]^2); J (N,K,w), s1 (N,w), c (m,N,w)."""
    acc = torch.einsum("inj,nkj->ink", c, J * J)
    Ja = s1.unsqueeze(1) * J if need_ja else J.new_empty((0,))
    return Ja, acc


def jet_layer_backward(gJa, gacc: Tensor, J: Tensor, s1: Tensor, c: Tensor):
    """(dJ, ds1, dc) of jet_layer, in torch ops (differentiable again)."""
    t = torch.einsum("ink,inj->nkj", gacc, c)
    dJ = 2.0 * J * t
    dc = torch.einsum("ink,nkj->inj", gacc, J * J)
    if gJa is not None:
        dJ = dJ + gJa * s1.unsqueeze(1)
        ds1 = (gJa * J).sum(1)
    else:
        ds1 = torch.zeros_like(s1)
    return dJ, ds1, dc


# ---- Faa di Bruno over a Taylor jet (csrc/taylor.h), in torch ops -----------------------------


def zsum(*terms: Optional[Tensor]) -> Optional[Tensor]:
    """The sum of the terms, left to right; None is an identically zero term (None if all are)."""
    out = None
    for t in terms:
        if t is None:
            continue
        out = t if out is None else out + t
    return out


def zprod(*factors) -> Optional[Tensor]:
    """The product of the factors (tensors or numbers), left to right; None (zero) if any is None."""
    for f in factors:
        if f is None:
            return None
    out = factors[0]
    for f in factors[1:]:
        out = out * f
    return out


def faa_di_bruno(d: Sequence[Optional[Tensor]], h: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """[y1, ..., yn] of sigma(h), n = len(h) <= 4, from d = [sigma'(h0), ..., sigma^(n)(h0)] and
    the jet's coefficients h = [h1, ..., hn] (broadcasting against each other; None: identically
    zero, and so is a result made only of zero terms):

        y1 = d1 h1
        y2 = d2 h1^2 + d1 h2
        y3 = d3 h1^3 + 3 d2 h1 h2 + d1 h3
        y4 = d4 h1^4 + 6 d3 h1^2 h2 + d2 (3 h2^2 + 4 h1 h3) + d1 h4

    The one Python spelling of Faa di Bruno's formula, in csrc/taylor.h's order of operations
    (the C++ one): the reference kernel of taylor_act and the jets' activation rule use it."""
    n = len(h)
    d = list(d) + [None] * (4 - len(d))
    h1, h2, h3, h4 = list(h) + [None] * (4 - n)
    y = [zprod(d[0], h1)]
    if n >= 2:
        y.append(zsum(zprod(d[1], h1, h1), zprod(d[0], h2)))
    if n >= 3:
        y.append(zsum(zprod(d[2], h1, h1, h1), zprod(3.0, d[1], h1, h2), zprod(d[0], h3)))
    if n >= 4:
        y.append(zsum(zprod(d[3], h1, h1, h1, h1), zprod(6.0, d[2], h1, h1, h2),
                      zprod(d[1], zsum(zprod(3.0, h2, h2), zprod(4.0, h1, h3))), zprod(d[0], h4)))
    return y


def taylor_act(D: Tensor, H: Tensor) -> Tensor:
    """Y (n, N, K, w): orders 1..n of sigma(h) from D = sigma^(1..n)(h0) (n, N, w) and the jet's
    derivative coefficients H = h1..hn (n, N, K, w); 1 <= n <= 4. Mirrors csrc/taylor.h."""
    d = [t.unsqueeze(1) for t in D.unbind(0)]  # each (N, 1, w): broadcast over the K directions
    return torch.stack(faa_di_bruno(d, H.unbind(0)))


def taylor_act_backward(gY: Tensor, D: Tensor, H: Tensor):
    """(dD, dH) of taylor_act, in torch ops (differentiable again). Mirrors csrc/taylor.h."""
    n = H.shape[0]
    d = [t.unsqueeze(1) for t in D.unbind(0)]
    h = H.unbind(0)
    g = gY.unbind(0)
    h1, g1 = h[0], g[0]
    gd = [g1 * h1]
    gh = [g1 * d[0]]
    if n >= 2:
        h2, g2 = h[1], g[1]
        gd[0] = gd[0] + g2 * h2
        gd.append(g2 * h1 * h1)
        gh[0] = gh[0] + g2 * 2.0 * d[1] * h1
        gh.append(g2 * d[0])
    if n >= 3:
        h3, g3 = h[2], g[2]
        gd[0] = gd[0] + g3 * h3
        gd[1] = gd[1] + g3 * 3.0 * h1 * h2
        gd.append(g3 * h1 * h1 * h1)
        gh[0] = gh[0] + g3 * (3.0 * d[2] * h1 * h1 + 3.0 * d[1] * h2)
        gh[1] = gh[1] + g3 * 3.0 * d[1] * h1
        gh.append(g3 * d[0])
    if n >= 4:
        h4, g4 = h[3], g[3]
        gd[0] = gd[0] + g4 * h4
        gd[1] = gd[1] + g4 * (3.0 * h2 * h2 + 4.0 * h1 * h3)
        gd[2] = gd[2] + g4 * 6.0 * h1 * h1 * h2
        gd.append(g4 * h1 * h1 * h1 * h1)
        gh[0] = gh[0] + g4 * (4.0 * d[3] * h1 * h1 * h1 + 12.0 * d[2] * h1 * h2 + 4.0 * d[1] * h3)
        gh[1] = gh[1] + g4 * (6.0 * d[2] * h1 * h1 + 6.0 * d[1] * h2)
        gh[2] = gh[2] + g4 * 4.0 * d[1] * h1
        gh.append(g4 * d[0])
    dD = torch.stack([t.sum(1) for t in gd])  # sum over the K directions
    return dD, torch.stack(gh)
