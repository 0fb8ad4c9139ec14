"""``HotLoraClient`` against a real broker and a scripted in-test responder (``tests/kafka_responder.py``)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from hotlora.agents import ClientClosed, HotLoraClient, RequestTimeout
from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.engine.types import (
    AdamParams,
    AdapterInfo,
    Datum,
    ForwardBackwardOutput,
    LoraSpec,
    OptimStepOutput,
    SampleOutput,
    SamplingParams,
    SaveOutput,
)
from hotlora.schemas import CheckpointEvent, Error, RequestMessage, ResultMessage, Sample, Topics, unpack_i32
from hotlora.schemas.errors import HotLoraError, UnknownAdapter
from tests.helpers import running_engine_service, service_config_for_tests
from tests.kafka_responder import EngineHandler, Responder, envelope, fake_reply

FAST = {"request_timeout": 5.0, "retries": 0}


def run(main: Callable[[], Awaitable[Any]], timeout: float = 30.0) -> Any:
    """Every test body is bounded; asyncio.run reaps whatever tasks it leaves."""
    return asyncio.run(asyncio.wait_for(main(), timeout))


def test_concurrent_requests_get_their_own_results(broker: EmbeddedBroker, topic_prefix: str) -> None:
    rng = random.Random(0)

    async def shuffled(request: RequestMessage) -> ResultMessage:
        await asyncio.sleep(rng.random() * 0.2)  # replies come back out of order
        return fake_reply(request)

    async def main() -> None:
        topics = Topics(topic_prefix)
        async with (
            Responder(broker.bootstrap, topics, shuffled),
            HotLoraClient(broker.bootstrap, topic_prefix, **FAST) as one,
            HotLoraClient(broker.bootstrap, topic_prefix, **FAST) as two,
        ):
            assert one.reply_topic != two.reply_topic

            async def ask(client: HotLoraClient, i: int) -> tuple[list[int], SampleOutput]:
                prompt = [i, i + 1, i + 2, 1000 + id(client) % 7]
                return prompt, await client.sample(f"adapter-{i % 3}", prompt, n=2)

            calls = [ask(client, i) for i in range(20) for client in (one, two)]
            for prompt, out in await asyncio.gather(*calls):
                assert isinstance(out, SampleOutput)
                assert [s.tokens for s in out.sequences] == [prompt[::-1]] * 2

    run(main)


def test_round_trip_is_not_held_by_the_broker_fetch_wait(broker: EmbeddedBroker, topic_prefix: str) -> None:
    """Tansu holds an empty fetch for its full max wait; aiokafka's 500 ms default made each call ~250 ms."""

    async def main() -> None:
        async with (
            Responder(broker.bootstrap, Topics(topic_prefix)),
            HotLoraClient(broker.bootstrap, topic_prefix, **FAST) as client,
        ):
            await client.sample("a", [1])  # first use pays topic metadata
            times = []
            for _ in range(10):
                started = time.perf_counter()
                await client.sample("a", [1])
                times.append(time.perf_counter() - started)
            assert sorted(times)[5] < 0.1, times  # ~7 ms here; generous for two shared cores

    run(main)


def test_verbs_return_engine_types_and_number_seq_per_adapter(
    broker: EmbeddedBroker, topic_prefix: str, tmp_path: Path
) -> None:
    async def main() -> None:
        topics = Topics(topic_prefix)
        async with (
            Responder(broker.bootstrap, topics) as responder,
            HotLoraClient(broker.bootstrap, topic_prefix, **FAST) as client,
        ):
            datum = Datum.from_sequence([5, 6, 7, 8], prompt_len=2)
            info = await client.create_adapter("a", rank=4, alpha=8.0, targets=["q_proj"], seed=3)
            assert isinstance(info, AdapterInfo) and info.adapter_id == "a"
            assert isinstance(await client.create_adapter("b", LoraSpec(rank=2)), AdapterInfo)
            assert isinstance(await client.sample("a", [1, 2, 3], params=SamplingParams(max_tokens=4)), SampleOutput)
            fb = await client.forward_backward("a", [datum, datum], "importance_sampling", {"clip": 0.2})
            assert isinstance(fb, ForwardBackwardOutput) and fb.losses == [1.0, 1.0]
            assert isinstance(fb.logprobs[0], torch.Tensor) and fb.logprobs[0].numel() == 3
            assert isinstance(await client.optim_step("a", AdamParams(learning_rate=1e-3)), OptimStepOutput)
            assert isinstance(await client.sample("b", [4]), SampleOutput)
            assert isinstance(await client.list_adapters(), list)
            assert isinstance(await client.sample(None, [9]), SampleOutput)
            saved = await client.save_weights_for_sampler("a", tmp_path / "w")
            assert saved == SaveOutput(str(tmp_path / "w"), 0)
            assert isinstance(await client.load_state("b", tmp_path / "w"), AdapterInfo)
            await client.delete_adapter("b")

            got = [(topic, key, type(m).__name__, m.adapter_id, m.seq, m.reply_to) for topic, key, m in responder.seen]
            r = client.reply_topic
            assert got == [
                (topics.control, b"a", "CreateAdapter", "a", 1, r),
                (topics.control, b"b", "CreateAdapter", "b", 1, r),
                (topics.rollout, b"a", "Sample", "a", 2, r),
                (topics.gradient, b"a", "ForwardBackward", "a", 3, r),
                (topics.gradient, b"a", "OptimStep", "a", 4, r),
                (topics.rollout, b"b", "Sample", "b", 2, r),
                (topics.control, None, "ListAdapters", "", 0, r),
                (topics.rollout, None, "Sample", "", 0, r),
                (topics.control, b"a", "SaveState", "a", 5, r),
                (topics.control, b"b", "LoadState", "b", 3, r),
                (topics.control, b"b", "DeleteAdapter", "b", 4, r),
            ]
            create = responder.seen[0][2]
            assert (create.rank, create.alpha, create.targets, create.seed) == (4, 8.0, ["q_proj"], 3)
            assert responder.seen[8][2].include_optimizer is False
            assert client.stats.per_adapter_seq == {"a": 5, "b": 4}

    run(main)


def test_retry_reuses_request_id_and_seq_and_ignores_the_late_reply(broker: EmbeddedBroker, topic_prefix: str) -> None:
    attempts: dict[str, int] = {}
    retried: dict[str, asyncio.Event] = {}

    async def slow_first_attempt(request: RequestMessage) -> ResultMessage:
        attempts[request.request_id] = attempts.get(request.request_id, 0) + 1
        answered = retried.setdefault(request.request_id, asyncio.Event())
        if attempts[request.request_id] == 1:
            await answered.wait()  # answered only after the retry was: a late duplicate
            await asyncio.sleep(0.2)
            return fake_reply(request, version=111)
        answered.set()
        return fake_reply(request, version=222)

    async def main() -> None:
        topics = Topics(topic_prefix)
        async with (
            Responder(broker.bootstrap, topics, slow_first_attempt) as responder,
            HotLoraClient(broker.bootstrap, topic_prefix, request_timeout=0.5, retries=2) as client,
        ):
            out = await client.sample("a", [1, 2])
            assert out.adapter_version == 222
            first, second = (m for _, _, m in responder.seen)
            assert (first.request_id, first.seq) == (second.request_id, second.seq) == (second.request_id, 1)
            assert client.stats.retries == 1
            # The first attempt's reply still arrives; the client drops it instead of failing anything.
            deadline = time.monotonic() + 5
            while client.stats.ignored_replies < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert client.stats.ignored_replies == 1
            assert (await client.sample("a", [3])).adapter_version == 222  # a fresh request: new id, seq 2
            assert responder.seen[-1][2].seq == 2 and responder.seen[-1][2].request_id != first.request_id

    run(main)


def test_timeout_raises_after_every_retry(broker: EmbeddedBroker, topic_prefix: str) -> None:
    async def silent(request: RequestMessage) -> None:
        return None

    async def main() -> None:
        topics = Topics(topic_prefix)
        async with (
            Responder(broker.bootstrap, topics, silent) as responder,
            HotLoraClient(broker.bootstrap, topic_prefix, request_timeout=0.3, retries=2) as client,
        ):
            started = time.monotonic()
            with pytest.raises(RequestTimeout) as caught:
                await client.optim_step("a")
            assert 0.9 <= time.monotonic() - started < 5
            assert isinstance(caught.value, HotLoraError) and isinstance(caught.value, TimeoutError)
            assert caught.value.code == "timeout" and "3 attempt(s)" in str(caught.value)
            await responder.wait_seen(3)
            ids = {(m.request_id, m.seq) for _, _, m in responder.seen}
            assert len(responder.seen) == 3 and len(ids) == 1
            assert client.in_flight == 0

    run(main)


def test_errors_are_raised_as_their_typed_exceptions(broker: EmbeddedBroker, topic_prefix: str) -> None:
    async def failing(request: RequestMessage) -> ResultMessage:
        if isinstance(request, Sample) and request.adapter_id == "ghost":
            return Error(code="unknown_adapter", message="no adapter 'ghost'", **envelope(request))
        if isinstance(request, Sample) and request.adapter_id == "new":
            return Error(code="quota_exceeded", message="a code from a newer engine", **envelope(request))
        return fake_reply(request)

    async def main() -> None:
        async with (
            Responder(broker.bootstrap, Topics(topic_prefix), failing),
            HotLoraClient(broker.bootstrap, topic_prefix, **FAST) as client,
        ):
            with pytest.raises(UnknownAdapter, match="ghost"):
                await client.sample("ghost", [1])
            with pytest.raises(HotLoraError) as caught:
                await client.sample("new", [1])
            assert caught.value.code == "quota_exceeded"
            assert isinstance(await client.sample("a", [1]), SampleOutput)  # the client keeps serving

    run(main)


def test_in_flight_requests_are_bounded(broker: EmbeddedBroker, topic_prefix: str) -> None:
    release = asyncio.Event()

    async def held(request: RequestMessage) -> ResultMessage:
        await release.wait()
        return fake_reply(request)

    async def main() -> None:
        async with (
            Responder(broker.bootstrap, Topics(topic_prefix), held) as responder,
            HotLoraClient(broker.bootstrap, topic_prefix, max_in_flight=4, **FAST) as client,
        ):
            calls = [asyncio.ensure_future(client.sample("a", [i])) for i in range(12)]
            await responder.wait_seen(4)
            await asyncio.sleep(0.5)  # time for more to arrive, if the bound leaked
            assert len(responder.seen) == 4 and client.in_flight == 4
            release.set()
            outs = await asyncio.gather(*calls)
            assert [o.sequences[0].tokens for o in outs] == [[i] for i in range(12)]
            assert client.stats.max_in_flight_seen == 4 and client.in_flight == 0
            # seq is taken when a slot is, so the engine never waits for a request stuck behind the bound
            assert sorted(m.seq for _, _, m in responder.seen) == list(range(1, 13))
            assert [unpack_i32(m.prompt_tokens).tolist() for _, _, m in responder.seen[:4]] == [[0], [1], [2], [3]]

    run(main)


def test_close_fails_pending_calls_and_refuses_new_ones(broker: EmbeddedBroker, topic_prefix: str) -> None:
    async def silent(request: RequestMessage) -> None:
        return None

    async def main() -> None:
        async with Responder(broker.bootstrap, Topics(topic_prefix), silent) as responder:
            client = await HotLoraClient(broker.bootstrap, topic_prefix, max_in_flight=2, request_timeout=30).start()
            calls = [asyncio.ensure_future(client.sample("a", [i])) for i in range(3)]  # the third waits for a slot
            await responder.wait_seen(2)
            await asyncio.wait_for(client.close(), 10)
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(r, ClientClosed) for r in results), results
            with pytest.raises(ClientClosed):
                await client.list_adapters()
            await client.close()  # idempotent

    run(main)


def test_a_cancelled_call_still_sends_and_frees_its_slot(broker: EmbeddedBroker, topic_prefix: str) -> None:
    """Cancelling a caller must not leave a seq gap the engine would wait on, nor leak a slot."""

    async def main() -> None:
        async with (
            Responder(broker.bootstrap, Topics(topic_prefix)) as responder,
            HotLoraClient(broker.bootstrap, topic_prefix, max_in_flight=1, **FAST) as client,
        ):
            call = asyncio.ensure_future(client.sample("a", [1]))
            await asyncio.sleep(0)  # the call takes its slot and seq, then starts sending
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert client.in_flight == 0
            assert isinstance(await client.sample("a", [2]), SampleOutput)  # the only slot is free again
            await responder.wait_seen(2)
            assert [m.seq for _, _, m in responder.seen] == [1, 2]

    run(main)


def test_unstarted_client_refuses_calls() -> None:
    async def main() -> None:
        client = HotLoraClient("127.0.0.1:1")
        with pytest.raises(ClientClosed, match="not started"):
            await client.list_adapters()

    run(main)
    with pytest.raises(ValueError):
        HotLoraClient("127.0.0.1:1", topic_prefix="bad prefix")


def test_wait_for_checkpoint_reads_the_checkpoints_topic(broker: EmbeddedBroker, topic_prefix: str) -> None:
    async def main() -> None:
        topics = Topics(topic_prefix)
        async with (
            Responder(broker.bootstrap, topics) as responder,
            HotLoraClient(broker.bootstrap, topic_prefix, **FAST) as client,
        ):
            for adapter_id, step in (("b", 5), ("a", 1), ("a", 3)):
                event = CheckpointEvent(adapter_id=adapter_id, path=f"/ck/{adapter_id}/{step}", step=step, sha256="0")
                await responder.publish(event)
            event = await client.wait_for_checkpoint("a", min_step=2, timeout=10)
            assert (event.adapter_id, event.step, event.path) == ("a", 3, "/ck/a/3")
            with pytest.raises(RequestTimeout):
                await client.wait_for_checkpoint("a", min_step=9, timeout=0.5)

    run(main)


def test_through_a_real_engine(broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path) -> None:
    """The client's results equal the in-process engine's, through the wire and back."""
    from hotlora.engine.core import Engine

    async def main() -> None:
        async with Engine.from_pretrained(tiny_model_path, dtype="float32", device="cpu") as engine:
            handler = EngineHandler(engine)
            async with (
                Responder(broker.bootstrap, Topics(topic_prefix), handler),
                HotLoraClient(broker.bootstrap, topic_prefix, request_timeout=20, retries=0) as client,
            ):
                await client.create_adapter("a", rank=4, targets="attention")
                greedy = SamplingParams(max_tokens=4, temperature=0.0)
                out = await client.sample("a", [3, 4, 5], params=greedy)
                direct = await engine.sample("a", [3, 4, 5], params=greedy)
                assert out.sequences[0].tokens == direct.sequences[0].tokens
                fb = await client.forward_backward("a", [Datum.from_sequence([3, 4, 5, 6, 7], prompt_len=2)])
                assert fb.num_tokens > 0 and len(fb.logprobs) == 1
                step = await client.optim_step("a", AdamParams(learning_rate=1e-2))
                assert step.version == 1
                with pytest.raises(UnknownAdapter):
                    await client.optim_step("nope")

    run(main, timeout=60)


def test_through_the_engine_service(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    """The real Kafka edge: ``EngineService`` consumes, orders by seq, replies on the client's topic."""
    config = service_config_for_tests(broker.bootstrap, topic_prefix, tiny_model_path, tmp_path / "checkpoints")

    async def main() -> None:
        async with (
            running_engine_service(config),
            HotLoraClient(broker.bootstrap, topic_prefix, request_timeout=20, retries=1) as client,
        ):
            info = await client.create_adapter("a", rank=4, targets="attention")
            assert info.version == 0
            # Issued together: seq restores their order across the rollout and gradient topics.
            datum = Datum.from_sequence([3, 4, 5, 6, 7], prompt_len=2)
            greedy = SamplingParams(max_tokens=3, temperature=0.0)
            before, fb, step, after = await asyncio.gather(
                client.sample("a", [3, 4], params=greedy),
                client.forward_backward("a", [datum]),
                client.optim_step("a", AdamParams(learning_rate=1e-2)),
                client.sample("a", [3, 4], params=greedy),
            )
            assert (before.adapter_version, step.version, after.adapter_version) == (0, 1, 1)
            assert isinstance(fb, ForwardBackwardOutput) and fb.num_tokens > 0
            saved = await client.save_weights_for_sampler("a", tmp_path / "checkpoints" / "sampler-a")
            assert saved.version == 1
            event = await client.wait_for_checkpoint("a", min_step=1, timeout=20)
            assert event.path == saved.path and event.sha256
            with pytest.raises(UnknownAdapter):
                await client.optim_step("nope")

    run(main, timeout=90)
