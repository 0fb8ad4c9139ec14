"""Typed engine errors whose codes travel on the wire.

A tenant's bad request must surface as that tenant's error, never as an engine crash, so every
failure the engine can attribute to a request is a ``HotLoraError`` with a stable ``code``.
"""

from __future__ import annotations


class HotLoraError(Exception):
    """Base class: ``code`` is the stable, machine-readable name sent back to the agent."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class InvalidRequest(HotLoraError):
    code = "invalid_request"


class UnknownAdapter(HotLoraError):
    code = "unknown_adapter"


class AdapterExists(HotLoraError):
    code = "adapter_exists"


class CapacityExceeded(HotLoraError):
    code = "capacity_exceeded"


class CheckpointError(HotLoraError):
    code = "checkpoint_error"


class RolloutError(HotLoraError):
    """The rollout backend (vLLM) failed a request or a weight sync; the message says which and why."""

    code = "rollout_failed"
