"""Large inputs: ``chunk_size`` (same results, bounded memory) and kernels past 2^31 elements.

What holds for ``chunk_size=c`` (docs/input-policy.md, "Large inputs"):

* every block handed to the engine has at most c points, on the no-grad path (reused row buffers
  sized for min(N, c) points) and on the graph path (the blocks' results concatenated);
* the result is *bitwise* the concatenation of the calls on each block of c points alone: a
  point's numbers depend only on the rows of its own block;
* against one unchunked call it agrees to rounding, not bitwise: the GEMM library (MKL here)
  may choose a different blocking -- and so a different summation order -- for a different
  number of rows (measured: a (1000, 48) @ (48, 64) float64 product and its row blocks differ by
  up to 1.4e-14 for blocks of 1, 3, 7, 333 rows and are equal for 64 or 100). Float64 tolerance
  1e-13 relative to the largest entry;
* memory: without a graph the peak no longer grows with N (measured below with the profiler's
  memory events); with a graph the saved graph grows with N whatever c is -- the recipe for
  bounded training memory is one backward per chunk (gradient accumulation), tested here too.

And the no-grad engine path's own chunks (was tests/test_engine_chunks.py): chunks of points with
reused row buffers and the in-place layer kernel give the same numbers as the differentiable
one-block path and as torch.func.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchhessdiag as thd
from torchhessdiag import engine, ops

from _random_models import ACT_BY_LABEL, build_mlp, func_hessian, rel_err

D = 4


def _model(device, width=12, m=2, seed=0):
    return build_mlp(D, [width, width], m, [ACT_BY_LABEL["tanh"], ACT_BY_LABEL["silu"]], seed=seed, device=device)


def _x(device, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64).to(device)


CALLS = {
    "mlp_laplacian": lambda m, x, **kw: thd.mlp_laplacian(m, x, dims=[0, 2], **kw),
    "mlp_hessian_diag": lambda m, x, **kw: thd.mlp_hessian_diag(m, x, **kw),
    "mlp_derivatives": lambda m, x, **kw: torch.cat(
        [t.reshape(t.shape[0], -1) for t in thd.mlp_derivatives(m, x, second="diag", **kw)], 1
    ),
    "mlp_weighted_laplacian": lambda m, x, **kw: thd.mlp_weighted_laplacian(
        m, x, factor=torch.arange(1.0, 1.0 + 2 * D, dtype=x.dtype, device=x.device).view(D, 2), **kw
    ),
    "mlp_mixed_partials": lambda m, x, **kw: thd.mlp_mixed_partials(m, x, [(0, 1), (3, 3)], **kw),
    "mlp_laplacian_hutchinson": lambda m, x, **kw: thd.mlp_laplacian_hutchinson(
        m, x, num_samples=5, generator=torch.Generator(device=x.device).manual_seed(7), **kw
    ),
}


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "graph"])
@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_chunks_bitwise_equal_separate_calls(device, name, chunk, grad):
    model, _ = _model(device)
    x = _x(device, 19)
    call = CALLS[name]
    with torch.set_grad_enabled(grad):
        got = call(model, x, chunk_size=chunk)
        blocks = torch.cat([call(model, x[i : i + chunk]) for i in range(0, 19, chunk)])
        whole = call(model, x)
    assert got.requires_grad == grad
    assert torch.equal(got, blocks)
    assert rel_err(got.detach(), whole.detach()) <= 1e-13


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "graph"])
@pytest.mark.parametrize("name", list(CALLS))
def test_no_block_exceeds_chunk_size(device, reverse_path, monkeypatch, name, grad):
    model, _ = _model(device)
    sizes = []
    real = engine._run_block

    def spy(layers, x, *args):
        sizes.append(x.shape[0])
        return real(layers, x, *args)

    monkeypatch.setattr(engine, "_run_block", spy)
    with torch.set_grad_enabled(grad):
        CALLS[name](model, _x(device, 23), chunk_size=5)
        assert sizes == [5, 5, 5, 5, 3]
        sizes.clear()
        CALLS[name](model, _x(device, 23), chunk_size=10**9)  # larger than N: one block
        assert sizes == [23]


def test_chunk_size_lowers_the_automatic_chunk_only(device, reverse_path, monkeypatch):
    """No graph: the automatic chunk (about _CHUNK_ELEMENTS row elements) still applies when it is
    smaller than chunk_size; the reused row buffers are sized for the smaller of the two."""
    model, _ = _model(device)
    per_point = D * 12  # K * widest layer
    monkeypatch.setattr(engine, "_CHUNK_ELEMENTS", 4 * per_point)
    monkeypatch.setattr(engine, "_CHUNK_ELEMENTS_GPU", 4 * per_point)
    sizes, ws = [], []
    real_block, real_ws = engine._run_block, engine._Workspace
    monkeypatch.setattr(engine, "_run_block", lambda layers, x, *a: sizes.append(x.shape[0]) or real_block(layers, x, *a))
    monkeypatch.setattr(engine, "_Workspace", lambda numel, like: ws.append(numel) or real_ws(numel, like))
    with torch.no_grad():
        thd.mlp_hessian_diag(model, _x(device, 10), chunk_size=6)
        assert sizes == [4, 4, 2] and ws == [4 * per_point]
        sizes.clear(), ws.clear()
        thd.mlp_hessian_diag(model, _x(device, 10), chunk_size=3)
        assert sizes == [3, 3, 3, 1] and ws == [3 * per_point]


def test_chunked_results_match_torch_func(device):
    model, oracle = _model(device)
    x = _x(device, 11)
    H = func_hessian(oracle, x).diagonal(dim1=-2, dim2=-1)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert rel_err(thd.mlp_hessian_diag(model, x, chunk_size=4).detach(), H) <= 1e-12
            assert rel_err(thd.mlp_laplacian(model, x, chunk_size=4).detach(), H.sum(-1)) <= 1e-12


def test_chunked_gradients_equal_unchunked(device):
    """With a graph the chunks' results are concatenated; the parameter and x gradients of a loss
    on them are those of the unchunked call (to rounding, 1e-13 relative)."""
    model, _ = _model(device)
    x = _x(device, 13).requires_grad_(True)
    params = list(model.parameters()) + [x]

    def grads(out):
        gs = torch.autograd.grad((out + 1).square().mean(), params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]  # last bias: unused

    g_chunk = grads(thd.mlp_laplacian(model, x, chunk_size=4))
    g_whole = grads(thd.mlp_laplacian(model, x))
    scale = max(g.abs().max().item() for g in g_whole)
    for a, b in zip(g_chunk, g_whole):
        assert rel_err(a, b, scale) <= 1e-13


# ---- memory -------------------------------------------------------------------------------------


def _cpu_peak_bytes(fn) -> int:
    """Peak of the bytes held by tensors allocated while fn runs, from the profiler's memory
    events (every event's own allocations minus frees, in time order; CPU allocations only).
    Counts tensor memory of torch and of the extension's ops -- not the allocator's caching, the
    interpreter, or scratch inside BLAS."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


def _peak_bytes(device, fn) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _cpu_peak_bytes(fn)


def test_no_grad_peak_memory_bounded_by_chunk_size(device, reverse_path, monkeypatch):
    """The reverse sweep without a graph: with chunk_size the peak stays flat as N grows 8x (only
    the outputs grow), without it (automatic chunking switched off) it grows with N. Rows here:
    K*w = 8*128 float64 per point (8 KiB), outputs 64 B per point."""
    monkeypatch.setattr(engine, "_CHUNK_ELEMENTS", 1 << 40)  # no automatic chunks: one block
    monkeypatch.setattr(engine, "_CHUNK_ELEMENTS_GPU", 1 << 40)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1))
    model = model.double().to(device)
    xs = {n: torch.randn(n, 8, dtype=torch.float64, device=device) for n in (512, 4096)}

    def peak(n, c):
        with torch.no_grad():
            return _peak_bytes(device, lambda: thd.mlp_hessian_diag(model, xs[n], chunk_size=c))

    p_small, p_big = peak(512, 128), peak(4096, 128)
    q_small, q_big = peak(512, None), peak(4096, None)
    row_bytes = 8 * 128 * 8
    assert p_big <= p_small + 4096 * 1024  # flat, up to the outputs (4096 * 64 B) and slack
    assert q_big >= 6 * q_small  # one block: the rows grow with N
    assert q_big >= 2 * 4096 * row_bytes  # the two row buffers of the whole batch
    assert p_big <= q_big / 8


@pytest.mark.skipif(not ops.COMPILED, reason="the per-thread scratch of the compiled fused op (csrc/mlp_ops.cpp); "
                    "the reference backend has no fused kernel and takes the reverse sweep")
def test_fused_no_grad_memory_flat_in_n(device):
    """The fused op without a graph allocates its outputs only: the rows live in per-thread
    scratch of at most 5 x 2^16 elements per thread (csrc/mlp_ops.cpp), whatever N is. Rows here:
    (1 + 2K) * w = 17 * 128 float64 per point (17 KiB); outputs 64 B per point (value, diagonal)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1))
    model = model.double().to(device)
    x = torch.randn(4096, 8, dtype=torch.float64, device=device)
    if device.type != "cpu":
        pytest.skip("the CUDA program holds one block's rows (its caching allocator reuses them)")
    with torch.no_grad():
        p = _peak_bytes(device, lambda: thd.mlp_hessian_diag(model, x))
    assert p <= 4096 * 17 * 8 * 4  # the outputs (17 rows of 8 B per point at most), far below 17 KiB per point


def test_training_memory_bounded_by_backward_per_chunk(device):
    """The recipe for large N in training: one backward per chunk (gradient accumulation). The
    gradients equal those of the whole batch; the peak is that of one chunk's graph."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)).double().to(device)
    x = torch.randn(2048, 8, dtype=torch.float64, device=device)
    N, c = x.shape[0], 256

    def whole():
        model.zero_grad(set_to_none=True)
        ((thd.mlp_laplacian(model, x) + 1).square().sum() / N).backward()

    def accumulated():
        model.zero_grad(set_to_none=True)
        for i in range(0, N, c):
            ((thd.mlp_laplacian(model, x[i : i + c]) + 1).square().sum() / N).backward()

    grads = lambda: [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]  # noqa: E731
    p_whole = _peak_bytes(device, whole)
    g_whole = grads()
    p_acc = _peak_bytes(device, accumulated)
    g_acc = grads()
    scale = max(g.abs().max().item() for g in g_whole)
    for a, b in zip(g_acc, g_whole):
        assert rel_err(a, b, scale) <= 1e-13
    assert p_acc <= p_whole / 4


# ---- beyond 2^31 elements -----------------------------------------------------------------------


def _free_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


@pytest.mark.slow
def test_jet_layer_inplace_beyond_int32_indexing(device):
    """The in-place layer kernel on a row buffer J of N*K*w = 2^31 + 2^25 float32 elements (8.7
    GB): with 32-bit indices the rows past element 2^31 would be skipped or written over the
    start. J = 1 everywhere, so acc[n, k] = sum_j c[n, j] and the new J[n, k, :] = s1[n, :] --
    checked for every row, block by block. Opt-in (--slow) and only with ~12 GB free."""
    N, K, w = (1 << 20) + (1 << 14), 64, 32  # N*K*w = 2^31 + 2^25 elements
    numel = N * K * w
    assert numel > 2**31
    need = numel * 4 + 3 * N * max(K, w) * 4
    if _free_bytes(device) < need * 1.4:
        pytest.skip(f"needs ~{need * 1.4 / 2**30:.1f} GiB free memory on {device}")
    g = torch.Generator().manual_seed(0)
    s1 = torch.rand(N, w, generator=g).to(device)
    c = torch.rand(1, N, w, generator=g).to(device)
    J = torch.ones(N, K, w, device=device)
    acc = torch.ops.torchhessdiag.jet_layer_(J, s1, c)
    assert acc.shape == (1, N, K)
    want_acc = c[0].double().sum(-1)  # (N,)
    step = 1 << 16
    for i in range(0, N, step):
        a = acc[0, i : i + step].double()
        assert torch.allclose(a, want_acc[i : i + step, None].expand_as(a), rtol=1e-5, atol=0), i
        assert torch.equal(J[i : i + step], s1[i : i + step, None, :].expand(-1, K, -1)), i
    del J


# ---- the no-grad path's chunks of points (was tests/test_engine_chunks.py) -----------------------
# float64, 1e-12 relative to the largest entry: the paths evaluate the same expressions (the
# summation order of a GEMM may differ between row counts); observed differences ~1e-16.


def _chunk_model(device):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 12), nn.SiLU(), nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 2)
    ).double().to(device)


def _chunk_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("chunk_points", [1, 3, 7, 1000])
def test_chunked_no_grad_matches_graph_path_and_torch_func(device, monkeypatch, chunk_points):
    model = _chunk_model(device)
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
    assert _chunk_rel(hd, H) <= 1e-12
    assert _chunk_rel(lap, H.sum(-1)) <= 1e-12
    assert _chunk_rel(lap_xy, H[..., [1, 3]].sum(-1)) <= 1e-12
    assert _chunk_rel(out.second, graph.second.detach()) <= 1e-12
    assert _chunk_rel(out.value, model(x).detach()) <= 1e-12
    assert _chunk_rel(out.gradient, graph.gradient.detach()) <= 1e-12


def test_no_grad_path_used_when_nothing_requires_grad(device, reverse_path, monkeypatch):
    """Parameters frozen and x without grad: no graph is built, even in grad mode."""
    model = _chunk_model(device).requires_grad_(False)
    x = torch.randn(4, 5, dtype=torch.float64, device=device)
    calls = []
    real = engine._Workspace
    monkeypatch.setattr(engine, "_Workspace", lambda *a: calls.append(1) or real(*a))
    lap = thd.mlp_laplacian(model, x)
    assert calls and not lap.requires_grad
