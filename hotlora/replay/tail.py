"""``hotlora tail``: pretty-print live messages from any hotlora topic, one line per record.

Each line: arrival time, ``topic[partition]@offset``, the message type, adapter, seq, a short request
id, then the message's own fields. Packed arrays are summarised (``int[512] first=[...]``), nested
datums and sequences show the first and a count, tokens are masked (a terminal is not a vault), and
bytes that are not a hotlora message (dead letters, foreign records) show as a hex head. It reads
without a consumer group (``hotlora.replay.kafka``), so tailing never disturbs the engine.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
from aiokafka import TopicPartition
from rich.console import Console
from rich.text import Text

from hotlora.engine.kafka.admin import group_less_consumer, log_end_offsets
from hotlora.replay.format import Record
from hotlora.replay.kafka import partitions_of, to_record
from hotlora.replay.messages import ARRAY_DTYPES, array_of
from hotlora.schemas import messages as wire
from hotlora.schemas.codec import decode
from hotlora.schemas.errors import SchemaError

HEAD_ITEMS = 5  # array elements shown
HEX_BYTES = 32  # bytes of an undecodable value shown
ENVELOPE = frozenset({"v", "request_id", "adapter_id", "seq", "sent_at_ms"})
REFRESH_S = 1.0  # how often new topics matching the patterns are picked up


def summarise_array(values: Sequence[float] | Sequence[int], kind: str) -> str:
    head = ", ".join(f"{v:.4g}" if kind == "f32" else str(int(v)) for v in values[:HEAD_ITEMS])
    more = ", …" if len(values) > HEAD_ITEMS else ""
    return f"{kind}[{len(values)}] first=[{head}{more}]"


def _value(owner: msgspec.Struct, name: str, value: object) -> str:
    if name == "token" and value:
        return "***"
    dtype = ARRAY_DTYPES.get((type(owner), name))
    if dtype is not None and isinstance(value, bytes):
        array = array_of(owner, name, value)
        kind = "int" if dtype.endswith("i4") else "f32"
        return summarise_array(array.tolist(), kind) if array is not None else f"bytes[{len(value)}] (bad length)"
    if dtype is not None and isinstance(value, list):
        items = [_value(owner, name, v) for v in value[:1]]
        return f"[{items[0]}, +{len(value) - 1} more]" if len(value) > 1 else f"[{', '.join(items)}]"
    if isinstance(value, msgspec.Struct):
        return _struct(value)
    if isinstance(value, list) and value and isinstance(value[0], msgspec.Struct):
        first = _struct(value[0])
        return f"[{first}, +{len(value) - 1} more]" if len(value) > 1 else f"[{first}]"
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)


def _struct(value: msgspec.Struct) -> str:
    parts = [f"{name}={_value(value, name, getattr(value, name))}" for name in value.__struct_fields__]
    return f"{type(value).__name__}({', '.join(parts)})"


def format_record(record: Record) -> Text:
    """One line for one record (pure: the tests call it on hand-made records)."""
    when = (
        dt.datetime.fromtimestamp(record.timestamp / 1000, dt.timezone.utc).strftime("%H:%M:%S.%f")[:-3]
        if record.timestamp >= 0
        else "--:--:--.---"
    )
    line = Text(f"{when} ", style="dim")
    line.append(f"{record.topic}[{record.partition}]@{record.offset} ", style="cyan")
    if record.value is None:
        line.append("tombstone (no value)", style="yellow")
        return line
    try:
        message = decode(record.value)
    except SchemaError as err:
        head = record.value[:HEX_BYTES].hex()
        more = "…" if len(record.value) > HEX_BYTES else ""
        line.append("undecodable ", style="bold red")
        line.append(f"({err.message[:120]}) {len(record.value)} bytes hex={head}{more}")
        return line
    line.append(wire.tag_of(type(message)), style="bold")
    line.append(f" adapter={message.adapter_id or '-'} seq={message.seq} rid={message.request_id[:8]}")
    for name in message.__struct_fields__:
        if name not in ENVELOPE:
            line.append(f" {name}={_value(message, name, getattr(message, name))}")
    return line


def matches(record: Record, adapter: str | None, types: Sequence[str] | None) -> bool:
    """``--adapter`` (key or ``adapter_id``) and ``--type``; undecodable records pass only without ``--type``."""
    if adapter is None and not types:
        return True
    try:
        message = decode(record.value or b"")
    except SchemaError:
        return not types and (adapter is None or record.key == adapter.encode())
    if adapter is not None and message.adapter_id != adapter and record.key != adapter.encode():
        return False
    return not types or wire.tag_of(type(message)) in types


@dataclass
class TailOptions:
    bootstrap: str
    topics: list[str] = field(default_factory=list)  # names or patterns; empty: every topic under prefix
    prefix: str = "hotlora"
    adapter: str | None = None
    types: list[str] = field(default_factory=list)
    max_messages: int | None = None
    timeout: float | None = None  # seconds, then stop
    from_beginning: bool = False


async def tail(options: TailOptions, console: Console | None = None, stop: asyncio.Event | None = None) -> int:
    """Print matching records until ``max_messages``, ``timeout`` or ``stop``; returns how many were printed."""
    console = console or Console()
    stop = stop or asyncio.Event()
    patterns = options.topics or [f"{options.prefix}.*"]
    started = time.monotonic()
    printed = 0
    consumer = group_less_consumer(options.bootstrap)
    await consumer.start()
    try:
        assigned: list[TopicPartition] = []
        positions: dict[TopicPartition, int] = {}
        refreshed = -REFRESH_S
        initial = True  # the first scan: its topics start at their end unless --from-beginning
        while not stop.is_set():
            if options.timeout is not None and time.monotonic() - started >= options.timeout:
                break
            if time.monotonic() - refreshed >= REFRESH_S:
                refreshed = time.monotonic()
                found = await partitions_of(consumer, options.bootstrap, patterns, strict=False)
                new = [tp for tp in found if tp not in positions]
                at_start, initial = initial, False
                if new:
                    # Topics present at start begin at their end (live) unless --from-beginning; topics
                    # created later (a new agent's replies) begin at their beginning, so nothing is missed.
                    live = at_start and not options.from_beginning
                    edge = await log_end_offsets(options.bootstrap, new) if live else None
                    firsts = await consumer.beginning_offsets(new)
                    for tp in new:
                        positions[tp] = edge[tp] if edge else firsts[tp]
                    assigned = [*assigned, *new]
                    consumer.assign(assigned)
                    for tp in assigned:
                        consumer.seek(tp, positions[tp])
            if not assigned:
                await asyncio.sleep(0.2)
                continue
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                for kafka_record in records:
                    positions[tp] = kafka_record.offset + 1
                    record = to_record(kafka_record)
                    if not matches(record, options.adapter, options.types):
                        continue
                    console.print(format_record(record), soft_wrap=True)
                    printed += 1
                    if options.max_messages is not None and printed >= options.max_messages:
                        return printed
    finally:
        await consumer.stop()
    return printed
