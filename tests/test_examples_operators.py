"""The examples of issue 16 run (examples/plate.py, examples/poisson_highdim.py), so that they
cannot rot: each runs in-process in ``--quick`` mode with tiny sizes (float64, CPU), must finish,
write a PNG and learn; the plate builds the same loss with torchhessdiag.biharmonic as with nested
autograd. The exact solutions and source terms are checked against torch.func, and the plate's
network against its clamped boundary conditions. No timing assertions."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest
import torch

pytest.importorskip("matplotlib")

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"thd_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


plate = _load("plate")
highdim = _load("poisson_highdim")

TINY = ["--quick", "--width", "12", "--depth", "2", "--batch", "64", "--test-points", "256",
        "--threads", "1", "--device", "cpu", "--dtype", "float64", "--seed", "1"]


def _png(res, path):
    png = pathlib.Path(res["png"])
    assert png == path and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plate_runs_and_learns(tmp_path, capsys):
    out = tmp_path / "plate.png"
    res = plate.main(TINY + ["--steps", "30", "--lbfgs-steps", "15", "--lr", "1e-2", "--timing-runs", "1", "--out", str(out)])
    _png(res, out)
    hist = res["history"]
    fixed = [v for _, v in hist.fixed_loss]
    assert all(math.isfinite(v) for v in fixed) and fixed[-1] < 0.5 * fixed[0], fixed
    assert hist.lbfgs_iters > 0 and math.isfinite(res["error"])
    # torchhessdiag.biharmonic and nested autograd's Δ(Δu) give the same loss (each ~1e-15 relative)
    assert res["timing"]["loss_rel_diff"] < 1e-10
    text = capsys.readouterr().out
    for needle in ("setting: device cpu", "rel.L2 err", "relative L2 error on 256 held-out points",
                   "time per Adam step", "nested autograd", "plot: ", "path: traced graph"):
        assert needle in text


def test_plate_exact_solution_and_clamped_network():
    """f = Δ²(exact) (torch.func, fourth derivatives), u = ∂u/∂n = 0 on the edges, and the
    network's built-in factor makes u_θ and ∇u_θ vanish there for any weights."""
    prob = plate.Problem(torch.device("cpu"), torch.float64)
    x = prob.interior(32, torch.Generator().manual_seed(0))
    one = lambda p: prob.exact(p[None])[0]  # noqa: E731
    T4 = torch.func.vmap(torch.func.jacfwd(torch.func.jacfwd(torch.func.jacrev(torch.func.jacrev(one)))))(x)
    torch.testing.assert_close(prob.source(x), torch.einsum("niijj->n", T4), rtol=1e-12, atol=1e-9)
    t = torch.rand(20, dtype=torch.float64)
    edges = torch.cat([torch.stack([t, 0 * t], 1), torch.stack([t, 0 * t + 1], 1),
                       torch.stack([0 * t, t], 1), torch.stack([0 * t + 1, t], 1)])
    net = plate.ClampedNet(8, 2).double()
    for fn in (lambda p: prob.exact(p[None])[0], lambda p: net(p[None])[0, 0]):
        vals = torch.stack([fn(p) for p in edges])
        grads = torch.func.vmap(torch.func.grad(fn))(edges)
        assert vals.abs().max() < 1e-14 and grads.abs().max() < 1e-12


def test_highdim_runs_and_learns(tmp_path, capsys):
    out = tmp_path / "hd.png"
    res = highdim.main(TINY + ["--dim", "40", "--samples", "4", "--steps", "120", "--lr", "3e-2",
                               "--timing-runs", "1", "--residual-points", "16", "--out", str(out)])
    _png(res, out)
    hist = res["history"]
    errs = [e for _, e in hist.error]
    assert all(math.isfinite(e) for e in errs) and errs[-1] < 0.8 * errs[0], errs
    assert math.isfinite(res["residual"]) and set(res["timing"]["median_s"]) == {"engine", "exact"}
    text = capsys.readouterr().out
    for needle in ("4 of 40 axes", "rel.L2 err", "PDE residual with the exact Laplacian", "exact / sampled", "plot: "):
        assert needle in text


def test_highdim_source_is_minus_the_laplacian():
    prob = highdim.Problem(9, torch.device("cpu"), torch.float64)
    x = prob.interior(16, torch.Generator().manual_seed(2))
    H = torch.func.vmap(torch.func.hessian(lambda p: prob.exact(p[None])[0]))(x)
    torch.testing.assert_close(prob.source(x), -H.diagonal(dim1=1, dim2=2).sum(1), rtol=1e-12, atol=1e-12)
    xb = prob.boundary(64, torch.Generator().manual_seed(3))
    assert bool((((xb == 0) | (xb == 1)).sum(1) >= 1).all())


def test_highdim_loss_is_unbiased():
    """The PDE term mean(r1 r2) from two independent sampled Laplacians: its mean over seeded
    draws is the squared residual with the exact Laplacian (within 5 standard errors)."""
    prob = highdim.Problem(12, torch.device("cpu"), torch.float64)
    model = highdim.ResNet(12, 8, 1).double()
    g = torch.Generator().manual_seed(4)
    x = prob.interior(8, g)
    batch = {"interior": x, "f": prob.source(x), "boundary": x[:2], "g": prob.exact(x[:2])}
    axes = torch.Generator().manual_seed(5)
    loss_fn = highdim.make_loss(prob, 0.0, 3, axes)
    with torch.no_grad():
        exact = float(loss_fn(model, batch, "exact")[1]["pde"])
        draws = torch.tensor([float(loss_fn(model, batch, "engine")[1]["pde"]) for _ in range(400)])
    se = float(draws.std()) / math.sqrt(len(draws))
    assert abs(float(draws.mean()) - exact) <= 5 * se, (float(draws.mean()), exact, se)


@pytest.mark.parametrize("bad", [["--samples", "0"], ["--samples", "41"], ["--lbfgs-steps", "3"], ["--dim", "1"]])
def test_highdim_bad_options(tmp_path, bad):
    with pytest.raises(SystemExit):
        highdim.main(TINY + ["--dim", "40", "--steps", "2", "--out", str(tmp_path / "x.png")] + bad)
