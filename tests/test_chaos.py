"""Crash recovery: the engine is SIGKILLed at 3 random moments while 4 agents train; nothing is lost or doubled.

The engine runs as its own process (``hotlora engine``) on the real broker; the agents are clients in
this process that simply retry with the same ``request_id`` (``HotLoraClient``'s retries). Every agent
does the same seeded SFT steps (one ``forward_backward`` then one ``optim_step`` per step) as in a
fault-free run on a fresh engine. After the chaos run each adapter's version must equal the optim_steps
its agent issued, and its final weights must equal the fault-free run's.

Why the weights are compared with a tolerance and not bit for bit: which adapters share a micro-batch
depends on arrival timing, so an adapter's rows may be multiplied in batches of different sizes in the
two runs, and CPU matmul kernels block (and so round) differently by batch size. The measured gap is
printed; the bound (1e-5 relative to the largest weight) is far below one optimizer step's change
(lr 1e-2 moves weights by ~1e-2), so a lost or doubled step cannot pass it.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from hotlora.agents import HotLoraClient
from hotlora.agents.readiness import wait_for_engine
from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.engine.types import AdamParams, Datum, LoraSpec
from tests.helpers import engine_env

AGENTS = 4
STEPS = 10
KILLS = 3
TOLERANCE = 1e-5


def datum(agent: int, step: int) -> Datum:
    gen = torch.Generator().manual_seed(1000 * agent + step)
    tokens = torch.randint(3, 200, (25,), generator=gen).tolist()
    return Datum.from_sequence(tokens, prompt_len=2)


async def agent(client: HotLoraClient, index: int, progress: list[int]) -> tuple[list[int], Path]:
    adapter_id = f"chaos-{index}"
    await client.create_adapter(adapter_id, LoraSpec(rank=4, alpha=8.0, seed=index))
    versions = []
    for step in range(STEPS):
        await client.forward_backward(adapter_id, [datum(index, step)], "cross_entropy")
        out = await client.optim_step(adapter_id, AdamParams(learning_rate=1e-2))
        versions.append(out.version)
        progress[0] += 1
    saved = await client.save_state(adapter_id, f"final/{adapter_id}")  # under the engine's checkpoint_dir
    return versions, Path(saved.path)


async def start_engine(
    env: dict[str, str], engine_id: str, broker: EmbeddedBroker, prefix: str
) -> asyncio.subprocess.Process:
    """An engine process; its log goes to ``<checkpoint dir>/../<engine id>.log`` for a failure's post-mortem."""
    log_path = Path(env["HOTLORA_CHECKPOINT_DIR"]).parent / f"{engine_id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hotlora.cli", "engine", "--engine-id", engine_id,
            env=env, stdout=log_file, stderr=log_file,
        )  # fmt: skip
    try:
        await wait_for_engine(broker.bootstrap, prefix, timeout=120, engine_id=engine_id)
    except BaseException:
        process.kill()
        await process.wait()
        raise
    return process


async def run(broker: EmbeddedBroker, prefix: str, model: Path, tmp: Path, kills: int) -> dict[str, Path]:
    env = engine_env(
        broker.bootstrap, prefix, model, tmp / "checkpoints",
        dtype="float32", device="cpu", session_timeout_ms=2000, heartbeat_interval_ms=300, heartbeat_interval=0.5,
    )  # fmt: skip
    rng = random.Random(7)
    moments = sorted(rng.sample(range(2, AGENTS * STEPS - 2), kills))
    progress = [0]
    engine = await start_engine(env, f"{prefix}-0", broker, prefix)
    try:
        async with HotLoraClient(broker.bootstrap, topic_prefix=prefix, request_timeout=3.0, retries=60) as client:
            work = asyncio.gather(*(agent(client, i, progress) for i in range(AGENTS)))
            for n, moment in enumerate(moments, start=1):
                async with asyncio.timeout(300):
                    while progress[0] < moment:
                        await asyncio.sleep(0.01)
                await asyncio.sleep(rng.uniform(0.0, 0.3))  # mid-request, not only between steps
                engine.send_signal(signal.SIGKILL)
                await engine.wait()
                engine = await start_engine(env, f"{prefix}-{n}", broker, prefix)
            results = await asyncio.wait_for(work, 600)
        for versions, _ in results:
            assert versions == list(range(1, STEPS + 1)), f"optim_step versions {versions}: a step lost or doubled"
        return {f"chaos-{i}": path for i, (_, path) in enumerate(results)}
    finally:
        if engine.returncode is None:
            engine.kill()
            await engine.wait()


def test_engine_killed_three_times_loses_and_doubles_nothing(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    clean = asyncio.run(run(broker, f"{topic_prefix}-clean", tiny_model_path, tmp_path / "clean", kills=0))
    chaos = asyncio.run(run(broker, f"{topic_prefix}-chaos", tiny_model_path, tmp_path / "chaos", kills=KILLS))
    worst = 0.0
    for adapter_id, path in chaos.items():
        got, want = (
            load_file(path / "adapter_model.safetensors"),
            load_file(clean[adapter_id] / "adapter_model.safetensors"),
        )
        assert got.keys() == want.keys()
        for key in want:
            scale = want[key].abs().max().item() or 1.0
            worst = max(worst, (got[key] - want[key]).abs().max().item() / scale)
    print(f"largest relative weight gap, chaos vs fault-free: {worst:.2e}")
    assert worst <= TOLERANCE
