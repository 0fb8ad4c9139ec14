"""Broker faults: the engine service and its agents ride out a broker crash and restart.

A Tansu broker with durable ``s3://`` storage (a local ``moto`` S3) serves an in-process engine service
and a few clients that train their own adapters (forward_backward then optim_step, with the odd
sample). In the middle of the run, with requests in flight, the broker is killed (SIGKILL: no clean
shutdown) and started again on the same port with the same storage. Every request must still get its
reply (the client re-sends a lost attempt with the same ``request_id`` and ``seq``), no optimizer step
may be applied twice or lost, and the engine service must keep running.

Every wait is bounded and waits on an event (a port, a reply), never on a sleep; every process is reaped.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import pytest
import torch

from hotlora.agents import HotLoraClient
from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.engine.types import AdamParams, Datum, LoraSpec

pytest.importorskip("moto.server", reason="the broker-restart tests need the dev extra (moto[server])")

from hotlora.engine.kafka.s3_local import LocalS3
from tests.helpers import running_engine_service, service_config_for_tests

pytestmark = pytest.mark.timeout(180)

CLIENTS = 3
STEPS = 12
CRASH_AFTER_STEP = 4  # the first client to finish this step triggers the crash
REQUEST_TIMEOUT_S = 4.0  # per attempt; a lost attempt costs this much before its re-send
RETRIES = 8
TEST_BUDGET_S = 90.0
# Tansu with s3 storage, after a restart, answers a fetch with a short max wait (the engine's and the
# client's default 10 ms) with no records even where records exist, on every try: the engine stops
# seeing requests and clients stop seeing replies (found by this test, Tansu 0.6.0 + moto). A
# 300 ms wait reads them. Memory storage and Apache Kafka have no such trap; the default stays 10 ms.
FETCH_WAIT_MS = 300


def fixed_datum(seed: int, vocab: int, length: int = 24) -> Datum:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (length + 1,), generator=gen)
    weights = torch.ones(length)
    weights[:4] = 0.0
    return Datum.create(tokens[:-1], tokens[1:], weights)


async def train(
    client: HotLoraClient, adapter_id: str, datum: Datum, crash_point: asyncio.Event, record: dict[str, list]
) -> None:
    """SFT on one fixed datum: the loss must fall, and every optim_step must add exactly one version."""
    await client.create_adapter(adapter_id, LoraSpec(rank=4, alpha=8.0, seed=1))
    adam = AdamParams(learning_rate=1e-2)
    for step in range(1, STEPS + 1):
        if step % 4 == 0:
            out = await client.sample(adapter_id, [5, 6, 7], n=1)
            record["samples"].append(len(out.sequences))
        fb = await client.forward_backward(adapter_id, [datum])
        record["losses"].append(fb.losses[0])
        opt = await client.optim_step(adapter_id, adam)
        record["versions"].append(opt.version)
        if step == CRASH_AFTER_STEP:
            crash_point.set()


@pytest.mark.parametrize("crash", [True], ids=["sigkill"])
def test_engine_and_clients_survive_a_broker_restart(
    tmp_path: Path, tiny_model_path: Path, topic_prefix: str, crash: bool
) -> None:
    with LocalS3(log_path=tmp_path / "moto.log") as s3:
        broker = EmbeddedBroker(storage=s3.storage_url, env=s3.broker_env(), log_path=tmp_path / "tansu.log")
        try:
            broker.start()
            asyncio.run(
                asyncio.wait_for(scenario(broker, tmp_path, tiny_model_path, topic_prefix, crash), TEST_BUDGET_S)
            )
        finally:
            broker.stop()


async def scenario(broker: EmbeddedBroker, tmp_path: Path, model: Path, prefix: str, crash: bool) -> None:
    config = service_config_for_tests(
        broker.bootstrap, prefix, model, tmp_path / "ckpt", fetch_max_wait_ms=FETCH_WAIT_MS
    )
    async with running_engine_service(config) as service:
        vocab = service.engine.runner.base.vocab_size  # type: ignore[union-attr]
        clients = [
            HotLoraClient(
                broker.bootstrap,
                prefix,
                request_timeout=REQUEST_TIMEOUT_S,
                retries=RETRIES,
                reply_wait_ms=FETCH_WAIT_MS,
            )
            for _ in range(CLIENTS)
        ]
        records = [{"losses": [], "versions": [], "samples": []} for _ in range(CLIENTS)]
        crash_point = asyncio.Event()
        try:
            for client in clients:
                await client.start()
            trainers = [
                asyncio.create_task(train(c, f"tenant-{i}", fixed_datum(i, vocab), crash_point, records[i]))
                for i, c in enumerate(clients)
            ]
            waiter = asyncio.create_task(crash_point.wait())
            done, _ = await asyncio.wait([waiter, *trainers], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not waiter:
                    task.result()  # a trainer failed before the crash: raise it
            in_flight = sum(c.in_flight for c in clients)
            down = time.monotonic()
            # Kill and restart on the same port and storage; off the loop, so in-flight calls keep running.
            await asyncio.to_thread(broker.restart, crash=crash)
            outage_s = time.monotonic() - down
            await asyncio.gather(*trainers)  # bounded by the test budget
            infos = {info.adapter_id: info for info in await clients[0].list_adapters()}
        finally:
            for client in clients:
                await client.close()
        assert service.state == "running", f"the engine service left running: {service.state}"
    retries = sum(c.stats.retries for c in clients)
    print(f"in flight at the crash: {in_flight}; outage {outage_s:.2f} s; client re-sends: {retries}")
    for i, record in enumerate(records):
        adapter_id = f"tenant-{i}"
        # Each optim_step applied exactly once, in order: version n after the n-th step, none lost or doubled.
        assert record["versions"] == list(range(1, STEPS + 1)), (adapter_id, record["versions"])
        assert infos[adapter_id].version == STEPS
        losses = record["losses"]
        assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
        assert losses[-1] < losses[0], f"{adapter_id}: the loss did not fall: {losses}"
        assert record["samples"] == [1] * (STEPS // 4)
    assert in_flight > 0, "the crash found no request in flight; the test did not test what it claims"
