"""``EngineService``: the Kafka edge around ``Engine`` (one asyncio process, uvloop in production).

A record's way, top to bottom in this file: **consume** it (the rollout, gradient and control topics,
one consumer group), **decode** it into a typed wire request (``hotlora.schemas``), **sequence** it
(``Sequencer`` restores each adapter's ``seq`` order across the three topics), check its adapter's
**owner** (``OwnershipGate``), run it on the **engine**, **reply** to its ``reply_to``, and **commit**
its offset. The engine's busy loop never sees a socket; this module never touches the model.

The jobs around that way are objects of their own: ``Durability`` (snapshots and the ledger that says
which records may commit), ``Handover`` (rebalances: quiesce or fence, then adopt), ``Outbox`` (what
is published and how each kind fails), ``Heartbeats`` (status on the metrics topic) and ``Tasks``
(request tasks and the follow-ups they start).

Delivery. Kafka gives at-least-once here (idempotent producers fail on Tansu), so the edge makes the
engine idempotent: a ``request_id`` seen again is answered from a bounded cache of recent results, or
ignored while its first copy is still in flight. Input offsets are committed only once every record up
to them is answered (``OffsetTracker``), and with durability on only once a snapshot covers the request,
so a crash re-delivers unanswered requests, never loses them.

Scale-out. Several engines join one consumer group; ``CoPartitionAssignor`` (engine.kafka.placement)
gives each one whole partition numbers of all request topics, so each adapter has exactly one engine.
On a rebalance the engine stops taking records, finishes what it started, makes it durable and commits;
then it unloads the adapters it lost and loads the ones it gained from the shared snapshot store before
it serves them (``docs/scale-out.md``).

Shutdown (SIGTERM/SIGINT): stop fetching, let submitted requests and every follow-up they start (their
snapshots) finish, checkpoint every adapter under ``checkpoint_dir`` (each with a checkpoint event),
publish ``engine_status: stopped``, commit, exit 0. Requests still held for a missing predecessor are
left uncommitted for the next engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import InvalidSessionTimeoutError, KafkaError

from hotlora.engine.event_loop import run
from hotlora.engine.kafka.admin import ensure_topics, group_members
from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.engine.kafka.convert import from_engine, to_engine
from hotlora.engine.kafka.device_claim import CLAIM, DeviceClaim, claim_visible_gpu
from hotlora.engine.kafka.durability import Durability, DurableStore, Records
from hotlora.engine.kafka.heartbeats import Heartbeats
from hotlora.engine.kafka.ownership import OwnershipGate
from hotlora.engine.kafka.placement import CoPartitionAssignor, Handover
from hotlora.engine.kafka.quotas import QuotaLimits, Quotas
from hotlora.engine.kafka.replies import Outbox, salvage_seq
from hotlora.engine.kafka.sequencing import OffsetTracker, ResultCache, Sequencer
from hotlora.engine.kafka.service_config import ServiceConfig
from hotlora.engine.kafka.tasks import Tasks
from hotlora.engine.observability import EngineMetrics
from hotlora.engine.types import ListAdapters, OptimStep, OptimStepOutput, SaveState
from hotlora.schemas import messages as wire
from hotlora.schemas.codec import decode, encode, is_topic_name, reject
from hotlora.schemas.errors import Forbidden, HotLoraError, InvalidRequest, QuotaExceeded, SchemaError
from hotlora.schemas.topics import Topics

if TYPE_CHECKING:  # imported on the loading thread (``_load_engine``): the group join overlaps it
    from hotlora.engine.core import Engine, EngineConfig

log = structlog.get_logger("hotlora.service")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
FETCH_TIMEOUT_MS = 200  # also how often held requests are checked for an expired gap

# Requests that change an adapter's state: applied exactly once, across restarts too (by seq).
MUTATING = (wire.CreateAdapter, wire.ForwardBackward, wire.OptimStep, wire.LoadState, wire.DeleteAdapter)
# Requests after which the engine snapshots the adapter with a save barrier. An optim_step's snapshot is
# captured in its own engine step instead (``capture_state``). forward_backward's gradients are volatile:
# the next optim_step's snapshot covers them, and until then they are re-delivered after a crash.
SNAPSHOT_AFTER = (wire.CreateAdapter, wire.LoadState)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _transport_bytes(config: ServiceConfig) -> int:
    """Fetch and produce limits: room to read (and dead-letter) a record over ``max_message_bytes``.

    A record larger even than this is still fetched (a broker returns an oversize first record batch
    whole, KIP-74) but cannot be copied to the dead letters; it is then answered and logged only.
    """
    return max(MAX_MESSAGE_BYTES, 2 * config.max_message_bytes + (1 << 20))


# ----- 2. decode (a pure function: bytes in, a typed request or ``bad_message`` out) -----


def decode_request(value: bytes, limit: int) -> wire.RequestMessage:
    """The typed request in a record's ``value``; a ``SchemaError`` (``bad_message``) for anything else."""
    if len(value) > limit:
        raise reject(f"record of {len(value)} bytes exceeds max_message_bytes={limit}", value)
    message = decode(value)
    if not message.request_id:
        raise SchemaError("request_id must be a non-empty string", adapter_id=message.adapter_id)
    if message.reply_to and not is_topic_name(message.reply_to):  # answered on the shared results topic
        raise SchemaError(
            f"reply_to {message.reply_to[:100]!r} is not a Kafka topic name ([A-Za-z0-9._-], 1-249 chars)",
            request_id=message.request_id,
            adapter_id=message.adapter_id,
        )
    if not isinstance(message, wire.Request):
        raise SchemaError(
            f"{wire.tag_of(type(message))!r} is not a request",
            request_id=message.request_id,
            adapter_id=message.adapter_id,
            reply_to=message.reply_to,
        )
    return message


class EngineService:
    """Run with ``await service.run()``; ``request_stop()`` starts the graceful shutdown."""

    def __init__(self, config: ServiceConfig, engine: Engine | None = None) -> None:
        self.config = config
        self.topics = Topics(config.topic_prefix)
        self.engine = engine
        self._owns_engine = engine is None
        self.bootstrap = config.bootstrap
        self.model = config.model or ""
        self.checkpoint_dir = Path(config.checkpoint_dir).resolve()
        self._security = config.kafka_security().kafka_kwargs()  # TLS/SASL; bad settings fail here
        # Adapter owners (engine.kafka.ownership): one record per adapter, so engines can share checkpoint_dir.
        self.owners = OwnershipGate.load(self.checkpoint_dir / "owners", legacy=self.checkpoint_dir / "owners.json")
        # Durability (engine.kafka.durability): a request's offset commits once a current snapshot covers it.
        self.durability = Durability(DurableStore(self.checkpoint_dir / ".durable")) if config.durable else None
        # Per-principal quotas (engine.kafka.quotas), checked in seq order right before the engine.
        self.quotas = Quotas(quota_limits(config), max_request_rows=config.max_decode_rows)
        self._sizes: dict[str, int] = {}  # request_id -> its record's bytes, until it is executed
        self.state = "starting"
        # Prometheus metrics (engine.observability): an injected engine's own, else one when --metrics-port is set.
        self.metrics: EngineMetrics | None = engine.metrics if engine is not None else None
        if self.metrics is None and config.metrics_port is not None:
            self.metrics = EngineMetrics()
        self.metrics_port: int | None = None  # the bound port, once serving
        self.ready = asyncio.Event()  # set once consuming; tests and the CLI may wait on it
        self.device_claim: DeviceClaim | None = None  # --device cuda:claim: held until the process exits
        self.assignor = CoPartitionAssignor()
        self._stop = asyncio.Event()
        self._sequencer: Sequencer[tuple[wire.RequestMessage, int]] = Sequencer(config.seq_gap_timeout)
        self._offsets: OffsetTracker[TopicPartition] = OffsetTracker()
        self._results: ResultCache[str, wire.ResultMessage] = ResultCache(config.result_cache_size)
        self._inflight: dict[str, Records] = {}  # request_id -> the records it answers
        # Records that arrive while a new assignment's adapters load wait here (``_adopt``).
        self._serving = asyncio.Event()
        self._early: list[tuple[TopicPartition, ConsumerRecord[Any, Any]]] = []
        self._tasks = Tasks()
        self._background: list[asyncio.Task[Any]] = []
        self._commit_wake = asyncio.Event()
        self._loaded = asyncio.Event()  # the engine exists (``_start``): rebalances may use it
        # The group's assignment while the model still loads, adopted by ``_start`` once it has (``_adopt``).
        self._assigned_while_loading: set[TopicPartition] | None = None
        # A rebalance's revoke and an adoption that ``_start`` runs outside the group's callbacks never interleave.
        self._handover_lock = asyncio.Lock()
        self._commit_lock = asyncio.Lock()
        self._broker: EmbeddedBroker | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        # Made in ``_start``, once the engine and the producer exist.
        self.outbox: Outbox | None = None
        self.heartbeats: Heartbeats | None = None
        self.handover: Handover | None = None

    @property
    def held_requests(self) -> int:
        return self._sequencer.held

    @property
    def fenced(self) -> bool:
        """Stopped mid-rebalance (``Handover``): exits without serving or checkpointing."""
        return self.handover is not None and self.handover.fenced

    def durable_seq(self, adapter_id: str) -> int:
        """The last ``seq`` of the adapter its current snapshot covers (0: none, or durability off)."""
        return 0 if self.durability is None else self.durability.ledger.durable_seq(adapter_id)

    # ----- lifecycle -----

    def request_stop(self) -> None:
        log.info("stop_requested")
        self._stop.set()

    async def run(self) -> None:
        try:
            await self._start()
            await self._consume_until_stopped()
            await self._shutdown()
        finally:
            await self._close()

    async def _start(self) -> None:
        """Probe first, then everything that only waits on the network while torch and transformers
        import and the model loads, on a thread (seconds): the topics, the producer and, when the group
        has no member (a first start, or every engine restarting), the group join (on Tansu at least a
        second); the engine is ready when the slower of the two is done. An engine joining a group that
        has members joins once it can serve: the others keep serving meanwhile, and the adapters moved to
        it pause for the join and their snapshot loads only, not for its imports too."""
        if self.metrics is not None and self.config.metrics_port is not None:
            self.metrics_port = self.metrics.start_http_server(self.config.metrics_port, state=lambda: self.state)
            log.info("metrics_serving", port=self.metrics_port)
        if self.bootstrap is None:
            self._broker = await asyncio.to_thread(EmbeddedBroker().start)
            self.bootstrap = self._broker.bootstrap
            log.info("embedded_broker_started", bootstrap=self.bootstrap)
        loading = None if self.engine is not None else asyncio.create_task(asyncio.to_thread(self._load_engine))
        try:
            await self._connect()
            members = await group_members(self.bootstrap, self.config.consumer_group, security=self._security)
            join_now = members == 0 or loading is None
            if join_now:
                await self._join()
            else:
                log.info("join_after_load", group=self.config.consumer_group, members=members)
        finally:
            if loading is not None:  # never left running on a failed connect: its exception is raised here
                self.engine = await loading
        assert self.engine is not None and self.outbox is not None
        await self.engine.start()
        if self.durability is None:
            log.warning("durability_off", consequence="an adapter that moves to another engine starts empty there")
        self.heartbeats = Heartbeats(
            self.outbox,
            self.engine,
            self.config.engine_id,
            self.model,
            self.metrics,
            model_name=self.config.model_name,
            checkpoint_dir=str(self.checkpoint_dir),
        )
        self.handover = Handover(
            self.engine, self.durability, self._sequencer, self.owners, self.metrics, self.config.rebalance_timeout_ms
        )
        await self.heartbeats.status(self.state)  # "starting", before ``_adopt`` may announce "running"
        self._loaded.set()
        if not join_now:
            await self._join()
        assigned, self._assigned_while_loading = self._assigned_while_loading, None
        if assigned is not None:  # the group formed while the model loaded: take that (latest) assignment now
            await self._adopt(assigned)
        self._background = [
            asyncio.create_task(self._heartbeat_loop(), name="hotlora-heartbeats"),
            asyncio.create_task(self._committer(), name="hotlora-committer"),
        ]

    async def _connect(self) -> None:
        """Topics, the producer, and the consumer (``_join`` joins its group)."""
        config = self.config
        assert self.bootstrap is not None
        created = await ensure_topics(
            self.bootstrap, self.topics, config.partitions, config.replication_factor, security=self._security
        )
        log.info("topics_ready", created=created, prefix=self.topics.prefix, partitions=config.partitions)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            **self._security,
            acks="all",
            enable_idempotence=False,
            max_request_size=_transport_bytes(config),
        )
        await self._producer.start()
        self.outbox = Outbox(self._producer, self.topics, config.max_message_bytes)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            **self._security,
            group_id=config.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=config.session_timeout_ms,
            heartbeat_interval_ms=config.heartbeat_interval_ms,
            rebalance_timeout_ms=config.rebalance_timeout_ms,
            max_partition_fetch_bytes=_transport_bytes(config),
            fetch_max_bytes=_transport_bytes(config),
            # Tansu answers an empty fetch only after the full wait, not when a record arrives: with
            # aiokafka's 500 ms default every request would sit up to half a second before the engine
            # saw it. 10 ms costs a few percent of a core while idle.
            fetch_max_wait_ms=config.fetch_max_wait_ms,
            partition_assignment_strategy=(self.assignor,),
        )

    async def _join(self) -> None:
        """Join the group (on Tansu: at least 1 s); the assignment's callback runs ``_adopt``."""
        assert self._consumer is not None
        config = self.config
        self._consumer.subscribe(list(self.topics.requests()), listener=_Rebalance(self))
        try:
            await self._consumer.start()  # returns once the group is joined and the assignment taken (or noted)
        except InvalidSessionTimeoutError:
            raise self._session_refused() from None
        log.info("group_joined", group=config.consumer_group, session_timeout_ms=config.session_timeout_ms)

    def _session_refused(self) -> InvalidSessionTimeoutError:
        """The broker's refusal of our session timeout, with what to do about it."""
        return InvalidSessionTimeoutError(
            f"the broker refuses session_timeout_ms={self.config.session_timeout_ms} (Apache Kafka's "
            "group.min.session.timeout.ms is 6000 unless lowered): lower the broker's minimum or pass "
            "--session-timeout-ms 6000 (HOTLORA_SESSION_TIMEOUT_MS)"
        )

    def _load_engine(self) -> Engine:
        if self.config.device == CLAIM:  # before CUDA starts: it narrows CUDA_VISIBLE_DEVICES to the claimed GPU
            self.device_claim = claim_visible_gpu(Path(self.config.device_lock_dir))
            log.info("gpu_claimed", gpu=self.device_claim.gpu_id, lock=str(self.device_claim.path))
        if not self.model:  # ``hotlora engine`` fills in its default (the cached tiny model) before this
            raise ValueError("ServiceConfig.model names no base model directory")
        settings = self.config
        from hotlora.engine.core import Engine  # torch and transformers: seconds, while the group joins

        log.info(
            "loading_model", model=self.model, dtype=settings.dtype, device=settings.device, sampler=settings.sampler
        )
        engine = Engine.from_pretrained(
            self.model,
            dtype=settings.dtype,
            device="cuda" if settings.device == CLAIM else settings.device,
            config=engine_config(settings),
            metrics=self.metrics,
        )
        log.info("model_loaded", model=self.model)  # on the loading thread: the moment it is done
        return engine

    async def _shutdown(self) -> None:
        """The one shutdown path: wait for every task and the follow-ups they start, checkpoint, commit."""
        assert self.engine is not None and self.heartbeats is not None
        if self.fenced:
            return
        self.state = "draining"
        await self.heartbeats.status(self.state)
        if len(self._tasks):
            log.info("draining", in_flight=len(self._tasks), held=self._sequencer.held)
        if late := await self._tasks.wait(self.config.drain_timeout):
            log.warning("drain_timeout", unfinished=late)
        await self._checkpoint_all()
        self.state = "stopped"
        await self.heartbeats.status(self.state)
        await self._commit()
        log.info("engine_stopped")

    async def _checkpoint_all(self) -> None:
        assert self.engine is not None and self.outbox is not None
        for info in await self.engine.submit(ListAdapters()):
            path = self.checkpoint_dir / _UNSAFE.sub("_", info.adapter_id) / f"step-{info.version}"
            request = SaveState(info.adapter_id, path, include_optimizer=True)
            try:
                saved = await self.engine.submit(request)
            except HotLoraError as err:
                log.error("shutdown_checkpoint_failed", adapter_id=info.adapter_id, error=str(err))
                continue
            await self.outbox.checkpoint(info.adapter_id, saved.path, saved.version, True, request.request_id)

    async def _close(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._tasks.cancel()
        if self._consumer is not None:
            with contextlib.suppress(KafkaError, OSError):
                await self._consumer.stop()
        if self._producer is not None:
            with contextlib.suppress(KafkaError, OSError):
                await self._producer.stop()
        if self.engine is not None and self._owns_engine:
            await self.engine.close()
        if self.metrics is not None:
            self.metrics.close()
        if self._broker is not None:
            await asyncio.to_thread(self._broker.stop)

    # ----- 1. consume -----

    async def _consume_until_stopped(self) -> None:
        assert self._consumer is not None
        while not self._stop.is_set():
            try:
                batch = await self._consumer.getmany(timeout_ms=FETCH_TIMEOUT_MS)
            except InvalidSessionTimeoutError:  # a later rejoin, against a broker whose minimum changed
                raise self._session_refused() from None
            for partition, records in batch.items():
                for record in records:
                    self._on_record(partition, record)
            self._release(self._sequencer.expire(time.monotonic()))

    def _on_record(self, partition: TopicPartition, record: ConsumerRecord[Any, Any]) -> None:
        if not self._serving.is_set():  # the assignment's adapters are still loading
            self._early.append((partition, record))
            return
        self._offsets.start(partition, record.offset)
        records = [(partition, record.offset)]
        received = wire.now_ms()
        try:
            message = decode_request(record.value or b"", self.config.max_message_bytes)
        except SchemaError as err:
            self._tasks.spawn(self._dead_letter(partition, record, err, received))
            self._release(self._sequencer.skip(err.adapter_id, salvage_seq(record.value), time.monotonic()))
            return
        if not self._first_copy(message, records):
            return
        if self._refuse_foreign(message, records, received) or self._already_durable(message, records):
            return
        self._sizes[message.request_id] = len(record.value or b"")
        self._sequence(message, records, received)

    # ----- 2. decode: ``decode_request`` above, then duplicates -----

    def _first_copy(self, message: wire.RequestMessage, records: Records) -> bool:
        """False for a copy of a request already answered (answered again) or still in flight (ignored)."""
        rid = message.request_id
        cached = self._results.get(rid) or self._stored_reply(message)
        if cached is not None:
            log.info("duplicate_republished", request_id=rid, adapter_id=message.adapter_id)
            self._tasks.spawn(self._answer_again(message, cached, records))
            return False
        if rid in self._inflight:
            log.info("duplicate_ignored", request_id=rid, adapter_id=message.adapter_id)
            self._inflight[rid] += records
            return False
        return True

    # ----- 3. sequence -----

    def _sequence(self, message: wire.RequestMessage, records: Records, received: int) -> None:
        self._inflight[message.request_id] = records
        starts = isinstance(message, wire.CreateAdapter | wire.LoadState)
        ready = self._sequencer.offer(message.adapter_id, message.seq, (message, received), time.monotonic(), starts)
        if not ready:
            log.debug("request_held", request_id=message.request_id, adapter_id=message.adapter_id, seq=message.seq)
        self._release(ready)

    def _release(self, ready: list[tuple[wire.RequestMessage, int]]) -> None:
        # Tasks start in creation order and Engine.submit enqueues before its first await, so the
        # engine's scheduler sees these requests in exactly this (seq) order.
        for message, received in ready:
            durable = self.durability is not None and bool(message.seq) and bool(message.adapter_id)
            if durable:
                assert self.durability is not None
                self.durability.ledger.released(message.adapter_id, message.seq, isinstance(message, MUTATING))
            self._tasks.spawn(self._execute(message, received))
            if durable and isinstance(message, SNAPSHOT_AFTER):
                # Spawned right behind the request, so the engine runs the snapshot right after it and
                # before any later request of the adapter: the snapshot holds exactly the seqs up to it.
                self._tasks.spawn(self._snapshot(message.adapter_id, message.seq))

    # ----- 4. own -----

    def _refuse_foreign(self, message: wire.RequestMessage, records: Records, received: int) -> bool:
        """A request its adapter's recorded owner refuses is answered ``forbidden`` on arrival: it neither
        waits in the sequencer nor reaches the engine. It touches none of the owner's state: not the
        owner's seq slots (a foreign request must not make the owner's request of that seq skip or
        wait) and not the result cache (a forged copy of the owner's ``request_id`` must not answer the
        owner's real request with ``forbidden``)."""
        try:
            self.owners.precheck(message)
        except Forbidden as err:
            log.warning(
                "forbidden", request_id=message.request_id, adapter_id=message.adapter_id, principal=message.principal
            )
            reply = from_engine(message, err, received_at_ms=received)
            if self.metrics is not None:
                self.metrics.observe_request(message, reply)
            self._tasks.spawn(self._answer_now(reply, records))
            return True
        return False

    # ----- 5. engine -----

    async def _execute(self, message: wire.RequestMessage, received_at_ms: int) -> None:
        assert self.engine is not None
        with structlog.contextvars.bound_contextvars(request_id=message.request_id, adapter_id=message.adapter_id):
            try:
                self._admit_quota(message)  # before the first await, in seq order; a refusal changes nothing
                try:
                    self.owners.admit(message)  # Forbidden changes nothing
                except BaseException:
                    self.quotas.release(message.request_id)
                    raise
                request = to_engine(self._resolve_paths(message))
                if isinstance(request, OptimStep) and self.durability is not None and message.seq:
                    request.capture_state = True  # the durable snapshot, taken in the optim_step's own engine step
                result: Any = await self.engine.submit(request)
            except HotLoraError as err:
                result = err
            except Exception as err:  # a tenant's request must never take the edge down
                log.exception("request_crashed")
                result = err
            self.quotas.release(message.request_id)  # answered: what it held is free for the next
            if self.fenced:  # the engine stopped mid-rebalance: the new owner answers this request, not us
                log.info("request_abandoned", type=wire.tag_of(type(message)), seq=message.seq)
                return
            result = self.owners.settle(message, result)
            if isinstance(result, OptimStepOutput) and result.state is not None:
                self._tasks.spawn(self._persist(message.adapter_id, message.seq, result.state))
                result.state = None
            if isinstance(message, wire.ListAdapters) and isinstance(result, list):
                result = [dataclasses.replace(info, seq=self._sequencer.last(info.adapter_id)) for info in result]
            reply = from_engine(message, result, received_at_ms=received_at_ms)
            if self.metrics is not None:
                self.metrics.observe_request(message, reply)
            if isinstance(message, wire.SaveState) and isinstance(reply, wire.SaveStateResult):
                assert self.outbox is not None
                await self.outbox.checkpoint(
                    message.adapter_id, reply.path, reply.version, message.include_optimizer, message.request_id
                )
            self._results.put(message.request_id, reply)
            await self._reply(message, reply, self._inflight.pop(message.request_id, []))
            outcome = {"code": reply.code, "error": reply.message} if isinstance(reply, wire.Error) else {}
            log.info("request_done", type=wire.tag_of(type(message)), seq=message.seq, **outcome)
            if isinstance(reply, wire.CreateAdapterResult | wire.DeleteAdapterResult | wire.LoadStateResult):
                assert self.heartbeats is not None
                await self.heartbeats.status(self.state)

    def _admit_quota(self, message: wire.RequestMessage) -> None:
        """Count the request against its principal's quotas, or raise ``QuotaExceeded`` (nothing counted).

        The refusal is answered like any refusal after sequencing: it takes the request's ``seq`` (the
        adapter's next request is not held for it) and, with durability on, its stored reply answers a
        re-delivery; the adapter, its owner record and other requests are untouched.
        """
        size = self._sizes.pop(message.request_id, 0)
        owned = None
        adapter_id = message.adapter_id
        if isinstance(message, wire.CreateAdapter | wire.LoadState) and adapter_id not in self.owners.registry:
            owned = self.owners.registry.count(message.principal)
        try:
            self.quotas.admit(message, size, owned)
        except QuotaExceeded as err:
            log.warning("quota_exceeded", principal=message.principal, quota=err.quota)
            if self.metrics is not None:
                self.metrics.observe_quota_refusal(message.principal, err.quota)
            raise

    def _resolve_paths(self, message: wire.RequestMessage) -> wire.RequestMessage:
        """Checkpoint paths live under ``checkpoint_dir``: relative ones are taken from there, and any path
        (absolute, or with ``..``, or through a symlink) that leaves it is refused with ``invalid_request``."""
        if not isinstance(message, wire.SaveState | wire.LoadState):
            return message
        try:
            resolved = (self.checkpoint_dir / message.path).resolve()
        except (ValueError, OSError) as err:  # an embedded NUL byte, a symlink loop
            raise InvalidRequest(f"checkpoint path {message.path[:200]!r} is not usable: {err}") from None
        if resolved == self.checkpoint_dir or not resolved.is_relative_to(self.checkpoint_dir):
            raise InvalidRequest(
                f"checkpoint path {message.path[:200]!r} must name a directory inside the engine's checkpoint_dir"
            )
        return msgspec.structs.replace(message, path=str(resolved))

    # ----- 6. reply -----

    async def _reply(self, message: wire.RequestMessage, reply: wire.ResultMessage, records: Records) -> None:
        """Publish an executed request's reply, then let its records commit: at once, or with durability on
        once a snapshot covers the request. A reply that cannot be sent is logged and its records still
        finish: the agent's retry (same ``request_id``) is answered from the result cache, and one lost
        reply must not stop every later commit on the partition."""
        assert self.outbox is not None
        await self.outbox.reply(reply)
        durability, adapter_id, seq = self.durability, message.adapter_id, message.seq
        if durability is not None and seq and adapter_id:
            durability.answered(adapter_id, seq, message.request_id, isinstance(message, MUTATING), encode(reply))
            if isinstance(message, wire.DeleteAdapter) and isinstance(reply, wire.DeleteAdapterResult):
                self._finish([records, *await durability.remove(adapter_id)])
                return
        self._commit_when_durable(message, records)

    async def _answer_again(self, message: wire.RequestMessage, reply: wire.ResultMessage, records: Records) -> None:
        """A re-delivered request already answered (a retry, or records re-read after a rebalance)."""
        assert self.outbox is not None
        await self.outbox.reply(reply)
        self._commit_when_durable(message, records)

    async def _answer_now(self, reply: wire.ResultMessage, records: Records) -> None:
        """A request answered without running (refused, or covered by a snapshot): its records commit at once."""
        assert self.outbox is not None
        await self.outbox.reply(reply)
        self._finish([records])

    def _already_durable(self, message: wire.RequestMessage, records: Records) -> bool:
        """A mutating request a current snapshot already covers (re-delivered after a restart): answered
        from the stored reply, never applied again."""
        if self.durability is None or not (message.seq and isinstance(message, MUTATING)):
            return False
        reply = self.durability.reply_if_applied(message)
        if reply is None:
            return False
        stored = not (isinstance(reply, wire.Error) and reply.code == "duplicate")
        log.info("duplicate_already_durable", request_id=message.request_id, seq=message.seq, stored=stored)
        self._tasks.spawn(self._answer_now(reply, records))
        return True

    def _stored_reply(self, message: wire.RequestMessage) -> wire.ResultMessage | None:
        return None if self.durability is None else self.durability.stored_reply(message)

    async def _dead_letter(
        self, partition: TopicPartition, record: ConsumerRecord[Any, Any], err: SchemaError, received_at_ms: int
    ) -> None:
        assert self.outbox is not None
        try:
            source = f"{partition.topic}/{partition.partition}/{record.offset}"
            await self.outbox.dead_letter(record, err, source, received_at_ms)
        finally:  # a failed publish (an oversize copy, a broker error) must not hold back the commits
            self._finish([[(partition, record.offset)]])

    async def _snapshot(self, adapter_id: str, seq: int) -> None:
        assert self.durability is not None and self.engine is not None
        self._finish(await self.durability.snapshot(self.engine, adapter_id, seq))

    async def _persist(self, adapter_id: str, seq: int, state: Any) -> None:
        assert self.durability is not None and self.engine is not None
        self._finish(await self.durability.persist(self.engine.runner.base.path, adapter_id, seq, state))

    # ----- 7. commit -----

    def _commit_when_durable(self, message: wire.RequestMessage, records: Records) -> None:
        if self.durability is None or not (message.seq and message.adapter_id):
            self._finish([records])
            return
        mutating = isinstance(message, MUTATING)
        self._finish(self.durability.ledger.commit_when_durable(message.adapter_id, message.seq, mutating, records))

    def _finish(self, answered: list[Records]) -> None:
        """These records are answered (and, with durability on, durable): their offsets may commit."""
        for records in answered:
            for partition, offset in records:
                self._offsets.finish(partition, offset)
        advance = self.durability is not None and self.durability.ledger.wants_advance
        if any(answered) or advance:  # else the committer would spin on nothing
            self._commit_wake.set()

    async def _committer(self) -> None:
        while True:
            await self._commit_wake.wait()
            self._commit_wake.clear()
            if self.durability is not None:
                self._finish(await self.durability.advance())
            await self._commit()

    async def _commit(self) -> None:
        if self._consumer is None:
            return
        async with self._commit_lock:
            assigned = self._consumer.assignment()
            offsets = {tp: o for tp, o in self._offsets.to_commit().items() if tp in assigned}
            if not offsets:
                return
            try:
                await self._consumer.commit(offsets)
            except KafkaError as err:  # e.g. a rebalance in progress: the next commit covers these
                log.warning("commit_failed", error=str(err))
                return
            self._offsets.committed(offsets)

    # ----- around the way: heartbeats and rebalances -----

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._heartbeat()
            await asyncio.sleep(self.config.heartbeat_interval)

    async def _heartbeat(self) -> None:
        assert self.heartbeats is not None and self.handover is not None
        owned = self.handover.owned or set()
        await self.heartbeats.beat(self.state, len(self._inflight), owned, self._consumer)

    async def _quiesce(self, revoked: set[TopicPartition]) -> None:
        """Before the group reassigns partitions: finish what was started, make it durable, commit.

        Requests held for a missing predecessor are dropped: their records are uncommitted, so whoever
        owns them next reads them again. Agents see this as latency: their requests wait, none fails.
        """
        if not self._loaded.is_set():  # nothing adopted yet: forget the assignment that is being taken back
            self._assigned_while_loading = None
            return
        async with self._handover_lock:
            await self._quiesce_loaded(revoked)

    async def _quiesce_loaded(self, revoked: set[TopicPartition]) -> None:
        assert self.handover is not None
        started = time.perf_counter()
        self._serving.clear()
        self._early.clear()
        for message, _ in self._sequencer.drop_held():
            self._inflight.pop(message.request_id, None)
            self._sizes.pop(message.request_id, None)
        if not await self.handover.quiesce(self._tasks):
            self.request_stop()
            return
        if self.durability is not None:
            self._finish(await self.durability.advance())
        await self._commit()
        for partition in revoked:
            self._offsets.forget(partition)
        if self.durability is not None:  # uncommitted: the next owner re-reads them
            self.durability.ledger.drop_records([])
        log.info("partitions_revoked", partitions=len(revoked), quiesce_s=round(time.perf_counter() - started, 4))

    async def _adopt(self, assigned: set[TopicPartition]) -> None:
        """After the group's assignment: take over the partitions (``Handover.adopt``), then serve the
        records that came meanwhile.

        The group usually forms before the model has loaded (the join overlaps torch's import). Then the
        assignment is only noted and ``_start`` adopts it once the model is loaded: waiting here instead
        would stall the consumer's heartbeats past the session timeout, the group would hand the
        partitions to another engine, and this one would still adopt them: two engines serving one adapter.
        """
        if not self._loaded.is_set():
            self._assigned_while_loading = set(assigned)
            log.info("assigned_while_loading", partitions=sorted({tp.partition for tp in assigned}))
            return
        async with self._handover_lock:
            await self._adopt_loaded(assigned)

    async def _adopt_loaded(self, assigned: set[TopicPartition]) -> None:
        assert self.handover is not None and self._consumer is not None
        if self.fenced:
            return
        started = time.perf_counter()
        total = len(self._consumer.partitions_for_topic(self.topics.rollout) or ()) or self.config.partitions
        before = self.handover.owned or set()
        self._finish(await self.handover.adopt({tp.partition for tp in assigned}, total))
        early, self._early = self._early, []
        self._serving.set()
        self.ready.set()
        for partition, record in early:
            if partition in assigned:
                self._on_record(partition, record)
        numbers = self.handover.owned or set()
        log.info(
            "partitions_assigned",
            partitions=sorted(numbers),
            of=total,
            gained=sorted(numbers - before),
            adopt_s=round(time.perf_counter() - started, 4),
        )
        if self.state == "starting":  # the first assignment: serving from now on, and everyone is told at once
            self.state = "running"
            log.info("engine_running", engine_id=self.config.engine_id, group=self.config.consumer_group)
            assert self.heartbeats is not None
            self._tasks.spawn(self.heartbeats.status(self.state))
        self._tasks.spawn(self._heartbeat())


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, service: EngineService) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.service._quiesce(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.service._adopt(set(assigned))


def quota_limits(settings: ServiceConfig) -> QuotaLimits:
    """The per-principal quotas, out of the service's settings."""
    return QuotaLimits(
        adapters_per_principal=settings.quota_adapters,
        queued_per_adapter=settings.quota_queued_per_adapter,
        queued_per_principal=settings.quota_queued,
        queued_bytes_per_principal=settings.quota_queued_bytes,
        sample_rows_per_principal=settings.quota_sample_rows,
        forward_backward_tokens=settings.quota_forward_backward_tokens,
    )


def engine_config(settings: ServiceConfig) -> EngineConfig:
    """The engine's own settings, out of the service's."""
    from hotlora.engine.core import EngineConfig
    from hotlora.engine.runner import RunnerConfig
    from hotlora.engine.scheduler import SchedulerPolicy
    from hotlora.engine.vllm_sampler import VllmSettings

    return EngineConfig(
        max_decode_rows=settings.max_decode_rows,
        max_resident_rows=settings.max_resident_rows or None,
        sampler=settings.sampler,
        vllm=VllmSettings(
            max_loras=settings.vllm_max_loras,
            max_lora_rank=settings.vllm_max_lora_rank,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            kv_cache_bytes=settings.vllm_kv_cache_bytes,
        ),
        max_kv_bytes=settings.max_kv_bytes,
        scheduler=SchedulerPolicy(train_token_budget=settings.train_slice_tokens),
        runner=RunnerConfig(
            token_budget=settings.token_budget,
            resident_slots=settings.resident_slots,
            resident_memory_fraction=settings.resident_memory_fraction,
            gradient_checkpointing=bool(settings.gradient_checkpointing),
        ),
    )


def configure_logging(level: str = "info") -> None:
    """structlog JSON lines on stdout (12-factor); request_id / adapter_id come from bound contextvars."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stdout, format="%(name)s %(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )


async def serve(config: ServiceConfig) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully; 0 on a clean stop."""
    # The first log line: everything before it is the interpreter's start and the imports.
    log.info("engine_starting", engine_id=config.engine_id, pid=os.getpid())
    service = EngineService(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    await service.run()
    return 75 if service.fenced else 0  # EX_TEMPFAIL: a supervisor restarts it


def main(config: ServiceConfig) -> int:
    configure_logging(config.log_level)
    return run(serve(config))
