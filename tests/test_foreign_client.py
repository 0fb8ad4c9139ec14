"""``docs/protocol.md`` section 9 done as a client in another language would: plain MessagePack maps
(``msgspec.msgpack`` on dicts, none of hotlora's types or helpers), ``struct`` for the packed arrays,
raw aiokafka, against a real engine service on the embedded broker.

It checks what such a client relies on and cannot read from hotlora's code: integers accepted in float
fields and whole floats refused in int fields (section 1a), a request produced before any engine ran
is served once one joins (5c), compressed requests are read (5b), the heartbeat and ``engine_status``
carry the model's name, vocabulary size, context length and EOS ids (3), losses are weighted sums
(3), checkpoint paths come back absolute under ``engine_status.checkpoint_dir`` (4), and
``AdapterInfo.seq`` is the last ``seq`` accepted (3).
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from hotlora.engine.kafka.admin import ensure_topics
from hotlora.engine.kafka.service import EngineService
from hotlora.schemas import Topics
from tests.helpers import WAIT_S, service_config_for_tests, start_engine_service

pytestmark = pytest.mark.timeout(240)
MODEL_NAME = "example-org/tiny-llama"


def i32(values: list[int]) -> bytes:
    return struct.pack(f"<{len(values)}i", *values)


def f32(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def unpack_f32(data: bytes) -> list[float]:
    return list(struct.unpack(f"<{len(data) // 4}f", data))


def unpack_i32(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 4}i", data))


class ForeignClient:
    """Section 9's steps 3-7 over raw aiokafka: a reply topic of its own, a producer, replies by id."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.reply_topic = f"{prefix}.replies.foreign-{uuid.uuid4().hex[:8]}"
        self.replies: dict[str, dict[str, Any]] = {}
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None

    async def open(self) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(self.reply_topic, num_partitions=1, replication_factor=1)])
        finally:
            await admin.close()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False, fetch_max_wait_ms=20
        )
        self.consumer = consumer
        await consumer.start()
        partition = TopicPartition(self.reply_topic, 0)
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)  # a new topic: nothing old to skip
        await consumer.position(partition)  # a position before the first request (section 5a)
        # zstd: the engine must read compressed batches (section 5b); hotlora's own client sends none.
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", compression_type="zstd")
        await self.producer.start()

    async def close(self) -> None:
        """Stops whatever ``open`` started, even when it failed half-way."""
        if self.producer is not None:
            await self.producer.stop()
        if self.consumer is not None:
            await self.consumer.stop()

    async def send(
        self, topic: str, type_: str, adapter_id: str, seq: int, producer: AIOKafkaProducer | None = None, **fields: Any
    ) -> str:
        request_id = uuid.uuid4().hex
        message = {
            "type": type_,
            "v": 1,
            "request_id": request_id,
            "adapter_id": adapter_id,
            "seq": seq,
            "reply_to": self.reply_topic,
            "sent_at_ms": time.time_ns() // 1_000_000,
            **fields,
        }
        key = adapter_id.encode() if adapter_id else None
        producer = producer or self.producer
        assert producer is not None
        await producer.send_and_wait(f"{self.prefix}.{topic}", msgspec.msgpack.encode(message), key=key)
        return request_id

    async def reply(self, request_id: str) -> dict[str, Any]:
        assert self.consumer is not None
        async with asyncio.timeout(WAIT_S):
            while request_id not in self.replies:
                for records in (await self.consumer.getmany(timeout_ms=200)).values():
                    for record in records:
                        message = msgspec.msgpack.decode(record.value)
                        self.replies[message["request_id"]] = message
        return self.replies[request_id]

    async def call(self, topic: str, type_: str, adapter_id: str, seq: int, **fields: Any) -> dict[str, Any]:
        reply = await self.reply(await self.send(topic, type_, adapter_id, seq, **fields))
        assert reply["type"] != "error", reply
        assert reply["type"] == f"{type_}_result" and reply["seq"] == seq, reply
        return reply


async def newest_events(bootstrap: str, prefix: str, want: Any) -> dict[str, dict[str, Any]]:
    """Section 9 step 2: the metrics topic from its beginning, the newest event of each (type, engine)
    by ``sent_at_ms``, until ``want(newest)`` holds."""
    topic = f"{prefix}.metrics"
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, fetch_max_wait_ms=20
    )
    await consumer.start()
    newest: dict[str, dict[str, Any]] = {}
    try:
        await consumer.topics()  # refreshes the metadata
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or {0})]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        async with asyncio.timeout(WAIT_S):
            while not want(newest):
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for record in records:
                        event = msgspec.msgpack.decode(record.value)
                        slot = f"{event['type']}:{event.get('engine_id', event['adapter_id'])}"
                        if slot not in newest or event["sent_at_ms"] >= newest[slot]["sent_at_ms"]:
                            newest[slot] = event
    finally:
        await consumer.stop()
    return newest


def test_a_client_written_from_the_protocol_document(
    broker: Any, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    checkpoint_dir = tmp_path / "ckpt"
    config = service_config_for_tests(
        broker.bootstrap, topic_prefix, tiny_model_path, checkpoint_dir, heartbeat_interval=0.5, model_name=MODEL_NAME
    )
    model_config = json.loads((tiny_model_path / "config.json").read_text())
    client = ForeignClient(broker.bootstrap, topic_prefix)

    async def body() -> None:
        # The topics exist (as after `hotlora topics create`), no engine runs yet: a request sent now
        # waits in its topic and is answered once an engine joins (section 5c).
        await ensure_topics(broker.bootstrap, Topics(topic_prefix), partitions=config.partitions)
        try:
            await client.open()
            # Integers in float fields (alpha, weight), as a JavaScript encoder writes 8.0 and 1.0.
            early = await client.send(
                "control", "create_adapter", "a", 1, rank=4, alpha=8, targets="attention", weight=1
            )
            service = EngineService(config)
            running = await start_engine_service(service, WAIT_S)
            try:
                await scenario(early)
            finally:
                service.request_stop()
                await asyncio.wait_for(running, WAIT_S)
        finally:
            await client.close()

    async def scenario(early: str) -> None:
        created = await client.reply(early)
        assert created["type"] == "create_adapter_result", created
        assert created["adapter"]["alpha"] == 8.0 and type(created["adapter"]["alpha"]) is float

        def serving(newest: dict[str, dict[str, Any]]) -> bool:
            beats = [e for k, e in newest.items() if k.startswith("heartbeat:")]
            statuses = [e for k, e in newest.items() if k.startswith("engine_status:")]
            return any(b["state"] == "running" and b["partitions"] for b in beats) and bool(statuses)

        newest = await newest_events(broker.bootstrap, topic_prefix, serving)
        beat = newest[f"heartbeat:{config.engine_id}"]
        status = newest[f"engine_status:{config.engine_id}"]
        eos = model_config["eos_token_id"]
        for event in (beat, status):
            assert event["model_name"] == MODEL_NAME
            assert event["vocab_size"] == model_config["vocab_size"]
            assert event["context_length"] == model_config["max_position_embeddings"]
            assert event["eos_token_ids"] == sorted(eos if isinstance(eos, list) else [eos])
        assert status["model"] == str(tiny_model_path)
        assert status["checkpoint_dir"] == str(checkpoint_dir.resolve())
        vocab, context = beat["vocab_size"], beat["context_length"]

        # A whole float in an int field is refused; the adapter's sequence moves on (seq 2 is used).
        bad = await client.reply(await client.send("rollout", "sample", "a", 2, prompt_tokens=i32([1, 2]), n=1.0))
        assert (bad["type"], bad["code"]) == ("error", "bad_message"), bad
        # A prompt + max_tokens over the context length is refused, as section 3 says.
        too_long = await client.reply(
            await client.send("rollout", "sample", "a", 3, prompt_tokens=i32([1]), max_tokens=context)
        )
        assert (too_long["type"], too_long["code"]) == ("error", "invalid_request"), too_long

        prompt = [1, 5, 9]
        sampled = await client.call(
            "rollout", "sample", "a", 4, prompt_tokens=i32(prompt), max_tokens=6, temperature=1, top_p=1, seed=7
        )
        sequence = sampled["sequences"][0]
        tokens, sampler_logprobs = unpack_i32(sequence["tokens"]), unpack_f32(sequence["logprobs"])
        assert tokens and all(0 <= t < vocab for t in tokens) and len(sampler_logprobs) == len(tokens)
        assert sequence["stop_reason"] in ("stop", "length")
        assert sequence["stop_reason"] == "length" or tokens[-1] in beat["eos_token_ids"]

        full = prompt + tokens
        weights = [0.0] * (len(prompt) - 1) + [1.0] * len(tokens)
        datum = {
            "input_tokens": i32(full[:-1]),
            "target_tokens": i32(full[1:]),
            "weights": f32(weights),
            "logprobs": f32([0.0] * (len(prompt) - 1) + sampler_logprobs),
            "advantages": f32([w * 0.5 for w in weights]),
        }
        trained = await client.call(
            "gradient", "forward_backward", "a", 5, datums=[datum], loss_fn="cross_entropy", loss_config={}
        )
        logprobs = unpack_f32(trained["logprobs"][0])
        assert trained["num_tokens"] == len(full) - 1 and len(logprobs) == len(full) - 1
        assert trained["losses"][0] == pytest.approx(
            -sum(w * lp for w, lp in zip(weights, logprobs, strict=True)), 1e-5
        )
        # The trainer's logprobs of the sampled tokens are the sampler's (fp32, same weights).
        assert logprobs[len(prompt) - 1 :] == pytest.approx(sampler_logprobs, abs=1e-4)

        stepped = await client.call(
            "gradient", "optim_step", "a", 6, learning_rate=0.01, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0
        )
        assert stepped["version"] == 1 and math.isfinite(stepped["grad_norm"]) and stepped["grad_norm"] > 0

        saved = await client.call("control", "save_state", "a", 7, path="runs/x/../a", include_optimizer=True)
        assert saved["path"] == str(checkpoint_dir.resolve() / "runs" / "a") == status["checkpoint_dir"] + "/runs/a"
        assert (Path(saved["path"]) / "adapter_config.json").is_file()

        listed = await client.call("control", "list_adapters", "a", 0)
        (info,) = [a for a in listed["adapters"] if a["adapter_id"] == "a"]
        assert (info["seq"], info["version"]) == (7, 1)

        for codec in ("gzip", "snappy", "lz4"):  # zstd: every request above
            producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", compression_type=codec)
            await producer.start()
            try:
                reply = await client.reply(await client.send("control", "list_adapters", "", 0, producer=producer))
            finally:
                await producer.stop()
            assert reply["type"] == "list_adapters_result", (codec, reply)

    asyncio.run(body())
