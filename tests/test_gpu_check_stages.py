"""scripts/gpu_check.py runs every stage on its own: one whose tool is missing or that raises is recorded as
skipped/failed with a one-line reason in gpu_check.json and gpu_check.md, and the other stages still run."""
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_pytest_and_a_crashing_stage_are_reported_and_the_others_still_run(tmp_path, monkeypatch):
    gc = load_gpu_check()
    ran = []

    def crashing_throughput(size, smoke):
        ran.append("throughput")
        raise RuntimeError("CUDA error: out of memory\nsecond line")

    def fake_training(rows, left, size, data, out):
        ran.append(("training", rows))
        return {"epochs": 1, "data": "synthetic", "runs": [{"method": "iat", "epochs": 1, "returncode": 0,
                                                           "eval_returncode": 0, "log": "train-iat.log"}]}

    monkeypatch.setitem(sys.modules, "pytest", None)  # `import pytest` now fails, as where it is not installed
    monkeypatch.setattr(gc, "stage_throughput", crashing_throughput)
    monkeypatch.setattr(gc, "stage_training", fake_training)

    rc = gc.main(["--smoke", "--out", str(tmp_path)])

    assert rc != 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = result["stages"]
    assert list(stages) == ["tests", "throughput", "training"]
    assert stages["tests"]["status"] == "skipped"
    assert "pytest is not installed" in stages["tests"]["reason"] and "gpu-check" in stages["tests"]["reason"]
    assert not (tmp_path / "gpu_tests.log").exists()  # pytest was not started
    assert stages["throughput"]["status"] == "failed"
    assert stages["throughput"]["reason"] == "RuntimeError: CUDA error: out of memory second line"
    assert stages["training"]["status"] == "ok" and ran == ["throughput", ("training", None)]
    assert result["tests"] is None and result["throughput"] is None and result["training"]["runs"]
    assert result["ok"] is False
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| tests | skipped | pytest is not installed" in md
    assert "| throughput | failed | RuntimeError: CUDA error: out of memory second line |" in md
    assert "| iat | 1 |" in md and "Traceback" not in md


def test_run_stages_records_each_outcome_and_keeps_going():
    gc = load_gpu_check()
    result = {}

    def fails(left):
        raise gc.StageFailed("2 of 7 CUDA tests failed: a, b", {"tests": 7})

    def crashes(left):
        raise KeyError("fp32")

    def skips(left):
        raise gc.StageSkipped("matplotlib is not installed")

    stages = gc.run_stages([("a", fails), ("b", crashes), ("c", skips), ("d", lambda left: left > 0)], result, 10)
    assert {k: (v["status"], v["reason"]) for k, v in stages.items()} == {
        "a": ("failed", "2 of 7 CUDA tests failed: a, b"), "b": ("failed", "KeyError: 'fp32'"),
        "c": ("skipped", "matplotlib is not installed"), "d": ("ok", None)}
    assert result == {"a": {"tests": 7}, "b": None, "c": None, "d": True}
    assert all(v["seconds"] >= 0 for v in stages.values())
