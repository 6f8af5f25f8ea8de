"""torch.compile: what compiles, with or without graph breaks, to the same numbers (docs/compile.md).

* every mlp_* function compiles with ``fullgraph=True`` (a graph break anywhere would raise), and
  the library's ops are in the captured graph -- they have fake kernels (_fake_kernels.py), including the
  in-place jet_layer_ of the no-grad chunked path; a PINN loss built on mlp_laplacian trains
  (loss.backward()) with the same loss and parameter gradients as in eager mode;
* one graph for every batch size with ``dynamic=True``;
* the drop-ins compile inside mlp_laplacian, and inside the user's own nested
  ``torch.autograd.grad`` with ``torch._dynamo.config.trace_autograd_ops = True`` (without it,
  torch.autograd.grad is a graph break: fullgraph raises torch's error);
* ``laplacian`` / ``hessian_diag`` / ``axis_derivatives`` compile with ``fullgraph=True`` once the
  model's traced program is cached (one eager call): one graph, the eager numbers and parameter
  gradients; without a cached program the torch.fx trace is a graph break (fullgraph raises with
  what to do); a changed model recompiles (dynamo guards on what the cache signature reads);
* ``mlp_laplacian_hutchinson`` with a ``generator=`` argument is a graph break (dynamo cannot put
  a torch.Generator into a graph): fullgraph raises; the default mode draws the same probes from
  the generator as eager mode. From the global RNG it compiles with fullgraph;
* double backward through a compiled graph raises torch's own RuntimeError (an AOTAutograd
  limit): a loss on the parameter gradients of a compiled loss cannot be differentiated.

Backends: ``aot_eager`` (dynamo + fake kernels + AOTAutograd, no code generation: about a second
per compile) for most tests; the default ``inductor`` for the PINN training step (15-25 s on a
2-core CPU without inductor's cache) and, with --slow, for the rest. Tolerances: aot_eager runs the
same kernels in the same order as eager mode, so its results are checked bitwise (torch.equal).
Inductor generates its own fused kernels for the elementwise ops and reductions around ours
(another operation order, FMA contraction), so float64 results differ by rounding: 1e-13 relative
to the largest entry (observed at most 1.5e-15 on the CPU over every --slow case, a few ulp; the
margin leaves room for other CPUs and GPUs).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

import torchhessdiag as thd
from torchhessdiag import fused, jet2

from _random_models import ACT_BY_LABEL, build_mlp, build_residual, rel_err

# torch itself warns when compiling (jit.script_method deprecation inside its own machinery)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

INDUCTOR_TOL = 1e-13  # see the module docstring: inductor reorders float64 rounding (observed <= 1.5e-15)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class _Capture:
    """A torch.compile backend that records the graphs dynamo hands over, then compiles them with
    the named backend: len(graphs) counts the compiled pieces (1 = no graph break)."""

    def __init__(self, backend: str):
        self.inner = lookup_backend(backend)
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return self.inner(gm, example_inputs)

    def thd_ops(self):
        """Names of the torchhessdiag ops called in the captured graphs."""
        return {
            str(n.target).split(".")[1]
            for gm in self.graphs
            for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("torchhessdiag.")
        }


def _same(got, want, backend):
    """Bitwise for aot_eager (same kernels, same order); INDUCTOR_TOL for inductor."""
    assert got.shape == want.shape and got.dtype == want.dtype
    if backend == "aot_eager":
        assert torch.equal(got, want), f"max abs diff {(got - want).abs().max().item():.3e}"
    else:
        assert rel_err(got, want) <= INDUCTOR_TOL


def _model(device, dropins=(False, False)):
    return build_mlp(3, [16, 16], 1, [ACT_BY_LABEL["tanh"], ACT_BY_LABEL["silu"]], dropins=dropins, seed=0, device=device)[0]


def _x(device, n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64).to(device)


def _pinn_loss(model):
    return lambda x: ((thd.mlp_laplacian(model, x) + 1.0) ** 2).mean()


def _param_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def _check_training_step(model, x, backend):
    """One PINN training step's loss and parameter gradients, compiled whole vs eager."""
    eager = _pinn_loss(model)
    cap = _Capture(backend)
    l_c = torch.compile(eager, fullgraph=True, backend=cap)(x)
    g_c = _param_grads(model, l_c)
    l_e = eager(x)
    g_e = _param_grads(model, l_e)
    assert len(cap.graphs) == 1
    if fused.available(x):  # (the reference backend has no mlp_jet kernel: the reverse sweep)
        assert "mlp_jet" in cap.thd_ops()  # the fused op, traced by its fake kernel
    else:
        assert cap.thd_ops() & {"jet_layer", "jet_layer_"}
    _same(l_c.detach(), l_e.detach(), backend)
    assert any(g.abs().max() > 0 for g in g_e)
    for a, b in zip(g_c, g_e):
        _same(a, b, backend)


def test_pinn_training_step_fullgraph_inductor(device):
    _check_training_step(_model(device), _x(device), "inductor")


@pytest.mark.parametrize("dropins", [False, True], ids=["torch.nn", "drop-ins"])
def test_pinn_training_step_fullgraph_aot_eager(device, dropins):
    _check_training_step(_model(device, (dropins, dropins)), _x(device), "aot_eager")


def _all_mlp_functions(model):
    F_ = torch.tensor([[1.0, 0.5], [0.0, -2.0], [0.3, 0.7]], dtype=torch.float64)

    def f(x):  # Hutchinson's probes from the global RNG (a Generator argument breaks the graph)
        return [
            thd.mlp_laplacian(model, x, chunk_size=3),
            thd.mlp_laplacian(model, x, dims=[0, 2]),
            thd.mlp_hessian_diag(model, x, chunk_size=4),
            *thd.mlp_derivatives(model, x, second="diag"),
            thd.mlp_weighted_laplacian(model, x, factor=F_.to(x)),
            thd.mlp_mixed_partials(model, x, [(0, 1), (2, 2)], chunk_size=4),
            thd.mlp_laplacian_hutchinson(model, x, num_samples=4),
        ]

    return f


def _check_all_functions(device, backend, grad):
    model = _model(device)
    f = _all_mlp_functions(model)
    cap = _Capture(backend)
    compiled = torch.compile(f, fullgraph=True, backend=cap)
    x = _x(device)
    with torch.set_grad_enabled(grad):
        torch.manual_seed(3)
        got = compiled(x)
        torch.manual_seed(3)
        want = f(x)
    assert len(cap.graphs) == 1
    ops_ = cap.thd_ops()
    # the fused forward op for the sums and diagonals; the mixed partials take the reverse sweep
    # (its forward row evaluates the table with act_derivatives)
    if fused.available(x):
        assert {"mlp_jet", "act_derivatives"} <= ops_
    else:  # the reference backend has no mlp_jet kernel: the reverse sweep throughout
        assert "act_derivatives" in ops_ and ops_ & {"jet_layer", "jet_layer_"}, ops_
    assert len(got) == len(want) == 9
    for a, b in zip(got, want):
        assert a.requires_grad == b.requires_grad == grad
        _same(a.detach(), b.detach(), backend)
    if grad:  # and the parameter gradients of all of them together
        g_c = _param_grads(model, sum(t.sum() for t in got))
        g_e = _param_grads(model, sum(t.sum() for t in want))
        for a, b in zip(g_c, g_e):
            _same(a, b, backend)


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad-chunked", "graph"])
def test_every_mlp_function_fullgraph_aot_eager(device, grad):
    """fullgraph=True: a graph break anywhere (a missing fake kernel, Python on tensor values)
    would raise."""
    _check_all_functions(device, "aot_eager", grad)


@pytest.mark.slow
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad-chunked", "graph"])
def test_every_mlp_function_fullgraph_inductor(device, grad):
    _check_all_functions(device, "inductor", grad)


def test_dynamic_batch_size_compiles_once(device):
    """dynamic=True: one graph for every N (no recompilation per batch size), same numbers.

    (The first compile may restart its analysis once: the activation parameters reach the op as a
    list of floats, which dynamo first traces as symbolic and then specialises. A restart can hand
    the backend an empty graph; what matters is that only one graph holds the computation and that
    no later N compiles again.)"""
    cap = _Capture("aot_eager")
    model = _model(device)
    compiled = torch.compile(lambda x: thd.mlp_laplacian(model, x), fullgraph=True, dynamic=True, backend=cap)
    after_first = None
    for n in (5, 9, 17, 33):
        x = _x(device, n)
        assert torch.equal(compiled(x).detach(), thd.mlp_laplacian(model, x).detach())
        after_first = len(cap.graphs) if after_first is None else after_first
    assert len(cap.graphs) == after_first  # no recompilation for another N
    working = [g for g in cap.graphs if any(n.op == "call_function" for n in g.graph.nodes)]
    assert len(working) == 1


def _nested_grad_loss(model):
    def f(x):
        (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        hd = torch.stack([torch.autograd.grad(g[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(3)], 1)
        return ((hd.sum(1) + 1.0) ** 2).mean()

    return f


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_dropins_in_nested_autograd_with_trace_autograd_ops(device, backend):
    """The user's own nested autograd.grad through drop-ins, compiled whole: needs dynamo's
    trace_autograd_ops (without it torch.autograd.grad is a graph break; fullgraph raises)."""
    model = _model(device, (True, True))
    f = _nested_grad_loss(model)
    x = _x(device).requires_grad_(True)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="trace_autograd_ops"):
        torch.compile(f, fullgraph=True, backend=backend)(x)
    torch._dynamo.reset()
    cap = _Capture(backend)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        l_c = torch.compile(f, fullgraph=True, backend=cap)(x)
    g_c = _param_grads(model, l_c)
    l_e = f(x)
    g_e = _param_grads(model, l_e)
    assert len(cap.graphs) == 1 and cap.thd_ops()  # the drop-ins' ops are in the graph
    _same(l_c.detach(), l_e.detach(), backend)
    for a, b in zip(g_c, g_e):
        _same(a, b, backend)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_general_functions_fullgraph_with_a_cached_program(device, backend, monkeypatch):
    """laplacian / hessian_diag / axis_derivatives on the jet path: the model is traced with
    torch.fx once (at compile time if no eager call cached it: dynamo runs the cache lookup as a
    constant-result function) and a training step calling them compiles with fullgraph=True into
    one graph (before issue 15 every call traced the model: graph breaks, fullgraph raised), with
    the eager numbers and parameter gradients. On the MLP-engine path: the same.

    Compiled, the collapsed jets keep the torch formulas (jet2.py declines under torch.compile);
    the eager side is computed the same way for the bitwise comparison, and the eager one-pass
    ops agree with it to INDUCTOR_TOL (test_eager_one_pass_ops_agree_with_compiled below)."""
    monkeypatch.setattr(jet2, "_usable", lambda *a: False)
    model, _ = build_residual(3, 8, 1, [ACT_BY_LABEL["tanh"], ACT_BY_LABEL["silu"]], product=True, device=device)
    mlp = _model(device)
    x = _x(device)
    calls = [  # (model, function, the path it takes: docs/any-model.md)
        (model, lambda x: thd.laplacian(model, x, return_info=True), "jet"),
        (mlp, lambda x: thd.hessian_diag(mlp, x, return_info=True), "engine"),
        (model, lambda x: thd.axis_derivatives(model, x, order=3, return_info=True), "jet"),
        (model, lambda x: thd.hessian_diag(model, x, return_info=True), "jet"),
    ]
    for i, (m, f, path) in enumerate(calls):
        torch._dynamo.reset()
        thd.clear_trace_cache()
        if i % 2:
            f(x)  # an eager call first caches the program; else it is traced at compile time
        cap = _Capture(backend)
        got, info_c = torch.compile(f, backend=cap, fullgraph=True)(x)
        want, info_e = f(x)
        assert len(cap.graphs) == 1
        assert info_c.path == info_e.path == path  # compiling does not send it down another path
        _same(got.detach(), want.detach(), backend)
        g_c = _param_grads(m, got.square().mean())
        g_e = _param_grads(m, want.square().mean())
        assert any(g.abs().max() > 0 for g in g_e)
        for a, b in zip(g_c, g_e):
            _same(a, b, backend)


def test_compiled_call_follows_model_changes(device):
    """Under torch.compile the cached program is looked up by the same signature as in eager
    mode, and dynamo guards on what it reads: a changed hyper-parameter recompiles and gives the
    new model's numbers (not the stale program's)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.LayerNorm(8), torch.nn.Softplus(beta=1.0), torch.nn.Linear(8, 1))
    model = model.to(device, torch.float64)
    x = _x(device)
    f = lambda x: thd.laplacian(model, x)  # noqa: E731
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    before = f(x)
    assert torch.equal(compiled(x), before)
    model[2].beta = 3.0
    model[1].eps = 0.5
    after = f(x)  # eager: retraced (the signature changed)
    assert not torch.allclose(after, before)
    assert torch.equal(compiled(x), after)


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace:UserWarning")
def test_hutchinson_generator_is_a_graph_break(device):
    """generator=g cannot enter a graph: fullgraph raises; the default mode draws the same
    probes from g as eager mode (same results, g advanced alike)."""
    model = _model(device)
    x = _x(device)

    def f(x, g):
        return thd.mlp_laplacian_hutchinson(model, x, num_samples=4, generator=g)

    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(f, fullgraph=True, backend="eager")(x, torch.Generator(device=device).manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager")
    g_c, g_e = torch.Generator(device=device).manual_seed(5), torch.Generator(device=device).manual_seed(5)
    first = compiled(x, g_c)
    assert torch.equal(first, f(x, g_e))
    second = compiled(x, g_c)
    assert torch.equal(second, f(x, g_e)) and not torch.equal(first, second)  # fresh probes per call
    assert torch.equal(g_c.get_state(), g_e.get_state())


def test_double_backward_through_compiled_graph_is_a_torch_error(device):
    """A documented torch limit: AOTAutograd's compiled backward is not differentiable, so a loss
    on the parameter gradients (a gradient penalty, a Hessian-vector product in the parameters)
    of a compiled loss raises torch's RuntimeError; in eager mode it works."""
    model = _model(device)
    params = [p for p in model.parameters()][:-1]  # the last bias does not reach the Laplacian
    x = _x(device)
    compiled = torch.compile(_pinn_loss(model), fullgraph=True, backend="aot_eager")
    gs = torch.autograd.grad(compiled(x), params, create_graph=True)
    with pytest.raises(RuntimeError, match="torch.compile with aot_autograd does not currently support double backward"):
        sum(g.square().sum() for g in gs).backward()
    gs = torch.autograd.grad(_pinn_loss(model)(x), params, create_graph=True)  # eager: fine
    sum(g.square().sum() for g in gs).backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in params)


def test_wide_input_sum_compiles_fullgraph(device):
    """d = 12 > width 4: eager calls compress the sum's directions for the fused op (a
    data-dependent finiteness test), compiled calls keep the reverse sweep -- fullgraph still
    captures one graph, and the two agree to rounding (float64: 1e-12 of the scale)."""
    model = build_mlp(12, [4, 5], 1, [ACT_BY_LABEL["tanh"], ACT_BY_LABEL["silu"]], seed=3, device=device)[0]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 12, generator=g, dtype=torch.float64).to(device)
    cap = _Capture("aot_eager")
    got = torch.compile(lambda x: thd.mlp_laplacian(model, x), fullgraph=True, backend=cap)(x)
    want = thd.mlp_laplacian(model, x)
    assert len(cap.graphs) == 1
    assert rel_err(got, want) <= 1e-12


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_eager_one_pass_ops_agree_with_compiled(device, backend):
    """The eager Laplacian through the one-pass jet ops (jet2.py, CPU) vs the compiled one
    (torch formulas): the same numbers and parameter gradients to INDUCTOR_TOL."""
    model, _ = build_residual(3, 8, 1, [ACT_BY_LABEL["tanh"], ACT_BY_LABEL["silu"]], product=True, device=device)
    x = _x(device)
    f = lambda x: thd.laplacian(model, x)  # noqa: E731
    got = torch.compile(f, backend=backend, fullgraph=True)(x)
    want = f(x)
    assert rel_err(got.detach(), want.detach()) <= INDUCTOR_TOL
    for a, b in zip(_param_grads(model, got.square().mean()), _param_grads(model, want.square().mean())):
        assert rel_err(a, b) <= INDUCTOR_TOL
