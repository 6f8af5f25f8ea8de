"""The benchmark suite: ``python -m torchhessdiag.bench`` (``--help`` for the options).

A grid over the device, dtype, input dimension d, hidden widths/depth, activation and number of
points N, in two modes -- inference (the Hessian diagonal and/or the Laplacian of all N points)
and a training step (a PINN-style loss mean((lap - 1)^2) and its backward to the weights) --
comparing, in one process on the same weights and points:

* ``thd.mlp_hessian_diag``, ``thd.mlp_laplacian`` and ``thd.mlp_derivatives`` (the engine), and
  the general ``thd.laplacian(f, x)`` wherever this version has it;
* nested autograd with torch.nn activations, and with the ``torchhessdiag.nn`` drop-ins;
* torch.func: vmap of hessian, and vmap of jvp-of-grad (vector-Hessian-vector products);
* a plain-PyTorch forward Laplacian / Hessian diagonal (and value + gradient + Laplacian) as
  fast as plain PyTorch allows (:mod:`torchhessdiag.bench.fwdlap`), also under torch.compile;
* jet-for-pytorch (collapsed and standard Taylor mode, and its collapsed value + gradient +
  Laplacian) where it imports (it needs Python >= 3.12: ``scripts/bench_env.sh``);
* the GEMM floor: the engine's GEMMs alone.

Every method is checked against float64 torch.func before it is timed (a mismatch is reported as
FAILED and the exit status is 1). Results go to a folder: ``report.md`` (markdown tables),
``results.json`` and ``results.jsonl`` (raw, with device, torch version, threads, load average,
the git commit), PNG plots (time and memory vs d per method, log scale). See
:mod:`torchhessdiag.bench.runner` for the steps of a block and
:mod:`torchhessdiag.bench.measure` for how time and memory are measured.

Presets: ``--quick`` (about a minute on a 2-core CPU), ``--preset cpu`` (docs/benchmarks.md's CPU
setting), ``--preset taylor`` (the Taylor-mode paper's setting: d=50, tanh
50-768-768-512-512-1, float64), ``--preset gpu`` (the full GPU grid, N up to 65536, d up to 1000
for the Laplacian; resumable in pieces with ``--out DIR --resume --max-minutes 8``), ``--preset
pinn`` (issue 13's PINN grid, CPU, 2 threads; parts pinn-train, pinn-train64, pinn-infer,
pinn-infer64, pinn-overhead; pinn-core the reported settings; pinn-tiny a smoke run), ``--preset dropin`` / ``dropin-quick``
(issue 14: nested autograd through ``torchhessdiag.nn`` drop-ins vs torch.nn, every activation;
:mod:`torchhessdiag.bench.dropin`). ``--plan`` prints a preset's blocks and a rough duration
(:mod:`torchhessdiag.bench.plan`).
"""

__all__ = ["main"]


def main(argv=None) -> int:
    """Run the benchmark command line (``argv`` as for ``python -m torchhessdiag.bench``)."""
    from .cli import main as _main

    return _main(argv)
