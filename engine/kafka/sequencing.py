"""The engine service's bookkeeping, kept free of I/O so it is tested with plain data.

- ``Sequencer`` restores each adapter's ``seq`` order across the request topics.
- ``OffsetTracker`` says which input offsets may be committed: those whose records, and every earlier
  record of their partition, are fully answered.
- ``ResultCache`` remembers recent results so a retried ``request_id`` is answered, not re-run.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

_SKIPPED = object()  # a seq that was consumed without a runnable request (a dead-lettered record)


@dataclass
class _AdapterSeq:
    next: int | None = None  # None until the adapter's sequence start is known
    held: dict[int, object] = field(default_factory=dict)
    waiting_since: float = 0.0


class Sequencer(Generic[T]):
    """Per-adapter ``seq`` ordering (``docs/protocol.md`` section 6).

    ``offer`` returns the requests that may run now, in the order to submit them. The sequence of an
    adapter this engine has not seen starts at a request with ``seq = 1`` or at a ``create_adapter`` /
    ``load_state`` (which begin an adapter's life); any other first request is held, because its
    predecessors may still be in flight on another topic. A gap (missing predecessor) that lasts
    ``gap_timeout`` seconds is skipped by ``expire``, so a lost or undecodable record, or a restart in
    the middle of a sequence, delays an adapter but never blocks it forever. A request below the
    expected ``seq`` (its slot was skipped) runs at once.
    """

    def __init__(self, gap_timeout: float = 30.0) -> None:
        self.gap_timeout = gap_timeout
        self._adapters: dict[str, _AdapterSeq] = {}

    def resume(self, adapter_id: str, next_seq: int) -> None:
        """A restarted engine knows the adapter's next ``seq`` from its durable state: start there."""
        state = self._adapters.setdefault(adapter_id, _AdapterSeq())
        if state.next is None or state.next < next_seq:
            state.next = next_seq

    def last(self, adapter_id: str) -> int:
        """The last ``seq`` released for ``adapter_id`` (0 if none): what a restarted agent continues after."""
        state = self._adapters.get(adapter_id)
        return 0 if state is None or state.next is None else state.next - 1

    def forget(self, adapter_id: str) -> None:
        """The adapter moved to another engine: if it comes back, its sequence starts from its snapshot."""
        self._adapters.pop(adapter_id, None)

    def drop_held(self) -> list[T]:
        """Give up every held request (a rebalance: their records are uncommitted, so they come again)."""
        dropped: list[T] = []
        for state in self._adapters.values():
            dropped.extend(v for v in state.held.values() if v is not _SKIPPED)  # type: ignore[misc]
            state.held = {k: v for k, v in state.held.items() if v is _SKIPPED}
        return dropped

    @property
    def held(self) -> int:
        return sum(sum(v is not _SKIPPED for v in s.held.values()) for s in self._adapters.values())

    def offer(self, adapter_id: str, seq: int, item: T, now: float, starts_sequence: bool = False) -> list[T]:
        if seq == 0 or not adapter_id:
            return [item]
        state = self._adapters.setdefault(adapter_id, _AdapterSeq())
        if state.next is None and (seq == 1 or starts_sequence):
            state.next = seq
        if state.next is not None and seq < state.next:
            return [item]
        if not state.held:
            state.waiting_since = now
        state.held[seq] = item
        return self._drain(state, now)

    def skip(self, adapter_id: str, seq: int, now: float) -> list[T]:
        """``seq`` of ``adapter_id`` will never run (its record was unreadable): let its successors go."""
        if seq == 0 or not adapter_id:
            return []
        state = self._adapters.setdefault(adapter_id, _AdapterSeq())
        if state.next is not None and seq < state.next:
            return []
        if not state.held:
            state.waiting_since = now
        state.held[seq] = _SKIPPED
        return self._drain(state, now)

    def expire(self, now: float) -> list[T]:
        """Skip every gap older than ``gap_timeout``; returns the requests that may run now."""
        ready: list[T] = []
        for state in self._adapters.values():
            if state.held and now - state.waiting_since >= self.gap_timeout:
                state.next = min(state.held)
                ready.extend(self._drain(state, now))
        return ready

    def _drain(self, state: _AdapterSeq, now: float) -> list[T]:
        ready: list[T] = []
        while state.next is not None and state.next in state.held:
            item = state.held.pop(state.next)
            state.next += 1
            state.waiting_since = now
            if item is not _SKIPPED:
                ready.append(item)  # type: ignore[arg-type]
        return ready


def advance_point(durable: int | None, open_seqs: Iterable[int], answered: Iterable[tuple[int, bool]]) -> int | None:
    """How far an adapter's durable ``seq`` may move without writing its state again, or None.

    ``answered`` are the adapter's answered requests above ``durable`` as ``(seq, mutating)``;
    ``open_seqs`` those released but not answered yet. Requests are released in ``seq`` order, so every
    ``seq`` below the first open or state-changing one is answered and changed nothing: the snapshot at
    ``durable`` is also the state at the highest such ``seq``. Moving the mark there lets those records
    commit; without it, a sample answered after the last ``optim_step`` would stay uncommitted (and hold
    back its partition), or, if committed, leave a hole that a restarted engine would wait on.
    """
    if durable is None:
        return None
    answered = list(answered)
    limit = min([*open_seqs, *(s for s, mutating in answered if mutating)], default=None)
    done = [s for s, mutating in answered if not mutating and (limit is None or s < limit)]
    point = max(done, default=None)
    return point if point is not None and point > durable else None


class OffsetTracker(Generic[K]):
    """Per partition: the offset to commit is the lowest unfinished offset, or one past the highest seen."""

    def __init__(self) -> None:
        self._pending: dict[K, list[int]] = {}  # min-heaps with lazy deletion
        self._finished: dict[K, set[int]] = {}
        self._highest: dict[K, int] = {}
        self._committed: dict[K, int] = {}

    def start(self, partition: K, offset: int) -> None:
        heapq.heappush(self._pending.setdefault(partition, []), offset)
        self._highest[partition] = max(self._highest.get(partition, -1), offset)

    def finish(self, partition: K, offset: int) -> None:
        if partition in self._highest:  # else the partition was revoked meanwhile: its new owner commits
            self._finished.setdefault(partition, set()).add(offset)

    def pending(self, partition: K) -> int:
        return len(self._pending.get(partition, [])) - len(self._finished.get(partition, ()))

    def commit_point(self, partition: K) -> int | None:
        heap, finished = self._pending.get(partition, []), self._finished.get(partition, set())
        while heap and heap[0] in finished:
            finished.discard(heapq.heappop(heap))
        if partition not in self._highest:
            return None
        return heap[0] if heap else self._highest[partition] + 1

    def to_commit(self) -> dict[K, int]:
        """Partitions whose commit point moved since the last ``committed``."""
        points = {p: self.commit_point(p) for p in list(self._highest)}
        return {p: o for p, o in points.items() if o is not None and o > self._committed.get(p, -1)}

    def committed(self, offsets: dict[K, int]) -> None:
        for partition, offset in offsets.items():
            self._committed[partition] = max(self._committed.get(partition, -1), offset)

    def forget(self, partition: K) -> None:
        """The partition was revoked: a new owner re-reads whatever we did not commit."""
        for table in (self._pending, self._finished, self._highest, self._committed):
            table.pop(partition, None)


class ResultCache(Generic[K, V]):
    """A bounded LRU of recent results by ``request_id``."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
