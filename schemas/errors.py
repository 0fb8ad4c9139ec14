"""Every typed hotlora error, with the stable ``code`` it carries on the wire.

A tenant's bad request must surface as that tenant's error, never as an engine crash, so every
failure the engine can attribute to a request is a ``HotLoraError`` with a stable ``code``. The codes
travel in ``error`` messages (``docs/protocol.md``), so the classes live here, in the bottom layer:
the engine raises them, the edge encodes them, and an agent re-raises them from the codes alone.
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


# ----- the engine's codes -----


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


class InternalError(HotLoraError):
    """A bug or an out-of-memory in a step: that step's requests fail, the engine goes on."""

    code = "internal"


class EngineClosed(HotLoraError):
    code = "engine_closed"


class Forbidden(HotLoraError):
    """The request's principal or token does not own the adapter; nothing was changed."""

    code = "forbidden"


class QuotaExceeded(HotLoraError):
    """The request's principal is at one of its quotas (adapters, queued requests or bytes, sample rows,
    tokens per ``forward_backward``); the request did not run and nothing else changed. Retry later, with
    a new ``request_id``: a retry of this one is answered with this refusal again."""

    code = "quota_exceeded"

    def __init__(self, message: str, quota: str = "") -> None:
        super().__init__(message)
        self.quota = quota  # which quota (engine.kafka.quotas.QuotaLimits field); not sent on the wire


# ----- the wire's code -----


class SchemaError(HotLoraError):
    """A message that is not valid hotlora wire format (bad bytes, version, type, field or array length).

    ``request_id``, ``adapter_id`` and ``reply_to`` are salvaged from the envelope when it was readable,
    so the engine can send an ``error`` to the sender instead of only dead-lettering the message.
    """

    code = "bad_message"

    def __init__(self, message: str, *, request_id: str = "", adapter_id: str = "", reply_to: str = "") -> None:
        super().__init__(message)
        self.request_id = request_id
        self.adapter_id = adapter_id
        self.reply_to = reply_to


# Every code the engine can put in an ``error`` message, and the exception an agent re-raises for it.
ERROR_CODES: dict[str, type[HotLoraError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        UnknownAdapter,
        AdapterExists,
        CapacityExceeded,
        CheckpointError,
        RolloutError,
        InternalError,
        EngineClosed,
        SchemaError,
        Forbidden,
        QuotaExceeded,
    )
}


# ----- the client's own codes (raised by the SDK, never sent) -----


class RequestTimeout(HotLoraError, TimeoutError):
    """No reply after every attempt; the request may still run, and a retry with its id is safe."""

    code = "timeout"


class ClientClosed(HotLoraError):
    """The client closed (or was never started) before the request got its reply."""

    code = "client_closed"
