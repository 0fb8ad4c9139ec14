"""Adapter ownership: an adapter belongs to the principal that created it (tenant isolation at the edge).

The engine service (not the engine core, which stays tenant-agnostic) records an owner when a
``create_adapter`` or a ``load_state`` of a new adapter id is dispatched, and refuses any later request
on that adapter from another principal, or with the wrong token, with ``Forbidden`` (code ``forbidden``)
before it reaches the engine.

- A request's ``principal`` names the tenant; its ``token`` is that agent's secret. Kafka records carry
  no producer identity the engine could verify, so the check rests on the token.
- Only a salted hash of the token is kept: ``HMAC-SHA256(salt, token)`` with a random 16-byte salt per
  adapter, compared in constant time. The raw token is never stored or logged. Tokens should be random
  high-entropy secrets (``secrets.token_urlsafe(32)``); a fast hash is then as good as a slow one.
- An adapter created without a principal is *unowned*: every request may use it, as before this module.
- ``OwnerRegistry`` is pure (no I/O) except ``load`` / ``save`` / ``reload``, which keep one JSON file
  per adapter under ``<checkpoint_dir>/owners/``, each written to a temporary file then renamed over the
  old one, so a crash leaves the old or the new record, never half. One file per adapter is what lets
  several engines share a checkpoint directory (scale-out): only an adapter's current engine writes
  its record, and an engine that takes an adapter over re-reads it (``reload``).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from hotlora.engine.kafka.durability import adapter_dir_name
from hotlora.schemas import messages as wire
from hotlora.schemas.errors import Forbidden

log = structlog.get_logger("hotlora.ownership")

FORMAT_VERSION = 1
SCHEME = "hmac-sha256"


def _digest(salt: bytes, token: str) -> bytes:
    return hmac.new(salt, token.encode("utf-8"), hashlib.sha256).digest()


@dataclass(frozen=True)
class Owner:
    """``principal=""`` is an unowned adapter (created anonymously); ``salt``/``digest`` are hex."""

    principal: str
    salt: str = ""
    digest: str = ""

    @property
    def unowned(self) -> bool:
        return not self.principal

    @classmethod
    def new(cls, principal: str, token: str) -> Owner:
        if not principal:
            return cls("")
        salt = os.urandom(16)
        return cls(principal, salt.hex(), _digest(salt, token).hex())

    def admits(self, principal: str, token: str) -> bool:
        """True for an unowned adapter, or the owner's principal with the right token (constant time)."""
        if self.unowned:
            return True
        same_principal = hmac.compare_digest(self.principal.encode("utf-8"), principal.encode("utf-8"))
        try:
            expected = bytes.fromhex(self.digest)
            salt = bytes.fromhex(self.salt)
        except ValueError:
            return False
        same_token = hmac.compare_digest(_digest(salt, token), expected)
        return same_principal and same_token and bool(token)


class OwnerRegistry:
    """adapter id -> ``Owner``. ``claim``/``check``/``release`` mutate or read; ``save`` persists."""

    def __init__(self, owners: dict[str, Owner] | None = None, path: Path | None = None) -> None:
        self.owners: dict[str, Owner] = dict(owners or {})
        self.path = path

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self.owners

    def __len__(self) -> int:
        return len(self.owners)

    def count(self, principal: str) -> int:
        """Adapters recorded for ``principal`` ("": the unowned ones)."""
        return sum(owner.principal == principal for owner in self.owners.values())

    def owner(self, adapter_id: str) -> Owner | None:
        return self.owners.get(adapter_id)

    def check(self, adapter_id: str, principal: str, token: str) -> None:
        """Raise ``Forbidden`` unless the caller may use ``adapter_id`` (unknown ids pass: the engine decides)."""
        owner = self.owners.get(adapter_id)
        if owner is None or owner.admits(principal, token):
            return
        who = f"principal {principal!r}" if principal else "a request without a principal"
        raise Forbidden(f"adapter {adapter_id!r} belongs to another principal; {who} (or its token) is refused")

    def visible(self, adapter_id: str, principal: str, token: str) -> bool:
        """Whether ``list_adapters`` shows ``adapter_id`` to the caller: unknown, unowned or its own."""
        owner = self.owners.get(adapter_id)
        return owner is None or owner.admits(principal, token)

    def claim(self, adapter_id: str, principal: str, token: str) -> bool:
        """Record the caller as owner of a new adapter id; True if recorded, False if it was already known.

        Raises ``Forbidden`` if someone else owns it; a caller that already owns it (or an unowned
        adapter) leaves the record as it is. A principal must come with a token.
        """
        if principal and not token:
            raise Forbidden(f"principal {principal!r} sent no token; an owned adapter needs one")
        owner = self.owners.get(adapter_id)
        if owner is not None:
            self.check(adapter_id, principal, token)  # raises Forbidden for anyone but the owner
            return False
        self.owners[adapter_id] = Owner.new(principal, token)
        return True

    def release(self, adapter_id: str) -> bool:
        """Forget ``adapter_id`` (deleted, or its create failed); True if it was known."""
        return self.owners.pop(adapter_id, None) is not None

    # ----- persistence -----

    @staticmethod
    def record_json(adapter_id: str, owner: Owner) -> str:
        record = {"version": FORMAT_VERSION, "scheme": SCHEME, "adapter_id": adapter_id}
        return json.dumps({**record, "principal": owner.principal, "salt": owner.salt, "digest": owner.digest})

    @staticmethod
    def parse_record(text: str) -> tuple[str, Owner]:
        data: Any = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or data.get("scheme") != SCHEME:
            raise ValueError(f"not a version-{FORMAT_VERSION} {SCHEME} owner record")
        return str(data["adapter_id"]), Owner(str(data["principal"]), str(data["salt"]), str(data["digest"]))

    @classmethod
    def load(cls, directory: str | Path, legacy: Path | None = None) -> OwnerRegistry:
        """The records saved under ``directory``, or an empty registry bound to it; a corrupt record
        fails loudly (an owner silently dropped would open its adapter to everyone). ``legacy`` is the
        single ``owners.json`` of earlier versions: its owners are carried over into ``directory``."""
        registry = cls(path=Path(directory))
        registry.reload(lambda _: True)
        if legacy is not None and legacy.is_file():
            try:
                data = json.loads(legacy.read_text(encoding="utf-8"))
                old = {
                    str(a): Owner(str(e["principal"]), str(e["salt"]), str(e["digest"]))
                    for a, e in data["owners"].items()
                }
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"adapter owner registry {legacy} is unreadable ({err}); refusing to start") from None
            for adapter_id, owner in old.items():
                if adapter_id not in registry.owners:
                    registry.owners[adapter_id] = owner
                    registry.save(adapter_id)
            legacy.rename(legacy.with_name(f"{legacy.name}.migrated"))
        return registry

    def reload(self, which: Callable[[str], bool]) -> None:
        """Re-read the records of the adapters ``which`` selects (another engine may have written them)."""
        if self.path is None:
            return
        for adapter_id in [a for a in self.owners if which(a)]:
            del self.owners[adapter_id]
        for file in sorted(self.path.glob("*.json")) if self.path.is_dir() else []:
            try:
                adapter_id, owner = self.parse_record(file.read_text(encoding="utf-8"))
            except FileNotFoundError:  # deleted meanwhile
                continue
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"adapter owner record {file} is unreadable ({err}); refusing to go on") from None
            if which(adapter_id):
                self.owners[adapter_id] = owner

    def save(self, adapter_id: str) -> None:
        """Write (or, once released, remove) ``adapter_id``'s record atomically; no-op without a path."""
        if self.path is None:
            return
        file = self.path / f"{adapter_dir_name(adapter_id)}.json"
        owner = self.owners.get(adapter_id)
        if owner is None:
            with contextlib.suppress(FileNotFoundError):
                file.unlink()
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".tmp", dir=self.path)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.record_json(adapter_id, owner))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, file)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


class OwnershipGate:
    """The engine service's use of an ``OwnerRegistry``, one wire request at a time.

    ``admit`` runs when a request is released to the engine, in the adapter's ``seq`` order and before
    the request's first await, so a refusal and a claim are ordered exactly like the requests: a
    ``create_adapter`` claims its id before any later request of that adapter is checked. ``settle``
    runs on the request's outcome: a failed create or load gives its claim back, a delete forgets the
    owner, and ``list_adapters`` is filtered to what the caller may see. Every change is saved at once.
    """

    def __init__(self, registry: OwnerRegistry) -> None:
        self.registry = registry
        self._claims: dict[str, str] = {}  # request_id -> adapter id it claimed, until its outcome

    @classmethod
    def load(cls, directory: str | Path, legacy: Path | None = None) -> OwnershipGate:
        return cls(OwnerRegistry.load(directory, legacy))

    def precheck(self, message: wire.Request) -> None:
        """Raise ``Forbidden`` when a recorded owner already refuses the request (checked on arrival).

        Only a refusal is final here: ``admit`` is still the check that counts, in ``seq`` order.
        """
        if message.adapter_id and not isinstance(message, wire.ListAdapters) and message.adapter_id in self.registry:
            self.registry.check(message.adapter_id, message.principal, message.token)

    def admit(self, message: wire.Request) -> None:
        """Raise ``Forbidden`` (changing nothing) unless the request may run on its adapter."""
        adapter_id, principal, token = message.adapter_id, message.principal, message.token
        if not adapter_id or isinstance(message, wire.ListAdapters):
            return
        if isinstance(message, wire.CreateAdapter | wire.LoadState):
            if self.registry.claim(adapter_id, principal, token):
                try:
                    self.registry.save(adapter_id)
                except OSError:  # an owner we could not persist is no owner: refuse (internal) instead
                    self.registry.release(adapter_id)
                    raise
                self._claims[message.request_id] = adapter_id
            return
        self.registry.check(adapter_id, principal, token)

    def settle(self, message: wire.Request, result: Any) -> Any:
        """Update the registry for the request's outcome; returns the result (filtered for a listing)."""
        claimed = self._claims.pop(message.request_id, None)
        failed = isinstance(result, BaseException)
        if claimed is not None and failed:
            self.registry.release(claimed)
            self._save_or_log(claimed)
        elif isinstance(message, wire.DeleteAdapter) and not failed:
            if self.registry.release(message.adapter_id):
                self._save_or_log(message.adapter_id)
        elif isinstance(message, wire.ListAdapters) and not failed and message.principal:
            return [info for info in result if self.registry.visible(info.adapter_id, message.principal, message.token)]
        return result

    def _save_or_log(self, adapter_id: str) -> None:
        """A release that cannot be saved leaves a stale owner on disk (it only refuses): log, go on."""
        try:
            self.registry.save(adapter_id)
        except OSError as err:
            log.error("owner_registry_save_failed", path=str(self.registry.path), error=str(err))


__all__ = ["Forbidden", "Owner", "OwnerRegistry", "OwnershipGate"]
