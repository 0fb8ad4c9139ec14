"""An agent's metrics: one ``Metrics`` message per step, as a JSON line on stdout and on the metrics topic.

Writers: ``MetricsSink`` (stdout, plus Kafka when given a broker). Readers, for ``hotlora plot``:
``read_jsonl`` (an agent's stdout saved to a file) and ``read_topic`` (the metrics topic from its
beginning up to its end at call time); ``read_events`` also returns the engines' heartbeats.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO

import msgspec
from aiokafka import AIOKafkaProducer, TopicPartition

from hotlora.engine.kafka.admin import group_less_consumer, log_end_offsets
from hotlora.engine.kafka.security import kafka_kwargs
from hotlora.schemas import Message, Metrics, SchemaError, Topics, decode, encode, key_for


def to_json_line(metrics: Metrics) -> str:
    return msgspec.json.encode(metrics).decode()


class MetricsSink:
    """Prints each ``Metrics`` as one JSON line and, with ``bootstrap``, publishes it to the metrics topic."""

    def __init__(self, bootstrap: str | None = None, topic_prefix: str = "hotlora", out: IO[str] | None = None):
        self.topic = Topics(topic_prefix).metrics
        self.bootstrap = bootstrap
        self.out = out if out is not None else sys.stdout
        self.sent: list[Metrics] = []
        self._producer: AIOKafkaProducer | None = None

    async def __aenter__(self) -> MetricsSink:
        if self.bootstrap:
            self._producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap, acks="all", linger_ms=0, **kafka_kwargs()
            )
            await self._producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def __call__(self, metrics: Metrics) -> None:
        self.sent.append(metrics)
        print(to_json_line(metrics), file=self.out, flush=True)
        if self._producer is not None:
            await self._producer.send_and_wait(self.topic, encode(metrics), key=key_for(metrics))


def read_jsonl(path: str | Path) -> list[Metrics]:
    """The ``Metrics`` lines of a file; other lines (logs, an agent's final summary) are skipped."""
    found = []
    for line in Path(path).read_text().splitlines():
        try:
            found.append(msgspec.json.decode(line, type=Metrics))
        except msgspec.DecodeError:  # includes ValidationError: a JSON line of another shape
            continue
    return found


async def read_topic(bootstrap: str, topic_prefix: str = "hotlora") -> list[Metrics]:
    """Every ``Metrics`` on the metrics topic, from the beginning to the end offsets seen at the start."""
    return [m for m in await read_events(bootstrap, topic_prefix) if isinstance(m, Metrics)]


async def read_events(bootstrap: str, topic_prefix: str = "hotlora", since_ms: int | None = None) -> list[Message]:
    """Every message on the metrics topic (agents' ``Metrics``, engines' heartbeats and status) up to the
    end offsets seen at the start; ``since_ms`` starts at the first record the broker stored at or after
    that time (arrival time), else at the beginning. Undecodable records are skipped."""
    topic = Topics(topic_prefix).metrics
    consumer = group_less_consumer(bootstrap)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not partitions:
            raise SystemExit(f"error: topic {topic} does not exist")
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await log_end_offsets(bootstrap, partitions)  # not end_offsets: Tansu's can read short
        if since_ms is not None:
            for tp, found_at in (await consumer.offsets_for_times({tp: since_ms for tp in partitions})).items():
                consumer.seek(tp, found_at.offset if found_at is not None else ends[tp])
        found: list[Message] = []
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    try:
                        found.append(decode(record.value or b""))
                    except SchemaError:
                        continue
        return found
    finally:
        await consumer.stop()
