"""The ``tinker`` 0.24.x SDK (the line SkyRL tx accepts: JSON request bodies) against the gateway.

The dev extra installs the current SDK (0.38.x); two versions of one package cannot share a venv, so
0.24.1 is installed once, without dependencies (0.38's cover it), into a cache directory with
``pip install --target``, and ``tests/tinker_024_loop.py`` runs in a subprocess with that directory first
on ``PYTHONPATH``. The install is bounded (``PIP_TIMEOUT_S``) and reused by later sessions. Without
network it skips, unless ``HOTLORA_REQUIRE_TINKER=1`` (CI), where it fails.
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

SDK_VERSION = "0.24.1"
PIP_TIMEOUT_S = 180
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


def sdk_024() -> Path:
    """``tinker`` 0.24.1 in its own directory under the user's cache (installed on first use)."""
    return pip_target(f"tinker-{SDK_VERSION}", "tinker/_version.py", [f"tinker=={SDK_VERSION}"], PIP_TIMEOUT_S)


def test_sdk_024_trains_samples_and_keeps_old_samplers(
    broker: EmbeddedBroker, tiny_model_path: Path, tmp_path: Path
) -> None:
    sdk = sdk_024()
    prefix = f"t-sdk024-{time.monotonic_ns() % 10**9}"
    with GatewayHarness(broker.bootstrap, prefix, tiny_model_path, tmp_path / "checkpoints") as gateway:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(sdk), str(REPO)]), "TINKER_TELEMETRY": "0"}
        done = subprocess.run(
            [sys.executable, str(REPO / "tests" / "tinker_024_loop.py"), gateway.base_url, str(tiny_model_path)],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:]
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        # It spoke JSON: no protobuf request reached the gateway (the proto path is tests/test_gateway.py's).
        assert gateway.gateway is not None
        assert (
            gateway.gateway.stats["forward_backward:json"] > 0
            and gateway.gateway.stats["forward_backward:protobuf"] == 0
        )
    assert seen["json_results"] == ["SampleResponse", "ForwardBackwardOutput"]
    assert seen["version"] == SDK_VERSION
    assert seen["versions"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert seen["losses"][-1] < seen["losses"][0]
    assert seen["again"] == seen["old"], "a sampler made before more training must keep its weights"
    assert seen["new"] != seen["old"]
