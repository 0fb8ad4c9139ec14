"""Per-principal quotas: what one tenant may hold of the engine, so no tenant can lock the others out.

The engine core shares rows and tokens fairly among the work it is given; this module bounds how much
work one principal can give it. It is checked at the edge, in ``seq`` order, right before a request
reaches the engine (``EngineService._execute``), and a request over any bound is answered
``quota_exceeded`` there: it never reaches the engine, and it is not counted.

What is bounded (``QuotaLimits``; 0 switches a bound off):

- ``adapters_per_principal``: adapters one principal owns (a ``create_adapter`` or ``load_state`` of a
  new id past it is refused). Well below the engine's global cap, so no principal can take every slot.
- ``queued_per_adapter`` / ``queued_per_principal``: requests accepted and not yet answered (queued in
  the engine or running). Bounds the scheduler's queues, hence the engine's memory under a flood.
- ``queued_bytes_per_principal``: the wire size of those requests, so a few huge requests are bounded too.
- ``sample_rows_per_principal``: ``n`` summed over the principal's accepted, unanswered samples.
- ``forward_backward_tokens``: padded tokens (datums x longest datum) of one ``forward_backward``, so
  one request cannot hold the model for an unbounded training step.

The principal is the request's ``principal`` ("" for anonymous requests, which share one quota).
Every request but ``list_adapters`` is counted; samples of the plain base model (``adapter_id=""``)
count against the adapter id "". Pure bookkeeping: no I/O, no clocks.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hotlora.schemas import messages as wire
from hotlora.schemas.errors import QuotaExceeded


@dataclass(frozen=True)
class QuotaLimits:
    """The bounds, per principal unless named otherwise; 0 means no bound."""

    adapters_per_principal: int = 64
    queued_per_adapter: int = 256
    queued_per_principal: int = 1024
    queued_bytes_per_principal: int = 256 << 20
    sample_rows_per_principal: int = 4096
    forward_backward_tokens: int = 1 << 20

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"quota {name} must be an int >= 0 (0: no bound), got {value!r}")


@dataclass(frozen=True)
class _Held:
    """What one accepted request counts against its principal and adapter until it is answered."""

    principal: str
    adapter_id: str
    size: int
    rows: int


def padded_tokens(message: wire.ForwardBackward) -> int:
    """Datums x the longest datum's tokens: what the step pads to (int32 arrays: 4 bytes a token)."""
    width = max((len(d.input_tokens) // 4 for d in message.datums), default=0)
    return width * len(message.datums)


class Quotas:
    """Counts held per principal and adapter; ``admit`` refuses (changing nothing) or counts a request."""

    def __init__(self, limits: QuotaLimits | None = None, max_request_rows: int | None = None) -> None:
        self.limits = limits or QuotaLimits()
        # A sample wider than this (the decode batch) is the engine's ``invalid_request``, refused before it
        # queues: it is not held against the rows quota, so the more precise refusal is the one it gets.
        self.max_request_rows = max_request_rows
        self._held: dict[str, _Held] = {}  # request_id -> what it holds
        self._queued: Counter[str] = Counter()  # principal -> requests
        self._queued_adapter: Counter[str] = Counter()  # adapter id -> requests
        self._bytes: Counter[str] = Counter()  # principal -> wire bytes
        self._rows: Counter[str] = Counter()  # principal -> sample rows
        self.refusals: Counter[tuple[str, str]] = Counter()  # (principal, quota) -> refusals so far

    def admit(self, message: wire.RequestMessage, size: int, owned: int | None = None) -> None:
        """Count ``message`` (``size`` wire bytes) or raise ``QuotaExceeded``, changing nothing.

        ``owned``: when the request would make its principal own one more adapter (a create or load of a
        new id), how many it owns now; None otherwise.
        """
        if isinstance(message, wire.ListAdapters):
            return
        principal = message.principal
        rows = message.n if isinstance(message, wire.Sample) else 0
        if self.max_request_rows is not None and rows > self.max_request_rows:
            rows = 0
        limits = self.limits
        checks: list[tuple[str, int, int, str]] = [
            ("queued_per_adapter", self._queued_adapter[message.adapter_id] + 1, limits.queued_per_adapter, "requests"),
            ("queued_per_principal", self._queued[principal] + 1, limits.queued_per_principal, "requests"),
            ("queued_bytes_per_principal", self._bytes[principal] + size, limits.queued_bytes_per_principal, "bytes"),
            ("sample_rows_per_principal", self._rows[principal] + rows, limits.sample_rows_per_principal, "rows"),
        ]
        if isinstance(message, wire.ForwardBackward):
            checks.append(("forward_backward_tokens", padded_tokens(message), limits.forward_backward_tokens, "tokens"))
        if owned is not None:
            checks.append(("adapters_per_principal", owned + 1, limits.adapters_per_principal, "adapters"))
        for name, wanted, limit, unit in checks:
            if limit and wanted > limit:
                self.refusals[principal, name] += 1
                who = f"principal {principal!r}" if principal else "anonymous requests"
                raise QuotaExceeded(
                    f"{who} would hold {wanted} {unit} against quota {name}={limit} "
                    f"(request {message.request_id!r} on adapter {message.adapter_id!r} was not run)",
                    quota=name,
                )
        self._held[message.request_id] = _Held(principal, message.adapter_id, size, rows)
        self._queued[principal] += 1
        self._queued_adapter[message.adapter_id] += 1
        self._bytes[principal] += size
        self._rows[principal] += rows

    def release(self, request_id: str) -> None:
        """The request was answered (or abandoned): what it held is free again. Unknown ids are ignored."""
        held = self._held.pop(request_id, None)
        if held is None:
            return
        for counter, key, amount in (
            (self._queued, held.principal, 1),
            (self._queued_adapter, held.adapter_id, 1),
            (self._bytes, held.principal, held.size),
            (self._rows, held.principal, held.rows),
        ):
            counter[key] -= amount
            if counter[key] <= 0:
                del counter[key]

    def usage(self, principal: str) -> dict[str, int]:
        """The principal's counted requests, bytes and sample rows (for status and tests)."""
        return {"queued": self._queued[principal], "bytes": self._bytes[principal], "rows": self._rows[principal]}

    def queued_on(self, adapter_id: str) -> int:
        return self._queued_adapter[adapter_id]
