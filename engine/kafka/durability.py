"""Durable adapter state: what a restarted engine resumes from after a crash (``kill -9`` included).

After every ``create_adapter``, ``optim_step`` and ``load_state`` the engine service writes the
adapter's full training state (PEFT weights, AdamW moments, RNG, version) into a fresh snapshot
directory, together with ``durable.json``: the last ``seq`` of the adapter that the snapshot covers
and the encoded replies of the adapter's recent mutating requests. Then it points ``CURRENT`` at the
new snapshot with an atomic rename, and only then removes the older one. A crash at any moment
leaves either the old or the new snapshot current, never half of one.

Layout::

    <root>/<adapter dir>/CURRENT          the name of the current snapshot directory
    <root>/<adapter dir>/snap-<seq>/       a checkpoint (engine.checkpoint) plus durable.json

The service commits a request's Kafka offset only once its effect is in a current snapshot, so
whatever a crash loses is re-delivered, and whatever a snapshot holds is answered from its stored
replies instead of being applied again. JSON and safetensors only: nothing is pickled.

Two parts: ``DurableStore`` (blocking file I/O, the ``SnapshotStore`` the engines share) and
``Durability``, the service's use of it: it writes the snapshots and returns what the pure
``DurableLedger`` (``engine.kafka.ledger``) decides, the records whose offsets may commit now.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from hotlora.engine.kafka.ledger import MAX_REPLIES, DurableLedger
from hotlora.engine.types import SaveState
from hotlora.schemas import messages as wire
from hotlora.schemas.codec import decode
from hotlora.schemas.errors import HotLoraError

if TYPE_CHECKING:  # the edge imports before torch does (engine.kafka.service)
    from hotlora.engine.core import Engine

log = structlog.get_logger("hotlora.service")

DURABLE_FILE = "durable.json"
CURRENT_FILE = "CURRENT"
FORMAT = "hotlora-durable"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
REPLY_WAIT_S = 120.0  # a snapshot waits this long for the replies it stores (they are being published)
Records = list[tuple[Any, int]]  # (partition, offset) of the input records a request answers


@dataclass
class DurableAdapter:
    """One adapter's current snapshot: where its state is, the seq it covers and its stored replies."""

    adapter_id: str
    seq: int
    version: int
    path: Path
    replies: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # request_id -> (seq, encoded reply)


def adapter_dir_name(adapter_id: str) -> str:
    """A file name for any adapter id: readable, and distinct even where sanitising makes ids collide."""
    digest = hashlib.sha256(adapter_id.encode()).hexdigest()[:10]
    return f"{_UNSAFE.sub('_', adapter_id)[:80]}-{digest}"


class SnapshotStore(Protocol):
    """What the engine service needs from a checkpoint store; blocking calls, made from a thread.

    Several engines share one store (scale-out, ``docs/scale-out.md``): an adapter is served by one
    engine at a time, so only its current owner writes its entries, and a new owner reads them when
    the consumer group hands it the adapter. ``DurableStore`` keeps them in a directory (local disk, a
    compose volume, a network filesystem); an object store would implement the same five calls, with
    ``snapshot_path`` a local staging directory that ``commit`` uploads.
    """

    def snapshot_path(self, adapter_id: str, seq: int) -> Path: ...

    def commit(
        self, adapter_id: str, seq: int, version: int, snapshot: Path, replies: dict[str, tuple[int, bytes]]
    ) -> None: ...

    def advance(self, adapter_id: str, seq: int) -> bool: ...

    def remove(self, adapter_id: str) -> None: ...

    def load_all(self) -> list[DurableAdapter]: ...


class DurableStore:
    """Snapshots in a directory tree under ``root``; see the module docstring. Blocking I/O."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def snapshot_path(self, adapter_id: str, seq: int) -> Path:
        return self.root / adapter_dir_name(adapter_id) / f"snap-{seq}"

    def commit(
        self, adapter_id: str, seq: int, version: int, snapshot: Path, replies: dict[str, tuple[int, bytes]]
    ) -> None:
        """Make ``snapshot`` (already written) current for ``adapter_id``; older snapshots go."""
        kept = sorted(replies.items(), key=lambda item: item[1][0])[-MAX_REPLIES:]
        meta = {
            "format": FORMAT,
            "adapter_id": adapter_id,
            "seq": seq,
            "version": version,
            "replies": {rid: [s, base64.b64encode(data).decode()] for rid, (s, data) in kept},
        }
        _write_atomic(snapshot / DURABLE_FILE, json.dumps(meta).encode())
        for item in snapshot.iterdir():  # the checkpoint's files too: a power loss must not keep half of them
            if item.is_file():
                _fsync_file(item)
        _fsync_dir(snapshot)
        adapter_dir = snapshot.parent
        _write_atomic(adapter_dir / CURRENT_FILE, snapshot.name.encode())
        for old in adapter_dir.iterdir():
            if old.is_dir() and old.name != snapshot.name:
                shutil.rmtree(old, ignore_errors=True)

    def advance(self, adapter_id: str, seq: int) -> bool:
        """The current snapshot also covers ``seq``: every request up to it since the snapshot changed
        no state (samples, saves). Rewrites ``durable.json`` only; False if there is no snapshot."""
        current = self._current(self.root / adapter_dir_name(adapter_id))
        if current is None or seq <= current.seq:
            return current is not None
        meta = json.loads((current.path / DURABLE_FILE).read_text())
        meta["seq"] = seq
        _write_atomic(current.path / DURABLE_FILE, json.dumps(meta).encode())
        return True

    def remove(self, adapter_id: str) -> None:
        """The adapter was deleted: a restart must not bring it back."""
        shutil.rmtree(self.root / adapter_dir_name(adapter_id), ignore_errors=True)

    def load_all(self) -> list[DurableAdapter]:
        """Every adapter's current snapshot; directories without a complete one are skipped."""
        found: list[DurableAdapter] = []
        if not self.root.is_dir():
            return found
        for adapter_dir in sorted(self.root.iterdir()):
            if (current := self._current(adapter_dir)) is not None:
                found.append(current)
        return found

    @staticmethod
    def _current(adapter_dir: Path) -> DurableAdapter | None:
        try:
            snapshot = adapter_dir / (adapter_dir / CURRENT_FILE).read_text().strip()
            meta = json.loads((snapshot / DURABLE_FILE).read_text())
        except (OSError, ValueError):  # no CURRENT yet, or a directory the store does not own
            return None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            return None
        replies = {rid: (int(s), base64.b64decode(data)) for rid, (s, data) in meta["replies"].items()}
        return DurableAdapter(meta["adapter_id"], int(meta["seq"]), int(meta["version"]), snapshot, replies)


class Durability:
    """The engine service's durable snapshots. Each coroutine writes what it must and returns the
    ledger's decision, the records whose offsets may commit now; it never commits or publishes."""

    def __init__(self, store: SnapshotStore) -> None:
        self.store = store
        self.ledger: DurableLedger[Records] = DurableLedger()
        self._locks: dict[str, asyncio.Lock] = {}
        self._published: asyncio.Future[None] | None = None  # resolved (and replaced) as replies go out

    def lock(self, adapter_id: str) -> asyncio.Lock:
        """One snapshot of an adapter at a time, in seq order: a later one never loses to an earlier one."""
        return self._locks.setdefault(adapter_id, asyncio.Lock())

    def answered(self, adapter_id: str, seq: int, request_id: str, mutating: bool, reply: bytes) -> None:
        """A sequenced request's reply is published (``DurableLedger.answered``); snapshots waiting for it go on."""
        self.ledger.answered(adapter_id, seq, request_id, mutating, reply)
        if mutating and self._published is not None:
            self._published.set_result(None)
            self._published = None

    def stored_reply(self, message: wire.RequestMessage) -> wire.ResultMessage | None:
        """The kept reply of a mutating request re-read after the result cache dropped it."""
        stored = self.ledger.stored_reply(message.adapter_id, message.request_id)
        return None if stored is None else decode(stored)  # type: ignore[return-value]

    def reply_if_applied(self, message: wire.RequestMessage) -> wire.ResultMessage | None:
        """The answer to a state-changing request a current snapshot already covers: its stored reply,
        or ``duplicate`` once that reply is no longer kept; None if the request is not applied yet."""
        if message.seq > self.ledger.durable_seq(message.adapter_id):
            return None
        return self.stored_reply(message) or wire.Error(
            request_id=message.request_id,
            adapter_id=message.adapter_id,
            seq=message.seq,
            reply_to=message.reply_to,
            code="duplicate",
            message=f"seq {message.seq} of adapter {message.adapter_id!r} was already applied; its reply is "
            "no longer kept",
        )

    async def snapshot(self, engine: Engine, adapter_id: str, seq: int) -> list[Records]:
        """Write the adapter's state as of ``seq`` through a save barrier (after create and load)."""
        started = time.perf_counter()
        path = self.store.snapshot_path(adapter_id, seq)
        async with self.lock(adapter_id):
            try:
                saved = await engine.submit(SaveState(adapter_id, path, include_optimizer=True))
            except HotLoraError as err:  # e.g. the create failed: no state to keep; the seq is used up anyway
                log.info("snapshot_skipped", adapter_id=adapter_id, seq=seq, error=str(err))
                return self.ledger.covered(adapter_id, seq, snapshot_written=False)
            return await self._commit(adapter_id, seq, saved.version, Path(saved.path), started)

    async def persist(self, base: str | Path, adapter_id: str, seq: int, state: Any) -> list[Records]:
        """Write an optim_step's captured state as the adapter's snapshot at ``seq`` (file I/O in a thread)."""
        started = time.perf_counter()
        path = self.store.snapshot_path(adapter_id, seq)
        async with self.lock(adapter_id):
            if seq <= self.ledger.durable_seq(adapter_id):
                return []
            from hotlora.engine.checkpoint import save_checkpoint  # torch: loaded by now (an optim_step ran)

            try:
                await asyncio.to_thread(save_checkpoint, path, adapter_id, state, base)
            except OSError as err:
                log.error("snapshot_failed", adapter_id=adapter_id, seq=seq, error=str(err))
                return []
            return await self._commit(adapter_id, seq, state.version, path, started)

    async def _commit(self, adapter_id: str, seq: int, version: int, path: Path, started: float) -> list[Records]:
        """Wait for the replies the snapshot stores, then make it current."""
        deadline = time.monotonic() + REPLY_WAIT_S
        while self.ledger.unpublished(adapter_id, seq):
            if self._published is None:
                self._published = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._published), deadline - time.monotonic())
            except TimeoutError:  # a reply that never went out: keep the state; that request answers `duplicate`
                log.error("snapshot_reply_wait_timeout", adapter_id=adapter_id, seq=seq)
                break
        replies = self.ledger.replies(adapter_id, upto=seq)  # requests answered after the capture are not in it
        try:
            await asyncio.to_thread(self.store.commit, adapter_id, seq, version, path, replies)
        except OSError as err:  # a delete of the adapter raced this snapshot and removed its directory
            log.warning("snapshot_abandoned", adapter_id=adapter_id, seq=seq, error=str(err))
            return self.ledger.covered(adapter_id, seq, snapshot_written=False)
        seconds = time.perf_counter() - started
        log.info("snapshot_written", adapter_id=adapter_id, seq=seq, version=version, seconds=seconds)
        return self.ledger.covered(adapter_id, seq)

    async def advance(self) -> list[Records]:
        """Move durable marks over answered requests that changed nothing (``advance_point``)."""
        done: list[Records] = []
        for adapter_id, point in self.ledger.advances():
            async with self.lock(adapter_id):
                if point <= self.ledger.durable_seq(adapter_id):
                    continue
                try:
                    moved = await asyncio.to_thread(self.store.advance, adapter_id, point)
                except OSError as err:
                    log.error("advance_failed", adapter_id=adapter_id, seq=point, error=str(err))
                    continue
            if moved:
                done += self.ledger.advanced(adapter_id, point)
        return done

    async def remove(self, adapter_id: str) -> list[Records]:
        """The adapter was deleted: its snapshots go (after those of its earlier steps, never before)."""
        async with self.lock(adapter_id):
            await asyncio.to_thread(self.store.remove, adapter_id)
        return self.ledger.forget(adapter_id)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Persist a directory's entries (the files just written into it) before pointing at it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
