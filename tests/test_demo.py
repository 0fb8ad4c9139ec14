"""``hotlora demo`` (the README's run command) as a user runs it, and the reward-rise check of RL.

Two different experiments (``format`` at lr 1e-3, ``sort`` at lr 1e-3: the first two of
``agents/experiments.py``) run concurrently as agent processes on one engine process over Kafka,
for 20 GRPO steps on the pretrained base, and each one's held-out reward must rise by ``MIN_RISE``.

Why 0.06: over 5 training seeds of this exact setting (batch 4, group 8, lr 1e-3, 20 steps, in
process; docs/benchmarks.md "Reward rise: seed variance") the rise was 0.104-0.131 (mean 0.121,
sd 0.011) for format and 0.125-0.203 (mean 0.162, sd 0.031) for sort. The step-0 eval is the same
for every seed (LoRA B starts at zero and evals share sampling seeds), so that spread is the
training's. 0.06 lies 3.3 sd below sort's mean rise and 5 sd below format's, while a run that does
not learn leaves the eval where it was (same weights, same eval seeds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MIN_RISE = 0.06


def test_two_concurrent_experiments_each_raise_their_held_out_reward(tmp_path: Path, rl_base_path: Path) -> None:
    out, png = tmp_path / "demo.json", tmp_path / "rewards.png"
    command = [sys.executable, "-m", "hotlora.cli", "demo", "--experiments", "2", "--steps", "20"]
    command += ["--eval-every", "20", "--json", str(out), "--png", str(png), "--model", str(rl_base_path)]
    env = {k: v for k, v in os.environ.items() if k != "HOTLORA_BOOTSTRAP"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    experiments = result["experiments"]
    assert [(e["task"], e["learning_rate"]) for e in experiments] == [("format", 1e-3), ("sort", 1e-3)]
    for e in experiments:
        assert e["error"] is None and e["steps"] == 20
        assert [step for step, _ in e["eval_curve"]] == [0, 20]
        rise = e["final_eval_reward"] - e["initial_eval_reward"]
        assert rise >= MIN_RISE, f"{e['adapter_id']}: held-out reward {e['eval_curve']} rose only {rise:.3f}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "concurrent RL experiments on one hot engine" in done.stdout
