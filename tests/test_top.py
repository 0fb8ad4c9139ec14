"""``hotlora top``: the fold of metrics-topic events into a table, and ``--once`` against a real broker."""

from __future__ import annotations

import argparse
import asyncio
import io

import pytest
from aiokafka import AIOKafkaProducer
from rich.console import Console

from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.schemas import AdapterLoad, EngineStatus, Heartbeat, Message, Metrics, Topics, encode, key_for, now_ms
from hotlora.top import TopState, add_arguments, render, run_top

NOW = 1_700_000_000_000


def heartbeat(engine: str, at: int, **load: AdapterLoad) -> Heartbeat:
    return Heartbeat(engine_id=engine, sent_at_ms=at, adapters=sorted(load), load=load, resident_slots=4)


def metrics(adapter: str, at: int, step: int, reward: float | None) -> Metrics:
    return Metrics(
        adapter_id=adapter, sent_at_ms=at, experiment=f"exp-{adapter}", task="sort", step=step, reward_mean=reward
    )


def folded(*messages: Message) -> TopState:
    state = TopState()
    for message in messages:
        state.fold(message)
    return state


def text_of(state: TopState, now: int = NOW, stale_s: float = 15.0) -> str:
    console = Console(file=io.StringIO(), width=200)
    console.print(render(state, now, stale_s))
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_fold_joins_engine_load_and_agent_metrics() -> None:
    state = folded(
        heartbeat("e1", NOW - 9000, a=AdapterLoad(queued=1, version=2)),
        heartbeat("e1", NOW - 1000, a=AdapterLoad(queued=3, tokens_per_s=120.0, version=5, version_lag=1)),
        heartbeat("e1", NOW - 5000, a=AdapterLoad(queued=9)),  # older, arrived late (another partition)
        metrics("a", NOW - 3000, step=4, reward=0.25),
        metrics("a", NOW - 2000, step=5, reward=None),  # an eval-only step keeps the last reward
    )
    [row] = state.rows(NOW, stale_s=15)
    assert (row.adapter_id, row.engine_id, row.step, row.reward, row.experiment) == ("a", "e1", 5, 0.25, "exp-a")
    assert row.load is not None and (row.load.queued, row.load.version, row.load.version_lag) == (3, 5, 1)


def test_stale_and_stopped_engines_drop_out() -> None:
    state = folded(
        heartbeat("live", NOW - 1000, a=AdapterLoad()),
        heartbeat("stale", NOW - 60_000, b=AdapterLoad()),
        heartbeat("stopped", NOW - 2000, c=AdapterLoad()),
        EngineStatus(engine_id="stopped", model="m", state="stopped", sent_at_ms=NOW - 1500),
        heartbeat("restarted", NOW - 500, d=AdapterLoad()),
        EngineStatus(engine_id="restarted", model="m", state="stopped", sent_at_ms=NOW - 4000),  # before the restart
        metrics("e", NOW - 60_000, step=1, reward=0.5),  # an agent long silent, on no live engine
    )
    assert [h.engine_id for h in state.live_engines(NOW, 15)] == ["live", "restarted"]
    assert [row.adapter_id for row in state.rows(NOW, 15)] == ["a", "d"]


def test_adapter_on_two_engines_belongs_to_the_newer_heartbeat_and_agents_without_engine_show() -> None:
    state = folded(
        heartbeat("old-owner", NOW - 3000, a=AdapterLoad(version=1)),
        heartbeat("new-owner", NOW - 1000, a=AdapterLoad(version=2)),
        metrics("waiting", NOW - 1000, step=0, reward=None),
    )
    rows = {row.adapter_id: row for row in state.rows(NOW, 15)}
    assert rows["a"].engine_id == "new-owner"
    assert rows["waiting"].engine_id is None and rows["waiting"].load is None


def test_render_shows_every_column() -> None:
    state = folded(
        heartbeat("e1", NOW - 1000, a=AdapterLoad(queued=3, running=1, tokens_per_s=1234.4, version=7, version_lag=2)),
        metrics("a", NOW - 1000, step=7, reward=0.875),
    )
    text = text_of(state)
    assert "1 live engine, 1 adapters" in text
    for cell in ("e1", "1234", "0.875", "exp-a", "0/4 resident"):
        assert cell in text, cell
    assert "no live" not in text_of(TopState())  # an empty deployment renders an empty table
    throttled = folded(heartbeat("e1", NOW - 1000, a=AdapterLoad(rows=48, paused_rows=173, quota_refusals=29)))
    text = text_of(throttled)
    for column in ("rows", "paused", "refused"):
        assert column in text, column
    for cell in ("48", "173", "29"):  # decode rows held, paused (throttled), quota_exceeded refusals
        assert cell in text, cell
    assert "0 live engines, 0 adapters" in text_of(TopState())


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


async def publish(bootstrap: str, topic: str, messages: list[Message]) -> None:
    """As engines (heartbeats, status: no key) and agents (metrics: keyed by adapter) publish them."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for message in messages:
            await producer.send_and_wait(topic, encode(message), key=key_for(message))
    finally:
        await producer.stop()


def test_once_lists_every_live_adapter(
    broker: EmbeddedBroker, topic_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two engines and their agents publish as they would; a stopped engine's adapter is left out."""
    now = now_ms()
    live = {"e1": ["sort-1", "sort-2"], "e2": ["fmt-1"]}
    messages: list[Message] = []
    for engine, adapters in live.items():
        load = {
            a: AdapterLoad(queued=i, tokens_per_s=100.0 + i, version=3, version_lag=0) for i, a in enumerate(adapters)
        }
        messages.append(heartbeat(engine, now - 500, **load))
        messages += [metrics(a, now - 400, step=3, reward=0.5) for a in adapters]
    messages.append(heartbeat("gone", now - 800, **{"old-1": AdapterLoad()}))
    messages.append(EngineStatus(engine_id="gone", model="m", state="stopped", sent_at_ms=now - 700))
    asyncio.run(publish(broker.bootstrap, Topics(topic_prefix).metrics, messages))

    assert (
        run_top(parse("--bootstrap", broker.bootstrap, "--topic-prefix", topic_prefix, "--once", "--window", "20")) == 0
    )
    out = capsys.readouterr().out
    assert "2 live engines, 3 adapters" in out, out
    for engine, adapters in live.items():
        for adapter in adapters:
            line = next(line for line in out.splitlines() if adapter in line)
            assert engine in line and "0.500" in line and "exp-" in line, line
    assert "old-1" not in out
