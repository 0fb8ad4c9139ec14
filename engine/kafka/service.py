"""``EngineService``: the Kafka edge around ``Engine`` (one asyncio process, uvloop in production).

It consumes the rollout, gradient and control topics in one consumer group, turns records into typed
requests (``hotlora.schemas``), restores each adapter's ``seq`` order across the three topics
(``Sequencer``), submits them to the engine, and publishes every result to its request's ``reply_to``.
The engine's busy loop never sees a socket; this module never touches the model.

Delivery. Kafka gives at-least-once here (idempotent producers fail on Tansu), so the edge makes the
engine idempotent: a ``request_id`` seen again is answered from a bounded cache of recent results, or
ignored while its first copy is still in flight. Input offsets are committed only once every record up
to them is answered (``OffsetTracker``), so a crash re-delivers unanswered requests, never loses them.

Scale-out. Several engines join one consumer group; ``CoPartitionAssignor`` (engine.kafka.placement) gives
each one whole partition numbers of all request topics, so each adapter has exactly one engine. On a
rebalance the engine stops taking records, finishes what it started, makes it durable and commits;
then it unloads the adapters it lost and loads the ones it gained from the shared snapshot store
before it serves them (``docs/scale-out.md``).

Shutdown (SIGTERM/SIGINT): stop fetching, let submitted requests finish, checkpoint every adapter under
``checkpoint_dir`` (each with a checkpoint event), publish ``engine_status: stopped``, commit, exit 0.
Requests still held for a missing predecessor are left uncommitted for the next engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import signal
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from hotlora.engine import types as eng
from hotlora.engine.checkpoint import directory_sha256, save_checkpoint
from hotlora.engine.core import Engine, EngineConfig
from hotlora.engine.event_loop import run
from hotlora.engine.kafka.admin import ensure_topics
from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.engine.kafka.convert import from_engine, to_engine
from hotlora.engine.kafka.device_claim import CLAIM, DeviceClaim, claim_visible_gpu
from hotlora.engine.kafka.durability import MAX_REPLIES, DurableAdapter, DurableStore, SnapshotStore
from hotlora.engine.kafka.ownership import OwnershipGate
from hotlora.engine.kafka.placement import CoPartitionAssignor, partition_for
from hotlora.engine.kafka.sequencing import OffsetTracker, ResultCache, Sequencer, advance_point
from hotlora.engine.kafka.service_config import ServiceConfig
from hotlora.engine.observability import EngineMetrics
from hotlora.engine.runner import RunnerConfig
from hotlora.engine.types import OptimStepOutput
from hotlora.engine.vllm_sampler import VllmSettings
from hotlora.schemas import messages as wire
from hotlora.schemas.codec import decode, encode, is_topic_name, reject
from hotlora.schemas.errors import Forbidden, HotLoraError, InvalidRequest, SchemaError
from hotlora.schemas.topics import Topics, key_for

log = structlog.get_logger("hotlora.service")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
FETCH_TIMEOUT_MS = 200  # also how often held requests are checked for an expired gap


# Requests that change an adapter's state: applied exactly once, across restarts too (by seq).
MUTATING = (wire.CreateAdapter, wire.ForwardBackward, wire.OptimStep, wire.LoadState, wire.DeleteAdapter)
# Requests after which the engine snapshots the adapter with a save barrier. An optim_step's snapshot is
# captured in its own engine step instead (``capture_state``). forward_backward's gradients are volatile:
# the next optim_step's snapshot covers them, and until then they are re-delivered after a crash.
SNAPSHOT_AFTER = (wire.CreateAdapter, wire.LoadState)
REPLY_WAIT_S = 120.0  # a snapshot waits this long for the replies it stores (they are being published)


class _LooseSeq(msgspec.Struct):
    """Salvages ``seq`` from a rejected record, so the adapter's later requests need not wait for it."""

    adapter_id: str = ""
    seq: int = 0


_loose_seq = msgspec.msgpack.Decoder(_LooseSeq)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _transport_bytes(config: ServiceConfig) -> int:
    """Fetch and produce limits: room to read (and dead-letter) a record over ``max_message_bytes``.

    A record larger even than this is still fetched (a broker returns an oversize first record batch
    whole, KIP-74) but cannot be copied to the dead letters; it is then answered and logged only.
    """
    return max(MAX_MESSAGE_BYTES, 2 * config.max_message_bytes + (1 << 20))


def _salvage_seq(data: bytes | None) -> int:
    try:
        return max(_loose_seq.decode(data or b"").seq, 0)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return 0


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, service: EngineService) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.service._quiesce(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.service._adopt(set(assigned))


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
        self.state = "starting"
        # Prometheus metrics (engine.observability): an injected engine's own, else one when --metrics-port is set.
        self.metrics: EngineMetrics | None = engine.metrics if engine is not None else None
        if self.metrics is None and config.metrics_port is not None:
            self.metrics = EngineMetrics()
        self.metrics_port: int | None = None  # the bound port, once serving
        self.ready = asyncio.Event()  # set once consuming; tests and the CLI may wait on it
        self._stop = asyncio.Event()
        self._sequencer: Sequencer[tuple[wire.RequestMessage, int]] = Sequencer(config.seq_gap_timeout)
        self._offsets: OffsetTracker[TopicPartition] = OffsetTracker()
        self._results: ResultCache[str, wire.ResultMessage] = ResultCache(config.result_cache_size)
        self._inflight: dict[str, list[tuple[TopicPartition, int]]] = {}  # request_id -> records it answers
        # Durability (engine.kafka.durability): a mutating request's offset is committed only once a current
        # snapshot covers its seq; until then its records wait in ``_undurable``.
        # Every sequenced request of an adapter with durable state waits the same way (a sample too, so a
        # new owner's sequence never starts past a committed record); ``advance_point`` moves the mark
        # over requests that changed nothing.
        self.durable: SnapshotStore | None = DurableStore(self.checkpoint_dir / ".durable") if config.durable else None
        self._durable_seq: dict[str, int] = {}  # adapter -> last seq its current snapshot covers
        self._replies: dict[str, dict[str, tuple[int, bytes]]] = {}  # adapter -> request_id -> (seq, reply)
        self._published: dict[tuple[str, int], asyncio.Future[None]] = {}  # (adapter, seq) -> reply sent
        self._open: dict[str, set[int]] = {}  # adapter -> seqs released to the engine, not answered yet
        # adapter -> answered requests above its durable seq: (seq, mutating, records to commit then)
        self._undurable: dict[str, list[tuple[int, bool, list[tuple[TopicPartition, int]]]]] = {}
        self._advance_wanted: set[str] = set()
        # Placement (engine.kafka.placement): the partition numbers this engine owns, None before the first
        # assignment. Records that arrive while an assignment's adapters load wait in ``_early``.
        self.assignor = CoPartitionAssignor()
        self.owned: set[int] | None = None
        self._adopted = asyncio.Event()
        self._early: list[tuple[TopicPartition, ConsumerRecord[Any, Any]]] = []
        self.device_claim: DeviceClaim | None = None  # --device cuda:claim: held until the process exits
        self.fenced = False  # stopped mid-rebalance (``_fence``): exit without serving or checkpointing
        self._snapshot_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: list[asyncio.Task[Any]] = []
        self._commit_wake = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._broker: EmbeddedBroker | None = None
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None

    # ----- lifecycle -----

    def request_stop(self) -> None:
        log.info("stop_requested")
        self._stop.set()

    @property
    def held_requests(self) -> int:
        return self._sequencer.held

    async def run(self) -> None:
        try:
            await self._start()
            await self._consume_until_stopped()
            await self._drain()
        finally:
            await self._close()

    async def _start(self) -> None:
        if self.bootstrap is None:
            self._broker = await asyncio.to_thread(EmbeddedBroker().start)
            self.bootstrap = self._broker.bootstrap
            log.info("embedded_broker_started", bootstrap=self.bootstrap)
        if self.engine is None:
            self.engine = await asyncio.to_thread(self._load_engine)
        await self.engine.start()
        if self.metrics is not None and self.config.metrics_port is not None:
            self.metrics_port = self.metrics.start_http_server(self.config.metrics_port)
            log.info("metrics_serving", port=self.metrics_port)
        if not self.durable:
            log.warning("durability_off", consequence="an adapter that moves to another engine starts empty there")
        created = await ensure_topics(
            self.bootstrap,
            self.topics,
            self.config.partitions,
            self.config.replication_factor,
            security=self._security,
        )
        log.info("topics_ready", created=created, prefix=self.topics.prefix, partitions=self.config.partitions)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            **self._security,
            acks="all",
            enable_idempotence=False,
            max_request_size=_transport_bytes(self.config),
        )
        await self._producer.start()
        await self._publish_status()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            **self._security,
            group_id=self.config.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=self.config.session_timeout_ms,
            heartbeat_interval_ms=self.config.heartbeat_interval_ms,
            rebalance_timeout_ms=self.config.rebalance_timeout_ms,
            max_partition_fetch_bytes=_transport_bytes(self.config),
            fetch_max_bytes=_transport_bytes(self.config),
            # Tansu answers an empty fetch only after the full wait, not when a record arrives: with
            # aiokafka's 500 ms default every request would sit up to half a second before the engine
            # saw it. 10 ms costs a few percent of a core while idle.
            fetch_max_wait_ms=self.config.fetch_max_wait_ms,
            partition_assignment_strategy=(self.assignor,),
        )
        self._consumer.subscribe(list(self.topics.requests()), listener=_Rebalance(self))
        await self._consumer.start()
        self._background = [
            asyncio.create_task(self._heartbeats(), name="hotlora-heartbeats"),
            asyncio.create_task(self._committer(), name="hotlora-committer"),
        ]

    def _load_engine(self) -> Engine:
        if self.config.device == CLAIM:  # before CUDA starts: it narrows CUDA_VISIBLE_DEVICES to the claimed GPU
            self.device_claim = claim_visible_gpu(Path(self.config.device_lock_dir))
            log.info("gpu_claimed", gpu=self.device_claim.gpu_id, lock=str(self.device_claim.path))
        if not self.model:  # ``hotlora engine`` fills in its default (the cached tiny model) before this
            raise ValueError("ServiceConfig.model names no base model directory")
        settings = self.config
        config = EngineConfig(
            max_decode_rows=settings.max_decode_rows,
            sampler=settings.sampler,
            vllm=VllmSettings(
                max_loras=settings.vllm_max_loras,
                max_lora_rank=settings.vllm_max_lora_rank,
                gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
                kv_cache_bytes=settings.vllm_kv_cache_bytes,
            ),
            max_kv_bytes=settings.max_kv_bytes,
            runner=RunnerConfig(
                token_budget=settings.token_budget,
                resident_slots=settings.resident_slots,
                resident_memory_fraction=settings.resident_memory_fraction,
                gradient_checkpointing=bool(settings.gradient_checkpointing),
            ),
        )
        log.info(
            "loading_model", model=self.model, dtype=settings.dtype, device=settings.device, sampler=settings.sampler
        )
        return Engine.from_pretrained(
            self.model,
            dtype=self.config.dtype,
            device="cuda" if self.config.device == CLAIM else self.config.device,
            config=config,
            metrics=self.metrics,
        )

    async def _consume_until_stopped(self) -> None:
        assert self._consumer is not None
        self.state = "running"
        await self._publish_status()
        log.info("engine_running", engine_id=self.config.engine_id, group=self.config.consumer_group)
        while not self._stop.is_set():
            batch = await self._consumer.getmany(timeout_ms=FETCH_TIMEOUT_MS)
            for partition, records in batch.items():
                for record in records:
                    self._on_record(partition, record)
            self._release(self._sequencer.expire(time.monotonic()))

    async def _drain(self) -> None:
        assert self.engine is not None
        if self.fenced:
            return
        self.state = "draining"
        await self._publish_status()
        if self._tasks:
            log.info("draining", in_flight=len(self._tasks), held=self._sequencer.held)
            _, late = await asyncio.wait(set(self._tasks), timeout=self.config.drain_timeout)
            if late:
                log.warning("drain_timeout", unfinished=len(late))
        await self._checkpoint_all()
        self.state = "stopped"
        await self._publish_status()
        await self._commit()
        log.info("engine_stopped")

    async def _close(self) -> None:
        for task in [*self._background, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._background, *self._tasks, return_exceptions=True)
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

    # ----- records in -----

    def _on_record(self, partition: TopicPartition, record: ConsumerRecord[Any, Any]) -> None:
        if not self._adopted.is_set():  # the assignment's adapters are still loading
            self._early.append((partition, record))
            return
        self._offsets.start(partition, record.offset)
        received = wire.now_ms()
        try:
            value = record.value or b""
            if len(value) > self.config.max_message_bytes:
                raise reject(
                    f"record of {len(value)} bytes exceeds max_message_bytes={self.config.max_message_bytes}", value
                )
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
        except SchemaError as err:
            self._spawn(self._reject(partition, record, err, received))
            self._release(self._sequencer.skip(err.adapter_id, _salvage_seq(record.value), time.monotonic()))
            return
        rid = message.request_id
        cached = self._results.get(rid) or self._stored_reply(message)
        if cached is not None:
            log.info("duplicate_republished", request_id=rid, adapter_id=message.adapter_id)
            self._spawn(self._answer_again(message, cached, [(partition, record.offset)]))
            return
        if rid in self._inflight:
            log.info("duplicate_ignored", request_id=rid, adapter_id=message.adapter_id)
            self._inflight[rid].append((partition, record.offset))
            return
        if self._refuse_foreign(message, partition, record.offset, received):
            return
        if self._already_durable(message, [(partition, record.offset)]):
            return
        self._inflight[rid] = [(partition, record.offset)]
        starts = isinstance(message, wire.CreateAdapter | wire.LoadState)
        ready = self._sequencer.offer(message.adapter_id, message.seq, (message, received), time.monotonic(), starts)
        if not ready:
            log.debug("request_held", request_id=rid, adapter_id=message.adapter_id, seq=message.seq)
        self._release(ready)

    def _refuse_foreign(
        self, message: wire.RequestMessage, partition: TopicPartition, offset: int, received: int
    ) -> bool:
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
            self._spawn(self._publish_result(reply, [(partition, offset)]))
            return True
        return False

    def _release(self, ready: list[tuple[wire.RequestMessage, int]]) -> None:
        # Tasks start in creation order and Engine.submit enqueues before its first await, so the
        # engine's scheduler sees these requests in exactly this (seq) order.
        for message, received in ready:
            if self.durable is not None and message.seq and message.adapter_id:
                self._open.setdefault(message.adapter_id, set()).add(message.seq)
            if self.durable is not None and message.seq and isinstance(message, MUTATING):
                key = (message.adapter_id, message.seq)  # a snapshot after it waits for its reply
                self._published.setdefault(key, asyncio.get_running_loop().create_future())
            self._spawn(self._execute(message, received))
            if self.durable is not None and message.seq and isinstance(message, SNAPSHOT_AFTER):
                # Spawned right behind the request, so the engine runs the snapshot right after it and
                # before any later request of the adapter: the snapshot holds exactly the seqs up to it.
                self._spawn(self._snapshot(message.adapter_id, message.seq))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task_failed", error=repr(task.exception()))

    # ----- execution -----

    async def _execute(self, message: wire.RequestMessage, received_at_ms: int) -> None:
        assert self.engine is not None
        with structlog.contextvars.bound_contextvars(request_id=message.request_id, adapter_id=message.adapter_id):
            try:
                self.owners.admit(message)  # before the first await: in seq order; Forbidden changes nothing
                request = to_engine(self._resolve_paths(message))
                if isinstance(request, eng.OptimStep) and self.durable is not None and message.seq:
                    request.capture_state = True  # the durable snapshot, taken in the optim_step's own engine step
                result: Any = await self.engine.submit(request)
            except HotLoraError as err:
                result = err
            except Exception as err:  # a tenant's request must never take the edge down
                log.exception("request_crashed")
                result = err
            if self.fenced:  # the engine stopped mid-rebalance: the new owner answers this request, not us
                log.info("request_abandoned", type=wire.tag_of(type(message)), seq=message.seq)
                return
            result = self.owners.settle(message, result)
            if isinstance(result, OptimStepOutput) and result.state is not None:
                self._spawn(self._persist(message.adapter_id, message.seq, result.state))
                result.state = None
            if isinstance(message, wire.ListAdapters) and isinstance(result, list):
                result = [dataclasses.replace(info, seq=self._sequencer.last(info.adapter_id)) for info in result]
            reply = from_engine(message, result, received_at_ms=received_at_ms)
            if self.metrics is not None:
                self.metrics.observe_request(message, reply)
            if isinstance(message, wire.SaveState) and isinstance(reply, wire.SaveStateResult):
                await self._publish_checkpoint(
                    message.adapter_id, reply.path, reply.version, message.include_optimizer, message.request_id
                )
            self._results.put(message.request_id, reply)
            answered = self._inflight.pop(message.request_id, [])
            if self.durable is not None and message.seq and message.adapter_id:
                await self._publish_sequenced(message, reply, answered)
            else:
                await self._publish_result(reply, answered)
            outcome = {"code": reply.code, "error": reply.message} if isinstance(reply, wire.Error) else {}
            log.info("request_done", type=wire.tag_of(type(message)), seq=message.seq, **outcome)
            if isinstance(reply, wire.CreateAdapterResult | wire.DeleteAdapterResult | wire.LoadStateResult):
                await self._publish_status()

    # ----- rebalance (engine.kafka.placement) -----

    async def _quiesce(self, revoked: set[TopicPartition]) -> None:
        """Before the group reassigns partitions: finish what was started, make it durable, commit.

        Kafka's eager rebalance takes every partition from every member, and the consumer hands out no
        records until the new assignment, so nothing new starts meanwhile. Requests held for a missing
        predecessor are dropped: their records are uncommitted, so whoever owns them next reads them
        again. Agents see this as latency: their requests wait in the topic, none fails.
        """
        started = time.perf_counter()
        self._adopted.clear()
        self._early.clear()
        for message, _ in self._sequencer.drop_held():
            self._inflight.pop(message.request_id, None)
        # The group waits rebalance_timeout_ms for this engine; past it the adapters go to others anyway.
        budget = self.config.rebalance_timeout_ms / 1000
        deadline = time.monotonic() + budget - max(1.0, 0.2 * budget)
        while self._tasks and (left := deadline - time.monotonic()) > 0:  # replies, snapshots, their follow-ups
            await asyncio.wait(set(self._tasks), timeout=left)
        if self._tasks:
            await self._fence(len(self._tasks))
            return
        await self._advance_all()
        await self._commit()
        for partition in revoked:
            self._offsets.forget(partition)
        for adapter_id, waiting in self._undurable.items():  # uncommitted: the next owner re-reads them
            self._undurable[adapter_id] = [(s, mutating, []) for s, mutating, _ in waiting]
        log.info("partitions_revoked", partitions=len(revoked), quiesce_s=round(time.perf_counter() - started, 4))

    async def _fence(self, unfinished: int) -> None:
        """Crash-only exit when the work cannot be released in time: stop the engine before the group
        hands its adapters to another one, so none is ever served twice. Whatever was not durable is
        re-read from Kafka by the new owner, exactly as after a SIGKILL (docs/reliability.md)."""
        assert self.engine is not None
        log.error("rebalance_overrun", unfinished=unfinished, rebalance_timeout_ms=self.config.rebalance_timeout_ms)
        self.fenced = True
        await self.engine.close()
        self.request_stop()

    async def _adopt(self, assigned: set[TopicPartition]) -> None:
        """After the group's assignment: unload the adapters this engine lost, load the ones it gained
        from the shared snapshot store, then serve (records that came meanwhile waited in ``_early``)."""
        assert self.engine is not None and self._consumer is not None
        if self.fenced:
            return
        started = time.perf_counter()
        total = len(self._consumer.partitions_for_topic(self.topics.rollout) or ()) or self.config.partitions
        numbers = {tp.partition for tp in assigned}
        gained = numbers - (self.owned or set())
        for info in await self.engine.submit(eng.ListAdapters()):
            if partition_for(info.adapter_id, total) not in numbers:
                await self._release_adapter(info.adapter_id)
        if gained:
            self.owners.registry.reload(lambda adapter_id: partition_for(adapter_id, total) in gained)
        if self.durable is not None and gained:
            for saved in await asyncio.to_thread(self.durable.load_all):
                if partition_for(saved.adapter_id, total) in gained:
                    await self._acquire(saved)
        self.owned = numbers
        early, self._early = self._early, []
        self._adopted.set()
        self.ready.set()
        for partition, record in early:
            if partition in assigned:
                self._on_record(partition, record)
        log.info(
            "partitions_assigned",
            partitions=sorted(numbers),
            of=total,
            gained=sorted(gained),
            adopt_s=round(time.perf_counter() - started, 4),
        )
        self._spawn(self._send_heartbeat())

    # ----- durability (engine.kafka.durability) -----

    async def _acquire(self, saved: DurableAdapter) -> None:
        """Load an adapter this engine now owns from its current snapshot; its sequence resumes after it."""
        assert self.engine is not None
        started = time.perf_counter()
        try:
            await self.engine.submit(eng.LoadState(saved.adapter_id, saved.path))
        except HotLoraError as err:
            log.error("restore_failed", adapter_id=saved.adapter_id, path=str(saved.path), error=str(err))
            return
        self._durable_seq[saved.adapter_id] = saved.seq
        self._replies[saved.adapter_id] = dict(saved.replies)
        self._sequencer.forget(saved.adapter_id)
        self._sequencer.resume(saved.adapter_id, saved.seq + 1)
        seconds = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.adopt(saved.adapter_id, saved.version)
        log.info("adapter_acquired", adapter_id=saved.adapter_id, seq=saved.seq, version=saved.version, load_s=seconds)

    async def _release_adapter(self, adapter_id: str) -> None:
        """Unload an adapter another engine now owns. Its state is durable already (``_quiesce``)."""
        assert self.engine is not None
        try:
            await self.engine.submit(eng.DeleteAdapter(adapter_id))
        except HotLoraError as err:
            log.error("release_failed", adapter_id=adapter_id, error=str(err))
        self._forget_adapter(adapter_id)
        self._sequencer.forget(adapter_id)
        if self.metrics is not None:
            self.metrics.forget(adapter_id)
        if self.durable is None:
            log.warning("adapter_released_without_state", adapter_id=adapter_id)
        log.info("adapter_released", adapter_id=adapter_id)

    def _already_durable(self, message: wire.RequestMessage, records: list[tuple[TopicPartition, int]]) -> bool:
        """A mutating request a current snapshot already covers (re-delivered after a restart): answer
        it from the stored reply, never apply it again."""
        if not (message.seq and isinstance(message, MUTATING)):
            return False
        if message.seq > self._durable_seq.get(message.adapter_id, 0):
            return False
        stored = self._stored_reply(message)
        if stored is not None:
            reply = stored
        else:
            reply = wire.Error(
                request_id=message.request_id,
                adapter_id=message.adapter_id,
                seq=message.seq,
                reply_to=message.reply_to,
                code="duplicate",
                message=f"seq {message.seq} of adapter {message.adapter_id!r} was already applied; its reply is "
                "no longer kept",
            )
        log.info("duplicate_already_durable", request_id=message.request_id, seq=message.seq, stored=bool(stored))
        self._spawn(self._publish_result(reply, records))  # type: ignore[arg-type]
        return True

    async def _publish_sequenced(
        self, message: wire.RequestMessage, reply: wire.ResultMessage, answered: list[tuple[TopicPartition, int]]
    ) -> None:
        """Publish now; commit the offsets once the adapter's durable seq covers the request (a delete:
        once it is forgotten). A mutating request's reply is kept to answer a re-delivery."""
        adapter_id, seq = message.adapter_id, message.seq
        await self._send_reply(reply)
        self._open.get(adapter_id, set()).discard(seq)
        if isinstance(message, MUTATING):
            replies = self._replies.setdefault(adapter_id, {})
            replies[message.request_id] = (seq, encode(reply))
            if len(replies) > 2 * MAX_REPLIES:  # bounded: only the newest can still be re-delivered
                kept = sorted(replies.items(), key=lambda item: item[1][0])[-MAX_REPLIES:]
                self._replies[adapter_id] = dict(kept)
            published = self._published.setdefault((adapter_id, seq), asyncio.get_running_loop().create_future())
            if not published.done():
                published.set_result(None)
        if isinstance(message, wire.DeleteAdapter) and isinstance(reply, wire.DeleteAdapterResult):
            assert self.durable is not None
            async with self._snapshot_lock(adapter_id):  # after the snapshots of earlier steps, never before
                await asyncio.to_thread(self.durable.remove, adapter_id)
            self._forget_adapter(adapter_id)
            self._finish(answered)
        else:
            self._finish_when_durable(message, answered)

    async def _answer_again(
        self, message: wire.RequestMessage, reply: wire.ResultMessage, records: list[tuple[TopicPartition, int]]
    ) -> None:
        """A re-delivered request already answered (a retry, or records re-read after a rebalance)."""
        await self._send_reply(reply)
        if self.durable is not None and message.seq and message.adapter_id:
            self._finish_when_durable(message, records)
        else:
            self._finish(records)

    def _finish_when_durable(self, message: wire.RequestMessage, records: list[tuple[TopicPartition, int]]) -> None:
        adapter_id, seq = message.adapter_id, message.seq
        mutating = isinstance(message, MUTATING)
        if seq <= self._durable_seq.get(adapter_id, 0) or not (mutating or self._tracked(adapter_id)):
            self._finish(records)  # covered, or an adapter without durable state (unknown, its create failed)
            return
        self._undurable.setdefault(adapter_id, []).append((seq, mutating, records))
        if not mutating:
            self._advance_wanted.add(adapter_id)
            self._commit_wake.set()

    def _tracked(self, adapter_id: str) -> bool:
        """The adapter has durable state, or a state-changing request on its way to a snapshot."""
        return adapter_id in self._durable_seq or any(key[0] == adapter_id for key in self._published)

    def _stored_reply(self, message: wire.RequestMessage) -> wire.ResultMessage | None:
        """The kept reply of a mutating request re-read after the result cache dropped it."""
        stored = self._replies.get(message.adapter_id, {}).get(message.request_id)
        return None if stored is None else decode(stored[1])  # type: ignore[return-value]

    def _forget_adapter(self, adapter_id: str) -> None:
        self._durable_seq.pop(adapter_id, None)
        self._replies.pop(adapter_id, None)
        self._open.pop(adapter_id, None)
        for key in [k for k in self._published if k[0] == adapter_id]:
            del self._published[key]
        for _, _, answered in self._undurable.pop(adapter_id, []):
            self._finish(answered)

    async def _advance_all(self) -> None:
        """Move durable marks over answered requests that changed nothing (``advance_point``)."""
        assert self.durable is not None or not self._advance_wanted
        while self._advance_wanted:
            adapter_id = self._advance_wanted.pop()
            waiting = [(s, mutating) for s, mutating, _ in self._undurable.get(adapter_id, [])]
            point = advance_point(self._durable_seq.get(adapter_id), self._open.get(adapter_id, ()), waiting)
            if point is None or self.durable is None:
                continue
            async with self._snapshot_lock(adapter_id):
                if point <= self._durable_seq.get(adapter_id, 0):
                    continue
                try:
                    moved = await asyncio.to_thread(self.durable.advance, adapter_id, point)
                except OSError as err:
                    log.error("advance_failed", adapter_id=adapter_id, seq=point, error=str(err))
                    continue
            if moved and adapter_id in self._durable_seq:
                self._durable_seq[adapter_id] = max(point, self._durable_seq[adapter_id])
                self._settle(adapter_id, point)

    async def _persist(self, adapter_id: str, seq: int, state: Any) -> None:
        """Write an optim_step's captured state as the adapter's snapshot at ``seq`` (file I/O in a thread)."""
        assert self.engine is not None and self.durable is not None
        started = time.perf_counter()
        path = self.durable.snapshot_path(adapter_id, seq)
        base = self.engine.runner.base.path
        async with self._snapshot_lock(adapter_id):
            if seq <= self._durable_seq.get(adapter_id, 0):
                return
            try:
                await asyncio.to_thread(save_checkpoint, path, adapter_id, state, base)
            except OSError as err:
                log.error("snapshot_failed", adapter_id=adapter_id, seq=seq, error=str(err))
                return
            await self._commit_snapshot(adapter_id, seq, state.version, path, started)

    def _snapshot_lock(self, adapter_id: str) -> asyncio.Lock:
        """One snapshot of an adapter at a time, in seq order: a later one never loses to an earlier one."""
        return self._snapshot_locks.setdefault(adapter_id, asyncio.Lock())

    async def _snapshot(self, adapter_id: str, seq: int) -> None:
        """Write the adapter's state as of ``seq`` through a save barrier (after create and load)."""
        assert self.engine is not None and self.durable is not None
        started = time.perf_counter()
        path = self.durable.snapshot_path(adapter_id, seq)
        async with self._snapshot_lock(adapter_id):
            try:
                saved = await self.engine.submit(eng.SaveState(adapter_id, path, include_optimizer=True))
            except HotLoraError as err:  # e.g. the create failed: no state to keep; the seq is used up anyway
                log.info("snapshot_skipped", adapter_id=adapter_id, seq=seq, error=str(err))
                self._settle(adapter_id, seq)
                return
            await self._commit_snapshot(adapter_id, seq, saved.version, Path(saved.path), started)

    async def _commit_snapshot(self, adapter_id: str, seq: int, version: int, path: Path, started: float) -> None:
        """Wait for the replies the snapshot stores, make it current, and let its offsets commit."""
        assert self.durable is not None
        pending = [f for (a, s), f in self._published.items() if a == adapter_id and s <= seq]
        if pending:
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.gather(*pending)), REPLY_WAIT_S)
            except TimeoutError:  # a reply that never went out: keep the state; that request answers `duplicate`
                log.error("snapshot_reply_wait_timeout", adapter_id=adapter_id, seq=seq)
        replies = self._replies.get(adapter_id, {})
        try:
            await asyncio.to_thread(self.durable.commit, adapter_id, seq, version, path, replies)
        except OSError as err:  # a delete of the adapter raced this snapshot and removed its directory
            log.warning("snapshot_abandoned", adapter_id=adapter_id, seq=seq, error=str(err))
            self._settle(adapter_id, seq)
            return
        seconds = time.perf_counter() - started
        self._durable_seq[adapter_id] = max(seq, self._durable_seq.get(adapter_id, 0))
        self._settle(adapter_id, seq)
        log.info("snapshot_written", adapter_id=adapter_id, seq=seq, version=version, seconds=seconds)

    def _settle(self, adapter_id: str, seq: int) -> None:
        """Everything of the adapter up to ``seq`` is durable (or had no effect): its offsets may commit."""
        for key in [k for k in self._published if k[0] == adapter_id and k[1] <= seq]:
            del self._published[key]
        waiting = self._undurable.get(adapter_id, [])
        done = [answered for s, _, answered in waiting if s <= seq]
        left = [entry for entry in waiting if entry[0] > seq]
        if not self._tracked(adapter_id):  # no durable state left to protect (e.g. its create failed)
            done += [answered for _, _, answered in left]
            left = []
        self._undurable[adapter_id] = left
        if any(not mutating for _, mutating, _ in left):
            self._advance_wanted.add(adapter_id)
        for answered in done:
            self._finish(answered)
        self._commit_wake.set()

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

    async def _checkpoint_all(self) -> None:
        assert self.engine is not None
        for info in await self.engine.submit(eng.ListAdapters()):
            path = self.checkpoint_dir / _UNSAFE.sub("_", info.adapter_id) / f"step-{info.version}"
            request = eng.SaveState(info.adapter_id, path, include_optimizer=True)
            try:
                saved = await self.engine.submit(request)
            except HotLoraError as err:
                log.error("shutdown_checkpoint_failed", adapter_id=info.adapter_id, error=str(err))
                continue
            await self._publish_checkpoint(info.adapter_id, saved.path, saved.version, True, request.request_id)

    # ----- records out -----

    async def _send(self, topic: str, message: wire.Message) -> None:
        assert self._producer is not None
        await self._producer.send_and_wait(topic, encode(message), key=key_for(message))

    async def _publish_result(self, reply: wire.ResultMessage, answered: list[tuple[TopicPartition, int]]) -> None:
        """Publish, then let the offsets commit. A reply that cannot be sent is logged and its records still
        finish: the agent's retry (same ``request_id``) is answered from the result cache, and one lost
        reply must not stop every later commit on the partition."""
        await self._send_reply(reply)
        self._finish(answered)

    async def _send_reply(self, reply: wire.ResultMessage) -> None:
        """Send to the request's ``reply_to``; a failure is logged, never raised (the retry is answered)."""
        try:
            await self._send(self.topics.topic_for(reply), reply)
        except KafkaError as err:
            log.error("reply_lost", request_id=reply.request_id, error=repr(err))

    def _finish(self, answered: list[tuple[TopicPartition, int]]) -> None:
        for partition, offset in answered:
            self._offsets.finish(partition, offset)
        self._commit_wake.set()

    async def _reject(
        self, partition: TopicPartition, record: ConsumerRecord[Any, Any], err: SchemaError, received_at_ms: int
    ) -> None:
        assert self._producer is not None
        log.warning("bad_message", request_id=err.request_id[:200], adapter_id=err.adapter_id[:200], error=err.message)
        headers = [
            ("hotlora-error", err.message[:1000].encode()),
            ("hotlora-source", f"{partition.topic}/{partition.partition}/{record.offset}".encode()),
        ]
        try:
            await self._reject_publish(record, err, headers, received_at_ms)
        finally:  # a failed publish (an oversize copy, a broker error) must not hold back the commits
            self._finish([(partition, record.offset)])

    async def _reject_publish(
        self, record: ConsumerRecord[Any, Any], err: SchemaError, headers: list[tuple[str, bytes]], received_at_ms: int
    ) -> None:
        assert self._producer is not None
        value = record.value or b""
        try:
            try:
                await self._producer.send_and_wait(self.topics.dead_letters, value, key=record.key, headers=headers)
            except MessageSizeTooLargeError:  # larger than even the transport limit: keep its head
                head = value[: self.config.max_message_bytes]
                headers = [*headers, ("hotlora-truncated-from", str(len(value)).encode())]
                await self._producer.send_and_wait(self.topics.dead_letters, head, key=record.key, headers=headers)
        except KafkaError as failure:
            log.error("dead_letter_failed", bytes=len(value), error=repr(failure))
        if err.request_id:
            reply = wire.Error(
                request_id=err.request_id,
                adapter_id=err.adapter_id,
                seq=_salvage_seq(record.value),
                reply_to=err.reply_to if is_topic_name(err.reply_to) else "",  # else: the shared results topic
                received_at_ms=received_at_ms,
                finished_at_ms=wire.now_ms(),
                code=err.code,
                message=err.message,
            )
            try:
                await self._send(self.topics.topic_for(reply), reply)
            except KafkaError as failure:
                log.error("bad_message_reply_failed", reply_to=err.reply_to, error=repr(failure))

    async def _publish_checkpoint(
        self, adapter_id: str, path: str | Path, step: int, include_optimizer: bool, request_id: str
    ) -> None:
        try:
            digest = await asyncio.to_thread(directory_sha256, path)
        except OSError as err:
            log.error("checkpoint_digest_failed", path=str(path), error=str(err))
            return
        event = wire.CheckpointEvent(
            request_id=request_id,
            adapter_id=adapter_id,
            path=str(path),
            step=step,
            sha256=digest,
            include_optimizer=include_optimizer,
        )
        await self._send(self.topics.checkpoints, event)
        log.info("checkpoint_written", adapter_id=adapter_id, path=str(path), step=step, sha256=digest)

    async def _publish_status(self) -> None:
        assert self.engine is not None
        infos = await self.engine.submit(eng.ListAdapters())
        status = wire.EngineStatus(
            engine_id=self.config.engine_id,
            model=self.model,
            state=self.state,
            max_adapters=self.engine.runner.config.max_adapters,
            max_decode_rows=self.engine.config.max_decode_rows,
            sampler=self.engine.sampler_name,
            adapters=from_engine(wire.ListAdapters(), infos).adapters,  # type: ignore[union-attr]
        )
        await self._send(self.topics.metrics, status)

    async def _heartbeats(self) -> None:
        while True:
            await self._send_heartbeat()
            await asyncio.sleep(self.config.heartbeat_interval)

    async def _send_heartbeat(self) -> None:
        """Liveness, capacity (resident slots), load, and what this engine owns (``hotlora status``)."""
        assert self.engine is not None
        table = self.engine.runner.adapters
        adapters = sorted(adapter.adapter_id for adapter in table.list())
        load: dict[str, wire.AdapterLoad] = {}
        if self.metrics is not None:
            load = self.metrics.adapter_load(self.engine.scheduler, adapters)
            await self._observe_consumer_lag()
        heartbeat = wire.Heartbeat(
            engine_id=self.config.engine_id,
            steps=self.engine.steps_run,
            queued_requests=len(self._inflight),
            running_rows=self.engine.scheduler.running_rows,
            resident_slots=table.resident_slots,
            resident_adapters=len(table.resident_ids()),
            max_decode_rows=self.engine.config.max_decode_rows,
            state=self.state,
            adapters=adapters,
            partitions=sorted(self.owned or ()),
            load=load,
        )
        try:
            await self._send(self.topics.metrics, heartbeat)
        except KafkaError as err:
            log.warning("heartbeat_failed", error=str(err))

    async def _observe_consumer_lag(self) -> None:
        """Records behind each request topic's high watermark (as of the consumer's last fetch)."""
        assert self.metrics is not None
        if self._consumer is None:
            return
        lag = dict.fromkeys(self.topics.requests(), 0)
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is None:
                continue
            try:
                position = await self._consumer.position(tp)
            except KafkaError:  # revoked by a rebalance in between: the next heartbeat counts it
                continue
            lag[tp.topic] = lag.get(tp.topic, 0) + max(high - position, 0)
        for topic, records in lag.items():
            self.metrics.set_consumer_lag(topic, records)

    # ----- offsets -----

    async def _committer(self) -> None:
        while True:
            await self._commit_wake.wait()
            self._commit_wake.clear()
            await self._advance_all()
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
    service = EngineService(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    await service.run()
    return 75 if service.fenced else 0  # EX_TEMPFAIL: a supervisor restarts it


def main(config: ServiceConfig) -> int:
    configure_logging(config.log_level)
    return run(serve(config))
