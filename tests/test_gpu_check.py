"""scripts/gpu_check.py --smoke: every stage of the GPU check runs on CPU at toy size and writes its report."""
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_stage_and_writes_json_and_markdown(tmp_path):
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["kind"] == "iat-gpu-check" and result["smoke"] is True
    assert result["environment"]["cpu"] and result["environment"]["torch"]
    tests = result["tests"]  # without CUDA every gpu test is collected and skipped, none fails
    assert tests["tests"] >= 5 and tests["skipped"] == tests["tests"] and not tests["failed"]
    rows = result["throughput"]
    assert {(r["method"], r["option"]) for r in rows} == {(m, o) for m in ("pgd-at", "iat", "uiat-fgsm") for o in
                                                         ("fp32", "bf16", "bf16+channels_last",
                                                          "bf16+channels_last+compile")}
    assert all(r["images_per_second"] > 0 for r in rows)
    runs = {r["method"]: r for r in result["training"]["runs"]}
    assert set(runs) == {"pgd-at", "iat"}
    for r in runs.values():
        assert r["returncode"] == 0 and r["eval_returncode"] == 0 and r["eval_examples"] == 16
        assert set(r["accuracy"]) >= {"natural", "pgd20", "cw"}
        assert all(0 <= a <= 1 for a in r["accuracy"].values())
        assert r["accuracy"]["worst case"] == min(r["accuracy"].values())
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| pgd-at |" in md and "| uiat-fgsm |" in md and "PGD-20" in md
    assert f"{runs['iat']['accuracy']['pgd20']:.2%}" in md
    assert result["seconds"]["total"] < 60 and wall < 90, (result["seconds"], wall)
