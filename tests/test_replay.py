"""Topic replay end to end against the real broker: record a 2-agent RL run, replay it to a fresh engine,
diff the results (bitwise), plus the file format, diff's report, the filters, ``tail`` and ``plot``.

A module fixture runs the recorded workload once (one engine, two concurrent ``HotLoraClient`` agents,
three create/sample/forward_backward/optim_step rounds each) and records every topic under its prefix;
the tests replay that file. Every wait is bounded; engines are stopped and awaited in ``finally``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from hotlora import cli
from hotlora.agents import HotLoraClient
from hotlora.engine.kafka.admin import create_topics
from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.engine.types import AdamParams, Datum, SamplingParams
from hotlora.replay.diff import diff_files
from hotlora.replay.format import FORMAT_NAME, Header, HlrError, HlrWriter, Record, iter_records, read_file, read_header
from hotlora.replay.messages import read_contents
from hotlora.replay.record import RecordOptions, StartAt, parse_start, record
from hotlora.replay.replay import ReplayOptions, plan, replay
from hotlora.replay.tail import format_record
from hotlora.schemas import messages as wire
from hotlora.schemas import pack_f32, pack_i32
from hotlora.schemas.codec import encode
from tests.helpers import running_engine_service, service_config_for_tests

pytestmark = pytest.mark.timeout(240)
WAIT_S = 90.0
STEPS = 3
PROMPTS = ([1, 40, 41, 42], [1, 50, 51, 52, 53])
AGENTS = {"agent-a": ("importance_sampling", 1), "agent-b": ("cross_entropy", 2)}


def run(main: Coroutine[Any, Any, Any], timeout: float = WAIT_S) -> Any:
    """Every test body is bounded; asyncio.run reaps whatever tasks it leaves."""
    return asyncio.run(asyncio.wait_for(main, timeout))


def rl_datum(prompt: list[int], tokens: list[int], logprobs: list[float], advantage: float) -> Datum:
    """Loss, sampler logprobs and the advantage on the generated tokens only, as the GRPO agent builds it."""
    sequence = prompt + tokens
    p = len(prompt)
    return Datum.create(
        sequence[:-1],
        sequence[1:],
        weights=[0.0] * (p - 1) + [1.0] * len(tokens),
        logprobs=[0.0] * (p - 1) + list(logprobs),
        advantages=[0.0] * (p - 1) + [advantage] * len(tokens),
    )


async def rl_agent(client: HotLoraClient, adapter: str, loss: str, seed: int) -> None:
    """An RL-shaped loop: pipelined seeded samples (like GRPO's gather), then forward_backward, optim_step."""
    await client.create_adapter(adapter, rank=8, seed=seed)  # alpha 32 / rank 8: scale 4
    for step in range(STEPS):
        params = [SamplingParams(max_tokens=6, temperature=1.0, seed=1000 * seed + 10 * step + i) for i in range(2)]
        outs = await asyncio.gather(
            *(client.sample(adapter, list(p), n=2, params=s) for p, s in zip(PROMPTS, params, strict=True))
        )
        datums = []
        for prompt, out in zip(PROMPTS, outs, strict=True):
            rewards = [sum(t % 2 == 0 for t in s.tokens) / len(s.tokens) for s in out.sequences]
            mean = sum(rewards) / len(rewards)
            for sequence, reward in zip(out.sequences, rewards, strict=True):
                if loss == "cross_entropy":
                    datums.append(Datum.from_sequence(list(prompt) + sequence.tokens, prompt_len=len(prompt)))
                else:
                    datums.append(rl_datum(list(prompt), sequence.tokens, sequence.logprobs, reward - mean))
        await client.forward_backward(adapter, datums, loss)
        await client.optim_step(adapter, AdamParams(learning_rate=1e-2))
    await client.save_state(adapter, f"runs/{adapter}")


@dataclass(frozen=True)
class RecordedRun:
    path: Path
    prefix: str
    model: Path


@pytest.fixture(scope="module")
def recorded_run(
    broker: EmbeddedBroker, tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> RecordedRun:
    """Two agents' concurrent RL run on one engine, recorded (every topic under the prefix) after the engine stopped."""
    prefix = f"t-replay-{uuid.uuid4().hex[:8]}"
    workdir = tmp_path_factory.mktemp("replay")
    out = workdir / "run.hlr"

    async def main() -> None:
        config = service_config_for_tests(broker.bootstrap, prefix, tiny_model_path, workdir / "checkpoints")
        async with (
            running_engine_service(config, timeout=WAIT_S),
            HotLoraClient(broker.bootstrap, prefix, request_timeout=WAIT_S, retries=0) as one,
            HotLoraClient(broker.bootstrap, prefix, request_timeout=WAIT_S, retries=0) as two,
        ):
            clients = dict(zip(AGENTS, (one, two), strict=True))
            await asyncio.gather(*(rl_agent(clients[name], name, *AGENTS[name]) for name in AGENTS))
        summary = await record(RecordOptions(broker.bootstrap, [f"{prefix}.*"], out, progress=False))
        assert summary.records > 0

    run(main())
    return RecordedRun(out, prefix, tiny_model_path)


def test_replay_of_two_agent_run_is_bitwise_identical(
    recorded_run: RecordedRun, broker: EmbeddedBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    contents = read_contents(read_file(recorded_run.path)[1])
    per_agent = 1 + STEPS * 4 + 1  # create, (2 samples, forward_backward, optim_step) per step, save_state
    requests, results = contents.requests, contents.results
    unanswered = {i: type(m).__name__ for i, (_, m) in requests.items() if i not in results}
    unrecorded = {i: (type(m).__name__, r.topic, r.offset) for i, (r, m) in results.items() if i not in requests}
    partitions = read_header(recorded_run.path).meta["partitions"]
    assert not unanswered and not unrecorded, (unanswered, unrecorded, partitions)
    assert len(contents.requests) == len(contents.results) == 2 * per_agent
    assert contents.model() == str(recorded_run.model)
    out = tmp_path / "run.replay.hlr"
    argv = ["replay", str(recorded_run.path), "--bootstrap", broker.bootstrap, "--out", str(out)]
    assert cli.main([*argv, "--session-timeout-ms", "2000", "--timeout", "60"]) == 0
    replayed = read_contents(read_file(out)[1])
    assert set(replayed.results) == set(contents.results)
    assert read_header(out).meta["model"] == str(recorded_run.model)
    capsys.readouterr()
    assert cli.main(["diff", str(recorded_run.path), str(out)]) == 0
    report = capsys.readouterr().out
    assert "identical" in report and f"compared {2 * per_agent} results" in report
    # What "identical" covers: the trained adapters really moved, so equal numbers are not trivially equal.
    versions = sorted(m.version for _, m in replayed.results.values() if isinstance(m, wire.OptimStepResult))
    assert versions == sorted(list(range(1, STEPS + 1)) * 2)


def _plant(path: Path, out: Path, changes: dict[str, Any]) -> None:
    """Copy a recording, replacing the results whose request id is in ``changes`` (a function of the result)."""
    header, records = read_file(path)
    with HlrWriter(out, header) as writer:
        for raw in records:
            message = read_contents([raw]).results
            if message and (rid := next(iter(message))) in changes:
                changed = changes[rid](message[rid][1])
                raw = msgspec.structs.replace(raw, value=encode(changed))
            writer.write(raw)


def test_diff_points_at_first_planted_divergence(
    recorded_run: RecordedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    contents = read_contents(read_file(recorded_run.path)[1])
    by_key = {(m.adapter_id, wire.tag_of(type(m)), m.seq): m for _, m in contents.results.values()}
    fb = next(
        m for (a, t, s), m in sorted(by_key.items()) if a == "agent-b" and t == "forward_backward_result" and s > 4
    )
    step = next(m for (a, t, s), m in sorted(by_key.items()) if a == "agent-a" and t == "optim_step_result" and s > 8)

    def nudge_logprob(m: wire.ForwardBackwardResult) -> wire.ForwardBackwardResult:
        first = np.frombuffer(m.logprobs[0], "<f4").copy()
        first[3] = np.nextafter(first[3], np.float32(0))  # one ulp: exact comparison must see it
        return msgspec.structs.replace(m, logprobs=[pack_f32(first), *m.logprobs[1:]])

    planted = tmp_path / "planted.hlr"
    _plant(
        recorded_run.path,
        planted,
        {
            fb.request_id: nudge_logprob,
            step.request_id: lambda m: msgspec.structs.replace(m, grad_norm=m.grad_norm + 0.5),
        },
    )
    report = diff_files(recorded_run.path, planted)
    assert not report.identical and [d.request_id for d in report.divergences] == sorted(
        [fb.request_id, step.request_id], key=lambda rid: (contents.results[rid][1].finished_at_ms, rid)
    )
    first = next(d for d in report.divergences if d.request_id == fb.request_id)
    assert (first.adapter_id, first.seq, first.verb, first.field) == (
        "agent-b",
        fb.seq,
        "forward_backward",
        "logprobs[0][3]",
    )
    assert first.previous is not None and first.previous[0] == fb.seq - 1  # the sample just before it matched
    assert report.float_only and report.max_delta == pytest.approx(0.5)  # the planted grad_norm shift is the largest
    assert diff_files(recorded_run.path, planted, atol=1e-6, common=True).divergences[0].request_id == step.request_id
    capsys.readouterr()
    assert cli.main(["diff", str(recorded_run.path), str(planted)]) == 1
    text = capsys.readouterr().out
    head = report.divergences[0]
    assert "first divergence" in text and head.request_id in text and head.field in text and "preceding match" in text


def test_replay_filters_by_adapter_and_until(recorded_run: RecordedRun, broker: EmbeddedBroker, tmp_path: Path) -> None:
    contents = read_contents(read_file(recorded_run.path)[1])
    lanes = plan(contents)
    a = lanes["agent-a"]
    assert [step.message.seq for step in a] == list(range(1, len(a) + 1))
    # Recorded pacing: a round's two samples were pipelined (neither waits for the other); the
    # forward_backward was sent only after both came back, and waits for them.
    assert a[1].after == (a[0].message.request_id,) and a[2].after == (a[0].message.request_id,)
    assert {a[1].message.request_id, a[2].message.request_id} <= set(a[3].after)
    assert [len(s.after) for s in plan(contents, pace="serial")["agent-a"]] == list(range(len(a)))

    out = tmp_path / "a-until-5.hlr"
    # No bootstrap: the laptop path, an embedded broker of its own plus the fresh engine.
    summary = run(replay(ReplayOptions(recorded_run.path, out, adapter="agent-a", until=5)))
    assert summary.bootstrap != broker.bootstrap
    assert (summary.sent, summary.answered, summary.missing) == (5, 5, [])
    results = read_contents(read_file(out)[1]).results
    assert sorted((m.adapter_id, m.seq) for _, m in results.values()) == [("agent-a", s) for s in range(1, 6)]
    assert diff_files(recorded_run.path, out, common=True).identical  # a replayed prefix of one adapter is exact
    partial = diff_files(recorded_run.path, out)
    assert not partial.identical and partial.only_a == len(contents.results) - 5 and partial.only_b == 0


def test_hlr_round_trip_and_damaged_files(tmp_path: Path) -> None:
    records = [
        Record(topic="p.rollout", partition=1, offset=7, timestamp=1_700_000_000_000, key=b"a", value=b"\x81\xa1x\x01"),
        Record(topic="p.metrics", partition=0, offset=0, key=None, value=None, headers=[("h", b"\x00\xff")]),
        Record(topic="p.dead-letters", partition=0, offset=1, value=b"\xc1" * 100_000),
    ]
    path = tmp_path / "x.hlr"
    with HlrWriter(path, Header.new("recording", {"topics": ["p.*"]})) as writer:
        for r in records:
            writer.write(r)
    header, back = read_file(path)
    assert (header.format, header.version, header.kind, header.meta) == (
        FORMAT_NAME,
        1,
        "recording",
        {"topics": ["p.*"]},
    )
    assert back == records
    data = path.read_bytes()
    assert int.from_bytes(data[:4], "big") == len(msgspec.msgpack.encode(header))  # length-prefixed frames
    cut = tmp_path / "cut.hlr"
    cut.write_bytes(data[:-10])  # a recording killed mid-write
    assert list(iter_records(cut)) == records[:2]
    with pytest.raises(HlrError, match="truncated"):
        list(iter_records(cut, strict=True))
    for bad, match in (
        (msgspec.msgpack.encode({"format": "other", "version": 1}), "format 'other'"),
        (msgspec.msgpack.encode({"format": FORMAT_NAME, "version": 99}), "version 99"),
        (msgspec.msgpack.encode(records[0]), "not a hotlora-replay file"),
    ):
        (tmp_path / "bad.hlr").write_bytes(len(bad).to_bytes(4, "big") + bad)
        with pytest.raises(HlrError, match=match):
            read_header(tmp_path / "bad.hlr")


def test_record_from_offset_time_and_adapter(broker: EmbeddedBroker, topic_prefix: str, tmp_path: Path) -> None:
    assert parse_start("3") == StartAt(offset=3) and parse_start("offset:12") == StartAt(offset=12)
    assert parse_start("1700000000000") == StartAt(time_ms=1_700_000_000_000) == parse_start("ms:1700000000000")
    assert parse_start("2023-11-14T22:13:20Z") == StartAt(time_ms=1_700_000_000_000)
    with pytest.raises(ValueError, match="expected"):
        parse_start("yesterday")
    topic = f"{topic_prefix}.rollout"

    async def main() -> None:
        await create_topics(broker.bootstrap, [topic], partitions=1)
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        await producer.start()
        try:
            sent = []
            for i in range(6):
                adapter = "a" if i % 2 == 0 else "b"
                sample = wire.Sample(adapter_id=adapter, seq=i // 2 + 1, prompt_tokens=pack_i32([1, i]))
                sent.append(await producer.send(topic, encode(sample), key=adapter.encode()))
                if i < 4:  # the last two go out as one batch: Tansu's end_offsets then reads one short
                    await sent[-1]
            await asyncio.gather(*sent)
        finally:
            await producer.stop()
        everything = await record(RecordOptions(broker.bootstrap, [topic], tmp_path / "all.hlr", progress=False))
        assert everything.records == 6
        tail_part = RecordOptions(broker.bootstrap, [topic], tmp_path / "from.hlr", start=StartAt(offset=2))
        assert (await record(tail_part)).records == 4
        only_a = RecordOptions(broker.bootstrap, [f"{topic_prefix}.*"], tmp_path / "a.hlr", adapter="a")
        summary = await record(only_a)
        assert (summary.records, summary.skipped) == (3, 3)
        since_epoch = RecordOptions(broker.bootstrap, [topic], tmp_path / "t0.hlr", start=StartAt(time_ms=0))
        assert (await record(since_epoch)).records == 6
        future = RecordOptions(broker.bootstrap, [topic], tmp_path / "t1.hlr", start=StartAt(time_ms=2**42))
        assert (await record(future)).records == 0

    run(main(), 30)
    assert [r.offset for r in iter_records(tmp_path / "from.hlr")] == [2, 3, 4, 5]
    assert {r.key for r in iter_records(tmp_path / "a.hlr")} == {b"a"}
    with pytest.raises(SystemExit, match="no topic matches"):
        cli.main(["record", "--bootstrap", broker.bootstrap, "--topics", "nope-*", "--out", str(tmp_path / "n.hlr")])


def recorded_so_far(path: Path) -> int:
    """Records in a file another task is still writing (0 before it exists)."""
    try:
        return len(list(iter_records(path)))
    except (FileNotFoundError, HlrError):
        return 0


def test_record_follow_picks_up_topics_created_later(broker: EmbeddedBroker, topic_prefix: str, tmp_path: Path) -> None:
    """--follow: a new agent's reply topic appears mid-recording and is recorded from its beginning."""
    early, late = f"{topic_prefix}.metrics", f"{topic_prefix}.replies.agent-late"
    out = tmp_path / "follow.hlr"

    async def main() -> None:
        await create_topics(broker.bootstrap, [early], partitions=1)
        stop = asyncio.Event()
        options = RecordOptions(broker.bootstrap, [f"{topic_prefix}.*"], out, follow=True, duration=20.0)
        recording = asyncio.create_task(record(options, stop))
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(early, encode(wire.Heartbeat(engine_id="e1")))
            await create_topics(broker.bootstrap, [late], partitions=1)
            await producer.send_and_wait(late, encode(wire.Heartbeat(engine_id="e2")))
            deadline = asyncio.get_running_loop().time() + 15
            while recorded_so_far(out) < 2 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.1)  # the file is flushed after every fetched batch
        finally:
            await producer.stop()
            stop.set()
        summary = await recording
        assert summary.records == 2 and set(summary.per_topic) == {early, late}

    run(main(), 30)
    assert read_header(out).meta["follow"] is True


def test_tail_formats_and_filters(
    broker: EmbeddedBroker, topic_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sample = wire.Sample(
        request_id="0123456789abcdef",
        adapter_id="a",
        seq=3,
        prompt_tokens=pack_i32(range(512)),
        principal="p",
        token="s3cret",
    )
    line = format_record(Record(topic="x.rollout", partition=1, offset=9, timestamp=0, value=encode(sample))).plain
    assert line.startswith("00:00:00.000 x.rollout[1]@9 sample adapter=a seq=3 rid=01234567")
    assert "prompt_tokens=int[512] first=[0, 1, 2, 3, 4, …]" in line and "token='***'" not in line
    assert "token=***" in line and "s3cret" not in line
    datum = wire.Datum(input_tokens=pack_i32([5, 6]), target_tokens=pack_i32([6, 7]), logprobs=pack_f32([-0.5, -1.25]))
    fb = wire.ForwardBackward(adapter_id="a", seq=4, datums=[datum, datum], loss_fn="importance_sampling")
    line = format_record(Record(topic="x.gradient", partition=0, offset=0, value=encode(fb))).plain
    assert "datums=[Datum(input_tokens=int[2] first=[5, 6], target_tokens=int[2] first=[6, 7], weights=None, " in line
    assert "logprobs=f32[2] first=[-0.5, -1.25]" in line and "+1 more]" in line
    junk = format_record(Record(topic="x.dead-letters", partition=0, offset=2, value=b"\xde\xad\xbe\xef" * 20)).plain
    assert "undecodable" in junk and "80 bytes hex=deadbeef" in junk and junk.endswith("…")

    topics = [f"{topic_prefix}.rollout", f"{topic_prefix}.metrics"]

    async def publish() -> None:
        await create_topics(broker.bootstrap, topics, partitions=1)
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(topics[1], encode(wire.Heartbeat(engine_id="e")))
            await producer.send_and_wait(topics[0], b"not msgpack at all", key=b"a")
            await producer.send_and_wait(topics[0], encode(sample), key=b"a")
            await producer.send_and_wait(topics[0], encode(msgspec.structs.replace(sample, adapter_id="b")), key=b"b")
        finally:
            await producer.stop()

    run(publish(), 30)
    capsys.readouterr()
    argv = ["tail", "--bootstrap", broker.bootstrap, "--prefix", topic_prefix, "--from-beginning", "--timeout", "20"]
    assert cli.main([*argv, "--adapter", "a", "--type", "sample", "--max-messages", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and " sample adapter=a seq=3" in lines[0]
    assert cli.main([*argv, "--max-messages", "4"]) == 0
    text = capsys.readouterr().out
    assert "heartbeat" in text and "undecodable" in text and "adapter=b" in text


def test_plot_reads_metrics_from_a_recording(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "metrics.hlr"
    with HlrWriter(path, Header.new("recording", {})) as writer:
        for step in range(4):
            for i, name in enumerate(("exp-1", "exp-2")):
                metrics = wire.Metrics(
                    adapter_id=name, experiment=name, task="sort", step=step, reward_mean=0.1 * step + i,
                    eval_reward=0.2 * step if step % 2 == 0 else None, accuracy=0.5 if step % 2 == 0 else None,
                )  # fmt: skip
                writer.write(Record(topic="p.metrics", partition=0, offset=2 * step + i, value=encode(metrics)))
        writer.write(Record(topic="p.metrics", partition=0, offset=9, value=encode(wire.Heartbeat(engine_id="e"))))
    png = tmp_path / "rewards.png"
    assert cli.main(["plot", "--hlr", str(path), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 experiment(s), 8 records" in capsys.readouterr().out
