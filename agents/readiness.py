"""Waiting for an engine the way tests and launchers should: on its ``running`` announcement, never on a sleep.

Why it is built this way (each was a measured lag, 15-50 s in all, on Tansu):

* The metrics topic may not exist yet when the waiter starts. A consumer that assigns partitions by hand
  must know them, and aiokafka never refreshes its own cluster view for a topic that appeared after it
  started (``topics()`` fetches a separate copy): it fell back to partition 0 and saw only the
  announcements that happened to land there. Here the consumer lists the cluster's topics every
  ``METADATA_MS`` until the topic exists, then *subscribes* to it (no group) and so reads every
  partition. Not subscribing earlier matters: a metadata request naming a missing topic makes Tansu
  (and Kafka with ``auto.create.topics.enable``) create it, with the broker's partition count.
* Tansu answers an empty fetch only when the fetch wait expires, so a long wait is added latency.
* An engine announces ``running`` (``engine_status`` and a heartbeat) the moment it joined its group
  and took its partitions; this waits for that state, not for any heartbeat (one may say ``starting``).

For a probe that needs no Kafka at all, an engine started with ``--metrics-port`` answers ``GET /ready``.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer

from hotlora.engine.kafka.security import kafka_kwargs
from hotlora.schemas import EngineStatus, Heartbeat, SchemaError, Topics, decode

POLL_MS = 200
METADATA_MS = 100  # how often the topics are listed while the metrics topic does not exist
FETCH_WAIT_MS = 10  # Tansu holds an empty fetch this long


async def wait_for_engine(
    bootstrap: str,
    topic_prefix: str = "hotlora",
    timeout: float = 120.0,
    engine_id: str | None = None,
    since_ms: int | None = None,
) -> Heartbeat | EngineStatus:
    """The first announcement on ``{prefix}.metrics`` that an engine is ``running`` (serving its partitions).

    ``engine_id``: only that engine's (a restarted engine's). ``since_ms``: only one published at or after
    this wall time in ms (a restart on a prefix whose log still holds the previous run's ``running``).
    Raises ``TimeoutError`` after ``timeout`` s. It reads the topic from its beginning, so an engine that
    is already running is found at once (its status at start is on the topic).
    """
    topic = Topics(topic_prefix).metrics
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        metadata_max_age_ms=METADATA_MS,
        fetch_max_wait_ms=FETCH_WAIT_MS,
        **kafka_kwargs(),
    )
    await consumer.start()
    try:
        async with asyncio.timeout(timeout):
            while topic not in await consumer.topics():  # all topics' metadata: creates nothing
                await asyncio.sleep(METADATA_MS / 1000)
            consumer.subscribe([topic])
            while True:
                for records in (await consumer.getmany(timeout_ms=POLL_MS)).values():
                    for record in records:
                        if since_ms is not None and record.timestamp < since_ms:
                            continue
                        try:
                            message = decode(record.value)
                        except SchemaError:
                            continue
                        if not isinstance(message, Heartbeat | EngineStatus) or message.state != "running":
                            continue
                        if engine_id in (None, message.engine_id):
                            return message
    finally:
        await consumer.stop()


async def wait_for_heartbeat(
    bootstrap: str, topic_prefix: str = "hotlora", timeout: float = 120.0, engine_id: str | None = None
) -> Heartbeat | EngineStatus:
    """The older name of ``wait_for_engine``, kept for launchers written against it."""
    return await wait_for_engine(bootstrap, topic_prefix, timeout, engine_id)
