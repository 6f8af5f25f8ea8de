"""The examples (examples/poisson.py, heat.py, plate.py, poisson_highdim.py) run, so that they cannot rot.

Each example runs in-process for a few steps on a tiny network (float64, CPU): it must finish,
write a PNG, reduce its loss, and build the same loss with torchhessdiag as with nested autograd
(the example's own check, same model and batch). The exact solutions the examples train against
are checked to satisfy their PDE and boundary/initial conditions, with the derivatives taken by
torch.func -- so a wrong hand-written source term cannot go unnoticed. No timing assertions.

And the examples of issue 16 (examples/plate.py, examples/poisson_highdim.py; was
tests/test_examples_operators.py): each runs in-process in ``--quick`` mode with tiny sizes
(float64, CPU), must finish, write a PNG and learn; the plate builds the same loss with
torchhessdiag.biharmonic as with nested autograd. Their exact solutions and source terms are
checked against torch.func, and the plate's network against its clamped boundary conditions.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import pytest
import torch

pytest.importorskip("matplotlib")

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"thd_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


poisson = _load("poisson")
heat = _load("heat")

TINY = ["--width", "16", "--depth", "2", "--batch", "128", "--test-points", "512",
        "--timing-runs", "1", "--threads", "1", "--device", "cpu", "--dtype", "float64"]


def _check_run(res, tmp_png, steps, lbfgs):
    png = pathlib.Path(res["png"])
    assert png == tmp_png and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hist = res["history"]
    assert hist.adam_steps == steps and len(hist.adam_step_s) == steps
    losses = [v for _, v in hist.loss]
    assert all(math.isfinite(v) for v in losses)
    assert len(losses) >= steps + (1 if lbfgs else 0)
    assert 0 < hist.lbfgs_iters <= lbfgs if lbfgs else hist.lbfgs_iters == 0
    # the loss falls: on one fixed batch drawn before training (so the batch-to-batch noise of
    # fresh collocation points does not enter), evaluated at step 0 and with every progress line
    fixed = [v for _, v in hist.fixed_loss]
    assert len(fixed) == len(hist.error) + 1 and all(math.isfinite(v) for v in fixed)
    assert fixed[-1] < 0.5 * fixed[0], fixed
    assert math.isfinite(res["error"]) and res["error"] > 0
    assert hist.error[0][0] == 1 and len(hist.error) >= 2
    # torchhessdiag and nested autograd build the same loss on the same model and batch; the
    # loss is a mean of squared residuals of size ~1e-1..1e1, each computed to ~1e-15 relative
    assert res["timing"]["loss_rel_diff"] < 1e-10
    assert len(res["timing"]["times_s"]["engine"]) == 1


@pytest.mark.parametrize("dim", [2, 10])
def test_poisson_runs_and_learns(tmp_path, dim, capsys):
    out = tmp_path / "p.png"
    res = poisson.main(["--dim", str(dim), "--steps", "30", "--lbfgs-steps", "20", "--lr", "1e-2",
                        "--out", str(out), "--seed", "1"] + TINY)
    _check_run(res, out, 30, 20)
    text = capsys.readouterr().out
    for needle in ("setting: device cpu", "rel.L2 err", "relative L2 error on 512 held-out points",
                   "time per Adam step", "nested autograd", "plot: "):
        assert needle in text


@pytest.mark.parametrize("dim", [1, 2])
def test_heat_runs_and_learns(tmp_path, dim, capsys):
    out = tmp_path / "h.png"
    res = heat.main(["--dim", str(dim), "--steps", "30", "--lbfgs-steps", "20", "--lr", "1e-2",
                     "--out", str(out), "--seed", "1"] + TINY)
    _check_run(res, out, 30, 20)
    assert "plot: " in capsys.readouterr().out


def test_no_lbfgs_no_timing(tmp_path):
    out = tmp_path / "p.png"
    args = list(TINY)
    args[args.index("--timing-runs") + 1] = "0"
    res = poisson.main(["--steps", "8", "--lbfgs-steps", "0", "--lr", "1e-2", "--out", str(out)] + args)
    assert res["history"].lbfgs_iters == 0 and out.exists()
    assert "times_s" not in res["timing"] and res["timing"]["loss_rel_diff"] < 1e-10


@pytest.mark.parametrize("bad", [["--steps", "-1"], ["--width", "0"], ["--dim", "0"],
                                 ["--log-every", "0"], ["--device", "nosuchdevice"]])
def test_bad_options_exit_cleanly(tmp_path, bad):
    with pytest.raises(SystemExit) as e:
        poisson.main(TINY + ["--steps", "2", "--out", str(tmp_path / "x.png")] + bad)
    assert e.value.code not in (0, None)


def test_missing_matplotlib_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(SystemExit, match="matplotlib is needed"):
        poisson._pinn.pyplot()


# ---- the exact solutions the examples train against ----------------------------------------------


@pytest.mark.parametrize("dim", [1, 2, 3, 10])
def test_poisson_exact_solution(dim):
    """source = -Δ(exact) (by torch.func.hessian), and the boundary sampler lands on the faces."""
    prob = poisson.Problem(dim, torch.device("cpu"), torch.float64)
    gen = torch.Generator().manual_seed(dim)
    x = prob.interior(64, gen)
    H = torch.func.vmap(torch.func.hessian(lambda p: prob.exact(p[None])[0]))(x)
    lap = torch.diagonal(H, dim1=1, dim2=2).sum(1)
    torch.testing.assert_close(prob.source(x), -lap, rtol=1e-12, atol=1e-12)
    xb = prob.boundary(256, gen)
    on_face = ((xb == 0) | (xb == 1)).sum(1)
    assert bool((on_face >= 1).all()) and bool(((xb >= 0) & (xb <= 1)).all())
    if dim == 2:  # the product solution vanishes on the boundary
        assert prob.exact(xb).abs().max() < 1e-15


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_heat_exact_solution(dim):
    """u_t = Δ_x u (torch.func), u(0, x) = Π sin(π x_i), u = 0 on the faces, for every t."""
    prob = heat.Problem(dim, 0.1, torch.device("cpu"), torch.float64)
    gen = torch.Generator().manual_seed(dim)
    tx = prob.interior(64, gen)
    assert bool((tx[:, 0] >= 0).all() and (tx[:, 0] <= 0.1).all())
    f = lambda p: prob.exact(p[None])[0]  # noqa: E731
    g = torch.func.vmap(torch.func.grad(f))(tx)
    H = torch.func.vmap(torch.func.hessian(f))(tx)
    lap_x = torch.diagonal(H, dim1=1, dim2=2)[:, 1:].sum(1)
    torch.testing.assert_close(g[:, 0], lap_x, rtol=1e-12, atol=1e-12)
    x0 = prob.initial(32, gen)
    torch.testing.assert_close(prob.exact(x0), torch.sin(math.pi * x0[:, 1:]).prod(1), rtol=0, atol=0)
    assert prob.exact(prob.boundary(128, gen)).abs().max() < 1e-15


def test_heat_time_scaling_layer_is_exact():
    """The frozen (t / T, x) layer in front of the heat model does not change what is
    differentiated: u_t and Δ_x u from mlp_derivatives match torch.func on the whole model."""
    import torchhessdiag as thd

    torch.manual_seed(3)
    model = heat.make_model(2, 0.1, 12, 2).double()
    assert not model[0].weight.requires_grad
    tx = torch.rand(16, 3, dtype=torch.float64) * torch.tensor([0.1, 1.0, 1.0], dtype=torch.float64)
    out = thd.mlp_derivatives(model, tx, second="laplacian", dims=[1, 2])
    f = lambda p: model(p[None])[0, 0]  # noqa: E731
    g = torch.func.vmap(torch.func.grad(f))(tx)
    H = torch.func.vmap(torch.func.hessian(f))(tx)
    torch.testing.assert_close(out.gradient[:, 0], g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.second[:, 0], H[:, 1, 1] + H[:, 2, 2], rtol=1e-12, atol=1e-12)


# ---- the examples of issue 16: plate.py, poisson_highdim.py (was tests/test_examples_operators.py) ---
plate = _load("plate")
highdim = _load("poisson_highdim")

TINY_QUICK = ["--quick", "--width", "12", "--depth", "2", "--batch", "64", "--test-points", "256",
        "--threads", "1", "--device", "cpu", "--dtype", "float64", "--seed", "1"]


def _png(res, path):
    png = pathlib.Path(res["png"])
    assert png == path and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plate_runs_and_learns(tmp_path, capsys):
    out = tmp_path / "plate.png"
    res = plate.main(TINY_QUICK + ["--steps", "30", "--lbfgs-steps", "15", "--lr", "1e-2", "--timing-runs", "1", "--out", str(out)])
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
    res = highdim.main(TINY_QUICK + ["--dim", "40", "--samples", "4", "--steps", "120", "--lr", "3e-2",
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
        highdim.main(TINY_QUICK + ["--dim", "40", "--steps", "2", "--out", str(tmp_path / "x.png")] + bad)
