"""Shared helpers of tests/ops/test_table.py and tests/ops/test_ops_autograd.py.

* ``devices()``: the devices every test is parametrised over (cpu, plus cuda when available).
* ``nested_autograd(f, x, n)``: derivatives 0..n of an elementwise ``f`` by repeated
  ``torch.autograd.grad(create_graph=True)`` -- the independent oracle "torch's own autograd".
* ``SPECS``: every activation of the table, with non-default parameters where it has any.
* ``mp_derivatives(spec, z, n)``: the true derivatives 0..n at a float64 point, in mpmath, with
  the working precision raised until the result is stable (so exponentially small derivatives
  at large |z| are exact, not cancellation noise of the numerical differentiation).

* ``WIDE_WIDTHS``, ``grid_pass(device, items_per_block)``, ``lanes_per_row(w)``: shapes that make
  every loop of the CUDA kernels run more than once (issue 17), from the launch caps of
  csrc/cuda/*.cu.

Nothing here calls torchhessdiag's kernels: the expected values of the tests come from torch's
own functions and autograd, or from mpmath.
"""

from __future__ import annotations

import math
from typing import Callable, List, Sequence

import mpmath
import numpy as np
import torch

from torchhessdiag.activations import NAMES, ActivationSpec, make_spec

mpmath.mp.dps = 50


def devices() -> List[str]:
    """cpu always; cuda too when a GPU is visible (the same tests then run on both)."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


def nested_autograd(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n: int) -> torch.Tensor:
    """Stack [f(x), f'(x), ..., f^(n)(x)] of an elementwise f, by nested torch.autograd.grad.

    A level that no longer requires grad (f piecewise linear, say) and every level after it is
    returned as zeros, as is a gradient that autograd reports as unused (None).
    """
    xx = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = f(xx)
        out = [y.detach()]
        cur = y
        for _ in range(n):
            if cur is None or not cur.requires_grad:
                cur = None
                out.append(torch.zeros_like(x))
                continue
            (g,) = torch.autograd.grad(cur, xx, torch.ones_like(cur), create_graph=True, allow_unused=True)
            cur = g
            out.append(torch.zeros_like(x) if g is None else g.detach())
    return torch.stack(out)


# ---- the activations under test --------------------------------------------------------------

def _spec_id(spec: ActivationSpec) -> str:
    return str(spec).replace(" ", "")


#: Every activation with its default parameters, plus the non-default parameter sets.
SPECS: List[ActivationSpec] = [make_spec(n) for n in NAMES] + [
    make_spec("softplus", beta=2.0, threshold=5.0),
    make_spec("softplus", beta=0.5),
    make_spec("sin", w=3.0),
    make_spec("cos", w=3.0),
    make_spec("elu", alpha=0.7),
    make_spec("celu", alpha=0.7),
    make_spec("leaky_relu", negative_slope=0.2),
]
SPEC_IDS = [_spec_id(s) for s in SPECS]

SMOOTH = frozenset({"identity", "tanh", "sigmoid", "softplus", "silu", "gelu", "gelu_tanh", "sin", "cos", "exp"})
KINKED = frozenset({"elu", "celu", "relu", "leaky_relu"})  # non-smooth at z = 0


def softplus_threshold_point(spec: ActivationSpec) -> float:
    """The z with beta * z == threshold exactly (float64), for softplus specs."""
    z = spec.b / spec.a
    assert z * spec.a == spec.b, "choose parameters with an exactly representable threshold point"
    return z


# ---- tolerance against torch's own nested autograd -----------------------------------------


def torch_tolerance(spec, expected: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """|ours - torch| <= tol, elementwise, for orders 0..4 stacked in `expected`.

    1e-12 * max(1, |torch|): torch's nested autograd evaluates the textbook formulas
    (1 - tanh^2, sigmoid (1 - sigmoid), polynomial-times-(1 - tanh^2) for gelu_tanh), whose
    rounding error is a few hundred ulp of the O(1) terms at worst (measured: 2e-13 for
    gelu_tanh's 4th derivative at z = -7.2); below |torch| = 1 the error is absolute, since
    torch's cancellations leave absolute, not relative, errors there.

    celu with an alpha that is not a float32-exact reciprocal: torch's derivative formula for
    celu (derivatives.yaml: ``elu_backward(grad, alpha, 1, 1.0/alpha.toFloat(), ...)``) rounds
    1/alpha to float32, so torch's own derivatives of order n carry a relative error of about
    (n + |z|/alpha) * delta, delta = |float32(1/alpha) * alpha - 1| (1.7e-8 for alpha = 0.7).
    Our table uses the exact 1/alpha (checked against mpmath below), so the tolerance against
    torch has to allow torch's error, with a factor 2 of margin.
    """
    tol = 1e-12 * expected.abs().clamp_min(1.0)
    if spec.name == "celu":
        delta = abs(float(np.float32(1.0 / spec.a)) * spec.a - 1.0)
        if delta > 0:
            n = torch.arange(expected.shape[0], device=z.device, dtype=z.dtype)[:, None]
            tol = tol + 2 * delta * (n + z.abs() / spec.a) * expected.abs() * (n > 0)
    return tol


# ---- mpmath: the true derivatives ------------------------------------------------------------

# gelu_tanh's constants as float64 numbers: torch (and any float64 implementation) evaluates the
# function with sqrt(2/pi) and 0.044715 rounded to double; the approximation itself is defined by
# these constants, so the exact reference is the function with the rounded constants (their
# rounding moves 2u by up to ~1e-13 relative at |z| = 30, which would otherwise dominate).
_K0 = math.sqrt(2.0 / math.pi)
_K1 = 0.044715


def mp_parts(spec: ActivationSpec, z0: float):
    """The activation near the float64 point z0 as ``c0 + c1*z + tail(z)``, for mpmath.

    Returns (c0, c1, tail). The split puts the activation's linear asymptote (1 for tanh at
    z > 0, z for softplus / silu / gelu at z > 0, -alpha for elu at z < 0, ...) into c0 + c1*z
    and leaves a tail whose derivatives are of the size of the tail itself, so that the
    numerical differentiation of the tail (error ~ 10^-dps * |tail|) is accurate even where the
    activation's higher derivatives are exponentially small (tanh'' at z = 20 is 7e-17).

    Piecewise activations are analytic on each piece; the piece is fixed by z0 (torch's
    convention: softplus is linear where beta*z0 > threshold; elu/celu/relu/leaky_relu take the
    negative piece where z0 <= 0), so the differentiation never straddles a kink. Callers avoid
    z0 == 0 for elu/celu/relu/leaky_relu, where the derivatives are conventions (tested against
    torch instead).
    """
    mp = mpmath.mp
    name, a = spec.name, mpmath.mpf(spec.a)
    zero = lambda z: 0 * z  # noqa: E731
    pos = z0 >= 0
    if name == "identity":
        return 0, 1, zero
    if name == "tanh":
        if pos:
            return 1, 0, lambda z: -2 / (1 + mp.exp(2 * z))
        return -1, 0, lambda z: 2 / (1 + mp.exp(-2 * z))
    if name == "sigmoid":
        if pos:
            return 1, 0, lambda z: -1 / (1 + mp.exp(z))
        return 0, 0, lambda z: 1 / (1 + mp.exp(-z))
    if name == "softplus":  # log1p(exp(a z)) / a below the threshold, z above it (torch)
        if spec.a * z0 > spec.b:
            return 0, 1, zero
        if spec.a * z0 > 0:
            return 0, 1, lambda z: mp.log1p(mp.exp(-a * z)) / a
        return 0, 0, lambda z: mp.log1p(mp.exp(a * z)) / a
    if name == "silu":  # z sigmoid(z)
        if pos:
            return 0, 1, lambda z: -z / (1 + mp.exp(z))
        return 0, 0, lambda z: z / (1 + mp.exp(-z))
    if name == "gelu":  # z Phi(z), Phi(z) = erfc(-z/sqrt2)/2
        if pos:
            return 0, 1, lambda z: -z * mp.erfc(z / mp.sqrt(2)) / 2
        return 0, 0, lambda z: z * mp.erfc(-z / mp.sqrt(2)) / 2
    if name == "gelu_tanh":  # z (1 + tanh u)/2 = z / (1 + exp(-2u)), u = k0 (z + k1 z^3)
        k0, k1 = mpmath.mpf(_K0), mpmath.mpf(_K1)
        u = lambda z: k0 * (z + k1 * z**3)  # noqa: E731
        if pos:
            return 0, 1, lambda z: -z / (1 + mp.exp(2 * u(z)))
        return 0, 0, lambda z: z / (1 + mp.exp(-2 * u(z)))
    if name == "sin":
        return 0, 0, lambda z: mp.sin(a * z)
    if name == "cos":
        return 0, 0, lambda z: mp.cos(a * z)
    if name == "exp":
        return 0, 0, mp.exp
    if name == "elu":  # alpha (e^z - 1) for z <= 0
        return (-a, 0, lambda z: a * mp.exp(z)) if z0 <= 0 else (0, 1, zero)
    if name == "celu":  # alpha (e^(z/alpha) - 1) for z <= 0
        return (-a, 0, lambda z: a * mp.exp(z / a)) if z0 <= 0 else (0, 1, zero)
    if name == "relu":
        return (0, 0, zero) if z0 <= 0 else (0, 1, zero)
    if name == "leaky_relu":
        return (0, a, zero) if z0 <= 0 else (0, 1, zero)
    raise KeyError(name)


def _mp_derivs_at(spec: ActivationSpec, z0: float, n: int, dps: int):
    """(derivatives 0..n, largest |derivative of the tail|) at working precision dps."""
    with mpmath.workdps(dps):
        c0, c1, tail = mp_parts(spec, z0)
        z = mpmath.mpf(z0)
        t = [+v for v in mpmath.diffs(tail, z, n)]
        d = list(t)
        d[0] = d[0] + c0 + c1 * z
        if n >= 1:
            d[1] = d[1] + c1
        return [+v for v in d], max(abs(v) for v in t)


def mp_derivatives(spec: ActivationSpec, z0: float, n: int) -> List[float]:
    """[f(z0), ..., f^(n)(z0)] exactly (to far more than float64 precision), as floats.

    mpmath.diffs differentiates numerically with an error ~ 10^-dps relative to the size S of
    the function differentiated (the tail of mp_parts, and its derivatives). The precision is
    doubled until two successive results agree to 1e-30 relative, or to 10^-(dps-10) S absolute
    (an exact zero, such as the second derivative of tanh at z = 0, is then known to
    ~10^-2dps S, and returned as 0).
    """
    if spec.name == "gelu":
        return _mp_gelu_derivatives(z0, n)
    dps = 50
    prev, _ = _mp_derivs_at(spec, z0, n, dps)
    while True:
        cur, scale = _mp_derivs_at(spec, z0, n, 2 * dps)
        floor = mpmath.mpf(10) ** -(dps - 10) * scale
        if all(abs(c - p) <= mpmath.mpf(10) ** -30 * abs(c) + floor for c, p in zip(cur, prev)):
            # below the noise of this precision: an exact zero (tanh'' at 0)
            noise = mpmath.mpf(10) ** -(2 * dps - 10) * scale
            return [0.0 if abs(c) <= noise else float(c) for c in cur]
        dps *= 2
        if dps > 3200:
            raise RuntimeError(f"mpmath did not converge for {spec} at {z0}")
        prev = cur


def _mp_gelu_derivatives(z0: float, n: int) -> List[float]:
    """gelu(z) = z Phi(z) in closed form (mpmath's erfc is slow at the working precisions that
    numerical differentiation needs): by Leibniz, gelu^(n) = z Phi^(n) + n Phi^(n-1), and by
    Rodrigues' formula Phi^(k) = phi^(k-1) = (-1)^(k-1) He_(k-1)(z) phi(z), with the
    probabilists' Hermite polynomial He_m(z) = 2^(-m/2) H_m(z / sqrt 2) (mpmath.hermite is H).
    No cancellation that 50 digits cannot absorb. tests/ops/test_table.py checks this closed form
    against mpmath.diffs at moderate points."""
    with mpmath.workdps(50):
        mp = mpmath.mp
        z = mpmath.mpf(z0)
        phi = mp.exp(-z * z / 2) / mp.sqrt(2 * mp.pi)
        Phi = [mp.erfc(-z / mp.sqrt(2)) / 2] + [
            (-1) ** (k - 1) * mp.hermite(k - 1, z / mp.sqrt(2)) / mp.sqrt(2) ** (k - 1) * phi
            for k in range(1, n + 1)
        ]
        d = [z * Phi[0]] + [z * Phi[k] + k * Phi[k - 1] for k in range(1, n + 1)]
        return [float(v) for v in d]


def mp_derivatives_many(spec: ActivationSpec, zs: Sequence[float], n: int) -> torch.Tensor:
    """mp_derivatives at each point: tensor (n+1, len(zs)), float64."""
    cols = [mp_derivatives(spec, float(z), n) for z in zs]
    return torch.tensor(cols, dtype=torch.float64).T.contiguous()


# ---- shapes that make every loop of the CUDA kernels iterate (issue 17) ------------------------
#
# Every launch in csrc/cuda/*.cu caps its grid at 32 blocks per SM (grid_for in engine_ops.cu,
# CudaExec::run in act_ops.cu) and walks the rest with a grid-stride loop; the layer kernel's
# lanes stride over the width j. These widths run the lane loop with one lane per row (w = 1, 32
# rows per warp), with a partial warp (31), with a second lane pass (33) and with several (100).

WIDE_WIDTHS = (1, 31, 33, 100)
GRID_BLOCKS_PER_SM = 32  # csrc/cuda/engine_ops.cu grid_for, csrc/cuda/act_ops.cu CudaExec::run
THREADS_PER_BLOCK = 256  # elementwise, taylor and backward kernels
WARPS_PER_BLOCK = 8  # the layer forward kernel (kWarpsPerBlock)


def lanes_per_row(w: int) -> int:
    """Lanes per row of the layer forward kernel: smallest power of two >= w, at most 32."""
    g = 1
    while g < w and g < 32:
        g *= 2
    return g


def grid_pass(device, items_per_block: int) -> int:
    """Work items one pass of a capped grid-stride launch covers on a CUDA device (0 on the CPU,
    which has no grid)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(dev).multi_processor_count * GRID_BLOCKS_PER_SM * items_per_block


def beyond_one_pass(items_per_pass: int, per_item: int) -> int:
    """The smallest count n with n * per_item > 1.25 passes of the grid, plus 7 (a ragged last
    pass): every grid-stride loop runs a second, partial, iteration."""
    return (5 * items_per_pass) // (4 * per_item) + 7
