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

``Handover`` is this engine's side of a rebalance: quiesce (or fence) before, adopt after.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import structlog
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata
from aiokafka.partitioner import murmur2

from hotlora.engine.kafka.durability import Durability, DurableAdapter, Records
from hotlora.engine.kafka.ownership import OwnershipGate
from hotlora.engine.kafka.sequencing import Sequencer
from hotlora.engine.kafka.tasks import Tasks
from hotlora.engine.observability import EngineMetrics
from hotlora.engine.types import DeleteAdapter, ListAdapters, LoadState
from hotlora.schemas.errors import HotLoraError

if TYPE_CHECKING:  # the edge imports before torch does (engine.kafka.service)
    from hotlora.engine.core import Engine

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


class Handover:
    """This engine's side of a rebalance: let go of partitions before the group moves them, take over after.

    Kafka's eager rebalance takes every partition from every member, and the consumer hands out no
    records until the new assignment, so nothing new starts meanwhile. ``quiesce`` lets what was started
    finish (replies, snapshots and the follow-ups they start) within the group's budget; past it the
    engine is fenced (closed) before the group gives its adapters to another one, so none is ever served
    twice. ``adopt`` unloads the adapters this engine lost and loads the ones it gained from the shared
    snapshot store. Both return the records whose offsets may commit; the service commits them.
    """

    def __init__(
        self,
        engine: Engine,
        durability: Durability | None,
        sequencer: Sequencer[Any],
        owners: OwnershipGate,
        metrics: EngineMetrics | None,
        rebalance_timeout_ms: int,
    ) -> None:
        self.engine = engine
        self.durability = durability
        self.sequencer = sequencer
        self.owners = owners
        self.metrics = metrics
        self.rebalance_timeout_ms = rebalance_timeout_ms
        self.owned: set[int] | None = None  # the partition numbers this engine owns; None before the first
        self.fenced = False

    async def quiesce(self, tasks: Tasks) -> bool:
        """Wait for every started task, within the group's budget; False (and fenced) when that ran out."""
        # The group waits rebalance_timeout_ms for this engine; past it the adapters go to others anyway.
        budget = self.rebalance_timeout_ms / 1000
        unfinished = await tasks.wait(budget - max(1.0, 0.2 * budget))
        if unfinished:
            await self._fence(unfinished)
        return not unfinished

    async def _fence(self, unfinished: int) -> None:
        """Crash-only exit when the work cannot be released in time. Whatever was not durable is re-read
        from Kafka by the new owner, exactly as after a SIGKILL (docs/reliability.md)."""
        log.error("rebalance_overrun", unfinished=unfinished, rebalance_timeout_ms=self.rebalance_timeout_ms)
        self.fenced = True
        await self.engine.close()

    async def adopt(self, numbers: set[int], total: int) -> list[Records]:
        """Serve partition ``numbers`` (of ``total``): release lost adapters, load gained ones."""
        gained = numbers - (self.owned or set())
        done: list[Records] = []
        for info in await self.engine.submit(ListAdapters()):
            if partition_for(info.adapter_id, total) not in numbers:
                done += await self._release(info.adapter_id)
        if gained:
            self.owners.registry.reload(lambda adapter_id: partition_for(adapter_id, total) in gained)
        if self.durability is not None and gained:
            for saved in await asyncio.to_thread(self.durability.store.load_all):
                if partition_for(saved.adapter_id, total) in gained:
                    await self._acquire(saved)
        self.owned = numbers
        return done

    async def _acquire(self, saved: DurableAdapter) -> None:
        """Load an adapter this engine now owns from its current snapshot; its sequence resumes after it."""
        assert self.durability is not None
        started = time.perf_counter()
        try:
            await self.engine.submit(LoadState(saved.adapter_id, saved.path))
        except HotLoraError as err:
            log.error("restore_failed", adapter_id=saved.adapter_id, path=str(saved.path), error=str(err))
            return
        self.durability.ledger.adopt(saved.adapter_id, saved.seq, saved.replies)
        self.sequencer.forget(saved.adapter_id)
        self.sequencer.resume(saved.adapter_id, saved.seq + 1)
        seconds = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.adopt(saved.adapter_id, saved.version)
        log.info("adapter_acquired", adapter_id=saved.adapter_id, seq=saved.seq, version=saved.version, load_s=seconds)

    async def _release(self, adapter_id: str) -> list[Records]:
        """Unload an adapter another engine now owns. Its state is durable already (``quiesce``)."""
        try:
            await self.engine.submit(DeleteAdapter(adapter_id))
        except HotLoraError as err:
            log.error("release_failed", adapter_id=adapter_id, error=str(err))
        done = [] if self.durability is None else self.durability.ledger.forget(adapter_id)
        self.sequencer.forget(adapter_id)
        if self.metrics is not None:
            self.metrics.forget(adapter_id)
        if self.durability is None:
            log.warning("adapter_released_without_state", adapter_id=adapter_id)
        log.info("adapter_released", adapter_id=adapter_id)
        return done
