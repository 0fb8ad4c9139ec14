"""Waiting for an engine the way tests and launchers should: on its heartbeat, never on a sleep."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition

from hotlora.engine.kafka.security import kafka_kwargs
from hotlora.schemas import Heartbeat, SchemaError, Topics, decode

POLL_MS = 200


async def wait_for_heartbeat(
    bootstrap: str, topic_prefix: str = "hotlora", timeout: float = 120.0, engine_id: str | None = None
) -> Heartbeat:
    """The first engine heartbeat on ``{prefix}.metrics`` (of ``engine_id``, if given: a restarted engine's);
    raises ``TimeoutError`` after ``timeout`` s.

    The metrics topic exists only once an engine created it, so this polls for the topic first. It
    reads from the beginning: with a fresh prefix, any heartbeat there is this deployment's engine.
    """
    topic = Topics(topic_prefix).metrics
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, **kafka_kwargs())
    await consumer.start()
    try:
        async with asyncio.timeout(timeout):
            while topic not in await consumer.topics():  # topics() refreshes the cluster metadata
                await asyncio.sleep(POLL_MS / 1000)
            partitions = consumer.partitions_for_topic(topic) or {0}
            assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(assigned)
            await consumer.seek_to_beginning(*assigned)
            while True:
                batches = await consumer.getmany(timeout_ms=POLL_MS)
                for records in batches.values():
                    for record in records:
                        try:
                            message = decode(record.value)
                        except SchemaError:
                            continue
                        if isinstance(message, Heartbeat) and engine_id in (None, message.engine_id):
                            return message
    finally:
        await consumer.stop()
