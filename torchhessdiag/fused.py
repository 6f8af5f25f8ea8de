"""The fused forward-mode jet of an MLP: one op call for the whole network (csrc/mlp_ops.h).

For a small number K of directions every exact method carries about K+2 rows per point, so what
decides the speed is how often those rows cross memory and how much happens per layer on the
host. ``torchhessdiag::mlp_jet`` carries, in one forward sweep, the value, the second-order
row(s) and the K first-order rows, stacked so that each layer is one GEMM and one fused pass of
the derivative table (bias, sigma, sigma', sigma'', row scaling and the sum of squares at once);
the loop over layers, and in training the whole backward (``mlp_jet_backward``), run in C++.

Rows (``out`` of the op, shape (R, N, m)): 0 the value; 1..S the second-order rows (S = 1: the
sum over the selected directions of v_k^T H v_k; per direction: one row each); then, when asked,
the K first-order rows J_k = (du/dx) v_k (with V = I they are the gradient).

Autograd: the op's backward is ``mlp_jet_backward`` (weights, biases, x). A backward that is
itself differentiated (``create_graph=True``) recomputes the jet with :func:`reference_jet`, the
same rules in torch ops, and differentiates that, so every order stays exact.

:func:`plan` decides whether a parsed network can take this path (its structure, the devices
with a compiled kernel) and :func:`run` calls it; ``torchhessdiag/engine.py`` chooses between
it and the K+2-row reverse sweep per call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from . import _backend, _registry, reference
from .activations import NAMES

Tensor = torch.Tensor
_ops = torch.ops.torchhessdiag


@dataclass(frozen=True)
class Net:
    """A network in the op's form: layer l is z = W_l a + b_l followed by activation acts[l]
    (a table id, or -1 for none)."""

    weights: Tuple[Tensor, ...]
    biases: Tuple[Optional[Tensor], ...]
    acts: Tuple[int, ...]
    act_a: Tuple[float, ...]
    act_b: Tuple[float, ...]

    @property
    def widths(self) -> List[int]:
        return [W.shape[0] for W in self.weights]

    @property
    def first_width(self) -> int:
        """Width at the first activation (the constant first-order rows have this many columns)."""
        return next(W.shape[0] for W, a in zip(self.weights, self.acts) if a >= 0)


_CUDA_OK: dict = {}


def available(x: Tensor) -> bool:
    """Whether a compiled mlp_jet kernel serves x's device. On a GPU this build has no kernel
    image for (the probe in torchhessdiag/_cuda_probe.py, asked once per device) the engine takes
    the reverse sweep, whose ops fall back to the reference kernels there."""
    if not _backend.COMPILED or _backend.FORCED_REFERENCE:
        return False
    if x.device.type == "cpu":
        return True
    if x.device.type != "cuda" or not _backend.CUDA_KERNELS:
        return False
    idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
    ok = _CUDA_OK.get(idx)
    if ok is None:
        if torch.compiler.is_compiling():
            return True  # (eager calls ask the probe; a trace assumes the compiled kernels)
        from . import _cuda_probe

        ok = _CUDA_OK[idx] = not _cuda_probe.on_first_use(idx)
    return ok


def _bias_args(net: Net, x: Tensor) -> List[Tensor]:
    """The op's bias list: an empty tensor stands for a layer without bias."""
    empty = None
    out = []
    for b in net.biases:
        if b is None:
            if empty is None:
                empty = x.new_empty(0)
            out.append(empty)
        else:
            out.append(b)
    return out


def run(
    net: Net,
    x: Tensor,
    V: Optional[Tensor],
    axes: Sequence[int],
    sel: Sequence[int],
    diag: bool,
    grad_rows: bool,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """The op on x (N, d) along the directions V (d, K) -- or, V None, along the coordinate
    ``axes`` -- returning out (R, N, m) (module docstring). ``sel``: the directions of the
    second-order rows (diag) or of the sum. Differentiable (to the weights, biases and x) when
    grad mode is on and any of them requires grad."""
    save = torch.is_grad_enabled() and (
        x.requires_grad
        or any(W.requires_grad for W in net.weights)
        or any(b is not None and b.requires_grad for b in net.biases)
    )
    out, _ = _ops.mlp_jet(
        x.contiguous(),
        list(net.weights),
        _bias_args(net, x),
        list(net.acts),
        list(net.act_a),
        list(net.act_b),
        None if V is None else V.contiguous(),
        [] if V is not None else list(axes),
        list(sel),
        diag,
        grad_rows,
        0 if chunk_size is None else chunk_size,  # 0: the op chooses (csrc/mlp_ops.cpp, auto_chunk)
        save,
    )
    return out


# ---- the same rules in torch ops (oracle, and the double backward) ------------------------------


def reference_jet(x, weights, biases, acts, act_a, act_b, V, axes, sel, diag: bool, grad_rows: bool) -> Tensor:
    """out (R, N, m) of mlp_jet computed with torch ops and the pure-PyTorch derivative table
    (torchhessdiag/reference.py): differentiable to any order. ``biases``: tensors, None or empty
    (no bias); ``V`` None: the directions are the coordinate ``axes``."""
    sel = list(sel)
    N = x.shape[0]
    h = x
    J = None  # first-order rows, set at the first layer
    s = None  # second-order rows (zero until the first activation)
    for l, (W, b, act, a, b2) in enumerate(zip(weights, biases, acts, act_a, act_b)):
        b = b if b is not None and b.numel() else None
        h = torch.nn.functional.linear(h, W, b)
        if l == 0:  # along axes: columns of W (no product with the identity's zeros)
            J = [(V[:, k] @ W.t() if V is not None else W[:, k]).expand(N, -1)
                 for k in (range(V.shape[1]) if V is not None else axes)]
            s = [h.new_zeros(h.shape) for _ in (sel if diag else [0])]
        else:
            J = [Jk @ W.t() for Jk in J]
            s = [sk @ W.t() for sk in s]
        if act < 0:
            continue
        y, d1, d2 = reference.derivatives(h, NAMES[act], a, b2, 2)
        if diag:
            s = [d1 * si + d2 * J[k] * J[k] for si, k in zip(s, sel)]
        else:
            q = sum(J[k] * J[k] for k in sel)
            s = [d1 * s[0] + d2 * q]
        J = [d1 * Jk for Jk in J]
        h = y
    rows = [h] + s + (J if grad_rows else [])
    return torch.stack(rows)


# ---- fake kernels and autograd ------------------------------------------------------------------


def _rows(net_acts, S: int, K: int, grad_rows: bool) -> Tuple[List[int], int]:
    """Rows of each layer's pre-activation jet and of the output (as make_mlp_plan)."""
    first = next(i for i, a in enumerate(net_acts) if a >= 0)
    last = max(i for i, a in enumerate(net_acts) if a >= 0)
    R = 1 + S + K
    out_rows = 1 + S + (K if grad_rows else 0)
    rows = [1 if l <= first else (R if l <= last else out_rows) for l in range(len(net_acts))]
    return rows, out_rows


def _saved_like(x, weights, acts, S, K, grad_rows, save):
    rows, _ = _rows(acts, S, K, grad_rows)
    N = x.shape[0]
    saved = []
    for l, W in enumerate(weights):
        keep = save and (acts[l] >= 0 or l < len(weights) - 1)
        saved.append(x.new_empty(rows[l] * N * W.shape[0] if keep else 0))
    saved.append(torch.empty(1, dtype=torch.long))  # the chunk the forward used (CPU scalar)
    return saved


def _n_dirs(V, axes) -> int:
    return len(axes) if V is None else V.shape[1]


def _fake_jet(x, weights, biases, acts, act_a, act_b, V, axes, sel, diag, grad_rows, chunk, save):
    S = len(sel) if diag else 1
    K = _n_dirs(V, axes)
    _, out_rows = _rows(acts, S, K, grad_rows)
    out = x.new_empty(out_rows, x.shape[0], weights[-1].shape[0])
    return out, _saved_like(x, weights, acts, S, K, grad_rows, save)


# Reference kernels, for devices without a compiled one (and the whole op when the extension is
# not loaded): the same rows from reference_jet; the saved tensors are placeholders of the right
# size (the backward of a reference call recomputes the jet and differentiates it).
def _check_args(x, weights, biases, acts, act_a, act_b, V, axes, sel, op="torchhessdiag.mlp_jet"):
    """The argument checks of the compiled op (csrc/mlp_ops.cpp, make_mlp_plan), with the same
    exception types and messages, so the reference kernel refuses what the compiled one refuses."""
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: x must be float32 or float64, got {x.dtype}; cast it with .float() or .double()")
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"{op}: x must be a contiguous (N, d) tensor, got shape {list(x.shape)}; call .contiguous()")
    L = len(weights)
    if L < 1:
        raise ValueError(f"{op}: the network needs at least one layer")
    if not len(biases) == len(acts) == len(act_a) == len(act_b) == L:
        raise ValueError(f"{op}: weights, biases, acts, act_a and act_b must have one entry per layer ({L} layers)")
    width = x.shape[1]
    for l, (W, b, act, a) in enumerate(zip(weights, biases, acts, act_a)):
        if W.dtype != x.dtype or W.device != x.device:
            raise TypeError(f"{op}: weight {l} must have x's dtype and device ({x.dtype}, {x.device}), got "
                            f"{W.dtype}, {W.device}")
        if W.dim() != 2 or not W.is_contiguous() or W.shape[1] != width:
            raise ValueError(f"{op}: weight {l} must be a contiguous (out, {width}) matrix, got shape {list(W.shape)}")
        if b is not None and b.numel() > 0:
            if b.dtype != x.dtype or b.device != x.device:
                raise TypeError(f"{op}: bias {l} must have x's dtype and device")
            if b.dim() != 1 or b.shape[0] != W.shape[0] or not b.is_contiguous():
                raise ValueError(f"{op}: bias {l} must be a contiguous ({W.shape[0]},) vector (or empty: no bias)")
        if not -1 <= act < len(NAMES):
            raise ValueError(f"{op}: acts[{l}] = {act} is not an activation id (-1 or 0..{len(NAMES) - 1})")
        if act >= 0:
            params = _registry.TABLE[NAMES[act]].params
            if params and params[0].nonzero and a == 0.0:
                raise ValueError(f"{op}: {NAMES[act]} needs {params[0].name} != 0")
        width = W.shape[0]
    if all(a < 0 for a in acts):
        raise ValueError(f"{op}: the network has no activation (its second derivatives are 0)")
    d = x.shape[1]
    if V is not None:
        if V.dtype != x.dtype or V.device != x.device:
            raise TypeError(f"{op}: V must have x's dtype and device")
        if V.dim() != 2 or V.shape[0] != d:
            raise ValueError(f"{op}: V must be (d, K) with d = {d}, got shape {list(V.shape)}")
        if len(axes):
            raise ValueError(f"{op}: give either V or axes, not both")
        K = V.shape[1]
    else:
        if any(not 0 <= a < d for a in axes):
            raise ValueError(f"{op}: axes must lie in [0, {d}), got {list(axes)}")
        K = len(axes)
    if K < 1:
        raise ValueError(f"{op}: at least one direction (V or axes) is needed")
    if any(not 0 <= k < K for k in sel) or len(set(sel)) != len(sel):
        raise ValueError(f"{op}: sel must hold distinct direction indices in [0, {K}), got {list(sel)}")
    if not len(sel):
        raise ValueError(f"{op}: sel is empty")


def _ref_jet(x, weights, biases, acts, act_a, act_b, V, axes, sel, diag, grad_rows, chunk, save):
    if chunk < 0:
        raise ValueError(f"torchhessdiag.mlp_jet: chunk must be >= 0 (0: automatic), got {chunk}")
    _check_args(x, weights, biases, acts, act_a, act_b, V, axes, sel)
    _backend._warn_reference(x.device)
    S = len(sel) if diag else 1
    N = x.shape[0]
    # the chunk the compiled op reports: the user's limit caps it (points are independent, so the
    # reference computes chunk by chunk the same rows as in one block)
    used = max(1, min(chunk if chunk > 0 else N, max(N, 1)))
    with torch.no_grad():
        parts = [reference_jet(x[i : i + used], weights, biases, acts, act_a, act_b, V, axes, sel, diag, grad_rows)
                 for i in range(0, N, used)] or [
            reference_jet(x, weights, biases, acts, act_a, act_b, V, axes, sel, diag, grad_rows)]
        out = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    saved = [t.zero_() for t in _saved_like(x, weights, acts, S, _n_dirs(V, axes), grad_rows, save)]
    saved[-1].fill_(used)
    return out.contiguous(), saved


@contextlib.contextmanager
def _record_autograd():
    """Let autograd record again inside a kernel. A kernel runs below the Autograd key when it is
    reached through an autograd formula (torch.library.register_autograd redispatches with the
    autograd keys excluded), where ops on tensors that require grad record nothing; the reference
    backward differentiates reference_jet on its own detached leaves, so it lifts that exclusion
    for its local graph."""
    keys = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
            torch._C.DispatchKey.AutogradNestedTensor)
    with contextlib.ExitStack() as stack:
        for k in keys:
            stack.enter_context(torch._C._SetExcludeDispatchKeyGuard(k, False))
        yield


def _ref_jet_backward(gout, x, weights, biases, acts, act_a, act_b, V, axes, sel, diag, grad_rows, chunk, saved,
                      need_gx):
    _backend._warn_reference(x.device)
    with torch.enable_grad(), _record_autograd():
        xs = x.detach().requires_grad_(need_gx)
        Ws = [W.detach().requires_grad_(True) for W in weights]
        bs = [b.detach().requires_grad_(True) if b.numel() else b for b in biases]
        out = reference_jet(xs, Ws, bs, acts, act_a, act_b, V, axes, sel, diag, grad_rows)
        leaves = ([xs] if need_gx else []) + Ws + [b for b in bs if b.numel()]
        got = list(torch.autograd.grad(out, leaves, gout, allow_unused=True))
    gx = got.pop(0) if need_gx else x.new_empty(0)
    gx = torch.zeros_like(x) if gx is None else gx
    gW = [g if g is not None else torch.zeros_like(W) for g, W in zip(got[: len(Ws)], weights)]
    it = iter(got[len(Ws):])
    gb = []
    for b in biases:
        if not b.numel():
            gb.append(x.new_empty(0))
        else:
            g = next(it)
            gb.append(g if g is not None else torch.zeros_like(b))
    return gx, gW, gb


def _fake_backward(gout, x, weights, biases, acts, act_a, act_b, V, axes, sel, diag, grad_rows, chunk, saved,
                   need_gx):
    gx = x.new_empty(x.shape) if need_gx else x.new_empty(0)
    gW = [W.new_empty(W.shape) for W in weights]
    gb = [x.new_empty(b.shape[0]) for b in biases]
    return gx, gW, gb


def _setup(ctx, inputs, output):
    x, weights, biases, acts, act_a, act_b, V, axes, sel, diag, grad_rows, chunk, save = inputs
    out, saved = output
    ctx.set_materialize_grads(False)
    ctx.static = (list(acts), list(act_a), list(act_b), list(axes), list(sel), diag, grad_rows, chunk)
    ctx.n_layers = len(weights)
    ctx.has_V = V is not None
    ctx.save_for_backward(x, *( [V] if V is not None else []), *weights, *biases, *saved)
    ctx.saved_ok = bool(save)


def _unpack(ctx):
    t = list(ctx.saved_tensors)
    L = ctx.n_layers
    x = t.pop(0)
    V = t.pop(0) if ctx.has_V else None
    return x, V, t[:L], t[L : 2 * L], t[2 * L :]


def _backward(ctx, gout, gsaved):
    x, V, weights, biases, saved = _unpack(ctx)
    acts, act_a, act_b, axes, sel, diag, grad_rows, chunk = ctx.static
    L = len(weights)
    # no gradients for the non-tensor arguments (an empty list argument wants an empty list:
    # torch.library matches the structure of the inputs)
    none = (None, None, None, None, [] if not axes else None, None, None, None, None, None)
    if gout is None:
        return (None, [None] * L, [None] * L) + none
    need_x = x.requires_grad
    has_b = [b.numel() > 0 for b in biases]
    if torch.is_grad_enabled() or not ctx.saved_ok or not available(x):
        # A differentiable backward is wanted (double backward), or no compiled kernel: recompute
        # the jet with torch ops from the saved inputs (which keep their own graphs) and
        # differentiate that.
        # (views as aliases: see _bw_backward)
        create = torch.is_grad_enabled()
        inputs = [x] + weights + [b for b, h in zip(biases, has_b) if h]
        wanted = [t for t in inputs if t.requires_grad]
        with torch.enable_grad():
            al = {id(t): t.view_as(t) for t in wanted}
            out = reference_jet(al.get(id(x), x), [al.get(id(W), W) for W in weights],
                                [al.get(id(b), b) for b in biases], acts, act_a, act_b, V, axes, sel, diag, grad_rows)
        got = torch.autograd.grad(out, [al[id(t)] for t in wanted], gout, create_graph=create,
                                  allow_unused=True) if wanted else ()
        by_id = {id(t): g for t, g in zip(wanted, got)}
        gW = [by_id.get(id(W)) for W in weights]
        gb = [by_id.get(id(b)) if h else None for b, h in zip(biases, has_b)]
        return (by_id.get(id(x)), gW, gb) + none
    gx, gW, gb = _ops.mlp_jet_backward(
        gout.contiguous(), x, weights, biases, acts, act_a, act_b, V, axes, sel, diag, grad_rows, chunk, saved,
        need_x,
    )
    gb = [g if h else None for g, h in zip(gb, has_b)]
    return (gx if need_x else None, list(gW), gb) + none


# The backward op's own derivative (double backward through mlp_jet): recompute the jet with torch
# ops on the saved inputs and differentiate the first VJP again.
def _bw_setup(ctx, inputs, output):
    gout, x, weights, biases, acts, act_a, act_b, V, axes, sel, diag, grad_rows, chunk, saved, need_gx = inputs
    ctx.static = (list(acts), list(act_a), list(act_b), list(axes), list(sel), diag, grad_rows)
    ctx.n_layers, ctx.n_saved, ctx.has_V = len(weights), len(saved), V is not None
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(gout, x, *([V] if V is not None else []), *weights, *biases)


def _bw_backward(ctx, ggx, ggW, ggb):
    t = list(ctx.saved_tensors)
    L = ctx.n_layers
    gout, x = t.pop(0), t.pop(0)
    V = t.pop(0) if ctx.has_V else None
    weights, biases = t[:L], t[L:]
    acts, act_a, act_b, axes, sel, diag, grad_rows = ctx.static
    # Differentiate with respect to fresh aliases of the inputs, never the inputs themselves: an
    # input's own graph may reach another input (gout depends on the weights whenever the loss is
    # nonlinear in the jet), and differentiating through it here would count that path twice --
    # autograd follows it anyway from the gradients returned for gout. Aliases that are views
    # keep the graph to the inputs (for a further derivative); inputs that do not require grad
    # get leaf copies (the first VJP with respect to them is still needed).
    def alias(t):
        return t.view_as(t) if t.requires_grad else t.detach().requires_grad_(True)

    with torch.enable_grad():  # (a view made with grad mode off would not track its base)
        gv, xv = alias(gout), alias(x)
        Wv = [alias(W) for W in weights]
        bv = [alias(b) if b.numel() else b for b in biases]
    if ggx is not None and ggx.shape != x.shape:  # gx was not computed (need_gx False)
        ggx = None
    # the first-order gradients being differentiated, each with its cotangent
    pairs = [(xv, ggx)] + list(zip(Wv, ggW or [None] * L)) + [
        (b, g) for b, g in zip(bv, ggb or [None] * L) if b.numel()
    ]
    pairs = [(p, g) for p, g in pairs if g is not None]
    originals = [gout, x, *weights, *[b for b in biases if b.numel()]]
    aliases = [gv, xv, *Wv, *[b for b in bv if b.numel()]]
    targets = [(o, a) for o, a in zip(originals, aliases) if o.requires_grad]
    grads = {}
    if pairs and targets:
        with torch.enable_grad():
            out = reference_jet(xv, Wv, bv, acts, act_a, act_b, V, axes, sel, diag, grad_rows)
            first = torch.autograd.grad(out, [p for p, _ in pairs], gv, create_graph=True, allow_unused=True)
            used = [(f, g) for f, (_, g) in zip(first, pairs) if f is not None and f.requires_grad]
            if used:
                got = torch.autograd.grad(
                    [f for f, _ in used], [a for _, a in targets], [g for _, g in used],
                    create_graph=torch.is_grad_enabled(), allow_unused=True,
                )
                grads = {id(o): g for (o, _), g in zip(targets, got)}
    nones = [] if not axes else None
    return (
        grads.get(id(gout)),
        grads.get(id(x)),
        [grads.get(id(W)) for W in weights],
        [grads.get(id(b)) for b in biases],
        None, None, None, None, nones, None, None, None, None,
        [None] * ctx.n_saved,
        None,
    )


torch.library.register_fake("torchhessdiag::mlp_jet")(_fake_jet)
torch.library.register_fake("torchhessdiag::mlp_jet_backward")(_fake_backward)
torch.library.register_autograd("torchhessdiag::mlp_jet_backward", _bw_backward, setup_context=_bw_setup)
if not _backend.COMPILED:
    # compiled: the autograd of mlp_jet is C++ (csrc/mlp_ops.cpp, MlpJetFunction)
    torch.library.register_autograd("torchhessdiag::mlp_jet", _backward, setup_context=_setup)
for _key in _backend._ref_keys:
    for _name, _fn in (("mlp_jet", _ref_jet), ("mlp_jet_backward", _ref_jet_backward)):
        try:
            _backend._impl_lib.impl(_name, _fn, _key)
        except (RuntimeError, ValueError):  # a dispatch key this torch build does not know
            pass
