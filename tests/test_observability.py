"""Prometheus metrics: an in-process engine with ``EngineMetrics``, scraped over HTTP, counts the work done.

Requests go through the same wire conversions and ``observe_request`` call the Kafka edge makes, so the
counters checked here are the ones a deployment's scrape shows.
"""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hotlora.engine.core import Engine, EngineConfig
from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.engine.kafka.convert import from_engine, to_engine
from hotlora.engine.observability import EngineMetrics
from hotlora.engine.runner import ModelRunner, RunnerConfig
from hotlora.engine.scheduler import Scheduler, SchedulerPolicy, WorkItem, WorkKind
from hotlora.schemas import messages as wire
from hotlora.schemas.arrays import pack_i32
from hotlora.schemas.errors import HotLoraError

STEPS = 3


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def datum(length: int, offset: int) -> wire.Datum:
    tokens = [3 + (offset + i) % 200 for i in range(length + 1)]
    return wire.Datum(input_tokens=pack_i32(tokens[:-1]), target_tokens=pack_i32(tokens[1:]))


async def call(engine: Engine, metrics: EngineMetrics, message: wire.RequestMessage) -> wire.ResultMessage:
    """What the edge's ``_execute`` does with one request, metrics included."""
    received = wire.now_ms()
    try:
        result = await engine.submit(to_engine(message))
    except HotLoraError as err:
        result = err
    reply = from_engine(message, result, received_at_ms=received)
    metrics.observe_request(message, reply)
    return reply


def test_metrics_endpoint_counts_the_work(tiny_model_path: Path) -> None:
    metrics = EngineMetrics()
    port = metrics.start_http_server(0, "127.0.0.1")
    assert port > 0
    try:
        asyncio.run(_train_two_adapters(tiny_model_path, metrics, port))
    finally:
        metrics.close()


async def _train_two_adapters(model: Path, metrics: EngineMetrics, port: int) -> None:
    config = EngineConfig(max_decode_rows=16, scheduler=SchedulerPolicy(decode_steps_per_slice=2))
    runner = ModelRunner.from_pretrained(model, dtype="float32", device="cpu", config=RunnerConfig())
    trained = {"a": 0, "b": 0}
    sampled = {"a": 0, "b": 0}
    async with Engine(runner, config, metrics=metrics) as engine:
        for adapter in trained:
            reply = await call(engine, metrics, wire.CreateAdapter(adapter_id=adapter, rank=4))
            assert isinstance(reply, wire.CreateAdapterResult), reply
        for step in range(STEPS):
            prompt = pack_i32([1, 5, 9])
            samples = await asyncio.gather(
                *(
                    call(engine, metrics, wire.Sample(adapter_id=a, prompt_tokens=prompt, n=2, max_tokens=4))
                    for a in trained
                )
            )
            for adapter, reply in zip(trained, samples, strict=True):
                assert isinstance(reply, wire.SampleResult), reply
                sampled[adapter] += sum(len(seq.tokens) // 4 for seq in reply.sequences)
            # Submitted together, so the scheduler packs both adapters into one training slice.
            batches = {a: [datum(6 + step, i), datum(9, 7 * i)] for i, a in enumerate(trained)}
            replies = await asyncio.gather(
                *(call(engine, metrics, wire.ForwardBackward(adapter_id=a, datums=d)) for a, d in batches.items())
            )
            for adapter, reply in zip(trained, replies, strict=True):
                assert isinstance(reply, wire.ForwardBackwardResult), reply
                trained[adapter] += sum(len(d.input_tokens) // 4 for d in batches[adapter])
            steps = await asyncio.gather(*(call(engine, metrics, wire.OptimStep(adapter_id=a)) for a in trained))
            assert all(isinstance(r, wire.OptimStepResult) and r.version == step + 1 for r in steps), steps
        missing = await call(engine, metrics, wire.ForwardBackward(adapter_id="ghost", datums=[datum(4, 0)]))
        assert isinstance(missing, wire.Error) and missing.code == "unknown_adapter"
        load = metrics.adapter_load(engine.scheduler, ["a", "b"])
        assert "ghost" in metrics.adapter_load() and "ghost" not in load

        samples = await asyncio.to_thread(scrape, port)
        for adapter in trained:
            assert value(samples, "hotlora_trained_tokens_total", adapter=adapter) == trained[adapter]
            assert value(samples, "hotlora_sampled_tokens_total", adapter=adapter) == sampled[adapter] > 0
            assert value(samples, "hotlora_optim_steps_total", adapter=adapter) == STEPS
            assert value(samples, "hotlora_adapter_version", adapter=adapter) == STEPS
            assert value(samples, "hotlora_version_lag", adapter=adapter) == 0  # sample, train, step: on-policy
            for kind in ("sample", "forward_backward", "optim_step"):
                assert value(samples, "hotlora_requests_total", adapter=adapter, type=kind, code="ok") == STEPS
                assert value(samples, "hotlora_request_latency_seconds_count", adapter=adapter, type=kind) == STEPS
                assert value(samples, "hotlora_queue_wait_seconds_count", adapter=adapter, type=kind) == STEPS
            assert load[adapter].version == STEPS and load[adapter].trained_tokens == trained[adapter]
            assert load[adapter].queued == load[adapter].running == 0
        assert value(samples, "hotlora_errors_total", adapter="ghost", code="unknown_adapter") == 1
        ghost = {"adapter": "ghost", "type": "forward_backward", "code": "unknown_adapter"}
        assert value(samples, "hotlora_requests_total", **ghost) == 1
        for kind in ("train", "decode"):
            count = value(samples, "hotlora_micro_batch_rows_count", kind=kind)
            assert count > 0, kind
            assert value(samples, "hotlora_slice_seconds_count", kind=kind) > 0
            # Both adapters shared a micro-batch (max 2 adapters): some observations above 1, none above 2.
            assert value(samples, "hotlora_micro_batch_adapters_bucket", kind=kind, le="1.0") < count, kind
            assert value(samples, "hotlora_micro_batch_adapters_bucket", kind=kind, le="2.0") == count, kind
        assert value(samples, "hotlora_slice_seconds_count", kind="barrier") >= 2 + 2 * STEPS
        assert value(samples, "hotlora_resident_adapters") == 2
        assert value(samples, "hotlora_offloaded_adapters") == 0

        assert isinstance(await call(engine, metrics, wire.DeleteAdapter(adapter_id="b")), wire.DeleteAdapterResult)
        after = await asyncio.to_thread(scrape, port)
        assert not [key for key in after if ("adapter", "b") in key[1]], "a deleted adapter's series must go"
        assert "b" not in metrics.adapter_load(engine.scheduler)
        metrics.adopt("b", 7)  # moved back in from another engine: a fresh lineage at its snapshot's version
        assert metrics.adapter_load(engine.scheduler, ["a", "b"])["b"].version == 7


def _reply_for(message: wire.RequestMessage, **fields: object) -> wire.ResultMessage:
    envelope = {"request_id": message.request_id, "adapter_id": message.adapter_id, "received_at_ms": 1000}
    result_type = wire.RESULT_FOR[type(message)]
    return result_type(**envelope, finished_at_ms=1250, **fields)  # type: ignore[arg-type]


def sampled(adapter: str, version: int) -> tuple[wire.Sample, wire.ResultMessage]:
    message = wire.Sample(adapter_id=adapter, prompt_tokens=pack_i32([1]))
    sequence = wire.SampledSequence(
        tokens=pack_i32([4, 5]), logprobs=b"\0" * 8, stop_reason="length", adapter_version=version
    )
    return message, _reply_for(message, sequences=[sequence], adapter_version=version)


def stepped(adapter: str, version: int) -> tuple[wire.OptimStep, wire.ResultMessage]:
    message = wire.OptimStep(adapter_id=adapter)
    return message, _reply_for(message, version=version, grad_norm=1.0)


def test_version_lag_counts_steps_behind_the_newest_sample() -> None:
    """An off-policy pipeline: two steps on one batch of samples leave the second step one version behind."""
    metrics = EngineMetrics()
    metrics.observe_request(*sampled("a", 0))
    metrics.observe_request(*stepped("a", 1))
    assert metrics.adapter_load()["a"].version_lag == 0
    metrics.observe_request(*stepped("a", 2))
    metrics.observe_request(*stepped("a", 3))
    load = metrics.adapter_load()["a"]
    assert (load.version, load.version_lag, load.optim_steps, load.sampled_tokens) == (3, 2, 3, 2)
    metrics.observe_request(*sampled("a", 3))
    metrics.observe_request(*stepped("a", 4))
    assert metrics.adapter_load()["a"].version_lag == 0


def test_latency_comes_from_the_reply_and_tokens_per_s_from_successive_loads() -> None:
    metrics = EngineMetrics()
    metrics.observe_request(*sampled("a", 0))
    first = metrics.adapter_load(now=10.0)["a"]
    assert first.tokens_per_s == 0.0  # no earlier heartbeat to measure against
    metrics.observe_request(*sampled("a", 0))
    metrics.observe_request(*sampled("a", 0))
    assert metrics.adapter_load(now=12.0)["a"].tokens_per_s == pytest.approx(2.0)  # 4 tokens in 2 s
    latency = metrics.registry.get_sample_value(
        "hotlora_request_latency_seconds_sum", {"adapter": "a", "type": "sample"}
    )
    assert latency == pytest.approx(3 * 0.25)
    # No engine step stamped these requests, so no queue wait was observed.
    waits = metrics.registry.get_sample_value("hotlora_queue_wait_seconds_count", {"adapter": "a", "type": "sample"})
    assert waits is None


def test_metrics_of_two_engines_do_not_collide() -> None:
    first, second = EngineMetrics(), EngineMetrics()
    first.set_consumer_lag("p.rollout", 5)
    second.set_consumer_lag("p.rollout", 7)
    assert first.registry.get_sample_value("hotlora_consumer_lag_records", {"topic": "p.rollout"}) == 5
    assert second.registry.get_sample_value("hotlora_consumer_lag_records", {"topic": "p.rollout"}) == 7


def test_engine_service_serves_metrics_while_two_adapters_train_over_kafka(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    """The deployed path: ``--metrics-port 0`` on the engine service, two agents' adapters trained over
    the broker, the endpoint scraped while the engine runs; the counters equal the work the agents did."""
    from hotlora.agents import HotLoraClient
    from hotlora.engine.types import AdamParams, Datum, LoraSpec
    from tests.helpers import running_engine_service, service_config_for_tests

    config = service_config_for_tests(
        broker.bootstrap, topic_prefix, tiny_model_path, tmp_path / "ckpt", metrics_port=0
    )

    async def agent(client: HotLoraClient, adapter_id: str) -> int:
        await client.create_adapter(adapter_id, LoraSpec(rank=4, seed=1))
        trained = 0
        for step in range(STEPS):
            datums = [Datum.from_sequence([1, *range(10 + step, 20 + step + i)], 1) for i in range(2)]
            trained += sum(len(d.input_tokens) for d in datums)
            await client.forward_backward(adapter_id, datums)
            await client.optim_step(adapter_id, AdamParams(learning_rate=1e-2))
        return trained

    async def main() -> None:
        async with (
            running_engine_service(config) as service,
            HotLoraClient(broker.bootstrap, topic_prefix=topic_prefix, request_timeout=30) as client,
        ):
            trained = await asyncio.gather(agent(client, "m-a"), agent(client, "m-b"))
            assert service.metrics_port
            samples = await asyncio.to_thread(scrape, service.metrics_port)
        for adapter_id, tokens in zip(("m-a", "m-b"), trained, strict=True):
            assert value(samples, "hotlora_optim_steps_total", adapter=adapter_id) == STEPS
            assert value(samples, "hotlora_trained_tokens_total", adapter=adapter_id) == tokens
            done = value(samples, "hotlora_requests_total", adapter=adapter_id, type="optim_step", code="ok")
            assert done == STEPS
            assert value(samples, "hotlora_adapter_version", adapter=adapter_id) == STEPS
        assert value(samples, "hotlora_micro_batch_rows_count", kind="train") > 0

    asyncio.run(main())


def test_per_tenant_queue_rows_throttling_and_row_steps() -> None:
    metrics = EngineMetrics()
    value = metrics.registry.get_sample_value
    scheduler = Scheduler()
    for k in range(3):
        scheduler.submit(WorkItem(f"s{k}", "hog", WorkKind.SAMPLE, tokens=10, rows=4))
    metrics.observe_tenants(scheduler, {"hog": (6, 10), "small": (2, 0)}, {"hog": (60, 20), "small": (4, 4)})
    assert value("hotlora_queue_depth", {"adapter": "hog"}) == 3
    assert value("hotlora_decode_rows", {"adapter": "hog"}) == 6
    assert value("hotlora_paused_rows", {"adapter": "hog"}) == 10
    assert value("hotlora_decode_rows", {"adapter": "small"}) == 2
    metrics.observe_tenants(scheduler, {"hog": (8, 0)}, {"hog": (68, 20), "small": (4, 4)})
    assert value("hotlora_decode_row_steps_total", {"adapter": "hog"}) == 68  # counters take what grew
    assert value("hotlora_shared_decode_row_steps_total", {"adapter": "hog"}) == 20
    assert value("hotlora_decode_rows", {"adapter": "small"}) is None  # gone from the batch and the queue
    assert value("hotlora_paused_rows", {"adapter": "hog"}) == 0
    load = metrics.adapter_load(scheduler, ["hog"])["hog"]
    assert (load.rows, load.paused_rows, load.queued) == (8, 0, 3)
    metrics.forget("hog")
    assert value("hotlora_decode_rows", {"adapter": "hog"}) is None
    assert value("hotlora_decode_row_steps_total", {"adapter": "hog"}) is None
