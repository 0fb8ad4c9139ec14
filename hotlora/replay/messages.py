"""What a recording holds, as hotlora messages: decoded records, requests and results by request id.

Replay, diff, tail and plot all read records through here, so they agree on what counts as a request,
which copy of a retried request or a re-published reply is "the" one (the first), and which packed
``bytes`` fields hold int32 token ids rather than float32 values (read from the schema's own type
metadata, so a new array field needs no change here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from hotlora.replay.format import Record
from hotlora.schemas import messages as wire
from hotlora.schemas.codec import decode
from hotlora.schemas.errors import SchemaError


def _array_dtypes() -> dict[tuple[type, str], str]:
    """(struct class, field name) -> numpy dtype of every packed array field in the wire schema."""
    found: dict[tuple[type, str], str] = {}

    def visit(info: Any, owner: type | None, name: str | None) -> None:
        if isinstance(info, msgspec.inspect.Metadata):
            dtype = (info.extra or {}).get("dtype")
            if dtype and owner is not None and name is not None:
                found[(owner, name)] = dtype
            visit(info.type, owner, name)
        elif isinstance(info, msgspec.inspect.UnionType):
            for member in info.types:
                visit(member, owner, name)
        elif isinstance(info, msgspec.inspect.ListType):
            visit(info.item_type, owner, name)
        elif isinstance(info, msgspec.inspect.StructType) and info.cls not in seen:
            seen.add(info.cls)
            for f in info.fields:
                visit(f.type, info.cls, f.name)

    seen: set[type] = set()
    for cls in wire.MESSAGE_TYPES:
        visit(msgspec.inspect.type_info(cls), None, None)
    return found


ARRAY_DTYPES = _array_dtypes()


def array_of(owner: msgspec.Struct, name: str, data: bytes) -> np.ndarray | None:
    """The numbers in a packed field, or None when ``name`` is not a packed array of ``owner``'s type."""
    dtype = ARRAY_DTYPES.get((type(owner), name))
    if dtype is None or len(data) % 4:
        return None
    return np.frombuffer(data, dtype=np.dtype(dtype))


def decode_record(record: Record) -> wire.AnyMessage | None:
    """The record's message, or None for bytes that are not a valid hotlora message (dead letters...)."""
    try:
        return decode(record.value or b"")
    except SchemaError:
        return None


def request_type(result: wire.Message) -> str:
    """The verb a result answers, from its tag (``sample_result`` -> ``sample``); ``?`` for an error."""
    tag = wire.tag_of(type(result))
    return tag.removesuffix("_result") if tag.endswith("_result") else "?"


@dataclass
class Contents:
    """A recording's messages. ``requests``/``results`` keep the first copy of each ``request_id``:
    a client retry re-sends the same request, and the engine may re-publish a cached reply."""

    requests: dict[str, tuple[Record, wire.RequestMessage]] = field(default_factory=dict)
    results: dict[str, tuple[Record, wire.ResultMessage]] = field(default_factory=dict)
    statuses: list[wire.EngineStatus] = field(default_factory=list)
    metrics: list[wire.Metrics] = field(default_factory=list)
    undecodable: int = 0
    duplicates: int = 0

    def model(self) -> str | None:
        """The base model the recorded engine served (its ``engine_status`` events name it)."""
        named = [s.model for s in self.statuses if s.model]
        return named[-1] if named else None

    def status(self) -> wire.EngineStatus | None:
        return self.statuses[-1] if self.statuses else None


def read_contents(records: list[Record]) -> Contents:
    contents = Contents()
    for record in records:
        message = decode_record(record)
        if message is None:
            contents.undecodable += 1
        elif isinstance(message, wire.Request):
            if message.request_id in contents.requests:
                contents.duplicates += 1
            else:
                contents.requests[message.request_id] = (record, message)  # type: ignore[assignment]
        elif isinstance(message, wire.Result):
            if message.request_id in contents.results:
                contents.duplicates += 1
            else:
                contents.results[message.request_id] = (record, message)  # type: ignore[assignment]
        elif isinstance(message, wire.EngineStatus):
            contents.statuses.append(message)
        elif isinstance(message, wire.Metrics):
            contents.metrics.append(message)
    return contents
