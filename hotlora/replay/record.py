"""``hotlora record``: copy chosen topics' records into an ``.hlr`` file, raw, for replay and diff.

Stopping rule. Without ``--follow`` the recorder reads each partition from its start point up to the
end offset it saw when it began, then stops: a recording of a busy topic still terminates, and records
that arrive meanwhile are left for the next recording. With ``--follow`` it keeps reading (and picks up
topics created later that match a pattern, such as a new agent's reply topic) until ``--duration``
elapses or it is interrupted; the file is flushed after every fetched batch, so Ctrl-C loses nothing
already fetched.

Start point (``--from``). An offset is exact and applies to every selected partition (clamped to what
the partition still holds). A time keeps records whose timestamp is at or after it: the seek uses
Kafka's ``offsets_for_times``, which on the embedded Tansu broker looks up arrival time and answers
offset 0 for a time past the last record, so the recorder filters by timestamp itself; prefer offsets
where it matters.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hotlora.engine.kafka.admin import group_less_consumer, log_end_offsets
from hotlora.replay.format import Header, HlrWriter, Record
from hotlora.replay.kafka import partitions_of, to_record

PROGRESS_MIN_RECORDS = 1000  # below this a recording takes a blink; a bar would only flicker
FOLLOW_REFRESH_S = 1.0  # how often --follow looks for new topics matching a pattern


@dataclass(frozen=True)
class StartAt:
    """Where each partition starts: an ``offset`` or a ``time_ms`` (epoch ms); neither = the beginning."""

    offset: int | None = None
    time_ms: int | None = None

    def describe(self) -> str:
        if self.offset is not None:
            return f"offset {self.offset}"
        if self.time_ms is not None:
            return f"time {self.time_ms} ms"
        return "beginning"


def parse_start(text: str) -> StartAt:
    """``--from``: ``N`` or ``offset:N`` (an offset); ``ms:N`` or a 13+ digit number (epoch ms; offsets
    that large do not occur in practice, epoch ms since 2001 all have 13 digits); an ISO-8601 time
    (``2026-11-29T17:00:00Z``; no zone = UTC)."""
    text = text.strip()
    if text.startswith("offset:"):
        return StartAt(offset=_non_negative(text.removeprefix("offset:"), text))
    if text.startswith("ms:"):
        return StartAt(time_ms=_non_negative(text.removeprefix("ms:"), text))
    if re.fullmatch(r"\d+", text):
        return StartAt(time_ms=int(text)) if len(text) >= 13 else StartAt(offset=int(text))
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--from {text!r}: expected an offset, epoch ms or an ISO-8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return StartAt(time_ms=int(moment.timestamp() * 1000))


def _non_negative(raw: str, text: str) -> int:
    if not raw.isdigit():
        raise ValueError(f"--from {text!r}: expected a non-negative integer after the colon")
    return int(raw)


@dataclass
class RecordOptions:
    bootstrap: str
    topics: list[str]  # names or shell patterns (``run1.*``)
    out: Path
    adapter: str | None = None
    start: StartAt = field(default_factory=StartAt)
    follow: bool = False
    duration: float | None = None  # --follow only: stop after this many seconds
    progress: bool = True


@dataclass
class RecordSummary:
    path: Path
    records: int = 0
    skipped: int = 0  # read but left out by --adapter
    per_topic: Counter[str] = field(default_factory=Counter)
    partitions: int = 0
    seconds: float = 0.0


class _Loose(msgspec.Struct):
    """Enough of any message to filter it by adapter without validating (or even knowing) its type."""

    type: str = ""
    adapter_id: str = ""


_loose = msgspec.msgpack.Decoder(_Loose)


def keeps(record: Record, adapter: str | None) -> bool:
    """``--adapter``: the adapter's records by key or by ``adapter_id``, plus ``engine_status`` events
    (they carry no adapter but name the model a replay needs)."""
    if adapter is None or record.key == adapter.encode():
        return True
    try:
        loose = _loose.decode(record.value or b"")
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return False
    return loose.adapter_id == adapter or loose.type == "engine_status"


async def _start_offsets(
    consumer: AIOKafkaConsumer, partitions: list[TopicPartition], start: StartAt, ends: dict[TopicPartition, int]
) -> dict[TopicPartition, int]:
    """Where each partition starts (``ends``: the log end offsets, from ``log_end_offsets``)."""
    if not partitions:
        return {}
    firsts = await consumer.beginning_offsets(partitions)
    if start.offset is not None:
        return {tp: min(max(start.offset, firsts[tp]), ends[tp]) for tp in partitions}
    if start.time_ms is not None:
        found = await consumer.offsets_for_times(dict.fromkeys(partitions, start.time_ms))
        return {tp: ends[tp] if found.get(tp) is None else found[tp].offset for tp in partitions}
    return dict(firsts)


async def record(
    options: RecordOptions, stop: asyncio.Event | None = None, console: Console | None = None
) -> RecordSummary:
    """Record until the stopping rule says so (module docstring); ``stop`` ends a ``--follow`` early."""
    console = console or Console(stderr=True)
    stop = stop or asyncio.Event()
    started = time.monotonic()
    summary = RecordSummary(options.out)
    consumer = group_less_consumer(options.bootstrap)
    await consumer.start()
    try:
        partitions = await partitions_of(consumer, options.bootstrap, options.topics)
        consumer.assign(partitions)
        log_ends = await log_end_offsets(options.bootstrap, partitions)
        positions = await _start_offsets(consumer, partitions, options.start, log_ends)
        for tp, offset in positions.items():
            consumer.seek(tp, offset)
        ends = {} if options.follow else log_ends  # the stopping rule: the ends seen at start
        meta = {
            "bootstrap": options.bootstrap,
            "topics": list(options.topics),
            "adapter": options.adapter,
            "from": options.start.describe(),
            "follow": options.follow,
            "partitions": {f"{tp.topic}/{tp.partition}": [positions[tp], ends.get(tp)] for tp in partitions},
        }
        total = sum(max(ends[tp] - positions[tp], 0) for tp in partitions) if ends else None
        show = options.progress and console.is_terminal and (total is None or total >= PROGRESS_MIN_RECORDS)
        progress = Progress(
            TextColumn("recording"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=True, disable=not show,
        )  # fmt: skip
        with HlrWriter(options.out, Header.new("recording", meta)) as out, progress:
            task = progress.add_task("records", total=total)
            remaining = {tp for tp in partitions if not ends or positions[tp] < ends[tp]}
            refreshed = time.monotonic()
            while remaining or options.follow:
                if stop.is_set() or (options.duration is not None and time.monotonic() - started >= options.duration):
                    break
                batch = await consumer.getmany(timeout_ms=200)
                for tp, records in batch.items():
                    for kafka_record in records:
                        if ends and kafka_record.offset >= ends[tp]:
                            continue  # arrived after the recording began
                        positions[tp] = kafka_record.offset + 1
                        if options.start.time_ms is not None and kafka_record.timestamp < options.start.time_ms:
                            continue  # offsets_for_times only seeks near TIME (on Tansu: arrival time, or 0)
                        raw = to_record(kafka_record)
                        progress.advance(task)
                        if keeps(raw, options.adapter):
                            out.write(raw)
                            summary.per_topic[tp.topic] += 1
                        else:
                            summary.skipped += 1
                out.flush()
                if ends:
                    for tp in list(remaining):
                        if await consumer.position(tp) >= ends[tp]:
                            remaining.discard(tp)
                elif time.monotonic() - refreshed >= FOLLOW_REFRESH_S:
                    refreshed = time.monotonic()
                    partitions = await _follow_new_topics(consumer, options, partitions, positions)
            summary.records = out.records
        summary.partitions = len(partitions)
    finally:
        await consumer.stop()
    summary.seconds = time.monotonic() - started
    return summary


async def _follow_new_topics(
    consumer: AIOKafkaConsumer,
    options: RecordOptions,
    partitions: list[TopicPartition],
    positions: dict[TopicPartition, int],
) -> list[TopicPartition]:
    """Assign partitions of topics created since the start (a new agent's reply topic), from their start point."""
    found = await partitions_of(consumer, options.bootstrap, options.topics, strict=False)
    new = [tp for tp in found if tp not in positions]
    if not new:
        return partitions
    positions.update(await _start_offsets(consumer, new, options.start, await log_end_offsets(options.bootstrap, new)))
    everything = [*partitions, *new]
    consumer.assign(everything)  # a new assignment forgets positions: put every partition back where it was
    for tp in everything:
        consumer.seek(tp, positions[tp])
    return everything
