"""Fair decode rows through the engine: a flooding tenant cannot hold another tenant's sample back.

Bounds are counted in engine steps (decode slices), never in seconds, so a slow or busy machine
cannot make them fail; each is far below what head-of-line blocking costs (stated at each assert).
"""

from __future__ import annotations

import asyncio

from hotlora.engine.core import Engine, EngineConfig
from hotlora.engine.runner import ModelRunner
from hotlora.engine.sampler import NativeSampler
from hotlora.engine.scheduler import SchedulerPolicy, Step, TrainSlice
from hotlora.engine.types import Datum, LoraSpec, SamplingParams

WAIT_S = 120.0  # every wait is bounded; a healthy run takes a few seconds
FLOOD_TOKENS = 64
VICTIM_TOKENS = 6
STEPS_PER_SLICE = 4


async def _until(what: str, predicate: object, timeout: float = WAIT_S) -> None:
    """Poll an in-process predicate (engine state) until true; fail loudly after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


def test_a_flood_does_not_delay_another_tenants_sample(runner: ModelRunner) -> None:
    """The flooder fills every decode row with long samples; the victim's short sample still finishes
    within 3 decode slices of its submission (it needs 2 slices of decoding, plus at most one slice in
    flight when it arrives). Without pausing it would wait for a flood row to finish first: at least
    FLOOD_TOKENS / STEPS_PER_SLICE = 16 slices. The flooder keeps at least a third of the rows and finishes."""
    victim_params = SamplingParams(max_tokens=VICTIM_TOKENS, temperature=0.0)
    prompt = [5, 6, 7, 8]

    async def main() -> None:
        policy = SchedulerPolicy(decode_steps_per_slice=STEPS_PER_SLICE)
        async with Engine(runner, EngineConfig(max_decode_rows=8, scheduler=policy)) as engine:
            await engine.create_adapter("flood", LoraSpec(rank=4, seed=1))
            await engine.create_adapter("victim", LoraSpec(rank=4, seed=2))
            flood_params = SamplingParams(max_tokens=FLOOD_TOKENS, temperature=1.0, seed=3)
            flood = [
                asyncio.create_task(engine.sample("flood", [9, 10, 11 + k], n=4, params=flood_params))
                for k in range(12)
            ]
            await _until("the flood to hold every decode row", lambda: engine.tenant_rows.get("flood", (0, 0))[0] == 8)
            submitted_at = engine.steps_run
            seen: list[dict[str, tuple[int, int]]] = []

            async def watch() -> None:  # what each decode slice left, while the victim is in flight
                while True:
                    if not seen or seen[-1] is not engine.tenant_rows:
                        seen.append(engine.tenant_rows)
                    await asyncio.sleep(0)

            watcher = asyncio.create_task(watch())
            try:
                victim = await asyncio.wait_for(engine.sample("victim", prompt, n=2, params=victim_params), WAIT_S)
            finally:
                watcher.cancel()
            slices = engine.steps_run - submitted_at
            assert slices <= 3, f"the victim waited {slices} decode slices"
            assert not any(task.done() for task in flood)  # it did not wait for a flood request to finish
            shared = [rows for rows in seen if "victim" in rows]
            assert shared, seen
            for rows in shared:  # both decode at once; the flood is throttled (paused rows), not stopped
                assert rows["victim"] == (2, 0) and rows["flood"][0] >= 8 // 3 and rows["flood"][1] > 0, rows
            results = await asyncio.wait_for(asyncio.gather(*flood), WAIT_S)
            assert all(len(seq.tokens) == FLOOD_TOKENS for result in results for seq in result.sequences)
            alone = NativeSampler(runner).sample("victim", prompt, 2, victim_params)
            assert [s.tokens for s in victim.sequences] == [s.tokens for s in alone]

    asyncio.run(asyncio.wait_for(main(), WAIT_S * 2))


def test_one_adapter_cannot_take_every_admission_row(runner: ModelRunner) -> None:
    """The scheduler admits at most max_decode_rows rows per adapter, so a newcomer is admitted at once."""

    async def main() -> None:
        async with Engine(runner, EngineConfig(max_decode_rows=8)) as engine:
            assert engine.admission_rows == 16 and engine.scheduler.policy.max_adapter_rows == 8
            await engine.create_adapter("flood", LoraSpec(rank=4, seed=1))
            params = SamplingParams(max_tokens=FLOOD_TOKENS, temperature=0.0)
            flood = [asyncio.create_task(engine.sample("flood", [9, 10 + k], n=4, params=params)) for k in range(8)]
            await _until("the flood to be admitted", lambda: engine.scheduler.adapter_rows("flood") > 0)
            assert engine.scheduler.adapter_rows("flood") <= 8
            assert engine.scheduler.pending("flood") >= 8 - 2  # the rest waits in the scheduler, not in rows
            await asyncio.wait_for(asyncio.gather(*flood), WAIT_S)

    asyncio.run(asyncio.wait_for(main(), WAIT_S * 2))


def test_a_training_flood_leaves_sampling_its_time(runner: ModelRunner) -> None:
    """A tenant sends forward_backward calls of several training slices back to back; another tenant's
    16-token sample, at 2 decode steps per slice, would alternate with those slices: 8 decode slices and
    7 training slices between its submission and its result. Sampling now gets as much time as the last
    training slice took (a few decode steps take far less than 8192 tokens of training), so at most 2
    training slices run before the sample is answered: the one in flight when it arrives, and one more
    if it lands between a decode slice and the next training slice."""

    async def main() -> None:
        policy = SchedulerPolicy(decode_steps_per_slice=2)
        async with Engine(runner, EngineConfig(max_decode_rows=8, scheduler=policy)) as engine:
            await engine.create_adapter("flood", LoraSpec(rank=4, seed=1))
            await engine.create_adapter("victim", LoraSpec(rank=4, seed=2))
            trained: list[int] = []
            execute = engine._execute

            def counting(step: Step) -> object:
                if isinstance(step, TrainSlice):
                    trained.append(sum(item.tokens for item in step.items))
                return execute(step)

            engine._execute = counting  # type: ignore[method-assign,assignment]
            vocab, stop = runner.base.vocab_size, asyncio.Event()

            async def flood(k: int) -> None:
                tokens = [3 + (k * 13 + j) % (vocab - 3) for j in range(65)]
                batch = [Datum.from_sequence(tokens) for _ in range(256)]  # 64 tokens each: 2 slices
                while not stop.is_set():
                    await engine.forward_backward("flood", batch)

            loops = [asyncio.create_task(flood(k)) for k in range(2)]
            try:
                await _until("the flood to run a training slice", lambda: len(trained) >= 1)
                before = len(trained)
                params = SamplingParams(max_tokens=16, temperature=0.0)
                out = await asyncio.wait_for(engine.sample("victim", [5, 6, 7], n=1, params=params), WAIT_S)
                assert len(out.sequences[0].tokens) == 16
                waited = len(trained) - before
                assert waited <= 2, f"{waited} training slices ran while the sample waited"
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*loops), WAIT_S)
            assert max(trained) == 8192  # the flood's calls ran as slice-sized parts

    asyncio.run(asyncio.wait_for(main(), WAIT_S * 2))
