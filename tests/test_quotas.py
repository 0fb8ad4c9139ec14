"""Per-principal quotas (engine.kafka.quotas): each refuses with ``quota_exceeded`` and changes nothing else.

The bookkeeping is tested on its own (pure); then one engine service, with small quotas, shows every
refusal over Kafka: the refused request takes its seq (the next one is not held for it), the owner's
adapter and every other principal go on untouched, and the refusals show in the metrics.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.engine.kafka.quotas import QuotaLimits, Quotas
from hotlora.engine.kafka.service_config import from_sources
from hotlora.schemas import messages as wire
from hotlora.schemas.arrays import pack_i32
from hotlora.schemas.errors import ERROR_CODES, QuotaExceeded
from tests.helpers import Tenant, service_config_for_tests

ALICE = {"principal": "alice", "token": "tok-alice"}
BOB = {"principal": "bob", "token": "tok-bob"}


def _sample(adapter_id: str, n: int = 1, request_id: str | None = None, **who: str) -> wire.Sample:
    extra = {} if request_id is None else {"request_id": request_id}
    return wire.Sample(adapter_id=adapter_id, prompt_tokens=pack_i32([1, 2, 3]), n=n, max_tokens=4, **who, **extra)


def _datum(length: int) -> wire.Datum:
    tokens = [3 + (i % 50) for i in range(length + 1)]
    return wire.Datum(input_tokens=pack_i32(tokens[:-1]), target_tokens=pack_i32(tokens[1:]))


def test_each_quota_refuses_and_counts_nothing() -> None:
    limits = QuotaLimits(
        adapters_per_principal=2,
        queued_per_adapter=1,
        queued_per_principal=3,
        queued_bytes_per_principal=1000,
        sample_rows_per_principal=6,
        forward_backward_tokens=100,
    )
    quotas = Quotas(limits)

    def refused(message: wire.RequestMessage, size: int = 10, owned: int | None = None) -> str:
        before = (quotas.usage(message.principal), quotas.queued_on(message.adapter_id))
        with pytest.raises(QuotaExceeded) as info:
            quotas.admit(message, size, owned)
        assert (quotas.usage(message.principal), quotas.queued_on(message.adapter_id)) == before  # nothing counted
        assert info.value.code == "quota_exceeded" and info.value.quota in info.value.message
        return info.value.quota

    assert refused(wire.CreateAdapter(adapter_id="x", **ALICE), owned=2) == "adapters_per_principal"
    quotas.admit(wire.CreateAdapter(adapter_id="x", **ALICE), 10, owned=1)
    quotas.admit(_sample("a", 4, "s1", **ALICE), 10)
    assert refused(_sample("b", 3, **ALICE)) == "sample_rows_per_principal"  # 4 + 3 > 6
    assert refused(_sample("a", 1, **ALICE)) == "queued_per_adapter"  # a holds s1
    quotas.admit(_sample("b", 1, "s2", **ALICE), 10)
    assert refused(_sample("c", 1, **ALICE)) == "queued_per_principal"  # create x, s1, s2 queued: 3
    assert refused(_sample("c", 1, **BOB), size=1001) == "queued_bytes_per_principal"
    big = wire.ForwardBackward(adapter_id="c", datums=[_datum(51), _datum(10)], **BOB)  # 2 x 51 padded
    assert refused(big) == "forward_backward_tokens"
    quotas.admit(_sample("c", 6, "s3", **BOB), 10)  # bob's own quotas: alice's use does not count
    assert quotas.usage("alice") == {"queued": 3, "bytes": 30, "rows": 5}
    quotas.release("s1")
    quotas.release("s1")  # idempotent
    assert quotas.usage("alice") == {"queued": 2, "bytes": 20, "rows": 1}
    quotas.admit(_sample("a", 5, "s4", **ALICE), 10)  # room again
    assert quotas.refusals["alice", "queued_per_adapter"] == 1 and sum(quotas.refusals.values()) == 6
    assert ERROR_CODES["quota_exceeded"] is QuotaExceeded
    wide = Quotas(QuotaLimits(sample_rows_per_principal=4), max_request_rows=8)
    wide.admit(_sample("a", 9, "too-wide"), 10)  # wider than the decode batch: the engine's invalid_request
    assert wide.usage("") == {"queued": 1, "bytes": 10, "rows": 0}
    off = Quotas(QuotaLimits(0, 0, 0, 0, 0, 0))  # 0 switches every quota off
    for k in range(50):
        off.admit(_sample("a", 64, f"r{k}"), 1 << 30, owned=10_000)
    with pytest.raises(ValueError, match="quota"):
        QuotaLimits(adapters_per_principal=-1)


def test_quota_flags_and_environment() -> None:
    config = from_sources(None, {"HOTLORA_QUOTA_ADAPTERS": "3", "HOTLORA_QUOTA_SAMPLE_ROWS": "0"})
    assert config.quota_adapters == 3 and config.quota_sample_rows == 0
    defaults = from_sources(None, {})
    assert 0 < defaults.quota_adapters < 256 and defaults.quota_queued_per_adapter > 0  # safe defaults: on


def test_quotas_refuse_over_kafka_and_leave_every_other_state_untouched(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    config = service_config_for_tests(
        broker.bootstrap,
        topic_prefix,
        tiny_model_path,
        tmp_path / "ckpt",
        metrics_port=0,
        seq_gap_timeout=600.0,  # a refusal that did not take its seq would hold the next request past WAIT_S
        quota_adapters=2,
        quota_sample_rows=4,
        quota_forward_backward_tokens=64,
        quota_queued_bytes=4096,
        quota_queued_per_adapter=1,
    )

    async def body() -> None:
        async with Tenant(config, f"{topic_prefix}.replies") as agent:
            service = agent.service
            assert service is not None

            def env(adapter_id: str, seq: int, who: dict[str, str]) -> dict[str, Any]:
                return {**agent.envelope(adapter_id, seq), **who}

            async def ok(message: wire.Message) -> Any:
                reply = await agent.call(message)
                assert not isinstance(reply, wire.Error), reply
                return reply

            async def refused(message: wire.Message) -> wire.Error:
                reply = await agent.call(message)
                assert isinstance(reply, wire.Error) and reply.code == "quota_exceeded", reply
                return reply

            # Adapters per principal: alice's third create is refused; bob creates his at once.
            await ok(wire.CreateAdapter(rank=4, **env("a1", 1, ALICE)))
            await ok(wire.CreateAdapter(rank=4, **env("a2", 1, ALICE)))
            await refused(wire.CreateAdapter(rank=4, **env("a3", 1, ALICE)))
            await ok(wire.CreateAdapter(rank=4, **env("b1", 1, BOB)))
            listed = await ok(wire.ListAdapters(**agent.envelope()))
            assert sorted(a.adapter_id for a in listed.adapters) == ["a1", "a2", "b1"]
            assert "a3" not in service.owners.registry  # no claim was left behind
            await ok(wire.CreateAdapter(rank=4, **env("a3", 1, BOB)))  # the id is free for anyone

            # Rows, tokens and bytes: each refused request takes its seq; the next seq runs at once.
            await refused(wire.Sample(prompt_tokens=pack_i32([1, 2, 3]), n=5, max_tokens=4, **env("a1", 2, ALICE)))
            await refused(wire.ForwardBackward(datums=[_datum(40), _datum(40)], **env("a1", 3, ALICE)))
            await refused(
                wire.Sample(prompt_tokens=pack_i32(list(range(3, 1203))), max_tokens=4, **env("a1", 4, ALICE))
            )
            sampled = await ok(wire.Sample(prompt_tokens=pack_i32([1, 2, 3]), n=4, max_tokens=4, **env("a1", 5, ALICE)))
            assert sampled.adapter_version == 0 and len(sampled.sequences) == 4
            await ok(wire.ForwardBackward(datums=[_datum(8)], **env("a1", 6, ALICE)))
            stepped = await ok(wire.OptimStep(learning_rate=1e-2, **env("a1", 7, ALICE)))
            assert stepped.version == 1  # the refused forward_backward never reached the adapter

            # Requests queued per adapter: seq 3 arrives first and is held for seq 2; both are released
            # together, so seq 2 is in flight when seq 3 is checked, on any machine. Another adapter goes on.
            second = wire.Sample(prompt_tokens=pack_i32([1, 2]), max_tokens=2, **env("a2", 3, ALICE))
            await agent.send(second)
            await agent.until("seq 3 held for seq 2", lambda: service.held_requests == 1)
            first = wire.Sample(prompt_tokens=pack_i32([1, 2, 3]), max_tokens=16, **env("a2", 2, ALICE))
            await agent.send(first)
            reply = await agent.reply(second.request_id)
            assert isinstance(reply, wire.Error) and reply.code == "quota_exceeded", reply
            assert not isinstance(await agent.reply(first.request_id), wire.Error)
            await ok(wire.Sample(prompt_tokens=pack_i32([1, 2]), max_tokens=2, **env("b1", 2, BOB)))
            await ok(wire.Sample(prompt_tokens=pack_i32([1, 2]), max_tokens=2, **env("a2", 4, ALICE)))

            assert service.metrics is not None
            value = service.metrics.registry.get_sample_value
            assert value("hotlora_quota_refusals_total", {"principal": "alice", "quota": "adapters_per_principal"}) == 1
            for quota in ("sample_rows_per_principal", "forward_backward_tokens", "queued_bytes_per_principal"):
                assert value("hotlora_quota_refusals_total", {"principal": "alice", "quota": quota}) == 1
            assert value("hotlora_quota_refusals_total", {"principal": "alice", "quota": "queued_per_adapter"}) == 1
            bob = {"principal": "bob", "quota": "adapters_per_principal"}
            assert value("hotlora_quota_refusals_total", bob) is None
            load = service.metrics.adapter_load(service.engine.scheduler if service.engine else None, ["a1"])
            assert load["a1"].quota_refusals == 3
            assert service.quotas.usage("alice") == {"queued": 0, "bytes": 0, "rows": 0}  # all answered, all freed

    asyncio.run(asyncio.wait_for(body(), 300))
