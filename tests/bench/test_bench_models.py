"""Smoke tests of the models preset (python -m torchhessdiag.bench --preset models; the runner is
torchhessdiag/bench/models.py) on tiny sizes. No timing is asserted: that every method is checked
against the float64 reference before it is timed, that a wrong method is FAILED with exit status
1, that a method that cannot run a model (torch's own errors, jet-for-pytorch missing or unable to
trace) is skipped with the reason, and that the outputs are written."""

from __future__ import annotations

import json

from torchhessdiag.bench import cli, models as BM

TINY = ["--dtype", "float64", "--d", "2", "--width", "8", "--n", "8", "--repeats", "1", "--check-n", "4"]


def _records(out):
    with open(out / "results.json") as f:
        return json.load(f)["records"]


def test_models_preset_through_the_suite(tmp_path):
    rc = cli.main(["--preset", "models", *TINY, "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    recs = _records(tmp_path)
    assert {r["setting"]["model"] for r in recs} == {"fourier_resnet", "modified_mlp", "piratenet"}
    assert {r["setting"]["mode"] for r in recs} == {"inference", "train"}
    for r in recs:
        assert r["check"]["thd"] <= 1e-10 and "thd" in r["times"]
        assert r["check"]["nested"] <= 1e-10
        if BM._jet_available():
            assert "jet" in r["skipped"] and "not importable" in r["skipped"]["jet"]
    report = (tmp_path / "report.md").read_text()
    assert "nested / thd" in report and "fourier_resnet" in report


def test_transformer_block_and_cannot_run(tmp_path):
    """The attention model: thd checked exact (against nested autograd with exact layer_norm /
    attention); torch's nested autograd and torch.func cannot run its MultiheadAttention on the
    CPU (flash kernel without double backward / forward AD): skipped with torch's error."""
    rc = BM.main([*TINY, "--models", "transformer", "--out", str(tmp_path)])
    assert rc == 0
    for r in _records(tmp_path):
        assert r["check"]["thd"] <= 1e-10
        assert r["skipped"]["nested"].startswith("cannot run")


def test_a_wrong_method_fails(tmp_path, monkeypatch):
    wrong = BM.Method(
        "nested", "nested autograd", lambda mo, x, train: (lambda: BM._nested_laplacian(mo, x, train) * 1.001), inference_no_grad=False
    )
    monkeypatch.setitem(BM.METHODS, "nested", wrong)
    rc = BM.main([*TINY, "--models", "modified_mlp", "--modes", "inference", "--out", str(tmp_path)])
    assert rc == 1
    (r,) = _records(tmp_path)
    assert "nested" in r["failed"] and "nested" not in r["times"]
