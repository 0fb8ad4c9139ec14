"""``hotlora replay``: re-publish a recording's requests to a fresh engine and record its results.

What is sent. Every recorded request (the first copy of each ``request_id``; retries are dropped),
unchanged except ``reply_to``, which points at the replay's own results topic, and ``sent_at_ms``.
``request_id``, ``seq``, ``principal`` and ``token`` are kept, so the fresh engine orders, de-duplicates
and authorises exactly as the recorded one did. Requests go to a new topic prefix, so the replay never
touches the recorded deployment's topics.

Order and pacing. Each adapter's requests are sent in ``seq`` order (the engine would restore that
order anyway; sending in order keeps it from holding early arrivals). Within an adapter, what may run
together is what the engine's semantics allow, so results do not depend on pacing as long as the
engine's arithmetic is batch-invariant (``docs/replay.md`` reports what was measured). Pacing still
decides which requests share a batch, so ``--pace recorded`` (the default) reproduces the recorded
agent's own pipelining: request k waits for every earlier request of its adapter whose recorded result
was finished before k was sent (``finished_at_ms <= sent_at_ms``; a missing result counts as waited
for), and only for those. ``serial`` waits for every earlier reply; ``burst`` waits for none. Requests
with ``seq`` 0 (``list_adapters``, base-model samples) are unordered by protocol: they go in recorded
send order on a lane of their own, and their results may legitimately differ (e.g. a list taken at
another moment).

With no ``--bootstrap`` the replay starts an embedded broker; unless ``--no-engine`` it starts a fresh
in-process ``EngineService`` on the new prefix, with an empty temporary checkpoint directory, the model
and sampler the recording's ``engine_status`` events name (``--model`` overrides); its other settings
are the engine's defaults and ``HOTLORA_*`` variables, like ``hotlora engine``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from hotlora.engine.kafka.admin import create_topics, ensure_topics, group_less_consumer
from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.engine.kafka.security import kafka_kwargs
from hotlora.replay.format import Header, HlrWriter, Record, read_file
from hotlora.replay.kafka import to_record
from hotlora.replay.messages import Contents, decode_record, read_contents
from hotlora.schemas import messages as wire
from hotlora.schemas.codec import encode
from hotlora.schemas.topics import Topics, key_for

PACES = ("recorded", "serial", "burst")
MAX_REQUEST_BYTES = 64 * 1024 * 1024


class ReplayError(RuntimeError):
    pass


@dataclass(frozen=True)
class Step:
    """One request to send once every request in ``after`` has its replay reply."""

    message: wire.RequestMessage
    after: tuple[str, ...] = ()


def plan(
    contents: Contents, adapter: str | None = None, until: int | None = None, pace: str = "recorded"
) -> dict[str, list[Step]]:
    """The lanes to send: adapter id -> its requests in ``seq`` order; ``""`` holds the unordered ones.

    ``adapter`` keeps one adapter's requests (seq-0 requests belong to none and are dropped);
    ``until`` keeps requests with ``seq <= until`` (seq-0 requests are then dropped too: they cannot be
    placed in any adapter's sequence).
    """
    if pace not in PACES:
        raise ValueError(f"pace must be one of {', '.join(PACES)}, got {pace!r}")
    lanes: dict[str, list[tuple[Record, wire.RequestMessage]]] = defaultdict(list)
    for record, message in contents.requests.values():
        lane = message.adapter_id if message.seq else ""
        if adapter is not None and (lane != adapter):
            continue
        if until is not None and (not message.seq or message.seq > until):
            continue
        lanes[lane].append((record, message))
    planned: dict[str, list[Step]] = {}
    for lane, entries in sorted(lanes.items()):
        if lane:
            entries.sort(key=lambda e: e[1].seq)
        else:
            entries.sort(key=lambda e: (e[1].sent_at_ms, e[0].topic, e[0].partition, e[0].offset))
        steps: list[Step] = []
        for index, (_, message) in enumerate(entries):
            earlier = [m for _, m in entries[:index]]
            if pace == "burst":
                after: list[str] = []
            elif pace == "serial":
                after = [m.request_id for m in earlier]
            else:
                after = [m.request_id for m in earlier if _answered_before(contents, m.request_id, message.sent_at_ms)]
            steps.append(Step(message, tuple(after)))
        planned[lane] = steps
    return planned


def _answered_before(contents: Contents, request_id: str, sent_at_ms: int) -> bool:
    """Whether the recorded agent may have had this reply when it sent a later request (clock: ms)."""
    found = contents.results.get(request_id)
    if found is None or not found[1].finished_at_ms:
        return True  # unknown: waiting is the safe guess (it keeps order; it can only cost batching)
    return found[1].finished_at_ms <= sent_at_ms


@dataclass
class ReplayOptions:
    source: Path
    out: Path
    adapter: str | None = None
    until: int | None = None
    bootstrap: str | None = None  # None: start an embedded broker
    prefix: str | None = None  # None: replay-<random>
    model: str | None = None  # None: the model the recording's engine_status names
    checkpoint_dir: str | None = None  # None: a fresh temporary directory
    pace: str = "recorded"
    timeout: float = 120.0  # per awaited reply, and for the engine to start
    engine: bool = True  # start a fresh in-process engine on the prefix
    dtype: str = "auto"
    device: str = "auto"
    session_timeout_ms: int | None = None  # None: 2000 on the embedded broker, the engine's default otherwise


@dataclass
class ReplaySummary:
    out: Path
    prefix: str
    bootstrap: str
    model: str | None
    sent: int = 0
    answered: int = 0
    missing: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # error replies by code
    seconds: float = 0.0


def resolve_model(options: ReplayOptions, contents: Contents) -> str | None:
    """``--model``, else the recorded engine's model if it exists here; an error when neither can serve."""
    if options.model:
        return options.model
    recorded = contents.model()
    if not options.engine:
        return recorded
    if recorded is None:
        raise ReplayError(
            "the recording has no engine_status event naming the model (record the metrics topic too), pass --model"
        )
    if not Path(recorded).exists():
        raise ReplayError(f"the recorded model {recorded!r} does not exist on this machine; pass --model")
    return recorded


async def replay(options: ReplayOptions) -> ReplaySummary:
    """Run the replay end to end; see the module docstring."""
    started = time.monotonic()
    if not options.engine and (options.bootstrap is None or options.prefix is None):
        raise ReplayError("--no-engine replays to an engine that already runs: give its --bootstrap and --prefix")
    header, records = read_file(options.source)
    contents = read_contents(records)
    lanes = plan(contents, options.adapter, options.until, options.pace)
    steps = [step for lane in lanes.values() for step in lane]
    if not steps:
        raise ReplayError(f"{options.source} holds no requests to replay (after --adapter/--until)")
    model = resolve_model(options, contents)
    prefix = options.prefix or f"replay-{uuid.uuid4().hex[:8]}"
    topics = Topics(prefix)
    results_topic = f"{prefix}.replay-results"
    async with contextlib.AsyncExitStack() as stack:
        bootstrap = options.bootstrap
        if bootstrap is None:
            broker = await asyncio.to_thread(EmbeddedBroker().start)
            stack.push_async_callback(asyncio.to_thread, broker.stop)
            bootstrap = broker.bootstrap
        summary = ReplaySummary(options.out, prefix, bootstrap, model)
        await ensure_topics(bootstrap, topics, partitions=2)
        await create_topics(bootstrap, [results_topic], partitions=1)
        engine_meta: dict[str, Any] = {}
        if options.engine:
            engine_meta = await stack.enter_async_context(_fresh_engine(options, contents, bootstrap, prefix, model))
        meta = {
            "source": str(options.source),
            "source_meta": header.meta,
            "prefix": prefix,
            "results_topic": results_topic,
            "bootstrap": bootstrap if options.bootstrap else "embedded",
            "model": model,
            "pace": options.pace,
            "adapter": options.adapter,
            "until": options.until,
            "engine": engine_meta or None,
        }
        writer = stack.enter_context(HlrWriter(options.out, Header.new("replay", meta)))
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=0,
            max_request_size=MAX_REQUEST_BYTES, **kafka_kwargs(),
        )  # fmt: skip
        await producer.start()
        stack.push_async_callback(producer.stop)
        consumer = group_less_consumer(bootstrap, fetch_max_wait_ms=10)
        await consumer.start()
        stack.push_async_callback(consumer.stop)
        replies = {step.message.request_id: asyncio.Event() for step in steps}
        reader = asyncio.create_task(_read_results(consumer, results_topic, replies, writer, summary))
        try:
            await _send_all(lanes, producer, topics, results_topic, replies, writer, summary, options.timeout)
            await _wait_all(replies, options.timeout)
        except ReplayError:
            pass  # reported through summary.missing
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            writer.flush()
        summary.missing = [rid for rid, event in replies.items() if not event.is_set()]
    summary.seconds = time.monotonic() - started
    return summary


async def _send_all(
    lanes: dict[str, list[Step]],
    producer: AIOKafkaProducer,
    topics: Topics,
    results_topic: str,
    replies: dict[str, asyncio.Event],
    writer: HlrWriter,
    summary: ReplaySummary,
    timeout: float,
) -> None:
    async def logged(delivery: asyncio.Future[Any], topic: str, key: bytes | None, value: bytes) -> None:
        sent = await delivery
        writer.write(
            Record(
                topic=topic,
                partition=sent.partition,
                offset=sent.offset,
                timestamp=sent.timestamp,
                key=key,
                value=value,
            )
        )
        summary.sent += 1

    async def lane(steps: list[Step]) -> None:
        # Sends are enqueued, not awaited one by one: requests the agent pipelined then leave in one
        # batch as they did from its client, and reach the engine together (the producer keeps their order).
        deliveries: list[asyncio.Task[None]] = []
        for step in steps:
            for request_id in step.after:
                if request_id in replies:  # a predecessor filtered out by --until/--adapter is not awaited
                    await _wait_reply(replies, request_id, timeout)
            message = msgspec.structs.replace(step.message, reply_to=results_topic, sent_at_ms=wire.now_ms())
            value, key, topic = encode(message), key_for(message), topics.topic_for(message)
            delivery = await producer.send(topic, value, key=key)
            deliveries.append(asyncio.create_task(logged(delivery, topic, key, value)))
        await asyncio.gather(*deliveries)

    outcomes = await asyncio.gather(*(lane(steps) for steps in lanes.values()), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, ReplayError):
            raise outcome


async def _wait_reply(replies: dict[str, asyncio.Event], request_id: str, timeout: float) -> None:
    try:
        await asyncio.wait_for(replies[request_id].wait(), timeout)
    except asyncio.TimeoutError:
        raise ReplayError(f"no reply to request {request_id} within {timeout:g} s") from None


async def _wait_all(replies: dict[str, asyncio.Event], timeout: float) -> None:
    pending = [event.wait() for event in replies.values() if not event.is_set()]
    if pending:
        try:
            await asyncio.wait_for(asyncio.gather(*pending), timeout)
        except asyncio.TimeoutError:
            raise ReplayError(f"replies missing after {timeout:g} s") from None


async def _read_results(
    consumer: AIOKafkaConsumer,
    topic: str,
    replies: dict[str, asyncio.Event],
    writer: HlrWriter,
    summary: ReplaySummary,
) -> None:
    """Copy every record of the replay's results topic into the output, and mark the requests answered."""
    partition = TopicPartition(topic, 0)
    consumer.assign([partition])
    await consumer.seek_to_beginning(partition)  # a new topic: everything on it is this replay's
    while True:
        for records in (await consumer.getmany(timeout_ms=200)).values():
            for kafka_record in records:
                record = to_record(kafka_record)
                writer.write(record)
                message = decode_record(record)
                event = replies.get(message.request_id) if message is not None else None
                if isinstance(message, wire.Result) and event is not None and not event.is_set():
                    summary.answered += 1
                    if isinstance(message, wire.Error):
                        summary.errors[message.code] += 1
                    event.set()


@contextlib.asynccontextmanager
async def _fresh_engine(options: ReplayOptions, contents: Contents, bootstrap: str, prefix: str, model: str | None):  # type: ignore[no-untyped-def]
    """A new ``EngineService`` in this process for the block, stopped gracefully after it (bounded)."""
    from hotlora.engine.kafka.service import EngineService
    from hotlora.engine.kafka.service_config import from_sources

    status = contents.status()
    with contextlib.ExitStack() as dirs:
        checkpoint_dir = options.checkpoint_dir or dirs.enter_context(
            tempfile.TemporaryDirectory(prefix="hotlora-replay-")
        )
        base = from_sources(None)  # TLS/SASL and other HOTLORA_* settings, like any engine
        session = options.session_timeout_ms or (2000 if options.bootstrap is None else base.session_timeout_ms)
        config = dataclasses.replace(
            base,
            bootstrap=bootstrap,
            model=model,
            topic_prefix=prefix,
            partitions=2,
            checkpoint_dir=checkpoint_dir,
            group_id=None,
            dtype=options.dtype,
            device=options.device,
            max_decode_rows=(status.max_decode_rows if status and status.max_decode_rows else base.max_decode_rows),
            sampler=(status.sampler if status else base.sampler),
            session_timeout_ms=session,
            heartbeat_interval_ms=min(base.heartbeat_interval_ms, max(session // 6, 100)),
            engine_id=f"replay-{uuid.uuid4().hex[:8]}",
        )
        service = EngineService(config)
        running = asyncio.create_task(service.run(), name="hotlora-replay-engine")
        ready = asyncio.create_task(service.ready.wait())
        done, _ = await asyncio.wait({running, ready}, timeout=options.timeout, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if running in done:
            running.result()  # raises the start failure
            raise ReplayError("the replay engine stopped before it was ready")
        if ready not in done:
            service.request_stop()
            running.cancel()
            raise ReplayError(f"the replay engine was not ready within {options.timeout:g} s")
        meta = {
            "checkpoint_dir": checkpoint_dir,
            "dtype": config.dtype,
            "device": config.device,
            "max_decode_rows": config.max_decode_rows,
            "sampler": config.sampler,
        }
        try:
            yield meta
        finally:
            service.request_stop()
            try:
                await asyncio.wait_for(running, options.timeout)
            except asyncio.TimeoutError:
                running.cancel()
