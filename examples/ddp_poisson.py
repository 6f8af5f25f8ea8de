"""Data-parallel PINN training with torchhessdiag and DistributedDataParallel (DDP).

The 2-D Poisson problem of examples/poisson.py (-Δu = f on [0, 1]², u = sin(πx) sin(πy),
u = 0 on the boundary), trained by several processes at once: each rank draws its own share of
the collocation points every step, DDP averages the parameter gradients across the ranks, so
every rank takes the same Adam step -- as one process would on all the points together.

    torchrun --standalone --nproc_per_node=2 examples/ddp_poisson.py                # 2 CPU processes (gloo)
    torchrun --standalone --nproc_per_node=4 examples/ddp_poisson.py --device cuda  # 4 GPUs (nccl)

The one thing to get right: DDP all-reduces the gradients of what runs through *its* forward.
So the loss (with the Laplacian from torchhessdiag) is computed inside a module's ``forward``
(:class:`PoissonLoss`), and that module is what DDP wraps and what each step calls. Calling
``torchhessdiag.mlp_laplacian(ddp.module, x)`` outside the DDP forward would give every rank
only its local gradients, without any error (the library refuses a DDP wrapper itself with a
TypeError saying this). The interior term alone does not use the output layer's bias (a
Laplacian does not see a constant), so with a residual-only loss pass
``find_unused_parameters=True``; this loss also has the boundary term, which uses every
parameter, so DDP's default works.

Each rank takes ``--batch`` interior points and ``--batch // 2`` boundary points per step, so the
global batch is world_size times that; with equal shares, the average of the ranks' gradients
of their mean losses is the gradient of the mean loss over all points.

At the end, rank 0 prints the relative L2 error and whether the parameters are bitwise identical
on every rank (they must be: same start, same averaged gradients, same Adam steps).

Measured (the defaults: tanh 3x32, float64, 256 interior + 128 boundary points per rank and step,
2000 Adam steps; 2 CPU processes of one thread each, 2-core AMD EPYC, torch 2.13.0): 13.3 s,
relative L2 error 6.7e-3, parameters identical on both ranks. tests/test_distributed.py runs it
for 30 steps.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torchhessdiag as thd

PI = math.pi


def exact(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(PI * x[:, 0]) * torch.sin(PI * x[:, 1])


def source(x: torch.Tensor) -> torch.Tensor:
    """f = -Δu = 2π² sin(πx) sin(πy)."""
    return 2 * PI**2 * exact(x)


def mlp(width: int = 32, depth: int = 3, seed: int = 0) -> nn.Sequential:
    """A tanh MLP (2 -> width x depth -> 1), float64, the same on every rank (seeded)."""
    torch.manual_seed(seed)
    layers, d = [], 2
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 1)).double()


class PoissonLoss(nn.Module):
    """The PINN loss as a module, so that DDP's forward sees it (and arms the gradient all-reduce).

    forward(x_int, x_bnd) -> (mean (-Δu - f)² over x_int, mean (u - 0)² over x_bnd)."""

    def __init__(self, net: nn.Sequential):
        super().__init__()
        self.net = net

    def forward(self, x_int: torch.Tensor, x_bnd: torch.Tensor):
        residual = -thd.mlp_laplacian(self.net, x_int)[:, 0] - source(x_int)
        boundary = self.net(x_bnd)[:, 0]
        return residual.pow(2).mean(), boundary.pow(2).mean()


def boundary_points(n: int, gen: torch.Generator) -> torch.Tensor:
    """n points on the four edges of the unit square."""
    t = torch.rand(n, generator=gen, dtype=torch.float64)
    side = torch.randint(0, 4, (n,), generator=gen)
    x = torch.stack([t, torch.zeros_like(t)], 1)
    x[side == 1] = torch.stack([t, torch.ones_like(t)], 1)[side == 1]
    x[side == 2] = torch.stack([torch.zeros_like(t), t], 1)[side == 2]
    x[side == 3] = torch.stack([torch.ones_like(t), t], 1)[side == 3]
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=256, help="interior points per rank and step")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-3, help="Adam's learning rate, decaying to a tenth")
    p.add_argument("--bc-weight", type=float, default=100.0)
    p.add_argument("--log-every", type=int, default=200)
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per rank)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per CPU process")
    args = p.parse_args()

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_*
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        torch.set_num_threads(args.threads)
        device = torch.device("cpu")

    net = mlp(args.width, args.depth).to(device)
    loss_module = DDP(PoissonLoss(net), device_ids=[device.index] if cuda else None)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.1 ** (1 / max(1, args.steps)))  # to lr/10
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own points
    t0 = time.perf_counter()
    stats = None
    for step in range(1, args.steps + 1):
        x_int = torch.rand(args.batch, 2, generator=gen, dtype=torch.float64).to(device)
        x_bnd = boundary_points(args.batch // 2, gen).to(device)
        pde, bc = loss_module(x_int, x_bnd)  # through DDP's forward
        loss = pde + args.bc_weight * bc
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over the ranks here
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == args.steps:
            stats = torch.stack([loss.detach(), pde.detach(), bc.detach()])
            dist.all_reduce(stats)  # for printing only: the mean over the ranks
            stats /= world
            if rank == 0:
                print(f"step {step:5d}  loss {stats[0]:.3e}  pde {stats[1]:.3e}  bc {stats[2]:.3e}", flush=True)
    elapsed = time.perf_counter() - t0

    flat = torch.cat([q.detach().reshape(-1) for q in net.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        xt = torch.rand(4096, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(device)
        with torch.no_grad():
            u = net(xt)[:, 0]
        err = ((u - exact(xt)).norm() / exact(xt).norm()).item()
        print(f"ranks {world}, {args.steps} steps, {elapsed:.1f} s; relative L2 error {err:.2e}")
        print(f"parameters identical on all ranks: {same}")
    # Tear down together (a rank that destroyed its gloo group while rank 0 was still busy
    # sometimes aborted at exit: "terminate called without an active exception", torch 2.14.1),
    # and in this order: DDP first, then the group, while every tensor a collective saw is still
    # referenced here. Otherwise the group's destructor (run under the GIL when the last
    # reference goes, e.g. DDP's at function exit) joins gloo's worker threads while one of them
    # frees a finished collective whose tensors' Python objects are gone -- which needs the GIL:
    # a deadlock at exit, seen in ~1 of 8 runs with torch 2.13 (gdb: ~ProcessGroupGloo joining,
    # the worker in ~AsyncAllgatherWork -> decref_pyobject -> waiting for the GIL).
    dist.barrier()
    del loss_module
    dist.destroy_process_group()
    del stats, flat, gathered  # only now (see above)


if __name__ == "__main__":
    main()
