"""The activation registry (torchhessdiag/_registry.py) and everything derived from it.

* The built-in entries are the C++ table: same names in the same order (their table ids) as
  ``torchhessdiag._C.activations()`` / ``backend_info()["activations"]``, and the same names as
  ``reference.TABLE`` (the header's Python mirror).
* The derived tables equal the hand-written ones they replaced: the old literals are written out
  here once, as a check of the migration (parameters, torch functions, the tracer's function /
  method tables, the torch.nn module map, the drop-ins of ``convert``, the engine's supported
  list, the messages that list the activations).
* User activations register into the same registry and leave it on unregister.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchhessdiag as thd
from torchhessdiag import _graph_classify, _registry, activations, custom, engine, nn as tnn, ops, reference
from torchhessdiag._checks import _check_act
from torchhessdiag._graph_program import Unsupported
from torchhessdiag.activations import ActivationSpec, make_spec, spec_from_module, torch_function

from _helpers import SPECS

pytestmark = pytest.mark.usefixtures("single_thread")

# ---- the pre-registry literals (a one-time check of the migration) -------------------------------

OLD_PARAMS = {
    "identity": ((), ()),
    "tanh": ((), ()),
    "sigmoid": ((), ()),
    "softplus": (("beta", "threshold"), (1.0, 20.0)),
    "silu": ((), ()),
    "gelu": ((), ()),
    "gelu_tanh": ((), ()),
    "sin": (("w",), (1.0,)),
    "cos": (("w",), (1.0,)),
    "exp": ((), ()),
    "elu": (("alpha",), (1.0,)),
    "celu": (("alpha",), (1.0,)),
    "relu": ((), ()),
    "leaky_relu": (("negative_slope",), (0.01,)),
}

OLD_ACT_FUNCTIONS = {
    torch.tanh: ("tanh", ()),
    F.tanh: ("tanh", ()),
    torch.sigmoid: ("sigmoid", ()),
    F.sigmoid: ("sigmoid", ()),
    torch.special.expit: ("sigmoid", ()),
    F.silu: ("silu", ("inplace",)),
    F.softplus: ("softplus", ("beta", "threshold")),
    F.gelu: ("gelu", ("approximate",)),
    torch.sin: ("sin", ()),
    torch.cos: ("cos", ()),
    torch.exp: ("exp", ()),
    F.elu: ("elu", ("alpha", "inplace")),
    F.celu: ("celu", ("alpha", "inplace")),
    F.relu: ("relu", ("inplace",)),
    torch.relu: ("relu", ()),
    F.leaky_relu: ("leaky_relu", ("negative_slope", "inplace")),
}
OLD_ACT_METHODS = {"tanh": "tanh", "sigmoid": "sigmoid", "sin": "sin", "cos": "cos", "exp": "exp", "relu": "relu"}

OLD_FIXED = {
    nn.Tanh: ActivationSpec("tanh"),
    nn.Sigmoid: ActivationSpec("sigmoid"),
    nn.SiLU: ActivationSpec("silu"),
    nn.ReLU: ActivationSpec("relu"),
}

OLD_SUPPORTED = (
    "nn.Linear (with or without bias), the activations torch.nn.Tanh, Sigmoid, Softplus, SiLU, "
    "GELU, ELU, CELU, ReLU, LeakyReLU and every torchhessdiag.nn drop-in (including "
    "registered user activations, torchhessdiag.nn.UserActivation), nn.Identity, and "
    "nn.Dropout in eval mode, inside (nested) nn.Sequential"
)

OLD_DROPIN_OF = {
    "tanh": lambda s: tnn.Tanh(),
    "sigmoid": lambda s: tnn.Sigmoid(),
    "softplus": lambda s: tnn.Softplus(beta=s.a, threshold=s.b),
    "silu": lambda s: tnn.SiLU(),
    "gelu": lambda s: tnn.GELU("none"),
    "gelu_tanh": lambda s: tnn.GELU("tanh"),
    "sin": lambda s: tnn.Sine(s.a),
    "cos": lambda s: tnn.Cosine(s.a),
    "exp": lambda s: tnn.Exp(),
    "elu": lambda s: tnn.ELU(alpha=s.a),
    "celu": lambda s: tnn.CELU(alpha=s.a),
    "relu": lambda s: tnn.ReLU(),
    "leaky_relu": lambda s: tnn.LeakyReLU(negative_slope=s.a),
    "identity": lambda s: tnn.Identity(),
}


def _old_torch_function(spec):
    n, a, b = spec.name, spec.a, spec.b
    return {
        "identity": lambda z: z,
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "softplus": lambda z: F.softplus(z, beta=a, threshold=b),
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
        "sin": (lambda z: torch.sin(z)) if a == 1.0 else (lambda z: torch.sin(z * a)),
        "cos": (lambda z: torch.cos(z)) if a == 1.0 else (lambda z: torch.cos(z * a)),
        "exp": torch.exp,
        "elu": lambda z: F.elu(z, alpha=a),
        "celu": lambda z: F.celu(z, alpha=a),
        "relu": F.relu,
        "leaky_relu": lambda z: F.leaky_relu(z, negative_slope=a),
    }[n]


def _old_spec_from_module(m):
    t = type(m)
    if t in OLD_FIXED:
        return OLD_FIXED[t]
    spec = getattr(m, "_thd_spec", None)
    if isinstance(spec, ActivationSpec):
        return spec
    if t is nn.Softplus:
        return make_spec("softplus", beta=m.beta, threshold=m.threshold)
    if t is nn.GELU:
        return make_spec("gelu_tanh" if m.approximate == "tanh" else "gelu")
    if t is nn.ELU:
        return make_spec("elu", alpha=m.alpha)
    if t is nn.CELU:
        return make_spec("celu", alpha=m.alpha)
    if t is nn.LeakyReLU:
        return make_spec("leaky_relu", negative_slope=m.negative_slope)
    return None


# ---- the entries are the C++ table --------------------------------------------------------------


def test_table_ids_are_the_positions_in_the_compiled_table():
    assert [e.table_id for e in _registry.BUILTINS] == list(range(len(_registry.BUILTINS)))
    assert _registry.TABLE_NAMES == tuple(e.name for e in _registry.BUILTINS)
    assert tuple(thd.backend_info()["activations"]) == _registry.TABLE_NAMES
    if not ops.COMPILED:  # tests/backend/test_backend.py::test_compiled_extension_is_loaded fails for this
        pytest.skip(f"compiled extension not loaded ({ops.LOAD_ERROR})")
    compiled = tuple(ops._C.activations())
    assert compiled == _registry.TABLE_NAMES  # same names, same order
    for e in _registry.BUILTINS:
        assert compiled.index(e.name) == e.table_id


def test_cpp_flags_mirror_the_entries():
    """csrc/activations.h's kActInfo (what the C++ checks and the drop-ins' autograd read: the
    linear / piecewise-linear flags, the parameter that must be non-zero) says what each entry
    says."""
    if not ops.COMPILED:
        pytest.skip(f"compiled extension not loaded ({ops.LOAD_ERROR})")
    want = tuple(
        (e.name, e.linear, e.piecewise_linear,
         next((p.name for p in e.params[:1] if p.nonzero), None))
        for e in _registry.BUILTINS
    )
    assert tuple(ops._C.activation_info()) == want
    # the C++ checks the first parameter only: a constraint on another would need C++ work
    assert not any(p.nonzero for e in _registry.BUILTINS for p in e.params[1:])


def test_reference_table_has_the_registry_names():
    assert tuple(reference.TABLE) == _registry.TABLE_NAMES


def test_entries_are_consistent():
    for e in _registry.BUILTINS:
        assert not e.is_user and e.user is None
        assert e.torch_fn is not None
        assert not (e.linear and e.piecewise_linear)
        assert len(e.params) <= custom.MAX_PARAMS
        if e.dropin is not None:
            assert e.dropin in tnn.__all__
        if e.select is not None:
            for _, n in e.select.names:
                assert n in _registry.TABLE
            assert e.select.name_for(e.select.default) == e.name


# ---- derived tables == the literals they replaced -------------------------------------------------


def test_parameters_and_flags_as_before():
    assert activations._PARAMS == OLD_PARAMS
    assert list(activations._PARAMS) == list(OLD_PARAMS)  # the enum's order
    assert activations.NAMES == tuple(OLD_PARAMS)
    assert activations.PIECEWISE_LINEAR == frozenset({"relu", "leaky_relu"})
    assert activations.LINEAR == frozenset({"identity"})
    nonzero = {(e.name, p.name) for e in _registry.BUILTINS for p in e.params if p.nonzero}
    assert nonzero == {("softplus", "beta"), ("celu", "alpha")}


def test_tracer_tables_as_before():
    assert _graph_classify._ACT_FUNCTIONS == OLD_ACT_FUNCTIONS
    assert _graph_classify._ACT_METHODS == OLD_ACT_METHODS


def test_module_map_as_before():
    assert activations._FIXED == OLD_FIXED
    mods = [
        nn.Tanh(), nn.Sigmoid(), nn.Softplus(), nn.Softplus(2.0, 7.0), nn.SiLU(), nn.GELU(),
        nn.GELU("tanh"), nn.ELU(0.3), nn.CELU(0.7), nn.ReLU(), nn.LeakyReLU(0.2), nn.Identity(),
        nn.Mish(), nn.Linear(2, 2), nn.Hardtanh(),
    ]
    g = nn.GELU()
    g.approximate = "something-else"  # the entry itself, as before
    mods.append(g)
    for name, maker in OLD_DROPIN_OF.items():
        mods.append(maker(make_spec(name)))
    for m in mods:
        assert spec_from_module(m) == _old_spec_from_module(m), m
    with pytest.raises(ValueError, match="softplus: beta must be non-zero"):
        spec_from_module(nn.Softplus(beta=0.0))


def test_torch_functions_as_before():
    z = torch.linspace(-3, 3, 13, dtype=torch.float64)
    for name in activations.NAMES:
        for spec in (make_spec(name), ActivationSpec(name, 1.7, 5.0)):
            torch.testing.assert_close(torch_function(spec)(z), _old_torch_function(spec)(z), rtol=0, atol=0)


def test_dropins_as_before():
    assert set(tnn._DROPIN_OF) == set(OLD_DROPIN_OF)
    for spec in SPECS:  # every activation, with default and other parameters
        new, old = tnn._DROPIN_OF[spec.name](spec), OLD_DROPIN_OF[spec.name](spec)
        assert type(new) is type(old) and type(new).__name__ == _registry.TABLE[spec.name].dropin
        assert new.spec == old.spec == spec
        assert repr(new) == repr(old)


def test_convert_uses_the_registry_dropins():
    model = nn.Sequential(nn.Linear(2, 3), nn.GELU("tanh"), nn.Softplus(2.0, 10.0), nn.LeakyReLU(0.3), nn.Linear(3, 1))
    conv = tnn.convert(model)
    assert [type(m).__name__ for m in conv] == ["Linear", "GELU", "Softplus", "LeakyReLU", "Linear"]
    assert [spec_from_module(m) for m in conv[1:4]] == [spec_from_module(m) for m in model[1:4]]


def test_engine_supported_text_as_before():
    assert engine._SUPPORTED == OLD_SUPPORTED
    with pytest.raises(NotImplementedError) as err:
        engine.parse_mlp(nn.Sequential(nn.Linear(2, 2), nn.Mish()), "mlp_laplacian")
    assert OLD_SUPPORTED in str(err.value)


def test_messages_list_the_table_names():
    listed = ", ".join(OLD_PARAMS)
    with pytest.raises(ValueError) as err:
        make_spec("nope")
    assert f"supported: {listed}" in str(err.value)
    with pytest.raises(NotImplementedError) as err:
        make_spec(nn.Mish())
    assert str(err.value) == f"Mish is not in torchhessdiag's derivative table; supported: {listed}"
    with pytest.raises(ValueError) as err:
        _check_act("nope", 0.0, "act_forward")
    assert str(err.value) == f"torchhessdiag: unknown activation 'nope'; supported: {listed}"
    with pytest.raises(ValueError, match=r"^torchhessdiag: softplus needs beta != 0 \(got 0\)$"):
        _check_act("softplus", 0.0, "act_forward")
    with pytest.raises(ValueError, match=r"^torchhessdiag: celu needs alpha != 0 \(got 0\)$"):
        _check_act("celu", -0.0, "act_forward")
    _check_act("elu", 0.0, "act_forward")  # elu's alpha may be 0
    with pytest.raises(ValueError, match=r"^celu: alpha must be non-zero$"):
        make_spec("celu", alpha=0.0)


def test_function_spec_select():
    fs = _graph_classify.function_spec
    assert fs(F.gelu, (), {}) == make_spec("gelu")
    assert fs(F.gelu, ("tanh",), {}) == make_spec("gelu_tanh")
    assert fs(F.gelu, (), {"approximate": "none"}) == make_spec("gelu")
    with pytest.raises(Unsupported, match=r"^gelu with approximate='bogus'$"):
        fs(F.gelu, (), {"approximate": "bogus"})
    assert fs(F.leaky_relu, (0.2, True), {}) == make_spec("leaky_relu", negative_slope=0.2)
    assert fs(F.silu, (), {"inplace": False}) == make_spec("silu")
    with pytest.raises(Unsupported, match=r"^softplus called with the unsupported argument alpha=$"):
        fs(F.softplus, (), {"alpha": 1.0})
    assert fs(torch.tanh, (), {}) == make_spec("tanh")
    assert fs(torch.atan, (), {}) is None


# ---- user activations are entries too -----------------------------------------------------------


def _gauss(z, s=1.0):
    return torch.exp(-s * z * z)


def _gauss_d1(z, s=1.0):
    return -2 * s * z * torch.exp(-s * z * z)


def test_user_activation_enters_and_leaves_the_registry():
    name = "t_registry_gauss"
    if custom.lookup(name) is not None:
        thd.unregister_activation(name)
    assert _registry.user(name) is None
    act = thd.register_activation(name, _gauss, [_gauss_d1], params={"s": 1.0})
    try:
        e = _registry.user(name)
        assert e is not None and e.user is act and e.is_user and e.table_id is None
        assert e.param_names == ("s",) and e.defaults == (1.0,)
        assert _registry.get(name.upper()) is e and _registry.get(name) is e
        assert e in _registry.users() and name in custom.registered_names()
        assert act in activations.registered_functions()
        assert name in thd.backend_info()["user_activations"]
        assert name not in _registry.TABLE and name not in activations.NAMES
        assert make_spec(name).is_user
        # replace: the same object, the entry follows the new definition
        again = thd.register_activation(name, _gauss, [_gauss_d1], params={"s": 2.0, "t": 0.0}, replace=True)
        assert again is act
        e2 = _registry.user(name)
        assert e2.param_names == ("s", "t") and e2.defaults == (2.0, 0.0) and e2.user is act
        assert [u.name for u in _registry.users()].count(name) == 1
    finally:
        thd.unregister_activation(name)
    assert _registry.user(name) is None and _registry.get(name) is None
    assert name not in custom.registered_names()
    assert act not in activations.registered_functions()
    assert not act.registered


def test_builtin_names_cannot_be_registered():
    with pytest.raises(ValueError, match="is the name of an activation of the derivative table"):
        thd.register_activation("Tanh", torch.tanh, [lambda z: 1 - torch.tanh(z) ** 2])
    assert _registry.user("tanh") is None


def test_docstrings_name_every_entry():
    # prose that lists the activations is not generated; it must at least name every entry
    recognised = " ".join(activations.spec_from_module.__doc__.split())
    converts = " ".join(tnn.convert.__doc__.split())
    for cls in _registry.module_class_names():
        assert cls in recognised and cls in converts, cls
    table = activations.__doc__
    for name in _registry.TABLE_NAMES:
        assert f"\n{name} " in table, name
    for e in _registry.BUILTINS:
        assert e.dropin is None or e.dropin in tnn.__all__


def test_gelu_dropin_follows_the_select():
    assert tnn.GELU().spec == make_spec("gelu") and tnn.GELU("tanh").spec == make_spec("gelu_tanh")
    assert tnn.GELU("tanh").approximate == "tanh" and tnn.GELU().approximate == "none"
    with pytest.raises(ValueError, match=r"^GELU: approximate must be 'none' or 'tanh', got 'x'$"):
        tnn.GELU("x")
