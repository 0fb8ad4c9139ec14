"""A training step's contract with the adapters' gradients: checkpointing changes nothing, failure leaves nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hotlora.engine.batching import MicroBatch
from hotlora.engine.runner import ModelRunner, RunnerConfig
from hotlora.engine.types import ForwardBackward, LoraSpec
from tests.helpers import max_rel_error, perturb_b, random_datum

LOSSES = ["cross_entropy", "ppo", "importance_sampling", "cispo"]


def make_runner(path: Path, **config: object) -> ModelRunner:
    torch.manual_seed(0)
    return ModelRunner.from_pretrained(path, dtype="float32", device="cpu", config=RunnerConfig(**config))  # type: ignore[arg-type]


def add_adapters(runner: ModelRunner, count: int) -> list[str]:
    ids = []
    for i in range(count):
        runner.create_adapter(f"a{i}", LoraSpec(rank=[4, 8, 2][i % 3], alpha=16.0, seed=i))
        perturb_b(runner, f"a{i}", seed=20 + i)
        ids.append(f"a{i}")
    return ids


def make_calls(runner: ModelRunner, ids: list[str], seed: int) -> list[ForwardBackward]:
    gen = torch.Generator().manual_seed(seed)
    vocab = runner.base.vocab_size
    return [
        ForwardBackward(
            adapter_id, [random_datum(gen, vocab, n, rl=True) for n in (12, 7, 9)[: 2 + i % 2]], LOSSES[i % 4]
        )
        for i, adapter_id in enumerate(ids)
    ]


def grad_state(runner: ModelRunner) -> dict[str, list[torch.Tensor | None]]:
    return {
        a.adapter_id: [None if p.grad is None else p.grad.detach().clone() for p in a.parameters()]
        for a in runner.adapters.list()
    }


def assert_same_grads(got: dict[str, list[torch.Tensor | None]], want: dict[str, list[torch.Tensor | None]]) -> None:
    assert got.keys() == want.keys()
    for adapter_id in want:
        for g, w in zip(got[adapter_id], want[adapter_id], strict=True):
            assert (g is None) == (w is None), adapter_id
            assert g is None or torch.equal(g, w), adapter_id


def set_grads(runner: ModelRunner, state: dict[str, list[torch.Tensor | None]]) -> None:
    for adapter_id, grads in state.items():
        for p, g in zip(runner.adapters.get(adapter_id).parameters(), grads, strict=True):
            p.grad = None if g is None else g.clone()


@pytest.mark.parametrize("backend", ["auto", "segment"])
def test_gradient_checkpointing_gives_the_same_step(tiny_model_path: Path, backend: str) -> None:
    plain = make_runner(tiny_model_path, lora_backend=backend)
    checkpointed = make_runner(tiny_model_path, lora_backend=backend, gradient_checkpointing=True)
    outputs = {}
    for name, runner in (("plain", plain), ("checkpointed", checkpointed)):
        ids = add_adapters(runner, 3)
        outputs[name] = runner.forward_backward_many(make_calls(runner, ids, seed=1))
    for plain_out, ckpt_out in zip(outputs["plain"], outputs["checkpointed"], strict=True):
        assert not isinstance(plain_out, Exception) and not isinstance(ckpt_out, Exception)
        assert max_rel_error(torch.tensor(ckpt_out.losses), torch.tensor(plain_out.losses)) <= 1e-6
        for a, b in zip(ckpt_out.logprobs, plain_out.logprobs, strict=True):
            assert max_rel_error(a, b) <= 1e-6
    plain_grads, ckpt_grads = grad_state(plain), grad_state(checkpointed)
    for adapter_id, want in plain_grads.items():
        for g, w in zip(ckpt_grads[adapter_id], want, strict=True):
            assert w is not None and g is not None and w.abs().max() > 0
            assert max_rel_error(g, w) <= 1e-6


def test_checkpointing_leaves_decoding_alone(tiny_model_path: Path) -> None:
    """HF drops the KV cache in a checkpointed layer in training mode: that mode must end with the step."""
    runner = make_runner(tiny_model_path, gradient_checkpointing=True)
    ids = add_adapters(runner, 2)
    runner.forward_backward_many(make_calls(runner, ids, seed=2))
    layers = runner._checkpointed
    assert layers and not any(layer.training for layer in layers)
    prompt = torch.randint(3, runner.base.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = runner.model(input_ids=prompt, use_cache=True)
    assert out.past_key_values.get_seq_length() == prompt.shape[1]


def count_micro_batches(path: Path, calls: list[ForwardBackward], **config: object) -> int:
    """How many micro-batches ``calls`` take, counted on a separate runner of the same configuration."""
    runner = make_runner(path, **config)
    add_adapters(runner, len({call.adapter_id for call in calls}))
    counted: list[MicroBatch] = []
    runner.micro_batch_hook = counted.append
    runner.forward_backward_many(calls)
    return len(counted)


@pytest.mark.parametrize("resident_slots", [None, 2])
@pytest.mark.parametrize("fail_at", [1, -1])
def test_a_failed_step_leaves_gradients_as_they_were(
    tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch, resident_slots: int | None, fail_at: int
) -> None:
    """Out of memory (here: an injected error) in a micro-batch after others ran must not leave their
    gradients behind: a retry would count them twice. With 2 resident slots the step also offloads."""
    runner = make_runner(tiny_model_path, token_budget=40, resident_slots=resident_slots)
    ids = add_adapters(runner, 3)
    runner.forward_backward_many(make_calls(runner, ids[:2], seed=4))  # a0, a1 hold gradients, a2 none
    before = grad_state(runner)
    assert before["a2"][0] is None and before["a0"][0] is not None
    calls = make_calls(runner, ids, seed=5)
    batches = count_micro_batches(tiny_model_path, calls, token_budget=40, resident_slots=resident_slots)
    assert batches >= 3, "the test needs micro-batches before and after the failure"
    failing_batch = fail_at % batches

    original = ModelRunner.run_micro_batch
    ran: list[int] = []

    def failing(self: ModelRunner, batch, calls, *args, **kwargs):  # type: ignore[no-untyped-def]
        if len(ran) == failing_batch:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        ran.append(1)
        return original(self, batch, calls, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "run_micro_batch", failing)
    with pytest.raises(torch.OutOfMemoryError):
        runner.forward_backward_many(calls)
    assert len(ran) == failing_batch >= 1
    assert_same_grads(grad_state(runner), before)

    monkeypatch.setattr(ModelRunner, "run_micro_batch", original)
    retried = runner.forward_backward_many(calls)
    after_retry = grad_state(runner)
    set_grads(runner, before)
    uninterrupted = runner.forward_backward_many(calls)
    assert_same_grads(after_retry, grad_state(runner))
    for r, u in zip(retried, uninterrupted, strict=True):
        assert not isinstance(r, Exception) and not isinstance(u, Exception)
        assert r.losses == u.losses


def test_a_step_adds_to_earlier_gradients(tiny_model_path: Path) -> None:
    """Two steps accumulate like one step over both calls' data, as before the gradients were stashed."""
    runner = make_runner(tiny_model_path)
    ids = add_adapters(runner, 2)
    first, second = make_calls(runner, ids, seed=6), make_calls(runner, ids, seed=7)
    runner.forward_backward_many(first)
    runner.forward_backward_many(second)
    two_steps = grad_state(runner)
    set_grads(runner, {a: [None] * len(g) for a, g in two_steps.items()})
    merged = [
        ForwardBackward(a.adapter_id, [*a.datums, *b.datums], a.loss_fn) for a, b in zip(first, second, strict=True)
    ]
    runner.forward_backward_many(merged)
    for adapter_id, grads in grad_state(runner).items():
        for g, w in zip(grads, two_steps[adapter_id], strict=True):
            assert g is not None and w is not None and max_rel_error(g, w) <= 1e-5
