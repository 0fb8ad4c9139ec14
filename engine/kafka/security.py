"""Kafka transport security (TLS and SASL) as aiokafka keyword arguments, for every hotlora Kafka client.

The engine's producer, consumer and admin client and the agents' ``HotLoraClient`` all build their
aiokafka clients with ``**security.kafka_kwargs()``, so one set of settings means the same everywhere.
The settings come from ``ServiceConfig`` (engine flags) or from the same ``HOTLORA_*`` environment
variables (agents): ``HOTLORA_SECURITY_PROTOCOL``, ``HOTLORA_SASL_MECHANISM``, ``HOTLORA_SASL_USERNAME``,
``HOTLORA_SASL_PASSWORD``, ``HOTLORA_SSL_CAFILE``, ``HOTLORA_SSL_CERTFILE``, ``HOTLORA_SSL_KEYFILE``.

What this protects: the connection (TLS encrypts it and authenticates the broker; SASL authenticates
the client to the broker, so broker ACLs can restrict who may write the request topics). It does not
give the engine a verified producer identity: a Kafka record carries none, which is why adapter
ownership (``engine.kafka.ownership``) rests on the per-agent token in the request envelope.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class KafkaSecurity:
    """Validated on construction: a bad combination fails at startup, not at the first connection."""

    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def __post_init__(self) -> None:
        protocol = (self.security_protocol or "PLAINTEXT").strip().upper()
        mechanism = (self.sasl_mechanism or "PLAIN").strip().upper()
        object.__setattr__(self, "security_protocol", protocol)
        object.__setattr__(self, "sasl_mechanism", mechanism)
        if protocol not in PROTOCOLS:
            raise ValueError(
                f"unknown Kafka security_protocol {self.security_protocol!r} (HOTLORA_SECURITY_PROTOCOL); "
                f"expected one of {', '.join(PROTOCOLS)}"
            )
        if self.uses_sasl:
            if mechanism not in MECHANISMS:
                raise ValueError(
                    f"unknown Kafka sasl_mechanism {mechanism!r} (HOTLORA_SASL_MECHANISM); "
                    f"expected one of {', '.join(MECHANISMS)}"
                )
            missing = [name for name in ("sasl_username", "sasl_password") if not getattr(self, name)]
            if missing:
                raise ValueError(
                    f"security_protocol {protocol} needs {' and '.join(missing)} "
                    f"({', '.join('HOTLORA_' + m.upper() for m in missing)})"
                )
        if not self.uses_ssl:
            given = [name for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile") if getattr(self, name)]
            if given:
                raise ValueError(
                    f"{', '.join(given)} set but security_protocol is {protocol}; use SSL or SASL_SSL for TLS"
                )
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError("ssl_keyfile needs ssl_certfile (the client certificate it belongs to)")

    @property
    def uses_ssl(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    def ssl_context(self) -> ssl.SSLContext:
        """A verifying client context: the given CA file, or the system's CAs; a client cert if given."""
        from aiokafka.helpers import create_ssl_context

        try:
            return create_ssl_context(cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile)
        except (OSError, ssl.SSLError) as err:
            raise ValueError(
                f"cannot build the Kafka TLS context (ssl_cafile={self.ssl_cafile!r}, "
                f"ssl_certfile={self.ssl_certfile!r}, ssl_keyfile={self.ssl_keyfile!r}): {err}"
            ) from None

    def kafka_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``AIOKafkaProducer``, ``AIOKafkaConsumer`` and ``AIOKafkaAdminClient``."""
        kwargs: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.uses_ssl:
            kwargs["ssl_context"] = self.ssl_context()
        if self.uses_sasl:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password
        return kwargs

    @classmethod
    def from_settings(cls, settings: Any) -> KafkaSecurity:
        """From any object with these attribute names (``ServiceConfig``); missing ones keep defaults."""
        values = {f.name: getattr(settings, f.name) for f in fields(cls) if getattr(settings, f.name, None) is not None}
        return cls(**values)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KafkaSecurity:
        """From ``HOTLORA_SECURITY_PROTOCOL`` and friends (unset or empty: the default)."""
        env = os.environ if env is None else env
        values = {f.name: env[f"HOTLORA_{f.name.upper()}"] for f in fields(cls) if env.get(f"HOTLORA_{f.name.upper()}")}
        return cls(**values)


def kafka_kwargs(settings: Any = None) -> dict[str, Any]:
    """aiokafka security kwargs from ``settings`` (a ``KafkaSecurity``, a ``ServiceConfig``) or the environment."""
    if settings is None:
        security = KafkaSecurity.from_env()
    elif isinstance(settings, KafkaSecurity):
        security = settings
    else:
        security = KafkaSecurity.from_settings(settings)
    return security.kafka_kwargs()


__all__ = ["MECHANISMS", "PROTOCOLS", "KafkaSecurity", "kafka_kwargs"]
