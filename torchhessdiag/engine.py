"""The second-order engine for MLPs: K first-order rows plus one forward and one backward row.

For an MLP (z_l = W_l a_{l-1} + b_l, a_l = sigma_l(z_l), a_0 = x) the input Hessian of output u_i
is exactly

    Hess u_i = sum_l J_l^T diag(c_{l,i}) J_l,   J_l = dz_l/dx,  c_{l,i} = delta_{l,i} * sigma_l''(z_l)

with delta_{l,i} = du_i/da_l (an ordinary backward row). So for directions v_1..v_K

    v_k^T (Hess u_i) v_k = sum_l sum_j c_{l,i,j} (J_l v_k)_j^2

which needs the K rows J_l v_k, one forward row (z_l, sigma', sigma'') and one backward row
(delta_l): K+2 rows, where Taylor mode carries 2K+1. Steps:

1. forward row: z_l by the GEMMs, then (sigma, sigma', sigma'')(z_l) in one fused table pass;
2. backward row: delta_{l-1} = (delta_l * sigma'(z_l)) W_l, and c_l = delta_l * sigma''(z_l); the
   last delta is the gradient du/dx, for free;
3. rows: J_1 = W_1 V is the same for every point, so layer 1 contributes one small GEMM
   c_1 @ (W_1 V)^2 and no per-point Jacobian; for l >= 2, J_l = (sigma'(z_{l-1}) * J_{l-1}) W_l^T is
   one GEMM over N*K rows, and the fused kernel jet_layer scales the rows by sigma' and
   accumulates sum_j c_j (J v)_j^2 in one read and one write of the rows.

For a summed quantity (Laplacian, weighted Laplacian, Hutchinson) only J_1^T J_1 = V^T W_1^T W_1 V
... more precisely only (W_1 V)(W_1 V)^T matters, so when there are more directions than the first
layer is wide, the K directions are compressed to min(K, width) by a QR factorisation: exact.

Everything is built from differentiable pieces (torch GEMMs, the table ops, jet_layer with a fused
backward), so the results carry a graph to the parameters -- and to x -- when grad mode is on.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _precision, _registry, fused, ops
from .activations import ActivationSpec, spec_from_module

Tensor = torch.Tensor
_ops = torch.ops.torchhessdiag


@dataclass
class LinearLayer:
    weight: Tensor  # (out, in)
    bias: Optional[Tensor]


@dataclass
class ActLayer:
    spec: ActivationSpec


Layer = Union[LinearLayer, ActLayer]

# the torch.nn activation classes come from the registry (torchhessdiag/_registry.py)
_SUPPORTED = (
    "nn.Linear (with or without bias), the activations torch.nn."
    + ", ".join(_registry.module_class_names())
    + " and every torchhessdiag.nn drop-in (including "
    "registered user activations, torchhessdiag.nn.UserActivation), nn.Identity, and "
    "nn.Dropout in eval mode, inside (nested) nn.Sequential"
)


def refuse_ddp(model: nn.Module, where: str) -> None:
    """Raise a TypeError naming the recipe if ``model`` is (or holds) a DistributedDataParallel.

    DDP all-reduces the gradients of what runs through its own forward only (its forward arms the
    reducer); derivatives computed from the wrapper or from ``ddp.module`` outside that forward
    would leave each rank with its local gradients, silently."""
    ddp = getattr(getattr(torch.nn, "parallel", None), "DistributedDataParallel", None)
    if ddp is None:
        return
    for name, m in model.named_modules():
        if isinstance(m, ddp):
            at = f" (at '{name}')" if name else ""
            raise TypeError(
                f"{where}: the model is a torch.nn.parallel.DistributedDataParallel wrapper{at}. DDP "
                "all-reduces the gradients only of what runs through its own forward, so derivatives "
                "taken from the wrapper (or from ddp.module) outside it would leave every rank with "
                "its local gradients. Compute the residual inside a module's forward (e.g. "
                "forward(x) returns torchhessdiag.mlp_laplacian(self.net, x) + f(x)), wrap that "
                "module in DistributedDataParallel(..., find_unused_parameters=True) and call it "
                "(docs/threads-ddp.md: 'Threads, determinism and several processes')."
            )


def parse_mlp(model: nn.Module, where: str) -> List[Layer]:
    """Flatten a (nested) nn.Sequential into linear and activation layers, or raise.

    On the path of every call: no string is built unless there is an error to report."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")
    layers: List[Layer] = []
    path: List[str] = []

    def label(m: nn.Module) -> str:
        at = ".".join(path)
        return f"{type(m).__name__}" + (f" at '{at}'" if at else "")

    def visit(m: nn.Module) -> None:
        t = type(m)
        if t is nn.Linear:
            layers.append(LinearLayer(m.weight, m.bias))
            return
        if isinstance(m, nn.Sequential):
            # _modules, not named_children(): the latter skips a module instance that appears
            # twice (e.g. one nn.Tanh() reused between layers), which would drop a layer
            for name, child in m._modules.items():
                if child is not None:
                    path.append(name)
                    visit(child)
                    path.pop()
            return
        spec = spec_from_module(m)
        if spec is not None:
            if spec.name != "identity":
                layers.append(ActLayer(spec))
            return
        if isinstance(m, nn.Identity) and not hasattr(m, "_thd_spec"):
            return
        if t is nn.Dropout:
            if m.training and m.p > 0:
                raise NotImplementedError(
                    f"{where}: {label(m)} is in training mode, so the network is random and has no "
                    "Hessian; call model.eval() (dropout is the identity in eval mode)"
                )
            return
        refuse_ddp(m, where)  # a DistributedDataParallel wrapper gets its own message
        raise NotImplementedError(
            f"{where}: unsupported module {label(m)}; supported: {_SUPPORTED}. For other models use "
            "torchhessdiag.laplacian / hessian_diag / axis_derivatives (any model: traced Taylor jets or exact autograd)."
        )

    visit(model)
    if not layers:
        raise NotImplementedError(f"{where}: model has no layers the engine can use; supported: {_SUPPORTED}")
    return layers


def check_input(layers: List[Layer], x, where: str) -> Tuple[Tensor, bool, int]:
    """Validate x against the model; return (x as (N, d), was_unbatched, d)."""
    ops.check_float_tensor(x, "x", where)
    if x.dim() not in (1, 2):
        raise ValueError(f"{where}: x must be (N, d) or unbatched (d,), got shape {tuple(x.shape)}")
    unbatched = x.dim() == 1
    x2 = x.unsqueeze(0) if unbatched else x
    d = x2.shape[1]
    width = d
    for i, layer in enumerate(layers):
        if isinstance(layer, LinearLayer):
            W = layer.weight
            if W.shape[1] != width:
                what = "x has" if i == 0 else "the previous layer gives"
                raise ValueError(
                    f"{where}: {what} {width} features but the Linear layer #{i} expects {W.shape[1]}"
                )
            for name, p in (("weight", W), ("bias", layer.bias)):
                if p is None:
                    continue
                if p.device != x2.device:
                    raise ValueError(
                        f"{where}: x is on {x2.device} but a Linear {name} is on {p.device}; "
                        "move the model or x"
                    )
                if p.dtype != x2.dtype:
                    raise TypeError(
                        f"{where}: x is {x2.dtype} but a Linear {name} is {p.dtype}; use one dtype "
                        "(e.g. model.double() with float64 x)"
                    )
            width = W.shape[0]
    return x2, unbatched, d


_warned_pwl_model = False


def all_piecewise_linear(layers: List[Layer]) -> bool:
    """Whether the model has activations and every one is piecewise linear (or linear)."""
    acts = [l.spec for l in layers if isinstance(l, ActLayer)]
    return bool(acts) and all(s.piecewise_linear or s.linear for s in acts)


def _warn_if_piecewise_linear(layers: List[Layer], stacklevel: int = 3) -> None:
    if all_piecewise_linear(layers):
        names = sorted({l.spec.name for l in layers if isinstance(l, ActLayer)})
        warnings.warn(
            f"torchhessdiag: every activation of this model is piecewise linear ({', '.join(names)}), "
            "so its second derivatives are exactly 0 almost everywhere (the true ones are Dirac "
            "deltas on the kinks); the result is all zeros. Use a smooth activation (Tanh, SiLU, "
            "GELU, Softplus) where second derivatives matter, e.g. in a PDE loss.",
            UserWarning,
            stacklevel=stacklevel,
        )


@dataclass
class EngineOut:
    value: Optional[Tensor]  # (N, m); None from the fused path when need_gradient is False
    gradient: Optional[Tensor]  # (N, m, d)
    second: Optional[Tensor]  # (N, m, K) per direction, or (N, m) summed, or (N, m, P) pairs


class _Workspace:
    """Two flat row buffers reused across the chunks of one no-grad call (ping-pong between a
    layer's GEMM output and the next GEMM's input), so that the row memory is touched -- and, on
    the CPU, page-faulted -- once per call instead of once per layer and chunk."""

    def __init__(self, numel: int, like: Tensor):
        self.bufs = [like.new_empty(numel), like.new_empty(numel)]
        self.i = 0

    def next(self, *shape: int) -> Tensor:
        n = 1
        for s_ in shape:
            n *= s_
        self.i ^= 1
        return self.bufs[self.i][:n].view(*shape)


# Rows per chunk in the no-grad path: about this many elements of J per buffer. On the CPU a
# chunk that stays small keeps the reused buffers warm and avoids page faults on fresh memory; on
# a GPU the chunks must be large, or each layer's GEMM and kernel are too small to fill the device
# and the launches dominate (measured on an H100: 128 chunks of 512 points made the engine 5-10x
# slower than one block).
_CHUNK_ELEMENTS = 1 << 21
_CHUNK_ELEMENTS_GPU = 1 << 27


def check_chunk_size(chunk_size, where: str) -> Optional[int]:
    """Validate a ``chunk_size`` argument: None, or an int >= 1 (bool refused)."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"{where}: chunk_size must be an int >= 1 or None, got {type(chunk_size).__name__} {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"{where}: chunk_size must be an int >= 1 or None, got {chunk_size}")
    return chunk_size


def fused_net(layers: List[Layer]) -> Optional[fused.Net]:
    """The network in the fused op's form (torchhessdiag/fused.py), or None where it does not
    fit: it must start with a Linear, have at least one activation, and every activation must
    follow a Linear and be in the compiled table (not a registered user activation)."""
    Ws: List[Tensor] = []
    bs: List[Optional[Tensor]] = []
    acts: List[int] = []
    aa: List[float] = []
    ab: List[float] = []
    for layer in layers:
        if isinstance(layer, LinearLayer):
            Ws.append(layer.weight)
            bs.append(layer.bias)
            acts.append(-1)
            aa.append(0.0)
            ab.append(0.0)
            continue
        spec = layer.spec
        if not Ws or acts[-1] >= 0 or spec.is_user:
            return None
        acts[-1] = _registry.TABLE[spec.name].table_id
        aa[-1] = spec.a  # (floats already; no float() call: under torch.compile(dynamic=True)
        ab[-1] = spec.b  # that call would turn the constants into symbolic floats)
    if not any(a >= 0 for a in acts):
        return None
    return fused.Net(tuple(Ws), tuple(bs), tuple(acts), tuple(aa), tuple(ab))


# The fused forward sweep carries 1 + S + K rows per point (S second-order rows: 1 for a sum,
# K for a Hessian diagonal); the reverse sweep below 2 + K (with the directions compressed to the
# first layer's width for a sum). For a sum they carry the same rows, and the fused op does the
# whole network in compiled code: it is used for every sum (K larger than the first layer's width
# is compressed to that width first: _row_space_directions) and, when the gradient is wanted
# (K = d first-order rows, no compression), for d up to the first width; measured 1.2-1.6x
# faster than the reverse sweep from d = 2 to d = 100 (CPU, tanh, 4 x 64..256, inference and
# training). For a Hessian diagonal it carries K - 1 more rows; measured (same runs) it is the
# faster one up to K = 3 in float32 (2.0x at K = 2, 1.05x at 3, 0.86x at 5) and K = 8 in float64
# (1.3x at 3, 1.1x at 8), where the reverse sweep's elementwise passes cost more.
FUSED_DIAG_MAX_K = {torch.float32: 3, torch.float64: 8}
# Off: every call takes the reverse sweep (tests compare the two paths).
FUSED_ENABLED = True


def _fused_plan(layers, x, V, dims, mode, need_gradient):
    """(net, V or None, axes, sel, grad_rows) for the fused op, or None where the reverse sweep
    is used."""
    if not FUSED_ENABLED or mode not in ("sum", "diag") or not fused.available(x):
        return None
    if V is not None and V.requires_grad:
        return None
    net = fused_net(layers)
    if net is None:
        return None
    d = x.shape[1]
    Vf, axes = None, list(range(d))
    if need_gradient:
        # the first-order rows must be every axis (they are the gradient); the selected axes are
        # the second-order ones
        if V is not None and dims is None:
            return None
        sel = list(range(d)) if dims is None else list(dims)
    elif V is None:
        sel = list(range(d))
    elif dims is not None:
        axes = list(dims)
        sel = list(range(len(axes)))
    else:
        Vf, axes = V, []
        sel = list(range(V.shape[1]))
    K = len(axes) if Vf is None else Vf.shape[1]
    if mode == "diag" and len(sel) > FUSED_DIAG_MAX_K.get(x.dtype, 3):
        return None
    if mode == "sum" and K > net.first_width:
        if need_gradient:
            return None  # (the gradient needs every axis as a first-order row)
        Vf = _row_space_directions(net, Vf, axes, d)
        if Vf is None:
            return None
        axes, sel = [], list(range(Vf.shape[1]))
    return net, Vf, axes, sel, need_gradient


def _row_space_directions(net: fused.Net, V: Optional[Tensor], axes: Sequence[int], d: int):
    """For a sum along K directions (the columns of V, or the unit vectors of ``axes``) with K
    larger than the width w at the first activation: r = min(K, w) directions giving the same
    sum, so the fused op carries r first-order rows instead of K (the reverse sweep's QR
    compression, done in input space). With P the product of the linear layers up to the first
    activation (w x d), A = P E (w x K; E = V or the axes' columns of the identity) and
    A^T = Q R (Q: K x r orthonormal), the directions E Q have first-activation tangents A Q, and
    sum_k (A q_k)(A q_k)^T = A Q Q^T A^T = A A^T. Every second-order term of the sum is a
    quadratic form of those tangents summed over the directions, so the sum is unchanged. Q is
    detached, and the gradient is unchanged too: A Q Q^T = A for every A (Q Q^T A^T = Q R = A^T),
    so d(A Q Q^T A^T) = dA A^T + A dA^T with Q held fixed. Computed in float64 (a K x r
    factorisation per call, microseconds). None where A is not finite (the reverse sweep handles
    inf/nan weights column by column). None under torch.compile too: the finiteness test is a
    data-dependent branch, which would break a fullgraph=True graph; compiled calls keep the
    reverse sweep for these sums."""
    if torch.compiler.is_compiling():
        return None
    with torch.no_grad():
        P = None
        for W, a in zip(net.weights, net.acts):
            W = W.detach().to(torch.float64)
            P = W if P is None else W @ P
            if a >= 0:
                break
        idx = list(axes)
        A = P[:, idx] if V is None else P @ V.detach().to(torch.float64)
        if not bool(torch.isfinite(A).all()):
            return None
        Q = torch.linalg.qr(A.T, mode="reduced")[0]  # (K, r)
        if V is None:
            out = P.new_zeros(d, Q.shape[1])
            out[idx] = Q
        else:
            out = V.detach().to(torch.float64) @ Q
        return out.to(net.weights[0].dtype)


def _run_fused(plan, x, mode, chunk_size) -> EngineOut:
    net, Vf, axes, sel, grad_rows = plan
    diag = mode == "diag"
    if not grad_rows:
        # The value is not returned: the biases after the last activation only shift it, so they
        # stay out of the op (and out of the graph -- their gradient is None, as with autograd).
        last = max(i for i, a in enumerate(net.acts) if a >= 0)
        net = fused.Net(net.weights, tuple(b if i <= last else None for i, b in enumerate(net.biases)),
                        net.acts, net.act_a, net.act_b)
    out = fused.run(net, x, Vf, axes, sel, diag, grad_rows, chunk_size)
    S = len(sel) if diag else 1
    value = out[0] if grad_rows else None
    second = out[1:1 + S].permute(1, 2, 0) if diag else out[1]
    gradient = out[1 + S:].permute(1, 2, 0) if grad_rows else None
    return EngineOut(value, gradient, second)


def run(
    layers: List[Layer],
    x: Tensor,
    V: Optional[Tensor],
    mode: str,
    need_gradient: bool = False,
    pairs: Optional[Tuple[Tensor, Tensor]] = None,
    chunk_size: Optional[int] = None,
    dims: Optional[Sequence[int]] = None,
) -> EngineOut:
    """The engine. x (N, d); V (d, K) directions (None: all coordinate axes); ``dims``: the axes
    V selects, when it is a selection of coordinate axes (lets the fused path give the gradient).

    Small K (sums, and Hessian diagonals up to FUSED_DIAG_MAX_K directions): the fused forward op
    (torchhessdiag/fused.py). Otherwise the K+2-row reverse sweep below.

    mode: "diag" -> v_k^T H v_k per direction (N, m, K); "sum" -> sum over k (N, m);
    "pairs" -> v_a^T H v_b for the index pairs (a_p, b_p) in ``pairs`` (N, m, P).

    When no graph is needed (grad mode off, or nothing requires grad) the points are processed in
    chunks with reused row buffers and the fused layer kernel works in place; otherwise one block
    of differentiable ops carries the graph. ``chunk_size`` (validated by the caller with
    :func:`check_chunk_size`) caps the points per block on both paths: without a graph it lowers
    the automatic chunk, so the row buffers hold at most chunk_size points; with a graph the
    blocks' differentiable results are concatenated (the transient rows of a block are bounded,
    the graph saved for backward still grows with N).
    """
    _precision.warn_if_tf32(x)  # float32 CUDA GEMMs under TF32: one warning per process
    plan = _fused_plan(layers, x, V, dims, mode, need_gradient)
    if plan is not None:
        return _run_fused(plan, x, mode, chunk_size)
    N = x.shape[0]
    needs_graph = torch.is_grad_enabled() and (
        x.requires_grad
        or (V is not None and V.requires_grad)
        or any(p.requires_grad for l in layers if isinstance(l, LinearLayer) for p in (l.weight, l.bias) if p is not None)
    )
    if needs_graph or mode == "pairs":
        chunk = N if chunk_size is None else min(N, chunk_size)
        return _run_chunks(layers, x, V, mode, need_gradient, pairs, chunk, None)
    with torch.no_grad():
        d = x.shape[1]
        K = d if V is None else V.shape[1]
        widths = [l.weight.shape[0] for l in layers if isinstance(l, LinearLayer)] + [d]
        per_point = max(1, K * max(widths))
        budget = _CHUNK_ELEMENTS if x.device.type == "cpu" else _CHUNK_ELEMENTS_GPU
        chunk = max(1, min(N, budget // per_point))
        if chunk_size is not None:
            chunk = min(chunk, chunk_size)
        ws = _Workspace(min(N, chunk) * per_point, x)
        return _run_chunks(layers, x, V, mode, need_gradient, pairs, chunk, ws)


def _run_chunks(layers, x, V, mode, need_gradient, pairs, chunk: int, ws: Optional[_Workspace]) -> EngineOut:
    """_run_block over consecutive blocks of at most ``chunk`` points, results concatenated."""
    N = x.shape[0]
    if chunk >= N:
        return _run_block(layers, x, V, mode, need_gradient, pairs, ws)
    parts = [_run_block(layers, x[i : i + chunk], V, mode, need_gradient, pairs, ws) for i in range(0, N, chunk)]
    return EngineOut(
        torch.cat([p.value for p in parts]),
        torch.cat([p.gradient for p in parts]) if need_gradient else None,
        torch.cat([p.second for p in parts]),
    )


def _run_block(
    layers: List[Layer],
    x: Tensor,
    V: Optional[Tensor],
    mode: str,
    need_gradient: bool,
    pairs: Optional[Tuple[Tensor, Tensor]],
    ws: Optional[_Workspace],
) -> EngineOut:
    """Forward row, backward row and K first-order rows for the points x. With a workspace (no
    graph) the rows live in its buffers and jet_layer_ updates them in place."""
    N, d = x.shape
    # 1. forward row: z_l by the GEMMs, (sigma, sigma', sigma'')(z_l) in one table pass ----------
    h = x
    derivs: List[Tuple[Tensor, Tensor]] = []
    for layer in layers:
        if isinstance(layer, LinearLayer):
            h = F.linear(h, layer.weight, layer.bias)
        else:
            s = layer.spec
            if s.is_user:  # a registered user activation: its own callables (custom.py)
                D = ops._derivs(h, s, [0, 1, 2])
            else:
                D = _ops.act_derivatives(h, s.name, s.a, s.b, [0, 1, 2])
            h = D[0]
            derivs.append((D[1], D[2]))
    value = h
    m = value.shape[1]

    # 2. backward row (m rows: one per output component); c_l = delta_l * sigma''(z_l) -----------
    delta = torch.eye(m, dtype=x.dtype, device=x.device).unsqueeze(1).expand(m, N, m)
    cs: List[Tensor] = [None] * len(derivs)  # type: ignore[list-item]
    ai = len(derivs)
    for layer in reversed(layers):
        if isinstance(layer, LinearLayer):
            delta = torch.matmul(delta, layer.weight)
        else:
            ai -= 1
            s1, s2 = derivs[ai]
            cs[ai] = delta * s2
            delta = delta * s1
    gradient = delta.permute(1, 0, 2) if need_gradient else None

    # 3. first-order rows -----------------------------------------------------------------------
    J = torch.eye(d, dtype=x.dtype, device=x.device) if V is None else V.t()  # (K, d): rows v_k^T
    K = J.shape[0]
    n_acts = len(derivs)
    if mode == "pairs":
        assert pairs is not None
        out = x.new_zeros((m, N, pairs[0].numel()))
    else:
        out = x.new_zeros((m, N, K)) if mode == "diag" else x.new_zeros((m, N))
    if n_acts == 0:
        # a linear model: the second derivatives are exactly 0 -- but still a function of the
        # inputs, so that a loss built on them backpropagates (zero gradients), never an error
        if torch.is_grad_enabled():
            deps = [x] + [p for l in layers if isinstance(l, LinearLayer) for p in (l.weight, l.bias) if p is not None]
            out = _ZerosOf.apply(out, *[t for t in deps if t.requires_grad])
        return EngineOut(value, gradient, _finish(out))

    const = True  # J is the same for every point (before the first activation)
    compressed = False
    ai = 0
    for layer in layers:
        if ai == n_acts:
            break  # only linear layers remain: they add nothing to second derivatives
        if isinstance(layer, LinearLayer):
            W = layer.weight
            if const:
                J = J @ W.t()  # (K, out)
                if mode == "sum" and not compressed and J.shape[0] > J.shape[1]:
                    # only J^T J matters for a sum over directions: J = Q R, J^T J = R^T R
                    J = torch.linalg.qr(J, mode="reduced")[1]
                    compressed = True
            elif ws is not None:
                n_, k_, w_in = J.shape
                out_buf = ws.next(n_ * k_, W.shape[0])
                torch.mm(J.view(n_ * k_, w_in), W.t(), out=out_buf)  # one GEMM over N*K rows
                J = out_buf.view(n_, k_, W.shape[0])
            else:
                J = torch.matmul(J, W.t())  # (N, K, out): one GEMM over N*K rows
            continue
        s1, _ = derivs[ai]
        c = cs[ai]
        last = ai == n_acts - 1
        ai += 1
        if const:
            if mode == "pairs":
                a_idx, b_idx = pairs
                out = out + torch.matmul(c, (J[a_idx] * J[b_idx]).t())
            else:
                contrib = torch.matmul(c, (J * J).t())  # (m, N, K): layer 1 needs no per-point rows
                out = out + (contrib if mode == "diag" else contrib.sum(-1))
            if not last:
                if ws is not None:
                    J_new = ws.next(N, J.shape[0], J.shape[1])
                    torch.mul(s1.unsqueeze(1), J.unsqueeze(0), out=J_new)
                    J = J_new
                else:
                    J = s1.unsqueeze(1) * J.unsqueeze(0)  # (N, K, w)
            const = False
            continue
        if mode == "pairs":
            a_idx, b_idx = pairs
            out = out + torch.einsum("inj,npj->inp", c, J[:, a_idx] * J[:, b_idx])
            if not last:
                J = s1.unsqueeze(1) * J
            continue
        if ws is not None:
            acc = _ops.jet_layer_(J, s1, c)  # J becomes s1 * J in place
        else:
            J, acc = _ops.jet_layer(J, s1, c, not last)
        out = out + (acc if mode == "diag" else acc.sum(-1))
    return EngineOut(value, gradient, _finish(out))


class _ZerosOf(torch.autograd.Function):
    """Returns ``zeros`` as a function of ``inputs`` with identically zero derivatives."""

    @staticmethod
    def forward(ctx, zeros, *inputs):
        ctx.meta = [(t.shape, t.dtype, t.device) for t in inputs]
        return zeros.clone()

    @staticmethod
    def backward(ctx, grad):
        return (None,) + tuple(torch.zeros(s, dtype=dt, device=dev) for s, dt, dev in ctx.meta)


def _finish(out: Tensor) -> Tensor:
    # (m, N, ...) -> (N, m, ...)
    return out.movedim(0, 1)
