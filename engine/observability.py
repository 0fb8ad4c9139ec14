"""``EngineMetrics``: Prometheus metrics of one engine, and the per-adapter load its heartbeats carry.

Two sources feed it. The engine core reports what only it sees, once per step, never per row: when a
step starts (so a request's queue wait ends there), how long each slice took, the rows and adapters of
each training micro-batch and of each decode slice, and how many adapters are resident. The Kafka
edge reports each answered request with ``observe_request(request, reply)``, the wire messages
themselves, so requests refused before they reach the engine (``forbidden``, ``bad_message``) count
too, and tokens are counted from what the agent actually got back.

Every ``EngineMetrics`` owns its own ``CollectorRegistry``, not prometheus_client's global one, so
tests and several engines in one process never collide; ``start_http_server`` serves that registry.

Version lag, per adapter: at each ``optim_step`` that takes the adapter from version ``v - 1`` to
``v``, ``version_lag = (v - 1) - s``, where ``s`` is the version that served the adapter's most recent
``sample`` answered before it (clamped at 0; 0 until the adapter has sampled). It counts how many
optimizer steps the newest rollouts are behind the weights the step updated: 0 for an on-policy loop
(sample, train, step), k for a pipeline whose rollouts run k steps behind its trainer. A create or
load starts a new lineage and resets it.

Thread safety: prometheus_client's metrics take their own locks (the micro-batch hook runs on the
engine's model thread, scrapes on the HTTP server's thread); the per-adapter state here is touched
only from the event loop (``observe_request``, ``step_started``, ``step_finished``, ``adapter_load``).
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from hotlora.engine.probe import serve
from hotlora.engine.scheduler import DecodeSlice, RunBarrier, Step, TrainSlice
from hotlora.schemas import messages as wire

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from hotlora.engine.adapters import AdapterRegistry
    from hotlora.engine.batching import MicroBatch
    from hotlora.engine.scheduler import Scheduler

# Buckets sized for this engine: a tiny CPU model answers in milliseconds, a big GPU batch in seconds.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
ADAPTER_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)
MAX_STARTED = 65_536  # start stamps of requests never observed (in-process callers, snapshots) age out


@dataclass
class _AdapterStats:
    """What the heartbeat's ``AdapterLoad`` needs, and which labelled series to drop on delete."""

    sampled_tokens: int = 0
    trained_tokens: int = 0
    optim_steps: int = 0
    errors: int = 0
    quota_refusals: int = 0
    version: int = 0
    last_sample_version: int | None = None
    version_lag: int = 0
    # The previous ``adapter_load`` call: (monotonic seconds, sampled + trained tokens), for tokens/s.
    rate_mark: tuple[float, int] | None = None
    request_labels: set[tuple[str, str]] = field(default_factory=set)  # (type, code)
    error_codes: set[str] = field(default_factory=set)
    types: set[str] = field(default_factory=set)


class EngineMetrics:
    """One engine's metrics; see the module docstring for who calls what."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # ----- per adapter -----
        self.requests = Counter(
            "hotlora_requests", "Requests answered, by type and outcome (code: ok or the error code)",
            ["adapter", "type", "code"], registry=r,
        )  # fmt: skip
        self.errors = Counter("hotlora_errors", "Requests answered with an error", ["adapter", "code"], registry=r)
        self.sampled_tokens = Counter(
            "hotlora_sampled_tokens", "Generated tokens returned by sample (every sequence)", ["adapter"], registry=r
        )
        self.trained_tokens = Counter(
            "hotlora_trained_tokens", "Tokens of forward_backward datums (input_tokens)", ["adapter"], registry=r
        )
        self.optim_steps = Counter("hotlora_optim_steps", "Successful optimizer steps", ["adapter"], registry=r)
        self.queue_wait = Histogram(
            "hotlora_queue_wait_seconds", "From the engine consuming a request to the step that starts it",
            ["adapter", "type"], buckets=SECONDS_BUCKETS, registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "hotlora_request_latency_seconds", "From the engine consuming a request to its result being ready",
            ["adapter", "type"], buckets=SECONDS_BUCKETS, registry=r,
        )  # fmt: skip
        self.version = Gauge("hotlora_adapter_version", "The adapter's trainer version", ["adapter"], registry=r)
        self.version_lag = Gauge(
            "hotlora_version_lag", "Optimizer steps the newest sample is behind the weights its next step updated",
            ["adapter"], registry=r,
        )  # fmt: skip
        # ----- per engine -----
        self.micro_batch_rows = Histogram(
            "hotlora_micro_batch_rows", "Rows per micro-batch (train) or per decode slice (decode)",
            ["kind"], buckets=ROWS_BUCKETS, registry=r,
        )  # fmt: skip
        self.micro_batch_adapters = Histogram(
            "hotlora_micro_batch_adapters", "Distinct adapters per micro-batch (train) or decode slice (decode)",
            ["kind"], buckets=ADAPTER_BUCKETS, registry=r,
        )  # fmt: skip
        self.slice_seconds = Histogram(
            "hotlora_slice_seconds", "Wall time of one engine step: a decode slice, a train slice or a barrier",
            ["kind"], buckets=SECONDS_BUCKETS, registry=r,
        )  # fmt: skip
        self.resident_adapters = Gauge("hotlora_resident_adapters", "Adapters resident on the device", registry=r)
        self.offloaded_adapters = Gauge("hotlora_offloaded_adapters", "Adapters registered but offloaded", registry=r)
        self.consumer_lag = Gauge(
            "hotlora_consumer_lag_records", "Records not yet consumed, per request topic (set by the edge)",
            ["topic"], registry=r,
        )  # fmt: skip
        # ----- fairness and quotas (issue 18) -----
        self.queue_depth = Gauge(
            "hotlora_queue_depth", "Requests of the adapter waiting in the engine's scheduler", ["adapter"], registry=r
        )
        self.decode_rows = Gauge(
            "hotlora_decode_rows", "Decode rows the adapter's samples run (its share of the batch)", ["adapter"],
            registry=r,
        )  # fmt: skip
        self.paused_rows = Gauge(
            "hotlora_paused_rows", "Rows of the adapter's admitted samples paused to give other tenants their share",
            ["adapter"], registry=r,
        )  # fmt: skip
        self.quota_refusals = Counter(
            "hotlora_quota_refusals", "Requests refused with quota_exceeded, by principal and quota",
            ["principal", "quota"], registry=r,
        )  # fmt: skip
        self.row_steps = Counter(
            "hotlora_decode_row_steps", "Decode rows the adapter ran, summed over decode steps", ["adapter"], registry=r
        )
        self.shared_row_steps = Counter(
            "hotlora_shared_decode_row_steps",
            "Decode rows the adapter ran in steps another adapter also decoded in (its share of a contended batch)",
            ["adapter"], registry=r,
        )  # fmt: skip
        self._row_steps_seen: dict[str, tuple[int, int]] = {}
        self._tenant_labels: set[str] = set()
        self._tenant_rows: dict[str, tuple[int, int]] = {}
        self._adapters: dict[str, _AdapterStats] = {}
        self._started: OrderedDict[str, float] = OrderedDict()  # request_id -> epoch seconds its step started
        self._server: WSGIServer | None = None

    # ----- HTTP endpoint -----

    def start_http_server(self, port: int = 0, addr: str = "0.0.0.0", state: Callable[[], str] | None = None) -> int:
        """Serve ``/metrics`` from this registry on a daemon thread; ``port`` 0 picks a free one. With
        ``state`` (the engine's: ``running`` when it serves) also ``/ready`` and ``/live`` (engine.probe).

        Returns the bound port (the one to scrape, and to log when 0 was asked for).
        """
        if self._server is None:
            self._server = serve(self.registry, state or (lambda: "running"), port, addr)
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop the HTTP endpoint, if started."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ----- engine core hooks (event loop, except ``observe_micro_batch``) -----

    def step_started(self, step: Step, decode_batch: tuple[int, int] | None = None) -> None:
        """Stamp the step's requests as started (their queue wait ends now); ``decode_batch`` is the
        (rows, adapters) the coming decode slice runs, when the engine decodes it itself."""
        now = time.time()
        if isinstance(step, RunBarrier):
            ids = [step.item.request_id]
        elif isinstance(step, TrainSlice):
            ids = [item.request_id for item in step.items]
        elif isinstance(step, DecodeSlice):
            ids = [item.request_id for item in step.admit]
        else:
            ids = []
        for request_id in ids:
            self._started[request_id] = now
        while len(self._started) > MAX_STARTED:
            self._started.popitem(last=False)
        if decode_batch is not None and decode_batch[0] > 0:
            rows, adapters = decode_batch
            self.micro_batch_rows.labels("decode").observe(rows)
            self.micro_batch_adapters.labels("decode").observe(adapters)

    def step_finished(self, step: Step, seconds: float, registry: AdapterRegistry | None = None) -> None:
        """One histogram observation per step, and the residency gauges (the worker is idle now)."""
        kind = "barrier" if isinstance(step, RunBarrier) else "train" if isinstance(step, TrainSlice) else "decode"
        self.slice_seconds.labels(kind).observe(seconds)
        if registry is not None:
            resident = len(registry.resident_ids())
            self.resident_adapters.set(resident)
            self.offloaded_adapters.set(len(registry) - resident)

    def observe_tenants(
        self,
        scheduler: Scheduler,
        tenant_rows: dict[str, tuple[int, int]],
        row_steps: dict[str, tuple[int, int]] | None = None,
    ) -> None:
        """Per-adapter queue depth and (decoding, paused) rows after a step; adapters gone drop to nothing.

        ``row_steps``: the engine's running (row-steps, shared row-steps) per adapter; the counters take
        what grew since the last call.
        """
        self._tenant_rows = dict(tenant_rows)
        for adapter, (total, shared) in (row_steps or {}).items():
            seen_total, seen_shared = self._row_steps_seen.get(adapter, (0, 0))
            if total > seen_total:
                self.row_steps.labels(adapter).inc(total - seen_total)
            if shared > seen_shared:
                self.shared_row_steps.labels(adapter).inc(shared - seen_shared)
            self._row_steps_seen[adapter] = (total, shared)
        names = set(tenant_rows) | {a for a in scheduler.adapter_ids() if scheduler.pending(a)}
        for adapter in self._tenant_labels - names:
            for metric in (self.queue_depth, self.decode_rows, self.paused_rows):
                metric.remove(adapter)
        for adapter in names:
            decoding, paused = tenant_rows.get(adapter, (0, 0))
            self.queue_depth.labels(adapter).set(scheduler.pending(adapter))
            self.decode_rows.labels(adapter).set(decoding)
            self.paused_rows.labels(adapter).set(paused)
        self._tenant_labels = names

    def observe_quota_refusal(self, principal: str, quota: str) -> None:
        """A request refused at the edge for ``quota`` (engine.kafka.quotas); counted per principal."""
        self.quota_refusals.labels(principal, quota).inc()

    def observe_micro_batch(self, batch: MicroBatch) -> None:
        """A training micro-batch about to run (model thread): its rows and distinct adapters (slots)."""
        self.micro_batch_rows.labels("train").observe(len(batch.rows))
        self.micro_batch_adapters.labels("train").observe(len({row.slot for row in batch.rows}))

    # ----- the edge's hook -----

    def set_consumer_lag(self, topic: str, records: int) -> None:
        self.consumer_lag.labels(topic).set(max(records, 0))

    def observe_request(
        self,
        message: wire.RequestMessage,
        reply: wire.ResultMessage,
        received_at_ms: int | None = None,
        finished_at_ms: int | None = None,
    ) -> None:
        """Count one answered request; times default to the reply's ``received_at_ms``/``finished_at_ms``.

        Queue wait needs the engine's start stamp for the request (``step_started``); a request that
        never reached a step (refused at the edge, a bad value) has none and observes latency only.
        """
        adapter = message.adapter_id
        kind = wire.tag_of(type(message))
        stats = self._stats(adapter)
        code = reply.code if isinstance(reply, wire.Error) else "ok"
        self.requests.labels(adapter, kind, code).inc()
        stats.request_labels.add((kind, code))
        stats.types.add(kind)
        if isinstance(reply, wire.Error):
            self.errors.labels(adapter, code).inc()
            stats.error_codes.add(code)
            stats.errors += 1
            stats.quota_refusals += code == "quota_exceeded"
        received = received_at_ms if received_at_ms is not None else reply.received_at_ms
        finished = finished_at_ms if finished_at_ms is not None else reply.finished_at_ms or wire.now_ms()
        started = self._started.pop(message.request_id, None)
        if received:
            self.latency.labels(adapter, kind).observe(max(finished - received, 0) / 1000.0)
            if started is not None:
                self.queue_wait.labels(adapter, kind).observe(max(started * 1000.0 - received, 0.0) / 1000.0)
        self._count_work(adapter, stats, reply)

    def _count_work(self, adapter: str, stats: _AdapterStats, reply: wire.ResultMessage) -> None:
        if isinstance(reply, wire.SampleResult):
            tokens = sum(len(seq.tokens) // 4 for seq in reply.sequences)  # packed int32
            self.sampled_tokens.labels(adapter).inc(tokens)
            stats.sampled_tokens += tokens
            stats.last_sample_version = reply.adapter_version
        elif isinstance(reply, wire.ForwardBackwardResult):
            self.trained_tokens.labels(adapter).inc(reply.num_tokens)
            stats.trained_tokens += reply.num_tokens
        elif isinstance(reply, wire.OptimStepResult):
            self.optim_steps.labels(adapter).inc()
            stats.optim_steps += 1
            if stats.last_sample_version is not None:
                stats.version_lag = max(reply.version - 1 - stats.last_sample_version, 0)
            self._set_version(adapter, stats, reply.version)
        elif isinstance(reply, wire.CreateAdapterResult | wire.LoadStateResult):
            stats.last_sample_version = None
            stats.version_lag = 0
            self._set_version(adapter, stats, reply.adapter.version)
        elif isinstance(reply, wire.SaveStateResult):
            self._set_version(adapter, stats, reply.version)
        elif isinstance(reply, wire.DeleteAdapterResult):
            self.forget(adapter)

    def _set_version(self, adapter: str, stats: _AdapterStats, version: int) -> None:
        stats.version = version
        self.version.labels(adapter).set(version)
        self.version_lag.labels(adapter).set(stats.version_lag)

    def _stats(self, adapter: str) -> _AdapterStats:
        stats = self._adapters.get(adapter)
        if stats is None:
            stats = self._adapters[adapter] = _AdapterStats()
        return stats

    def adopt(self, adapter: str, version: int) -> None:
        """An adapter loaded outside any request (a restart's restore, a migration in): start its lineage."""
        stats = self._stats(adapter)
        stats.last_sample_version = None
        stats.version_lag = 0
        self._set_version(adapter, stats, version)

    def forget(self, adapter: str) -> None:
        """Drop a deleted adapter's series, so adapter churn does not grow the scrape forever."""
        stats = self._adapters.pop(adapter, None)
        if stats is None:
            return
        for kind, code in stats.request_labels:
            self.requests.remove(adapter, kind, code)
        for code in stats.error_codes:
            self.errors.remove(adapter, code)
        for kind in stats.types:
            self.queue_wait.remove(adapter, kind)  # a label set never observed is skipped
            self.latency.remove(adapter, kind)
        for metric in (self.sampled_tokens, self.trained_tokens, self.optim_steps, self.version, self.version_lag):
            metric.remove(adapter)
        for metric in (self.row_steps, self.shared_row_steps):
            with contextlib.suppress(KeyError):
                metric.remove(adapter)
        if adapter in self._tenant_labels:
            self._tenant_labels.discard(adapter)
            for metric in (self.queue_depth, self.decode_rows, self.paused_rows):
                metric.remove(adapter)

    # ----- heartbeats -----

    def adapter_load(
        self, scheduler: Scheduler | None = None, adapters: Iterable[str] | None = None, now: float | None = None
    ) -> dict[str, wire.AdapterLoad]:
        """The heartbeat's per-adapter ``load``.

        ``adapters``: the ones the engine holds now (its registry); None takes every adapter requests were
        answered for, including ids that never existed (a request for an unknown adapter still counts in
        the Prometheus series). ``queued``/``running`` come from the engine's scheduler (event-loop
        state, so call this on the loop). ``tokens_per_s`` covers the time since the previous call.
        """
        now = time.monotonic() if now is None else now
        names = [a for a in self._adapters if a] if adapters is None else list(adapters)  # "": no adapter
        load: dict[str, wire.AdapterLoad] = {}
        for adapter in names:
            stats = self._stats(adapter)
            tokens = stats.sampled_tokens + stats.trained_tokens
            rate = 0.0
            if stats.rate_mark is not None and now > stats.rate_mark[0]:
                rate = (tokens - stats.rate_mark[1]) / (now - stats.rate_mark[0])
            stats.rate_mark = (now, tokens)
            decoding, paused = self._tenant_rows.get(adapter, (0, 0))
            load[adapter] = wire.AdapterLoad(
                rows=decoding,
                paused_rows=paused,
                quota_refusals=stats.quota_refusals,
                queued=scheduler.pending(adapter) if scheduler is not None else 0,
                running=scheduler.in_flight(adapter) if scheduler is not None else 0,
                sampled_tokens=stats.sampled_tokens,
                trained_tokens=stats.trained_tokens,
                tokens_per_s=round(rate, 3),
                version=stats.version,
                version_lag=stats.version_lag,
                optim_steps=stats.optim_steps,
                errors=stats.errors,
            )
        return load
