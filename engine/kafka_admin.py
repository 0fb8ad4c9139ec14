"""Topic administration: create hotlora's topics explicitly (Kafka auto-creation picks its own partition count).

Used by the engine at start and by ``hotlora topics``. ``security`` is the aiokafka TLS/SASL kwargs
(``engine.kafka_security``); ``None`` reads them from the ``HOTLORA_*`` environment variables.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from hotlora.engine.kafka_security import kafka_kwargs
from hotlora.schemas.topics import Topics


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
