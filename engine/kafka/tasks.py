"""``Tasks``: the engine service's request tasks and the follow-ups they start (snapshots, replies).

A request's task can start another as it finishes: an ``optim_step`` starts the task that writes its
snapshot, a create its save barrier. Whoever waits for the service's work (a shutdown, a rebalance)
must wait for those too, or a snapshot started meanwhile is cancelled and its step redone after a
restart. ``wait`` does: it waits until no task is left, whenever each was started.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger("hotlora.service")


class Tasks:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Start ``coro`` now; tasks start in creation order (the engine relies on it for ``seq`` order)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task_failed", error=repr(task.exception()))

    async def wait(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds until every task is done, those started meanwhile too; returns
        how many are still running then (0: all done)."""
        deadline = time.monotonic() + timeout
        while self._tasks and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(set(self._tasks), timeout=left)
        return len(self._tasks)

    async def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
