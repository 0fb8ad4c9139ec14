"""Fast start and immediate readiness (issue 17): an engine process is known to serve at once, over Kafka
(``wait_for_engine``) and without it (``GET /ready``); ``hotlora bench startup`` runs and reports.

Bounds are generous and relative to the engine's own ``engine_running`` log line, never the machine's
speed: before the fix, readiness came on a periodic heartbeat that a reader of partition 0 saw with
probability 1/4 each 5 s, so 15-50 s after ``engine_running``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry, Counter, make_wsgi_app

from hotlora.agents.readiness import wait_for_engine
from hotlora.engine.kafka.admin import create_topics, list_topics
from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.engine.kafka.service import EngineService
from hotlora.engine.kafka.service_config import ServiceConfig
from hotlora.engine.probe import probe_app
from hotlora.gateway.launch import engine_status
from hotlora.schemas import EngineStatus, Topics, encode
from tests.helpers import engine_env, running_engine_service, service_config_for_tests

READINESS_BOUND_S = 1.5  # after engine_running; measured ~0.01-0.05 s
START_TIMEOUT_S = 120.0


def call(app: Any, path: str) -> tuple[str, bytes]:
    """One WSGI request to ``app``: (status line, body)."""
    got: dict[str, str] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        got["status"] = status

    environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "QUERY_STRING": "", "wsgi.url_scheme": "http"}
    body = b"".join(app(environ, start_response))
    return got["status"], body


def test_the_kafka_edge_and_agents_import_without_torch_so_the_group_join_overlaps_it() -> None:
    """``hotlora engine`` joins its consumer group while torch and transformers import on the loading
    thread; that only works while the edge itself (and what ``hotlora engine`` imports before it) does not
    pull them in. Agents embedded in a service get the same light import. A fresh interpreter, since this
    one has torch already."""
    code = (
        "import sys\n"
        "import hotlora.agents, hotlora.cli, hotlora.engine.kafka.service, hotlora.engine.kafka.service_config\n"
        "hotlora.cli.build_parser(['engine']).parse_args(['engine'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'safetensors') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "", f"the edge imported {done.stdout.strip()}"


def test_ready_is_200_only_while_running_and_live_always() -> None:
    registry = CollectorRegistry()
    Counter("probe_test_total", "a counter the metrics path must still serve", registry=registry).inc()
    state = {"now": "starting"}
    app = probe_app(make_wsgi_app(registry), lambda: state["now"])
    for now, ready in (("starting", "503"), ("running", "200"), ("draining", "503"), ("stopped", "503")):
        state["now"] = now
        status, body = call(app, "/ready")
        assert status.startswith(ready) and body == f"{now}\n".encode(), (now, status, body)
        status, body = call(app, "/live")
        assert status.startswith("200") and body == f"{now}\n".encode()
    status, body = call(app, "/metrics")
    assert status.startswith("200") and b"probe_test_total 1.0" in body


def get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_ready_probe_of_a_serving_engine_service(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    config = service_config_for_tests(broker.bootstrap, topic_prefix, tiny_model_path, tmp_path, metrics_port=0)
    asyncio.run(probe_while_serving(config))


async def probe_while_serving(config: ServiceConfig) -> None:
    async with running_engine_service(config) as service:
        assert service.metrics_port
        assert await asyncio.to_thread(get, service.metrics_port, "/ready") == 200
        assert await asyncio.to_thread(get, service.metrics_port, "/live") == 200
        service.state = "draining"  # what shutdown sets first: an orchestrator must stop sending work
        assert await asyncio.to_thread(get, service.metrics_port, "/ready") == 503
        service.state = "running"


def test_waiting_for_an_engine_that_never_comes_times_out_and_creates_no_topic(
    broker: EmbeddedBroker, topic_prefix: str
) -> None:
    """The waiter may start first; it must not create the metrics topic (with the broker's partition
    count) by asking for its metadata, and it fails with ``TimeoutError``, not a hang."""

    async def main() -> list[str]:
        with pytest.raises(TimeoutError):
            await wait_for_engine(broker.bootstrap, topic_prefix, timeout=1.0)
        with pytest.raises(TimeoutError):  # the gateway's wait for the engine's status, likewise
            await engine_status(broker.bootstrap, topic_prefix, timeout=1.0)
        return await list_topics(broker.bootstrap, topic_prefix)

    assert asyncio.run(main()) == []


def test_waiter_takes_only_running_of_the_engine_asked_for_and_since_the_time_given(
    broker: EmbeddedBroker, topic_prefix: str
) -> None:
    """Announcements published by hand: ``starting``, another engine's ``running`` and one older than
    ``since_ms`` are passed over; the matching ``running`` is returned, from whichever partition."""
    topic = Topics(topic_prefix).metrics

    def status(engine_id: str, state: str) -> bytes:
        return encode(EngineStatus(engine_id=engine_id, model="m", state=state))

    async def main() -> None:
        await create_topics(broker.bootstrap, [topic], 4)
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
        await producer.start()
        try:
            now = int(time.time() * 1000)
            await producer.send_and_wait(topic, status("e1", "running"), partition=0, timestamp_ms=now - 60_000)
            await producer.send_and_wait(topic, status("e1", "starting"), partition=1)
            await producer.send_and_wait(topic, status("e2", "running"), partition=2)
            with pytest.raises(TimeoutError):
                await wait_for_engine(broker.bootstrap, topic_prefix, timeout=1.0, engine_id="e1", since_ms=now)
            old = await wait_for_engine(broker.bootstrap, topic_prefix, timeout=30, engine_id="e1")
            assert (old.engine_id, old.state) == ("e1", "running")  # without since_ms, the old one counts
            await producer.send_and_wait(topic, status("e1", "running"), partition=3)
            found = await wait_for_engine(broker.bootstrap, topic_prefix, timeout=30, engine_id="e1", since_ms=now)
            assert (found.engine_id, found.state) == ("e1", "running")
        finally:
            await producer.stop()

    asyncio.run(main())


def log_time(line: bytes) -> tuple[str, float] | None:
    try:
        event = json.loads(line)
        return event["event"], dt.datetime.fromisoformat(event["timestamp"]).timestamp()
    except (ValueError, KeyError, TypeError):
        return None


def test_readiness_is_seen_right_after_engine_running(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    """A spawned ``hotlora engine``: ``wait_for_engine`` (started before the metrics topic exists) returns
    within ``READINESS_BOUND_S`` of the engine's ``engine_running`` log line, with that engine's id."""
    asyncio.run(readiness_after_running(broker, topic_prefix, tiny_model_path, tmp_path))


async def readiness_after_running(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    env = engine_env(
        broker.bootstrap, topic_prefix, tiny_model_path, tmp_path, device="cpu", dtype="float32", engine_id="ready-test"
    )
    ready = asyncio.create_task(wait_for_engine(broker.bootstrap, topic_prefix, START_TIMEOUT_S))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hotlora.cli", "engine", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    events: dict[str, float] = {}
    lines: list[bytes] = []

    async def read() -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            lines.append(line)
            if (found := log_time(line)) is not None:
                events.setdefault(*found)

    reader = asyncio.create_task(read())
    try:
        exited = asyncio.create_task(process.wait())
        done, _ = await asyncio.wait({ready, exited}, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        assert ready in done, f"no readiness in time (engine exit {process.returncode}): {b''.join(lines[-20:])!r}"
        seen = dt.datetime.now(dt.timezone.utc).timestamp()
        announcement = ready.result()
        assert announcement.engine_id == "ready-test" and announcement.state == "running"
        async with asyncio.timeout(30):  # the log line is written before the announcement is sent
            while "engine_running" not in events:
                await asyncio.sleep(0.05)
        lag = seen - events["engine_running"]
        assert -0.5 < lag <= READINESS_BOUND_S, f"readiness seen {lag:.3f} s after engine_running"
        for earlier in ("engine_starting", "model_loaded", "group_joined", "partitions_assigned"):
            assert events[earlier] <= events["engine_running"], (earlier, events)
    finally:
        ready.cancel()
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 60)
            except TimeoutError:
                process.kill()
                await process.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reader, 10)
        with contextlib.suppress(asyncio.CancelledError):
            await ready
    assert process.returncode == 0, b"".join(lines[-20:])


def test_bench_startup_one_spawn_reports_every_phase_and_recovers(tmp_path: Path) -> None:
    """``hotlora bench startup --spawns 1 --json --no-docs``: every phase in order, and the adapter created
    before the kill -9 answered by the restarted engine (the bench fails if it is not)."""
    argv = ["bench", "startup", "--spawns", "1", "--json", "--no-docs", "--timeout", "120"]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "hotlora.cli", *argv], capture_output=True, cwd=tmp_path, timeout=400, check=False
        )
    except subprocess.TimeoutExpired as err:  # run() kills and reaps the child before raising
        raise AssertionError(f"bench startup ran over 400 s: {(err.stderr or b'')[-3000:]!r}") from None
    out, err = done.stdout, done.stderr
    assert done.returncode == 0, err.decode()[-3000:]
    result = json.loads(out)
    startup = result["startup_s"]
    assert list(startup) == [
        "edge_imported", "group_joined", "imports_done", "model_loaded", "engine_running", "readiness_seen",
        "first_answer",
    ]  # fmt: skip
    assert 0 < startup["edge_imported"] <= startup["imports_done"] <= startup["model_loaded"]
    assert startup["model_loaded"] <= startup["engine_running"]
    assert startup["edge_imported"] <= startup["group_joined"] <= startup["engine_running"] <= startup["readiness_seen"]
    assert startup["first_answer"] >= startup["group_joined"]
    recovery = result["recovery_s"]
    assert 0 <= recovery["restarted"] < recovery["engine_running"] < recovery["first_answer"]
    assert result["spawns"] == 1 and len(result["runs"]) == 1
    assert set(result["verdicts"]) == {"engine_running", "readiness_after_running", "recovery_first_answer"}


def test_an_engine_loading_past_the_session_timeout_keeps_its_share_and_never_doubles_an_owner(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two engines start together on an empty group, so both join while their models load; one load
    outlasts the session timeout. The slow engine must keep its membership (its assignment callback
    returns at once and it adopts once loaded), so when it serves, the two own disjoint partitions.
    (Waiting in the callback stalled its heartbeats: the group evicted it and gave everything to the
    other engine while it still adopted its old share, and two engines served one adapter.)"""
    base = service_config_for_tests(broker.bootstrap, topic_prefix, tiny_model_path, tmp_path / "ckpt")
    configs = {name: dataclasses.replace(base, engine_id=name) for name in ("fast", "slow")}
    session_s = base.session_timeout_ms / 1000
    load_engine = EngineService._load_engine

    def load(service: EngineService) -> Any:
        if service.config.engine_id == "slow":
            time.sleep(3 * session_s)  # on the loading thread, as a slow import or a big model would
        return load_engine(service)

    monkeypatch.setattr(EngineService, "_load_engine", load)

    async def main() -> None:
        services = {name: EngineService(config) for name, config in configs.items()}
        runs = [asyncio.create_task(service.run()) for service in services.values()]
        try:
            for service in services.values():
                await asyncio.wait_for(service.ready.wait(), 90)
            fast, slow = services["fast"], services["slow"]
            assert fast.handover is not None and slow.handover is not None
            owned = fast.handover.owned or set(), slow.handover.owned or set()
            assert not owned[0] & owned[1], f"both engines own {owned[0] & owned[1]}"
            assert owned[0] | owned[1] == set(range(base.partitions)) and all(owned), owned
        finally:
            for service in services.values():
                service.request_stop()
            await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), 90)

    asyncio.run(asyncio.wait_for(main(), 240))
