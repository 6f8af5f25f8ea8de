"""The TF32 policy (torchhessdiag/_precision.py, issue 17): float32 CUDA inputs meeting TF32
matmuls get one TF32Warning per process; nothing else warns, and torch's setting is only read.

A CPU-only machine has no CUDA tensors, but the policy looks at dtype and device only, so fake
CUDA tensors (FakeTensorMode, no GPU needed) stand in for them. torch's matmul setting is changed
only through torch.set_float32_matmul_precision and restored the same way (mixing it with the
newer fp32_precision API makes torch's legacy getters raise for the rest of the process).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import torchhessdiag as thd
from torchhessdiag import _precision


@pytest.fixture
def fresh():
    """A process state where the warning has not fired; torch's matmul precision restored."""
    saved = torch.get_float32_matmul_precision()
    _precision._reset()
    yield
    torch.set_float32_matmul_precision(saved)
    _precision._reset()
    torch.get_float32_matmul_precision()  # readable again: the state is not "mixed"


def _fake_cuda(dtype=torch.float32):
    with FakeTensorMode():
        return torch.empty(4, 2, dtype=dtype, device="cuda")


def _tf32_warnings(rec):
    return [w for w in rec if issubclass(w.category, thd.TF32Warning)]


@pytest.mark.parametrize("setting, on", [("highest", False), ("high", True), ("medium", True)])
def test_tf32_enabled_follows_torch(fresh, setting, on):
    torch.set_float32_matmul_precision(setting)
    assert _precision.tf32_enabled() is on


def test_tf32_enabled_is_conservative_when_torch_cannot_say(fresh, monkeypatch):
    class Raising:
        def __getattr__(self, name):
            raise RuntimeError("mix of the legacy and new APIs")

    monkeypatch.setattr(torch.backends.cuda, "matmul", Raising())
    assert _precision.tf32_enabled() is True


def test_warns_once_for_float32_cuda_under_tf32(fresh):
    torch.set_float32_matmul_precision("high")
    x = _fake_cuda()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert _precision.warn_if_tf32(x) is True
        assert _precision.warn_if_tf32(x) is False
        assert _precision.warn_if_tf32(torch.ones(2), x) is False
    (w,) = _tf32_warnings(rec)
    msg = str(w.message)
    assert "TF32" in msg and "3 digits" in msg and "fp32_precision = 'ieee'" in msg and "float64" in msg


@pytest.mark.parametrize(
    "case", ["float64 cuda", "float32 cpu", "tf32 off", "compiling", "not a tensor"]
)
def test_no_warning_where_tf32_cannot_matter(fresh, monkeypatch, case):
    torch.set_float32_matmul_precision("highest" if case == "tf32 off" else "high")
    x = {
        "float64 cuda": _fake_cuda(torch.float64),
        "float32 cpu": torch.ones(3),
        "tf32 off": _fake_cuda(),
        "compiling": _fake_cuda(),
        "not a tensor": 1.0,
    }[case]
    if case == "compiling":
        monkeypatch.setattr(_precision, "_is_compiling", lambda: True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert _precision.warn_if_tf32(x) is False
    assert not _tf32_warnings(rec)
    # and it still fires later for a case that matters
    monkeypatch.setattr(_precision, "_is_compiling", lambda: False)
    torch.set_float32_matmul_precision("high")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert _precision.warn_if_tf32(_fake_cuda()) is True
    assert len(_tf32_warnings(rec)) == 1


def test_public_path_on_cpu_never_warns(fresh):
    """laplacian() calls the policy (general.py); CPU inputs are never affected by TF32."""
    torch.set_float32_matmul_precision("high")
    f = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    g = lambda x: f(x) * x[:, :1]  # noqa: E731  (the traced jet path, not the engine)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        thd.laplacian(g, torch.randn(5, 2))
    assert not _tf32_warnings(rec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_public_path_warns_once_on_cuda(fresh):
    torch.set_float32_matmul_precision("high")
    f = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).cuda()
    g = lambda x: f(x) * x[:, :1]  # noqa: E731
    x = torch.randn(5, 2, device="cuda")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        thd.laplacian(g, x)
        thd.laplacian(g, x)
    assert len(_tf32_warnings(rec)) == 1
    assert _tf32_warnings(rec)[0].filename == __file__, "points at the caller"


def _public_calls():
    """Every public entry that reads the policy, each on the path it takes here (CPU)."""
    seq = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    traced = lambda x: seq(x) * x[:, :1]  # noqa: E731  (the jets, not the engine)
    field = lambda x: torch.tanh(x) * x.sum(1, keepdim=True)  # noqa: E731  (a vector field)
    return {
        "mlp_laplacian (engine)": lambda x: thd.mlp_laplacian(seq, x),
        "laplacian (engine path)": lambda x: thd.laplacian(seq, x),
        "laplacian (jet path)": lambda x: thd.laplacian(traced, x),
        "hessian_diag (jet path)": lambda x: thd.hessian_diag(traced, x),
        "axis_derivatives (jet path)": lambda x: thd.axis_derivatives(traced, x, order=3),
        "partials": lambda x: thd.partials(traced, x, [(1, 1)]),
        "biharmonic": lambda x: thd.biharmonic(traced, x),
        "divergence": lambda x: thd.divergence(field, x),
    }


@pytest.mark.parametrize("name", list(_public_calls()))
def test_warning_points_at_the_users_call_on_every_path(fresh, monkeypatch, name):
    """The TF32 warning names the user's line however deep the library's chain is (engine, jets,
    operators). CPU stand-in: the policy is made to treat float32 CPU tensors as TF32-bound (the
    GPU test above checks the real condition)."""
    monkeypatch.setattr(_precision, "_meets_tf32", lambda t: isinstance(t, torch.Tensor) and t.dtype == torch.float32)
    monkeypatch.setattr(_precision, "tf32_enabled", lambda: True)
    call = _public_calls()[name]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        call(torch.randn(5, 2))
    got = _tf32_warnings(rec)
    assert len(got) == 1, name
    assert got[0].filename == __file__, f"{name}: points at {got[0].filename}:{got[0].lineno}"
