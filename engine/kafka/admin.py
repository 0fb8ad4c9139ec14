"""Topic administration: create hotlora's topics explicitly (Kafka auto-creation picks its own partition count).

Used by the engine at start and by ``hotlora topics``. ``security`` is the aiokafka TLS/SASL kwargs
(``engine.kafka.security``); ``None`` reads them from the ``HOTLORA_*`` environment variables.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from hotlora.engine.kafka.security import kafka_kwargs
from hotlora.schemas.topics import Topics

MAX_FETCH_BYTES = 64 * 1024 * 1024  # a forward_backward of long rollouts is far above Kafka's 1 MiB default


def _admin(bootstrap: str, security: Mapping[str, Any] | None) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(bootstrap_servers=bootstrap, **(kafka_kwargs() if security is None else security))


async def create_topics(
    bootstrap: str,
    names: list[str] | tuple[str, ...],
    partitions: int = 4,
    replication_factor: int = 1,
    *,
    security: Mapping[str, Any] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet; returns the names created (existing ones are left alone)."""
    admin = _admin(bootstrap, security)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in names if name not in existing]
        if not missing:
            return []
        response = await admin.create_topics([NewTopic(name, partitions, replication_factor) for name in missing])
        created: list[str] = []
        for name, code, *rest in response.topic_errors:
            if code == 0:
                created.append(name)
            elif code != TopicAlreadyExistsError.errno:  # another engine created it first: fine
                message = rest[0] if rest and rest[0] else ""
                raise for_code(code)(f"creating topic {name!r}: {message}")
        return created
    finally:
        await admin.close()


async def ensure_topics(
    bootstrap: str,
    topics: Topics,
    partitions: int = 4,
    replication_factor: int = 1,
    *,
    security: Mapping[str, Any] | None = None,
) -> list[str]:
    return await create_topics(bootstrap, topics.all(), partitions, replication_factor, security=security)


async def list_topics(
    bootstrap: str, prefix: str | None = None, *, security: Mapping[str, Any] | None = None
) -> list[str]:
    """Topic names, sorted; only those under ``<prefix>.`` when a prefix is given."""
    admin = _admin(bootstrap, security)
    await admin.start()
    try:
        names = await admin.list_topics()
    finally:
        await admin.close()
    return sorted(n for n in names if prefix is None or n.startswith(f"{prefix}."))


async def group_members(
    bootstrap: str, group: str, *, security: Mapping[str, Any] | None = None, timeout: float = 5.0
) -> int | None:
    """How many members the consumer group has now (a dead one counts until its session expires), or
    None when the broker would not say."""
    admin = _admin(bootstrap, security)
    try:
        async with asyncio.timeout(timeout):
            await admin.start()
            (described,) = await admin.describe_consumer_groups([group])
    except (KafkaError, OSError, TimeoutError, ValueError):
        return None
    finally:
        with contextlib.suppress(Exception):  # a client that never connected has nothing to close
            await admin.close()
    error_code, members = described.groups[0][0], described.groups[0][5]  # v0-v5: error, id, state, ..., members
    return None if error_code else len(members)


def group_less_consumer(bootstrap: str, fetch_max_wait_ms: int = 50) -> AIOKafkaConsumer:
    """Reads any partition it is assigned; TLS/SASL from the ``HOTLORA_*`` variables, like every client.

    ``fetch_max_wait_ms`` is short because Tansu answers an empty fetch only when the wait expires.
    """
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=fetch_max_wait_ms,
        fetch_max_bytes=MAX_FETCH_BYTES,
        max_partition_fetch_bytes=MAX_FETCH_BYTES,
        **kafka_kwargs(),
    )


async def log_end_offsets(
    bootstrap: str, partitions: Sequence[TopicPartition], timeout: float = 10.0
) -> dict[TopicPartition, int]:
    """Each partition's log end offset (the offset the next record will get).

    Why not just ``end_offsets``: Tansu 0.6 answers ListOffsets(latest) with the last record *batch*'s
    base offset + 1, so when the newest batch holds several records (two pipelined requests sent
    together) it reports an end short of the log and a recorder stopping there silently drops them.
    So this reads the log from just below the listed end up to the fetch's high watermark, and the end
    is the largest of the listed end, the high watermark and the last record read + 1: right whether or
    not the broker's high watermark is. A partition it cannot read up to its end within ``timeout`` is an
    error, never a silently short answer.
    """
    if not partitions:
        return {}
    probe = group_less_consumer(bootstrap, fetch_max_wait_ms=10)
    await probe.start()
    try:
        ends = dict(await probe.end_offsets(list(partitions)))
        probe.assign(list(partitions))
        for tp in partitions:
            probe.seek(tp, max(ends[tp] - 1, 0))
        pending = set(partitions)
        deadline = asyncio.get_running_loop().time() + timeout
        while pending:
            if asyncio.get_running_loop().time() >= deadline:
                raise TimeoutError(f"could not read the log end of {sorted(map(str, pending))} within {timeout:.0f} s")
            for tp, records in (await probe.getmany(timeout_ms=50)).items():
                if records:
                    ends[tp] = max(ends[tp], records[-1].offset + 1)
            for tp in list(pending):
                highwater = probe.highwater(tp)
                if highwater is not None:
                    ends[tp] = max(ends[tp], highwater)
                    if await probe.position(tp) >= ends[tp]:
                        pending.discard(tp)
        return ends
    finally:
        await probe.stop()
