"""Target logprobs a chunk of tokens at a time equal the full-vocabulary log-softmax they replace."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hotlora.engine import losses as losses_module
from hotlora.engine.batching import MicroBatch, collate, pack_forward_backward
from hotlora.engine.lora import lora_batch
from hotlora.engine.losses import compute_loss, target_logprobs
from hotlora.engine.runner import ModelRunner
from hotlora.engine.types import ForwardBackward, LoraSpec
from tests.helpers import grads, max_rel_error, perturb_b, random_datum


def full_logprobs(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """What ``run_micro_batch`` used to do: the whole fp32 log-softmax, then the targets."""
    return torch.log_softmax(head(hidden).float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("chunk", [1, 3, 7, 40, None])
@pytest.mark.parametrize("bias", [False, True])
def test_chunks_equal_the_full_log_softmax_forward_and_backward(chunk: int | None, bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    head = nn.Linear(16, 50, bias=bias).requires_grad_(False)
    hidden = (torch.randn(23, 16, generator=gen) * 3).requires_grad_(True)
    targets = torch.randint(0, 50, (23,), generator=gen)
    upstream = torch.randn(23, generator=gen)

    ours = target_logprobs(hidden, head, targets, chunk)
    (ours * upstream).sum().backward()
    grad_ours, hidden.grad = hidden.grad, None
    reference = full_logprobs(hidden, head, targets)
    (reference * upstream).sum().backward()

    assert ours.dtype == torch.float32
    assert max_rel_error(ours.detach(), reference.detach()) <= 1e-6
    assert max_rel_error(grad_ours, hidden.grad) <= 1e-6


def test_bf16_head_rounds_logits_like_the_old_path() -> None:
    gen = torch.Generator().manual_seed(1)
    head = nn.Linear(32, 300, bias=False).to(torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(40, 32, generator=gen).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, 300, (40,), generator=gen)
    ours = target_logprobs(hidden, head, targets, chunk_tokens=16)
    ours.sum().backward()
    grad_ours, hidden.grad = hidden.grad, None
    reference = full_logprobs(hidden, head, targets)
    reference.sum().backward()
    assert max_rel_error(ours.detach(), reference.detach()) <= 1e-5
    assert grad_ours.dtype == torch.bfloat16 and max_rel_error(grad_ours.float(), hidden.grad.float()) <= 1e-2


def test_a_trainable_head_is_refused() -> None:
    with pytest.raises(ValueError, match="frozen"):
        target_logprobs(torch.randn(2, 4), nn.Linear(4, 8), torch.tensor([1, 2]))


def old_micro_batch(
    runner: ModelRunner, batch: MicroBatch, calls: Sequence[ForwardBackward]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ModelRunner.run_micro_batch`` before chunking: full logits of every position, padding included."""
    tensors = collate(batch, calls, runner.device)
    with lora_batch(runner.lora, batch.slots):
        logits = runner.model(input_ids=tensors.input_ids, use_cache=False).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target = logprobs.gather(-1, tensors.target_ids.unsqueeze(-1)).squeeze(-1)
    row_losses = torch.zeros(len(batch.rows))
    for (loss_fn, config_items), rows in tensors.loss_groups.items():
        losses = compute_loss(loss_fn, tensors.loss_inputs(rows, target), dict(config_items))
        row_losses = row_losses.index_put((torch.tensor(rows),), losses)
    row_losses.sum().backward()
    return row_losses.detach(), target.detach()


@pytest.mark.parametrize("tokens_per_chunk", [None, 5])
def test_micro_batch_equals_the_full_logits_path(
    runner: ModelRunner, monkeypatch: pytest.MonkeyPatch, tokens_per_chunk: int | None
) -> None:
    if tokens_per_chunk is not None:  # many chunks, some cutting through a row
        monkeypatch.setattr(losses_module, "LOGITS_PER_CHUNK", tokens_per_chunk * runner.base.vocab_size)
    gen = torch.Generator().manual_seed(2)
    vocab = runner.base.vocab_size
    calls = []
    for i, loss_fn in enumerate(["cross_entropy", "ppo", "importance_sampling", "cispo"]):
        runner.create_adapter(f"a{i}", LoraSpec(rank=4 + i, alpha=8.0, seed=i))
        perturb_b(runner, f"a{i}", seed=10 + i)
        datums = [random_datum(gen, vocab, length, rl=True) for length in (11, 4, 17)[: 2 + i % 2]]
        calls.append(ForwardBackward(f"a{i}", datums, loss_fn))
    slots = {call.adapter_id: runner.adapters.get(call.adapter_id).slot for call in calls}
    (batch,) = pack_forward_backward(calls, slots, runner.config.token_budget)

    losses, logprobs = runner.run_micro_batch(batch, calls)
    new_grads = {call.adapter_id: grads(runner, call.adapter_id) for call in calls}
    for adapter in runner.adapters.list():
        adapter.optimizer.zero_grad()
    old_losses, old_logprobs = old_micro_batch(runner, batch, calls)

    assert max_rel_error(losses, old_losses) <= 1e-6
    for i, row in enumerate(batch.rows):
        assert max_rel_error(logprobs[i, : row.length], old_logprobs[i, : row.length]) <= 1e-6
        assert torch.all(logprobs[i, row.length :] == 0), "padding positions are not computed"
    for call in calls:
        for new, old in zip(new_grads[call.adapter_id], grads(runner, call.adapter_id), strict=True):
            assert old.abs().max() > 0 and max_rel_error(new, old) <= 1e-5


class LargestOutput(TorchDispatchMode):
    """The most elements any single op produced."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_no_op_ever_makes_more_than_one_chunk_of_logits() -> None:
    """Forward and backward: the full [tokens, vocab] logits never exist, only [chunk, vocab] pieces."""
    gen = torch.Generator().manual_seed(3)
    tokens, vocab, chunk = 64, 500, 8
    head = nn.Linear(4, vocab, bias=False).requires_grad_(False)  # weight views (2000) stay below a chunk
    hidden = torch.randn(tokens, 4, generator=gen).requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    largest = LargestOutput()
    with largest:
        target_logprobs(hidden, head, targets, chunk).sum().backward()
    assert hidden.grad is not None
    assert largest.numel == chunk * vocab
