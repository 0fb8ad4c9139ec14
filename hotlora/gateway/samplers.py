"""Frozen copies: how a sampling client keeps sampling the weights it was created from.

``save_weights_for_sampler`` writes the adapter's weights (in the training client's request order, so
exactly the weights after the requests before it), and a sampling client made from that checkpoint
samples a frozen copy: the checkpoint ``load_state``-ed as its own adapter on the engine
(``Checkpoint.frozen_adapter``). Training goes on in the original adapter; the copy never changes. A
new adapter id per version also keeps samplers that cache by adapter name (vLLM) from serving stale
weights.

Copies are a cache over the checkpoints, which stay on the engine's storage: a copy nobody sampled for
``idle_s`` seconds, or beyond the ``per_model`` most recently used copies of one training model, is
deleted, never while a sample on it is in flight. A sampling client whose copy was retired (here, or
by another gateway) reloads it from its checkpoint on its next sample, so the weights it samples never
change, only the first sample after a retirement pays for a load.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from hotlora.gateway.tenants import Tenant
from hotlora.gateway.tinker_api import Checkpoint, missing
from hotlora.schemas.errors import HotLoraError

log = structlog.get_logger("hotlora.gateway")
T = TypeVar("T")


@dataclass
class _Copy:
    tenant: Tenant
    checkpoint: Checkpoint
    adapter_id: str
    loaded: asyncio.Task[None] | None = None
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)


class FrozenCopies:
    def __init__(self, idle_s: float = 300.0, per_model: int = 4) -> None:
        self.idle_s = idle_s
        self.per_model = max(1, per_model)
        self._copies: dict[str, _Copy] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self.loads = 0  # copies loaded (including reloads after a retirement): for tests and logs
        self.retired = 0

    def __contains__(self, adapter_id: str) -> bool:
        copy = self._copies.get(adapter_id)
        return copy is not None and copy.loaded is not None and copy.loaded.done() and not copy.loaded.exception()

    async def use(self, tenant: Tenant, checkpoint: Checkpoint, call: Callable[[str], Awaitable[T]]) -> T:
        """``call(adapter_id)`` on the loaded copy of ``checkpoint`` (loading it first if needed)."""
        adapter_id = checkpoint.frozen_adapter(tenant.identity.principal)
        copy = self._copies.get(adapter_id)
        if copy is None:
            copy = self._copies[adapter_id] = _Copy(tenant, checkpoint, adapter_id)
        copy.users += 1
        try:
            await self._loaded(copy)
            try:
                return await call(adapter_id)
            except HotLoraError as err:
                if err.code != "unknown_adapter":
                    raise
                # Retired meanwhile by another gateway (or the engine restarted): load it again, once.
                copy.loaded = None
                await self._loaded(copy, reload=True)
                return await call(adapter_id)
        finally:
            copy.users -= 1
            copy.last_used = time.monotonic()
            self._enforce_limit(checkpoint.model_id)

    async def load(self, tenant: Tenant, checkpoint: Checkpoint) -> str:
        """Load the copy now (``save_weights_and_get_sampling_client``), so the first sample waits for nothing."""

        async def noop(adapter_id: str) -> str:
            return adapter_id

        return await self.use(tenant, checkpoint, noop)

    def invalidate(self, principal: str, checkpoint: Checkpoint) -> None:
        """The checkpoint was written again: a copy of its old weights must not serve it."""
        copy = self._copies.get(checkpoint.frozen_adapter(principal))
        if copy is not None:
            self._retire(copy)

    async def _loaded(self, copy: _Copy, reload: bool = False) -> None:
        if copy.loaded is None:
            copy.loaded = asyncio.create_task(self._load(copy, reload))
        try:
            await asyncio.shield(copy.loaded)
        except BaseException:
            if copy.loaded is not None and copy.loaded.done():
                copy.loaded = None  # the next use tries again
            raise

    async def _load(self, copy: _Copy, reload: bool) -> None:
        client = copy.tenant.client
        path = copy.checkpoint.storage_path(copy.tenant.identity.principal)
        # Another gateway may have loaded this copy already (same id, same immutable weights): then use it.
        # Asking also continues the adapter's seq after the engine's last, whoever sent that.
        present = await client.resume(copy.adapter_id)
        copy.tenant.created(copy.adapter_id)
        if present is not None and not reload:
            return
        try:
            try:
                await client.load_state(copy.adapter_id, path)
            except HotLoraError as err:
                if err.code != "capacity_exceeded" or not self.retire_idle(force=True):
                    raise
                await asyncio.gather(*self._retiring, return_exceptions=True)
                await client.load_state(copy.adapter_id, path)
        except HotLoraError as err:
            if err.code == "checkpoint_error":
                raise missing(copy.checkpoint) from None
            raise
        self.loads += 1
        log.info("frozen_copy_loaded", adapter_id=copy.adapter_id, checkpoint=copy.checkpoint.tinker_path)

    def _enforce_limit(self, model_id: str) -> None:
        copies = [c for c in self._copies.values() if c.checkpoint.model_id == model_id and c.loaded is not None]
        copies.sort(key=lambda c: c.last_used, reverse=True)
        for copy in copies[self.per_model :]:
            if copy.users == 0:
                self._retire(copy)

    def retire_idle(self, force: bool = False, now: float | None = None) -> int:
        """Retire copies idle for ``idle_s`` (all idle ones with ``force``); returns how many."""
        now = time.monotonic() if now is None else now
        idle = [
            c
            for c in self._copies.values()
            if c.users == 0 and c.loaded is not None and (force or now - c.last_used >= self.idle_s)
        ]
        for copy in idle:
            self._retire(copy)
        return len(idle)

    def checkpoints_of(self, principal: str) -> list[Checkpoint]:
        return [c.checkpoint for c in self._copies.values() if c.tenant.identity.principal == principal]

    def retire_model(self, model_id: str) -> None:
        for copy in [c for c in self._copies.values() if c.checkpoint.model_id == model_id and c.users == 0]:
            self._retire(copy)

    def _retire(self, copy: _Copy) -> None:
        self._copies.pop(copy.adapter_id, None)
        loaded, copy.loaded = copy.loaded, None
        if loaded is None:
            return
        self.retired += 1
        task = asyncio.create_task(self._delete(copy, loaded))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _delete(copy: _Copy, loaded: asyncio.Task[None]) -> None:
        with contextlib.suppress(BaseException):
            await loaded
        try:
            await copy.tenant.client.delete_adapter(copy.adapter_id)
            log.info("frozen_copy_retired", adapter_id=copy.adapter_id)
        except HotLoraError as err:  # already gone (another gateway retired it): nothing to free
            log.info("frozen_copy_retire_failed", adapter_id=copy.adapter_id, code=err.code)

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, min(self.idle_s / 4, 30.0)))
            self.retire_idle()

    async def close(self) -> None:
        await asyncio.gather(*self._retiring, return_exceptions=True)
