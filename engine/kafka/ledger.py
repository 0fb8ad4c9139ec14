"""``DurableLedger``: which answered requests a durable snapshot covers, kept free of I/O.

The engine service commits a request's offset only once its effect is in a current snapshot
(``engine.kafka.durability``), so a crash re-delivers whatever a snapshot lacks. This ledger is the
bookkeeping behind that rule, per adapter: the ``seq`` its current snapshot covers, the encoded replies
of its recent state-changing requests (to answer a re-delivery instead of applying it again), the
requests released to the engine and not answered yet, and the answered ones waiting for a snapshot.

It never commits, publishes or writes anything. Each method returns the decision: the records whose
offsets may commit now (``Records``), the reply to publish, the point a mark may advance to. The
service applies them, and the tests read them as plain data.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from hotlora.engine.kafka.sequencing import advance_point

R = TypeVar("R")  # a request's input records, e.g. [(TopicPartition, offset)]
MAX_REPLIES = 16  # replies kept per adapter: a crash re-delivers only what the last snapshots left uncommitted


@dataclass
class _Adapter(Generic[R]):
    durable: int | None = None  # the seq its current snapshot covers; None: no snapshot
    replies: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # request_id -> (seq, encoded reply)
    open: set[int] = field(default_factory=set)  # released to the engine, not answered yet
    mutations: dict[int, bool] = field(default_factory=dict)  # state-changing seq -> reply published
    # Answered above ``durable``, waiting for a snapshot: (seq, mutating, records).
    waiting: list[tuple[int, bool, R]] = field(default_factory=list)


class DurableLedger(Generic[R]):
    """Per-adapter durability bookkeeping of the engine service; see the module docstring."""

    def __init__(self) -> None:
        self._adapters: dict[str, _Adapter[R]] = {}
        self._advance: set[str] = set()  # adapters whose mark may move over answered no-op requests

    def _get(self, adapter_id: str) -> _Adapter[R]:
        return self._adapters.setdefault(adapter_id, _Adapter())

    def durable_seq(self, adapter_id: str) -> int:
        entry = self._adapters.get(adapter_id)
        return 0 if entry is None or entry.durable is None else entry.durable

    def tracked(self, adapter_id: str) -> bool:
        """The adapter has durable state, or a state-changing request on its way to a snapshot."""
        entry = self._adapters.get(adapter_id)
        return entry is not None and (entry.durable is not None or bool(entry.mutations))

    def stored_reply(self, adapter_id: str, request_id: str) -> bytes | None:
        """The kept reply of a state-changing request re-read after the result cache dropped it."""
        entry = self._adapters.get(adapter_id)
        stored = None if entry is None else entry.replies.get(request_id)
        return None if stored is None else stored[1]

    # ----- a request's way -----

    def released(self, adapter_id: str, seq: int, mutating: bool) -> None:
        """The request goes to the engine now (in ``seq`` order)."""
        entry = self._get(adapter_id)
        entry.open.add(seq)
        if mutating:  # a snapshot at or after it waits until its reply is out
            entry.mutations.setdefault(seq, False)

    def answered(self, adapter_id: str, seq: int, request_id: str, mutating: bool, reply: bytes) -> None:
        """The request's reply is published; a state-changing one's is kept to answer a re-delivery."""
        entry = self._get(adapter_id)
        entry.open.discard(seq)
        if mutating:
            entry.replies[request_id] = (seq, reply)
            if len(entry.replies) > 2 * MAX_REPLIES:  # bounded: only the newest can still be re-delivered
                entry.replies = dict(sorted(entry.replies.items(), key=lambda item: item[1][0])[-MAX_REPLIES:])
            entry.mutations[seq] = True

    def unpublished(self, adapter_id: str, seq: int) -> bool:
        """Whether a state-changing request up to ``seq`` has no published reply yet."""
        entry = self._adapters.get(adapter_id)
        return entry is not None and any(not done for s, done in entry.mutations.items() if s <= seq)

    def commit_when_durable(self, adapter_id: str, seq: int, mutating: bool, records: R) -> list[R]:
        """The records that may commit now for an answered request: all of them when a snapshot covers it
        or the adapter has no durable state to protect (unknown, its create failed), else none yet."""
        if seq <= self.durable_seq(adapter_id) or not (mutating or self.tracked(adapter_id)):
            return [records]
        self._get(adapter_id).waiting.append((seq, mutating, records))
        if not mutating:
            self._advance.add(adapter_id)
        return []

    # ----- snapshots -----

    def covered(self, adapter_id: str, seq: int, snapshot_written: bool = True) -> list[R]:
        """Everything of the adapter up to ``seq`` is durable (or, without a snapshot, had no effect
        worth keeping): the records that may commit now."""
        entry = self._get(adapter_id)
        if snapshot_written:
            entry.durable = max(seq, entry.durable or 0)
        entry.mutations = {s: done for s, done in entry.mutations.items() if s > seq}
        done = [records for s, _, records in entry.waiting if s <= seq]
        left = [waiting for waiting in entry.waiting if waiting[0] > seq]
        if not self.tracked(adapter_id):  # no durable state left to protect (e.g. its create failed)
            done += [records for _, _, records in left]
            left = []
        entry.waiting = left
        if any(not mutating for _, mutating, _ in left):
            self._advance.add(adapter_id)
        return done

    @property
    def wants_advance(self) -> bool:
        return bool(self._advance)

    def advances(self) -> list[tuple[str, int]]:
        """(adapter, seq) marks that may move over answered requests that changed nothing (``advance_point``)."""
        points: list[tuple[str, int]] = []
        while self._advance:
            adapter_id = self._advance.pop()
            entry = self._get(adapter_id)
            waiting = [(s, mutating) for s, mutating, _ in entry.waiting]
            point = advance_point(entry.durable, entry.open, waiting)
            if point is not None:
                points.append((adapter_id, point))
        return points

    def advanced(self, adapter_id: str, seq: int) -> list[R]:
        """The store moved the adapter's mark to ``seq``: the records that may commit now."""
        if self._get(adapter_id).durable is None:
            return []
        return self.covered(adapter_id, seq)

    # ----- an adapter's life on this engine -----

    def adopt(self, adapter_id: str, seq: int, replies: dict[str, tuple[int, bytes]]) -> None:
        """The adapter was loaded from its snapshot at ``seq`` (a restart, or a rebalance gave it here)."""
        entry = self._get(adapter_id)
        # Replies above ``seq`` (kept by a snapshot written before this rule) describe effects the state lacks.
        entry.durable, entry.replies = seq, {rid: kept for rid, kept in replies.items() if kept[0] <= seq}

    def forget(self, adapter_id: str) -> list[R]:
        """The adapter is deleted or moved away; its answered requests' records may commit now."""
        entry = self._adapters.pop(adapter_id, None)
        self._advance.discard(adapter_id)
        return [] if entry is None else [records for _, _, records in entry.waiting]

    def drop_records(self, empty: R) -> None:
        """The partitions were revoked: nothing waiting may commit here any more (the next owner re-reads it)."""
        for entry in self._adapters.values():
            entry.waiting = [(s, mutating, empty) for s, mutating, _ in entry.waiting]

    def replies(self, adapter_id: str, upto: int | None = None) -> dict[str, tuple[int, bytes]]:
        """The kept replies, only those of requests up to ``upto`` when given: a snapshot at ``seq`` must
        store no reply of a later request, or after a restart from it that request would be answered
        from its stored reply while its effect is missing from the state (a lost step)."""
        entry = self._adapters.get(adapter_id)
        if entry is None:
            return {}
        return {rid: (s, reply) for rid, (s, reply) in entry.replies.items() if upto is None or s <= upto}

    def adapters(self) -> Iterable[str]:
        return list(self._adapters)
