"""``Outbox``: everything the engine service publishes, and how each kind fails.

Replies go to their request's ``reply_to`` (or the shared results topic); a reply that cannot be sent is
logged, never raised, because the agent's retry (same ``request_id``) is answered from the result
cache. A record that is not a valid request is copied to the dead letters and, when its envelope named
a sender, answered with ``bad_message``. Checkpoint events and the engine's status go out as they happen.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import structlog
from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from hotlora.engine.digest import directory_sha256
from hotlora.schemas import messages as wire
from hotlora.schemas.codec import encode, is_topic_name
from hotlora.schemas.errors import SchemaError
from hotlora.schemas.topics import Topics, key_for

log = structlog.get_logger("hotlora.service")


class _LooseSeq(msgspec.Struct):
    """Salvages ``seq`` from a rejected record, so the adapter's later requests need not wait for it."""

    adapter_id: str = ""
    seq: int = 0


_loose_seq = msgspec.msgpack.Decoder(_LooseSeq)


def salvage_seq(data: bytes | None) -> int:
    try:
        return max(_loose_seq.decode(data or b"").seq, 0)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return 0


class Outbox:
    def __init__(self, producer: AIOKafkaProducer, topics: Topics, max_message_bytes: int) -> None:
        self.producer = producer
        self.topics = topics
        self.max_message_bytes = max_message_bytes

    async def send(self, topic: str, message: wire.Message, key: bytes | None = None) -> None:
        """``key`` defaults to the message's own (its adapter id, or none)."""
        await self.producer.send_and_wait(topic, encode(message), key=key if key is not None else key_for(message))

    async def reply(self, reply: wire.ResultMessage) -> None:
        """Send to the request's ``reply_to``; a failure is logged, never raised (the retry is answered)."""
        try:
            await self.send(self.topics.topic_for(reply), reply)
        except KafkaError as err:
            log.error("reply_lost", request_id=reply.request_id, error=repr(err))

    async def dead_letter(
        self, record: ConsumerRecord[Any, Any], err: SchemaError, source: str, received_at_ms: int
    ) -> None:
        """Copy an invalid record to the dead letters (its head, if even the copy is too large) and answer
        its sender with ``bad_message`` when the envelope named one. Failures are logged only."""
        log.warning("bad_message", request_id=err.request_id[:200], adapter_id=err.adapter_id[:200], error=err.message)
        headers = [("hotlora-error", err.message[:1000].encode()), ("hotlora-source", source.encode())]
        value = record.value or b""
        try:
            try:
                await self.producer.send_and_wait(self.topics.dead_letters, value, key=record.key, headers=headers)
            except MessageSizeTooLargeError:  # larger than even the transport limit: keep its head
                head = value[: self.max_message_bytes]
                headers = [*headers, ("hotlora-truncated-from", str(len(value)).encode())]
                await self.producer.send_and_wait(self.topics.dead_letters, head, key=record.key, headers=headers)
        except KafkaError as failure:
            log.error("dead_letter_failed", bytes=len(value), error=repr(failure))
        if not err.request_id:
            return
        reply = wire.Error(
            request_id=err.request_id,
            adapter_id=err.adapter_id,
            seq=salvage_seq(record.value),
            reply_to=err.reply_to if is_topic_name(err.reply_to) else "",  # else: the shared results topic
            received_at_ms=received_at_ms,
            finished_at_ms=wire.now_ms(),
            code=err.code,
            message=err.message,
        )
        try:
            await self.send(self.topics.topic_for(reply), reply)
        except KafkaError as failure:
            log.error("bad_message_reply_failed", reply_to=err.reply_to, error=repr(failure))

    async def checkpoint(
        self, adapter_id: str, path: str | Path, step: int, include_optimizer: bool, request_id: str
    ) -> None:
        """A checkpoint event with the directory's digest (agents wait for these, ``wait_for_checkpoint``)."""
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
        await self.send(self.topics.checkpoints, event)
        log.info("checkpoint_written", adapter_id=adapter_id, path=str(path), step=step, sha256=digest)
