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


@pytest.fixture(params=["fused", "reverse"])
def engine_path(request, monkeypatch):
    """Run a test once through each propagation of the MLP engine: the fused forward op
    (torchhessdiag/fused.py, where the call qualifies) and the K+2-row reverse sweep
    (torchhessdiag/engine.py). Modules use it with ``pytestmark = pytest.mark.usefixtures(...)``."""
    from torchhessdiag import engine

    monkeypatch.setattr(engine, "FUSED_ENABLED", request.param == "fused")
    return request.param


@pytest.fixture
def reverse_path(request, monkeypatch):
    """Force the K+2-row reverse sweep (tests of its own internals: chunks, buffers, ops). In a
    module that runs both propagations, the test's "fused" instance is skipped."""
    from torchhessdiag import engine

    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("engine_path") == "fused":
        pytest.skip("a test of the reverse sweep's internals")
    monkeypatch.setattr(engine, "FUSED_ENABLED", False)


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


# ---- --slow and the hypothesis profiles (issue 7: hardening) ----------------------------------
#
# ``pytest --slow`` (or TORCHHESSDIAG_SLOW=1) runs the tests marked ``@pytest.mark.slow`` (wider
# compile variants, the > 2^31-element kernel test, ...) and selects the wide hypothesis profile.
# Hypothesis profiles: "fast" (default; CI) and "slow" (many more examples); HYPOTHESIS_PROFILE
# picks one explicitly. Both are derandomized, so a run is reproducible.

import os  # noqa: E402

try:
    from hypothesis import HealthCheck, settings as _hyp_settings
except ImportError:  # hypothesis is a test dependency; tests/test_properties.py skips without it
    _hyp_settings = None
else:
    _common = dict(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    _hyp_settings.register_profile("fast", max_examples=20, **_common)
    _hyp_settings.register_profile("slow", max_examples=300, **_common)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False, help="also run the tests marked slow")


def _slow_enabled(config) -> bool:
    return bool(config.getoption("--slow")) or os.environ.get("TORCHHESSDIAG_SLOW", "") not in ("", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a slow test, run only with --slow (or TORCHHESSDIAG_SLOW=1)")
    if _hyp_settings is not None:
        default = "slow" if _slow_enabled(config) else "fast"
        _hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", default))


def pytest_collection_modifyitems(config, items):
    if _slow_enabled(config):
        return
    skip = pytest.mark.skip(reason="slow test: run with --slow (or TORCHHESSDIAG_SLOW=1)")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)
