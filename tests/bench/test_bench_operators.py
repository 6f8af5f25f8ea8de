"""Smoke tests of the operators preset (python -m torchhessdiag.bench --preset operators; the runner
is torchhessdiag/bench/operators.py) on tiny sizes: every biharmonic method is checked against the
float64 torch.func reference before it is timed, a wrong method is FAILED with exit status 1,
jet-for-pytorch missing is a skip with the reason, the sampled part reports time and memory per
S next to the forward pass. No timing is asserted."""

from __future__ import annotations

import json

from torchhessdiag.bench import cli, operators as BO

TINY = ["--d", "2", "--width", "8", "--depth", "2", "--n", "8", "--repeats", "1", "--check-n", "3"]


def _records(out):
    with open(out / "results.json") as f:
        return json.load(f)["records"]


def test_operators_preset_through_the_suite(tmp_path):
    rc = cli.main(["--preset", "operators", *TINY, "--dtype", "float64", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    recs = _records(tmp_path)
    bih = [r for r in recs if r["part"] == "biharmonic"]
    assert {r["setting"]["mode"] for r in bih} == {"inference", "train"}
    for r in bih:
        assert r["check"]["thd"] <= 1e-10 and r["check"]["nested"] <= 1e-10 and "thd" in r["times"]
        if BO.jet_available():
            assert "not importable" in r["skipped"]["jet"]
        else:
            assert r["check"]["jet"] <= 1e-10
    sampled = [r for r in recs if r["part"] == "sampled"]
    assert [r["setting"]["d"] for r in sampled] == [1000, 10000, 100000]
    for r in sampled:
        assert {"forward", "S=8", "S=32", "S=128"} <= set(r["times"]) and r["peak_bytes"]["S=8"] >= 0
    assert "exact" in sampled[0]["times"] and "exact" not in sampled[1]["times"]
    report = (tmp_path / "report.md").read_text()
    assert "nested / thd" in report and "minus forward ms" in report


def test_float32_check_and_a_wrong_method_fails(tmp_path, monkeypatch):
    real = BO.bih_callable

    def wrong(key, model, x, train):
        f = real(key, model, x, train)
        return (lambda: f() * 1.001) if key == "nested" else f

    monkeypatch.setattr(BO, "bih_callable", wrong)
    rc = BO.main([*TINY, "--parts", "biharmonic", "--modes", "inference", "--methods", "thd", "nested", "--out", str(tmp_path)])
    assert rc == 1
    (r,) = _records(tmp_path)
    assert "nested" in r["failed"] and "nested" not in r["times"]
    assert r["check32"]["thd"] <= 1e-3 and "thd" in r["times"]


def test_thread_clock_and_sampled_only(tmp_path):
    rc = BO.main(["--parts", "sampled", "--sampled-d", "50", "--samples", "4", "60", "--width", "8", "--sampled-n", "8",
                  "--repeats", "1", "--clock", "thread", "--no-memory", "--out", str(tmp_path)])
    assert rc == 0
    (r,) = _records(tmp_path)
    assert "S=4" in r["times"] and "S=60" not in r["times"] and r["peak_bytes"] == {}
    assert r["path"] == "engine"


def test_plan_runs_nothing(tmp_path, capsys):
    assert cli.main(["--preset", "operators", "--plan", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "biharmonic|cpu|float32|tanh|d=5|w=128x3|N=512|inference" in text and "sampled|cpu|float32|d=100000" in text
    assert not (tmp_path / "results.json").exists()
