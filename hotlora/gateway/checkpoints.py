"""Checkpoint listing from the engine's own record: the ``checkpoints`` topic.

The engine publishes a ``CheckpointEvent`` for every state it saves, with the path. The gateway reads
that topic from its beginning and keeps the Tinker checkpoints it recognises (paths
``tinker/<principal>/<adapter>/<kind>/<name>``), so any gateway lists every checkpoint, whichever
gateway saved it. Saves made through this gateway are recorded as soon as they complete, too, so a
listing right after a save never misses it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import structlog

from hotlora.agents import HotLoraClient
from hotlora.gateway.tinker_api import EPHEMERAL, Checkpoint, checkpoint_from_storage
from hotlora.schemas.errors import HotLoraError

log = structlog.get_logger("hotlora.gateway")


@dataclass(frozen=True)
class Saved:
    checkpoint: Checkpoint
    time_ms: int

    def json(self) -> dict[str, Any]:
        return {
            "checkpoint_id": self.checkpoint.checkpoint_id,
            "checkpoint_type": "training" if self.checkpoint.kind == "weights" else "sampler",
            "time": datetime.fromtimestamp(self.time_ms / 1000, tz=timezone.utc).isoformat(),
            "tinker_path": self.checkpoint.tinker_path,
        }


class CheckpointIndex:
    def __init__(self) -> None:
        # (principal dir, model id) -> checkpoint id -> the latest save
        self._saved: dict[tuple[str, str], dict[str, Saved]] = {}

    def record(self, principal_dir: str, checkpoint: Checkpoint, time_ms: int | None = None) -> None:
        saved = Saved(checkpoint, time_ms if time_ms is not None else int(time.time() * 1000))
        self._saved.setdefault((principal_dir, checkpoint.model_id), {})[checkpoint.checkpoint_id] = saved

    def record_path(self, path: str, time_ms: int) -> None:
        found = checkpoint_from_storage(path)
        if found is not None:
            self.record(found[0], found[1], time_ms)

    def known(self, principal_dir: str, model_id: str) -> bool:
        return (principal_dir, model_id) in self._saved

    def list(self, principal_dir: str, model_id: str) -> list[Saved]:
        saved = self._saved.get((principal_dir, model_id), {}).values()
        return sorted((s for s in saved if not s.checkpoint.name.startswith(EPHEMERAL)), key=lambda s: s.time_ms)

    async def follow(self, client: HotLoraClient, retry_s: float = 1.0) -> None:
        """Index every checkpoint event, from the topic's beginning, for as long as the gateway runs."""
        while True:
            try:
                async for event in client.checkpoints(from_beginning=True):
                    self.record_path(event.path, event.sent_at_ms)
            except HotLoraError as err:  # the topic is not there yet: the engine has not started
                log.debug("checkpoint_index_waiting", error=str(err))
            await asyncio.sleep(retry_s)
