"""Training through drop-in activations, and the caching of derivative values per graph node.

The drop-ins evaluate the derivative table once per autograd node and reuse the values on later
passes through the same node (nested-autograd loops pass once per input dimension). These tests
hold every such path against torch.nn's own autograd in float64:

* the Hessian diagonal by nested autograd, second level without and with create_graph;
* parameter gradients of a PDE-style loss built with create_graph=True on every level (this is
  where a wrong backward of mul_pair once gave wrong gradients while values were right);
* third derivatives w.r.t. x through the same loop;
* gradcheck/gradgradcheck of mul_pair itself.

Tolerance: 1e-12 relative to the largest entry. Both sides evaluate the same float64
expressions in a different order; observed differences are <= 2e-15 relative.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchhessdiag as thd

ACTS = [nn.Tanh(), nn.SiLU(), nn.GELU(), nn.Softplus(beta=2.0), nn.Sigmoid(), nn.ELU(alpha=0.7)]
REL = 1e-12


def _mlp(act, d, w, depth, m, seed):
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
    assert ((a - b).abs().max() / scale).item() <= REL, ((a - b).abs().max() / scale).item()


@pytest.mark.parametrize("act", ACTS, ids=lambda a: type(a).__name__)
@pytest.mark.parametrize("create_graph", [False, True])
def test_hessian_diag_matches_torch_nn(device, act, create_graph):
    ref_model = _mlp(act, 3, 8, 2, 1, seed=0).to(device)
    model = thd.nn.convert(ref_model)
    x = torch.randn(5, 3, dtype=torch.float64, device=device)
    ref = _hess_diag(ref_model, x.clone().requires_grad_(), create_graph)
    ours = _hess_diag(model, x.clone().requires_grad_(), create_graph)
    _close(ours, ref)


@pytest.mark.parametrize("act", ACTS, ids=lambda a: type(a).__name__)
def test_training_gradients_match_torch_nn(device, act):
    ref_model = _mlp(act, 3, 8, 2, 2, seed=1).to(device)
    model = thd.nn.convert(ref_model)
    x = torch.randn(6, 3, dtype=torch.float64, device=device)

    def grads(mdl):
        loss = (_hess_diag(mdl, x.clone().requires_grad_(), True) ** 2).sum()
        return torch.autograd.grad(loss, list(mdl.parameters()), allow_unused=True, materialize_grads=True)

    for ours, ref in zip(grads(model), grads(ref_model)):
        _close(ours, ref)


@pytest.mark.parametrize("act", ACTS, ids=lambda a: type(a).__name__)
def test_third_derivative_through_the_loop(device, act):
    ref_model = _mlp(act, 2, 6, 2, 1, seed=2).to(device)
    model = thd.nn.convert(ref_model)
    x = torch.randn(4, 2, dtype=torch.float64, device=device)

    def third(mdl):
        xx = x.clone().requires_grad_()
        return torch.autograd.grad(_hess_diag(mdl, xx, True).sum(), xx)[0]

    _close(third(model), third(ref_model))


def test_repeated_passes_reuse_the_same_answer(device):
    """Many backward passes through the same nodes (cached derivatives) give the same numbers as
    a fresh graph each time."""
    ref_model = _mlp(nn.Tanh(), 4, 8, 3, 1, seed=3).to(device)
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
