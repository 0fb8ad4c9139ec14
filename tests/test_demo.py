"""``hotlora demo`` (the README's run command) as a user runs it: separate processes, a table, a PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_demo_runs_broker_engine_and_agents(tmp_path: Path, tiny_model_path: Path) -> None:
    out, png = tmp_path / "demo.json", tmp_path / "losses.png"
    command = [sys.executable, "-m", "hotlora.cli", "demo", "--experiments", "2", "--steps", "6"]
    command += ["--json", str(out), "--png", str(png), "--model", str(tiny_model_path)]
    env = {k: v for k, v in os.environ.items() if k != "HOTLORA_BOOTSTRAP"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    # Exit 1 only means an adapter is not yet exact after 6 steps; anything else is a failure.
    assert done.returncode in (0, 1), done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [e["adapter_id"] for e in result["experiments"]] == ["exp-0", "exp-1"]
    for experiment in result["experiments"]:
        assert len(experiment["losses"]) == 6 and experiment["error"] is None
        assert experiment["losses"][-1] < experiment["losses"][0]
    assert png.stat().st_size > 1000
    assert "concurrent experiments on one hot engine" in done.stdout
