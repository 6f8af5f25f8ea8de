"""_graph_fuse.py: the gate (1 - z) * P + z * Q traced as one step, and its jet rule
(_rules_algebra._rule_gate: the jet of P + z * (Q - P), Q - P shared per pair).

Exactness: every derivative of gated models (the modified MLP, PirateNet, gates with constant
parts) against nested autograd in float64 (orders 0-4, 1e-10 of each quantity's scale, as the
other jet tests), and the parameter gradients of a Laplacian loss against nested autograd
(1e-10). The rewrite itself: which spellings it finds, which it must leave alone (a node it
would absorb has another user; not a gate), and that the plain gate is the expression bitwise.
"""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

import torchhessdiag as thd
from torchhessdiag import _graph_fuse, _rules_algebra, graph
from torchhessdiag.bench.models import ModifiedMLP, PirateNet

from _general_helpers import assert_close, oracle

SPELLINGS = {
    "(1-z)P+zQ": lambda z, P, Q: (1 - z) * P + z * Q,
    "zQ+(1-z)P": lambda z, P, Q: z * Q + (1 - z) * P,
    "P(1-z)+Qz": lambda z, P, Q: P * (1 - z) + Q * z,
    "(1.0-z)P+zQ": lambda z, P, Q: (1.0 - z) * P + z * Q,
    "torch.mul/add": lambda z, P, Q: torch.add(torch.mul(1 - z, P), torch.mul(z, Q)),
}


class Gated(nn.Module):
    """Three tanh branches mixed by a gate spelled ``spell``; ``const`` makes P a parameter (a
    constant of the jets) or the gate a parameter."""

    def __init__(self, spell, const: str = "", d: int = 3, w: int = 6):
        super().__init__()
        self.spell, self.const = SPELLINGS[spell], const
        self.a, self.b, self.c = nn.Linear(d, w), nn.Linear(d, w), nn.Linear(d, w)
        self.p = nn.Parameter(torch.randn(w))
        self.out = nn.Linear(w, 1)

    def forward(self, x):
        z = torch.sigmoid(self.a(x)) if "z" not in self.const else torch.sigmoid(self.p)
        P = torch.tanh(self.b(x)) if "P" not in self.const else self.p
        Q = torch.sin(self.c(x))
        return self.out(self.spell(z, P, Q))


def _kinds(f, x):
    return [s.kind for s in graph.get_program(f, x).steps]


def _x(d=3, n=7, seed=0):
    return torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spell", list(SPELLINGS))
def test_every_spelling_becomes_one_gate_step(spell):
    torch.manual_seed(0)
    f = Gated(spell).double()
    kinds = _kinds(f, _x())
    assert kinds.count("gate") == 1, kinds
    assert "sub" not in kinds and "mul" not in kinds and "add" not in kinds, kinds


def test_plain_gate_is_the_expression_bitwise():
    g = torch.Generator().manual_seed(1)
    z, P, Q = (torch.randn(50, 9, generator=g) for _ in range(3))
    for spell in SPELLINGS.values():
        assert torch.equal(_graph_fuse.gate(z, P, Q), spell(z, P, Q))


class _Reused(nn.Module):
    """A gate whose 1 - z (or one product) is used again: no rewrite."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what
        self.a, self.b = nn.Linear(2, 4), nn.Linear(2, 4)

    def forward(self, x):
        z, P, Q = torch.tanh(self.a(x)), torch.sin(self.b(x)), torch.cos(self.b(x))
        one_minus = 1 - z
        left = one_minus * P
        y = left + z * Q
        extra = one_minus if self.what == "one_minus" else left
        return (y * extra).sum(-1)


class _NotGates(nn.Module):
    def __init__(self, what: str):
        super().__init__()
        self.what = what
        self.a, self.b = nn.Linear(2, 4), nn.Linear(2, 4)

    def forward(self, x):
        z, w, P, Q = torch.tanh(self.a(x)), torch.sigmoid(self.a(x)), torch.sin(self.b(x)), torch.cos(self.b(x))
        if self.what == "two_minus":
            y = (2 - z) * P + z * Q
        elif self.what == "other_gate":
            y = (1 - z) * P + w * Q
        else:  # a difference, not a sum
            y = (1 - z) * P - z * Q
        return y.sum(-1)


@pytest.mark.parametrize(
    "model", [_Reused("one_minus"), _Reused("product"), _NotGates("two_minus"), _NotGates("other_gate"), _NotGates("minus")]
)
def test_no_rewrite_where_it_would_change_the_graph_or_is_no_gate(model):
    f = model.double()
    x = _x(2)
    assert "gate" not in _kinds(f, x)
    want = oracle(f, x, 4)
    assert_close(thd.axis_derivatives(f, x, 4), want, 1e-10, "axis_derivatives")
    assert_close(thd.laplacian(f, x), want[2].sum(-1), 1e-10, "laplacian")


def _models():
    torch.manual_seed(3)
    return {
        "modified_mlp": ModifiedMLP(3, 16, 4),
        "piratenet": PirateNet(3, 16, 2),
        "const_P": Gated("(1-z)P+zQ", "P"),
        "const_z": Gated("zQ+(1-z)P", "z"),
        "const_z_and_P": Gated("(1-z)P+zQ", "zP"),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_gated_models_exact_orders_0_to_4(name):
    f = _models()[name].double()
    x = _x(3)
    kinds = _kinds(f, x)
    assert "gate" in kinds
    want = oracle(f, x, 4)
    got, info = thd.axis_derivatives(f, x, 4, return_info=True)
    assert info.path == "jet", info
    assert_close(got, want, 1e-10, "axis_derivatives")
    assert_close(thd.hessian_diag(f, x), want[2], 1e-10, "hessian_diag")
    assert_close(thd.laplacian(f, x), want[2].sum(-1), 1e-10, "laplacian")
    assert_close(thd.laplacian(f, x, dims=[0, 2]), want[2][..., [0, 2]].sum(-1), 1e-10, "partial laplacian")


@pytest.mark.parametrize("name", list(_models()))
def test_gated_models_training_gradients(name):
    """Parameter gradients of a Laplacian residual loss (third derivatives) vs nested autograd."""
    f = _models()[name].double()
    x = _x(3, n=9)
    params = [p for p in f.parameters() if p.requires_grad]
    lap = thd.laplacian(f, x)
    got = torch.autograd.grad((lap - 1).square().mean(), params, allow_unused=True)
    ref = oracle(f, x, 2, create_graph=True)[2].sum(-1)
    want = torch.autograd.grad((ref - 1).square().mean(), params, allow_unused=True)
    for p, a, b in zip(params, got, want):  # None: no path from p (the output bias)
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        assert_close(a, b, 1e-10, f"grad {tuple(p.shape)}")


def test_difference_computed_once_per_pair(monkeypatch):
    """The modified MLP's four gates mix the same U and V: Q - P is one jet subtraction per call
    (and the model's own subtractions are gone with the rewrite)."""
    f = ModifiedMLP(2, 8, 4).double()
    x = _x(2)
    assert _kinds(f, x).count("gate") == 4
    calls = []
    real = _rules_algebra._rule_sub
    monkeypatch.setattr(_rules_algebra, "_rule_sub", lambda *a, **k: calls.append(1) or real(*a, **k))
    thd.laplacian(f, x)
    assert len(calls) == 1


@pytest.mark.skipif(not thd.ops.COMPILED, reason="the one-pass product op (jet2.mul) has CPU kernels only")
def test_laplacian_gates_take_the_one_pass_product(monkeypatch):
    """On the CPU a collapsed second-order gate is z (Q - P) by the one-pass product op with P
    added into its outputs in place: every gate of the modified MLP takes it (a Laplacian and its
    training gradient), P and the shared Q - P are left as they were, and the results are exact
    (the tests above check every order and path)."""
    f = ModifiedMLP(2, 8, 4).double()
    x = _x(2)
    taken, seen = [], []
    real = _rules_algebra._gate_one_pass

    def spy(ctx, z, P, D):
        before = [t.clone() for t in (P.value, *P.coefs, D.value, *D.coefs) if t is not None]
        out = real(ctx, z, P, D)
        after = [t for t in (P.value, *P.coefs, D.value, *D.coefs) if t is not None]
        seen.append(all(torch.equal(a, b) for a, b in zip(before, after)))
        taken.append(out is not None)
        return out

    monkeypatch.setattr(_rules_algebra, "_gate_one_pass", spy)
    want = oracle(f, x, 2)[2].sum(-1)
    with torch.no_grad():
        assert_close(thd.laplacian(f, x), want, 1e-10, "laplacian")
    lap = thd.laplacian(f, x)
    assert lap.requires_grad
    assert taken == [True] * 8 and all(seen)


@pytest.mark.parametrize("name", ["piratenet", "const_z"])
def test_constant_gates_take_one_lerp_per_coefficient(name, monkeypatch):
    """A gate that does not depend on the input (PirateNet's learned alpha, a parameter gate)
    mixing two jets is torch.lerp per coefficient: every such gate of the model takes that path,
    for the Laplacian and for orders 1-4, and the results are exact (the tests above check every
    order and the training gradients; swapping lerp's ends or perturbing its weight fails them)."""
    f = _models()[name].double()
    x = _x(3)
    taken = []
    real = _rules_algebra._constant_gate_lerp
    monkeypatch.setattr(_rules_algebra, "_constant_gate_lerp",
                        lambda *a: taken.append(1) or real(*a))
    want = oracle(f, x, 4)
    assert_close(thd.laplacian(f, x), want[2].sum(-1), 1e-10, "laplacian")
    n_lap = len(taken)
    assert_close(thd.axis_derivatives(f, x, 4), want, 1e-10, "axis_derivatives")
    assert n_lap == {"piratenet": 2, "const_z": 1}[name] and len(taken) == 2 * n_lap


def test_constant_gate_lerp_declines_what_it_cannot_take():
    """None (the expression as written) for a gate with a batch dim, another dtype, or a constant
    branch."""
    from torchhessdiag._jet import Context, Jet

    ctx = Context(N=4, K=2, order=2, collapsed=True)
    P = Jet(torch.randn(4, 3), [torch.randn(4, 2, 3), torch.randn(4, 3)])
    Q = Jet(torch.randn(4, 3), [torch.randn(4, 2, 3), torch.randn(4, 3)])
    lerp = _rules_algebra._constant_gate_lerp
    assert lerp(ctx, torch.rand(4, 3), P, Q) is None  # per point
    assert lerp(ctx, torch.rand(3, dtype=torch.float64), P, Q) is None  # dtype
    assert lerp(ctx, torch.rand(3), P, torch.randn(4, 3)) is None  # a constant branch
    out = lerp(ctx, 0.25, P, Q)
    torch.testing.assert_close(out.coefs[0], 0.75 * P.coefs[0] + 0.25 * Q.coefs[0])


def test_gate_target_is_classified():
    """The traced gate maps to the rule (and only the fused form does: operator.add stays add)."""
    from torchhessdiag._graph_classify import _FUNCTION_KINDS
    from torchhessdiag.taylor import RULES

    assert _FUNCTION_KINDS[_graph_fuse.gate] == "gate" and "gate" in RULES
    assert _FUNCTION_KINDS[operator.add] == "add"


def test_compiled_laplacian_of_a_gated_model_is_one_graph():
    """fullgraph torch.compile over a training step through the gates (the shared Q - P is not
    cached inside a compiled graph): one graph, the eager numbers (1e-12: the compiled jets keep
    the torch formulas, jet2.py)."""
    f = ModifiedMLP(2, 8, 3).double()
    x = _x(2)
    thd.clear_trace_cache()
    want = thd.laplacian(f, x)  # caches the program: no trace inside the compiled function
    torch._dynamo.reset()
    got = torch.compile(lambda x: thd.laplacian(f, x), fullgraph=True, backend="aot_eager")(x)
    assert_close(got, want, 1e-12, "compiled laplacian")
    g = torch.autograd.grad(got.square().mean(), list(f.parameters()), allow_unused=True)
    w = torch.autograd.grad(want.square().mean(), list(f.parameters()), allow_unused=True)
    for a, b in zip(g, w):
        if a is not None or b is not None:
            assert_close(a, b, 1e-12, "compiled gradients")


class _LinearGate(nn.Module):
    """A constant gate over two linear branches: a linear network, traced with a gate step."""

    def __init__(self):
        super().__init__()
        self.z = nn.Parameter(torch.rand(4))
        self.b, self.c, self.out = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.out((1 - self.z) * self.b(x) + self.z * self.c(x))


def test_linear_gated_net_gives_zeros_of_the_right_shape():
    f = _LinearGate().double()
    x = _x(3)
    assert "gate" in _kinds(f, x)
    want = oracle(f, x, 3)  # nested autograd: orders >= 2 are zeros
    for got in (thd.laplacian(f, x), thd.hessian_diag(f, x), thd.axis_derivatives(f, x, 3)):
        assert got is not None
    assert_close(thd.axis_derivatives(f, x, 3), want, 1e-12, "axis_derivatives")
    hd = thd.hessian_diag(f, x)
    assert hd.shape == want[2].shape and torch.count_nonzero(hd) == 0
    lap = thd.laplacian(f, x)
    assert lap.shape == want[2].sum(-1).shape and torch.count_nonzero(lap) == 0
