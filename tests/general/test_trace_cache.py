"""The trace cache of the jet path (issue 15, goal 1): trace once, never stale, thread-safe.

A model is traced with torch.fx on its first call and the program reused while the model is
unchanged (torchhessdiag/graph.py, "the trace cache"). Checked here:

* trace once: repeated calls, and calls after the weights changed (an optimizer step, a
  replaced Parameter), do not trace again -- and give the new weights' numbers;
* never stale: each structural change (a replaced submodule, a hyper-parameter, train/eval, a
  parameter set to None, a hook, a re-registered activation, a closure or global of a plain
  function rebound, another feature count / dtype / grad mode) traces again and gives what a
  fresh trace gives, which differs from the stale program's result;
* entries live as long as their model (weakly held; the program holds no reference to it);
* thread-safe: 8 threads calling on shared and separate models while another keeps clearing the
  cache get bitwise what one thread gets;
* clear_trace_cache / trace_cache_info, and that an unsupported model is not re-traced either.

Expected values: a fresh trace (clear_trace_cache, then the call) -- the same code path, which
tests/general/test_jets.py and test_taylor_nn.py check against nested autograd -- and, where
the change must show, inequality with the stale result.
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from torch import nn

import torchhessdiag as thd
from torchhessdiag import graph

DT = torch.float64


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.act = nn.Softplus(beta=1.0)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2)])
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 2)
        self.scale = 0.5  # a plain hyper-parameter read in forward

    def forward(self, x):
        h = self.act(self.inp(x))
        for b in self.blocks:
            h = h + self.scale * b(h)
        return self.out(self.norm(h))


def _net(seed=0):
    torch.manual_seed(seed)
    return Net().double()


def _x(n=6, d=3, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _misses():
    return thd.trace_cache_info()["misses"]


def _fresh(f, x, **kw):
    thd.clear_trace_cache(f)
    return thd.laplacian(f, x, **kw)


def test_traced_once_and_weights_are_live():
    model, x = _net(), _x()
    thd.clear_trace_cache()
    first = thd.laplacian(model, x)
    m0 = _misses()
    for _ in range(3):
        assert torch.equal(thd.laplacian(model, x), first)
    hd = thd.hessian_diag(model, x)
    ax = thd.axis_derivatives(model, x, 3)
    assert _misses() == m0  # one program serves laplacian, hessian_diag and every order
    assert torch.equal(hd.sum(-1), first) or torch.allclose(hd.sum(-1), first, rtol=1e-13, atol=1e-13)
    assert torch.allclose(ax[2], hd, rtol=1e-13, atol=1e-13)
    # an optimizer step changes the weights in place: no retrace, the new numbers
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (first.square().mean()).backward()
    opt.step()
    after = thd.laplacian(model, x)
    assert _misses() == m0 and not torch.allclose(after, first)
    assert torch.equal(after, _fresh(model, x))
    # a Parameter replaced by another (e.g. loading weights by assignment): read on every run
    m1 = _misses()
    model.out.weight = nn.Parameter(torch.randn(2, 8, dtype=DT))
    replaced = thd.laplacian(model, x)
    assert _misses() == m1 and not torch.allclose(replaced, after)
    assert torch.equal(replaced, _fresh(model, x))


def _change_cases():
    def replace_submodule(m):
        m.blocks[1] = nn.Sequential(nn.Linear(8, 8), nn.SiLU()).double()

    def hyper_parameter(m):
        m.act.beta = 3.0

    def norm_eps(m):
        m.norm.eps = 0.25

    def plain_attribute(m):
        m.scale = 2.0

    def bias_none(m):
        m.blocks[0][0].bias = None

    def hook(m):
        m.blocks[0].register_forward_hook(lambda mod, args, out: out * 2.0)

    def forward_on_instance(m):
        m.forward = lambda x: torch.sin(m.out(m.inp(x)[:, :8]))

    return {
        "replace_submodule": replace_submodule,
        "hyper_parameter": hyper_parameter,
        "norm_eps": norm_eps,
        "plain_attribute": plain_attribute,
        "bias_none": bias_none,
        "hook": hook,
        "forward_on_instance": forward_on_instance,
    }


@pytest.mark.parametrize("case", list(_change_cases()))
def test_structural_changes_retrace(case):
    model, x = _net(), _x()
    before = thd.laplacian(model, x)
    m0 = _misses()
    _change_cases()[case](model)
    after = thd.laplacian(model, x)
    assert _misses() == m0 + 1, "the change must invalidate the cached program"
    assert not torch.allclose(after, before), "the change must show in the result"
    assert torch.equal(after, _fresh(model, x))
    thd.laplacian(model, x)
    assert _misses() == m0 + 2  # (_fresh traced once more); the new program is cached again


def test_train_eval_and_dropout():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.2), nn.LayerNorm(8), nn.Linear(8, 1)).double()
    x = _x()
    model.eval()
    ok = thd.laplacian(model, x)
    model.train()
    with pytest.raises(NotImplementedError, match="Dropout at '2' is in training mode"):
        thd.laplacian(model, x)
    model.eval()
    assert torch.equal(thd.laplacian(model, x), ok)


def test_inputs_dtype_features_and_grad_mode_have_their_own_programs():
    model, x = _net(), _x()
    thd.clear_trace_cache()
    a = thd.laplacian(model, x)
    with torch.no_grad():
        b = thd.laplacian(model, x)
    c = thd.laplacian(model.float(), x.float())
    assert thd.trace_cache_info()["programs"] == 3
    assert torch.equal(a.detach(), b) and c.dtype == torch.float32
    f = lambda z: torch.tanh(z).sum(-1) * z[:, 0]  # noqa: E731
    m0 = _misses()
    assert thd.laplacian(f, _x(d=4), return_info=True)[1].path == "jet"
    assert thd.laplacian(f, _x(d=3), return_info=True)[1].path == "jet"
    assert _misses() == m0 + 2  # one trace per feature count


def test_reregistered_activation_retraces():
    act = thd.register_activation("t_cache_act", lambda z: torch.sin(z), [torch.cos, lambda z: -torch.sin(z)], replace=True)
    try:
        lin = nn.Linear(3, 4).double()
        f = lambda z: act(lin(z)).sum(-1)  # noqa: E731
        x = _x()
        before = thd.laplacian(f, x)
        m0 = _misses()
        thd.register_activation(
            "t_cache_act", lambda z: torch.sin(2 * z), [lambda z: 2 * torch.cos(2 * z), lambda z: -4 * torch.sin(2 * z)], replace=True
        )
        after = thd.laplacian(f, x)
        assert _misses() == m0 + 1 and not torch.allclose(after, before)
        z = lin(x)
        assert torch.allclose(after, (-4 * torch.sin(2 * z) * (lin.weight**2).sum(1)).sum(-1), rtol=1e-12, atol=1e-12)
    finally:
        thd.unregister_activation("t_cache_act")


def test_plain_functions_closures_and_globals():
    a, b = _net(0), _net(1)
    x = _x()
    holder = {"m": a}
    current = a

    def via_closure(z):
        return current(z)

    ra = thd.laplacian(via_closure, x)
    current = b  # noqa: F841  (the closure cell now holds b)
    rb = thd.laplacian(via_closure, x)
    assert torch.equal(rb, thd.laplacian(b, x)) and not torch.allclose(ra, rb)
    global _GLOBAL_MODEL
    _GLOBAL_MODEL = a
    r1 = thd.laplacian(_uses_global, x)
    _GLOBAL_MODEL = b
    r2 = thd.laplacian(_uses_global, x)
    assert torch.equal(r1, thd.laplacian(a, x)) and torch.equal(r2, thd.laplacian(b, x))
    # a dict in the closure, its content swapped: the dict is walked too
    g = lambda z: holder["m"](z)  # noqa: E731
    r3 = thd.laplacian(g, x)
    holder["m"] = b
    r4 = thd.laplacian(g, x)
    assert torch.equal(r3, ra) and torch.equal(r4, rb)


_GLOBAL_MODEL = None


def _uses_global(z):
    return _GLOBAL_MODEL(z)


def test_entries_die_with_their_model():
    thd.clear_trace_cache()
    model, x = _net(), _x()
    g = lambda z: model(z) * 2.0  # noqa: E731, F821  (held under the lambda, which holds the model; deleted below)
    thd.laplacian(model, x)
    thd.laplacian(g, x)
    assert thd.trace_cache_info()["models"] == 2
    ref = weakref.ref(model)
    del model, g
    gc.collect()
    assert ref() is None, "the cache must not keep the model alive"
    assert thd.trace_cache_info()["models"] == 0


def test_unsupported_models_are_not_retraced():
    lin = nn.Linear(3, 2).double()
    f = lambda z: torch.log1p(lin(z).square()).sum(-1)  # noqa: E731
    x = _x()
    _, info = thd.laplacian(f, x, return_info=True)
    assert info.path == "autograd" and "log1p" in info.reason
    m0 = _misses()
    _, info2 = thd.laplacian(f, x, return_info=True)
    assert _misses() == m0 and info2.reason == info.reason


def test_clear_one_or_all():
    a, b, x = _net(0), _net(1), _x()
    thd.clear_trace_cache()
    thd.laplacian(a, x)
    thd.laplacian(b, x)
    assert thd.trace_cache_info()["models"] == 2
    thd.clear_trace_cache(a)
    assert thd.trace_cache_info()["models"] == 1
    thd.clear_trace_cache()
    assert thd.trace_cache_info()["programs"] == 0


def test_threads_share_the_cache_while_it_is_cleared():
    """8 threads released together, each calling laplacian / hessian_diag / axis_derivatives on a
    shared model and on its own, while a 9th thread keeps clearing the cache: every result is
    bitwise the single-threaded one (the cache is only ever a faster way to the same program)."""
    shared = _net(0)
    own = [_net(10 + i) for i in range(8)]
    x = _x()
    with torch.no_grad():
        ref_shared = thd.laplacian(shared, x)
        ref_own = [(thd.laplacian(m, x), thd.axis_derivatives(m, x, 3)) for m in own]
    barrier = threading.Barrier(9)
    stop = threading.Event()
    errors, results = [], [None] * 8

    def work(i):
        try:
            barrier.wait()
            out = []
            with torch.no_grad():
                for _ in range(5):
                    out.append((thd.laplacian(shared, x), thd.laplacian(own[i], x), thd.axis_derivatives(own[i], x, 3)))
            results[i] = out
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def clearer():
        barrier.wait()
        while not stop.is_set():
            thd.clear_trace_cache()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    c = threading.Thread(target=clearer)
    for t in threads + [c]:
        t.start()
    for t in threads:
        t.join(timeout=300)
    stop.set()
    c.join(timeout=60)
    assert not errors, errors
    for i, out in enumerate(results):
        for s, o, a in out:
            assert torch.equal(s, ref_shared)
            assert torch.equal(o, ref_own[i][0]) and torch.equal(a, ref_own[i][1])


def test_signature_is_cheap_next_to_a_trace():
    """The per-call check must be far cheaper than the trace it saves (the point of the cache)."""
    import time

    model, x = _net(), _x()
    thd.laplacian(model, x)
    t0 = time.perf_counter()
    for _ in range(20):
        graph.signature(model, x)
    sig = (time.perf_counter() - t0) / 20
    t0 = time.perf_counter()
    for _ in range(5):
        graph.build_program(model)
    trace = (time.perf_counter() - t0) / 5
    assert sig < trace / 5, (sig, trace)


# ---- memory of the jet path (issue 17's item, done in issue 15) ---------------------------------


class DeepResidual(nn.Module):
    def __init__(self, d=8, w=48, L=16):
        super().__init__()
        self.inp = nn.Linear(d, w)
        self.layers = nn.ModuleList(nn.Linear(w, w) for _ in range(L))
        self.out = nn.Linear(w, 1)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for lin in self.layers:
            h = h + torch.tanh(lin(h)) * 0.5
        return self.out(h)


def test_values_are_freed_after_their_last_use():
    """Without a graph, the generated program deletes each value after its last use: the peak of
    live tensor bytes (profiler allocation events) is a small part of all the jets it creates
    (16 residual blocks, Hessian-diagonal jets of 1 + 2K rows; kept alive, they would all count)."""
    from torchhessdiag import taylor
    from torchhessdiag.bench.measure import cpu_peak_tensor

    model = DeepResidual().double()
    x = torch.randn(256, 8, dtype=DT)
    prog = graph.build_program(model)
    V = torch.eye(8, dtype=DT)
    with torch.no_grad():
        out, ctx = taylor.propagate(prog, x, V, 2, f=model)
        total = ctx.total_row * x.shape[0] * x.element_size()
        peak = cpu_peak_tensor(lambda: taylor.propagate(prog, x, V, 2, f=model))["peak_bytes"]
    assert "del v" in prog.source
    assert total > 40e6 and peak < total / 8, (peak, total)


class _FakeCudaX:
    """What chunk_points reads of x, on a pretend CUDA device."""

    def __init__(self, n):
        self.shape = (n, 8)
        self.device = torch.device("cuda", 0)

    def element_size(self):
        return 4


def test_cuda_chunks_are_sized_from_free_memory(monkeypatch):
    """On CUDA the no-grad chunks hold as many points as fit in half the free device memory
    (torch.cuda.mem_get_info), counting every jet of the program per point, at least the first
    chunk, at most the element cap."""
    from torchhessdiag import taylor

    ctx = taylor.Context(128, 8, 2, False)
    ctx.max_row, ctx.total_row = 8 * 256, 200_000  # 800 kB per point in float32
    free = {"bytes": 8 << 30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 << 30))
    x = _FakeCudaX(1 << 20)
    assert taylor.chunk_points(x, ctx, 128) == int(0.5 * (8 << 30) // 800_000)  # 5368 points
    free["bytes"] = 10 << 20  # 10 MB free: no fewer than the first chunk
    assert taylor.chunk_points(x, ctx, 128) == 128
    free["bytes"] = 1 << 40  # plenty: the element cap
    assert taylor.chunk_points(x, ctx, 128) == taylor._CHUNK_ELEMENTS_GPU // ctx.max_row


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_chunked_jets_match_one_block():
    model = DeepResidual(L=4).double().cuda()
    x = torch.randn(3000, 8, dtype=DT, device="cuda")
    with torch.no_grad():
        got = thd.hessian_diag(model, x)
    thd.clear_trace_cache()
    want = thd.hessian_diag(model, x.requires_grad_(True)).detach()  # one block (graph kept)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_run_time_refusals_are_remembered(monkeypatch):
    """A step that a rule refuses only when it runs (here a softmax over the points) sends the
    call to the fallback; the next call goes there directly, without running the jets again."""
    from torchhessdiag import taylor

    lin = nn.Linear(3, 4).double()
    f = lambda z: torch.tanh(lin(z)) * torch.softmax(z[:, :1], dim=0)  # noqa: E731  (mixes points)
    x = _x()
    runs = []
    orig = taylor.propagate_chunked
    monkeypatch.setattr(taylor, "propagate_chunked", lambda *a, **k: runs.append(1) or orig(*a, **k))
    _, info = thd.laplacian(f, x, return_info=True)
    assert info.path == "autograd" and "batch dimension" in info.reason and len(runs) == 1
    _, info2 = thd.laplacian(f, x, return_info=True)
    assert info2.reason == info.reason and len(runs) == 1
