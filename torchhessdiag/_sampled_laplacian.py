"""The sampled Laplacian: an unbiased estimate from S sampled axes, each second derivative exact
(``torchhessdiag.laplacian(f, x, num_samples=S)``), computed as a weighted partial Laplacian by
the dispatch of ``laplacian``.

Import direction: above ``_path_common`` and ``_dispatch``; below ``operators`` (which
re-exports ``sampled_laplacian``) and ``general``.
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional

import torch

from . import ops
from ._dispatch import _compute
from ._path_common import _dims

Tensor = torch.Tensor

#: above this d the sampled Laplacian of an MLP on the CPU takes the jets, not the MLP engine: the
#: engine's no-graph chunks are sized by S * max(width, d) elements per point, so at large d they
#: shrink to a few points and the (d, S) first layer is recomputed for each (measured here, tanh
#: 3x128, N = 256, 1 thread: d = 1e3 engine 4-42 ms vs jets 8-49 ms for S = 8-128, d = 1e4 engine
#: 23-1930 ms vs jets 17-119 ms for S = 8-200)
_SAMPLED_ENGINE_MAX_D = 2048


def sampled_laplacian(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    dims=None,
    *,
    num_samples: int,
    generator: Optional[torch.Generator] = None,
    sample_weights=None,
    fallback: Optional[str] = None,
    return_info: bool = False,
    allow_unconfirmed_zeros: bool = False,
):
    """An unbiased estimate of the Laplacian sum_(i in dims) d^2u/dx_i^2 from S = ``num_samples``
    sampled axes, each second derivative exact. ``torchhessdiag.laplacian(f, x, num_samples=S)``
    calls this.

    Sampling (the same axes for every point of the call; draw again each training step):

    * uniform (default): S distinct axes of the D = len(dims) candidates without replacement,
      estimate (D / S) sum_(s) h_(i_s) with h_i = d^2u/dx_i^2. Unbiased; variance
      D^2 sigma^2 (D - S) / (S (D - 1)) with sigma^2 = (1/D) sum_i (h_i - Delta u / D)^2 (the
      finite-population correction: S = D is exact, variance 0).
    * ``sample_weights`` (D,) > 0: S axes drawn *with* replacement with probabilities
      p_i = w_i / sum w, estimate (1/S) sum_s h_(i_s) / p_(i_s). Unbiased; variance
      (1/S) (sum_i h_i^2 / p_i - (Delta u)^2), zero when p_i is proportional to h_i (h_i >= 0).

    Cost: S directions instead of D -- S + 2 rows per point (the MLP engine or collapsed jets),
    so time and memory grow with S; d enters only the first layer (the forward x W_1 and the
    (d, S) selection). ``generator``: a ``torch.Generator`` for the draw (default: torch's
    global generator); CPU generators draw on the CPU, CUDA ones on their device.
    """
    where = "torchhessdiag.laplacian"
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise TypeError(f"{where}: num_samples must be an int >= 1, got {num_samples!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{where}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    ops.check_float_tensor(x, "x", where)
    if x.dim() not in (1, 2) or x.shape[-1] == 0:
        raise ValueError(f"{where}: x must be (N, d) or unbatched (d,) with d >= 1, got shape {tuple(x.shape)}")
    d = x.shape[-1]
    dl = _dims(dims, d, where)
    axes = list(range(d)) if dl is None else dl
    D = len(axes)
    S = int(num_samples)
    gdev = generator.device if generator is not None else torch.device("cpu")
    if sample_weights is None:
        if not 1 <= S <= D:
            raise ValueError(
                f"{where}: num_samples must be between 1 and the {D} axes summed over (uniform sampling is without "
                f"replacement; num_samples = {D} gives the exact Laplacian), got {S}"
            )
        pick = torch.randperm(D, generator=generator, device=gdev)[:S].tolist()
        chosen = sorted(axes[j] for j in pick)
        note = f"sampled Laplacian: {S} of {D} axes, uniform without replacement, scaled by {D}/{S}"
        res = _compute(
            f, x, chosen, "laplacian", 2, fallback, return_info, where, allow_zeros=allow_unconfirmed_zeros, path_note=note,
            use_engine=_engine_ok(x, d),
        )
        scale = D / S
        if return_info:
            return res[0] * scale if scale != 1 else res[0], res[1]
        return res * scale if scale != 1 else res
    if S < 1:
        raise ValueError(f"{where}: num_samples must be >= 1, got {S}")
    w = sample_weights
    if not isinstance(w, Tensor):
        try:
            w = torch.tensor(w, dtype=torch.float64)
        except (TypeError, ValueError):
            raise TypeError(
                f"{where}: sample_weights must be a (D,) tensor or sequence of positive numbers, got {type(sample_weights).__name__}"
            ) from None
    if w.dim() != 1 or w.shape[0] != D or not (w.is_floating_point() or w.dtype in (torch.int32, torch.int64)):
        raise ValueError(
            f"{where}: sample_weights must be a real (D,) tensor with D = {D} entries (one per axis of dims, in that "
            f"order), got shape {tuple(w.shape)} and dtype {w.dtype}"
        )
    w = w.detach().to(dtype=torch.float64)
    if not bool(torch.isfinite(w).all()) or not bool((w > 0).all()):
        raise ValueError(
            f"{where}: sample_weights must be finite and > 0 (an axis with weight 0 would never be sampled and the "
            "estimate would miss its term; leave such axes out with dims=)"
        )
    p = w / w.sum()
    draws = torch.multinomial(p.to(gdev), S, replacement=True, generator=generator).cpu()
    counts = torch.bincount(draws, minlength=D).to(torch.float64)
    js = [j for j in range(D) if counts[j] > 0]
    chosen = [axes[j] for j in js]
    wts = torch.tensor([float(counts[j] / (S * p[j])) for j in js], dtype=torch.float64)
    order = sorted(range(len(chosen)), key=lambda k: chosen[k])
    chosen = [chosen[k] for k in order]
    wts = wts[order]
    note = f"sampled Laplacian: {S} draws of {D} axes with replacement, probabilities from sample_weights ({len(chosen)} distinct axes)"
    return _compute(
        f, x, chosen, "laplacian", 2, fallback, return_info, where, allow_zeros=allow_unconfirmed_zeros,
        weights=wts.to(dtype=x.dtype, device=x.device), path_note=note, use_engine=_engine_ok(x, d),
    )


def _engine_ok(x: Tensor, d: int) -> bool:
    return x.device.type != "cpu" or d <= _SAMPLED_ENGINE_MAX_D
