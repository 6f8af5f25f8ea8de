"""The bad-input matrix of the public second-order functions: one row per (case, function).

Every public function (mlp_laplacian, mlp_hessian_diag, mlp_derivatives, mlp_weighted_laplacian,
mlp_mixed_partials, mlp_laplacian_hutchinson, laplacian, hessian_diag, axis_derivatives) meets
every case that applies to it, and each row expects either

* a clear exception: its type and a regex that names the argument and what is supported, or
* a correct result: compared with torch.func / nested autograd on the oracle twin of the model
  (torch's own activation functions, the same nn.Linear modules: tests/_random_models.py),
  float64, 1e-10 relative to the largest Hessian entry (the two sides differ by rounding of the
  same expressions, ~1e-16; see tests/test_properties.py), or, for NaN/Inf rows, the same
  non-finite positions as torch.func and the same finite values.

The dtype policy tested here (docs/input-policy.md): float32 and float64 are computed as they
are; float16/bfloat16 are refused (TypeError naming x and suggesting .float(): second
derivatives in half precision keep almost no digits, and computing in float32 behind the
caller's back would hand back a dtype the caller did not ask for); int/bool/complex are refused.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch
from torch import nn

import torchhessdiag as thd

from _random_models import ACT_BY_LABEL, build_mlp, build_residual, func_hessian, func_value_grad, nested_hessian, rel_err

TOL = 1e-10
D, M = 3, 2  # input features and outputs of the default model
PAIRS = [(0, 1), (2, 2), (-1, 0)]

# ---- the functions and their expected results from the oracle --------------------------------


@dataclass
class Fn:
    call: Callable  # (model, x, **kw) -> result
    expect: Callable  # (u, G, H, kw) -> expected result (same structure)
    mlp_only: bool  # the mlp_* functions need an nn.Sequential MLP; the general ones take any f
    args: Tuple[str, ...] = ()  # optional arguments it has (dims, chunk_size, ...)
    defaults: Dict = field(default_factory=dict)


def _sel(kw):
    dims = kw.get("dims")
    return list(range(D)) if dims is None else [i % D for i in dims]


def _diag(H, kw):
    return H.diagonal(dim1=-2, dim2=-1)[..., _sel(kw)]


_FACTOR = torch.tensor([[1.0, 0.5], [0.0, -2.0], [0.3, 0.7]], dtype=torch.float64)

FUNCS: Dict[str, Fn] = {
    "mlp_laplacian": Fn(
        lambda f, x, **kw: thd.mlp_laplacian(f, x, **kw),
        lambda u, G, H, kw: _diag(H, kw).sum(-1),
        True,
        ("dims", "chunk_size"),
    ),
    "mlp_hessian_diag": Fn(
        lambda f, x, **kw: thd.mlp_hessian_diag(f, x, **kw), lambda u, G, H, kw: _diag(H, kw), True, ("dims", "chunk_size")
    ),
    "mlp_derivatives": Fn(
        lambda f, x, **kw: tuple(thd.mlp_derivatives(f, x, **kw)),
        lambda u, G, H, kw: (u, G, _diag(H, kw) if kw.get("second") == "diag" else _diag(H, kw).sum(-1)),
        True,
        ("dims", "chunk_size", "second"),
    ),
    "mlp_weighted_laplacian": Fn(
        lambda f, x, **kw: thd.mlp_weighted_laplacian(f, x, **kw),
        lambda u, G, H, kw: torch.einsum("ir,nmij,jr->nm", _FACTOR.to(H), H, _FACTOR.to(H)),
        True,
        ("chunk_size", "A", "factor"),
        {"factor": _FACTOR},
    ),
    "mlp_mixed_partials": Fn(
        lambda f, x, **kw: thd.mlp_mixed_partials(f, x, **kw),
        lambda u, G, H, kw: H[:, :, [i % D for i, _ in PAIRS], [j % D for _, j in PAIRS]],
        True,
        ("chunk_size", "pairs"),
        {"pairs": PAIRS},
    ),
    # one axis, Rademacher: every probe is +-e_1, so the estimate is exactly H_11
    "mlp_laplacian_hutchinson": Fn(
        lambda f, x, **kw: thd.mlp_laplacian_hutchinson(f, x, **kw),
        lambda u, G, H, kw: _diag(H, kw).sum(-1),
        True,
        ("dims", "chunk_size", "num_samples", "distribution"),
        {"dims": [1], "num_samples": 3},
    ),
    "laplacian": Fn(lambda f, x, **kw: thd.laplacian(f, x, **kw), lambda u, G, H, kw: _diag(H, kw).sum(-1), False, ("dims", "fallback")),
    "hessian_diag": Fn(lambda f, x, **kw: thd.hessian_diag(f, x, **kw), lambda u, G, H, kw: _diag(H, kw), False, ("dims", "fallback")),
    "axis_derivatives": Fn(
        lambda f, x, **kw: thd.axis_derivatives(f, x, **kw),
        lambda u, G, H, kw: torch.stack(
            [u.unsqueeze(-1).expand(_diag(H, kw).shape), G[..., _sel(kw)], _diag(H, kw)]
        ),
        False,
        ("dims", "fallback", "order"),
        {"order": 2},
    ),
}
ALL = tuple(FUNCS)
MLP_FUNCS = tuple(n for n, f in FUNCS.items() if f.mlp_only)
GENERAL = tuple(n for n, f in FUNCS.items() if not f.mlp_only)


def _with(arg: str, exclude: Sequence[str] = ()) -> Tuple[str, ...]:
    return tuple(n for n, f in FUNCS.items() if arg in f.args and n not in exclude)


# ---- the cases -------------------------------------------------------------------------------


def _model(device, dtype=torch.float64, acts=("tanh", "silu"), seed=0):
    return build_mlp(D, [6, 5], M, [ACT_BY_LABEL[a] for a in acts], seed=seed, dtype=dtype, device=device)


def _x(device, n=4, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


@dataclass
class Case:
    """``build(device)`` -> (model, oracle or None, x, kwargs). ``raises``: (type, regex) or None
    (a correct result is expected). ``check``: how a result is compared ("oracle", "nan",
    "finite", "shape")."""

    id: str
    funcs: Sequence[str]
    build: Callable
    raises: Optional[Tuple[type, str]] = None
    check: str = "oracle"
    warns: Optional[str] = None  # a warning the call must give (regex)


def _std(device, **kw):
    model, oracle = _model(device)
    return model, oracle, _x(device), kw


def _x_is(make_x, **kw):
    def build(device):
        model, oracle = _model(device)
        return model, oracle, make_x(device), kw

    return build


def _model_is(make_model, x_dtype=torch.float64):
    def build(device):
        model, oracle = make_model(device)
        return model, oracle, _x(device, dtype=x_dtype), {}

    return build


def _x_with(device, i, j, value):
    x = _x(device)
    x[i, j] = value
    return x


def _kw(**kw):
    return lambda device: _std(device, **kw)


_DTYPE_MSG = r"x must be float32 or float64, got torch\.{}"
CASES = []

# 1. x of a dtype that is not float32/float64: refused, naming x and the supported dtypes
for dt in (torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64, torch.complex128):
    name = str(dt).split(".")[-1]
    CASES.append(Case(f"x-{name}", ALL, _x_is(lambda dev, dt=dt: _x(dev).to(dt)), (TypeError, _DTYPE_MSG.format(name))))
for dt in (torch.float16, torch.bfloat16):
    name = str(dt).split(".")[-1]
    CASES.append(
        Case(f"x-{name}", ALL, _x_is(lambda dev, dt=dt: _x(dev).to(dt)), (TypeError, _DTYPE_MSG.format(name) + r".*half precision.*\.float\(\)"))
    )
CASES += [
    Case("x-list", ALL, _x_is(lambda dev: _x(dev).tolist()), (TypeError, r"x must be a torch\.Tensor, got list")),
    Case("x-numpy", ALL, _x_is(lambda dev: np.zeros((4, D))), (TypeError, r"x must be a torch\.Tensor, got ndarray")),
    # 2. x and the model on different dtypes / devices
    Case(
        "model-f32-x-f64",
        ALL,
        lambda dev: (*_model(dev, torch.float32), _x(dev), {}),
        (TypeError, r"x is torch\.float64 but (a Linear weight|parameter '\S+') is torch\.float32"),
    ),
    Case(
        "model-f64-x-f32",
        ALL,
        lambda dev: (*_model(dev), _x(dev, dtype=torch.float32), {}),
        (TypeError, r"x is torch\.float32 but (a Linear weight|parameter '\S+') is torch\.float64"),
    ),
    Case("x-on-meta", ALL, _x_is(lambda dev: _x(dev).to("meta")), (ValueError, r"x is on meta but (a Linear weight|parameter '\S+') is on")),
    # 3. shapes
    Case("x-rank0", ALL, _x_is(lambda dev: _x(dev)[0, 0]), (ValueError, r"x must be \(N, d\) or unbatched \(d,\), got shape \(\)")),
    Case("x-rank3", ALL, _x_is(lambda dev: _x(dev)[None]), (ValueError, r"x must be \(N, d\) or unbatched \(d,\), got shape \(1, 4, 3\)")),
    Case("x-2-features", ALL, _x_is(lambda dev: _x(dev)[:, :2]), (ValueError, r"x has 2 features but the Linear layer #0 expects 3")),
    Case("x-0-features", ALL, _x_is(lambda dev: _x(dev)[:, :0]), (ValueError, r"x has (0 features|no features)")),
    Case("x-unbatched", ALL, _x_is(lambda dev: _x(dev)[2]), check="oracle"),
    Case("x-empty-batch", ALL, _x_is(lambda dev: _x(dev)[:0]), check="oracle"),
    Case("x-empty-batch-grad", ALL, _x_is(lambda dev: _x(dev)[:0].clone().requires_grad_(True)), check="oracle"),
    Case("x-one-point", ALL, _x_is(lambda dev: _x(dev)[:1]), check="oracle"),
    # 4. layouts: non-contiguous, expanded, a Parameter, a leaf that requires grad
    Case("x-transposed", ALL, _x_is(lambda dev: _x(dev).t().contiguous().t()), check="oracle"),
    Case("x-strided-cols", ALL, _x_is(lambda dev: torch.repeat_interleave(_x(dev), 2, dim=1)[:, ::2]), check="oracle"),
    Case("x-strided-rows", ALL, _x_is(lambda dev: torch.repeat_interleave(_x(dev), 2, dim=0)[::2]), check="oracle"),
    Case("x-expanded", ALL, _x_is(lambda dev: _x(dev)[:1].expand(5, D)), check="oracle"),
    Case("x-storage-offset", ALL, _x_is(lambda dev: _x(dev, n=6)[2:]), check="oracle"),
    Case("x-parameter", ALL, _x_is(lambda dev: nn.Parameter(_x(dev))), check="oracle"),
    Case("x-requires-grad", ALL, _x_is(lambda dev: _x(dev).requires_grad_(True)), check="oracle"),
    # 5. NaN / Inf: propagate like torch (same non-finite positions as torch.func, same finite values)
    Case("x-nan", ALL, _x_is(lambda dev: _x_with(dev, 1, 0, float("nan"))), check="nan"),
    Case("x-inf", ALL, _x_is(lambda dev: _x_with(dev, 2, 1, float("inf"))), check="nan"),
    Case("x-neg-inf", ALL, _x_is(lambda dev: _x_with(dev, 3, 2, -float("inf"))), check="nan"),
    # huge finite inputs: the table's stable formulas stay finite where torch's may give NaN
    # (e.g. GELU's second derivative at |z| ~ 1e300): ours must be finite wherever torch is
    Case("x-huge", ALL, _x_is(lambda dev: _x(dev) * 1e300), check="finite"),
]


def _nan_weight(dev, which, value):
    model, oracle = _model(dev)
    with torch.no_grad():
        model[which].weight[1, 2] = value
    return model, oracle


CASES += [
    Case("weight-nan", ALL, _model_is(lambda dev: _nan_weight(dev, 2, float("nan"))), check="nan"),
    # W0[1, 2] = inf: unit 1 of the first (tanh) layer is saturated at sign(x_2) for every point.
    # torch.func multiplies that inf by the zeros of its identity seeds and returns NaN for
    # derivatives that do not depend on it; the fused forward op takes the first layer's rows
    # along the axes as columns of W0 and gets them right (check "saturated", below).
    Case("weight-inf", ALL, _model_is(lambda dev: _nan_weight(dev, 0, float("inf"))), check="saturated"),
]


# 6. models: unsupported modules, shared parameters, edge shapes
class Cube(nn.Module):
    def forward(self, x):
        return x**3


def _wrapped(dev, *mods, train=False):
    """Linear(3, 6), *mods, Tanh, Linear(6, 2); the oracle is the same module (torch only)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 6), *mods, nn.Tanh(), nn.Linear(6, M)).double().to(dev)
    model.train(train)
    return model, model


def _shared_linear(dev):
    """One nn.Linear used twice: the same weights in two layers."""
    model, oracle = _model(dev, acts=("tanh", "silu"))
    torch.manual_seed(0)
    lin = nn.Linear(6, 6).double().to(dev)
    m = nn.Sequential(model[0], model[1], lin, model[3], lin, nn.Tanh(), nn.Linear(6, M).double().to(dev))
    o = nn.Sequential(oracle[0], oracle[1], lin, oracle[3], lin, nn.Tanh(), m[-1])
    return m, o


def _tied_weight(dev):
    """Two nn.Linear modules holding the same Parameter (weight tying)."""
    model, oracle = _model(dev, acts=("tanh", "silu"))
    torch.manual_seed(0)
    a, b = nn.Linear(6, 6).double().to(dev), nn.Linear(6, 6).double().to(dev)
    b.weight = a.weight
    m = nn.Sequential(model[0], model[1], a, nn.Tanh(), b, nn.SiLU(), nn.Linear(6, M).double().to(dev))
    return m, m


_UNSUPPORTED = r"unsupported module {} at '\d+'; supported: nn\.Linear"
CASES += [
    Case("model-layernorm", MLP_FUNCS, _model_is(lambda dev: _wrapped(dev, nn.LayerNorm(6).double().to(dev))), (NotImplementedError, _UNSUPPORTED.format("LayerNorm"))),
    Case("model-layernorm", GENERAL, _model_is(lambda dev: _wrapped(dev, nn.LayerNorm(6).double().to(dev))), check="oracle"),
    Case("model-custom-module", MLP_FUNCS, _model_is(lambda dev: _wrapped(dev, Cube())), (NotImplementedError, _UNSUPPORTED.format("Cube"))),
    Case("model-custom-module", GENERAL, _model_is(lambda dev: _wrapped(dev, Cube())), check="oracle"),
    Case("model-batchnorm-eval", MLP_FUNCS, _model_is(lambda dev: _wrapped(dev, nn.BatchNorm1d(6).double().to(dev))), (NotImplementedError, _UNSUPPORTED.format("BatchNorm1d"))),
    Case("model-batchnorm-eval", GENERAL, _model_is(lambda dev: _wrapped(dev, nn.BatchNorm1d(6).double().to(dev))), check="oracle"),
    # training-mode BatchNorm mixes the rows (batch statistics): no per-point Hessian exists
    Case("model-batchnorm-train", MLP_FUNCS, _model_is(lambda dev: _wrapped(dev, nn.BatchNorm1d(6).double().to(dev), train=True)), (NotImplementedError, _UNSUPPORTED.format("BatchNorm1d"))),
    Case("model-batchnorm-train", GENERAL, _model_is(lambda dev: _wrapped(dev, nn.BatchNorm1d(6).double().to(dev), train=True)), (ValueError, r"BatchNorm1d at '1' is in training mode.*rows.*model\.eval\(\)")),
    Case("model-dropout-train", ALL, _model_is(lambda dev: _wrapped(dev, nn.Dropout(0.5), train=True)), (NotImplementedError, r"Dropout at '1' is in training mode.*model\.eval\(\)")),
    Case("model-dropout-eval", ALL, _model_is(lambda dev: _wrapped(dev, nn.Dropout(0.5))), check="oracle"),
    Case("model-empty-sequential", GENERAL, _model_is(lambda dev: (nn.Sequential(), None)), check="oracle"),
    Case("model-empty-sequential", MLP_FUNCS, _model_is(lambda dev: (nn.Sequential(), None)), (NotImplementedError, r"model has no layers the engine can use")),
    Case("model-not-a-module", MLP_FUNCS, _model_is(lambda dev: (lambda x: x.sum(-1), None)), (TypeError, r"model must be a torch\.nn\.Module, got function")),
    Case("f-not-callable", GENERAL, _model_is(lambda dev: (42, None)), (TypeError, r"f must be a callable .*got int")),
    Case("model-shared-linear", ALL, _model_is(_shared_linear), check="oracle"),
    Case("model-tied-weight", ALL, _model_is(_tied_weight), check="oracle"),
    Case("model-only-activation", ALL, _model_is(lambda dev: (nn.Sequential(nn.Linear(D, D).double().to(dev), nn.Tanh()), None)), check="oracle"),
    Case("model-linear", ALL, _model_is(lambda dev: (nn.Sequential(nn.Linear(D, 4), nn.Linear(4, M)).double().to(dev), None)), check="oracle"),
    Case("model-relu", ALL, _model_is(lambda dev: _model(dev, acts=("relu", "leaky_relu(0.2)"))), check="oracle", warns=r"piecewise.linear"),
    Case("model-float32", ALL, lambda dev: (*_model(dev, torch.float32), _x(dev, dtype=torch.float32), {}), check="oracle"),
]


# 6b. the traced-graph (jet) path of the general functions: a residual model with a product
def _residual(dev):
    return build_residual(D, 5, M, [ACT_BY_LABEL["tanh"], ACT_BY_LABEL["silu"]], product=True, seed=3, device=dev)


def _res_x(make_x):
    def build(device):
        model, oracle = _residual(device)
        return model, oracle, make_x(device), {}

    return build


CASES += [
    Case("residual", GENERAL, _res_x(_x), check="oracle"),
    Case("residual-unbatched", GENERAL, _res_x(lambda dev: _x(dev)[1]), check="oracle"),
    Case("residual-empty-batch", GENERAL, _res_x(lambda dev: _x(dev)[:0]), check="oracle"),
    Case("residual-x-expanded", GENERAL, _res_x(lambda dev: _x(dev)[:1].expand(3, D)), check="oracle"),
    Case("residual-x-nan", GENERAL, _res_x(lambda dev: _x_with(dev, 1, 0, float("nan"))), check="nan"),
    Case("residual-x-inf", GENERAL, _res_x(lambda dev: _x_with(dev, 2, 1, float("inf"))), check="nan"),
    Case("residual-x-int", GENERAL, _res_x(lambda dev: _x(dev).long()), (TypeError, _DTYPE_MSG.format("int64"))),
    Case("residual-x-f16", GENERAL, _res_x(lambda dev: _x(dev).half()), (TypeError, _DTYPE_MSG.format("float16"))),
    # the traced path names the layer and the counts (it gave torch's raw "mat1 and mat2 shapes
    # cannot be multiplied" before issue 15)
    Case("residual-x-2-features", GENERAL, _res_x(lambda dev: _x(dev)[:, :2]), (ValueError, r"linear layer 'inp' takes 3 input features, but the value it gets has 2")),
]

# 7. optional arguments
CASES += [
    Case("dims-out-of-range", _with("dims"), _kw(dims=[0, 3]), (ValueError, r"dims \[3\] out of range for x with d=3")),
    Case("dims-negative-out-of-range", _with("dims"), _kw(dims=[-4]), (ValueError, r"dims \[-4\] out of range for x with d=3")),
    Case("dims-repeated", _with("dims"), _kw(dims=[1, 1]), (ValueError, r"dims has repeated entries")),
    Case("dims-repeated-negative", _with("dims"), _kw(dims=[2, -1]), (ValueError, r"dims has repeated entries")),
    Case("dims-empty", _with("dims"), _kw(dims=[]), (ValueError, r"dims is empty; pass None for all 3")),
    Case("dims-float", _with("dims"), _kw(dims=[0.5]), (TypeError, r"dims must be a sequence of ints")),
    Case("dims-str", _with("dims"), _kw(dims="01"), (TypeError, r"dims must be a sequence of ints")),
    Case("dims-bool", _with("dims"), _kw(dims=[True]), (TypeError, r"dims must be a sequence of ints")),
    Case("dims-float-tensor", _with("dims"), _kw(dims=torch.tensor([0.0, 1.0])), (TypeError, r"dims must be a sequence of ints")),
    Case("dims-int", _with("dims"), _kw(dims=1), (TypeError, r"dims must be a sequence of ints")),
    Case("dims-negative", _with("dims"), _kw(dims=[-1]), check="oracle"),
    # (Hutchinson is exact along one axis only: it takes the one-axis rows)
    Case("dims-numpy", _with("dims", exclude=("mlp_laplacian_hutchinson",)), _kw(dims=np.array([2, 0])), check="oracle"),
    Case("dims-int-tensor", _with("dims", exclude=("mlp_laplacian_hutchinson",)), _kw(dims=torch.tensor([1, 2])), check="oracle"),
    Case("dims-numpy-one", _with("dims"), _kw(dims=np.array([2])), check="oracle"),
    Case("dims-int-tensor-one", _with("dims"), _kw(dims=torch.tensor([0])), check="oracle"),
    Case("pairs-out-of-range", ("mlp_mixed_partials",), _kw(pairs=[(0, 3)]), (ValueError, r"pairs \[\(0, 3\)\] out of range for d=3")),
    Case("pairs-empty", ("mlp_mixed_partials",), _kw(pairs=[]), (ValueError, r"pairs is empty")),
    Case("pairs-float", ("mlp_mixed_partials",), _kw(pairs=[(0.5, 1)]), (TypeError, r"pairs must be a sequence of \(i, j\) int pairs")),
    Case("pairs-triple", ("mlp_mixed_partials",), _kw(pairs=[(0, 1, 2)]), (TypeError, r"pairs must be a sequence of \(i, j\) int pairs")),
    Case("pairs-str", ("mlp_mixed_partials",), _kw(pairs=["01"]), (TypeError, r"pairs must be a sequence of \(i, j\) int pairs")),
    Case("num-samples-0", ("mlp_laplacian_hutchinson",), _kw(num_samples=0), (ValueError, r"num_samples must be an int >= 1, got 0")),
    Case("num-samples-negative", ("mlp_laplacian_hutchinson",), _kw(num_samples=-3), (ValueError, r"num_samples must be an int >= 1, got -3")),
    Case("num-samples-float", ("mlp_laplacian_hutchinson",), _kw(num_samples=2.0), (ValueError, r"num_samples must be an int >= 1, got 2\.0")),
    Case("num-samples-bool", ("mlp_laplacian_hutchinson",), _kw(num_samples=True), (ValueError, r"num_samples must be an int >= 1, got True")),
    Case("distribution-bad", ("mlp_laplacian_hutchinson",), _kw(distribution="uniform"), (ValueError, r"distribution must be 'rademacher' or 'gaussian'")),
    Case("chunk-size-0", _with("chunk_size"), _kw(chunk_size=0), (ValueError, r"chunk_size must be an int >= 1 or None, got 0")),
    Case("chunk-size-float", _with("chunk_size"), _kw(chunk_size=2.0), (TypeError, r"chunk_size must be an int >= 1 or None, got float")),
    Case("chunk-size-bool", _with("chunk_size"), _kw(chunk_size=True), (TypeError, r"chunk_size must be an int >= 1 or None, got bool")),
    Case("chunk-size-1", _with("chunk_size"), _kw(chunk_size=1), check="oracle"),
    Case("chunk-size-3", _with("chunk_size"), _kw(chunk_size=3), check="oracle"),
    Case("chunk-size-huge", _with("chunk_size"), _kw(chunk_size=10**12), check="oracle"),
    Case("second-bad", ("mlp_derivatives",), _kw(second="hessian"), (ValueError, r"second must be 'laplacian' or 'diag'")),
    Case("second-diag", ("mlp_derivatives",), _kw(second="diag"), check="oracle"),
    Case("A-and-factor", ("mlp_weighted_laplacian",), _kw(A=torch.eye(D, dtype=torch.float64)), (ValueError, r"give exactly one of A \(d, d\) or factor \(d, r\)")),
    Case("A-wrong-shape", ("mlp_weighted_laplacian",), _kw(factor=None, A=torch.eye(2, dtype=torch.float64)), (ValueError, r"A must be a \(3, 3\) tensor")),
    Case("A-not-symmetric", ("mlp_weighted_laplacian",), _kw(factor=None, A=torch.eye(D, dtype=torch.float64) + torch.triu(torch.ones(D, D, dtype=torch.float64), 1)), (ValueError, r"A must be symmetric")),
    Case("A-indefinite", ("mlp_weighted_laplacian",), _kw(factor=None, A=torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))), (ValueError, r"A must be positive semi-definite")),
    Case("factor-wrong-rows", ("mlp_weighted_laplacian",), _kw(factor=torch.ones(2, 2, dtype=torch.float64)), (ValueError, r"factor must be a \(d, r\) tensor with d=3")),
    Case("A-psd", ("mlp_weighted_laplacian",), _kw(factor=None, A=_FACTOR @ _FACTOR.T), check="oracle"),
    Case("order-negative", ("axis_derivatives",), _kw(order=-1), (ValueError, r"order must be an int >= 0, got -1")),
    Case("order-float", ("axis_derivatives",), _kw(order=2.0), (ValueError, r"order must be an int >= 0, got 2\.0")),
    Case("order-bool", ("axis_derivatives",), _kw(order=True), (ValueError, r"order must be an int >= 0, got True")),
    Case("fallback-bad", GENERAL, _kw(fallback="never"), (ValueError, r"fallback must be one of \('autograd', 'error'\)")),
]


def _params():
    out = []
    for c in CASES:
        for f in c.funcs:
            out.append(pytest.param(c, f, id=f"{c.id}-{f}"))
    return out


def _kwargs(fn: Fn, kw: Dict, device) -> Dict:
    full = dict(fn.defaults)
    full.update({k: v for k, v in kw.items() if k in fn.args})
    full = {k: (v.to(device) if isinstance(v, torch.Tensor) and k in ("A", "factor") else v) for k, v in full.items()}
    return {k: v for k, v in full.items() if v is not None or k not in ("A", "factor")}


def _as_tuple(r):
    return r if isinstance(r, tuple) else (r,)


def _same_nonfinite(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()), (got, want)
    assert torch.equal(got.isinf(), want.isinf()), (got, want)
    assert torch.equal(got[got.isinf()], want[want.isinf()])  # same sign
    fin = want.isfinite()
    if fin.any():
        scale = want[fin].abs().max().item()
        assert rel_err(got[fin], want[fin], scale if scale > 0 else 1.0) <= TOL


def _saturated_expect(fn, fname, model, xb, kw):
    """fn's expected result for the weight-inf model with unit 1 of layer 0 replaced by its limit:
    tanh(+-inf) = +-1, every derivative 0 (a bias of +-1000 gives exactly that in float64)."""
    outs = []
    for sign in (1.0, -1.0):
        m = copy.deepcopy(model)
        with torch.no_grad():
            m[0].weight[1] = 0.0
            m[0].bias[1] = 1000.0 * sign
        H = func_hessian(m, xb.contiguous())
        u, G = func_value_grad(m, xb.contiguous())
        outs.append(_as_tuple(fn.expect(u, G, H, kw)))
    pos = xb[:, 2] > 0
    lead = 1 if fname == "axis_derivatives" else 0  # axis_derivatives: (order + 1, N, ...)
    return tuple(torch.where(pos.view((1,) * lead + (-1,) + (1,) * (a.dim() - lead - 1)), a, b)
                 for a, b in zip(*outs))


def _saturated(got: torch.Tensor, want: torch.Tensor, limit: torch.Tensor) -> None:
    """Never NaN/inf where torch.func is finite (and equal there); finite where torch.func is not
    only if equal to the saturated model's value."""
    assert got.shape == want.shape == limit.shape
    bad = ~got.isfinite()
    assert (~want.isfinite())[bad].all(), (got, want)
    fin = want.isfinite()
    if fin.any():
        assert rel_err(got[fin], want[fin], max(want[fin].abs().max().item(), 1e-300)) <= TOL
    extra = got.isfinite() & ~fin
    if extra.any():
        assert rel_err(got[extra], limit[extra], max(limit[extra].abs().max().item(), 1e-300)) <= TOL


@pytest.mark.parametrize("case, fname", _params())
def test_matrix(case: Case, fname: str, device):
    fn = FUNCS[fname]
    model, oracle, x, kw = case.build(device)
    kw = _kwargs(fn, kw, device)
    if case.raises is not None:
        exc, pattern = case.raises
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(exc) as info:
                fn.call(model, x, **kw)
        assert re.search(pattern, str(info.value), re.S), f"{type(info.value).__name__}: {info.value}"
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _as_tuple(fn.call(model, x, **kw))
    if case.warns is not None:
        assert any(re.search(case.warns, str(w.message)) for w in caught), [str(w.message) for w in caught]
    oracle = model if oracle is None else oracle
    xb = x.detach().unsqueeze(0) if x.dim() == 1 else x.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if xb.shape[0] == 0:
            u = oracle(xb).detach()
            G = xb.new_zeros(0, u.shape[1], D)
            H = xb.new_zeros(0, u.shape[1], D, D)
        else:
            H = func_hessian(oracle, xb.contiguous())
            u, G = func_value_grad(oracle, xb.contiguous())
    want = _as_tuple(fn.expect(u, G, H, kw))
    if x.dim() == 1:  # unbatched: no N dimension
        want = tuple(w[:, 0] if (fname == "axis_derivatives") else w[0] for w in want)
    assert len(got) == len(want)
    limits = _saturated_expect(fn, fname, oracle, xb, kw) if case.check == "saturated" else want
    for g_, w_, lim in zip(got, want, limits):
        assert isinstance(g_, torch.Tensor) and g_.dtype == x.dtype and g_.device == x.device
        assert g_.shape == w_.shape, (g_.shape, w_.shape)
        if case.check == "nan":
            _same_nonfinite(g_.detach(), w_)
        elif case.check == "saturated":
            _saturated(g_.detach(), w_, lim)
        elif case.check == "finite":
            fin = w_.isfinite()
            assert g_[fin].isfinite().all()
            if fin.any():
                assert rel_err(g_.detach()[fin], w_[fin], max(w_[fin].abs().max().item(), 1e-300)) <= TOL
        else:
            scale = H.abs().max().item() if H.numel() else 1.0
            if g_.dtype == torch.float32:
                assert rel_err(g_.detach().double(), w_.double(), max(scale, w_.abs().max().item())) <= 1e-5
            else:
                assert rel_err(g_.detach(), w_, max(scale, w_.abs().max().item()) if w_.numel() else 1.0) <= TOL
    # a loss on the result backpropagates whenever something requires grad (never an error)
    if torch.is_grad_enabled() and any(t.requires_grad for t in got):
        sum(t.sum() for t in got).backward()


# ---- training gradients on the models the matrix accepts ------------------------------------


@pytest.mark.parametrize("fname", ["mlp_laplacian", "mlp_hessian_diag", "laplacian", "hessian_diag"])
@pytest.mark.parametrize("make", [_shared_linear, _tied_weight], ids=["shared-linear", "tied-weight"])
def test_shared_parameters_gradients_match_nested_autograd(make, fname, device):
    """A module used twice / a Parameter held by two layers: the parameter gradient sums both uses."""
    model, oracle = make(device)
    x = _x(device)
    fn = FUNCS[fname]
    got = fn.call(model, x)
    _, _, H = nested_hessian(oracle, x)
    want = fn.expect(None, None, H, {})
    params = list(dict.fromkeys(model.parameters()))  # unique: tied weights once
    g1 = torch.autograd.grad(got.square().sum(), params, allow_unused=True)
    g2 = torch.autograd.grad(want.square().sum(), params, allow_unused=True)
    z = lambda g, p: torch.zeros_like(p) if g is None else g  # noqa: E731
    scale = max(z(b, p).abs().max().item() for b, p in zip(g2, params))
    assert scale > 0
    for a, b, p in zip(g1, g2, params):
        assert rel_err(z(a, p), z(b, p), scale) <= TOL


def test_batchnorm_train_does_not_touch_running_stats():
    """The refusal happens before f runs: BatchNorm's running statistics are not updated."""
    model, _ = _wrapped("cpu", nn.BatchNorm1d(6).double(), train=True)
    before = model[1].num_batches_tracked.clone()
    with pytest.raises(ValueError):
        thd.laplacian(model, _x("cpu"))
    assert torch.equal(model[1].num_batches_tracked, before)


def test_cross_device(device):
    """x on the GPU, model on the CPU (and back): a ValueError naming both devices."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    model, _ = _model("cpu")
    for name, f in FUNCS.items():
        kw = _kwargs(f, {}, "cpu")
        with pytest.raises(ValueError, match=r"x is on cuda:0 but (a Linear weight|parameter '\S+') is on cpu"):
            f.call(model, _x("cuda"), **kw)
