"""Which implementation serves the ops: the compiled extension, and the pure-PyTorch reference.

* ``backend_info()`` reports the documented keys, and the compiled extension IS loaded unless
  ``TORCHHESSDIAG_BACKEND=reference`` asks for the reference -- this is the test that makes CI
  fail when the extension did not build or does not load.
* The C++ op schemas (csrc/act_ops.cpp) agree with the Python copy (torchhessdiag/_schemas.py)
  used when the extension is missing, and ``_C`` describes the same table as the Python side.
* A subprocess with ``TORCHHESSDIAG_BACKEND=reference`` gets the same numbers as this process
  (compiled kernels) to 1e-13 -- derivative table and nested autograd through drop-ins -- and
  validates op arguments as the compiled kernels do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import torchhessdiag
from torchhessdiag import ops
from torchhessdiag._schemas import SCHEMAS
from torchhessdiag.activations import NAMES

FORCED_REFERENCE_ENV = os.environ.get("TORCHHESSDIAG_BACKEND", "").strip().lower() == "reference"
DOCUMENTED_KEYS = {"compiled", "cuda_kernels", "cuda_archs", "cuda_fallback", "devices", "load_error", "max_order", "activations"}
# Small tensors only: one intra-op thread (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


# ---- backend_info -------------------------------------------------------------------------------


def test_backend_info_keys():
    info = torchhessdiag.backend_info()
    assert DOCUMENTED_KEYS <= set(info), DOCUMENTED_KEYS - set(info)
    assert isinstance(info["compiled"], bool) and isinstance(info["cuda_kernels"], bool)
    assert set(info["devices"]) >= {"cpu", "cuda"}
    assert set(info["devices"].values()) <= {"compiled", "reference"}
    assert info["max_order"] == 4
    assert tuple(info["activations"]) == NAMES
    assert info["version"] == torchhessdiag.__version__
    assert info["torch"] == torch.__version__
    # consistency of the flags
    if info["compiled"]:
        assert info["load_error"] is None
        assert info["devices"]["cpu"] == "compiled"
        # a GPU without a kernel image in this build is served by the reference (_cuda_probe)
        assert info["devices"]["cuda"] == ("compiled" if info["cuda_kernels"] and not info["cuda_fallback"] else "reference")
    else:
        assert isinstance(info["load_error"], str) and info["load_error"]
        assert not info["cuda_kernels"]
        assert set(info["devices"].values()) == {"reference"}


def test_compiled_extension_is_loaded():
    """CI gate: fails (with the load error) when torchhessdiag._C did not build or load."""
    if FORCED_REFERENCE_ENV:
        pytest.skip("TORCHHESSDIAG_BACKEND=reference: the reference backend was asked for")
    info = torchhessdiag.backend_info()
    assert info["compiled"], (
        "the compiled extension torchhessdiag._C is not loaded; every op is running the "
        f"pure-PyTorch reference. load_error: {info['load_error']}"
    )
    assert not info["forced_reference"]
    assert "torchhessdiag._C" in sys.modules


# ---- schemas and the table description -----------------------------------------------------------


def _normalised_schema(name):
    s = str(getattr(torch.ops.torchhessdiag, name).default._schema)
    prefix = "torchhessdiag::"
    assert s.startswith(prefix), s
    return s[len(prefix):]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schemas_match_python_copy(name):
    # Whichever side defined the op in this process (C++ TORCH_LIBRARY when compiled, the Python
    # copy otherwise) must print exactly the Python copy. In the compiled case this is the C++ vs
    # Python agreement; the reference subprocess below checks the Python-defined side too.
    assert _normalised_schema(name) == SCHEMAS[name]


def test_no_extra_ops_in_namespace():
    # every op the library registers is covered by SCHEMAS (the fallback defines only those)
    defined = {
        op.split("::", 1)[1].split(".", 1)[0]
        for op in torch._C._dispatch_get_all_op_names()
        if op.startswith("torchhessdiag::")
    }
    assert defined == set(SCHEMAS)


def _require_compiled():
    if not ops.COMPILED:  # test_compiled_extension_is_loaded is the test that fails for this
        pytest.skip(f"compiled extension not loaded ({ops.LOAD_ERROR})")
    return ops._C


def test_c_activations_match_python_names():
    C = _require_compiled()
    assert tuple(C.activations()) == NAMES  # same order: it is the table's enum


def test_c_max_order():
    C = _require_compiled()
    assert C.max_order() == 4 == ops.MAX_ORDER == torchhessdiag.reference.MAX_ORDER


def test_c_cuda_compiled_flag():
    C = _require_compiled()
    assert C.cuda_compiled() is ops.CUDA_KERNELS is torchhessdiag.backend_info()["cuda_kernels"]


# ---- the forced reference backend, in a subprocess ----------------------------------------------

# Computes the same numbers in whichever backend the importing process has; run here (compiled)
# and in a subprocess with TORCHHESSDIAG_BACKEND=reference.
COMPUTE = textwrap.dedent(
    """
    import math
    import warnings
    import torch
    import torchhessdiag
    import torchhessdiag.nn as thnn
    from torchhessdiag.activations import NAMES, make_spec

    PARAMS = {
        "softplus": dict(beta=2.0, threshold=5.0), "sin": dict(w=3.0), "cos": dict(w=0.5),
        "elu": dict(alpha=0.7), "celu": dict(alpha=0.7), "leaky_relu": dict(negative_slope=0.2),
    }
    DROPINS = {
        "tanh": thnn.Tanh, "sigmoid": thnn.Sigmoid, "silu": thnn.SiLU,
        "softplus": lambda: thnn.Softplus(2.0, 5.0), "gelu": thnn.GELU,
        "gelu_tanh": lambda: thnn.GELU("tanh"), "sin": lambda: thnn.Sine(3.0),
        "cos": lambda: thnn.Cosine(0.5), "exp": thnn.Exp, "elu": lambda: thnn.ELU(0.7),
        "celu": lambda: thnn.CELU(0.7),
    }

    def compute(device):
        out = {}
        # a float64 grid that includes 0, both signs, the softplus switch region and tails
        x = torch.cat([torch.linspace(-12, 12, 481, dtype=torch.float64),
                       torch.tensor([0.0, 2.5, 2.5 + 1e-9, -1e-300, 1e-300], dtype=torch.float64)])
        x = x.to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in NAMES:
                out["table/" + name] = torchhessdiag.activation_derivatives(
                    x, name, order=4, **PARAMS.get(name, {}))
                out["beyond/" + name] = torchhessdiag.activation_derivatives(
                    x[::8], name, orders=[5], **PARAMS.get(name, {}))
            for name, factory in DROPINS.items():
                torch.manual_seed(0)
                model = torch.nn.Sequential(
                    torch.nn.Linear(3, 24), factory(), torch.nn.Linear(24, 24), factory(),
                    torch.nn.Linear(24, 1)).double().to(device)
                xi = (torch.rand(9, 3, generator=torch.Generator().manual_seed(1),
                                 dtype=torch.float64) * 2 - 1).to(device).requires_grad_(True)
                y = model(xi)
                (g,) = torch.autograd.grad(y.sum(), xi, create_graph=True)
                h = torch.stack([torch.autograd.grad(g[:, i].sum(), xi, create_graph=True)[0][:, i]
                                 for i in range(3)], 1)
                (t,) = torch.autograd.grad(h.sum(), xi)  # a third derivative, for good measure
                out["mlp/" + name] = torch.cat([y.detach().flatten(), g.detach().flatten(),
                                                h.flatten(), t.flatten()])
        return {k: v.detach().cpu() for k, v in out.items()}
    """
)

# Argument validation that the compiled kernels perform (csrc/act_ops_impl.h). The reference
# backend serves the same ops and must refuse the same calls with the same exception types.
VALIDATION = textwrap.dedent(
    """
    import torch
    ops = torch.ops.torchhessdiag

    def validation(device):
        x = torch.linspace(-1, 1, 5, dtype=torch.float64, device=device)
        xf = x.float()
        xi = x.long()
        cases = {
            "int z into act_derivatives": (TypeError,
                lambda: ops.act_derivatives(xi, "tanh", 0.0, 0.0, [1])),
            "half z into act_grad": (TypeError,
                lambda: ops.act_grad(x.half(), x.half(), "tanh", 0.0, 0.0, 1)),
            "int g into act_grad": (TypeError, lambda: ops.act_grad(xi, x, "tanh", 0.0, 0.0, 1)),
            "g float32 vs z float64": (TypeError,
                lambda: ops.act_grad(xf, x, "tanh", 0.0, 0.0, 1)),
            "g shape mismatch": (ValueError,
                lambda: ops.act_grad(x[:3], x, "tanh", 0.0, 0.0, 1)),
            "unknown activation": (ValueError,
                lambda: ops.act_grad(x, x, "swish", 0.0, 0.0, 1)),
            "softplus beta=0": (ValueError,
                lambda: ops.act_derivatives(x, "softplus", 0.0, 20.0, [1])),
            "celu alpha=0": (ValueError, lambda: ops.act_grad(x, x, "celu", 0.0, 0.0, 1)),
            "act_grad k=5": (ValueError, lambda: ops.act_grad(x, x, "tanh", 0.0, 0.0, 5)),
            "mul_pair_backward g1 shape": (ValueError,
                lambda: ops.mul_pair_backward(x[:3], x, x, x, x, x, x)),
            "act_derivatives orders=[]": (ValueError,
                lambda: ops.act_derivatives(x, "tanh", 0.0, 0.0, [])),
            "act_derivatives orders=[7]": (ValueError,
                lambda: ops.act_derivatives(x, "tanh", 0.0, 0.0, [7])),
            "act_derivatives orders=[0, 1, -1]": (ValueError,
                lambda: ops.act_derivatives(x, "tanh", 0.0, 0.0, [0, 1, -1])),
            "act_beyond_table n=-1": (ValueError,
                lambda: ops.act_beyond_table(x, "tanh", 0.0, 0.0, -1)),
        }
        result = {}
        for what, (exc, call) in cases.items():
            try:
                call()
                result[what] = "no error"
            except exc:
                result[what] = "ok"
            except Exception as e:  # the wrong kind of error
                result[what] = f"{type(e).__name__}: {e}"
        return result
    """
)

CHILD = textwrap.dedent(
    """
    import json, sys, warnings
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        import torch
        import torchhessdiag
    info = torchhessdiag.backend_info()
    thd_warnings = [str(w.message) for w in rec if "torchhessdiag" in str(w.message)]
    device, path = sys.argv[1], sys.argv[2]
    schemas = {n: str(getattr(torch.ops.torchhessdiag, n).default._schema)
               for n in ("act_forward", "act_derivatives", "act_grad", "mul_pair_backward")}
    torch.save(compute(device), path + ".pt")
    with open(path + ".json", "w") as f:
        json.dump({"info": {k: v for k, v in info.items() if k != "activations"},
                   "activations": list(info["activations"]),
                   "C_loaded": "torchhessdiag._C" in sys.modules,
                   "import_warnings": thd_warnings, "schemas": schemas,
                   "validation": validation(device)}, f)
    """
)


@pytest.fixture(scope="module")
def _reference_runs(tmp_path_factory):
    return {}


@pytest.fixture
def reference_run(device, _reference_runs, tmp_path_factory):
    """Run COMPUTE/VALIDATION in a subprocess with TORCHHESSDIAG_BACKEND=reference (once per
    device per module) and return (metadata, tensors)."""
    key = str(device)
    if key not in _reference_runs:
        path = str(tmp_path_factory.mktemp("reference") / "run")
        env = dict(os.environ, TORCHHESSDIAG_BACKEND="reference", OMP_NUM_THREADS="1")
        code = COMPUTE + VALIDATION + CHILD
        proc = subprocess.run(
            [sys.executable, "-c", code, key, path], env=env, capture_output=True, text=True,
            timeout=240,
        )
        assert proc.returncode == 0, f"reference subprocess failed:\n{proc.stderr[-4000:]}"
        with open(path + ".json") as f:
            meta = json.load(f)
        _reference_runs[key] = (meta, torch.load(path + ".pt"))
    return _reference_runs[key]


def _compute_here(device):
    ns = {}
    exec(COMPUTE, ns)
    return ns["compute"](str(device))


def test_reference_subprocess_backend_info(reference_run):
    meta, _ = reference_run
    info = meta["info"]
    assert info["compiled"] is False
    assert info["forced_reference"] is True
    assert info["cuda_kernels"] is False
    assert "TORCHHESSDIAG_BACKEND" in info["load_error"]
    assert set(info["devices"].values()) == {"reference"}
    assert info["max_order"] == 4
    assert tuple(meta["activations"]) == NAMES
    assert meta["C_loaded"] is False, "the forced reference backend imported torchhessdiag._C"
    # asking for the reference is not a failure: no "could not be loaded" warning
    assert meta["import_warnings"] == []


def test_reference_subprocess_schemas(reference_run):
    meta, _ = reference_run
    for name, s in meta["schemas"].items():
        assert s == "torchhessdiag::" + SCHEMAS[name]


def test_reference_matches_compiled(reference_run, device):
    # 1e-13 relative, plus 1e-13 * max|value| absolute per quantity: the reference mirrors the
    # C++ formulas 1:1, so the only differences are libm vs torch's vectorised exp/tanh/erf
    # (<= a few ulp per call, a few dozen calls deep in the MLP's third derivative); 1e-13 is
    # ~500 eps -- far above that, far below any formula or branch error.
    _, ref = reference_run
    here = _compute_here(device)
    assert set(here) == set(ref)
    for key in sorted(here):
        a, b = here[key], ref[key]
        assert a.shape == b.shape and a.dtype == b.dtype, key
        assert torch.equal(a.isnan(), b.isnan()), key
        assert torch.equal(a.isinf(), b.isinf()), key
        fin = torch.isfinite(b)
        scale = b[fin].abs().max().item() if fin.any() else 0.0
        torch.testing.assert_close(
            a, b, rtol=1e-13, atol=1e-13 * scale, equal_nan=True,
            msg=lambda m, key=key: f"{key}: compiled vs reference: {m}",
        )


def test_reference_backend_validates_arguments(reference_run):
    # The reference kernels must refuse the calls that the compiled kernels refuse, with the
    # same exception type (TypeError for dtypes, ValueError for values), so that a machine
    # without the extension (or a CUDA tensor on a CPU-only build) fails the same way.
    meta, _ = reference_run
    bad = {k: v for k, v in meta["validation"].items() if v != "ok"}
    assert not bad, "reference backend: " + "; ".join(f"{k} -> {v}" for k, v in bad.items())


def test_in_process_backend_validates_arguments(device):
    # the same cases in this process (the compiled kernels, unless the reference was forced)
    ns = {}
    exec(VALIDATION, ns)
    result = ns["validation"](str(device))
    bad = {k: v for k, v in result.items() if v != "ok"}
    assert not bad, f"{ops.LOAD_ERROR or 'compiled'} backend: " + "; ".join(
        f"{k} -> {v}" for k, v in bad.items())
