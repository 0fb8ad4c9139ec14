"""The engine on an accelerator: the checks `bench/gpu_suite.sh` runs on a lent GPU (``pytest -m cuda``).

They run on CUDA when torch sees a GPU and skip otherwise, saying why; ``HOTLORA_TEST_DEVICE=cpu``
runs the same checks on the CPU, which is how the suite's rehearsal proves they work before device
minutes are spent. Each measured number (errors, mismatches) is recorded as a junit property, so the
suite's report carries it next to the verdict.

Tolerances, stated once: in bf16 a mixed micro-batch's gradients equal each adapter's solo gradients
to 3e-2 of their largest entry (bf16 keeps 8 bits of mantissa and a mixed batch tiles its matmuls
differently, so bit equality is not expected); in fp32 with TF32 off, mixed and solo sampling give the
same tokens and logprobs to 1e-4.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hotlora.agents.grpo import logprob_mismatch, rl_datum
from hotlora.engine.core import Engine, EngineConfig
from hotlora.engine.runner import ModelRunner, RunnerConfig
from hotlora.engine.sampler import NativeSampler
from hotlora.engine.types import AdamParams, ForwardBackward, LoraSpec, Sample, SamplingParams
from tests.helpers import accelerator, grads, max_rel_error, perturb_b, random_datum

pytestmark = pytest.mark.cuda

BF16_GRAD_TOL = 3e-2
FP32_LOGPROB_TOL = 1e-4


@pytest.fixture
def device() -> torch.device:
    return accelerator()


@pytest.fixture
def exact_matmuls(device: torch.device) -> Iterator[None]:
    """fp32 matmuls in full precision for the exactness checks (the engine enables TF32 on CUDA)."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def make_runner(path: Path, device: torch.device, dtype: str, **config: object) -> ModelRunner:
    torch.manual_seed(0)
    return ModelRunner.from_pretrained(path, dtype=dtype, device=str(device), config=RunnerConfig(**config))


def adapters(runner: ModelRunner, k: int) -> list[str]:
    ids = []
    for i in range(k):
        runner.create_adapter(f"dev-{i}", LoraSpec(rank=(4, 8, 16, 8)[i % 4], targets="all-linear", seed=i))
        perturb_b(runner, f"dev-{i}", seed=50 + i)
        ids.append(f"dev-{i}")
    return ids


def calls_for(runner: ModelRunner, ids: list[str]) -> list[ForwardBackward]:
    gen = torch.Generator().manual_seed(7)
    vocab = runner.base.vocab_size
    return [
        ForwardBackward(
            adapter_id,
            [random_datum(gen, vocab, int(torch.randint(8, 40, (1,), generator=gen)), rl=True) for _ in range(3)],
            ("importance_sampling", "ppo", "cross_entropy", "cispo")[i % 4],
        )
        for i, adapter_id in enumerate(ids)
    ]


def test_mixed_forward_backward_matches_solo_in_bf16(
    tiny_model_path: Path, device: torch.device, record_property
) -> None:
    runner = make_runner(tiny_model_path, device, "bfloat16")
    ids = adapters(runner, 4)
    calls = calls_for(runner, ids)
    mixed = runner.forward_backward_many(calls)
    mixed_grads = {a: grads(runner, a) for a in ids}
    for adapter in runner.adapters.list():
        adapter.optimizer.zero_grad()
    worst = 0.0
    for call, out in zip(calls, mixed, strict=True):
        assert not isinstance(out, Exception), out
        alone = runner.forward_backward(call.adapter_id, call.datums, call.loss_fn)
        for got, want in zip(mixed_grads[call.adapter_id], grads(runner, call.adapter_id), strict=True):
            assert want.abs().max() > 0
            worst = max(worst, max_rel_error(got.float(), want.float()))
        assert out.losses == pytest.approx(alone.losses, rel=BF16_GRAD_TOL, abs=1e-2)
        runner.adapters.get(call.adapter_id).optimizer.zero_grad()
    record_property("bf16_mixed_vs_solo_grad_rel_error", worst)
    assert worst <= BF16_GRAD_TOL


def test_every_step_runs_on_the_device(tiny_model_path: Path, device: torch.device) -> None:
    """An RL forward_backward, an optim_step and a mixed sample: the first real-device crash was here."""
    runner = make_runner(tiny_model_path, device, "bfloat16" if device.type == "cuda" else "float32")
    ids = adapters(runner, 2)
    outputs = runner.forward_backward_many(calls_for(runner, ids))
    assert all(not isinstance(out, Exception) for out in outputs), outputs
    for adapter_id in ids:
        assert runner.optim_step(adapter_id, AdamParams(learning_rate=1e-3)).version == 1
        assert all(p.device.type == device.type for p in runner.adapters.get(adapter_id).parameters())
    sampler = NativeSampler(runner, max_rows=8)
    for adapter_id in ids:
        out = sampler.sample(adapter_id, [5, 6, 7], 2, SamplingParams(max_tokens=6, seed=1))
        assert len(out) == 2 and all(len(s.tokens) == len(s.logprobs) for s in out)


def test_offload_round_trip_is_bit_identical(tiny_model_path: Path, device: torch.device) -> None:
    """One resident slot, two adapters: each use evicts the other to host memory (pinned on CUDA) and back."""
    runner = make_runner(tiny_model_path, device, "float32", resident_slots=1)
    ids = adapters(runner, 2)
    for adapter_id in ids:
        runner.forward_backward_many(calls_for(runner, [adapter_id]))
        runner.optim_step(adapter_id, AdamParams(learning_rate=1e-3))
    first = runner.adapters.get(ids[0])
    assert not first.resident
    host = [t for p in first.parameters() for t in (p, *state_tensors(first, p))]
    assert all(t.device.type == "cpu" for t in host)
    if device.type == "cuda":
        assert all(t.is_pinned() for t in host), "offloaded adapter tensors should sit in pinned host memory"
    before = [t.detach().cpu().clone() for t in host]
    runner.adapters.acquire([ids[0]])
    after = [t for p in first.parameters() for t in (p, *state_tensors(first, p))]
    assert all(t.device.type == device.type for t in after)
    for want, got in zip(before, after, strict=True):
        assert torch.equal(want, got.detach().cpu())


def state_tensors(adapter, param: torch.Tensor) -> list[torch.Tensor]:
    state = adapter.optimizer.torch_optimizer.state.get(param, {})
    return [state[key] for key in ("exp_avg", "exp_avg_sq") if key in state]


def test_mixed_sampling_equals_solo_in_fp32(
    tiny_model_path: Path, device: torch.device, exact_matmuls: None, record_property
) -> None:
    runner = make_runner(tiny_model_path, device, "float32")
    ids = adapters(runner, 3)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=3)
    solo = {
        (a, i, kind): NativeSampler(runner).sample(a, p, 2, params)
        for a in ids
        for i, p in enumerate(prompts)
        for kind, params in (("greedy", greedy), ("seeded", seeded))
    }
    sampler = NativeSampler(runner, max_rows=64)
    pending = {}
    for (a, i, kind), _ in solo.items():
        rid = f"{a}-{i}-{kind}"
        sampler.add(Sample(a, prompts[i], 2, greedy if kind == "greedy" else seeded, request_id=rid))
        pending[rid] = (a, i, kind)
    got = {}
    while sampler.has_unfinished():
        got.update(sampler.step())
    worst = 0.0
    for rid, key in pending.items():
        for mixed_seq, solo_seq in zip(got[rid], solo[key], strict=True):
            assert mixed_seq.tokens == solo_seq.tokens, key
            worst = max([worst, *(abs(x - y) for x, y in zip(mixed_seq.logprobs, solo_seq.logprobs, strict=True))])
    record_property("fp32_mixed_vs_solo_logprob_max_abs", worst)
    assert worst <= FP32_LOGPROB_TOL


def test_bf16_sampler_and_trainer_logprobs(tiny_model_path: Path, device: torch.device, record_property) -> None:
    """Measured, not assumed: in bf16 the sampler's logprobs differ from the trainer's (RL's importance ratio)."""
    runner = make_runner(tiny_model_path, device, "bfloat16")
    ids = adapters(runner, 2)
    sampler = NativeSampler(runner, max_rows=32)
    prompt = [5, 6, 7, 8, 9]
    for adapter_id in ids:
        sequences = sampler.sample(adapter_id, prompt, 8, SamplingParams(max_tokens=24, seed=0))
        datums = [rl_datum(prompt, s.tokens, s.logprobs, 1.0) for s in sequences]
        out = runner.forward_backward(adapter_id, datums, "importance_sampling")
        mismatch = logprob_mismatch(datums, out)
        record_property(f"bf16_sampler_trainer_mismatch_{adapter_id}", mismatch)
        assert mismatch < 0.1, mismatch


def test_engine_serves_adapters_end_to_end(tiny_model_path: Path, device: torch.device, tmp_path: Path) -> None:
    """The in-process Engine on the device: create, sample, train, step, save a PEFT checkpoint."""

    async def scenario() -> None:
        config = EngineConfig(max_decode_rows=32)
        dtype = "bfloat16" if device.type == "cuda" else "float32"
        async with Engine.from_pretrained(tiny_model_path, dtype=dtype, device=str(device), config=config) as engine:
            for name in ("e-1", "e-2"):
                await engine.create_adapter(name, LoraSpec(rank=8, seed=1))
            outs = await asyncio.gather(
                *(engine.sample(name, [5, 6, 7], 4, SamplingParams(max_tokens=8, seed=2)) for name in ("e-1", "e-2"))
            )
            for name, out in zip(("e-1", "e-2"), outs, strict=True):
                datums = [
                    rl_datum([5, 6, 7], s.tokens, s.logprobs, a)
                    for s, a in zip(out.sequences, (1, -1, 1, -1), strict=True)
                ]
                await engine.forward_backward(name, datums, "importance_sampling")
                step = await engine.optim_step(name, AdamParams(learning_rate=1e-3))
                assert step.version == 1
                saved = await engine.save_state(name, tmp_path / name)
                assert Path(saved.path, "adapter_model.safetensors").is_file()

    asyncio.run(scenario())
