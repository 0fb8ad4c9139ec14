"""The Kafka plumbing ``record`` and ``tail`` share: topic patterns and ``.hlr`` records of consumed ones.

Both read with ``engine.kafka.admin.group_less_consumer`` (no consumer group, partitions assigned
directly): a debugging tool must never take partitions away from the engine's group or commit offsets
in anyone's name. Topics are
named exactly or by shell-style pattern (``run1.*``), because agents' reply topics
(``<prefix>.replies.<client>``) are only known once the agents have started.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from hotlora.engine.kafka.security import kafka_kwargs
from hotlora.replay.format import Record


class TopicNotFound(LookupError):
    pass


def to_record(consumed: ConsumerRecord[Any, Any]) -> Record:
    """An ``.hlr`` record of a consumed Kafka record: raw key, value and headers, untouched."""
    return Record(
        topic=consumed.topic,
        partition=consumed.partition,
        offset=consumed.offset,
        timestamp=consumed.timestamp if consumed.timestamp is not None else -1,
        key=consumed.key,
        value=consumed.value,
        headers=[(k, bytes(v)) for k, v in consumed.headers or ()],
    )


def is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


def match_topics(available: Sequence[str], patterns: Sequence[str], *, strict: bool = True) -> list[str]:
    """The available topics each name or pattern selects, sorted. With ``strict``, a plain name that
    does not exist, or a pattern that selects nothing, is an error (a typo should not record nothing)."""
    chosen: set[str] = set()
    for pattern in patterns:
        if is_pattern(pattern):
            hits = [t for t in available if fnmatch.fnmatchcase(t, pattern) and not t.startswith("__")]
        else:
            hits = [pattern] if pattern in available else []
        if not hits and strict:
            raise TopicNotFound(f"no topic matches {pattern!r}" if is_pattern(pattern) else f"no topic {pattern!r}")
        chosen.update(hits)
    return sorted(chosen)


async def partitions_of(
    consumer: AIOKafkaConsumer, bootstrap: str, patterns: Sequence[str], *, strict: bool = True
) -> list[TopicPartition]:
    """Every partition of the topics the patterns select, with fresh metadata.

    A topic created after the consumer started is listed by ``topics()`` but unknown to the consumer's
    own metadata (``partitions_for_topic`` is None), so its partitions come from the admin client.
    """
    available = sorted(await consumer.topics())
    chosen = match_topics(available, patterns, strict=strict)
    unknown = [t for t in chosen if not consumer.partitions_for_topic(t)]
    described = await _describe_partitions(bootstrap, unknown) if unknown else {}
    found: list[TopicPartition] = []
    for topic in chosen:
        numbers = consumer.partitions_for_topic(topic) or described.get(topic, ())
        found += [TopicPartition(topic, p) for p in sorted(numbers)]
    return found


async def _describe_partitions(bootstrap: str, topics: list[str]) -> dict[str, list[int]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **kafka_kwargs())
    await admin.start()
    try:
        return {
            d["topic"]: [p["partition"] for p in d["partitions"]]
            for d in await admin.describe_topics(topics)
            if d.get("error_code", 0) == 0
        }
    finally:
        await admin.close()
