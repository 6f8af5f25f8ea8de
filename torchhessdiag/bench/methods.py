"""The problem and the methods of the benchmark suite.

The problem: an MLP ``depth x (Linear, activation), Linear -> 1`` (torch.nn modules, torch.nn's
default initialisation from a seed), N points x ~ N(0, 1)^d; the Hessian diagonal (N, d) and the
Laplacian (N,) of its scalar output with respect to x.

Every method is a :class:`Method`; ``build(ctx, x)`` returns a zero-argument call on the block's
model and the points x:

* inference: the call returns ``{"diag": (N, d), "lap": (N,)}`` (what the method gives);
* training step: the call sets the weight gradients to None, computes the PINN-style loss
  ``mean((lap - 1)^2)`` from the method's Laplacian and runs ``loss.backward()`` to the weights;
  :func:`flat_grads` then reads the gradients of the model the method used.

Inference calls may also return ``"value"`` (N,) and ``"grad"`` (N, d) (what
``thd.mlp_derivatives`` gives); ``Method.gives`` says which: "diag", "lap", "both" (diag + lap),
"deriv" (value + grad + lap) or "all" (value + grad + diag + lap). :data:`TASK_GIVES` says which
methods compete in which task.

The plain forward Laplacian / Hessian diagonal (the yardstick, as fast as plain PyTorch allows:
rows stacked per layer, the constant first-layer Jacobian, buffers reused, sigma' and sigma'' from
the activation's output) is in :mod:`torchhessdiag.bench.fwdlap`; also under ``torch.compile``.
"""

from __future__ import annotations

import copy
import time
import types
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

import torchhessdiag as thd

from . import fwdlap

Tensor = torch.Tensor

ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
}


# ---- the problem ---------------------------------------------------------------------------------


def build_base(d: int, widths: List[int], activation: str, seed: int) -> nn.Sequential:
    """The float32 CPU model d -> widths[0] -> ... -> widths[-1] -> 1, weights from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers, fan = [], d
        for w in widths:
            layers += [nn.Linear(fan, w), ACTIVATIONS[activation]()]
            fan = w
        layers.append(nn.Linear(fan, 1))
        return nn.Sequential(*layers)


def model_as(base: nn.Module, device, dtype) -> nn.Sequential:
    """A copy of base (same weights) on device/dtype."""
    return copy.deepcopy(base).to(device=device, dtype=dtype)


def make_input(n: int, d: int, device, dtype, seed: int) -> Tensor:
    """N(0, 1) points, drawn in float64 from ``seed`` (the same values for every dtype)."""
    gen = torch.Generator().manual_seed(seed + 1000 + d)
    return torch.randn(n, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


@dataclass
class Context:
    """The block's model (and its drop-in conversion, made once) and the mode."""

    model: nn.Sequential
    mode: str  # "inference" or "train"
    _dropin: Optional[nn.Module] = field(default=None, repr=False)

    @property
    def dropin(self) -> nn.Module:
        if self._dropin is None:
            self._dropin = thd.nn.convert(self.model)  # same weights, drop-in activations
            self._dropin.requires_grad_(self.mode == "train")
        return self._dropin


# ---- the methods ---------------------------------------------------------------------------------


def nested_autograd(model: nn.Module, x: Tensor, create_graph: bool = False) -> Tuple[Tensor, Tensor]:
    """(Hessian diagonal (N, d), Laplacian (N,)) by nested reverse mode: one
    grad(create_graph=True) for the gradient, then one backward per input dimension."""
    x = x.detach().requires_grad_(True)
    u = model(x)
    (g,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    cols = []
    for i in range(x.shape[1]):
        (h,) = torch.autograd.grad(g[:, i].sum(), x, retain_graph=True, create_graph=create_graph)
        cols.append(h[:, i])
    diag = torch.stack(cols, dim=1)
    return diag, diag.sum(1)


def _scalar_fn(model: nn.Module) -> Callable[[Tensor], Tensor]:
    return lambda xi: model(xi).squeeze(-1)  # one point (d,) -> scalar


def func_hessian(model: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor]:
    """(Hessian diagonal, Laplacian): vmap over the points of torch.func.hessian, diagonal taken.
    Also the reference of every correctness check (in float64)."""
    diag = torch.func.vmap(torch.func.hessian(_scalar_fn(model)))(x).diagonal(dim1=-2, dim2=-1)
    return diag, diag.sum(1)


def func_jvp_grad(model: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor]:
    """(Hessian diagonal, Laplacian) from vector-Hessian-vector products v^T (H v), H v by
    jvp of grad (forward-over-reverse), vmap over v in the basis and over the points."""
    g = torch.func.grad(_scalar_fn(model))
    d = x.shape[1]
    eye = torch.eye(d, dtype=x.dtype, device=x.device)

    def vhv(xi, v):
        return (torch.func.jvp(g, (xi,), (v,))[1] * v).sum()

    per_point = torch.func.vmap(vhv, in_dims=(None, 0))  # over the basis vectors
    diag = torch.func.vmap(per_point, in_dims=(0, None))(x, eye)
    return diag, diag.sum(1)


act_derivs = fwdlap.act_derivs


def plain_forward(model: nn.Sequential, x: Tensor, per_direction: bool) -> Tensor:
    """The plain-PyTorch forward Laplacian (N,) or, per_direction, Hessian diagonal (N, d) of a
    one-output model: :func:`torchhessdiag.bench.fwdlap.forward_laplacian` (differentiable)."""
    out = fwdlap.forward_laplacian(model, x, "diag" if per_direction else "lap")
    return out["diag"][:, 0] if per_direction else out["lap"][:, 0]


class MethodUnavailable(RuntimeError):
    """Raised by a method's build when it cannot run here (the runner skips it with the reason)."""


def nested_all(model: nn.Module, x: Tensor, create_graph: bool = False) -> Dict[str, Tensor]:
    """Value (N,), gradient (N, d), Hessian diagonal (N, d), Laplacian (N,) by nested reverse
    mode (see :func:`nested_autograd`): the value and the gradient come with it."""
    x = x.detach().requires_grad_(True)
    u = model(x)
    (g,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    cols = []
    for i in range(x.shape[1]):
        (h,) = torch.autograd.grad(g[:, i].sum(), x, retain_graph=True, create_graph=create_graph)
        cols.append(h[:, i])
    diag = torch.stack(cols, dim=1)
    if not create_graph:
        u, g = u.detach(), g.detach()
    return {"value": u.squeeze(-1), "grad": g, "diag": diag, "lap": diag.sum(1)}


def value_and_grad(model: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor]:
    """Reference value (N,) and input gradient (N, d): the model, and vmap of torch.func.grad."""
    with torch.no_grad():
        u = model(x).squeeze(-1)
    g = torch.func.vmap(torch.func.grad(_scalar_fn(model)))(x)
    return u, g.detach()


# ---- the plain forward Laplacian (torchhessdiag/bench/fwdlap.py) ---------------------------------


def _fwd_inference(second: str, value: bool) -> Callable:
    def build_(c, x):
        fl = fwdlap.ForwardLaplacian(c.model, x.shape[0], second, value)

        def call():
            out = fl(x)
            return _squeeze_out(out)

        return call

    return build_


def _squeeze_out(out: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """fwdlap's (N, 1) / (N, 1, K) / (N, 1, d) outputs of a one-output model -> (N,), (N, d)."""
    return {k: v[:, 0] for k, v in out.items()}


_COMPILED: Dict[tuple, Callable] = {}


def _fresh_function(fn: Callable, tag: str) -> Callable:
    """A copy of fn with its own code object, so that torch.compile (dynamo caches per code
    object, with a recompile limit) gives every (shape, dtype, mode) its own compiled entry."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _compiled_fwd(ctx: "Context", x: Tensor, second: str = "lap") -> Callable:
    """The forward Laplacian under torch.compile (inductor, fullgraph), compiled here -- before
    the returned call is ever timed -- for this model's architecture, x's dtype and the mode,
    with the number of points dynamic (one graph serves every N). The compile time is kept on
    the returned function as ``compile_s`` (0 where an earlier build compiled the graph):
    excluded from the timing, reported. Raises MethodUnavailable with torch's reason where
    compiling fails."""
    model = ctx.model
    lins, acts = fwdlap.parse_modules(model)
    rules = [fwdlap.act_rules(a)[1] for a in acts]
    names = tuple(fwdlap.act_rules(a)[0] for a in acts)
    train = ctx.mode == "train"
    # one graph per architecture, dtype, device and mode, dynamic in the number of points N (a
    # graph per N would cost a compile per block and per probe size: 10-30 s each on 2 cores)
    key = (second, names, tuple(tuple(m.weight.shape) for m in lins), x.dtype, str(x.device),
           train)

    def entry(Ws, bs, xx):
        return fwdlap.forward_derivatives(Ws, bs, rules, xx, second)[second]

    def params():
        return [m.weight for m in lins], [m.bias for m in lins]

    new = key not in _COMPILED
    if new:
        tag = f"{len(_COMPILED)}"
        _COMPILED[key] = torch.compile(_fresh_function(entry, tag), fullgraph=True)
    fn = _COMPILED[key]
    if x.shape[0] > 1:
        torch._dynamo.mark_dynamic(x, 0)
    t0 = time.perf_counter()
    try:
        Ws, bs = params()
        if train:
            out = fn(Ws, bs, x)
            out.sum().backward()  # compiles the backward too
            for m in lins:
                m.weight.grad = None
                if m.bias is not None:
                    m.bias.grad = None
        else:
            with torch.no_grad():
                fn(Ws, bs, x)
    except Exception as e:  # inductor/dynamo failure on this torch: not a wrong method
        _COMPILED.pop(key, None)
        raise MethodUnavailable(f"torch.compile failed: {type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}")
    compile_s = time.perf_counter() - t0 if new else 0.0

    if train:
        def call():
            Ws, bs = params()
            return fn(Ws, bs, x)[:, 0]
    else:
        def call():
            Ws, bs = params()
            with torch.no_grad():
                return {second: fn(Ws, bs, x)[:, 0]}
    call.compile_s = compile_s
    return call


def _compile_available() -> Optional[str]:
    if not hasattr(torch, "compile"):
        return "torch.compile is not in this torch"
    return None


def _jet_available() -> Optional[str]:
    try:
        import jet  # noqa: F401  (PyPI: jet-for-pytorch, Python >= 3.12)
    except Exception as e:  # ImportError, or a SyntaxError on Python < 3.12
        return (f"jet-for-pytorch not importable ({type(e).__name__}: {str(e)[:80]}); "
                f"pip install jet-for-pytorch (needs Python >= 3.12)")
    return None


def jet_laplacian(model: nn.Module, x: Tensor, collapsed: bool) -> Callable[[Tensor], Tensor]:
    """jet-for-pytorch's Laplacian of the one-point function, as in its own benchmark
    (jet.laplacian, capture_graph, common-subexpression elimination, vmap over the points).
    ``collapsed``: collapsed Taylor mode (sums the second-order coefficients on the way) or
    standard Taylor mode (vmap over the d directions, summed after)."""
    import jet

    lap = jet.laplacian(model, (x[0],), collapsed=collapsed)
    lap, _ = jet.capture_graph(lap, (x[0],))
    jet.common_subexpression_elimination(lap.graph)
    lap.recompile()
    vm = torch.func.vmap(lap)
    return lambda xx: vm(xx).reshape(xx.shape[0])


def jet_derivatives(model: nn.Module, x: Tensor) -> Callable[[Tensor], Dict[str, Tensor]]:
    """jet-for-pytorch's collapsed Taylor mode returning what thd.mlp_derivatives gives: its jet
    of the one-point function along the d unit directions gives the value (order 0), the d
    first-order coefficients (the gradient) and the collapsed second-order one (the Laplacian);
    traced, CSE and vmap over the points as in :func:`jet_laplacian`."""
    import jet

    x0 = x[0]
    d = x0.numel()
    cjet = jet.jet(model, (x0,), collapsed=True)

    def f(xi):
        V = torch.eye(d, dtype=xi.dtype, device=xi.device)
        return cjet((xi, V, torch.zeros_like(xi)))

    g, _ = jet.capture_graph(f, (x0,))
    jet.common_subexpression_elimination(g.graph)
    g.recompile()
    vm = torch.func.vmap(g)

    def call(xx):
        f0, f1, f2 = vm(xx)  # (N, 1), (N, d, 1), (N, 1)
        n = xx.shape[0]
        return {"value": f0.reshape(n), "grad": f1.reshape(n, d), "lap": f2.reshape(n)}

    return call


def _thd_general_available() -> Optional[str]:
    if callable(getattr(thd, "laplacian", None)):
        return None
    return "thd.laplacian(f, x) is not in this version of torchhessdiag (issue 4)"


def _nograd(fn: Callable, *args, **kw):
    with torch.no_grad():
        return fn(*args, **kw)


def _detached(fn: Callable, *args, **kw):
    """torch.func's transforms in inference: not under no_grad, where torch 2.13's
    forward-over-reverse of SiLU/GELU raises ("forward AD with aten::silu_backward"); the
    inference model's weights do not require grad, so no graph is kept either way."""
    return tuple(t.detach() for t in fn(*args, **kw))


@dataclass
class Method:
    """One way to get the Hessian diagonal and/or the Laplacian (and maybe value and gradient)."""

    key: str
    label: str
    gives: str  # "diag", "lap", "both" (diag + lap), "deriv" (value, grad, lap), "all"
    modes: Tuple[str, ...]
    inference: Optional[Callable] = None  # (ctx, x) -> () -> {"diag"/"lap"/...: Tensor}
    laplacian: Optional[Callable] = None  # (ctx, x) -> () -> (N,) with a graph (training)
    available: Callable[[], Optional[str]] = lambda: None  # reason it cannot run, or None
    uses_dropin: bool = False
    is_thd: bool = False
    # the method whose call on N/8 points stands in for this one in the budget probe (the
    # compiled forward Laplacian would otherwise compile once more for each probe size)
    probe_as: Optional[str] = None


#: which ``gives`` compete in which inference task (training: every method, task "train")
TASK_GIVES = {"diag": ("diag", "both", "all"), "lap": ("lap", "both", "deriv", "all"),
              "deriv": ("deriv", "all")}
#: the thd method of each task
THD_OF_TASK = {"diag": "thd_diag", "lap": "thd_lap", "deriv": "thd_deriv", "train": "thd_lap"}


def quantities(gives: str) -> Tuple[str, ...]:
    return {"diag": ("diag",), "lap": ("lap",), "both": ("diag", "lap"),
            "deriv": ("value", "grad", "lap"), "all": ("value", "grad", "diag", "lap")}[gives]


def primary_task(key: str, mode: str) -> str:
    """The task a method's row is compared in: training -> "train"; else its own kind (methods
    giving the diagonal and more are compared as diagonals, as the thd column always did)."""
    if mode == "train":
        return "train"
    g = METHODS[key].gives
    return {"diag": "diag", "both": "diag", "all": "diag", "lap": "lap", "deriv": "deriv"}[g]


def serves(key: str, task: str, mode: str) -> bool:
    m = METHODS[key]
    if mode == "train":
        return task == "train" and "train" in m.modes
    return task in TASK_GIVES and m.gives in TASK_GIVES[task]


METHODS: Dict[str, Method] = {}


def _register(m: Method) -> None:
    METHODS[m.key] = m


def _thd_deriv(c, x):
    def call():
        with torch.no_grad():
            r = thd.mlp_derivatives(c.model, x)
        return {"value": r.value[:, 0], "grad": r.gradient[:, 0], "lap": r.second[:, 0]}

    return call


_register(Method(
    "thd_diag", "thd.mlp_hessian_diag", "diag", ("inference",), is_thd=True,
    inference=lambda c, x: lambda: {"diag": _nograd(thd.mlp_hessian_diag, c.model, x).squeeze(1)}))
_register(Method(
    "thd_lap", "thd.mlp_laplacian", "lap", ("inference", "train"), is_thd=True,
    inference=lambda c, x: lambda: {"lap": _nograd(thd.mlp_laplacian, c.model, x).squeeze(1)},
    laplacian=lambda c, x: lambda: thd.mlp_laplacian(c.model, x).squeeze(1)))
_register(Method(
    "thd_deriv", "thd.mlp_derivatives (value, grad, lap)", "deriv", ("inference",), is_thd=True,
    inference=_thd_deriv))
# the hook for the general thd.laplacian(f, x) of issue 4: runs wherever it exists
_register(Method(
    "thd_general", "thd.laplacian (general)", "lap", ("inference", "train"), is_thd=True,
    available=_thd_general_available,
    inference=lambda c, x: lambda: {"lap": _nograd(thd.laplacian, c.model, x).reshape(x.shape[0])},
    laplacian=lambda c, x: lambda: thd.laplacian(c.model, x).reshape(x.shape[0])))
_register(Method(
    "nested", "nested autograd (torch.nn)", "all", ("inference", "train"),
    inference=lambda c, x: lambda: nested_all(c.model, x),
    laplacian=lambda c, x: lambda: nested_autograd(c.model, x, create_graph=True)[1]))
_register(Method(
    "nested_dropin", "nested autograd (thd.nn drop-ins)", "all", ("inference", "train"),
    uses_dropin=True,
    inference=lambda c, x: lambda: nested_all(c.dropin, x),
    laplacian=lambda c, x: lambda: nested_autograd(c.dropin, x, create_graph=True)[1]))
_register(Method(
    "func_hessian", "torch.func vmap(hessian)", "both", ("inference", "train"),
    inference=lambda c, x: lambda: dict(zip(("diag", "lap"), _detached(func_hessian, c.model, x))),
    laplacian=lambda c, x: lambda: func_hessian(c.model, x)[1]))
_register(Method(
    "func_jvp", "torch.func vmap(jvp of grad)", "both", ("inference", "train"),
    inference=lambda c, x: lambda: dict(zip(("diag", "lap"), _detached(func_jvp_grad, c.model, x))),
    laplacian=lambda c, x: lambda: func_jvp_grad(c.model, x)[1]))
_register(Method(
    "fwd_diag", "plain fwd Hessian diag", "diag", ("inference",),
    inference=_fwd_inference("diag", False)))
_register(Method(
    "fwd_lap", "plain fwd Laplacian", "lap", ("inference", "train"),
    inference=_fwd_inference("lap", False),
    laplacian=lambda c, x: lambda: fwdlap.forward_laplacian(c.model, x, "lap")["lap"][:, 0]))
_register(Method(
    "fwd_deriv", "plain fwd Laplacian (value, grad, lap)", "deriv", ("inference",),
    inference=_fwd_inference("lap", True)))
_register(Method(
    "fwd_lap_compiled", "plain fwd Laplacian, torch.compile", "lap", ("inference", "train"),
    inference=lambda c, x: _compiled_fwd(c, x), laplacian=lambda c, x: _compiled_fwd(c, x),
    available=_compile_available, probe_as="fwd_lap"))


def _jet_traced(make: Callable, *args):
    """Trace with jet; an operation jet has no rule for (jet-for-pytorch 1.0.0: SiLU, GELU,
    Softplus) makes the method unavailable for this model, not wrong."""
    try:
        return make(*args)
    except NotImplementedError as e:
        if "jet rule" in str(e):
            raise MethodUnavailable(f"jet-for-pytorch: {str(e).strip().splitlines()[0][:120]}")
        raise


def _jet_method(key: str, label: str, collapsed: bool) -> Method:
    def inf(c, x):
        f = _jet_traced(jet_laplacian, c.model, x, collapsed)
        return lambda: {"lap": _nograd(f, x)}

    def lap(c, x):
        f = _jet_traced(jet_laplacian, c.model, x, collapsed)
        return lambda: f(x)

    return Method(key, label, "lap", ("inference", "train"), inference=inf, laplacian=lap,
                  available=_jet_available)


def _jet_deriv(c, x):
    f = _jet_traced(jet_derivatives, c.model, x)
    return lambda: _nograd(f, x)


_register(_jet_method("jet", "jet-for-pytorch (collapsed Taylor)", True))
_register(_jet_method("jet_std", "jet-for-pytorch (standard Taylor)", False))
_register(Method("jet_deriv", "jet-for-pytorch (collapsed; value, grad, lap)", "deriv",
                 ("inference",), inference=_jet_deriv, available=_jet_available))

DIAG_KEYS = [k for k, m in METHODS.items() if m.gives in TASK_GIVES["diag"]]
LAP_KEYS = [k for k, m in METHODS.items() if m.gives in TASK_GIVES["lap"]]


def build(key: str, ctx: Context, x: Tensor) -> Callable:
    """The zero-argument call of method ``key`` in ``ctx.mode`` on points x."""
    m = METHODS[key]
    if ctx.mode == "inference":
        return m.inference(ctx, x)
    lap = m.laplacian(ctx, x)
    params = list(method_model(key, ctx).parameters())

    def step():
        for p in params:
            p.grad = None
        loss = ((lap() - 1.0) ** 2).mean()
        loss.backward()
        return loss.detach()

    if hasattr(lap, "compile_s"):
        step.compile_s = lap.compile_s
    return step


def method_model(key: str, ctx: Context) -> nn.Module:
    return ctx.dropin if METHODS[key].uses_dropin else ctx.model


def flat_grads(model: nn.Module) -> Tensor:
    """All weight gradients, flattened (None -> zeros: the Laplacian does not depend on the
    output bias, and some methods leave its grad None)."""
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad.detach()).flatten()
                      for p in model.parameters()])


# ---- the GEMM floor ------------------------------------------------------------------------------


def floor_fn(model: nn.Sequential, x: Tensor, K: int, train: bool = False) -> Callable[[], None]:
    """The engine's GEMMs alone, on preallocated outputs, biases not added.

    The forward row (N x d -> w_1 ... -> 1), the backward row (N x 1 -> ... -> d) and the K
    first-order rows through the hidden layers 2..L (N*K rows each; layer 1's Jacobian is the
    constant W1 V, and nothing follows the last activation). ``train``: each GEMM A W^T also with
    its two backward GEMMs G W (gradient to A) and G^T A (gradient to W), as a training step
    through those GEMMs needs.
    """
    Ws = [m.weight.detach() for m in model if isinstance(m, nn.Linear)]
    N = x.shape[0]
    gemms = []  # (A, W, out): out = A @ W^T, with A fixed (values must not decay to denormals)
    h = x.detach()
    for W in Ws:  # forward row
        out = x.new_empty(N, W.shape[0])
        gemms.append((h, W, out))
        h = x.new_empty(N, W.shape[0]).normal_()
    g = x.new_ones(N, Ws[-1].shape[0])
    for W in reversed(Ws):  # backward row: g @ W = g (W^T)^T
        Wt = W.t().contiguous()
        gemms.append((g, Wt, x.new_empty(N, W.shape[1])))
        g = x.new_empty(N, W.shape[1]).normal_()
    hidden = Ws[1:-1]
    if hidden and K > 0:
        rows = x.new_empty(N * K, hidden[0].shape[1]).normal_()
        for W in hidden:  # first-order rows, N*K at a time
            gemms.append((rows, W, x.new_empty(N * K, W.shape[0])))
            rows = x.new_empty(N * K, W.shape[0]).normal_()
    grads = []
    if train:
        for A, W, out in gemms:
            G = torch.randn_like(out)
            grads.append((G, x.new_empty(A.shape), x.new_empty(W.shape)))

    def run():
        for A, W, out in gemms:
            torch.mm(A, W.t(), out=out)
        for (A, W, _), (G, gA, gW) in zip(gemms, grads):
            torch.mm(G, W, out=gA)
            torch.mm(G.t(), A, out=gW)

    return run


# ---- checks --------------------------------------------------------------------------------------


def rel_err(a: Tensor, ref: Tensor) -> float:
    """max |a - ref| / max |ref| (norm-wise relative error), in float64; NaN/inf -> inf."""
    a, ref = a.detach().to(torch.float64), ref.detach().to(torch.float64)
    if a.shape != ref.shape:
        raise ValueError(f"shape {tuple(a.shape)} vs reference {tuple(ref.shape)}")
    e = float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
    return e if e == e else float("inf")
