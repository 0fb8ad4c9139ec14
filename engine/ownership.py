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
- ``OwnerRegistry`` is pure (no I/O) except ``load`` / ``save``, which keep it as JSON, written to a
  temporary file then renamed over the old one, so a crash leaves the old or the new file, never half.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from hotlora.engine.errors import HotLoraError
from hotlora.schemas import messages as wire

log = structlog.get_logger("hotlora.ownership")

FORMAT_VERSION = 1
SCHEME = "hmac-sha256"


class Forbidden(HotLoraError):
    """The request's principal or token does not own the adapter; nothing was changed."""

    code = "forbidden"


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

    def to_json(self) -> str:
        owners = {
            adapter_id: {"principal": o.principal, "salt": o.salt, "digest": o.digest}
            for adapter_id, o in sorted(self.owners.items())
        }
        return json.dumps({"version": FORMAT_VERSION, "scheme": SCHEME, "owners": owners}, indent=1)

    @classmethod
    def from_json(cls, text: str, path: Path | None = None) -> OwnerRegistry:
        data: Any = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or data.get("scheme") != SCHEME:
            raise ValueError(f"not a version-{FORMAT_VERSION} {SCHEME} owner registry")
        owners: dict[str, Owner] = {}
        for adapter_id, entry in dict(data.get("owners") or {}).items():
            owners[str(adapter_id)] = Owner(str(entry["principal"]), str(entry["salt"]), str(entry["digest"]))
        return cls(owners, path)

    @classmethod
    def load(cls, path: str | Path) -> OwnerRegistry:
        """The registry saved at ``path``, or an empty one bound to it; a corrupt file fails loudly."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(path=path)
        try:
            return cls.from_json(text, path)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"adapter owner registry {path} is unreadable ({err}); refusing to start") from None

    def save(self) -> None:
        """Write atomically (temp file in the same directory, fsync, rename); no-op without a path."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
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
    def load(cls, path: str | Path) -> OwnershipGate:
        return cls(OwnerRegistry.load(path))

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
                    self.registry.save()
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
            self._save_or_log()
        elif isinstance(message, wire.DeleteAdapter) and not failed:
            if self.registry.release(message.adapter_id):
                self._save_or_log()
        elif isinstance(message, wire.ListAdapters) and not failed and message.principal:
            return [info for info in result if self.registry.visible(info.adapter_id, message.principal, message.token)]
        return result

    def _save_or_log(self) -> None:
        """A release that cannot be saved leaves a stale owner on disk (it only refuses): log, go on."""
        try:
            self.registry.save()
        except OSError as err:
            log.error("owner_registry_save_failed", path=str(self.registry.path), error=str(err))


__all__ = ["Forbidden", "Owner", "OwnerRegistry", "OwnershipGate"]
