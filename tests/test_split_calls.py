"""A forward_backward over the training slice's budget runs as parts: the same answer and gradient as
unsplit, all or nothing, and other tenants' work runs between its parts (``engine.split_calls``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from hotlora.engine.core import Engine, EngineConfig
from hotlora.engine.runner import ModelRunner, RunnerConfig
from hotlora.engine.scheduler import SchedulerPolicy, TrainSlice
from hotlora.engine.split_calls import split_datums
from hotlora.engine.types import Datum, ForwardBackward, LoraSpec, SamplingParams
from hotlora.schemas.errors import InternalError, InvalidRequest
from tests.helpers import grads, max_rel_error, perturb_b, random_datum

BUDGET = 128  # tokens per training slice in these tests: 12 datums of 20, 27 and 34 tokens make 4 parts
MICRO = 64  # the runner's micro-batch budget, smaller than a part: parts and whole calls pack alike


def datums(seed: int, count: int = 12, vocab: int = 64) -> list[Datum]:
    gen = torch.Generator().manual_seed(seed)
    return [random_datum(gen, vocab, 20 + (7 * i) % 21, rl=True) for i in range(count)]


def make_engine(path: Path, budget: int) -> Engine:
    config = EngineConfig(
        max_decode_rows=8,
        scheduler=SchedulerPolicy(decode_steps_per_slice=2, train_token_budget=budget),
        runner=RunnerConfig(token_budget=MICRO),
    )
    runner = ModelRunner.from_pretrained(path, dtype="float32", device="cpu", config=config.runner)
    return Engine(runner, config)


async def primed(engine: Engine) -> list[torch.Tensor]:
    """Adapter "a" with both LoRA factors nonzero and an earlier call's gradient: what a split call adds
    to (or, failing, must leave exactly as it was). Returns that gradient."""
    await engine.create_adapter("a", LoraSpec(rank=4, seed=1))
    perturb_b(engine.runner, "a", seed=2)
    await engine.forward_backward("a", datums(7, count=2), "importance_sampling")
    return grads(engine.runner, "a")


def unchanged(runner: ModelRunner, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(grads(runner, "a"), before, strict=True))


def test_split_datums_keeps_order_and_budget() -> None:
    lengths = [10, 30, 5, 5, 40, 200, 3, 3, 3]
    items = [Datum.create(list(range(n)), list(range(n)), [1.0] * n) for n in lengths]
    runs = split_datums(items, 64)
    assert [i for run in runs for i in run] == list(range(len(lengths)))  # every datum once, in order
    for run in runs:
        cost = max(lengths[i] for i in run) * len(run)
        assert cost <= 64 or len(run) == 1  # a datum over the budget runs alone, never refused
    assert range(5, 6) in runs  # the 200-token datum
    assert split_datums(items[:2], 1000) == [range(0, 2)]  # fits: one run, nothing to split
    with pytest.raises(ValueError):
        split_datums(items, 0)


def test_split_call_gives_the_unsplit_answer_and_gradient(tiny_model_path: Path) -> None:
    async def run(budget: int) -> tuple[list[float], list[torch.Tensor], list[torch.Tensor], int]:
        async with make_engine(tiny_model_path, budget) as engine:
            await primed(engine)  # the split call adds to an earlier gradient, as an unsplit one would
            out = await engine.forward_backward("a", datums(3), "importance_sampling")
            return out.losses, out.logprobs, grads(engine.runner, "a"), out.num_tokens

    whole, split = asyncio.run(run(budget=100_000)), asyncio.run(run(budget=BUDGET))
    assert len(split_datums(datums(3), BUDGET)) == 4
    assert split[3] == whole[3]
    torch.testing.assert_close(torch.tensor(split[0]), torch.tensor(whole[0]), rtol=1e-5, atol=1e-6)
    for a, b in zip(split[1], whole[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(split[2]) == len(whole[2]) and all(
        max_rel_error(a, b) < 1e-5 for a, b in zip(split[2], whole[2], strict=True)
    )


def test_other_tenants_run_between_the_parts(tiny_model_path: Path) -> None:
    """A sample sent with a huge forward_backward finishes before it; unsplit, it waited for the whole call."""

    async def order(budget: int) -> tuple[list[str], int]:
        async with make_engine(tiny_model_path, budget) as engine:
            await engine.create_adapter("big", LoraSpec(rank=4, seed=1))
            await engine.create_adapter("small", LoraSpec(rank=4, seed=2))
            finished: list[str] = []
            slices: list[int] = []
            execute = engine._execute

            def counting(step: object) -> object:
                if isinstance(step, TrainSlice):
                    slices.append(len(step.items))
                return execute(step)  # type: ignore[arg-type]

            engine._execute = counting  # type: ignore[method-assign]

            async def done(name: str, work: object) -> None:
                await work  # type: ignore[misc]
                finished.append(name)

            # 12 decode steps at 2 per slice: 6 decode slices, alternating with the training slices.
            params = SamplingParams(max_tokens=12, temperature=0.0)
            await asyncio.gather(
                done("forward_backward", engine.forward_backward("big", datums(5, count=24), "importance_sampling")),
                done("sample", engine.sample("small", [1, 2, 3], n=1, params=params)),
            )
            return finished, len(slices)

    unsplit, one_slice = asyncio.run(order(budget=100_000))
    split, many_slices = asyncio.run(order(budget=BUDGET))
    assert (unsplit, one_slice) == (["forward_backward", "sample"], 1)
    assert split == ["sample", "forward_backward"] and many_slices > 6


def test_a_failed_part_fails_the_call_and_leaves_the_gradient_alone(tiny_model_path: Path) -> None:
    async def main() -> None:
        async with make_engine(tiny_model_path, BUDGET) as engine:
            before = await primed(engine)
            runner = engine.runner
            real, calls = runner._run_calls, []
            fail_at = 3

            def failing(batch: list[ForwardBackward], backward: bool = True) -> object:
                calls.append(batch[0].request_id)
                if len(calls) == fail_at:
                    raise RuntimeError("out of memory (injected)")
                return real(batch, backward)

            runner._run_calls = failing  # type: ignore[method-assign]
            with pytest.raises(InternalError, match="injected"):
                await engine.forward_backward("a", datums(3), "importance_sampling")
            assert len(calls) == 3 and unchanged(runner, before)  # the parts after the failed one never ran

            # A bad datum in the last part refuses the call before any part runs.
            calls.clear()
            fail_at = 0
            vocab = runner.base.vocab_size
            bad = datums(3)
            bad[-1] = Datum.create([1, 2, vocab], [2, 3, 4], [1.0, 1.0, 1.0], [0.0] * 3, [1.0] * 3)
            with pytest.raises(InvalidRequest, match="outside the vocabulary"):
                await engine.forward_backward("a", bad, "importance_sampling")
            assert calls == [] and unchanged(runner, before)
            # The engine goes on: the same call without the bad datum trains, in parts.
            out = await engine.forward_backward("a", bad[:-1], "importance_sampling")
            assert len(out.losses) == len(bad) - 1 and len(calls) == len(split_datums(bad[:-1], BUDGET))

    asyncio.run(main())


def test_forward_only_parts_touch_no_gradient(tiny_model_path: Path) -> None:
    async def main() -> None:
        async with make_engine(tiny_model_path, BUDGET) as engine:
            before = await primed(engine)
            call = ForwardBackward("a", datums(3), "importance_sampling", forward_only=True)
            out = await engine.submit(call)
            assert len(out.losses) == 12 and unchanged(engine.runner, before)

    asyncio.run(main())
