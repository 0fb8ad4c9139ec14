"""Kafka topic names and keys: which topic each message type travels on.

Sampling and training are on separate topics so a broker-side view (lag, throughput) separates the
two workloads; control verbs get their own low-volume topic. Keys are adapter ids, so all of one
adapter's requests on a topic land in one partition, in order; ``seq`` then restores the agent's
order across topics (see ``docs/protocol.md``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hotlora.schemas.messages import (
    CheckpointEvent,
    CreateAdapter,
    DeleteAdapter,
    EngineStatus,
    ForwardBackward,
    Heartbeat,
    ListAdapters,
    LoadState,
    Message,
    Metrics,
    OptimStep,
    Result,
    Sample,
    SaveState,
)

_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class Topics:
    """The topic set of one deployment; ``prefix`` lets several deployments share a cluster."""

    prefix: str = "hotlora"

    def __post_init__(self) -> None:
        # Kafka's own rule for names, checked here so a bad prefix fails at start, not at first publish.
        if not _TOPIC_NAME.match(self.prefix) or len(self.prefix) > 200:
            raise ValueError(f"topic prefix {self.prefix!r} must match [A-Za-z0-9._-]+ (at most 200 chars)")

    @property
    def rollout(self) -> str:
        return f"{self.prefix}.rollout"

    @property
    def gradient(self) -> str:
        return f"{self.prefix}.gradient"

    @property
    def control(self) -> str:
        return f"{self.prefix}.control"

    @property
    def results(self) -> str:
        return f"{self.prefix}.results"

    @property
    def checkpoints(self) -> str:
        return f"{self.prefix}.checkpoints"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}.dead-letters"

    @property
    def metrics(self) -> str:
        return f"{self.prefix}.metrics"

    def all(self) -> tuple[str, ...]:
        """Every topic the engine creates at start."""
        return (
            self.rollout,
            self.gradient,
            self.control,
            self.results,
            self.checkpoints,
            self.dead_letters,
            self.metrics,
        )

    def requests(self) -> tuple[str, ...]:
        """The topics the engine consumes."""
        return (self.rollout, self.gradient, self.control)

    def topic_for(self, message: Message | type[Message]) -> str:
        """Where a message goes. A result goes to its ``reply_to`` (default: the shared results topic)."""
        cls = message if isinstance(message, type) else type(message)
        if issubclass(cls, Sample):
            return self.rollout
        if issubclass(cls, ForwardBackward | OptimStep):
            return self.gradient
        if issubclass(cls, CreateAdapter | DeleteAdapter | ListAdapters | SaveState | LoadState):
            return self.control
        if issubclass(cls, Result):
            reply_to = "" if isinstance(message, type) else message.reply_to
            return reply_to or self.results
        if issubclass(cls, CheckpointEvent):
            return self.checkpoints
        if issubclass(cls, Heartbeat | EngineStatus | Metrics):
            return self.metrics
        raise ValueError(f"no topic for {cls.__name__}")


def key_for(message: Message) -> bytes | None:
    """The Kafka key: the adapter id as UTF-8, or None (round-robin) when no adapter applies."""
    return message.adapter_id.encode() if message.adapter_id else None
