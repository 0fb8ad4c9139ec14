"""Small builders shared by the tests."""

from __future__ import annotations

import torch

from hotlora.engine.runner import ModelRunner
from hotlora.engine.types import Datum


def random_datum(gen: torch.Generator, vocab: int, length: int, rl: bool = False) -> Datum:
    """Random tokens; the first two positions carry no loss, like a prompt."""
    tokens = torch.randint(3, vocab, (length + 1,), generator=gen)
    weights = torch.ones(length)
    weights[:2] = 0.0
    logprobs = advantages = None
    if rl:
        logprobs = -torch.rand(length, generator=gen) * 3.0
        advantages = torch.randn(length, generator=gen) * weights
    return Datum.create(tokens[:-1], tokens[1:], weights, logprobs, advantages)


def perturb_b(runner: ModelRunner, adapter_id: str, seed: int, std: float = 0.05) -> None:
    """B starts at zero, which makes A's gradient zero; give B values so both factors are tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in runner.adapters.get(adapter_id).pairs.values():
            pair.B.copy_(torch.randn(pair.B.shape, generator=gen) * std)


def grads(runner: ModelRunner, adapter_id: str) -> list[torch.Tensor]:
    params = runner.adapters.get(adapter_id).parameters()
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|: elementwise relative error is meaningless for near-zero gradients."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / max(scale, 1e-30)
