"""Tinker's ``forward`` (``ForwardBackward.forward_only``) and the per-datum loss inputs, through the runner."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hotlora.engine.runner import ModelRunner, RunnerConfig
from hotlora.engine.types import Datum, ForwardBackward, LoraSpec
from hotlora.schemas.errors import InvalidRequest
from tests.helpers import perturb_b, random_datum


def make_runner(path: Path) -> ModelRunner:
    torch.manual_seed(0)
    runner = ModelRunner.from_pretrained(path, dtype="float32", device="cpu", config=RunnerConfig())
    for i, adapter_id in enumerate(("a", "b")):
        runner.create_adapter(adapter_id, LoraSpec(rank=4, alpha=16.0, seed=i))
        perturb_b(runner, adapter_id, seed=10 + i)
    return runner


def grads(runner: ModelRunner, adapter_id: str) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in runner.adapters.get(adapter_id).parameters()]


def rl_datums(runner: ModelRunner, seed: int) -> list[Datum]:
    gen = torch.Generator().manual_seed(seed)
    return [random_datum(gen, runner.base.vocab_size, n, rl=True) for n in (9, 5)]


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "ppo", "cispo", "dro"])
def test_forward_gives_forward_backwards_numbers_and_leaves_gradients_alone(
    tiny_model_path: Path, loss_fn: str
) -> None:
    runner = make_runner(tiny_model_path)
    config = {"beta": 0.1} if loss_fn == "dro" else {}
    datums = rl_datums(runner, seed=1)
    runner.forward_backward("a", rl_datums(runner, seed=2), "ppo")  # "a" holds gradients, "b" none
    before_a, before_b = grads(runner, "a"), grads(runner, "b")
    # Forward-only calls of both adapters, in one step.
    calls = [
        ForwardBackward("a", datums, loss_fn, config, forward_only=True),
        ForwardBackward("b", datums, loss_fn, config, forward_only=True),
    ]
    fwd_a, fwd_b = runner.forward_backward_many(calls)
    assert not isinstance(fwd_a, Exception) and not isinstance(fwd_b, Exception)
    assert all(g is None for g in grads(runner, "b")), "a forward made gradients"
    for got, want in zip(grads(runner, "a"), before_a, strict=True):
        assert want is not None and got is not None and torch.equal(got, want)
    assert before_b == grads(runner, "b")
    # The same numbers as a forward_backward of the same datums (which then does add gradients).
    full = runner.forward_backward("b", datums, loss_fn, config)
    assert fwd_b.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
    for a, b in zip(fwd_b.logprobs, full.logprobs, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert any(g is not None and g.abs().max() > 0 for g in grads(runner, "b"))
    assert all(math.isfinite(x) for x in fwd_a.losses)


def test_per_token_thresholds_and_gspo_masks_reach_the_loss(tiny_model_path: Path) -> None:
    runner = make_runner(tiny_model_path)
    datum = rl_datums(runner, seed=3)[0]
    n = len(datum)
    lp = runner.forward_backward("a", [datum], "cross_entropy").logprobs[0].double()
    q, adv = datum.logprobs.double(), datum.advantages.double()
    ratio = torch.exp(lp - q)
    high = torch.linspace(0.5, 1.5, n)
    with_high = Datum.create(
        datum.input_tokens, datum.target_tokens, None, datum.logprobs, datum.advantages, clip_high_threshold=high
    )
    out = runner.forward_backward("a", [with_high], "cispo")
    want = -(ratio.clamp(min=0.0, max=None).minimum(high.double()) * lp * adv).sum().item()
    assert out.losses[0] == pytest.approx(want, rel=1e-4, abs=1e-5)
    mask = torch.zeros(n)
    mask[n // 2 :] = 1.0
    with_mask = Datum.create(
        datum.input_tokens, datum.target_tokens, None, datum.logprobs, datum.advantages, sequence_ratio_mask=mask
    )
    out = runner.forward_backward("a", [with_mask], "gspo")
    s = torch.exp((lp - q)[n // 2 :].mean())
    want = -torch.minimum(s * adv, s.clamp(0.8, 1.2) * adv).sum().item()
    assert out.losses[0] == pytest.approx(want, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize(
    ("loss_fn", "fields", "match"),
    [
        ("gspo", {}, "needs 'gspo'"),
        ("ppo", {"sequence_ratio_mask": [1.0] * 4}, "read only by 'gspo'"),
        ("gspo", {"sequence_ratio_mask": [0.0] * 4}, "marks no token"),
        ("importance_sampling", {"clip_low_threshold": [0.5] * 4}, "per-token clip thresholds"),
    ],
)
def test_datum_fields_a_loss_does_not_read_are_refused(
    tiny_model_path: Path, loss_fn: str, fields: dict[str, list[float]], match: str
) -> None:
    runner = make_runner(tiny_model_path)
    datum = Datum.create([3, 4, 5, 6], [4, 5, 6, 7], None, [-1.0] * 4, [1.0] * 4, **fields)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match=match):
        runner.forward_backward("a", [datum], loss_fn)


def test_bad_per_token_thresholds_are_refused() -> None:
    with pytest.raises(InvalidRequest, match=">= 0"):
        Datum.create([1, 2], [2, 3], clip_low_threshold=[-0.5, 0.5])
    with pytest.raises(InvalidRequest, match="above clip_high_threshold"):
        Datum.create([1, 2], [2, 3], clip_low_threshold=[0.5, 2.0], clip_high_threshold=[1.5, 1.5])
    with pytest.raises(InvalidRequest, match="finite"):
        Datum.create([1, 2], [2, 3], sequence_ratio_mask=[1.0, math.nan])
