"""The GPU device session, rehearsed on the CPU: same script, tiny shape, every stage must pass.

Device minutes are few; a typo, a missing import on a bare image or a JSON field the report reads but
no stage writes would waste them. This runs ``bench/gpu_suite.sh --device cpu --shape tiny`` exactly as
the device call does (a bash process, stages in subprocesses, files under ``--out``) and checks what
comes back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Files a device call brings back: at most 8, none deeper than two folders.
MAX_RETURNED_FILES = 8


@pytest.mark.timeout(900)
def test_the_device_session_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "HOTLORA_COMMIT": "rehearsal"}
    argv = ["bash", "bench/gpu_suite.sh", "--device", "cpu", "--shape", "tiny", "--out", str(out)]
    argv += ["--experiments", "2", "--steps", "1", "--total-budget", "800"]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=880)
    log = (out / "suite.log").read_text() if (out / "suite.log").is_file() else ""
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{log[-6000:]}"

    summary = json.loads((out / "suite.json").read_text())
    assert summary["commit"] == "rehearsal"
    stages = summary["stages"]
    assert list(stages) == ["cuda_tests", "gpu_claim", "gpu_core", "profiles", "gpu_experiments"]
    for name, stage in stages.items():
        assert stage["rc"] == 0 and not stage["timed_out"], (name, stage)
    tests = stages["cuda_tests"]["tests"]
    assert tests["counts"].get("passed", 0) >= 6 and "failed" not in tests["counts"], tests
    assert tests["tests"]["test_mixed_forward_backward_matches_solo_in_bf16"]["properties"]

    core = json.loads((out / "gpu_core.json").read_text())
    assert core["shape"] == "tiny" and {"mixed_over_single", "loop_over_mixed", "decode_mixed_over_single"} <= set(core)
    experiments = json.loads((out / "gpu_experiments.json").read_text())
    assert experiments["steps_trained"]["concurrent"] >= 1, "the dense reward must give groups signal to train on"
    assert {"cold_ratio", "warm_ratio", "T1_seconds", "T2_seconds", "T3_seconds"} <= set(experiments)
    partial = json.loads((out / "gpu_experiments.partial.json").read_text())
    assert {"T1_seconds", "T2_seconds", "T3_seconds"} <= set(partial)
    profiles = json.loads((out / "profiles.json").read_text())
    assert {"decode", "train", "adapter"} <= set(profiles)

    returned = [p for p in out.rglob("*") if p.is_file()]
    assert len(returned) <= MAX_RETURNED_FILES, sorted(p.name for p in returned)
    assert all(len(p.relative_to(out).parts) <= 3 for p in returned)

    # What the developer runs on the returned files: one docs section per measurement.
    docs = tmp_path / "benchmarks.md"
    report = [sys.executable, "bench/gpu_report.py", str(out), "--docs", str(docs)]
    done = subprocess.run(report, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = docs.read_text()
    for heading in (
        "### gpu suite: commit `rehearsal`",
        "### core:",
        "### gpu profiles",
        "### gpu claim",
        "### experiments:",
    ):
        assert heading in text, heading
    assert "FAILED" not in text and "TIMED OUT" not in text


def test_a_stage_over_its_budget_is_cut_and_recorded(tmp_path: Path) -> None:
    """The suite's own bookkeeping: a stage that overruns is stopped, marked, and the suite fails."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_suite
    finally:
        sys.path.remove(str(REPO / "bench"))
    stage = gpu_suite.Stage("sleepy", [sys.executable, "-c", "import time; time.sleep(60)"], 1)
    with open(tmp_path / "log", "w") as log:
        result = gpu_suite.run_stage(stage, 1.0, log)
    assert result["timed_out"] and result["rc"] != 0
    assert "TIMED OUT" in (tmp_path / "log").read_text()
