"""Redelivery: republished requests that already ran are answered again, never applied again.

Kafka gives at-least-once: a record can come back (a rebalance, a crash before the commit, a producer
retry). Here the test itself republishes every request record an agent sent, raw bytes and all, once
to the engine that ran them (deduplicated by ``request_id``) and once to a restarted engine (by the
adapter's durable ``seq``): the adapter's version and weights must not move either time.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from safetensors.torch import load_file

from hotlora.agents import HotLoraClient
from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.engine.kafka.service import EngineService
from hotlora.engine.types import AdamParams, Datum, LoraSpec, SamplingParams
from hotlora.schemas.topics import Topics
from tests.helpers import running_engine_service, service_config_for_tests, start_engine_service

ADAPTER = "redo"


async def request_records(bootstrap: str, prefix: str) -> list[tuple[str, bytes | None, bytes]]:
    """Every record on the request topics so far: (topic, key, value)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()  # refresh the metadata
        partitions = [
            TopicPartition(topic, p)
            for topic in Topics(prefix).requests()
            for p in sorted(consumer.partitions_for_topic(topic) or {0})
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        found: list[tuple[str, bytes | None, bytes]] = []
        async with asyncio.timeout(30):
            while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
                for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                    found += [(tp.topic, r.key, r.value) for r in records if r.value is not None]
        return found
    finally:
        await consumer.stop()


async def republish(bootstrap: str, records: list[tuple[str, bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for topic, key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def state(client: HotLoraClient, path: str) -> tuple[int, dict]:
    saved = await client.save_state(ADAPTER, path)
    return saved.version, load_file(Path(saved.path) / "adapter_model.safetensors")


def test_republished_requests_are_not_applied_again(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    config = service_config_for_tests(broker.bootstrap, topic_prefix, tiny_model_path, tmp_path / "ckpt")

    async def main() -> None:
        client_of = lambda: HotLoraClient(broker.bootstrap, topic_prefix=topic_prefix, request_timeout=10)  # noqa: E731
        async with running_engine_service(config), client_of() as client:
            await client.create_adapter(ADAPTER, LoraSpec(rank=4, seed=1))
            for step in range(3):
                await client.forward_backward(ADAPTER, [Datum.from_sequence([1, *range(10 + step, 30)], 1)])
                await client.optim_step(ADAPTER, AdamParams(learning_rate=1e-2))
            version, weights = await state(client, "before")
            assert version == 3
            sent = await request_records(broker.bootstrap, topic_prefix)
            mutating = len(sent)
            await republish(broker.bootstrap, sent)  # same engine: known request ids
            again_version, again = await state(client, "same-engine")
        async with running_engine_service(config), client_of() as client:  # restarted: restored from its snapshot
            await republish(broker.bootstrap, sent)
            restarted_version, restarted = await state(client, "restarted")
        assert mutating >= 8  # create, 3 x (forward_backward, optim_step), save_state
        assert again_version == restarted_version == version
        for key, tensor in weights.items():
            assert again[key].equal(tensor) and restarted[key].equal(tensor), key

    asyncio.run(main())


def test_a_restarted_agent_resumes_its_adapter_after_an_engine_restart(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    """A new client (a restarted agent) on a restarted engine: ``resume`` takes the adapter's last seq, so
    its next optim_step is applied (not taken for a duplicate of the old process's seq 2)."""
    config = service_config_for_tests(broker.bootstrap, topic_prefix, tiny_model_path, tmp_path / "ckpt")

    async def main() -> None:
        def client_of() -> HotLoraClient:
            return HotLoraClient(broker.bootstrap, topic_prefix=topic_prefix, request_timeout=10)

        async with running_engine_service(config), client_of() as first:
            await first.create_adapter(ADAPTER, LoraSpec(rank=4, seed=1))
            await first.forward_backward(ADAPTER, [Datum.from_sequence([1, *range(10, 30)], 1)])
            await first.optim_step(ADAPTER, AdamParams(learning_rate=1e-2))
        async with running_engine_service(config), client_of() as second:
            info = await second.resume(ADAPTER)
            assert info is not None and info.version == 1 and info.seq == 3
            await second.forward_backward(ADAPTER, [Datum.from_sequence([1, *range(11, 31)], 1)])
            assert (await second.optim_step(ADAPTER, AdamParams(learning_rate=1e-2))).version == 2
            assert await second.resume("nobody") is None

    asyncio.run(main())


def test_a_sample_answered_after_the_last_step_leaves_no_hole_after_a_crash(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    """A sample answered after the last ``optim_step`` is committed only once the adapter's durable mark
    covers it (``advance_point``). So when the engine then dies with a ``forward_backward`` unsnapshotted,
    the restarted engine resumes right at that ``forward_backward`` and re-applies it, instead of waiting
    out ``seq_gap_timeout`` (60 s here) for a sample whose record was already committed."""
    config = service_config_for_tests(broker.bootstrap, topic_prefix, tiny_model_path, tmp_path / "ckpt")
    config.seq_gap_timeout = 60.0

    async def main() -> None:
        datum = Datum.from_sequence([1, *range(10, 30)], 1)
        async with HotLoraClient(broker.bootstrap, topic_prefix=topic_prefix, request_timeout=10) as client:
            service = EngineService(config)
            running = await start_engine_service(service)
            try:
                await client.create_adapter(ADAPTER, LoraSpec(rank=4, seed=1))  # seq 1
                await client.forward_backward(ADAPTER, [datum])  # 2
                await client.optim_step(ADAPTER, AdamParams(learning_rate=1e-2))  # 3: snapshot
                await client.sample(ADAPTER, [1, 2, 3], 1, SamplingParams(max_tokens=4, temperature=0.0))  # 4
                async with asyncio.timeout(30):  # the mark moves over the sample, and its offset commits
                    while service.durable_seq(ADAPTER) < 4 or service._offsets.to_commit():
                        await asyncio.sleep(0.05)
                await client.forward_backward(ADAPTER, [datum])  # 5: applied, not durable
            finally:
                running.cancel()  # a crash: no drain, no shutdown checkpoint, no further commit
                await asyncio.gather(running, return_exceptions=True)
            restarted = EngineService(config)
            running = await start_engine_service(restarted)
            try:
                started = time.monotonic()
                stepped = await client.optim_step(ADAPTER, AdamParams(learning_rate=1e-2))  # 6
                waited = time.monotonic() - started
                assert stepped.version == 2
                assert waited < 20, f"the restarted engine waited {waited:.1f} s for a sequence gap"
            finally:
                restarted.request_stop()
                await asyncio.wait_for(running, 60)

    asyncio.run(main())
