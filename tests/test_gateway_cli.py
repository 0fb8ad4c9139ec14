"""``hotlora gateway --model DIR`` alone: its own embedded broker and engine process, a Tinker endpoint.

The gateway process is ready when it prints its address (it prints it only after the engine announced
itself); the test waits for that line, bounded, then runs a short loop through the SDK, stops the
gateway with SIGTERM and checks that it, and the engine it started, exited.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tinker
from tinker import types

from hotlora.engine.kafka.broker import free_port, port_accepts

pytestmark = pytest.mark.timeout(420)
READY_TIMEOUT_S = 240.0


def test_hotlora_gateway_alone_is_a_tinker_endpoint(tiny_model_path: Path, tmp_path: Path) -> None:
    port = free_port()
    engine_args = (
        "--dtype float32 --device cpu --max-decode-rows 16 --session-timeout-ms 2000 --heartbeat-interval-ms 300"
    )
    argv = [sys.executable, "-m", "hotlora.cli", "gateway", "--model", str(tiny_model_path), "--port", str(port),
            "--checkpoint-dir", str(tmp_path / "checkpoints"), "--engine-args", engine_args]  # fmt: skip
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if "Tinker API at" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(READY_TIMEOUT_S), "gateway not ready:\n" + "".join(lines[-40:])
        started = re.search(r"embedded broker ([\d.]+):(\d+), engine pid (\d+)", "".join(lines))
        assert started, "the gateway should have started a broker and an engine"
        broker_host, broker_port, engine_pid = started.group(1), int(started.group(2)), int(started.group(3))
        base_url = f"http://127.0.0.1:{port}"
        service = tinker.ServiceClient(base_url=base_url, api_key="tml-cli-test")
        capabilities = tinker.RestClient(base_url=base_url, api_key="tml-cli-test").get_server_capabilities().result()
        assert [m.model_name for m in capabilities.supported_models] == [str(tiny_model_path)]
        training = service.create_lora_training_client(base_model=str(tiny_model_path), rank=4, seed=0).result()
        tokens = [5, 9, 17, 40, 41, 42]
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64)},
        )
        first = training.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]
        assert training.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics["version"] == 1.0
        second = training.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]
        assert second < first
        sampler = training.save_weights_and_get_sampling_client().result()
        assert (
            len(
                sampler.sample(types.ModelInput.from_ints([5]), 2, types.SamplingParams(max_tokens=3))
                .result()
                .sequences
            )
            == 2
        )
        service.close("success").result()
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            code = process.wait(timeout=30)
        reader.join(10)
    assert code == 0, "".join(lines[-40:])
    # It stopped what it started: the engine process is gone and the broker's port is closed.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (_alive(engine_pid) or port_accepts(broker_host, broker_port)):
        time.sleep(0.1)
    assert not _alive(engine_pid) and not port_accepts(broker_host, broker_port)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
