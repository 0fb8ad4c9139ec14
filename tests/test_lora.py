"""The spine of the suite: a mixed micro-batch gives every adapter exactly what it gets alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hotlora.engine.batching import pack_forward_backward
from hotlora.engine.lora import LoraBatch, LoraContext, LoraPair, MultiLoRALinear, lora_batch
from hotlora.engine.runner import ModelRunner
from hotlora.engine.types import ForwardBackward, LoraSpec
from tests.helpers import grads, max_rel_error, perturb_b, random_datum

RANKS = [2, 4, 8, 16, 3, 5, 12, 1]
TARGETS: list[str | tuple[str, ...]] = ["attention", "mlp", "all-linear", ("q_proj", "v_proj"), ("down_proj",)]


def make_adapters(runner: ModelRunner, k: int) -> list[str]:
    ids = []
    for i in range(k):
        adapter_id = f"ad-{i}"
        spec = LoraSpec(rank=RANKS[i % len(RANKS)], alpha=float(2 * (i + 1)), targets=TARGETS[i % len(TARGETS)], seed=i)
        runner.create_adapter(adapter_id, spec)
        perturb_b(runner, adapter_id, seed=100 + i)
        ids.append(adapter_id)
    return ids


def make_calls(runner: ModelRunner, ids: list[str], seed: int = 0) -> list[ForwardBackward]:
    gen = torch.Generator().manual_seed(seed)
    calls = []
    for i, adapter_id in enumerate(ids):
        rl = i % 2 == 1
        count = 3 if i % 3 == 2 else 2  # runs of unequal length
        datums = [
            random_datum(gen, runner.base.vocab_size, int(torch.randint(5, 24, (1,), generator=gen)), rl)
            for _ in range(count)
        ]
        loss_fn = ["cross_entropy", "importance_sampling", "cross_entropy", "ppo", "cross_entropy", "cispo"][i % 6]
        calls.append(ForwardBackward(adapter_id, datums, loss_fn))
    return calls


def zero_all(runner: ModelRunner) -> None:
    for adapter in runner.adapters.list():
        adapter.optimizer.zero_grad()


@pytest.mark.parametrize("backend", ["auto", "segment"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_mixed_micro_batch_matches_each_adapter_alone(runner: ModelRunner, k: int, backend: str) -> None:
    runner.lora.backend = backend
    ids = make_adapters(runner, k)
    calls = make_calls(runner, ids)
    slots = {a: runner.adapters.get(a).slot for a in ids}
    batches = pack_forward_backward(calls, slots, runner.config.token_budget)
    assert len(batches) == 1, "the test needs every adapter in ONE micro-batch"
    assert len({row.slot for row in batches[0].rows}) == k

    mixed = runner.forward_backward_many(calls)
    mixed_grads = {a: grads(runner, a) for a in ids}
    zero_all(runner)

    runner.lora.backend = "reference"  # solo runs take the plain masked path, not the segment path
    for call, mixed_out in zip(calls, mixed, strict=True):
        assert not isinstance(mixed_out, Exception)
        solo = runner.forward_backward(call.adapter_id, call.datums, call.loss_fn)
        for lm, ls in zip(mixed_out.losses, solo.losses, strict=True):
            assert abs(lm - ls) <= 1e-5 * max(abs(ls), 1e-6), (call.adapter_id, lm, ls)
        for lp_m, lp_s in zip(mixed_out.logprobs, solo.logprobs, strict=True):
            assert max_rel_error(lp_m, lp_s) <= 1e-5
        solo_grads = grads(runner, call.adapter_id)
        assert any(g.abs().sum() > 0 for g in solo_grads)
        for gm, gs in zip(mixed_grads[call.adapter_id], solo_grads, strict=True):
            assert gs.abs().max() > 0, "every factor must get a gradient, or the comparison is empty"
            assert max_rel_error(gm, gs) <= 1e-5
        zero_all(runner)


def test_equivalence_test_detects_a_wrong_adapter(runner: ModelRunner) -> None:
    """Guard the guard: rows served by the wrong adapter must change the loss well beyond 1e-5."""
    ids = make_adapters(runner, 2)
    calls = make_calls(runner, ids)
    right = runner.forward_backward(ids[0], calls[0].datums, calls[0].loss_fn)
    wrong = runner.forward_backward(ids[1], calls[0].datums, calls[0].loss_fn)
    errors = [max_rel_error(w, r) for w, r in zip(wrong.logprobs, right.logprobs, strict=True)]
    assert max(errors) > 100 * 1e-5


def test_base_rows_get_no_delta(runner: ModelRunner) -> None:
    (adapter_id,) = make_adapters(runner, 1)
    ids = torch.randint(3, runner.base.vocab_size, (3, 10), generator=torch.Generator().manual_seed(1))
    mixed = runner.logits(ids, [None, adapter_id, None])
    base = runner.logits(ids, [None, None, None])
    alone = runner.logits(ids[1:2], [adapter_id])
    assert torch.equal(mixed[0], base[0]) and torch.equal(mixed[2], base[2])
    assert not torch.allclose(mixed[1], base[1])
    assert torch.allclose(mixed[1], alone[0], rtol=0, atol=1e-5)


def layer_with_slots(dtype: torch.dtype) -> tuple[MultiLoRALinear, LoraContext]:
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(32, 24, bias=True).to(dtype)
    context = LoraContext()
    layer = MultiLoRALinear(base, "model.layers.0.self_attn.q_proj", context)
    for slot, rank in enumerate([2, 8, 5]):
        a = (torch.randn(rank, 32, generator=gen) * 0.1).to(dtype).requires_grad_(True)
        b = (torch.randn(24, rank, generator=gen) * 0.1).to(dtype).requires_grad_(True)
        layer.attach(slot, LoraPair(A=a, B=b, scale=2.0 / rank))
    return layer, context


@pytest.mark.parametrize(
    ("backend", "dtype", "tol"),
    [("segment", torch.float32, 1e-6), ("grouped", torch.bfloat16, 2e-2)],
)
def test_layer_backends_match_reference(backend: str, dtype: torch.dtype, tol: float) -> None:
    """Segment matmuls (fp32) and torch._grouped_mm (bf16, the CPU dtype it supports) vs the masked reference."""
    layer, context = layer_with_slots(dtype)
    slots = [1, 1, -1, 0, 2, 2, 2, 0]  # several runs, a base row, an adapter appearing twice
    x = torch.randn(len(slots), 6, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    outputs = {}
    for name in ("reference", backend):
        context.backend = name
        with lora_batch(context, slots):
            outputs[name] = layer(x).float()
    assert max_rel_error(outputs[backend], outputs["reference"]) <= tol
    base_only = layer.base(x).float()
    assert torch.equal(outputs[backend][2], base_only[2])


def test_lora_batch_runs() -> None:
    batch = LoraBatch.from_slots([3, 3, -1, 0, 0, 3])
    assert [(r.slot, r.start, r.end) for r in batch.runs] == [(3, 0, 2), (-1, 2, 3), (0, 3, 5), (3, 5, 6)]


def test_peft_style_initialisation_is_seeded(runner: ModelRunner) -> None:
    a = runner.create_adapter("a", LoraSpec(rank=4, seed=7))
    b = runner.create_adapter("b", LoraSpec(rank=4, seed=7))
    c = runner.create_adapter("c", LoraSpec(rank=4, seed=8))
    for name, pair in a.pairs.items():
        assert torch.equal(pair.A, b.pairs[name].A)
        assert not torch.equal(pair.A, c.pairs[name].A)
        assert torch.count_nonzero(pair.B) == 0
        bound = 1.0 / pair.A.shape[1] ** 0.5  # kaiming_uniform(a=sqrt(5)) on [rank, in]
        assert pair.A.abs().max() <= bound
        assert pair.A.abs().max() > 0.5 * bound


def test_adapter_targets_only_its_modules(runner: ModelRunner) -> None:
    adapter = runner.create_adapter("attn", LoraSpec(rank=2, targets="attention"))
    assert adapter.pairs and all(
        name.rsplit(".", 1)[-1] in {"q_proj", "k_proj", "v_proj", "o_proj"} for name in adapter.pairs
    )
    mlp = runner.create_adapter("mlp", LoraSpec(rank=2, targets="mlp"))
    assert all(name.rsplit(".", 1)[-1] in {"gate_proj", "up_proj", "down_proj"} for name in mlp.pairs)
