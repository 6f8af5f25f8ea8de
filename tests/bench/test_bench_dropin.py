"""The dropin preset of the benchmark suite (torchhessdiag/bench/dropin.py): the grid is issue 14's,
a block checks both methods before timing them (and a wrong drop-in is FAILED, exit status 1),
torch.nn's inability (a linear network) is reported and the drop-ins timed alone, resume works,
and the suite's command line reaches it."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import torchhessdiag as thd
from torchhessdiag.bench import dropin as D

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:torchhessdiag. second and higher derivatives")]

TINY = ["--d", "2", "--width", "8", "--depth", "2", "--n", "48", "--dtype", "float64", "--repeats", "2",
        "--min-sample-ms", "1", "--no-memory", "--no-progress", "--threads", "1", "--clock", "thread"]


def _records(out):
    with open(os.path.join(out, "results.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_preset_grids_are_issue_14s(capsys):
    assert D.GRID["d"] == [1, 2, 3, 8, 32, 100] and D.GRID["width"] == [32, 64, 256]
    assert D.GRID["n"] == [512, 4096] and D.GRID["dtype"] == ["float32", "float64"]
    assert D.GRID["modes"] == ["inference", "train"]
    # every activation of the derivative table
    assert set(D.GRID["activation"]) == set(thd.activations.NAMES)
    assert D.main(["--preset", "dropin", "--plan"]) == 0
    assert capsys.readouterr().out.startswith(f"{14 * 2 * 6 * 3 * 2 * 2} blocks")


def test_suite_command_line_reaches_the_preset(capsys):
    from torchhessdiag.bench import main

    assert main(["--preset", "dropin-quick", "--plan"]) == 0
    assert capsys.readouterr().out.startswith("28 blocks")
    assert main(["--preset", "dropin", "--plan", "--d", "2", "--dtype", "float64"]) == 0
    assert capsys.readouterr().out.startswith(f"{14 * 3 * 2 * 2} blocks")


def test_blocks_check_time_and_report(tmp_path):
    out = str(tmp_path / "r")
    rc = D.main(["--activation", "tanh", "identity", "--modes", "inference", "train", "--out", out, *TINY])
    assert rc == 0
    recs = _records(out)
    assert [(r["setting"]["activation"], r["setting"]["mode"]) for r in recs] == [
        ("tanh", "inference"), ("tanh", "train"), ("identity", "inference"), ("identity", "train")]
    for r in recs[:2]:
        assert r["ok"] and set(r["stats_s"]) == {"torch.nn", "thd.nn"} and r["speedup"] > 0
        assert max(r["check_float64"]["errors"].values()) <= 1e-10
        assert r["full_check"]["ok"] and r["clock"] == "thread"
    for r in recs[2:]:  # torch.nn cannot differentiate a linear network twice; the drop-ins can
        assert "torch cannot" in r["skipped"]["torch.nn"]
        assert "thd.nn" in r["stats_s"] and "speedup" not in r
    report = open(os.path.join(out, "report.md")).read()
    assert "## Targets (issue 14)" in report and "| tanh" in report
    # resume: nothing left to run, the same records
    assert D.main(["--activation", "tanh", "identity", "--out", out, "--resume", *TINY]) == 0
    assert len(_records(out)) == 4


def test_a_wrong_dropin_fails_the_check(tmp_path, monkeypatch):
    monkeypatch.setitem(D.ACTIVATIONS, "tanh", (nn.Tanh, thd.nn.SiLU))  # not the same function
    out = str(tmp_path / "w")
    assert D.main(["--activation", "tanh", "--modes", "inference", "--out", out, *TINY]) == 1
    (r,) = _records(out)
    assert "float64 check" in r["failed"]["thd.nn"] and "thd.nn" not in r["stats_s"]


def test_rel_err_non_finite_must_match():
    a = torch.tensor([1.0, float("inf"), 2.0])
    assert D.rel_err(a, a.clone()) == 0.0
    assert D.rel_err(torch.tensor([1.0, float("nan"), 2.0]), a) == float("inf")
    assert D.rel_err(torch.zeros(3), torch.zeros(3)) == 0.0
    assert D.rel_err(torch.full((3,), 1e-300, dtype=torch.float64), torch.zeros(3)) == float("inf")
