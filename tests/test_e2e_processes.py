"""End to end as compose runs it, with native processes: broker, engine and two agents over TCP.

The engine and agents get their configuration from the same ``HOTLORA_*`` environment variables that
compose.yaml sets; each is its own OS process. Readiness is the engine's heartbeat, every wait is
bounded, and every process is reaped even when the test fails.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from hotlora.agents import HotLoraClient
from hotlora.agents.readiness import wait_for_engine
from hotlora.engine.digest import directory_sha256
from hotlora.engine.kafka.broker import EmbeddedBroker
from tests.helpers import engine_env

STEPS = 12
AGENTS = ("e2e-a", "e2e-b")


async def spawn(env: dict[str, str], *args: str, stdout: int | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hotlora.cli", *args, env=env, stdout=stdout, stderr=asyncio.subprocess.DEVNULL
    )


async def reap(process: asyncio.subprocess.Process, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
    if process.returncode is None:
        process.send_signal(sig)
    try:
        return await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise


def test_engine_and_two_agent_processes(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    env = engine_env(
        broker.bootstrap, topic_prefix, tiny_model_path, tmp_path / "checkpoints",
        session_timeout_ms=2000, heartbeat_interval_ms=300, heartbeat_interval=1, steps=STEPS,
    )  # fmt: skip

    async def main() -> None:
        engine = await spawn(env, "engine")
        agents: list[asyncio.subprocess.Process] = []
        try:
            await wait_for_engine(broker.bootstrap, topic_prefix, timeout=120)
            for i, adapter_id in enumerate(AGENTS):
                agent_env = {**env, "HOTLORA_ADAPTER": adapter_id}
                agents.append(await spawn(agent_env, "agent", "--seed", str(i), stdout=asyncio.subprocess.PIPE))
            outputs = await asyncio.wait_for(asyncio.gather(*(a.communicate() for a in agents)), timeout=300)
            for adapter_id, agent, (stdout, _) in zip(AGENTS, agents, outputs, strict=True):
                lines = [json.loads(line) for line in stdout.decode().splitlines() if line.startswith("{")]
                steps = [line for line in lines if "step" in line]
                assert {line["adapter"] for line in lines} == {adapter_id}, "each agent saw only its own results"
                assert [s["version"] for s in steps] == list(range(1, STEPS + 1))
                assert [s["sampled_version"] for s in steps] == list(range(STEPS))
                assert steps[-1]["loss"] < 0.5 * steps[0]["loss"]
                assert agent.returncode in (0, 1), f"{adapter_id} crashed"  # 1: not yet exact after few steps
                assert lines[-1]["done"] and lines[-1]["checkpoint"]

            async with HotLoraClient(broker.bootstrap, topic_prefix=topic_prefix) as client:
                event = await client.wait_for_checkpoint(AGENTS[0], min_step=STEPS, timeout=60)
            assert event.sha256 == directory_sha256(event.path)
            base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
            model = PeftModel.from_pretrained(base, event.path)
            assert any("lora_B" in name and p.abs().sum() > 0 for name, p in model.named_parameters())
            assert await reap(engine) == 0, "SIGTERM is a graceful, successful shutdown"
        finally:
            for process in (*agents, engine):
                if process.returncode is None:
                    process.kill()
                    await process.wait()

    asyncio.run(main())
