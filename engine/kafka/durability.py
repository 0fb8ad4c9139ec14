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
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

DURABLE_FILE = "durable.json"
CURRENT_FILE = "CURRENT"
FORMAT = "hotlora-durable"
MAX_REPLIES = 16  # stored replies per adapter: a crash re-delivers only what the last snapshots left uncommitted
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


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
