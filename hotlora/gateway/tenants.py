"""API keys to hotlora tenants, and one ``HotLoraClient`` per tenant.

A Tinker API key (``X-API-Key``) maps to a hotlora ``principal`` and ``token`` (``docs/security.md``):
the engine records the principal and a salted hash of the token as the owner of every adapter the key
creates, and refuses the adapter to any other principal or token with ``forbidden``. So one key cannot
see, sample, train or load another key's models, whichever gateway it goes through.

- With a keys file (``--api-keys FILE``, JSON ``{"<api key>": {"principal": "...", "token": "..."}}``;
  a bare string value is a principal whose token is derived), only listed keys are admitted (401 else).
- Without one, every key is its own tenant: principal ``tinker-<sha256(key)[:16]>``, token derived from
  the key by a one-way hash. The raw key never reaches Kafka; several gateways derive the same identity.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from hotlora.agents import HotLoraClient
from hotlora.gateway.tinker_api import TinkerError


@dataclass(frozen=True)
class Identity:
    principal: str
    token: str = field(repr=False)


def derived_token(api_key: str) -> str:
    return hashlib.sha256(b"hotlora-gateway-token\0" + api_key.encode()).hexdigest()


def derived_identity(api_key: str) -> Identity:
    return Identity(f"tinker-{hashlib.sha256(api_key.encode()).hexdigest()[:16]}", derived_token(api_key))


class KeyMap:
    """``keys`` None admits every key as its own tenant; else only the listed keys."""

    def __init__(self, keys: dict[str, Identity] | None = None) -> None:
        self.keys = keys

    @classmethod
    def from_file(cls, path: str | Path) -> KeyMap:
        raw = json.loads(Path(path).read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: want a JSON object of api key -> principal or {{principal, token}}")
        keys: dict[str, Identity] = {}
        for key, value in raw.items():
            if isinstance(value, str):
                keys[key] = Identity(value, derived_token(key))
            elif isinstance(value, dict) and isinstance(value.get("principal"), str) and value["principal"]:
                keys[key] = Identity(value["principal"], str(value.get("token") or derived_token(key)))
            else:
                raise ValueError(f"{path}: the entry of a key must be a principal or {{principal, token}}")
        return cls(keys)

    def identify(self, api_key: str | None) -> Identity:
        if not api_key:
            raise TinkerError("missing API key (X-API-Key header)", status=401)
        if self.keys is None:
            return derived_identity(api_key)
        identity = self.keys.get(api_key)
        if identity is None:
            raise TinkerError("unknown API key", status=401)
        return identity


@dataclass
class Tenant:
    """One identity's client, and which adapters that client already continues the ``seq`` of."""

    identity: Identity
    client: HotLoraClient
    known: set[str] = field(default_factory=set)
    _priming: dict[str, asyncio.Future[None]] = field(default_factory=dict)

    def ready(self, adapter_id: str) -> asyncio.Future[None] | None:
        """None when ``adapter_id``'s requests may be sent right away; else a future to await first.

        An adapter this client neither created nor loaded (made by another gateway, or before this one
        restarted) is resumed first, so its next request takes the ``seq`` after the engine's last. Every
        call that arrives meanwhile awaits the same future, and wakes in arrival order.
        """
        if adapter_id in self.known:
            return None
        pending = self._priming.get(adapter_id)
        if pending is None:
            pending = asyncio.ensure_future(self._resume(adapter_id))
            self._priming[adapter_id] = pending
        return pending

    async def _resume(self, adapter_id: str) -> None:
        try:
            await self.client.resume(adapter_id)  # unknown adapters stay unknown: their first call fails
            self.known.add(adapter_id)
        finally:
            self._priming.pop(adapter_id, None)

    def created(self, adapter_id: str) -> None:
        self.known.add(adapter_id)
