"""``HotLoraClient``: the asyncio SDK an agent or any service embeds to talk to the engine over Kafka.

The verbs are the in-process ``Engine``'s, inherited from the same ``engine.verbs.Verbs`` (``sample``
returns a ``SampleOutput``, ``optim_step`` an ``OptimStepOutput``...); only ``submit`` differs, so an RL
loop reads the same in process and over Kafka.

Shape: one producer publishes requests keyed by adapter id; one consumer reads this client's own
reply topic ``{prefix}.replies.{client_id}`` (one partition, assigned directly: no group join, no
rebalance pauses). Each request's future waits in ``_pending`` under its ``request_id`` until its
reply arrives. The reply partition is positioned at its end before anything is sent, so no reply
can be missed.

Ordering and retries follow ``docs/protocol.md``: every request for an adapter carries the next
per-adapter ``seq`` (starting at 1), assigned when the request is actually sent. A timed-out request
is re-sent with the same ``request_id`` and ``seq``; the engine answers a duplicate once, and a late
reply to an attempt the client already gave up on finds no pending future and is dropped.

Tenancy and transport: ``principal`` and ``token`` (default: ``HOTLORA_PRINCIPAL``, ``HOTLORA_TOKEN``)
go on every request, so the adapters this client creates are refused to other principals
(``forbidden``). Kafka TLS/SASL comes from ``security`` or the engine's ``HOTLORA_SECURITY_PROTOCOL``,
``HOTLORA_SASL_*`` and ``HOTLORA_SSL_*`` variables (``engine.kafka.security``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from hotlora.engine.kafka.convert import result_to_engine, to_wire
from hotlora.engine.kafka.security import KafkaSecurity
from hotlora.engine.types import AdapterInfo, ListAdapters, Request
from hotlora.engine.verbs import Verbs
from hotlora.schemas import CheckpointEvent, Result, SchemaError, Topics, decode, encode, key_for, now_ms
from hotlora.schemas.errors import ClientClosed, HotLoraError, RequestTimeout

log = structlog.get_logger("hotlora.client")

# Big enough for a forward_backward of long RL rollouts; Kafka's own default (1 MiB) is not.
MAX_REQUEST_BYTES = 64 * 1024 * 1024
# How long the broker may hold an empty fetch of the reply topic. Tansu answers a held fetch only when
# this expires, not when a record arrives, so it sets the reply latency there (aiokafka's 500 ms default
# measured 250 ms per round trip; 10 ms measured ~7 ms). Apache Kafka answers as soon as a record
# arrives. Lower is faster and polls more while idle (10 ms: ~5% of a core per idle client).
DEFAULT_REPLY_WAIT_MS = 10


@dataclass
class _Pending:
    future: asyncio.Future[Result]
    seq: int


@dataclass
class ClientStats:
    """Counters a caller can read to see retries, late duplicates and the backpressure bound at work."""

    sent: int = 0
    retries: int = 0
    replies: int = 0
    ignored_replies: int = 0  # late duplicates, replies to requests that timed out, stray records
    max_in_flight_seen: int = 0
    in_flight: int = 0
    per_adapter_seq: dict[str, int] = field(default_factory=dict)  # the last seq sent per adapter


class HotLoraClient(Verbs):
    """Asyncio client for the hotlora engine; ``async with HotLoraClient(bootstrap) as client: ...``.

    ``request_timeout`` bounds each attempt, so a call fails after at most
    ``(retries + 1) * request_timeout`` seconds with ``RequestTimeout``. ``max_in_flight`` bounds the
    requests sent and not yet answered: further calls wait for a slot (backpressure), and wait before
    taking a ``seq``, so a waiting call never blocks the engine's ordering of those already sent.
    """

    def __init__(
        self,
        bootstrap: str,
        topic_prefix: str = "hotlora",
        client_id: str | None = None,
        request_timeout: float = 60.0,
        retries: int = 2,
        max_in_flight: int = 64,
        reply_wait_ms: int = DEFAULT_REPLY_WAIT_MS,
        *,
        principal: str | None = None,
        token: str | None = None,
        security: KafkaSecurity | None = None,
    ) -> None:
        if request_timeout <= 0:
            raise ValueError(f"request_timeout must be > 0, got {request_timeout!r}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries!r}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight!r}")
        if reply_wait_ms < 0:
            raise ValueError(f"reply_wait_ms must be >= 0, got {reply_wait_ms!r}")
        self.bootstrap = bootstrap
        self.topics = Topics(topic_prefix)
        self.client_id = client_id or f"agent-{uuid.uuid4().hex[:12]}"
        self.reply_topic = f"{self.topics.prefix}.replies.{self.client_id}"
        Topics(self.reply_topic)  # the same name rule as every topic: fail here, not at first publish
        self.request_timeout = request_timeout
        self.retries = retries
        self.max_in_flight = max_in_flight
        self.reply_wait_ms = reply_wait_ms
        self.principal = os.environ.get("HOTLORA_PRINCIPAL", "") if principal is None else principal
        self._token = os.environ.get("HOTLORA_TOKEN", "") if token is None else token
        if self.principal and not self._token:
            raise ValueError("a principal needs a token (HOTLORA_TOKEN): the engine refuses a principal without one")
        # TLS/SASL kwargs for every Kafka client of this client; bad settings fail here, not at start().
        self._security = (security or KafkaSecurity.from_env()).kafka_kwargs()
        self.stats = ClientStats()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._pending: dict[str, _Pending] = {}
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False

    # ----- lifecycle -----

    async def start(self) -> HotLoraClient:
        if self._started:
            return self
        if self._closed:
            raise ClientClosed("a closed HotLoraClient cannot be restarted; make a new one")
        await self._create_reply_topic()
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            **self._security,
            client_id=self.client_id,
            acks="all",
            linger_ms=0,
            max_request_size=MAX_REQUEST_BYTES,
        )
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            **self._security,
            client_id=self.client_id,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            fetch_max_wait_ms=self.reply_wait_ms,
            fetch_max_bytes=MAX_REQUEST_BYTES,
            max_partition_fetch_bytes=MAX_REQUEST_BYTES,
        )
        await producer.start()
        try:
            await consumer.start()
            partition = TopicPartition(self.reply_topic, 0)
            consumer.assign([partition])
            await consumer.seek_to_end(partition)
            await consumer.position(partition)  # resolve the offset now, before any request is sent
        except BaseException:
            await consumer.stop()
            await producer.stop()
            raise
        self._producer, self._consumer = producer, consumer
        self._reader = asyncio.create_task(self._read_replies(), name=f"hotlora-client-replies-{self.client_id}")
        self._started = True
        log.info("client_started", client_id=self.client_id, reply_topic=self.reply_topic)
        return self

    async def close(self) -> None:
        """Stop accepting calls, fail every pending call with ``ClientClosed``, stop consumer and producer."""
        if self._closed:
            return
        self._closed = True
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if not entry.future.done():
                entry.future.set_exception(ClientClosed("the client closed before the reply arrived"))
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()
        log.info("client_closed", client_id=self.client_id, failed_pending=len(pending))

    async def __aenter__(self) -> HotLoraClient:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered (or given up on)."""
        return self.stats.in_flight

    # ----- the verbs come from engine.verbs.Verbs; resume is the client's own -----

    async def resume(self, adapter_id: str) -> AdapterInfo | None:
        """Continue an adapter this client did not create (an agent restarted after a crash): its next
        request takes the ``seq`` after the last one the engine accepted, so the engine neither waits for
        nor treats as already applied requests this process never sent. None if the adapter is unknown."""
        info = next((a for a in await self.list_adapters(adapter_id) if a.adapter_id == adapter_id), None)
        if info is not None:
            seqs = self.stats.per_adapter_seq
            seqs[adapter_id] = max(seqs.get(adapter_id, 0), info.seq)
        return info

    # ----- the one path every verb takes -----

    async def submit(self, request: Request) -> Any:
        """Send one engine request and return its engine-typed result, or raise its typed error."""
        self._check_open()
        async with self._slots:
            self._check_open()  # the client may have closed while this call waited for a slot
            adapter_id = getattr(request, "adapter_id", None) or ""
            # list_adapters and base-model sampling opt out of ordering (seq 0), as the protocol says.
            ordered = bool(adapter_id) and not isinstance(request, ListAdapters)
            seq = self.stats.per_adapter_seq.get(adapter_id, 0) + 1 if ordered else 0
            message = to_wire(request, seq=seq, reply_to=self.reply_topic, principal=self.principal, token=self._token)
            if ordered:  # taken only once the message exists, so a request that fails to build leaves no gap
                self.stats.per_adapter_seq[adapter_id] = seq
            future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
            self._pending[message.request_id] = _Pending(future, seq)
            self.stats.in_flight += 1
            self.stats.max_in_flight_seen = max(self.stats.max_in_flight_seen, self.stats.in_flight)
            try:
                reply = await self._send_with_retries(message, future)
            finally:
                self.stats.in_flight -= 1
                self._pending.pop(message.request_id, None)
        return result_to_engine(reply)

    async def _send_with_retries(self, message: Any, future: asyncio.Future[Result]) -> Result:
        topic = self.topics.topic_for(message)
        last_error: BaseException | None = None
        for attempt in range(self.retries + 1):
            self._check_open()  # close() during a retry wait or a failed send ends the call as closed
            if attempt:
                self.stats.retries += 1
                log.warning("request_retry", request_id=message.request_id, seq=message.seq, attempt=attempt)
            # Same request_id and seq on every attempt; only the send time is fresh.
            payload = encode(msgspec.structs.replace(message, sent_at_ms=now_ms()))
            try:
                assert self._producer is not None
                # Shielded: a caller that cancels must not leave a hole in the adapter's seq at the engine.
                await asyncio.shield(self._producer.send_and_wait(topic, payload, key=key_for(message)))
                self.stats.sent += 1
            except KafkaError as err:
                last_error = err
                await asyncio.sleep(min(self.request_timeout, 0.1 * 2**attempt))
                continue
            try:
                return await asyncio.wait_for(asyncio.shield(future), self.request_timeout)
            except asyncio.TimeoutError as err:
                last_error = err
        attempts = self.retries + 1
        raise RequestTimeout(
            f"no reply to {type(message).__name__} request {message.request_id} (adapter {message.adapter_id!r}, "
            f"seq {message.seq}) after {attempts} attempt(s) of {self.request_timeout:g} s"
            + (f"; last error: {last_error!r}" if isinstance(last_error, KafkaError) else "")
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("the client is closed")
        if not self._started:
            raise ClientClosed("the client is not started; use `await client.start()` or `async with`")

    async def _read_replies(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=500)
            except KafkaError as err:  # the consumer reconnects by itself; keep reading
                log.warning("reply_fetch_failed", error=repr(err))
                await asyncio.sleep(0.1)
                continue
            for records in batches.values():
                for record in records:
                    self._on_reply(record.value)

    def _on_reply(self, value: bytes | None) -> None:
        try:
            message = decode(value or b"")
        except SchemaError as err:
            self.stats.ignored_replies += 1
            log.warning("reply_undecodable", error=str(err))
            return
        entry = self._pending.get(message.request_id)
        if not isinstance(message, Result) or entry is None or entry.future.done() or message.seq != entry.seq:
            # A duplicate (a retry answered twice), a reply to a call that already gave up, or a stray record.
            self.stats.ignored_replies += 1
            return
        self.stats.replies += 1
        entry.future.set_result(message)

    async def _create_reply_topic(self) -> None:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap, **self._security, client_id=f"{self.client_id}-admin"
        )
        await admin.start()
        try:
            await admin.create_topics([NewTopic(self.reply_topic, num_partitions=1, replication_factor=1)])
        except TopicAlreadyExistsError:
            pass  # a restarted client with a fixed client_id reuses its topic; seek_to_end skips old replies
        finally:
            await admin.close()

    # ----- events -----

    async def checkpoints(
        self, adapter_id: str | None = None, *, from_beginning: bool = False
    ) -> AsyncGenerator[CheckpointEvent, None]:
        """Checkpoint events from the engine (all adapters, or one), as they arrive.

        Reads the checkpoints topic with its own consumer and no group, so every subscriber sees every
        event. Starts at the topic's end unless ``from_beginning``.
        """
        self._check_open()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            **self._security,
            client_id=f"{self.client_id}-events",
            group_id=None,
            fetch_max_wait_ms=max(self.reply_wait_ms, 100),  # events are rare; poll gently
        )
        await consumer.start()
        try:
            await consumer.topics()  # refreshes metadata
            partitions = consumer.partitions_for_topic(self.topics.checkpoints)
            if not partitions:
                raise HotLoraError(f"topic {self.topics.checkpoints} does not exist; is the engine running?")
            assigned = [TopicPartition(self.topics.checkpoints, p) for p in sorted(partitions)]
            consumer.assign(assigned)
            if from_beginning:
                await consumer.seek_to_beginning(*assigned)
            else:
                await consumer.seek_to_end(*assigned)
            for tp in assigned:
                await consumer.position(tp)
            while not self._closed:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        try:
                            event = decode(record.value or b"")
                        except SchemaError as err:
                            log.warning("checkpoint_event_undecodable", error=str(err))
                            continue
                        if isinstance(event, CheckpointEvent) and adapter_id in (None, event.adapter_id):
                            yield event
        finally:
            await consumer.stop()

    async def wait_for_checkpoint(
        self, adapter_id: str, min_step: int = 0, timeout: float | None = None, *, from_beginning: bool = True
    ) -> CheckpointEvent:
        """The first checkpoint event of ``adapter_id`` with ``step >= min_step`` (bounded by ``timeout``)."""

        async def first() -> CheckpointEvent:
            events = self.checkpoints(adapter_id, from_beginning=from_beginning)
            try:
                async for event in events:
                    if event.step >= min_step:
                        return event
            finally:
                await events.aclose()
            raise ClientClosed("the client closed while waiting for a checkpoint")

        try:
            return await asyncio.wait_for(first(), timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"no checkpoint of adapter {adapter_id!r} with step >= {min_step} within {timeout} s"
            ) from None


__all__ = ["ClientClosed", "ClientStats", "HotLoraClient", "RequestTimeout"]
