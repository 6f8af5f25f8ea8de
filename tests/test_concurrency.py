"""Concurrency and determinism (issue 7, item 5).

What is claimed, and checked here:

* **Repeatable**: the same call on the same inputs gives bitwise the same results (values, and
  the parameter gradients of a loss built on them), for every public function: the ``mlp_*``
  functions (no-grad chunked path with its reused row buffers, and the graph path), Hutchinson
  with a seeded generator, and ``laplacian`` / ``hessian_diag`` / ``axis_derivatives`` on a traced
  non-Sequential model. On the CPU and, where a GPU is present, on CUDA (``device`` fixture).
* **Thread-safe**: 8 Python threads released together (``threading.Barrier``) calling at once,
  on one shared model and on different models, get bitwise what one thread gets. The comparison is
  bitwise because nothing differs between the runs but the interleaving: same shapes, same
  intra-op thread setting, same kernels (tensors here are below the kernels' parallel grain).
  ``sys.setswitchinterval`` is lowered during the threaded runs so that the interpreter switches
  threads often (inside our Python code, not only when torch releases the GIL).
* The state the library keeps between calls is safe under threads: the no-grad path's row
  buffers belong to one call (a buffer shared between calls would mix rows of different threads:
  the chunked-threads test catches that, see its docstring); torch.fx tracing, which patches
  ``torch.nn.Module.__call__``/``__getattr__`` process-wide while it runs, is serialised and
  passes other threads' module calls through (tests below fail without torchhessdiag/graph.py's
  ``_TRACE_LOCK`` and thread check); ``explain`` leaves the process-wide warning filters alone.
* The drop-in activations cache sigma', sigma'' on their autograd nodes: threads building their
  own graphs, and threads differentiating one shared graph at once, get bitwise the sequential
  results.
* Intra-op thread count: results with ``torch.set_num_threads(1)`` and ``(2)`` agree to float64
  reassociation (see the test for the tolerance); our kernels do not depend on it at all.

Global settings that are process-wide by design (not per thread): ``set_fallback`` (use the
per-call ``fallback=`` argument in threaded code) and ``torch.set_num_threads``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import sys
import threading
import warnings
from typing import Callable, Dict, List

import pytest
import torch
from torch import nn

import torchhessdiag as thd
from torchhessdiag import engine

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _random_models import ACT_BY_LABEL, build_mlp, build_residual  # noqa: E402

Tensor = torch.Tensor
THREADS = 8


# ---- helpers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _fast_switching(interval: float = 1e-5):
    """Make the interpreter switch threads every ``interval`` seconds (default 5 ms), so that the
    threads interleave inside Python code too; restored afterwards."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(interval)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def _run_threads(fn: Callable[[int], object], n: int = THREADS, interval: float = 1e-5) -> List[object]:
    """fn(i) in n threads released together by a barrier, thread switches every ``interval``
    seconds; the results in order (exceptions re-raised)."""
    barrier = threading.Barrier(n)

    def job(i):
        barrier.wait(timeout=60)
        return fn(i)

    with _fast_switching(interval), cf.ThreadPoolExecutor(n) as ex:
        futures = [ex.submit(job, i) for i in range(n)]
        return [f.result(timeout=300) for f in futures]


def _flat(out) -> List[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def _assert_bitwise(a: List[Tensor], b: List[Tensor], what: str) -> None:
    assert len(a) == len(b), what
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.shape == v.shape and u.dtype == v.dtype, f"{what}[{i}]"
        # torch.equal treats NaN != NaN; none is expected here, so a NaN fails too
        assert torch.equal(u, v), f"{what}[{i}]: max |diff| {(u - v).abs().max().item():.3g}"


def _mlp(seed: int, device, dropins: bool = False) -> nn.Sequential:
    acts = [ACT_BY_LABEL["tanh"], ACT_BY_LABEL["silu"], ACT_BY_LABEL["sin(1.7)"]]
    model, _ = build_mlp(3, [12, 10, 12], 2, acts, dropins=[dropins] * 3, seed=seed, device=device)
    return model


def _residual(seed: int, device) -> nn.Module:
    acts = [ACT_BY_LABEL["tanh"], ACT_BY_LABEL["gelu"]]
    model, _ = build_residual(3, 10, 2, acts, product=True, seed=seed, device=device)
    return model


def _points(seed: int, n: int, device, d: int = 3) -> Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return (torch.rand(n, d, generator=g, dtype=torch.float64) * 2 - 1).to(device)


def _mlp_calls(model: nn.Module, x: Tensor) -> Dict[str, Callable[[], object]]:
    """Every public mlp_* function (and the chunked no-grad path) as a zero-argument call."""
    d = x.shape[1]
    g = torch.Generator().manual_seed(5)
    Fm = (torch.rand(d, d, generator=g, dtype=torch.float64) - 0.5).to(x.device)
    A = Fm @ Fm.T + torch.eye(d, dtype=x.dtype, device=x.device)
    hutch_dev = x.device
    return {
        "mlp_laplacian": lambda: thd.mlp_laplacian(model, x),
        "mlp_laplacian_dims": lambda: thd.mlp_laplacian(model, x, dims=[0, 2]),
        "mlp_laplacian_chunked": lambda: thd.mlp_laplacian(model, x, chunk_size=5),
        "mlp_hessian_diag": lambda: thd.mlp_hessian_diag(model, x),
        "mlp_hessian_diag_chunked": lambda: thd.mlp_hessian_diag(model, x, chunk_size=3),
        "mlp_derivatives": lambda: thd.mlp_derivatives(model, x),
        "mlp_derivatives_diag": lambda: thd.mlp_derivatives(model, x, second="diag", chunk_size=7),
        "mlp_weighted_laplacian": lambda: thd.mlp_weighted_laplacian(model, x, A=A),
        "mlp_weighted_laplacian_factor": lambda: thd.mlp_weighted_laplacian(model, x, factor=Fm),
        "mlp_mixed_partials": lambda: thd.mlp_mixed_partials(model, x, pairs=[(0, 1), (1, 2), (0, 0), (2, 0)]),
        # a fresh generator with the same seed in every call: the same probes, so the same result
        "mlp_laplacian_hutchinson": lambda: thd.mlp_laplacian_hutchinson(
            model, x, num_samples=6, generator=torch.Generator(hutch_dev).manual_seed(11)
        ),
        "mlp_laplacian_hutchinson_gauss": lambda: thd.mlp_laplacian_hutchinson(
            model, x, num_samples=4, distribution="gaussian", generator=torch.Generator(hutch_dev).manual_seed(12)
        ),
    }


def _general_calls(model: nn.Module, x: Tensor) -> Dict[str, Callable[[], object]]:
    """laplacian / hessian_diag / axis_derivatives on a traced (jet-path) model."""
    return {
        "laplacian": lambda: thd.laplacian(model, x),
        "hessian_diag": lambda: thd.hessian_diag(model, x, dims=[0, 2]),
        "axis_derivatives": lambda: thd.axis_derivatives(model, x, order=4),
        "axis_derivatives_3": lambda: thd.axis_derivatives(model, x, order=3, dims=[1]),
    }


def _all_calls(mlp: nn.Module, res: nn.Module, x: Tensor) -> Dict[str, Callable[[], object]]:
    return {**_mlp_calls(mlp, x), **_general_calls(res, x)}


def _evaluate(calls: Dict[str, Callable[[], object]], params: List[Tensor], graph_mode: bool) -> Dict[str, List[Tensor]]:
    """Every call's outputs; in graph mode also the parameter gradients of a fixed weighted sum
    of them, by torch.autograd.grad (which does not accumulate into .grad: threads sharing a
    model must not race on .grad accumulation -- that would be a test of torch, and torch
    documents concurrent .backward() on shared leaves as nondeterministic)."""
    out = {}
    for name, call in calls.items():
        if graph_mode:
            res = _flat(call())
            assert all(t.requires_grad for t in res), name
            loss = sum(((t * t).sum() if k % 2 else (t.sin() * 0.5).sum()) for k, t in enumerate(res))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
            out[name] = [t.detach() for t in res] + list(grads)
        else:
            with torch.no_grad():
                res = _flat(call())
            assert not any(t.requires_grad for t in res), name
            out[name] = res
    return out


def _params(*models: nn.Module) -> List[Tensor]:
    return [p for m in models for p in m.parameters()]


# ---- repeated calls ------------------------------------------------------------------------------


@pytest.mark.parametrize("graph_mode", [False, True], ids=["no_grad", "graph"])
def test_repeated_calls_bitwise(device, graph_mode):
    mlp, res = _mlp(0, device), _residual(0, device)
    x = _points(0, 23, device)
    calls = _all_calls(mlp, res, x)
    params = _params(mlp, res)
    first = _evaluate(calls, params, graph_mode)
    for _ in range(2):
        again = _evaluate(calls, params, graph_mode)
        for name in calls:
            _assert_bitwise(again[name], first[name], name)


def test_repeated_calls_bitwise_cuda_deterministic_mode(device, monkeypatch):
    """On CUDA: repeated calls are bitwise equal also under torch.use_deterministic_algorithms(True)
    (torch refuses then the few of its ops that have no deterministic CUDA kernel, so this test
    also shows none of them is on our paths). Our own kernels use no atomics (warp shuffles in a
    fixed order forward; a thread per (point, unit) walking the K rows backward), so they are
    deterministic in either mode; the mode matters for torch's ops (the index_add/index_put
    backward of mlp_mixed_partials' advanced indexing, cuBLAS workspaces)."""
    if device.type != "cuda":
        pytest.skip("CUDA only")
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:  # torch's deterministic mode asks for it
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        test_repeated_calls_bitwise(device, True)
        test_repeated_calls_bitwise(device, False)
    finally:
        torch.use_deterministic_algorithms(prev)


# ---- threads ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("graph_mode", [False, True], ids=["no_grad", "graph"])
def test_threads_same_model(graph_mode):
    """8 threads on one shared model (and shared x), each running every function twice."""
    mlp, res = _mlp(0, "cpu"), _residual(0, "cpu")
    x = _points(0, 23, "cpu")
    calls = _all_calls(mlp, res, x)
    params = _params(mlp, res)
    ref = _evaluate(calls, params, graph_mode)

    def work(i):
        # each thread walks the calls in its own order, so different functions overlap
        names = list(calls)
        names = names[i % len(names):] + names[: i % len(names)]
        got = []
        for _ in range(2):
            got.append(_evaluate({n: calls[n] for n in names}, params, graph_mode))
        return got

    for runs in _run_threads(work):
        for got in runs:
            for name in calls:
                _assert_bitwise(got[name], ref[name], name)


@pytest.mark.parametrize("graph_mode", [False, True], ids=["no_grad", "graph"])
def test_threads_different_models(graph_mode):
    """Each thread its own models and points (4 distinct sets, two threads on each)."""
    sets = []
    for s in range(4):
        mlp, res = _mlp(s, "cpu", dropins=s % 2 == 1), _residual(s, "cpu")
        x = _points(s, 17 + 3 * s, "cpu")
        sets.append((_all_calls(mlp, res, x), _params(mlp, res)))
    refs = [_evaluate(c, p, graph_mode) for c, p in sets]

    def work(i):
        calls, params = sets[i % 4]
        return _evaluate(calls, params, graph_mode)

    for i, got in enumerate(_run_threads(work)):
        for name in sets[i % 4][0]:
            _assert_bitwise(got[name], refs[i % 4][name], f"thread {i}: {name}")


def test_threads_chunked_no_grad_buffers(monkeypatch):
    """The no-grad path runs chunks of points through two reused row buffers (engine._Workspace).
    They must belong to one call: a buffer shared between calls (module level, or cached per
    model) would, with threads, have one thread's GEMM write rows another is reading, and give
    wrong numbers. Forced tiny chunks (many reuses per call), threads on different models and
    point counts at once; bitwise equal to the single-threaded results.

    Checked that this test fails with a module-level workspace: replacing engine._Workspace by
    a factory that returns one shared instance made it fail (run by hand while writing it)."""
    monkeypatch.setattr(engine, "_CHUNK_ELEMENTS", 4 * 3 * 12)  # about 4 points per chunk
    models = [_mlp(s, "cpu") for s in range(4)]
    xs = [_points(s, 40 + 8 * s, "cpu") for s in range(4)]

    def calls(k):
        m, x = models[k], xs[k]
        return lambda: [thd.mlp_laplacian(m, x), thd.mlp_hessian_diag(m, x), *thd.mlp_derivatives(m, x)]

    with torch.no_grad():
        refs = [_flat(calls(k)()) for k in range(4)]

    def work(i):
        with torch.no_grad():
            return [_flat(calls(i % 4)()) for _ in range(3)]

    for i, runs in enumerate(_run_threads(work)):
        for got in runs:
            _assert_bitwise(got, refs[i % 4], f"thread {i}")


# ---- drop-in activations ------------------------------------------------------------------------


def _dropin_model(seed: int) -> nn.Sequential:
    acts = [ACT_BY_LABEL["tanh"], ACT_BY_LABEL["softplus(2,5)"], ACT_BY_LABEL["gelu_tanh"]]
    model, _ = build_mlp(3, [10, 10, 10], 1, acts, dropins=[True] * 3, seed=seed)
    assert all(isinstance(m, (nn.Linear, thd.nn.Tanh, thd.nn.Softplus, thd.nn.GELU)) for m in model)
    return model


def _nested_hessian_diag(model: nn.Module, x: Tensor) -> List[Tensor]:
    """Value, gradient, Hessian diagonal by nested autograd through the drop-ins, and the
    parameter gradients of a loss on the diagonal (third-order autograd through the drop-ins)."""
    xx = x.detach().requires_grad_(True)
    u = model(xx)
    (g,) = torch.autograd.grad(u.sum(), xx, create_graph=True)
    diag = torch.stack([torch.autograd.grad(g[:, i].sum(), xx, create_graph=True)[0][:, i] for i in range(x.shape[1])], 1)
    params = list(model.parameters())
    pg = torch.autograd.grad((diag.sum(1) ** 2).mean(), params, allow_unused=True)  # output bias: unused
    pg = [torch.zeros_like(p) if q is None else q for q, p in zip(pg, params)]
    return [u.detach(), g.detach(), diag.detach(), *pg]


def test_dropins_threads_own_graphs():
    """The drop-ins keep sigma', sigma'' on the autograd node (ctx) of each forward: threads that
    build their own graphs through one shared model must not see each other's cached values."""
    model = _dropin_model(0)
    xs = [_points(s, 9 + s, "cpu") for s in range(THREADS)]
    refs = [_nested_hessian_diag(model, x) for x in xs]
    results = _run_threads(lambda i: [_nested_hessian_diag(model, xs[i]) for _ in range(2)])
    for i, runs in enumerate(results):
        for got in runs:
            _assert_bitwise(got, refs[i], f"thread {i}")


def _register_autograd_checks_extra_grads() -> bool:
    """torch >= 2.14's torch.library backward wrapper checks the gradients past the inputs it
    believes were passed -- counted from ctx.needs_input_grad, which the same wrapper shortens
    around every backward call. With several threads in one node that count is off and torch
    raises its own RuntimeError before our backward's result is used: a torch race no code of
    ours can guard (the check runs after our backward returns)."""
    import inspect

    import torch._library.autograd as la

    return "returned a non-None" in inspect.getsource(la)


@pytest.mark.skipif(
    not thd.ops.COMPILED and _register_autograd_checks_extra_grads(),
    reason="torch's register_autograd wrapper races on a shared graph in this torch version "
    "(docs/threads-ddp.md); the compiled drop-ins' autograd is "
    "C++ (csrc/act_autograd.h) and does not go through it",
)
def test_dropins_threads_share_one_graph():
    """Several threads differentiate one graph at once (torch allows concurrent backward on a
    shared graph with retain_graph): each takes d^2u/dx_i^2 for its own i through the same
    drop-in nodes, whose cached derivatives they fill and read concurrently. This found a torch
    hazard: torch.library's backward wrapper shortens ctx.needs_input_grad around our backward
    and restores it afterwards, so concurrent threads saw it cut twice (IndexError, ValueError);
    _op_autograd._keep_needs works around it."""
    model = _dropin_model(1)
    x = _points(1, 12, "cpu").requires_grad_(True)
    u = model(x)
    (g,) = torch.autograd.grad(u.sum(), x, create_graph=True)

    def second(i: int, create_graph: bool) -> Tensor:
        (h,) = torch.autograd.grad(g[:, i % 3].sum(), x, retain_graph=True, create_graph=create_graph)
        return h.detach()

    refs = {(i, c): second(i, c) for i in range(3) for c in (False, True)}
    # without _op_autograd._keep_needs this failed in 24 of 40 runs with 4 calls per thread, switches at 1e-5 s
    results = _run_threads(lambda i: [second(i, k % 2 == 1) for k in range(16)], interval=1e-6)
    for i, runs in enumerate(results):
        for k, got in enumerate(runs):
            _assert_bitwise([got], [refs[(i % 3, k % 2 == 1)]], f"thread {i} call {k}")


# ---- torch.fx tracing (the jet path) under threads ---------------------------------------------------


def test_threads_tracing_stress():
    """Many traced-path calls at once on 4 models: torch.fx patches torch.nn.Module.__call__ and
    __getattr__ (and torchhessdiag patches torch.autograd.Function.apply) process-wide while it
    traces. Without serialising the traces this failed: traces recorded each other's modules
    (KeyError / 'Unexpected key'), f(x) returned torch.fx Proxies to other threads, and the
    patches stayed installed after the threads ended. Results must be right and every patch gone."""
    orig_call = nn.Module.__call__
    orig_getattr = nn.Module.__getattr__
    orig_apply = torch.autograd.Function.__dict__["apply"]
    models = [_residual(s, "cpu") for s in range(4)]
    x = _points(0, 6, "cpu")
    with torch.no_grad():
        refs = [thd.laplacian(m, x) for m in models]

    def work(i):
        out = []
        with torch.no_grad():
            for r in range(6):
                k = (i + r) % 4
                val, info = thd.laplacian(models[k], x, return_info=True)
                out.append((k, val, info.path))
        return out

    results = _run_threads(work, interval=1e-6)
    for runs in results:
        for k, val, path in runs:
            assert path == "jet"
            _assert_bitwise([val], [refs[k]], f"model {k}")
    assert nn.Module.__call__ is orig_call
    assert nn.Module.__getattr__ is orig_getattr
    assert torch.autograd.Function.__dict__["apply"] is orig_apply


def test_trace_does_not_capture_other_threads():
    """Deterministic version: thread A is held inside a trace (f waits on an event while torch.fx
    runs it on proxies). Meanwhile (1) the main thread runs ordinary module calls -- they must
    return tensors, not land in A's trace; (2) thread B starts a traced-path call of its own -- it
    must not start tracing until A's trace is over (else A's exit would restore the patches under
    B's feet and B's exit would reinstall A's for good)."""
    model_a, model_b, other = _residual(0, "cpu"), _residual(1, "cpu"), _residual(2, "cpu")
    mlp = _mlp(3, "cpu")
    x = _points(0, 5, "cpu")
    with torch.no_grad():
        ref_a, ref_b = thd.laplacian(model_a, x), thd.laplacian(model_b, x)
        ref_other, ref_mlp = other(x), thd.mlp_laplacian(mlp, x)
    a_inside, a_go = threading.Event(), threading.Event()
    b_inside = threading.Event()

    def f_a(z):
        a_inside.set()
        assert a_go.wait(timeout=60)
        return model_a(z)

    def f_b(z):
        b_inside.set()
        return model_b(z)

    results = {}

    def run(name, f):
        with torch.no_grad():
            results[name] = thd.laplacian(f, x, return_info=True)

    ta = threading.Thread(target=run, args=("a", f_a))
    ta.start()
    try:
        assert a_inside.wait(timeout=60)
        # (1) A is tracing now: nn.Module.__call__ is torch.fx's wrapper
        assert nn.Module.__call__ is not torch.fx._symbolic_trace._orig_module_call
        with torch.no_grad():
            y = other(x)  # an ordinary forward in this thread
            lap = thd.mlp_laplacian(mlp, x)  # reads the Linear weights through Module.__getattr__
        assert type(y) is Tensor and torch.equal(y, ref_other)
        assert type(lap) is Tensor and torch.equal(lap, ref_mlp)
        # (2) B must wait for A's trace
        tb = threading.Thread(target=run, args=("b", f_b))
        tb.start()
        assert not b_inside.wait(timeout=1.0), "a second trace started while the first was running"
    finally:
        a_go.set()
        ta.join(timeout=60)
    tb.join(timeout=60)
    assert b_inside.is_set()
    (va, ia), (vb, ib) = results["a"], results["b"]
    assert ia.path == "jet" and ib.path == "jet"
    _assert_bitwise([va, vb], [ref_a, ref_b], "a, b")
    assert nn.Module.__call__ is torch.fx._symbolic_trace._orig_module_call


def test_explain_leaves_warning_filters_alone():
    """explain() must not swap the process-wide warning filters (warnings.catch_warnings does:
    two threads in it at once restore each other's filter lists, which can leave every warning of
    the process silenced). While a thread is inside explain (held in its f), the filters seen from
    another thread are unchanged; and explain itself emits no warning (ReLU model: the
    piecewise-linear warning belongs to the computing calls only)."""
    model = _residual(0, "cpu")
    relu = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    x = _points(0, 4, "cpu")
    inside, go = threading.Event(), threading.Event()

    def f(z):
        inside.set()
        assert go.wait(timeout=60)
        return model(z)

    before = list(warnings.filters)
    info = {}
    t = threading.Thread(target=lambda: info.setdefault("i", thd.explain(f, x)))
    t.start()
    try:
        assert inside.wait(timeout=60)
        during = list(warnings.filters)
    finally:
        go.set()
        t.join(timeout=60)
    assert during == before
    assert list(warnings.filters) == before
    assert info["i"].path == "jet"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert thd.explain(relu, x).path == "engine"
        assert thd.explain(relu, x, "axis_derivatives", order=3).path == "jet"
    assert not w, [str(m.message) for m in w]
    with pytest.warns(UserWarning, match="piecewise linear"):
        thd.laplacian(relu, x)


# ---- intra-op thread count ------------------------------------------------------------------------------


def test_results_vs_intra_op_thread_count():
    """torch.set_num_threads(1) vs (2) on sizes above every parallel grain (512 points x d=8 x
    width 64: each layer's rows hold 262144 elements; the kernels split work at 2048 elements or
    16384 / (K w) points). Our kernels reduce each point's rows in one thread, in a fixed order,
    so they do not depend on the thread count; torch's GEMMs (MKL/oneBLAS on the CPU) may split a
    product differently and round differently. Tolerance: 1e-13 of the largest |entry| of each
    result (float64): a GEMM's rounding is a few ulp (~1e-16 relative) of the summed terms, times
    the amplification through a few layers and the sum over d = 8 axes; 1e-13 leaves a margin of
    ~100 and is still far below any real error (a wrong row would be O(1) off)."""
    n0 = torch.get_num_threads()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 2)
    ).double()
    x = torch.rand(512, 8, dtype=torch.float64)
    res = _residual(0, "cpu")
    xr = _points(0, 512, "cpu")

    def compute():
        out = [*thd.mlp_derivatives(model, x, second="diag"), thd.mlp_laplacian(model, x)]
        with torch.no_grad():
            out += [*thd.mlp_derivatives(model, x, second="diag"), thd.axis_derivatives(res, xr, order=4)]
        loss = out[2].pow(2).sum() + out[3].sum()
        params = list(model.parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True)  # the output bias is unused
        out += [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        return [t.detach() for t in out]

    try:
        torch.set_num_threads(1)
        one = compute()
        torch.set_num_threads(2)
        two = compute()
    finally:
        torch.set_num_threads(n0)
    assert torch.get_num_threads() == n0
    for i, (a, b) in enumerate(zip(one, two)):
        scale = a.abs().max().clamp_min(torch.finfo(a.dtype).tiny)
        assert ((a - b).abs().max() / scale).item() <= 1e-13, i
