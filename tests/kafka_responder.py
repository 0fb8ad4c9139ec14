"""An in-test stand-in for the engine service: consumes the request topics and answers on ``reply_to``.

Its ``handler`` decides each reply (or none), so tests can script delays, drops, duplicates and
errors deterministically. ``fake_reply`` answers every verb with plausible made-up values;
``EngineHandler`` answers through a real in-process ``Engine`` (what the Kafka service will do).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from hotlora.schemas import (
    AdapterInfo,
    CreateAdapter,
    CreateAdapterResult,
    DeleteAdapter,
    DeleteAdapterResult,
    Error,
    ForwardBackward,
    ForwardBackwardResult,
    ListAdapters,
    ListAdaptersResult,
    LoadState,
    LoadStateResult,
    Message,
    OptimStep,
    OptimStepResult,
    RequestMessage,
    ResultMessage,
    Sample,
    SampledSequence,
    SampleResult,
    SaveState,
    SaveStateResult,
    SchemaError,
    Topics,
    decode,
    encode,
    key_for,
    pack_f32,
    pack_i32,
    unpack_i32,
)

Handler = Callable[[RequestMessage], Awaitable[ResultMessage | None]]
PARTITIONS = 2


async def create_topics(bootstrap: str, names: list[str], partitions: int = PARTITIONS) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names])
    finally:
        await admin.close()


def envelope(request: RequestMessage) -> dict[str, Any]:
    return {
        "request_id": request.request_id,
        "adapter_id": request.adapter_id,
        "seq": request.seq,
        "reply_to": request.reply_to,
    }


def info(adapter_id: str, version: int = 0) -> AdapterInfo:
    return AdapterInfo(
        adapter_id=adapter_id,
        slot=0,
        resident=True,
        rank=4,
        alpha=8.0,
        targets=["q_proj"],
        version=version,
        num_parameters=10,
    )


def fake_reply(request: RequestMessage, version: int = 0) -> ResultMessage:
    """A made-up success for any verb; ``sample`` echoes the prompt reversed so callers can check theirs."""
    env = envelope(request)
    if isinstance(request, CreateAdapter | LoadState):
        cls = CreateAdapterResult if isinstance(request, CreateAdapter) else LoadStateResult
        return cls(adapter=info(request.adapter_id, version), **env)
    if isinstance(request, DeleteAdapter):
        return DeleteAdapterResult(**env)
    if isinstance(request, ListAdapters):
        return ListAdaptersResult(adapters=[info("x")], **env)
    if isinstance(request, Sample):
        tokens = unpack_i32(request.prompt_tokens).tolist()[::-1]
        sequences = [
            SampledSequence(
                tokens=pack_i32(tokens),
                logprobs=pack_f32([-0.5] * len(tokens)),
                stop_reason="length",
                adapter_version=version,
            )
            for _ in range(request.n)
        ]
        return SampleResult(sequences=sequences, adapter_version=version, **env)
    if isinstance(request, ForwardBackward):
        return ForwardBackwardResult(
            losses=[1.0] * len(request.datums),
            logprobs=[pack_f32([-1.0] * (len(d.input_tokens) // 4)) for d in request.datums],
            num_tokens=sum(len(d.input_tokens) // 4 for d in request.datums),
            **env,
        )
    if isinstance(request, OptimStep):
        return OptimStepResult(version=version, grad_norm=0.5, **env)
    if isinstance(request, SaveState):
        return SaveStateResult(path=request.path, version=version, **env)
    return Error(code="invalid_request", message=f"unexpected {type(request).__name__}", **env)


async def fake_handler(request: RequestMessage) -> ResultMessage:
    return fake_reply(request)


class EngineHandler:
    """Answers through a real in-process ``Engine``, answering a repeated ``request_id`` only once."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._answers: dict[str, asyncio.Future[ResultMessage]] = {}

    async def __call__(self, request: RequestMessage) -> ResultMessage | None:
        from hotlora.engine.kafka.convert import from_engine, to_engine

        if request.request_id in self._answers:
            return None
        answer: asyncio.Future[ResultMessage] = asyncio.get_running_loop().create_future()
        self._answers[request.request_id] = answer
        try:
            result: Any = await self.engine.submit(to_engine(request))
        except Exception as err:  # the edge answers every request; from_engine keeps typed codes
            result = err
        reply = from_engine(request, result)
        answer.set_result(reply)
        return reply


class Responder:
    """Consumes the three request topics (no group: all partitions assigned) and publishes replies."""

    def __init__(self, bootstrap: str, topics: Topics, handler: Handler = fake_handler) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.handler = handler
        self.seen: list[tuple[str, bytes | None, RequestMessage]] = []  # (topic, key, message), duplicates too
        self.arrived = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> Responder:
        await create_topics(self.bootstrap, [*self.topics.requests(), self.topics.results, self.topics.checkpoints])
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=0)
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False, fetch_max_wait_ms=5
        )
        await self._consumer.start()
        parts = [TopicPartition(t, p) for t in self.topics.requests() for p in range(PARTITIONS)]
        self._consumer.assign(parts)
        await self._consumer.seek_to_beginning(*parts)
        self._reader = asyncio.create_task(self._read())
        return self

    async def stop(self) -> None:
        tasks = [t for t in (self._reader, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    async def __aenter__(self) -> Responder:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def publish(self, message: Message, topic: str | None = None) -> None:
        assert self._producer is not None
        topic = topic or self.topics.topic_for(message)
        await self._producer.send_and_wait(topic, encode(message), key=key_for(message))

    async def wait_seen(self, count: int, timeout: float = 10.0) -> None:
        async def until() -> None:
            while len(self.seen) < count:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(until(), timeout)

    async def _read(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            for tp, records in sorted(batches.items()):
                for record in records:
                    try:
                        message = decode(record.value or b"")
                    except SchemaError:
                        continue
                    self.seen.append((tp.topic, record.key, message))
                    self.arrived.set()
                    task = asyncio.create_task(self._answer(message))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    async def _answer(self, request: RequestMessage) -> None:
        reply = await self.handler(request)
        if reply is not None:
            await self.publish(reply)
