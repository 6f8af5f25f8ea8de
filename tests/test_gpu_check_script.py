"""scripts/gpu_check.sh (issue 17), as far as it can be tested without a GPU: its syntax, the plan
of its dry run (which steps, which tools over which tests, the time budget, resuming from an
earlier run's folder), and one real step end to end (info: its log, .done and summary.txt)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(tmp_path, *args, **env):
    e = dict(os.environ, OUT=str(tmp_path / "out"), **env)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=120, env=e, cwd=ROOT)


def test_syntax():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


def test_dry_run_plan(tmp_path):
    out = _run(tmp_path, "--dry-run", BUDGET_S="100000")
    assert out.returncode == 0, out.stderr
    plan = out.stdout
    assert "racecheck" not in plan, "no kernel uses shared memory: synccheck instead"
    for tool in ("memcheck", "initcheck", "synccheck"):
        for piece, files in (("layer", "tests/ops/test_layer_ops.py"), ("taylor", "tests/ops/test_taylor_op.py"),
                             ("table", "tests/ops/test_table.py"), ("engine", "tests/engine/test_engine.py"),
                             ("jets", "tests/general/test_jets.py")):
            line = next(ln for ln in plan.splitlines() if f"] {tool}_{piece} (" in ln)
            assert f"compute-sanitizer --tool {tool}" in line and files in line and "-k" in line
            assert os.path.isfile(os.path.join(ROOT, files)), f"{files}: gone (tests moved?)"
    for step in ("info", "build", "test_cuda", "test_rest", "bench_gpu", "bench_taylor"):
        assert re.search(rf"\] {step} \(up to \d+s\)", plan), step
    assert "--preset taylor --device cuda" in plan and "--resume" in plan
    assert "nothing was run" in plan
    assert sorted(os.listdir(tmp_path / "out")) == [], "a dry run writes nothing"


def test_dry_run_respects_the_budget(tmp_path):
    plan = _run(tmp_path, "--dry-run", BUDGET_S="480").stdout
    times = [int(t) for t in re.findall(r"== \[(\d+)s\] \S+ \(up to", plan)]
    costs = [int(c) for c in re.findall(r"\(up to (\d+)s\)", plan)]
    assert times and all(t + c <= 480 for t, c in zip(times, costs))
    assert "left for the next run" in plan


def test_dry_run_resumes(tmp_path):
    prev = tmp_path / "prev"
    prev.mkdir()
    (prev / "memcheck_layer.done").write_text("rc=0\n")
    plan = _run(tmp_path, "--dry-run", BUDGET_S="100000", RESUME_FROM=str(prev)).stdout
    assert "memcheck_layer: done in an earlier run (rc=0)" in plan
    assert "] memcheck_taylor (up to" in plan


def test_one_real_step_writes_log_done_and_summary(tmp_path):
    out = _run(tmp_path, STEPS="info", PY="python3", BUDGET_S="60")
    assert out.returncode == 0, out.stderr
    d = tmp_path / "out"
    assert (d / "info.log").exists() and (d / "info.done").read_text().startswith("rc=")
    summary = (d / "summary.txt").read_text()
    assert re.search(r"^info\s+done\s+rc=\d+", summary, re.M), summary
    assert (d / "gpu.txt").exists()
    # a second run resumes: the step is not run again
    again = _run(tmp_path, STEPS="info", PY="python3", BUDGET_S="60")
    assert "info: done in an earlier run" in again.stdout
