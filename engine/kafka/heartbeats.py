"""``Heartbeats``: what an engine tells the fleet on the metrics topic, and nothing else.

``engine_status`` goes out when the engine's state or its adapters change (starting, running, draining,
stopped; a create, delete or load); ``running`` the moment the engine took its first partitions. A
``heartbeat`` goes out every ``heartbeat_interval`` seconds with liveness, capacity (resident slots),
load and what this engine owns, which ``hotlora status`` and ``hotlora top`` fold into the fleet's view.
Both are keyed by the engine id, so each engine's announcements stay in order on one partition, and both
carry the base model's name, vocabulary size, context length and EOS ids (``ModelFacts``), so a client
in any language can check its tokens before sending.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from hotlora.engine.kafka.convert import from_engine
from hotlora.engine.kafka.replies import Outbox
from hotlora.engine.observability import EngineMetrics
from hotlora.engine.types import ListAdapters
from hotlora.schemas import messages as wire

if TYPE_CHECKING:  # the edge imports before torch does (engine.kafka.service)
    from hotlora.engine.base_model import BaseModel
    from hotlora.engine.core import Engine

log = structlog.get_logger("hotlora.service")


@dataclass(frozen=True)
class ModelFacts:
    """What a client must know of the base before it sends tokens (``docs/protocol.md``, section 3):
    its name, the token ids it accepts (below ``vocab_size``), its length limit and its EOS ids."""

    name: str
    vocab_size: int
    context_length: int
    eos_token_ids: list[int]

    @classmethod
    def of(cls, base: BaseModel, name: str | None = None) -> ModelFacts:
        """``name`` overrides the one derived from the base's path (``--model-name``)."""
        return cls(name or base.name, base.vocab_size, base.max_positions, sorted(base.eos_token_ids))


class Heartbeats:
    def __init__(
        self,
        outbox: Outbox,
        engine: Engine,
        engine_id: str,
        model: str,
        metrics: EngineMetrics | None,
        *,
        model_name: str | None = None,
        checkpoint_dir: str = "",
    ):
        self.outbox = outbox
        self.engine = engine
        self.engine_id = engine_id
        base = engine.runner.base
        self.model = model or base.path
        self.facts = ModelFacts.of(base, model_name)
        self.checkpoint_dir = checkpoint_dir
        self.metrics = metrics
        # Keyed by the engine: one partition holds all of an engine's announcements, in the order sent,
        # so a reader that keeps the latest never sees ``starting`` after ``running``.
        self._key = engine_id.encode()

    def _model_fields(self) -> dict[str, Any]:
        facts = self.facts
        return {
            "model_name": facts.name,
            "vocab_size": facts.vocab_size,
            "context_length": facts.context_length,
            "eos_token_ids": list(facts.eos_token_ids),
        }

    async def status(self, state: str) -> None:
        """``engine_status``: the engine's state, limits and adapters (a send failure raises)."""
        infos = await self.engine.submit(ListAdapters())
        status = wire.EngineStatus(
            engine_id=self.engine_id,
            model=self.model,
            state=state,
            max_adapters=self.engine.runner.config.max_adapters,
            max_decode_rows=self.engine.config.max_decode_rows,
            sampler=self.engine.sampler_name,
            adapters=from_engine(wire.ListAdapters(), infos).adapters,  # type: ignore[union-attr]
            checkpoint_dir=self.checkpoint_dir,
            **self._model_fields(),
        )
        await self.outbox.send(self.outbox.topics.metrics, status, self._key)

    async def beat(
        self, state: str, queued_requests: int, partitions: set[int], consumer: AIOKafkaConsumer | None
    ) -> None:
        """Liveness, capacity (resident slots), load, and what this engine owns (``hotlora status``)."""
        engine = self.engine
        table = engine.runner.adapters
        adapters = sorted(adapter.adapter_id for adapter in table.list())
        load: dict[str, wire.AdapterLoad] = {}
        if self.metrics is not None:
            load = self.metrics.adapter_load(engine.scheduler, adapters)
            if consumer is not None:
                await self._observe_consumer_lag(consumer)
        heartbeat = wire.Heartbeat(
            engine_id=self.engine_id,
            steps=engine.steps_run,
            queued_requests=queued_requests,
            running_rows=engine.scheduler.running_rows,
            resident_slots=table.resident_slots,
            resident_adapters=len(table.resident_ids()),
            max_decode_rows=engine.config.max_decode_rows,
            state=state,
            adapters=adapters,
            partitions=sorted(partitions),
            load=load,
            **self._model_fields(),
        )
        try:
            await self.outbox.send(self.outbox.topics.metrics, heartbeat, self._key)
        except KafkaError as err:
            log.warning("heartbeat_failed", error=str(err))

    async def _observe_consumer_lag(self, consumer: AIOKafkaConsumer) -> None:
        """Records behind each request topic's high watermark (as of the consumer's last fetch)."""
        assert self.metrics is not None
        lag = dict.fromkeys(self.outbox.topics.requests(), 0)
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is None:
                continue
            try:
                position = await consumer.position(tp)
            except KafkaError:  # revoked by a rebalance in between: the next heartbeat counts it
                continue
            lag[tp.topic] = lag.get(tp.topic, 0) + max(high - position, 0)
        for topic, records in lag.items():
            self.metrics.set_consumer_lag(topic, records)
