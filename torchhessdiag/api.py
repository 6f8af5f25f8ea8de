"""Public second-order functions for MLPs, all served by the one engine (torchhessdiag/engine.py)."""

from __future__ import annotations

import operator
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from . import engine

Tensor = torch.Tensor

__all__ = [
    "MLPDerivatives",
    "mlp_derivatives",
    "mlp_hessian_diag",
    "mlp_laplacian",
    "mlp_laplacian_hutchinson",
    "mlp_mixed_partials",
    "mlp_weighted_laplacian",
]


class MLPDerivatives(NamedTuple):
    """value (N, m), gradient (N, m, d) and the second-order quantity asked for."""

    value: Tensor
    gradient: Tensor
    second: Tensor


def _ints(seq, what: str, where: str) -> List[int]:
    """A sequence of integers (Python/numpy ints, an integer tensor) as a list of ints. Floats,
    bools and strings are refused rather than truncated (dims=[0.5] must not mean axis 0)."""
    bad = TypeError(f"{where}: {what} must be a sequence of ints, got {seq!r}")
    if isinstance(seq, Tensor):
        if seq.is_floating_point() or seq.is_complex() or seq.dtype == torch.bool or seq.dim() > 1:
            raise bad
        seq = seq.tolist()
    if isinstance(seq, (str, bytes)):
        raise bad
    try:
        items = list(seq)
    except TypeError:
        raise bad from None
    out = []
    for i in items:
        if isinstance(i, bool):
            raise bad
        try:
            out.append(operator.index(i))
        except TypeError:
            raise bad from None
    return out


def _dims_matrix(dims, d: int, x: Tensor, where: str) -> Optional[Tensor]:
    """V (d, K) selecting the coordinate axes ``dims``; None for all axes."""
    if dims is None:
        return None
    dims = _ints(dims, "dims", where)
    if not dims:
        raise ValueError(f"{where}: dims is empty; pass None for all {d} input dimensions")
    bad = [i for i in dims if not -d <= i < d]
    if bad:
        raise ValueError(f"{where}: dims {bad} out of range for x with d={d} features")
    dims = [i % d for i in dims]
    if len(set(dims)) != len(dims):
        raise ValueError(f"{where}: dims has repeated entries {dims}")
    V = x.new_zeros((d, len(dims)))
    V[dims, torch.arange(len(dims))] = 1.0
    return V


def _dims_list(dims, d: int) -> Optional[List[int]]:
    """dims (already validated by _dims_matrix) as non-negative ints, or None."""
    if dims is None:
        return None
    return [i % d for i in _ints(dims, "dims", "")]


def _setup(model, x, dims, where, chunk_size=None):
    """Parse the model, validate x (and dims, chunk_size), warn for piecewise-linear nets."""
    engine.check_chunk_size(chunk_size, where)
    layers = engine.parse_mlp(model, where)
    x2, unbatched, d = engine.check_input(layers, x, where)
    V = _dims_matrix(dims, d, x2, where)
    engine._warn_if_piecewise_linear(layers, stacklevel=4)  # points at the caller of mlp_*
    return layers, x2, unbatched, d, V, _dims_list(dims, d)


def _shape_out(t: Tensor, unbatched: bool) -> Tensor:
    return t.squeeze(0) if unbatched else t


def mlp_derivatives(
    model: nn.Module, x: Tensor, second: str = "laplacian", dims=None, *, chunk_size: Optional[int] = None
) -> MLPDerivatives:
    """Value, input gradient and a second-order quantity of an MLP, from one pass.

    Args:
        model: an ``nn.Sequential`` (nesting allowed) of ``nn.Linear``, activations of the table
            (torch.nn modules or torchhessdiag.nn drop-ins), ``nn.Identity`` and ``nn.Dropout``
            in eval mode; any number m of outputs.
        x: ``(N, d)`` points (or one unbatched ``(d,)`` point), float32/float64, on the model's
            device and dtype.
        second: ``"laplacian"`` (sum of the second derivatives over ``dims``: shape (N, m)) or
            ``"diag"`` (the Hessian diagonal over ``dims``: shape (N, m, len(dims))).
        dims: input dimensions to differentiate along (default: all), e.g. ``[1, 2, 3]`` for the
            spatial dims of (t, x, y, z). The gradient always has all d components.
        chunk_size: at most this many points are processed at a time (default: automatic chunks
            without a graph, one block with one). Results equal the unchunked ones up to the
            rounding of the GEMMs, which may depend on the number of rows (a few ulp;
            docs/input-policy.md, "Large inputs"). Without a graph the row buffers then hold at most ``chunk_size``
            points; with a graph the blocks are concatenated and the saved graph grows with N.

    Returns:
        ``MLPDerivatives(value, gradient, second)``: (N, m), (N, m, d), and the above.
    """
    if second not in ("laplacian", "diag"):
        raise ValueError(f"mlp_derivatives: second must be 'laplacian' or 'diag', got {second!r}")
    where = "torchhessdiag.mlp_derivatives"
    layers, x2, unbatched, d, V, dl = _setup(model, x, dims, where, chunk_size)
    out = engine.run(
        layers, x2, V, "sum" if second == "laplacian" else "diag", need_gradient=True,
        chunk_size=chunk_size, dims=dl,
    )
    return MLPDerivatives(
        _shape_out(out.value, unbatched),
        _shape_out(out.gradient, unbatched),
        _shape_out(out.second, unbatched),
    )


def mlp_laplacian(model: nn.Module, x: Tensor, dims=None, *, chunk_size: Optional[int] = None) -> Tensor:
    """Exact Laplacian sum_i d^2 u / dx_i^2 of an MLP at every point: shape (N, m).

    ``dims`` restricts the sum to some input dimensions (a partial Laplacian, e.g. the spatial
    dims of a (t, x, y) input). Differentiable w.r.t. the parameters (and x) when grad mode is on.
    ``chunk_size``: at most this many points at a time (see :func:`mlp_derivatives`). See
    :func:`mlp_derivatives` for the supported models.
    """
    where = "torchhessdiag.mlp_laplacian"
    layers, x2, unbatched, d, V, dl = _setup(model, x, dims, where, chunk_size)
    return _shape_out(engine.run(layers, x2, V, "sum", chunk_size=chunk_size, dims=dl).second, unbatched)


def mlp_hessian_diag(model: nn.Module, x: Tensor, dims=None, *, chunk_size: Optional[int] = None) -> Tensor:
    """Exact Hessian diagonal d^2 u / dx_i^2 of an MLP: shape (N, m, d) (or (N, m, len(dims))).

    Never builds the d x d Hessian. Differentiable w.r.t. the parameters (and x). ``chunk_size``:
    at most this many points at a time (see :func:`mlp_derivatives`).
    """
    where = "torchhessdiag.mlp_hessian_diag"
    layers, x2, unbatched, d, V, dl = _setup(model, x, dims, where, chunk_size)
    return _shape_out(engine.run(layers, x2, V, "diag", chunk_size=chunk_size, dims=dl).second, unbatched)


def mlp_weighted_laplacian(
    model: nn.Module,
    x: Tensor,
    A: Optional[Tensor] = None,
    factor: Optional[Tensor] = None,
    *,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """tr(A Hess u) for a symmetric positive semi-definite A (d, d), or A = factor @ factor.T.

    Give exactly one of ``A`` or ``factor`` (d, r). A is factorised by an eigendecomposition
    (negative eigenvalues beyond rounding raise ValueError). Shape (N, m). ``chunk_size``: at most
    this many points at a time (see :func:`mlp_derivatives`).
    """
    where = "torchhessdiag.mlp_weighted_laplacian"
    engine.check_chunk_size(chunk_size, where)
    layers = engine.parse_mlp(model, where)
    x2, unbatched, d = engine.check_input(layers, x, where)
    if (A is None) == (factor is None):
        raise ValueError(f"{where}: give exactly one of A (d, d) or factor (d, r)")
    if factor is not None:
        if not isinstance(factor, Tensor) or factor.dim() != 2 or factor.shape[0] != d:
            raise ValueError(f"{where}: factor must be a (d, r) tensor with d={d}")
        Fm = factor.to(dtype=x2.dtype, device=x2.device)
    else:
        if not isinstance(A, Tensor) or A.shape != (d, d):
            raise ValueError(f"{where}: A must be a ({d}, {d}) tensor")
        A = A.to(dtype=x2.dtype, device=x2.device)
        if not torch.allclose(A, A.t(), rtol=1e-6, atol=1e-12 * float(A.abs().max().clamp_min(1))):
            raise ValueError(f"{where}: A must be symmetric")
        evals, evecs = torch.linalg.eigh(0.5 * (A + A.t()))
        tol = evals.abs().max().clamp_min(torch.finfo(A.dtype).tiny) * d * torch.finfo(A.dtype).eps * 10
        if bool((evals < -tol).any()):
            raise ValueError(
                f"{where}: A must be positive semi-definite (smallest eigenvalue {float(evals.min()):.3g}); "
                "for an indefinite A split it as A = A+ - A- and call twice"
            )
        Fm = evecs * evals.clamp_min(0).sqrt()
    engine._warn_if_piecewise_linear(layers)
    return _shape_out(engine.run(layers, x2, Fm, "sum", chunk_size=chunk_size).second, unbatched)


def mlp_mixed_partials(
    model: nn.Module, x: Tensor, pairs: Sequence[Tuple[int, int]], *, chunk_size: Optional[int] = None
) -> Tensor:
    """Exact mixed partials d^2 u / dx_i dx_j for the requested pairs: shape (N, m, len(pairs)).

    Computed as the bilinear form e_i^T H e_j layer by layer (no polarisation, so no cancellation
    when the off-diagonal entry is small next to the diagonal ones). ``chunk_size``: at most this
    many points at a time (see :func:`mlp_derivatives`).
    """
    where = "torchhessdiag.mlp_mixed_partials"
    engine.check_chunk_size(chunk_size, where)
    layers = engine.parse_mlp(model, where)
    x2, unbatched, d = engine.check_input(layers, x, where)
    try:
        pairs = [tuple(_ints(p, "pairs", where)) for p in pairs]
    except TypeError:
        raise TypeError(f"{where}: pairs must be a sequence of (i, j) int pairs, got {pairs!r}") from None
    if any(len(p) != 2 for p in pairs):
        raise TypeError(f"{where}: pairs must be a sequence of (i, j) int pairs, got {pairs!r}")
    if not pairs:
        raise ValueError(f"{where}: pairs is empty")
    bad = [p for p in pairs if not (-d <= p[0] < d and -d <= p[1] < d)]
    if bad:
        raise ValueError(f"{where}: pairs {bad} out of range for d={d}")
    pairs = [(i % d, j % d) for i, j in pairs]
    dims = sorted({i for p in pairs for i in p})
    pos = {k: n for n, k in enumerate(dims)}
    V = _dims_matrix(dims, d, x2, where)
    a_idx = torch.tensor([pos[i] for i, _ in pairs], device=x2.device)
    b_idx = torch.tensor([pos[j] for _, j in pairs], device=x2.device)
    engine._warn_if_piecewise_linear(layers)
    out = engine.run(layers, x2, V, "pairs", pairs=(a_idx, b_idx), chunk_size=chunk_size).second
    return _shape_out(out, unbatched)


def mlp_laplacian_hutchinson(
    model: nn.Module,
    x: Tensor,
    num_samples: int = 16,
    distribution: str = "rademacher",
    generator: Optional[torch.Generator] = None,
    dims=None,
    *,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Unbiased Hutchinson estimate of the Laplacian: mean over s of v_s^T (Hess u) v_s.

    The ``num_samples`` probe vectors (Rademacher +-1 or standard Gaussian, drawn with
    ``generator``) are shared by all points of the batch; each v_s^T H v_s is exact, so the only
    error is the sampling error. Worth it for very large d (cost ~ num_samples instead of d rows).
    Shape (N, m). ``chunk_size``: at most this many points at a time (see :func:`mlp_derivatives`);
    the probes are drawn once and shared by every chunk.
    """
    where = "torchhessdiag.mlp_laplacian_hutchinson"
    engine.check_chunk_size(chunk_size, where)
    layers = engine.parse_mlp(model, where)
    x2, unbatched, d = engine.check_input(layers, x, where)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"{where}: num_samples must be an int >= 1, got {num_samples!r}")
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"{where}: distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    D = _dims_matrix(dims, d, x2, where)
    k = d if D is None else D.shape[1]
    gen_device = generator.device if generator is not None else x2.device
    if distribution == "rademacher":
        Z = torch.randint(0, 2, (k, num_samples), generator=generator, device=gen_device).to(x2.dtype) * 2 - 1
    else:
        Z = torch.randn((k, num_samples), generator=generator, device=gen_device, dtype=x2.dtype)
    Z = Z.to(device=x2.device, dtype=x2.dtype)
    V = Z if D is None else D @ Z
    engine._warn_if_piecewise_linear(layers)
    out = engine.run(layers, x2, V / num_samples**0.5, "sum", chunk_size=chunk_size).second
    return _shape_out(out, unbatched)
