"""Shared pytest fixtures for the torchhessdiag test-suite.

``device``: every test that touches tensors takes this fixture, so it runs on the CPU always and,
where ``torch.cuda.is_available()``, once more on the GPU. On a CUDA machine whose extension was
built without CUDA kernels the CUDA runs exercise the pure-PyTorch reference kernels (that is
how the library serves such tensors), so both paths are covered by the same tests.
"""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """The device a tensor test runs on: "cpu", and "cuda" when a GPU is visible."""
    return torch.device(request.param)


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread, restoring the setting afterwards.

    For tests on small tensors (below the kernels' parallel grain of 2048 elements, so no
    parallel code path is lost): on a loaded or CPU-stolen 2-core machine, OpenMP's spin-waiting
    in tiny GEMMs and elementwise ops makes them up to ~100x slower with 2 threads than with 1.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
