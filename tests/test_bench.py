"""Smoke tests of the benchmark harness (python -m torchhessdiag.bench) on tiny grids.

No timing is asserted: what is checked is that every method is verified before it is timed,
that a wrong method is reported as FAILED with a non-zero exit status, and that the output
files (markdown, raw JSON, JSONL, plots) are written and resumable.
"""

import json
import os

import pytest
import torch
from torch import nn

from torchhessdiag.bench import cli, methods

TINY = ["--device", "cpu", "--dtype", "float64", "--width", "8", "--depth", "2", "--n", "12",
        "--repeats", "1", "--budget", "20", "--method-budget", "0.5", "--check-n", "4",
        "--no-progress"]
CORE = ["thd_diag", "thd_lap", "nested", "nested_dropin", "func_hessian", "func_jvp",
        "fwd_diag", "fwd_lap"]


def _run(tmp_path, *extra, methods_=CORE):
    argv = TINY + ["--out", str(tmp_path)] + list(extra)
    if methods_:
        argv += ["--methods", *methods_]
    return cli.main(argv)


def _records(tmp_path):
    with open(tmp_path / "results.json") as f:
        return json.load(f)


def test_tiny_grid_outputs_and_checks(tmp_path, capsys):
    rc = _run(tmp_path, "--d", "2", "5", "--modes", "inference", "train")
    assert rc == 0, capsys.readouterr().err
    for name in ("report.md", "results.json", "results.jsonl"):
        assert (tmp_path / name).stat().st_size > 0
    data = _records(tmp_path)
    assert data["ok"] and data["complete"]
    assert data["env"]["torch"] == torch.__version__ and "commit" in data["env"]["git"]
    assert data["env"]["threads"] == torch.get_num_threads()
    recs = data["records"]
    assert len(recs) == 4  # 2 d x 2 modes
    for r in recs:
        mode = r["setting"]["mode"]
        want = [k for k in CORE if mode in methods.METHODS[k].modes]
        # every method was checked in float64 against torch.func, and passed
        checked = {k.split(":")[0] for k in r["check_float64"]["errors"]}
        assert checked == set(want)
        assert all(e <= 1e-10 for e in r["check_float64"]["errors"].values())
        assert all(e <= r["full_check"]["tol"] for e in r["full_check"]["errors"].values())
        # and timed, with the floor
        assert set(want) <= set(r["stats_s"])
        assert any(k.startswith("floor") for k in r["stats_s"])
        assert r["loadavg_before"] is not None and r["threads"] >= 1
        assert set(want) <= set(r["memory"])
    report = (tmp_path / "report.md").read_text()
    assert "thd.mlp_laplacian" in report and "GEMM floor" in report and "FAILED" not in report
    pytest.importorskip("matplotlib")
    pngs = [p for p in os.listdir(tmp_path) if p.endswith(".png")]
    assert any(p.startswith("time_") for p in pngs) and any(p.startswith("memory_") for p in pngs)


def test_wrong_method_is_reported_failed(tmp_path, monkeypatch, capsys):
    m = methods.METHODS["fwd_lap"]
    orig = m.inference

    def wrong(ctx, x):
        f = orig(ctx, x)
        return lambda: {"lap": f()["lap"] * (1 + 1e-6)}  # a relative error of 1e-6

    monkeypatch.setattr(m, "inference", wrong)
    rc = _run(tmp_path, "--d", "3", "--modes", "inference", methods_=["thd_lap", "fwd_lap"])
    assert rc == 1
    rec = _records(tmp_path)["records"][0]
    assert "fwd_lap" in rec["failed"] and "fwd_lap" not in rec["stats_s"]
    assert "thd_lap" in rec["stats_s"]
    assert "**FAILED** plain fwd Laplacian" in (tmp_path / "report.md").read_text()


def test_resume_and_time_limit(tmp_path):
    assert _run(tmp_path, "--d", "2", "--modes", "inference", methods_=["thd_lap"]) == 0
    # --max-minutes 0: no block starts, exit status 3, the finished block is kept
    assert _run(tmp_path, "--d", "2", "3", "--modes", "inference", "--resume",
                "--max-minutes", "0", methods_=["thd_lap"]) == 3
    assert not _records(tmp_path)["complete"]
    assert _run(tmp_path, "--d", "2", "3", "--modes", "inference", "--resume",
                methods_=["thd_lap"]) == 0
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(s)["setting"]["d"] for s in lines] == [2, 3]  # d=2 ran once


def test_unavailable_methods_are_skipped_with_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(methods.METHODS["jet"], "available", lambda: "not installed (test)")
    assert _run(tmp_path, "--d", "2", "--modes", "inference", methods_=["thd_lap", "jet"]) == 0
    rec = _records(tmp_path)["records"][0]
    assert rec["skipped"]["jet"] == "not installed (test)"


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "silu", "softplus"])
def test_yardsticks_match_torch_func(act):
    """The plain forward Laplacian / Hessian diagonal and vmap(jvp of grad), float64."""
    model = methods.build_base(4, [7, 5], act, seed=3).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    ref_diag, ref_lap = methods.func_hessian(model, x)
    scale = ref_diag.abs().max()
    assert (methods.plain_forward(model, x, True) - ref_diag).abs().max() <= 1e-12 * scale
    assert (methods.plain_forward(model, x, False) - ref_lap).abs().max() <= 1e-12 * scale
    diag, lap = methods.func_jvp_grad(model, x)
    assert (diag - ref_diag).abs().max() <= 1e-12 * scale
    assert (lap - ref_lap).abs().max() <= 1e-12 * scale


def test_floor_runs_the_gemms():
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(5, 3)
    for train in (False, True):
        methods.floor_fn(model, x, K=3, train=train)()


def test_out_of_memory_is_a_skip_not_a_failure(tmp_path, monkeypatch):
    m = methods.METHODS["fwd_diag"]
    orig = m.inference

    def oom_at_full_size(ctx, x):
        f = orig(ctx, x)
        if x.shape[0] < 12:  # the float64 check and the probe pass
            return f

        def call():
            raise torch.OutOfMemoryError("CUDA out of memory (test)")

        return call

    monkeypatch.setattr(m, "inference", oom_at_full_size)
    assert _run(tmp_path, "--d", "2", "--modes", "inference", methods_=["thd_lap", "fwd_diag"]) == 0
    rec = _records(tmp_path)["records"][0]
    assert rec["skipped"]["fwd_diag"].startswith("out of memory")  # probe (N/8 = N here)
    assert not rec["failed"]
