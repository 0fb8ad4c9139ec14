"""The one error the wire layer raises, so a malformed message is a tenant's error, never a crash."""

from __future__ import annotations

from hotlora.engine.errors import HotLoraError


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
