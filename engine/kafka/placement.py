"""Which engine serves which adapter: Kafka's consumer group decides, this module keeps it co-partitioned.

Agents key every request by its adapter id, so the producer's default partitioner (murmur2, as in the
Java client and aiokafka) puts all of an adapter's requests on one partition number of each request
topic. The rollout, gradient and control topics have the same partition count, so that number is the
same on all three. ``CoPartitionAssignor`` then hands each group member whole partition *numbers*
(partition p of every request topic together), so one engine owns each adapter on every topic, and
``Sequencer`` can restore the adapter's order across topics inside that one engine.

The assignor is sticky: a member keeps the numbers it held (its metadata carries them), and a
rebalance moves only as many as balance needs. Adding a third engine to two moves a third of the
adapters, not two thirds as the range assignor would, and each moved adapter pauses for a snapshot
load. No coordinator of our own: the group leader runs ``assign`` inside Kafka's protocol.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

import structlog
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata
from aiokafka.partitioner import murmur2

log = structlog.get_logger("hotlora.placement")


def partition_for(adapter_id: str, partitions: int) -> int:
    """The partition number an adapter's requests land on: the producers' default partitioner."""
    return (murmur2(adapter_id.encode()) & 0x7FFFFFFF) % partitions


def balance(numbers: list[int], previous: Mapping[str, Iterable[int]], members: Iterable[str]) -> dict[str, list[int]]:
    """Assign every partition number to one member: balanced (sizes differ by at most one) and sticky.

    Each member first keeps what it held, up to its quota; numbers no one keeps (a member left, or
    gave some up) go to the members furthest below quota. Deterministic for given inputs, so the
    result does not depend on which member happens to lead the group.
    """
    order = sorted(members)
    if not order:
        return {}
    base, extra = divmod(len(numbers), len(order))
    # The members that held the most keep the larger quotas: fewer moves.
    by_holding = sorted(order, key=lambda m: (-len(set(previous.get(m, ())) & set(numbers)), m))
    quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(by_holding)}
    assigned: dict[str, list[int]] = {m: [] for m in order}
    taken: set[int] = set()
    for member in by_holding:
        for number in sorted(set(previous.get(member, ()))):
            if number in numbers and number not in taken and len(assigned[member]) < quota[member]:
                assigned[member].append(number)
                taken.add(number)
    free = [n for n in numbers if n not in taken]
    for number in free:
        member = min(order, key=lambda m: (len(assigned[m]) - quota[m], m))
        assigned[member].append(number)
    return {m: sorted(ns) for m, ns in assigned.items()}


class CoPartitionAssignor(AbstractPartitionAssignor):
    """Partition p of every subscribed topic goes to the same member (see the module docstring).

    Passed to the consumer as an instance (aiokafka only calls ``name``, ``metadata``, ``assign`` and
    ``on_assignment`` on it), so each consumer remembers its own numbers, even several in one process.
    """

    name = "hotlora-copartition"
    version = 0

    def __init__(self) -> None:
        self.held: tuple[int, ...] = ()

    def assign(  # type: ignore[override]
        self, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        topics = sorted({t for meta in members.values() for t in meta.subscription})
        counts = {t: len(cluster.partitions_for_topic(t) or ()) for t in topics}
        if len(set(counts.values())) > 1:
            # Co-partitioning is impossible: assign the common numbers only and say why, loudly.
            log.error("request_topics_not_copartitioned", partitions=counts)
        numbers = list(range(min(counts.values(), default=0)))
        previous = {member: _held(meta.user_data) for member, meta in members.items()}
        plan = balance(numbers, previous, members)
        return {
            member: ConsumerProtocolMemberAssignment(
                self.version, [(t, plan[member]) for t in topics if t in members[member].subscription], b""
            )
            for member in members
        }

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:  # type: ignore[override]
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), json.dumps(list(self.held)).encode())

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:  # type: ignore[override]
        self.held = tuple(sorted({p for _, partitions in assignment.assignment for p in partitions}))


def _held(user_data: bytes | None) -> list[int]:
    """A member's previous partition numbers; anything unreadable counts as none (it only costs moves)."""
    try:
        data = json.loads(user_data or b"[]")
    except ValueError:
        return []
    return [n for n in data if isinstance(n, int)] if isinstance(data, list) else []
