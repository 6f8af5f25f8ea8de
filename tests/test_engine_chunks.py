"""The no-grad engine path: chunks of points with reused row buffers and the in-place layer
kernel must give the same numbers as the differentiable one-block path and as torch.func.

float64, 1e-12 relative to the largest entry: the paths evaluate the same expressions (the
summation order of a GEMM may differ between row counts); observed differences ~1e-16.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchhessdiag as thd
from torchhessdiag import engine


def _model(device):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 12), nn.SiLU(), nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 2)
    ).double().to(device)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("chunk_points", [1, 3, 7, 1000])
def test_chunked_no_grad_matches_graph_path_and_torch_func(device, monkeypatch, chunk_points):
    model = _model(device)
    x = torch.randn(23, 5, dtype=torch.float64, device=device)
    H = torch.func.vmap(torch.func.hessian(model))(x).diagonal(dim1=-2, dim2=-1)  # (N, m, d)
    graph = thd.mlp_derivatives(model, x, second="diag")  # parameters require grad: graph path
    assert graph.second.requires_grad
    monkeypatch.setattr(engine, "_CHUNK_ELEMENTS", chunk_points * 5 * 16)
    monkeypatch.setattr(engine, "_CHUNK_ELEMENTS_GPU", chunk_points * 5 * 16)
    with torch.no_grad():
        hd = thd.mlp_hessian_diag(model, x)
        lap = thd.mlp_laplacian(model, x)
        lap_xy = thd.mlp_laplacian(model, x, dims=[1, 3])
        out = thd.mlp_derivatives(model, x, second="diag")
    assert not hd.requires_grad
    assert _rel(hd, H) <= 1e-12
    assert _rel(lap, H.sum(-1)) <= 1e-12
    assert _rel(lap_xy, H[..., [1, 3]].sum(-1)) <= 1e-12
    assert _rel(out.second, graph.second.detach()) <= 1e-12
    assert _rel(out.value, model(x).detach()) <= 1e-12
    assert _rel(out.gradient, graph.gradient.detach()) <= 1e-12


def test_no_grad_path_used_when_nothing_requires_grad(device, reverse_path, monkeypatch):
    """Parameters frozen and x without grad: no graph is built, even in grad mode."""
    model = _model(device).requires_grad_(False)
    x = torch.randn(4, 5, dtype=torch.float64, device=device)
    calls = []
    real = engine._Workspace
    monkeypatch.setattr(engine, "_Workspace", lambda *a: calls.append(1) or real(*a))
    lap = thd.mlp_laplacian(model, x)
    assert calls and not lap.requires_grad
