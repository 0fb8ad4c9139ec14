"""The asyncio facade: many adapters' loops at once, with the same results as one at a time."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from hotlora.engine.core import Engine, EngineConfig
from hotlora.engine.runner import ModelRunner, RunnerConfig
from hotlora.engine.scheduler import SchedulerPolicy
from hotlora.engine.types import AdamParams, Datum, LoraSpec, Sample, SamplingParams
from hotlora.schemas.errors import HotLoraError, InvalidRequest, UnknownAdapter

ADAPTERS = {f"exp-{i}": LoraSpec(rank=2 + 2 * i, targets=["all-linear", "attention"][i % 2], seed=i) for i in range(4)}
STEPS = 3
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


def prompt_for(adapter_id: str, step: int) -> list[int]:
    return [1, 10 + int(adapter_id[-1]), 20 + step, 30]


def rl_datum(prompt: list[int], tokens: list[int], logprobs: list[float], advantage: float) -> Datum:
    sequence = prompt + tokens
    n = len(sequence) - 1
    prompt_part = len(prompt) - 1
    weights = [0.0] * prompt_part + [1.0] * (n - prompt_part)
    sampler_lp = [0.0] * prompt_part + logprobs
    advantages = [0.0] * prompt_part + [advantage] * (n - prompt_part)
    return Datum.create(sequence[:-1], sequence[1:], weights, sampler_lp, advantages)


async def experiment(engine: Engine, adapter_id: str) -> list[tuple[int, list[int], float, int]]:
    """sample -> forward_backward -> optim_step, STEPS times; records what each verb returned."""
    await engine.create_adapter(adapter_id, ADAPTERS[adapter_id])
    trace = []
    for step in range(STEPS):
        prompt = prompt_for(adapter_id, step)
        sampled = await engine.sample(adapter_id, prompt, n=2, params=GREEDY)
        seq = sampled.sequences[0]
        datum = rl_datum(prompt, seq.tokens, seq.logprobs, advantage=1.0 if step % 2 == 0 else -0.5)
        fb = await engine.forward_backward(adapter_id, [datum], "importance_sampling")
        opt = await engine.optim_step(adapter_id, AdamParams(learning_rate=5e-2))
        trace.append((sampled.adapter_version, seq.tokens, fb.loss, opt.version))
    return trace


def sequential_reference(runner: ModelRunner) -> dict[str, list[tuple[int, list[int], float, int]]]:
    """The same experiments, one after another, straight on a runner and sampler: no engine, no overlap."""
    from hotlora.engine.sampler import NativeSampler

    sampler = NativeSampler(runner)
    traces = {}
    for adapter_id, spec in ADAPTERS.items():
        runner.create_adapter(adapter_id, spec)
        trace = []
        for step in range(STEPS):
            prompt = prompt_for(adapter_id, step)
            version = runner.adapters.get(adapter_id).version
            seq = sampler.sample(adapter_id, prompt, n=2, params=GREEDY)[0]
            datum = rl_datum(prompt, seq.tokens, seq.logprobs, advantage=1.0 if step % 2 == 0 else -0.5)
            fb = runner.forward_backward(adapter_id, [datum], "importance_sampling")
            opt = runner.optim_step(adapter_id, AdamParams(learning_rate=5e-2))
            trace.append((version, seq.tokens, fb.loss, opt.version))
        traces[adapter_id] = trace
    return traces


def make_engine(path: Path) -> Engine:
    config = EngineConfig(max_decode_rows=16, scheduler=SchedulerPolicy(decode_steps_per_slice=2))
    runner = ModelRunner.from_pretrained(path, dtype="float32", device="cpu", config=RunnerConfig())
    return Engine(runner, config)


def test_four_concurrent_experiments_match_sequential_runs(tiny_model_path: Path) -> None:
    async def main() -> dict[str, list[tuple[int, list[int], float, int]]]:
        async with make_engine(tiny_model_path) as engine:
            results = await asyncio.wait_for(asyncio.gather(*(experiment(engine, a) for a in ADAPTERS)), timeout=120)
            infos = await engine.list_adapters()
            assert {i.adapter_id: i.version for i in infos} == {a: STEPS for a in ADAPTERS}
            assert engine.steps_run > STEPS * 3, "work of several adapters shared the engine's steps"
            return dict(zip(ADAPTERS, results, strict=True))

    concurrent = asyncio.run(main())
    reference = sequential_reference(
        ModelRunner.from_pretrained(tiny_model_path, dtype="float32", device="cpu", config=RunnerConfig())
    )
    for adapter_id, trace in concurrent.items():
        ref = reference[adapter_id]
        assert [t[0] for t in trace] == list(range(STEPS)), "each sample saw the version before its optim_step"
        assert [t[3] for t in trace] == list(range(1, STEPS + 1))
        assert [t[1] for t in trace] == [r[1] for r in ref]
        assert [t[2] for t in trace] == pytest.approx([r[2] for r in ref], rel=1e-5)
    assert len({tuple(t[1]) for trace in concurrent.values() for t in trace}) > 1


def test_version_semantics_follow_submission_order(tiny_model_path: Path) -> None:
    """Submitted without awaiting: sample, optim_step, sample -> versions 0 then 1, whatever runs first."""

    async def main() -> None:
        async with make_engine(tiny_model_path) as engine:
            await engine.create_adapter("v", LoraSpec(rank=4))
            prompt = [1, 5, 6, 7]
            datum = Datum.from_sequence([*prompt, 8, 9])
            await engine.forward_backward("v", [datum])
            first = asyncio.ensure_future(engine.sample("v", prompt, params=GREEDY))
            await asyncio.sleep(0)
            step = asyncio.ensure_future(engine.optim_step("v", AdamParams(learning_rate=0.5)))
            await asyncio.sleep(0)
            second = asyncio.ensure_future(engine.sample("v", prompt, params=GREEDY))
            a, opt, b = await asyncio.wait_for(asyncio.gather(first, step, second), timeout=60)
            assert (a.adapter_version, opt.version, b.adapter_version) == (0, 1, 1)
            assert a.sequences[0].tokens != b.sequences[0].tokens, "the big step changed the adapter's output"

    asyncio.run(main())


def test_bad_requests_fail_alone_and_the_engine_keeps_serving(tiny_model_path: Path) -> None:
    async def main() -> None:
        async with make_engine(tiny_model_path) as engine:
            await engine.create_adapter("ok", LoraSpec(rank=2))
            with pytest.raises(UnknownAdapter):
                await engine.optim_step("missing")
            with pytest.raises(UnknownAdapter):
                await engine.sample("missing", [1, 2])
            with pytest.raises(InvalidRequest):
                await engine.submit(Sample("ok", [1, 2], n=64))  # wider than the decode batch
            with pytest.raises(InvalidRequest, match="vocabulary"):
                await engine.forward_backward("ok", [Datum.create([1, 99999], [2, 3])])
            out = await engine.sample("ok", [1, 2, 3], params=GREEDY)
            assert len(out.sequences) == 1
            await engine.delete_adapter("ok")
            with pytest.raises(UnknownAdapter):
                await engine.sample("ok", [1, 2])
            assert await engine.list_adapters() == []

    asyncio.run(main())


def test_save_and_load_state_through_the_engine(tiny_model_path: Path, tmp_path: Path) -> None:
    async def main() -> None:
        async with make_engine(tiny_model_path) as engine:
            await engine.create_adapter("s", LoraSpec(rank=4, seed=3))
            await engine.forward_backward("s", [Datum.from_sequence([1, 4, 5, 6, 7])])
            await engine.optim_step("s", AdamParams(learning_rate=0.1))
            saved = await engine.save_state("s", tmp_path / "s")
            assert saved.version == 1 and Path(saved.path, "adapter_model.safetensors").is_file()
            info = await engine.load_state("copy", tmp_path / "s")
            assert info.version == 1
            a = await engine.sample("s", [1, 4, 5], params=GREEDY)
            b = await engine.sample("copy", [1, 4, 5], params=GREEDY)
            assert a.sequences[0].tokens == b.sequences[0].tokens

    asyncio.run(main())


def test_a_refused_create_leaves_nothing_queued(tiny_model_path: Path) -> None:
    """A request refused at submit must not stay in the scheduler (it would run later with no request)."""

    async def main() -> None:
        async with make_engine(tiny_model_path) as engine:
            with pytest.raises(InvalidRequest, match="weight"):
                await engine.create_adapter("w", LoraSpec(rank=2), weight=-1.0)
            assert engine.scheduler.pending() == 0
            await engine.create_adapter("w", LoraSpec(rank=2))
            out = await engine.sample("w", [1, 2, 3], params=GREEDY)
            assert out.adapter_version == 0

    asyncio.run(main())


def test_event_loop_stays_responsive_while_the_model_works(tiny_model_path: Path) -> None:
    """Model steps run in the worker thread: a ticker on the loop keeps ticking during a long decode."""

    async def main() -> None:
        async with make_engine(tiny_model_path) as engine:
            await engine.create_adapter("t", LoraSpec(rank=2))
            ticks = 0
            stop = asyncio.Event()

            async def ticker() -> None:
                nonlocal ticks
                while not stop.is_set():
                    ticks += 1
                    await asyncio.sleep(0.001)

            task = asyncio.create_task(ticker())
            await engine.sample("t", [1, 2, 3], n=8, params=SamplingParams(max_tokens=60, temperature=1.0, seed=1))
            stop.set()
            await task
            assert ticks > 10

    torch.manual_seed(0)
    asyncio.run(main())


def test_a_failing_step_fails_its_requests_and_the_engine_recovers(
    tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with make_engine(tiny_model_path) as engine:
            await engine.create_adapter("f", LoraSpec(rank=2))
            original = engine.sampler.step

            def broken_step() -> list:
                raise RuntimeError("simulated device fault")

            monkeypatch.setattr(engine.sampler, "step", broken_step)
            with pytest.raises(HotLoraError, match="simulated device fault") as info:
                await asyncio.wait_for(engine.sample("f", [1, 2, 3], params=GREEDY), timeout=30)
            assert info.value.code == "internal"
            monkeypatch.setattr(engine.sampler, "step", original)
            out = await asyncio.wait_for(engine.sample("f", [1, 2, 3], params=GREEDY), timeout=30)
            assert out.sequences[0].tokens

    asyncio.run(main())


def test_requests_finished_before_a_failure_in_the_same_slice_keep_their_results(
    tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        config = EngineConfig(max_decode_rows=16, scheduler=SchedulerPolicy(decode_steps_per_slice=8))
        runner = ModelRunner.from_pretrained(tiny_model_path, dtype="float32", device="cpu", config=RunnerConfig())
        async with Engine(runner, config) as engine:
            await engine.create_adapter("g", LoraSpec(rank=2))
            original = engine.sampler.step
            calls = 0

            def fails_on_third_step() -> list:
                nonlocal calls
                calls += 1
                if calls == 3:
                    raise RuntimeError("fault after the short request finished")
                return original()

            monkeypatch.setattr(engine.sampler, "step", fails_on_third_step)
            short = engine.sample("g", [1, 2, 3], params=SamplingParams(max_tokens=1, temperature=0.0))
            long = engine.sample("g", [1, 2, 4], params=SamplingParams(max_tokens=20, temperature=0.0))
            results = await asyncio.wait_for(asyncio.gather(short, long, return_exceptions=True), timeout=30)
            assert not isinstance(results[0], Exception) and len(results[0].sequences[0].tokens) == 1
            assert isinstance(results[1], HotLoraError) and results[1].code == "internal"
            monkeypatch.setattr(engine.sampler, "step", original)
            await asyncio.wait_for(engine.optim_step("g"), timeout=30)  # the adapter's barrier is not stuck

    asyncio.run(main())
