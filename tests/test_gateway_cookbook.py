"""A tinker-cookbook recipe, unchanged, against the gateway: ``tinker_cookbook.recipes.math_rl.train`` with
``env=arithmetic`` (no dataset download), the tiny base model's directory as ``model_name`` and the
``role_colon`` renderer (plain text, any tokenizer).

tinker-cookbook 0.6.1 asks for ``tml-renderers>=0.4.1``, which has no build for this Python, and the
recipe never imports it; so the cookbook and the packages it imports are installed once, without
dependency resolution, at pinned versions, into a cache directory (``pip install --no-deps --target``),
and the recipe runs in a subprocess with that directory on ``PYTHONPATH``. Without network it skips,
unless ``HOTLORA_REQUIRE_TINKER=1`` (CI), where it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hotlora.engine.kafka.broker import EmbeddedBroker
from tests.gateway_harness import GatewayHarness, pip_target

REPO = Path(__file__).resolve().parents[1]
PIP_TIMEOUT_S = 420
STEPS = 3
pytestmark = pytest.mark.timeout(900)

# tinker-cookbook and what math_rl imports beyond the dev extra (which brings tinker itself).
COOKBOOK = [
    "tinker-cookbook==0.6.1", "chz==0.4.0", "cloudpickle==3.1.3", "termcolor==3.3.0", "blobfile==3.3.0",
    "lxml==6.2.0", "pycryptodomex==3.24.2", "pyrage==1.4.0", "tiktoken==0.14.0", "datasets==5.2.0", "dill==0.4.1",
    "multiprocess==0.70.19", "pandas==3.1.1", "pyarrow==26.0.1", "xxhash==4.1.0", "pylatexenc==2.11",
    "math-verify==0.9.0", "latex2sympy2_extended==1.11.0",
]  # fmt: skip


def cookbook() -> Path:
    return pip_target("tinker-cookbook-0.6.1", "tinker_cookbook/__init__.py", COOKBOOK, PIP_TIMEOUT_S)


def recipe_command(base_url: str, model: Path, log_path: Path) -> list[str]:
    """The command docs/tinker.md gives, with a smaller batch for a quick test."""
    return [
        sys.executable, "-m", "tinker_cookbook.recipes.math_rl.train",
        f"base_url={base_url}", f"model_name={model}", "renderer_name=role_colon", "env=arithmetic",
        "loss_fn=importance_sampling", "lora_rank=8", "learning_rate=1e-3", "group_size=4", "groups_per_batch=4",
        "max_tokens=5", f"max_steps={STEPS}", "eval_every=0", "save_every=0", f"log_path={log_path}",
        "behavior_if_log_dir_exists=delete",
    ]  # fmt: skip


def test_cookbook_math_rl_runs_unchanged(broker: EmbeddedBroker, tiny_model_path: Path, tmp_path: Path) -> None:
    packages = cookbook()
    prefix = f"t-cookbook-{time.monotonic_ns() % 10**9}"
    with GatewayHarness(broker.bootstrap, prefix, tiny_model_path, tmp_path / "checkpoints") as gateway:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(packages), os.environ.get("PYTHONPATH", "")]),
            "TINKER_API_KEY": "tml-cookbook-test",
            "TINKER_TELEMETRY": "0",
            "HF_DATASETS_OFFLINE": "1",
        }
        log_path = tmp_path / "math_rl"
        done = subprocess.run(
            recipe_command(gateway.base_url, tiny_model_path, log_path),
            env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
        assert gateway.gateway is not None
        stats = dict(gateway.gateway.stats)
    metrics = [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "env/all/reward/total" in m]
    assert [m["step"] for m in steps] == list(range(STEPS))
    assert "Training completed successfully" in done.stdout + done.stderr
    saved = [json.loads(line) for line in (log_path / "checkpoints.jsonl").read_text().splitlines()]
    assert saved and saved[-1]["state_path"].startswith("tinker://")
    assert stats["forward_backward:protobuf"] >= STEPS
