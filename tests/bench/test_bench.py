"""Smoke tests of the benchmark harness (python -m torchhessdiag.bench) on tiny grids.

No timing is asserted: what is checked is that every method is verified before it is timed,
that a wrong method is reported as FAILED with a non-zero exit status, and that the output
files (markdown, raw JSON, JSONL, plots) are written and resumable.
"""

import json
import os
import re
import sys
import time

import pytest
import torch
from torch import nn

from torchhessdiag.bench import cli, fwdlap, methods, report, runner

TINY = ["--device", "cpu", "--dtype", "float64", "--width", "8", "--depth", "2", "--n", "12",
        "--repeats", "1", "--budget", "20", "--method-budget", "0.5", "--check-n", "4",
        "--no-progress"]
CORE = ["thd_diag", "thd_lap", "thd_deriv", "nested", "nested_dropin", "func_hessian",
        "func_jvp", "fwd_diag", "fwd_lap", "fwd_deriv"]


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


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "silu", "gelu", "softplus"])
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


# ---- the fast plain forward Laplacian (torchhessdiag/bench/fwdlap.py) ------------------------------
# Tolerance: float64, max |error| <= 1e-10 x max |reference| (the bench's own float64 check); the
# methods agree with torch.func to ~1e-15 here, so a wrong sign, factor or row fails by far.

TOL = 1e-10
# (d, hidden widths): depth 1, 2 and 3; d < width, d = 1, and d > width1 (the QR compression)
ARCHS = [(1, [8, 8]), (3, [7, 5, 6]), (4, [5]), (10, [6, 7])]


def _refs(model, x):
    diag, lap = methods.func_hessian(model, x)
    u, g = methods.value_and_grad(model, x)
    return {"diag": diag.detach(), "lap": lap.detach(), "value": u, "grad": g}


def _err(a, ref):
    return float((a.detach() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("act", list(methods.ACTIVATIONS))
def test_fast_forward_inference_matches_torch_func(act, single_thread):
    """The buffered no-graph version in every variant (one GEMM or two, sum of squares by loop or
    by sum, compression on/off) and the differentiable one: Laplacian, Hessian diagonal, value and
    gradient, twice in a row (buffers reused), for every activation of the bench."""
    for d, widths in ARCHS:
        model = methods.build_base(d, widths, act, seed=5).double().requires_grad_(False)
        x = torch.randn(9, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
        ref = _refs(model, x)
        for second in ("lap", "diag"):
            calls = [lambda: fwdlap.forward_laplacian(model, x, second, True)]
            for one_gemm in (False, True):
                for sumsq in ("loop", "sum"):
                    for compress in (None, False, True):
                        fl = fwdlap.ForwardLaplacian(model, 9, second, True, compress, one_gemm,
                                                     sumsq)
                        calls.append(lambda fl=fl: fl(x))
            for call in calls:
                for _ in range(2):
                    out = call()
                    got = out[second][:, 0]
                    assert _err(got, ref[second]) <= TOL, (act, d, widths, second)
                    assert _err(out["value"][:, 0], ref["value"]) <= TOL
                    assert _err(out["grad"][:, 0], ref["grad"]) <= TOL


def test_fast_forward_compresses_only_the_laplacian_at_d_above_width():
    model = methods.build_base(10, [6, 7], "tanh", seed=1).double()
    assert fwdlap.ForwardLaplacian(model, 4, "lap").K == 6  # d=10 > w1=6: R of W1^T = QR
    assert fwdlap.ForwardLaplacian(model, 4, "lap", compress=False).K == 10
    assert fwdlap.ForwardLaplacian(model, 4, "diag").K == 10  # every direction needed


@pytest.mark.parametrize("act", list(methods.ACTIVATIONS))
def test_fast_forward_training_gradients_match(act, single_thread):
    """Training: the weight gradients of mean((lap - 1)^2) (and of the diagonal's) through the
    differentiable forward Laplacian equal those through float64 torch.func vmap(hessian)."""
    for d, widths in ARCHS:
        for second in ("lap", "diag"):
            model = methods.build_base(d, widths, act, seed=2).double()
            x = torch.randn(7, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

            def grads(f):
                for p in model.parameters():
                    p.grad = None
                ((f() - 1) ** 2).mean().backward()
                return methods.flat_grads(model).clone()

            i = 0 if second == "diag" else 1
            g_ref = grads(lambda: methods.func_hessian(model, x)[i])
            for compress in (None, False):
                g = grads(lambda: fwdlap.forward_laplacian(model, x, second, False, compress)[second][:, 0])
                assert _err(g, g_ref) <= TOL, (act, d, widths, second, compress)


def test_fast_forward_rejects_other_models():
    with pytest.raises(ValueError, match="Linear, act"):
        fwdlap.ForwardLaplacian(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)), 4)
    with pytest.raises(ValueError, match="made for N=4"):
        fwdlap.ForwardLaplacian(methods.build_base(2, [3], "tanh", 0), 4)(torch.randn(5, 2))


def test_fast_forward_buffers_are_reused_and_weights_read_each_call():
    model = methods.build_base(3, [8, 8], "tanh", seed=0).double().requires_grad_(False)
    x = torch.randn(6, 3, dtype=torch.float64)
    fl = fwdlap.ForwardLaplacian(model, 6)
    ptrs = [b.data_ptr() for b in fl._bufs]
    fl(x)
    with torch.no_grad():
        model[2].weight.mul_(0.5)  # the weights change between calls (a training loop)
    assert _err(fl(x)["lap"][:, 0], methods.func_hessian(model, x)[1]) <= TOL
    assert [b.data_ptr() for b in fl._bufs] == ptrs


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_compiled_forward_laplacian_float64_check(mode):
    """The torch.compile'd forward Laplacian passes the bench's float64 check (compiles here:
    about 10-30 s on 2 cores), and its compile time is reported, not timed."""
    spec = dict(device="cpu", dtype="float64", activation="tanh", d=2, widths=[8, 8], N=6,
                mode=mode)
    chk = runner.check_float64(spec, ["fwd_lap_compiled", "fwd_lap"], 0, 6, torch.device("cpu"))
    assert not chk["failures"] and not chk["unavailable"], chk
    assert {k.split(":")[0] for k in chk["errors"]} == {"fwd_lap_compiled", "fwd_lap"}
    assert chk["max"] <= TOL
    model = methods.build_base(2, [8, 8], "tanh", 0).double().requires_grad_(mode == "train")
    fn = methods.build("fwd_lap_compiled", methods.Context(model, mode),
                       torch.randn(5, 2, dtype=torch.float64))
    assert isinstance(fn.compile_s, float) and fn.compile_s >= 0


def test_compile_failure_is_a_skip_with_reason(tmp_path, monkeypatch):
    def broken(*a, **k):
        def f(*aa, **kk):
            raise RuntimeError("inductor: no C++ compiler (test)")
        return f

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(methods, "_COMPILED", {})
    assert _run(tmp_path, "--d", "2", "--modes", "inference", "train",
                methods_=["fwd_lap", "fwd_lap_compiled"]) == 0
    for rec in _records(tmp_path)["records"]:
        assert "no C++ compiler (test)" in rec["skipped"]["fwd_lap_compiled"]
        assert "fwd_lap_compiled" not in rec["failed"] and "fwd_lap" in rec["stats_s"]


# ---- mlp_derivatives methods ---------------------------------------------------------------------


def test_derivative_methods_are_checked_on_value_and_gradient(tmp_path, monkeypatch):
    """A method giving (value, grad, lap) is checked on all three: a wrong gradient alone fails."""
    m = methods.METHODS["fwd_deriv"]
    orig = m.inference

    def wrong_grad(ctx, x):
        f = orig(ctx, x)

        def call():
            r = f()
            return {**r, "grad": r["grad"] * (1 + 1e-6)}

        return call

    monkeypatch.setattr(m, "inference", wrong_grad)
    rc = _run(tmp_path, "--d", "3", "--modes", "inference",
              methods_=["thd_deriv", "nested", "fwd_deriv"])
    assert rc == 1
    rec = _records(tmp_path)["records"][0]
    assert "fwd_deriv" in rec["failed"] and "thd_deriv" in rec["stats_s"]
    errs = rec["check_float64"]["errors"]
    assert {"thd_deriv:value", "thd_deriv:grad", "thd_deriv:lap", "nested:grad"} <= set(errs)


# ---- the pinn presets (issue 13) -----------------------------------------------------------------


def _blocks(*argv):
    return cli.grid(cli.parse_args(list(argv)))


def test_pinn_preset_is_issue_13s_grid():
    a = cli.parse_args(["--preset", "pinn"])
    assert a.threads == 2 and a.device == ["cpu"]
    need = {"thd_lap", "thd_diag", "thd_deriv", "nested", "func_hessian", "func_jvp", "fwd_lap",
            "fwd_diag", "fwd_deriv", "fwd_lap_compiled", "jet", "jet_std", "jet_deriv"}
    assert set(a.methods) == need  # no drop-ins (another issue), no general API
    blocks = cli.grid(a)
    train = [b for b in blocks if b["mode"] == "train" and b["N"] != 16]
    infer = [b for b in blocks if b["mode"] == "inference" and b["N"] != 16]
    # 1. training step: d in {1, 2, 3} (+ 5, 8), width 32-128, depth 3-4, N 512/4096/8192, f32+f64
    assert {b["d"] for b in train} == {1, 2, 3, 5, 8}
    assert {b["N"] for b in train} == {512, 4096, 8192}
    assert {b["dtype"] for b in train} == {"float32", "float64"}
    assert {b["widths"][0] for b in train} == {32, 64, 128}
    assert {len(b["widths"]) for b in train} == {3, 4}
    for d in (1, 2, 3, 5, 8):
        for dt in ("float32", "float64"):
            for n in (512, 4096, 8192):
                sub = [b for b in train if (b["d"], b["dtype"], b["N"]) == (d, dt, n)]
                assert {b["widths"][0] for b in sub} == {32, 64, 128}, (d, dt, n)
                assert {len(b["widths"]) for b in sub} == {3, 4}, (d, dt, n)
    # 2. inference: d x width x N, both dtypes
    for d in (1, 2, 3, 5, 8, 16, 32, 100):
        for w in (32, 64, 128, 256):
            for n in (512, 4096):
                for dt in ("float32", "float64"):
                    assert any((b["d"], b["widths"][0], b["N"], b["dtype"]) == (d, w, n, dt)
                               for b in infer), (d, w, n, dt)
    assert {b["d"] for b in infer} == {1, 2, 3, 5, 8, 16, 32, 100}
    # 3. overhead-bound: N = 16, 3x32, d = 2, both modes
    tiny = [b for b in blocks if b["N"] == 16]
    assert {(b["d"], tuple(b["widths"]), b["mode"]) for b in tiny} == {
        (2, (32, 32, 32), "inference"), (2, (32, 32, 32), "train")}
    assert all(b["activation"] == "tanh" for b in blocks)
    assert len({runner.block_key(b) for b in blocks}) == len(blocks)
    # the parts add up to the whole
    parts = [b for p in ("pinn-overhead", "pinn-train", "pinn-infer", "pinn-train64",
                         "pinn-infer64") for b in _blocks("--preset", p)]
    assert sorted(map(runner.block_key, parts)) == sorted(map(runner.block_key, blocks))


def test_pinn_core_preset_is_the_reported_settings():
    blocks = _blocks("--preset", "pinn-core")
    got = {(b["dtype"], b["d"], tuple(b["widths"]), b["N"], b["mode"]) for b in blocks}
    f32, f64 = "float32", "float64"
    for want in [(f32, 2, (32,) * 3, 512, "train"), (f32, 3, (64,) * 4, 4096, "train"),
                 (f64, 3, (64,) * 4, 4096, "train"), (f32, 2, (128,) * 4, 8192, "train"),
                 (f32, 8, (256,) * 4, 4096, "inference"), (f32, 5, (256,) * 4, 4096, "train"),
                 (f64, 1, (64,) * 3, 1024, "train"), (f64, 2, (32,) * 3, 16, "inference")]:
        assert want in got, want
    assert len(blocks) == len(got) == 16


def test_pinn_preset_options_replace_grid_dimensions():
    blocks = _blocks("--preset", "pinn", "--d", "2", "--width", "32", "--depth", "3", "--n", "512")
    assert {(b["d"], tuple(b["widths"]), b["N"]) for b in blocks} == {(2, (32, 32, 32), 512)}
    assert {(b["mode"], b["dtype"]) for b in blocks} == {
        ("train", "float32"), ("train", "float64"), ("inference", "float32"),
        ("inference", "float64")}
    blocks = _blocks("--preset", "pinn-train", "--d", "3", "--dtype", "float64")
    assert {b["d"] for b in blocks} == {3} and {b["dtype"] for b in blocks} == {"float64"}
    assert _blocks("--preset", "pinn-tiny", "--modes", "train") and all(
        b["mode"] == "train" for b in _blocks("--preset", "pinn-tiny", "--modes", "train"))


# ---- tiny calls are timed in batches ---------------------------------------------------------------


def test_calls_per_sample_and_batched():
    calls = []

    def one_ms():
        calls.append(1)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 1e-3:
            pass

    reps = runner.calls_per_sample({"a": one_ms, "b": lambda: time.sleep(0.03)},
                                   torch.device("cpu"), 0.02)
    assert "b" not in reps  # 30 ms per call: one call per sample
    assert 2 <= reps["a"] <= 20  # ~1 ms (more on a loaded machine): about 20 per sample
    calls.clear()
    runner.batched(one_ms, 7)()
    assert len(calls) == 7
    # a known (warm-up) time of 5 samples or more is not timed again
    assert runner.calls_per_sample({"a": one_ms}, torch.device("cpu"), 0.02,
                                   known={"a": 0.2}) == {}


def test_n16_block_is_timed_in_batches_and_reported_per_call(tmp_path, single_thread):
    # one thread: with two on a loaded 2-core machine OpenMP's spin-waiting can make these tiny
    # calls take ~30 ms (see the single_thread fixture), and then they need no batching
    assert _run(tmp_path, "--d", "2", "--n", "16", "--modes", "inference", "train",
                "--min-sample-ms", "40", methods_=["thd_lap", "nested", "fwd_lap"]) == 0
    for rec in _records(tmp_path)["records"]:
        reps = rec["calls_per_sample"]
        assert reps.get("fwd_lap", 1) > 1, reps  # a ~0.1-1 ms call
        # per call: a batch of reps calls took ~40 ms (>= 10 ms even if the calibration calls
        # were slowed 4x on a loaded machine); the reported time is that / reps
        for k, ts in rec["times_s"].items():
            if reps.get(k, 1) > 1:
                assert all(t * reps[k] >= 0.01 for t in ts), (k, ts, reps[k])
                assert rec["stats_s"][k]["median"] < 0.04
    assert re.search(r"\| \d+x\d+ +\|", (tmp_path / "report.md").read_text())  # n x calls


# ---- reports ---------------------------------------------------------------------------------------


def _fake_record(mode="inference"):
    st = lambda ms: {"median": ms / 1e3, "min": ms / 1e3, "max": ms / 1e3, "iqr": 0.0, "n": 3}  # noqa: E731
    keys = {"thd_lap": 10, "thd_diag": 12, "thd_deriv": 11, "nested": 40, "func_hessian": 30,
            "fwd_lap": 8, "fwd_diag": 20, "fwd_deriv": 9, "floor_diag": 5, "floor_lap": 4}
    if mode == "train":
        keys = {"thd_lap": 10, "nested": 40, "fwd_lap": 25, "jet": 15, "floor_train": 5}
    return {"key": "k", "setting": dict(device="cpu", dtype="float32", activation="tanh", d=2,
                                        widths=[32, 32, 32], N=512, mode=mode),
            "stats_s": {k: st(v) for k, v in keys.items()}, "failed": {}, "skipped": {}}


def test_best_peer_excludes_thd_and_the_floor():
    rec = _fake_record()
    assert report.best_peer(rec, "lap") == "fwd_lap"  # 8 ms, not the 4 ms floor nor thd
    assert report.best_peer(rec, "diag") == "fwd_diag"  # 20 < func_hessian 30 < nested 40
    assert report.best_peer(rec, "deriv") == "fwd_deriv"  # nested (40) gives them too
    assert report.best_peer(rec, "lap", exclude="fwd_lap") == "fwd_deriv"
    rows = {r["task"]: r for r in report.thd_vs_peers([rec])}
    assert rows["lap"]["thd"] == "thd_lap" and rows["lap"]["peer_s"] == pytest.approx(0.008)
    assert rows["diag"]["peer"] == "fwd_diag" and rows["diag"]["nested_s"] == pytest.approx(0.04)
    text = report.thd_summary_markdown([rec, _fake_record("train")])
    assert "0.80x" in text  # lap: peer 8 ms / thd 10 ms
    assert "1.50x" in text  # train: jet 15 ms / thd 10 ms
    assert "4.00x" in text  # vs nested 40 ms
    block = report.block_markdown(rec, {})
    assert "/ best peer" in block and "/ nested" in block


# ---- jet-for-pytorch ---------------------------------------------------------------------------------


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="jet-for-pytorch can install on >= 3.12")
def test_jet_is_skipped_with_reason_on_python_311(tmp_path):
    assert _run(tmp_path, "--d", "2", "--modes", "inference", "train",
                methods_=["thd_lap", "jet", "jet_std", "jet_deriv"]) == 0
    data = _records(tmp_path)
    assert data["env"]["jet"] is None and data["env"]["python"].startswith("3.11")
    for rec in data["records"]:
        keys = ["jet", "jet_std"] + (["jet_deriv"] if rec["setting"]["mode"] == "inference" else [])
        for k in keys:
            assert "needs Python >= 3.12" in rec["skipped"][k], rec["skipped"]
        assert rec["env"]["python"] == data["env"]["python"]


@pytest.mark.skipif(methods._jet_available() is not None, reason="jet-for-pytorch not importable")
def test_jet_methods_pass_the_float64_check_in_both_modes():
    for mode in ("inference", "train"):
        keys = [k for k in ("jet", "jet_std", "jet_deriv") if mode in methods.METHODS[k].modes]
        spec = dict(device="cpu", dtype="float64", activation="tanh", d=3, widths=[8, 8], N=6,
                    mode=mode)
        chk = runner.check_float64(spec, keys, 0, 6, torch.device("cpu"))
        assert not chk["failures"] and chk["max"] <= TOL, chk
        assert {k.split(":")[0] for k in chk["errors"]} == set(keys)
