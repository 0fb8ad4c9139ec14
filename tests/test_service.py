"""The engine service against a real Kafka-wire broker: an agent's view, raw aiokafka plus the schemas.

Every wait is bounded and fails loudly; readiness and progress are awaited as events on the topics
(``engine_status``, results, committed offsets), never slept on.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka import TopicPartition

from hotlora import cli
from hotlora.engine.digest import directory_sha256
from hotlora.engine.kafka.admin import list_topics
from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.engine.kafka.durability import DurableStore
from hotlora.engine.kafka.sequencing import OffsetTracker, ResultCache, Sequencer
from hotlora.engine.kafka.service_config import from_sources
from hotlora.schemas import (
    CheckpointEvent,
    CreateAdapter,
    Datum,
    EngineStatus,
    Error,
    ForwardBackward,
    Heartbeat,
    ListAdapters,
    OptimStep,
    Sample,
    SaveState,
    Topics,
    pack_i32,
)
from tests.helpers import WAIT_S, Tenant, service_config_for_tests

pytestmark = pytest.mark.timeout(240)
REPO = Path(__file__).resolve().parents[1]


# ----- the pure bookkeeping -----


def test_sequencer_orders_holds_and_skips_gaps() -> None:
    seq: Sequencer[str] = Sequencer(gap_timeout=5.0)
    assert seq.offer("a", 3, "a3", now=0.0) == []  # first seen, not a start: wait for predecessors
    assert seq.offer("a", 1, "a1", now=0.1, starts_sequence=True) == ["a1"]
    assert seq.offer("a", 2, "a2", now=0.2) == ["a2", "a3"]
    assert seq.offer("b", 0, "b0", now=0.3) == ["b0"]  # seq 0 is unordered
    assert seq.offer("a", 5, "a5", now=1.0) == [] and seq.held == 1
    assert seq.expire(now=5.9) == []
    assert seq.expire(now=6.0) == ["a5"]  # the gap (seq 4) is given up
    assert seq.offer("a", 4, "a4", now=6.1) == ["a4"]  # late: runs at once
    assert seq.skip("a", 6, now=7.0) == [] and seq.offer("a", 7, "a7", now=7.1) == ["a7"]


def test_offset_tracker_commits_only_contiguous_finished_offsets() -> None:
    offsets: OffsetTracker[str] = OffsetTracker()
    for o in (10, 11, 12):
        offsets.start("p", o)
    offsets.finish("p", 11)
    offsets.finish("p", 12)
    assert offsets.to_commit() == {"p": 10}  # 10 still runs: nothing past it may be committed
    offsets.committed({"p": 10})
    assert offsets.to_commit() == {}
    offsets.finish("p", 10)
    assert offsets.to_commit() == {"p": 13}
    cache: ResultCache[str, int] = ResultCache(capacity=2)
    for i, key in enumerate("xyz"):
        cache.put(key, i)
    assert "x" not in cache and cache.get("z") == 2 and len(cache) == 2


def test_config_flags_override_environment() -> None:
    args = cli.build_parser().parse_args(["engine", "--partitions", "3", "--heartbeat-interval", "0.5"])
    env = {"HOTLORA_PARTITIONS": "8", "HOTLORA_TOPIC_PREFIX": "env-prefix", "HOTLORA_RESIDENT_SLOTS": "2"}
    config = from_sources(args, env)
    assert (config.partitions, config.heartbeat_interval, config.topic_prefix) == (3, 0.5, "env-prefix")
    assert config.resident_slots == 2 and config.bootstrap is None and config.consumer_group == "env-prefix.engine"
    with pytest.raises(ValueError, match="HOTLORA_PARTITIONS"):
        from_sources(None, {"HOTLORA_PARTITIONS": "many"})


# ----- an agent's view over Kafka -----


def _agent(bootstrap: str, prefix: str, model: Path, checkpoint_dir: Path, spawn_engine: bool = True) -> Tenant:
    """An agent's view: raw aiokafka plus the schemas, heartbeats every half second."""
    config = service_config_for_tests(bootstrap, prefix, model, checkpoint_dir, heartbeat_interval=0.5)
    return Tenant(config, f"{prefix}.replies", spawn_engine=spawn_engine)


def _datum(tokens: list[int]) -> Datum:
    return Datum(input_tokens=pack_i32(tokens[:-1]), target_tokens=pack_i32(tokens[1:]))


def _ends(sent: list[Any]) -> dict[TopicPartition, int]:
    """One past the highest offset sent per partition: what a fully answered partition commits."""
    ends: dict[TopicPartition, int] = {}
    for meta in sent:
        tp = TopicPartition(meta.topic, meta.partition)
        ends[tp] = max(ends.get(tp, 0), meta.offset + 1)
    return ends


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_train_loop_versions_checkpoint_and_offsets(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    async def body() -> Path:
        async with _agent(broker.bootstrap, topic_prefix, tiny_model_path, tmp_path / "ckpt") as agent:
            env = lambda seq: agent.envelope("a", seq)  # noqa: E731
            batch = [_datum([5, 6, 7, 8, 9, 10]), _datum([11, 12, 13, 14])]
            requests = [
                CreateAdapter(rank=4, targets="attention", **env(1)),
                Sample(prompt_tokens=pack_i32([1, 2, 3]), n=2, max_tokens=4, seed=1, **env(2)),
                ForwardBackward(datums=batch, **env(3)),
                OptimStep(learning_rate=1e-2, **env(4)),
                Sample(prompt_tokens=pack_i32([1, 2, 3]), max_tokens=4, seed=1, **env(5)),
                ForwardBackward(datums=batch, **env(6)),
                OptimStep(learning_rate=1e-2, **env(7)),
                SaveState(path="runs/a", **env(8)),
            ]
            sent = [await agent.send(r) for r in requests]
            created, s1, fb1, o1, s2, fb2, o2, saved = [await agent.reply(r.request_id) for r in requests]
            assert not any(isinstance(m, Error) for m in (created, s1, fb1, o1, s2, fb2, o2, saved)), agent.seen
            assert created.adapter.version == 0 and created.adapter.rank == 4 and created.seq == 1
            assert s1.adapter_version == 0 and len(s1.sequences) == 2
            assert len(fb1.losses) == 2 and all(math.isfinite(x) for x in fb1.losses)
            assert (o1.version, s2.adapter_version, o2.version, saved.version) == (1, 1, 2, 2)

            expected = tmp_path / "ckpt" / "runs" / "a"
            event = await agent.until(
                "the checkpoint event",
                lambda: [
                    m for t, m in agent.seen if isinstance(m, CheckpointEvent) and m.request_id == saved.request_id
                ],
            )
            assert (event[0].path, event[0].step, saved.path) == (str(expected), 2, str(expected))
            assert event[0].sha256 == directory_sha256(expected)

            # Offsets are committed up to the last request once its result is out.
            await agent.until_committed(_ends(sent))
        return expected

    path = _run(body())

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), str(path))
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_out_of_order_seq_across_topics_runs_in_seq_order_and_holds_commits(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    async def body() -> None:
        async with _agent(broker.bootstrap, topic_prefix, tiny_model_path, tmp_path / "ckpt") as agent:
            env = lambda seq: agent.envelope("a", seq)  # noqa: E731
            create = CreateAdapter(rank=4, **env(1))
            sent = [await agent.send(create)]
            await agent.reply(create.request_id)

            # seq 4 (control) and 3 (gradient) arrive before seq 2 (gradient): both must wait for it.
            save = SaveState(path="ooo", include_optimizer=False, **env(4))
            optim = OptimStep(learning_rate=1e-2, **env(3))
            sent += [await agent.send(save), await agent.send(optim)]
            assert agent.service is not None
            service = agent.service
            await agent.until("both requests held", lambda: service.held_requests == 2)
            held = TopicPartition(sent[1].topic, sent[1].partition)
            committed = (await agent.committed([held]))[held]
            assert committed <= sent[1].offset, "a held request's offset was committed before its result"

            fb = ForwardBackward(datums=[_datum([3, 4, 5, 6])], **env(2))
            sent.append(await agent.send(fb))
            replies = [await agent.reply(r.request_id) for r in (fb, optim, save)]
            assert not any(isinstance(m, Error) for m in replies), replies
            assert replies[1].version == 1 and replies[2].version == 1  # save ran after the step
            order = [m.request_id for t, m in agent.seen if t == agent.reply_to]
            assert order.index(fb.request_id) < order.index(optim.request_id) < order.index(save.request_id)
            await agent.until_committed(_ends(sent))

    _run(body())


def test_duplicate_request_id_is_answered_once(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    async def body() -> None:
        async with _agent(broker.bootstrap, topic_prefix, tiny_model_path, tmp_path / "ckpt") as agent:
            env = lambda seq: agent.envelope("a", seq)  # noqa: E731
            create = CreateAdapter(rank=4, **env(1))
            await agent.send(create)
            await agent.reply(create.request_id)
            # The step (seq 3) is held until seq 2 arrives, so its retry certainly finds it in flight.
            optim = OptimStep(learning_rate=1e-2, **env(3))
            await agent.send(optim)
            await agent.send(optim)
            await agent.send(ForwardBackward(datums=[_datum([3, 4, 5, 6])], **env(2)))
            first = await agent.reply(optim.request_id)
            assert not isinstance(first, Error) and first.version == 1, first
            # A marker on the same partition: once it is answered, both copies were consumed.
            marker = ListAdapters(**env(0))
            await agent.send(marker, topic=agent.topics.gradient)
            await agent.reply(marker.request_id)
            assert len(agent.replies(optim.request_id)) == 1

            await agent.send(optim)  # a retry after the result: the same result again, not a second step
            again = await agent.until("the re-published result", lambda: agent.replies(optim.request_id)[1:])
            assert again[0] == first
            marker = ListAdapters(**env(0))
            await agent.send(marker, topic=agent.topics.gradient)
            listed = await agent.reply(marker.request_id)
            assert [(a.adapter_id, a.version) for a in listed.adapters] == [("a", 1)]
            assert len(agent.replies(optim.request_id)) == 2

    _run(body())


def test_bad_records_go_to_dead_letters_with_bad_message_reply(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    async def body() -> None:
        async with _agent(broker.bootstrap, topic_prefix, tiny_model_path, tmp_path / "ckpt") as agent:
            garbage = b"\xc1 not messagepack"
            await agent.producer.send_and_wait(agent.topics.rollout, garbage, key=b"a")
            readable = msgspec.msgpack.encode(
                {
                    "type": "sample",
                    "v": 1,
                    "request_id": "bad-1",
                    "adapter_id": "a",
                    "seq": 0,
                    "reply_to": agent.reply_to,
                    "sent_at_ms": 1,
                    "prompt_tokens": "not packed bytes",
                }
            )
            await agent.producer.send_and_wait(agent.topics.rollout, readable, key=b"a")
            future = msgspec.msgpack.encode({"type": "sample", "v": 99, "request_id": "bad-2", "reply_to": ""})
            await agent.producer.send_and_wait(agent.topics.control, future)

            dead_letters = lambda: [m for t, m in agent.seen if t == agent.topics.dead_letters]  # noqa: E731
            dead = await agent.until("three dead letters", lambda: len(dead_letters()) >= 3 and dead_letters())
            assert sorted(dead) == sorted([garbage, readable, future])
            error = await agent.reply("bad-1")
            assert isinstance(error, Error) and error.code == "bad_message" and error.adapter_id == "a"
            # bad-2 had reply_to "": its error goes to the shared results topic; the engine keeps serving.
            marker = ListAdapters(**agent.envelope("", 0))
            await agent.send(marker)
            assert (await agent.reply(marker.request_id)).adapters == []

    _run(body())


def test_topics_cli_creates_and_lists(broker: EmbeddedBroker, topic_prefix: str, capsys: Any) -> None:
    assert cli.main(["topics", "create", "--bootstrap", broker.bootstrap, "--topic-prefix", topic_prefix]) == 0
    assert cli.main(["topics", "list", "--bootstrap", broker.bootstrap, "--topic-prefix", topic_prefix]) == 0
    out = capsys.readouterr().out.split()
    assert all(name in out for name in Topics(topic_prefix).all())
    assert _run(list_topics(broker.bootstrap, topic_prefix)) == sorted(Topics(topic_prefix).all())


def test_engine_cli_exits_0_on_sigterm_after_checkpointing(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    env = {
        **os.environ,
        "HOTLORA_SESSION_TIMEOUT_MS": "2000",
        "HOTLORA_HEARTBEAT_INTERVAL_MS": "300",
        "HOTLORA_PARTITIONS": "2",
        "HOTLORA_CHECKPOINT_DIR": str(ckpt),
    }
    argv = [sys.executable, "-m", "hotlora.cli", "engine", "--bootstrap", broker.bootstrap, "--model"]
    argv += [str(tiny_model_path), "--topic-prefix", topic_prefix, "--dtype", "float32", "--device", "cpu"]
    argv += ["--heartbeat-interval", "0.5"]
    log_path = tmp_path / "engine.log"

    async def body(process: subprocess.Popen[bytes]) -> None:
        async with _agent(broker.bootstrap, topic_prefix, tiny_model_path, ckpt, spawn_engine=False) as agent:
            await agent.until(
                "engine_status running",
                lambda: any(isinstance(m, EngineStatus) and m.state == "running" for _, m in agent.seen),
                timeout=120,
            )
            await agent.until("a heartbeat", lambda: any(isinstance(m, Heartbeat) for _, m in agent.seen))
            env = lambda seq: agent.envelope("b-1", seq)  # noqa: E731
            requests = [
                CreateAdapter(rank=4, **env(1)),
                ForwardBackward(datums=[_datum([3, 4, 5, 6])], **env(2)),
                OptimStep(**env(3)),
            ]
            for r in requests:
                await agent.send(r)
            last = await agent.reply(requests[-1].request_id)
            assert not isinstance(last, Error) and last.version == 1, (last, log_path.read_text()[-3000:])
            process.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(asyncio.to_thread(process.wait), WAIT_S)
            assert code == 0, log_path.read_text()[-4000:]
            events = await agent.until(
                "the shutdown checkpoint",
                lambda: [m for t, m in agent.seen if isinstance(m, CheckpointEvent) and m.adapter_id == "b-1"],
            )
            assert events[0].step == 1 and events[0].include_optimizer
            assert Path(events[0].path).parent.parent == ckpt
            assert events[0].sha256 == directory_sha256(events[0].path)
            await agent.until(
                "engine_status stopped",
                lambda: any(isinstance(m, EngineStatus) and m.state == "stopped" for _, m in agent.seen),
            )

    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _run(body(process))
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
    assert '"event": "engine_stopped"' in log_path.read_text()


def test_a_snapshot_spawned_during_shutdown_is_written_not_cancelled(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    """Shutdown waits for the follow-up tasks its in-flight requests spawn: the optim_step running when
    the stop comes spawns its durable snapshot only as it finishes, so a drain that waited once for the
    tasks present at the stop would cancel that snapshot, and the step would be redone after a restart."""
    real_commit = DurableStore.commit

    def slow_commit(self: DurableStore, *args: Any) -> None:
        time.sleep(1.0)  # the snapshot is still being written when the rest of the shutdown is done
        real_commit(self, *args)

    monkeypatch.setattr(DurableStore, "commit", slow_commit)

    async def body() -> list[Any]:
        async with _agent(broker.bootstrap, topic_prefix, tiny_model_path, tmp_path / "ckpt") as agent:
            service = agent.service
            assert service is not None and service.engine is not None
            engine, submit = service.engine, service.engine.submit

            async def stop_at_optim_step(request: Any) -> Any:
                if type(request).__name__ == "OptimStep":
                    service.request_stop()
                    await asyncio.sleep(1.0)  # still in flight when the shutdown starts: its snapshot comes later
                return await submit(request)

            engine.submit = stop_at_optim_step  # type: ignore[method-assign]
            env = lambda seq: agent.envelope("a", seq)  # noqa: E731
            create = CreateAdapter(rank=2, **env(1))
            sent = [await agent.send(create)]
            assert not isinstance(await agent.reply(create.request_id), Error)
            requests = [ForwardBackward(datums=[_datum([3, 4, 5, 6])], **env(2)), OptimStep(**env(3))]
            sent += [await agent.send(r) for r in requests]
            stepped = await agent.reply(requests[1].request_id)
            assert not isinstance(stepped, Error) and stepped.version == 1, stepped
            await asyncio.wait_for(agent._tasks[0], WAIT_S)  # the service stops by itself
            await agent.until_committed(_ends(sent))  # the step's offset too: it is durable
        return DurableStore(tmp_path / "ckpt" / ".durable").load_all()

    saved = _run(body())
    assert [(s.adapter_id, s.seq, s.version) for s in saved] == [("a", 3, 1)], saved
