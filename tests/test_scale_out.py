"""Scale-out: engine processes share the tenants through one consumer group, as a user runs them.

One scenario covers the issue's three cases in one fleet (to keep CI short). Engines ``a`` and ``b``
(``hotlora engine`` processes, one shared checkpoint directory) serve 6 ``hotlora agent`` GRPO
processes on the real broker. At step 2 ``b`` is SIGKILLed; at step 4 a third engine ``c`` joins (of
14 steps: both happen while every experiment is still running). ``c`` joins once its imports and model
load are done, 8 s or more on this loaded 2-core CPU, which once outlasted the rest of the run; the
scenario holds the agents (SIGSTOP) until ``c`` has loaded, so it always joins a running workload. The checks
(``hotlora.benchmarks.migration.verify``, the same the bench runs) read the agents' reported metrics, the
engines' heartbeats and their JSON logs:

- every experiment reported each of its steps exactly once, its version moved by one per trained step
  (a doubled ``optim_step`` would move it by two), and exactly one live engine holds its adapter;
- no ``optim_step`` was applied twice: across all engine logs each (adapter, seq) ``optim_step`` ran
  once, except where the killed engine ran it without making it durable (its effect died with it);
- each adapter was served by one engine at a time: spans of results from different engines never
  overlap, and no engine touched an adapter while another held it.

Then: all three engines served adapters, ``b``'s adapters failed over to ``a``, ``c`` took a share
gracefully; ``hotlora status --json`` names each adapter's one engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from hotlora.agents import HotLoraClient
from hotlora.benchmarks.migration import (
    FleetSettings,
    LocalFleet,
    migration_pauses,
    run_scenario,
    served_by,
    spread_adapter_ids,
    verify,
)
from hotlora.engine.kafka.admin import log_end_offsets
from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.engine.kafka.device_claim import claim_gpu
from hotlora.engine.kafka.durability import DurableStore
from hotlora.engine.kafka.placement import CoPartitionAssignor, balance, partition_for
from hotlora.engine.kafka.sequencing import Sequencer, advance_point
from hotlora.engine.kafka.service import EngineService
from hotlora.engine.types import LoraSpec, SamplingParams
from hotlora.schemas import Heartbeat, Metrics, Topics
from hotlora.status import fold, owners
from tests.helpers import service_config_for_tests, start_engine_service


def test_co_partition_plan_is_balanced_complete_and_sticky() -> None:
    numbers = list(range(12))
    two = balance(numbers, {}, ["a", "b"])
    assert sorted(n for v in two.values() for n in v) == numbers and {len(v) for v in two.values()} == {6}
    three = balance(numbers, two, ["a", "b", "c"])
    assert sorted(n for v in three.values() for n in v) == numbers and {len(v) for v in three.values()} == {4}
    moved = sum(len(set(three[m]) - set(two.get(m, []))) for m in three)
    assert moved == 4  # only the new member's share moves (the range assignor would move 6)
    assert balance(numbers, {"a": three["a"]}, ["a"]) == {"a": numbers}  # b and c died: a takes all
    assert sorted(len(v) for v in balance(list(range(5)), {}, ["a", "b"]).values()) == [2, 3]
    # The same plan whichever member leads the group (and so computes it).
    assert balance(numbers, {"a": [0, 1], "b": [0, 1]}, ["a", "b"]) == balance(
        numbers, {"b": [0, 1], "a": [0, 1]}, ["b", "a"]
    )


def test_adapter_partition_matches_the_producers_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    for n in range(50):
        key = f"adapter-{n}"
        assert partition_for(key, 6) == DefaultPartitioner()(key.encode(), list(range(6)), list(range(6)))
    ids = spread_adapter_ids("t", 6, 6)
    assert sorted(partition_for(a, 6) for a in ids) == list(range(6))


def test_advance_point_moves_only_over_answered_requests_that_changed_nothing() -> None:
    assert advance_point(None, [], [(5, False)]) is None  # no snapshot: nothing to move
    assert advance_point(3, [], [(4, False), (5, False)]) == 5
    assert advance_point(3, [5], [(4, False), (6, False)]) == 4  # 5 still running: stop before it
    assert advance_point(3, [], [(4, False), (5, True), (6, False)]) == 4  # 5 changed state: its snapshot moves it
    assert advance_point(3, [], [(5, True)]) is None
    assert advance_point(6, [], [(4, False)]) is None  # already covered


def test_sequencer_drops_held_requests_and_forgets_moved_adapters() -> None:
    seq: Sequencer[str] = Sequencer(gap_timeout=30.0)
    assert seq.offer("a", 1, "a1", 0.0) == ["a1"]
    assert seq.offer("a", 3, "a3", 0.0) == []  # waits for 2
    seq.skip("b", 2, 0.0)
    assert seq.drop_held() == ["a3"] and seq.held == 0
    assert seq.offer("a", 3, "a3", 0.0) == []  # re-read after the rebalance: still in order
    assert seq.offer("a", 2, "a2", 0.0) == ["a2", "a3"]
    seq.forget("a")
    assert seq.last("a") == 0
    seq.resume("a", 8)  # a new owner starts after the adapter's snapshot
    assert seq.offer("a", 8, "a8", 0.0) == ["a8"]


def test_durable_mark_advances_without_rewriting_the_state(tmp_path: Path) -> None:
    store = DurableStore(tmp_path)
    assert store.advance("a", 5) is False  # no snapshot yet
    snapshot = store.snapshot_path("a", 3)
    snapshot.mkdir(parents=True)
    (snapshot / "adapter_model.safetensors").write_bytes(b"weights")
    store.commit("a", 3, 1, snapshot, {"r3": (3, b"reply")})
    assert store.advance("a", 5) is True and store.advance("a", 4) is True  # never backwards
    (current,) = store.load_all()
    assert (current.seq, current.version, current.path, current.replies) == (5, 1, snapshot, {"r3": (3, b"reply")})
    assert (snapshot / "adapter_model.safetensors").read_bytes() == b"weights"


def test_each_engine_claims_a_gpu_of_its_own(tmp_path: Path) -> None:
    first, second = claim_gpu(tmp_path, ["0", "1"]), claim_gpu(tmp_path, ["0", "1"])
    assert (first.gpu_id, second.gpu_id) == ("0", "1")
    with pytest.raises(RuntimeError, match="every visible GPU"):
        claim_gpu(tmp_path, ["0", "1"])
    first.release()
    assert claim_gpu(tmp_path, ["0", "1"]).gpu_id == "0"  # a released (or dead) engine's GPU is free again
    # A process that dies (SIGKILL included) lets its GPU go: the kernel drops the lock.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from hotlora.engine.kafka.device_claim import claim_gpu; "
         f"claim_gpu(Path({str(tmp_path / 'other')!r}), ['7']); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError):
            claim_gpu(tmp_path / "other", ["7"])
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert claim_gpu(tmp_path / "other", ["7"]).gpu_id == "7"


def test_status_folds_each_engines_latest_heartbeat() -> None:
    def beat(engine_id: str, at: int, adapters: list[str], state: str = "running") -> Heartbeat:
        return Heartbeat(
            engine_id=engine_id, sent_at_ms=at, adapters=adapters, partitions=[0], state=state,
            model_name=f"org/model-{engine_id}", vocab_size=151_936, context_length=40_960,
        )  # fmt: skip

    events = [
        beat("a", 1_000, ["x", "y"]),
        beat("a", 9_000, ["x"]),  # the latest wins: y moved away
        beat("b", 8_000, ["y"]),
        beat("c", 9_500, ["z"], state="stopped"),  # a clean stop: not live
        beat("d", 1_000, ["w"]),  # silent for longer than the window: not live
    ]
    views = fold([*events, Metrics(experiment="x", task="t", step=1)], now_ms=10_000, window_s=5.0)
    assert [v.engine_id for v in views] == ["a", "b"]
    assert [(v.model_name, v.vocab_size, v.context_length) for v in views] == [
        ("org/model-a", 151_936, 40_960),
        ("org/model-b", 151_936, 40_960),
    ]
    assert owners(views) == {"x": ["a"], "y": ["b"]}


def test_engines_join_and_die_mid_run_and_every_experiment_finishes_exactly(
    broker: EmbeddedBroker, topic_prefix: str, rl_base_path: Path, tmp_path: Path
) -> None:
    settings = FleetSettings(agents=6, steps=14, kill_at=2, join_at=4, timeout_s=480.0)
    status: dict[str, Any] = {}

    async def ask_status(fleet: LocalFleet) -> None:
        """``hotlora status --json`` as a user runs it, while the surviving engines still serve."""
        await fleet.wait_for_split(["a", "c"])
        command = [sys.executable, "-m", "hotlora.cli", "status", "--json", "--window", "5"]
        command += ["--bootstrap", broker.bootstrap, "--topic-prefix", topic_prefix]
        process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 0
        status.update(json.loads(out))

    run = asyncio.run(run_scenario(broker.bootstrap, topic_prefix, rl_base_path, tmp_path, settings, print, ask_status))
    assert verify(run, settings.steps) == []
    served = served_by(run)
    assert all(served.get(name) for name in ("a", "b", "c")), f"every engine should serve adapters: {served}"
    moved = migration_pauses(run)
    print(json.dumps(moved, indent=1))
    failed_over = [r for r in moved if r["from"] == "b" and r["cause"] == "failure"]
    assert failed_over and all(r["to"] in ("a", "c") for r in failed_over), moved
    assert any(r["to"] == "c" and r["cause"] == "rebalance" for r in moved), moved
    # Status: the two live engines, each adapter owned by exactly one of them, capacity advertised.
    assert sorted(e["engine_id"] for e in status["engines"]) == ["a", "c"]
    assert {a: owners for a, owners in status["adapters"].items() if a in run.adapter_ids} == {
        a: [next(e["engine_id"] for e in status["engines"] if a in e["adapters"])] for a in run.adapter_ids
    }
    assert all(e["resident_slots"] > 0 and e["partitions"] for e in status["engines"])
    assert all(e["model_name"] and e["vocab_size"] > 0 and e["context_length"] > 0 for e in status["engines"])


def test_status_needs_a_broker() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hotlora.cli", "status"],
        capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "HOTLORA_BOOTSTRAP"},
    )  # fmt: skip
    assert result.returncode != 0 and "HOTLORA_BOOTSTRAP" in result.stderr


def test_an_engine_that_cannot_release_in_time_fences_itself(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    """A rebalance the engine cannot quiesce within ``rebalance_timeout_ms`` (a long sample queue here)
    must not leave it serving beside the new owner: it stops its engine, answers nothing more, commits
    nothing more, and ``run`` returns with ``fenced`` set. The unanswered requests stay uncommitted, so
    the member that joined reads every one of them again."""
    config = service_config_for_tests(
        broker.bootstrap, topic_prefix, tiny_model_path, tmp_path / "ckpt", rebalance_timeout_ms=2000
    )
    params = SamplingParams(max_tokens=200, temperature=1.0, seed=1)

    async def main() -> None:
        service = EngineService(config)
        running = await start_engine_service(service)
        joiner = AIOKafkaConsumer(
            bootstrap_servers=broker.bootstrap,
            group_id=config.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=2000,
            heartbeat_interval_ms=300,
            partition_assignment_strategy=(CoPartitionAssignor(),),
        )
        try:
            async with HotLoraClient(broker.bootstrap, topic_prefix=topic_prefix, request_timeout=120) as client:
                await client.create_adapter("slow", LoraSpec(rank=4, seed=1))
                samples = [asyncio.create_task(client.sample("slow", [1, 2, 3], 16, params)) for _ in range(24)]
                async with asyncio.timeout(60):  # the engine is busy with the queue
                    while not service.engine or not service.engine.scheduler.running_rows:
                        await asyncio.sleep(0.05)
                joiner.subscribe(list(Topics(topic_prefix).requests()))
                await joiner.start()
                await asyncio.wait_for(running, 60)  # fenced: run() returns without a graceful drain
                assert service.fenced
                answered = sum(task.done() and not task.cancelled() for task in samples)
                assert answered < len(samples), "the queue should have outlasted the rebalance timeout"
                async with asyncio.timeout(60):  # the joiner holds every partition now
                    while len(joiner.assignment()) < len(Topics(topic_prefix).requests()) * config.partitions:
                        await joiner.getmany(timeout_ms=100)
                rollout = [tp for tp in joiner.assignment() if tp.topic == Topics(topic_prefix).rollout]
                committed = sum([await joiner.committed(tp) or 0 for tp in rollout])
                ends = sum((await log_end_offsets(broker.bootstrap, rollout)).values())
                assert ends - committed >= len(samples) - answered  # nothing unanswered was committed
                for task in samples:
                    task.cancel()
                await asyncio.gather(*samples, return_exceptions=True)
        finally:
            await joiner.stop()
            if not running.done():
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)

    asyncio.run(main())
