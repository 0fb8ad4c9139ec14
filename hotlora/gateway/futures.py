"""The gateway's only state: futures in flight, and the order in which each model's requests start.

**Futures.** Every Tinker call that does work answers at once with a future id; the SDK then long-polls
``retrieve_future`` until the result is there. A future id is ``<gateway id>-<n>-<nonce>``: the gateway
id is fresh per process, so after a restart (or at another gateway) an old id is answered 410 Gone,
which the SDK turns into ``RetryableException`` (sampling retries by itself) instead of a hang.
Results are kept until retrieved (plus a short grace for a retried poll) or ``keep_s``.

**Lanes.** The SDK numbers each training client's requests (``seq_id``) and sends them one after
another. ``Lanes`` starts them in that order even if two arrive out of order (a lost connection, a
retried POST): a request ahead of a gap waits up to ``gap_timeout`` for the missing one, then goes.
Starting in order is enough: ``HotLoraClient`` stamps the adapter's next ``seq`` when a call starts,
and the engine runs an adapter's requests in ``seq`` order.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from hotlora.gateway.tinker_api import TinkerError

RETRIEVED_GRACE_S = 60.0  # a retrieved result stays this long, for a poll retried after a dropped connection
SWEEP_EVERY_S = 1.0


@dataclass
class Entry:
    request_id: str
    owner: str  # the principal that made the request: no other key may read its result
    future: asyncio.Future[Any]
    created: float = field(default_factory=time.monotonic)
    retrieved_at: float | None = None


class FutureTable:
    def __init__(self, keep_s: float = 900.0, gateway_id: str | None = None) -> None:
        self.gateway_id = gateway_id or f"g{secrets.token_hex(4)}"
        self.keep_s = keep_s
        self._entries: dict[str, Entry] = {}
        self._counter = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._swept = time.monotonic()

    def __len__(self) -> int:
        return len(self._entries)

    def create(self, owner: str) -> Entry:
        now = time.monotonic()
        if now - self._swept >= SWEEP_EVERY_S:  # not on every call: a sweep walks every entry
            self.sweep(now)
        request_id = f"{self.gateway_id}-{next(self._counter)}-{secrets.token_hex(3)}"
        entry = Entry(request_id, owner, asyncio.get_running_loop().create_future())
        self._entries[request_id] = entry
        return entry

    def run(self, entry: Entry, work: Coroutine[Any, Any, Any]) -> None:
        """Start ``work`` now; its result or exception becomes the entry's."""
        task = asyncio.create_task(self._settle(entry, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _settle(entry: Entry, work: Coroutine[Any, Any, Any]) -> None:
        try:
            result = await work
        except asyncio.CancelledError:
            if not entry.future.done():
                entry.future.set_exception(TinkerError("the gateway shut down", status=503, category="server"))
            raise
        except BaseException as err:  # every failure becomes the future's: a tenant's error, never the gateway's
            if not entry.future.done():
                entry.future.set_exception(err)
            return
        if not entry.future.done():
            entry.future.set_result(result)

    def fail(self, entry: Entry, err: BaseException) -> None:
        if not entry.future.done():
            entry.future.set_exception(err)

    def get(self, request_id: str, owner: str) -> Entry:
        entry = self._entries.get(request_id) if isinstance(request_id, str) else None
        if entry is None or entry.owner != owner:
            if isinstance(request_id, str) and not request_id.startswith(f"{self.gateway_id}-"):
                raise TinkerError(
                    f"future {request_id[:80]!r} was not made by this gateway process (it restarted, or the "
                    "request went to another gateway); the request may still have run",
                    status=410,
                )
            raise TinkerError(f"future {str(request_id)[:80]!r} not found (expired or never made)", status=404)
        return entry

    async def wait(self, entry: Entry, timeout: float) -> bool:
        """True once the entry is done (within ``timeout``)."""
        if not entry.future.done():
            await asyncio.wait({entry.future}, timeout=timeout)  # returns, never raises, the future's outcome
        if entry.future.done() and entry.retrieved_at is None:
            entry.retrieved_at = time.monotonic()
        return entry.future.done()

    def sweep(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._swept = now
        stale = [
            rid
            for rid, e in self._entries.items()
            if e.future.done()
            and (
                now - e.created > self.keep_s
                or (e.retrieved_at is not None and now - e.retrieved_at > RETRIEVED_GRACE_S)
            )
        ]
        for rid in stale:
            entry = self._entries.pop(rid)
            if not entry.future.cancelled():
                entry.future.exception()  # marks a failure seen: asyncio would log one nobody retrieved

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass
class _Lane:
    next: int | None = None
    held: dict[int, Callable[[], None] | None] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None


class Lanes:
    """Starts each key's (model's) requests in ``seq_id`` order; ``seq_id`` None starts at once."""

    def __init__(self, gap_timeout: float = 10.0) -> None:
        self.gap_timeout = gap_timeout
        self._lanes: dict[str, _Lane] = {}

    def admit(self, key: str, seq_id: int | None, start: Callable[[], None]) -> None:
        if seq_id is None:
            start()
            return
        lane = self._lanes.setdefault(key, _Lane())
        if lane.next is None:
            lane.next = seq_id  # first seen here (a new model, or this gateway restarted): start there
        if seq_id < lane.next:
            start()  # its slot was given up (a gap timed out) or it is a retried POST: run now
            return
        lane.held[seq_id] = start
        self._drain(key, lane)

    def skip(self, key: str, seq_id: int | None) -> None:
        """``seq_id`` was refused before it could start: let its successors go."""
        if seq_id is None:
            return
        lane = self._lanes.setdefault(key, _Lane())
        if lane.next is None:
            lane.next = seq_id
        if seq_id >= lane.next:
            lane.held[seq_id] = None
            self._drain(key, lane)

    def forget(self, key: str) -> None:
        lane = self._lanes.pop(key, None)
        if lane is not None and lane.timer is not None:
            lane.timer.cancel()

    def _drain(self, key: str, lane: _Lane) -> None:
        while lane.next is not None and lane.next in lane.held:
            start = lane.held.pop(lane.next)
            lane.next += 1
            if start is not None:
                start()
        if lane.timer is not None:
            lane.timer.cancel()
            lane.timer = None
        if lane.held:
            lane.timer = asyncio.get_running_loop().call_later(self.gap_timeout, self._expire, key)

    def _expire(self, key: str) -> None:
        lane = self._lanes.get(key)
        if lane is None or not lane.held:
            return
        lane.timer = None
        lane.next = min(lane.held)
        self._drain(key, lane)
