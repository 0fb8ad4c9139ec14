"""An agent that dies mid-experiment and is restarted with ``--resume`` finishes it, without redoing a step.

The engine (in process here) keeps the adapter; the restarted agent process adopts the adapter's seq
(``HotLoraClient.resume``) and continues from the step its metrics reached (``resume_point``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from hotlora.agents import HotLoraClient
from hotlora.agents.grpo import resume_point
from hotlora.agents.metrics import read_topic
from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.schemas.messages import Metrics
from tests.helpers import running_engine_service, service_config_for_tests

STEPS = 5


def metrics(step: int, version: int) -> Metrics:
    return Metrics(adapter_id="a", experiment="a", task="sort", step=step, version=version)


def test_resume_point_continues_after_the_last_reported_step() -> None:
    assert resume_point([], 0) == (0, 0)
    assert resume_point([metrics(0, 0)], 0) == (0, 0)  # only the base eval: start over
    assert resume_point([metrics(0, 0), metrics(1, 1), metrics(2, 2)], 2) == (2, 2)
    # Died after step 3's optim_step but before its report: step 3 is done, not redone.
    assert resume_point([metrics(1, 1), metrics(2, 2)], 3) == (3, 3)
    # A step whose groups were all skipped reports no new version; nothing is ahead.
    assert resume_point([metrics(1, 1), metrics(2, 1)], 1) == (2, 1)


def test_killed_agent_resumes_its_experiment(
    broker: EmbeddedBroker, topic_prefix: str, rl_base_path: Path, tmp_path: Path
) -> None:
    config = service_config_for_tests(broker.bootstrap, topic_prefix, rl_base_path, tmp_path / "ckpt")
    command = [sys.executable, "-m", "hotlora.cli", "agent", "--task", "sort", "--adapter", "resumer"]
    command += ["--steps", str(STEPS), "--batch-size", "2", "--group-size", "4", "--eval-every", "100"]
    command += ["--bootstrap", broker.bootstrap, "--model", str(rl_base_path), "--topic-prefix", topic_prefix]

    async def reported() -> list[Metrics]:
        return [m for m in await read_topic(broker.bootstrap, topic_prefix) if m.experiment == "resumer"]

    async def main() -> None:
        env = {k: v for k, v in os.environ.items() if k != "HOTLORA_BOOTSTRAP"}
        async with running_engine_service(config):
            first = await asyncio.create_subprocess_exec(*command, env=env, stdout=asyncio.subprocess.DEVNULL)
            try:
                async with asyncio.timeout(240):
                    while not any(m.step >= 2 for m in await reported()):
                        await asyncio.sleep(0.2)
                first.send_signal(signal.SIGKILL)
            finally:
                if first.returncode is None:
                    first.kill()
                await first.wait()
            before = {m.step for m in await reported() if m.step > 0}
            second = await asyncio.create_subprocess_exec(*command, "--resume", env=env)
            try:
                assert await asyncio.wait_for(second.wait(), 300) == 0
            finally:
                if second.returncode is None:
                    second.kill()
                    await second.wait()
            done = [m for m in await reported() if m.step > 0]
            async with HotLoraClient(broker.bootstrap, topic_prefix=topic_prefix) as client:
                info = await client.resume("resumer")
        steps = [m.step for m in done]
        assert max(steps) == STEPS
        assert len(steps) == len(set(steps)), f"a step was reported twice: {steps}"
        # The kill can land between a step's optim_step and its report: that step is done but its
        # metrics are lost (resume_point does not redo it). Every later step is reported.
        assert set(range(max(before) + 2, STEPS + 1)) <= set(steps), (before, steps)
        last = max(done, key=lambda m: m.step)
        assert info is not None and info.version == last.version

    asyncio.run(main())
