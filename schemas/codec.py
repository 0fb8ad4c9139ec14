"""``encode`` and ``decode``: the only functions that turn messages into bytes and back.

Decoding runs in two passes. The first reads only the envelope (msgspec skips the rest), so an unknown
schema version is reported as such, not as whatever field error a future layout would cause, and so
a rejected message still yields the ``request_id`` and ``reply_to`` an error reply needs. The second
pass decodes the full tagged union. Every failure is a ``SchemaError``: the engine must survive any
bytes a tenant (or a fuzzer) puts on a topic.
"""

from __future__ import annotations

import re

import msgspec

from hotlora.schemas.errors import SchemaError
from hotlora.schemas.messages import SUPPORTED_VERSIONS, AnyMessage, Message


class _Envelope(msgspec.Struct, frozen=True):
    """The required envelope: every field must be present on the wire, whatever the message type."""

    type: str
    v: int
    request_id: str
    adapter_id: str
    seq: int
    reply_to: str
    sent_at_ms: int


class _LooseEnvelope(msgspec.Struct, frozen=True):
    """Best-effort salvage of the routing fields from a message that failed validation."""

    request_id: str = ""
    adapter_id: str = ""
    reply_to: str = ""


_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)
_loose_decoder = msgspec.msgpack.Decoder(_LooseEnvelope)
_decoder = msgspec.msgpack.Decoder(AnyMessage)

# A legal Kafka topic name ([A-Za-z0-9._-], 1-249 characters, not "." or "..").
_TOPIC_NAME = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9._-]{1,249}")

# msgspec reports most faults as DecodeError, but invalid UTF-8 in a string surfaces as
# UnicodeDecodeError and absurdly deep nesting (even inside an ignored field) as RecursionError.
_DECODE_FAILURES = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def encode(message: Message) -> bytes:
    """MessagePack bytes of one message (a map: ``type`` first, then the envelope, then the fields)."""
    if not isinstance(message, Message):
        raise SchemaError(f"cannot encode {type(message).__name__}: not a hotlora message")
    return _encoder.encode(message)


def decode(data: bytes | bytearray | memoryview) -> AnyMessage:
    """Decode and validate one message; raises ``SchemaError`` (code ``bad_message``) for anything invalid."""
    try:
        envelope = _envelope_decoder.decode(data)
    except _DECODE_FAILURES as err:
        raise _error(f"bad envelope: {err}", data) from None
    if envelope.v not in SUPPORTED_VERSIONS:
        raise SchemaError(
            f"unsupported schema version v={envelope.v}; this side speaks {sorted(SUPPORTED_VERSIONS)}",
            request_id=envelope.request_id,
            adapter_id=envelope.adapter_id,
            reply_to=envelope.reply_to,
        )
    try:
        return _decoder.decode(data)
    except _DECODE_FAILURES as err:
        raise SchemaError(
            f"bad {envelope.type[:64]!r} message: {err}",
            request_id=envelope.request_id,
            adapter_id=envelope.adapter_id,
            reply_to=envelope.reply_to,
        ) from None


def is_topic_name(name: str) -> bool:
    """Whether ``name`` is a legal Kafka topic name; the engine refuses any other non-empty ``reply_to``."""
    return _TOPIC_NAME.fullmatch(name) is not None


def reject(text: str, data: bytes | bytearray | memoryview) -> SchemaError:
    """A ``SchemaError`` for ``data`` refused before decoding (e.g. too large), with what routing is readable."""
    return _error(text, data)


def _error(text: str, data: bytes | bytearray | memoryview) -> SchemaError:
    try:
        loose = _loose_decoder.decode(data)
    except _DECODE_FAILURES:
        return SchemaError(text)
    return SchemaError(text, request_id=loose.request_id, adapter_id=loose.adapter_id, reply_to=loose.reply_to)
