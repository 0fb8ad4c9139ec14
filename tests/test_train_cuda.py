"""The training step's GPU paths on the accelerator (``pytest -m cuda``; skipped without CUDA, like tests/test_cuda.py).

``HOTLORA_TEST_DEVICE=cpu`` rehearses them on the CPU. On an sm90 GPU ``auto`` takes torch's CUTLASS
grouped GEMM, whose alignment rules are device-side asserts: a misaligned rank would poison the CUDA
context, which is why these run ranks that are not multiples of 8.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from hotlora.engine import lora as lora_module
from hotlora.engine.lora import LoraContext, LoraPair, MultiLoRALinear, lora_batch
from hotlora.engine.losses import target_logprobs
from hotlora.engine.runner import ModelRunner, RunnerConfig
from hotlora.engine.types import ForwardBackward, LoraSpec
from tests.helpers import accelerator, grads, max_rel_error, perturb_b, random_datum

pytestmark = pytest.mark.cuda

BF16_TOL = 3e-2  # as tests/test_cuda.py: bf16 keeps 8 bits of mantissa


@pytest.fixture
def device() -> torch.device:
    return accelerator()


def test_grouped_equals_reference_for_unaligned_ranks(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(0)
    context = LoraContext()
    base = nn.Linear(256, 512, bias=False).to(device=device, dtype=torch.bfloat16).requires_grad_(False)
    layer = MultiLoRALinear(base, "model.layers.0.mlp.up_proj", context)
    pairs = []
    for slot, rank in enumerate([3, 5, 7, 16, 24]):
        a = (torch.randn(rank, 256, generator=gen) * 0.1).to(device).requires_grad_(True)
        b = (torch.randn(512, rank, generator=gen) * 0.1).to(device).requires_grad_(True)
        pairs.append(LoraPair(A=a, B=b, scale=2.0 / rank))
        layer.attach(slot, pairs[-1])
    slots = [0] * 3 + [-1] * 2 + [1] * 5 + [2, 3, 3, 4, 4, 4]
    x = torch.randn(len(slots), 37, 256, generator=gen).to(device=device, dtype=torch.bfloat16)
    results = {}
    for backend in ("grouped", "reference"):
        for p in pairs:
            p.A.grad = p.B.grad = None
        context.backend = backend
        with lora_batch(context, slots):
            out = layer(x)
        out.float().square().sum().backward()
        results[backend] = (out.float(), [t.grad.clone() for p in pairs for t in (p.A, p.B)])
    assert max_rel_error(results["grouped"][0], results["reference"][0]) <= BF16_TOL
    for got, want in zip(results["grouped"][1], results["reference"][1], strict=True):
        assert got.dtype == torch.float32 and max_rel_error(got, want) <= BF16_TOL


def test_auto_takes_the_grouped_kernel_in_training(
    tiny_model_path: Path, device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 activations with fp32 factors reach the grouped path on CUDA (they never did before)."""
    taken: list[str] = []
    original = MultiLoRALinear._delta_grouped

    def spy(self, *args):  # type: ignore[no-untyped-def]
        taken.append(self.name)
        return original(self, *args)

    monkeypatch.setattr(MultiLoRALinear, "_delta_grouped", spy)
    torch.manual_seed(0)
    runner = ModelRunner.from_pretrained(tiny_model_path, dtype="bfloat16", device=str(device))
    gen = torch.Generator().manual_seed(1)
    calls = []
    for i in range(3):
        runner.create_adapter(f"g{i}", LoraSpec(rank=(4, 12, 8)[i], targets="all-linear", seed=i))
        perturb_b(runner, f"g{i}", seed=i)
        datums = [random_datum(gen, runner.base.vocab_size, 120, rl=True) for _ in range(2)]
        calls.append(ForwardBackward(f"g{i}", datums, "ppo"))
    outputs = runner.forward_backward_many(calls)
    assert all(not isinstance(out, Exception) for out in outputs), outputs
    assert (len(taken) > 0) == lora_module.grouped_mm_fast(
        torch.empty(8, 64, dtype=torch.bfloat16, device=device), 64, 64
    )
    for call in calls:
        assert all(g.dtype == torch.float32 and g.abs().max() > 0 for g in grads(runner, call.adapter_id))


def test_gradient_checkpointing_matches_on_the_device(tiny_model_path: Path, device: torch.device) -> None:
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        config = RunnerConfig(gradient_checkpointing=checkpointing)
        runner = ModelRunner.from_pretrained(tiny_model_path, dtype="bfloat16", device=str(device), config=config)
        runner.create_adapter("c", LoraSpec(rank=8, targets="all-linear", seed=3))
        perturb_b(runner, "c", seed=4)
        gen = torch.Generator().manual_seed(5)
        datums = [random_datum(gen, runner.base.vocab_size, 60, rl=True) for _ in range(3)]
        runner.forward_backward("c", datums, "cispo")
        results.append(grads(runner, "c"))
    for plain, checkpointed in zip(*results, strict=True):
        # Same kernels recomputed; only attention backward's atomics may reorder sums (bf16 noise).
        assert max_rel_error(checkpointed, plain) <= BF16_TOL


def test_target_logprobs_never_holds_the_whole_vocabulary(device: torch.device) -> None:
    """Qwen3's vocabulary, 4096 tokens: the full fp32 logits alone would be 2.5 GB."""
    if device.type != "cuda":
        pytest.skip("peak memory is measured with CUDA's allocator")
    vocab, tokens, width = 151936, 4096, 256
    head = nn.Linear(width, vocab, bias=False).to(device=device, dtype=torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(tokens, width, device=device, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    target_logprobs(hidden, head, targets).sum().backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - start
    full = tokens * vocab * 4
    assert peak < full / 2, f"peak {peak / 2**30:.2f} GiB vs {full / 2**30:.2f} GiB of full fp32 logits"
