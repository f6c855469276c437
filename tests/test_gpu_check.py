"""scripts/gpu_check.sh (issue 14's one prepared GPU command) and its summary, kept working without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kvtier.bench.gpu_check import summarize, count_tests

ROOT = Path(__file__).resolve().parents[1]


def test_count_tests_reads_pytests_tally():
    log = "....s\n=== short test summary ===\nFAILED tests/x.py::t\n3 passed, 1 failed, 2 skipped, 1 error in 4.20s\n"
    assert count_tests(log) == {"passed": 3, "failed": 1, "skipped": 2, "errors": 1}
    assert count_tests("ERROR: file or directory not found: tests/nope.py\n") == {}


def test_summary_sets_each_row_beside_full_and_hf_offload(tmp_path):
    rows = [{"method": m, "context": 32768, "batch": 1, "status": "ok", "decode_ms_per_token": ms,
             "sync_debug": "passed"} for m, ms in (("full", 20.0), ("hf-offload", 300.0), ("freekv:budget=2048", 22.0))]
    rows.append({"method": "full", "context": 131072, "batch": 4, "status": "does not fit",
                 "decode_ms_per_token": None, "sync_debug": None})
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "bench-x.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "tests-cuda.log").write_text("12 passed, 1 skipped in 9.1s\n")
    path = summarize(tmp_path, {"bench-32k": "ran", "big": "skipped: BIG=1 not given"}, "cmd",
                     environment={"device": "NVIDIA H200", "torch": "2.11.0"})
    assert path.name.startswith("nvidia-h200-")
    summary = json.loads(path.read_text())
    freekv = next(r for r in summary["rows"] if r["method"].startswith("freekv"))
    assert (freekv["full_ms"], freekv["hf_offload_ms"], freekv["run"]) == (20.0, 300.0, "bench-x.json")
    assert summary["rows"][-1]["full_ms"] is None  # nothing beside it at 128k x 4
    assert summary["tests"]["cuda"]["counts"] == {"passed": 12, "skipped": 1}
    assert summary["stages"]["big"].startswith("skipped")
    assert summary["sync_debug"]["freekv:budget=2048 32768x1"] == "passed"


def test_the_script_runs_every_stage_dry_on_cpu(tmp_path):
    """GPU_CHECK_DRY=1: the same stages with the tiny-llama shape at 1k on this CPU, then the summary."""
    env = {**os.environ, "GPU_CHECK_DRY": "1", "PYTHON": sys.executable}
    env.pop("OUT", None)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [path] = tmp_path.glob("cpu-*.json")
    summary = json.loads(path.read_text())
    assert summary["stages"] == {"env": "ran", "tests-cuda": "ran", "tests-kernels": "ran", "bench-32k": "ran",
                                 "kvpr": "ran", "big": "skipped: BIG=1 not given"}
    assert summary["tests"]["cuda"]["counts"].get("passed", 0) >= 1
    methods = {r["method"] for r in summary["rows"]}
    assert {"hf-dynamic", "hf-offload", "full", "offload", "freekv:budget=2048", "specache", "kvpr"} <= methods
    assert all(r["status"] == "ok" for r in summary["rows"])
    assert not list(tmp_path.glob("bench/*.png"))  # the device tool brings back 8 files at most
    assert len([p for p in tmp_path.rglob("*") if p.is_file()]) <= 8


def test_the_script_skips_what_the_budget_cannot_hold(tmp_path):
    env = {**os.environ, "GPU_CHECK_DRY": "1", "PYTHON": sys.executable, "BUDGET_S": "100"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [path] = tmp_path.glob("cpu-*.json")
    stages = json.loads(path.read_text())["stages"]
    assert stages["bench-32k"].startswith("skipped") and stages["kvpr"].startswith("skipped")
    assert "== bench-32k: skipped" in done.stdout
