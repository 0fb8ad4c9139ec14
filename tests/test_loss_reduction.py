"""Loss reduction as ``docs/protocol.md`` states it, through the runner (not the loss functions alone).

A datum's loss is the *sum* of its token losses, each times its weight; the gradient of a request is
the gradient of the sum of its datums' losses, and gradients add up across ``forward_backward`` calls
until ``optim_step``. Nothing is divided by token or datum counts or by the weights' sum: the learning
rate a client picks depends on it, so a client in another language must not have to guess.
"""

from __future__ import annotations

import pytest
import torch

from hotlora.engine.runner import ModelRunner
from hotlora.engine.types import Datum, LoraSpec
from tests.helpers import grads, max_rel_error, perturb_b, random_datum

LOSSES = ("cross_entropy", "importance_sampling", "ppo", "cispo")
EPS_LOW, EPS_HIGH = 0.2, 0.3  # ppo / cispo clip bounds, asymmetric so a swapped pair would show


def expected_loss(loss_fn: str, datum: Datum, lp: torch.Tensor) -> float:
    """The documented per-datum formula, in float64, over the target logprobs the engine returned."""
    lp, w = lp.double(), datum.weights.double()
    if loss_fn == "cross_entropy":
        return float(-(w * lp).sum())
    assert datum.logprobs is not None and datum.advantages is not None
    q, adv = datum.logprobs.double(), datum.advantages.double()
    ratio = torch.exp(lp - q)
    clipped = ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH)
    per_token = {
        "importance_sampling": ratio * adv,
        "ppo": torch.minimum(ratio * adv, clipped * adv),
        "cispo": clipped * lp * adv,
    }[loss_fn]
    return float(-(w * per_token).sum())


def _datums(runner: ModelRunner, seed: int) -> list[Datum]:
    """RL datums (every loss can read them) of different lengths, with uneven weights in [0, 2)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = runner.base.vocab_size
    datums = []
    for length in (7, 12, 5):
        d = random_datum(gen, vocab, length, rl=True)
        weights = torch.rand(length, generator=gen) * 2.0
        weights[0] = 0.0  # a prompt position
        datums.append(Datum.create(d.input_tokens, d.target_tokens, weights, d.logprobs, d.advantages))
    return datums


def _adapter(runner: ModelRunner) -> None:
    runner.create_adapter("a", LoraSpec(rank=4, seed=1))
    perturb_b(runner, "a", seed=2)  # B = 0 would make some gradients zero


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_a_datums_loss_is_the_weighted_sum_of_its_token_losses(runner: ModelRunner, loss_fn: str) -> None:
    _adapter(runner)
    datums = _datums(runner, seed=3)
    config = {"clip_epsilon_low": EPS_LOW, "clip_epsilon_high": EPS_HIGH} if loss_fn in ("ppo", "cispo") else {}
    out = runner.forward_backward("a", datums, loss_fn, config)
    assert len(out.losses) == len(out.logprobs) == len(datums)
    for datum, loss, lp in zip(datums, out.losses, out.logprobs, strict=True):
        assert lp.shape == datum.weights.shape
        assert loss == pytest.approx(expected_loss(loss_fn, datum, lp), rel=1e-5, abs=1e-5)
    # Sum, not mean: a 7-token cross-entropy datum of unit weights loses the sum of its 7 logprobs.
    if loss_fn == "cross_entropy":
        ones = Datum.create(datums[0].input_tokens, datums[0].target_tokens)
        plain = runner.forward_backward("a", [ones])
        assert len(ones) == 7
        assert plain.losses[0] == pytest.approx(-float(plain.logprobs[0].double().sum()), rel=1e-5)


def test_weights_scale_the_loss_and_the_gradient_unnormalised(runner: ModelRunner) -> None:
    """Doubling every weight doubles the loss and the gradient: no division by the weights' sum."""
    _adapter(runner)
    datums = _datums(runner, seed=4)
    doubled = [Datum.create(d.input_tokens, d.target_tokens, d.weights * 2.0, d.logprobs, d.advantages) for d in datums]
    once = runner.forward_backward("a", datums, "importance_sampling")
    grad_once = grads(runner, "a")
    runner.adapters.get("a").optimizer.zero_grad()
    twice = runner.forward_backward("a", doubled, "importance_sampling")
    grad_twice = grads(runner, "a")
    assert twice.losses == pytest.approx([2 * x for x in once.losses], rel=1e-5)
    assert any(g.abs().max() > 0 for g in grad_once)
    for g1, g2 in zip(grad_once, grad_twice, strict=True):
        assert max_rel_error(g2, 2 * g1) <= 1e-5


def test_gradients_add_up_over_datums_and_calls(runner: ModelRunner) -> None:
    """One call of three datums, or three calls of one each before ``optim_step``: the same gradient,
    the sum of the three (a mean over datums would make the split gradient three times larger)."""
    _adapter(runner)
    datums = _datums(runner, seed=5)
    together = runner.forward_backward("a", datums)
    grad_together = grads(runner, "a")
    runner.adapters.get("a").optimizer.zero_grad()
    apart = [runner.forward_backward("a", [d]).losses[0] for d in datums]
    grad_apart = grads(runner, "a")
    assert apart == pytest.approx(together.losses, rel=1e-5)
    for g1, g2 in zip(grad_together, grad_apart, strict=True):
        assert max_rel_error(g2, g1) <= 1e-5
