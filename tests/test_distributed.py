"""Beyond one machine (issue 7, item 6): training with torchhessdiag inside
torch.nn.parallel.DistributedDataParallel, collocation points sharded across ranks.

Two CPU processes (gloo backend, a file:// rendezvous in tmp_path) each take their half of a fixed
set of collocation points, compute a PINN loss with the library, and backpropagate once; the
parameter gradients DDP leaves on every rank must equal those of one process on all the points.
The worker is this file run as a script (``python tests/test_distributed.py RANK WORLD STORE OUT``);
it saves what it saw and the test compares.

What the worker checks, each with a fresh model and DDP wrapper:

* ``recipe``: the README/examples/ddp_poisson.py recipe -- the loss computed inside the forward of
  a module (``PoissonLoss``: interior residual through ``mlp_laplacian`` plus a boundary term) that
  DDP wraps, with DDP's defaults;
* ``residual_find_unused``: a residual-only loss (the output bias does not enter a Laplacian, so
  it gets no gradient) with ``find_unused_parameters=True``, for two iterations;
* ``general``: the same with ``torchhessdiag.laplacian`` on a non-Sequential (traced, jet path)
  model;
* the pitfalls the README warns about, so that the warning stays true: a residual-only loss with
  DDP's default ``find_unused_parameters=False`` is *not* all-reduced in its first step (the bucket
  holding the unused bias never completes) and the next forward raises; calling
  ``mlp_laplacian(ddp.module, x)`` outside DDP's forward leaves every rank with its local
  gradients; and the library refuses the DDP wrapper itself with a TypeError naming the recipe.

Tolerance, all-reduced vs one process: 1e-12 of the largest |entry| of each gradient tensor
(float64). The two computations differ only in how the per-point terms are grouped: two means
over 16 points averaged by the all-reduce vs one mean over 32, and GEMMs over 16 rows vs 32 (MKL
may block them differently). Each is a few ulp (~1e-16) of the summed terms, which are of the size
of the result here; observed ~1e-16 relative. A gradient that was not all-reduced is off by
O(1) relative (the ranks' halves differ), so 1e-12 separates the two cases by far.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

import torchhessdiag as thd

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ddp_poisson.py"
WORLD = 2
BC_WEIGHT = 10.0
TOL = 1e-12


def _gloo_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


pytestmark = pytest.mark.skipif(
    not _gloo_available(), reason="torch.distributed with the gloo backend is not available in this torch build"
)


# ---- shared by the worker and the test -------------------------------------------------------------


def _example():
    spec = importlib.util.spec_from_file_location("thd_example_ddp_poisson", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _data():
    """32 interior and 16 boundary collocation points (all ranks and the reference build the same)."""
    ex = _example()
    g = torch.Generator().manual_seed(123)
    return torch.rand(32, 2, generator=g, dtype=torch.float64), ex.boundary_points(16, g)


def _net():
    return _example().mlp(width=8, depth=2, seed=0)


def _general_net() -> nn.Module:
    """A non-Sequential model (residual block, product with an input coordinate): jet path."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _random_models import ACT_BY_LABEL, build_residual

    model, _ = build_residual(2, 8, 1, [ACT_BY_LABEL["tanh"], ACT_BY_LABEL["gelu"]], product=True, seed=3)
    return model


class ResidualOnly(nn.Module):
    """mean (-Δu - f)² with the Laplacian from mlp_laplacian (engine) or laplacian (any model)."""

    def __init__(self, net: nn.Module, general: bool = False):
        super().__init__()
        self.net, self.general = net, general

    def forward(self, x):
        ex = _example()
        lap = thd.laplacian(self.net, x) if self.general else thd.mlp_laplacian(self.net, x)
        return (-lap[:, 0] - ex.source(x)).pow(2).mean()


def _grads(model: nn.Module):
    """Parameter gradients; None (never reached by autograd) as NaN-free zeros, flagged."""
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in model.parameters()], [
        p.grad is None for p in model.parameters()
    ]


# ---- the worker (one rank) ---------------------------------------------------------------------------


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    ex = _example()
    x_int, x_bnd = _data()
    xi, xb = x_int.chunk(world)[rank], x_bnd.chunk(world)[rank]
    out = {}

    # the recipe: the loss inside the forward of the module DDP wraps (all parameters used)
    net = _net()
    ddp = DDP(ex.PoissonLoss(net))
    pde, bc = ddp(xi, xb)
    (pde + BC_WEIGHT * bc).backward()
    out["recipe"] = _grads(net)

    # residual-only loss: the output bias is unused -> find_unused_parameters=True; two steps
    net = _net()
    ddp = DDP(ResidualOnly(net), find_unused_parameters=True)
    ddp(xi).backward()
    out["residual_find_unused"] = _grads(net)
    net.zero_grad(set_to_none=True)
    ddp(xi).backward()
    out["residual_find_unused_step2"] = _grads(net)

    # any model through the general laplacian (jet path), the same way
    gnet = _general_net()
    ddp = DDP(ResidualOnly(gnet, general=True), find_unused_parameters=True)
    ddp(xi).backward()
    out["general"] = _grads(gnet)
    out["general_path"] = thd.explain(gnet, xi).path

    # pitfall 1: residual-only loss with DDP's default find_unused_parameters=False
    net = _net()
    ddp = DDP(ResidualOnly(net))
    ddp(xi).backward()
    out["residual_default"] = _grads(net)
    try:
        ddp(xi)
        out["residual_default_step2"] = ""
    except RuntimeError as e:
        out["residual_default_step2"] = str(e)

    # pitfall 2: the library called on ddp.module, outside DDP's forward
    net = _net()
    ddp = DDP(ResidualOnly(net), find_unused_parameters=True)
    (-thd.mlp_laplacian(ddp.module.net, xi)[:, 0] - ex.source(xi)).pow(2).mean().backward()
    out["bypass"] = _grads(net)

    # the wrapper itself is refused, with the recipe in the message
    wrapped = DDP(_net())
    for name, fn in (("mlp_laplacian", thd.mlp_laplacian), ("laplacian", thd.laplacian)):
        try:
            fn(wrapped, xi)
            out[f"refused_{name}"] = ""
        except TypeError as e:
            out[f"refused_{name}"] = str(e)

    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    # the teardown order of examples/ddp_poisson.py (see there: DDP before the group, or the
    # group's destructor can deadlock with a gloo worker thread at exit)
    dist.barrier()
    del ddp, wrapped
    dist.destroy_process_group()


# ---- the test --------------------------------------------------------------------------------------------


def _reference(make, loss_of):
    """Parameter gradients of one process: loss_of(model) on the given points, plain backward."""
    model = make()
    loss_of(model).backward()
    return _grads(model)


def _assert_close(got, ref, what: str) -> None:
    (g, g_none), (r, r_none) = got, ref
    assert g_none == r_none, f"{what}: parameters without a gradient differ: {g_none} vs {r_none}"
    for i, (a, b) in enumerate(zip(g, r)):
        scale = b.abs().max().item()
        err = (a - b).abs().max().item()
        assert err <= TOL * max(scale, 1e-300), f"{what}: parameter {i}: |diff| {err:.3g}, scale {scale:.3g}"


def _differs(got, ref) -> bool:
    return any((a - b).abs().max().item() > 1e-6 * max(b.abs().max().item(), 1e-300) for a, b in zip(got[0], ref[0]))


def _env(**extra) -> dict:
    """The subprocesses import the torchhessdiag this test imported: an installed package, or a
    source tree that pytest's rootdir put on sys.path (CI's CUDA-build check runs from a copy that is
    not installed), so its parent folder goes first on PYTHONPATH."""
    pkg_parent = str(pathlib.Path(thd.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, PYTHONWARNINGS="ignore", **extra)


def _run_workers(tmp_path: pathlib.Path):
    env = _env(OMP_NUM_THREADS="1")
    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, str(pathlib.Path(__file__).resolve()), str(r), str(WORLD), str(store), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(ROOT),
        )
        for r in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0].decode(errors="replace"))
    finally:
        for p in procs:  # only our own two processes
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed (exit {p.returncode}):\n{log[-4000:]}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ddp_gloo_two_processes_match_one_process(tmp_path):
    ranks = _run_workers(tmp_path)
    ex = _example()
    x_int, x_bnd = _data()

    def poisson(model):
        pde, bc = ex.PoissonLoss(model)(x_int, x_bnd)
        return pde + BC_WEIGHT * bc

    ref_recipe = _reference(_net, poisson)
    ref_residual = _reference(_net, lambda m: ResidualOnly(m)(x_int))
    ref_general = _reference(_general_net, lambda m: ResidualOnly(m, general=True)(x_int))
    local = [_reference(_net, lambda m, r=r: ResidualOnly(m)(x_int.chunk(WORLD)[r])) for r in range(WORLD)]
    assert _differs(local[0], ref_residual) and _differs(local[1], ref_residual)  # the halves do differ
    assert ref_residual[1][-1], "the output bias should get no gradient from a Laplacian-only loss"

    for r, out in enumerate(ranks):
        # the recipe and its variants: every rank holds the all-points gradient
        _assert_close(out["recipe"], ref_recipe, f"rank {r} recipe")
        assert not any(out["recipe"][1]), "every parameter is used by the recipe's loss"
        _assert_close(out["residual_find_unused"], ref_residual, f"rank {r} residual, find_unused_parameters")
        _assert_close(out["residual_find_unused_step2"], ref_residual, f"rank {r} residual, second step")
        _assert_close(out["general"], ref_general, f"rank {r} general laplacian")
        assert out["general_path"] == "jet"
        # the pitfalls: local gradients only, silently (and for the default DDP, an error one step later)
        _assert_close(out["residual_default"], local[r], f"rank {r} residual, DDP defaults (not all-reduced)")
        assert "find_unused_parameters" in out["residual_default_step2"]
        _assert_close(out["bypass"], local[r], f"rank {r} mlp_laplacian(ddp.module) (not all-reduced)")
        for name in ("mlp_laplacian", "laplacian"):
            msg = out[f"refused_{name}"]
            assert "DistributedDataParallel" in msg and "forward" in msg and "find_unused_parameters=True" in msg, msg
    # DDP keeps the ranks in step: bitwise the same all-reduced gradients on both
    for key in ("recipe", "residual_find_unused", "general"):
        for a, b in zip(ranks[0][key][0], ranks[1][key][0]):
            assert torch.equal(a, b), key


def test_ddp_example_with_torchrun():
    """The README's command line, shortened: torchrun with 2 CPU processes runs the example to the
    end (finite losses), and the parameters are bitwise identical on both ranks afterwards (they
    would drift apart if the gradients were not all-reduced: each rank has its own points)."""
    env = _env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EXAMPLE),
           "--steps", "30", "--batch", "64", "--width", "16", "--depth", "2", "--log-every", "10"]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), timeout=240)
    log = p.stdout.decode(errors="replace")
    assert p.returncode == 0, log[-4000:]
    assert "parameters identical on all ranks: True" in log, log[-4000:]
    losses = [float(line.split()[3]) for line in log.splitlines() if line.startswith("step ")]
    # 30 steps are too few for a loss that surely decreases; the gradients are checked above
    assert len(losses) == 3 and all(loss == loss and loss < float("inf") for loss in losses), log[-4000:]


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
