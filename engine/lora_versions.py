"""Which LoRA version a rollout engine serves for each adapter, and when an old version may go.

vLLM identifies a loaded LoRA by an integer id and caches prefixes by its name. Reusing either for
new weights is unsafe: a new id under an old name in one batch crashes the engine, overwritten files
under an old id serve stale weights, and a same-name reload serves stale prefix-cache entries. So
every weight version gets a name (``<adapter>@v<version>``) and an integer id that were never used
before in this engine's life, and an old version is retired only once no in-flight request uses it.

Pure bookkeeping (no I/O, no vLLM), owned by the event loop; the vLLM sampler acts on what it returns.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from hotlora.schemas.errors import UnknownAdapter


@dataclass(frozen=True)
class LoraVersion:
    """One exported weight version: what vLLM loads (``path``) under a never-reused name and id."""

    adapter_id: str
    version: int
    name: str
    lora_int_id: int
    path: Path


class VersionTable:
    """Current version per adapter plus reference counts of the versions in-flight requests hold."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._ids = itertools.count(1)  # vLLM refuses id 0
        self._names: set[str] = set()
        self._current: dict[str, LoraVersion] = {}
        self._users: dict[int, int] = {}  # lora_int_id -> in-flight requests using it
        self._unpublished: dict[int, LoraVersion] = {}  # superseded or dropped, still in use

    def allocate(self, adapter_id: str, version: int) -> LoraVersion:
        """A fresh name, id and export directory for ``adapter_id``'s weights at ``version``."""
        lora_int_id = next(self._ids)
        name = f"{adapter_id}@v{version}"
        if name in self._names:  # the adapter was deleted and recreated, or reloaded an older state
            name = f"{name}#{lora_int_id}"
        self._names.add(name)
        return LoraVersion(adapter_id, version, name, lora_int_id, self.root / f"{lora_int_id}")

    def publish(self, new: LoraVersion) -> list[LoraVersion]:
        """Make ``new`` what later requests of its adapter get; returns the versions to retire now."""
        old = self._current.get(new.adapter_id)
        self._current[new.adapter_id] = new
        return self._supersede(old)

    def drop(self, adapter_id: str) -> list[LoraVersion]:
        """The adapter is gone: no new request gets it; returns the versions to retire now."""
        return self._supersede(self._current.pop(adapter_id, None))

    def acquire(self, adapter_id: str) -> LoraVersion:
        """The current version of ``adapter_id``, held until ``release``."""
        current = self._current.get(adapter_id)
        if current is None:
            raise UnknownAdapter(f"adapter {adapter_id!r} does not exist")
        self._users[current.lora_int_id] = self._users.get(current.lora_int_id, 0) + 1
        return current

    def release(self, held: LoraVersion) -> list[LoraVersion]:
        """A request that held ``held`` finished; returns it if it was superseded and is now unused."""
        left = self._users.get(held.lora_int_id, 0) - 1
        if left < 0:
            raise ValueError(f"{held.name} released more often than acquired")
        if left:
            self._users[held.lora_int_id] = left
            return []
        self._users.pop(held.lora_int_id, None)
        retired = self._unpublished.pop(held.lora_int_id, None)
        return [retired] if retired is not None else []

    def current(self, adapter_id: str) -> LoraVersion | None:
        return self._current.get(adapter_id)

    def live(self) -> list[LoraVersion]:
        """Every version not yet retired: current ones and superseded ones still in use."""
        return [*self._current.values(), *self._unpublished.values()]

    def users(self, version: LoraVersion) -> int:
        return self._users.get(version.lora_int_id, 0)

    def _supersede(self, old: LoraVersion | None) -> list[LoraVersion]:
        if old is None:
            return []
        if self._users.get(old.lora_int_id, 0):
            self._unpublished[old.lora_int_id] = old
            return []
        return [old]
