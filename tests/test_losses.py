"""Each loss against a value computed by hand on a two-token case, and against Tinker's documented
implementation (tinker-docs losses/*) on random tensors."""

from __future__ import annotations

import math

import pytest
import torch

from hotlora.engine.losses import LossInputs, compute_loss
from hotlora.schemas.errors import InvalidRequest

LP = [math.log(0.5), math.log(0.25)]  # trainer logprobs of the two target tokens
Q = [math.log(0.4), math.log(0.5)]  # sampler logprobs: ratios r = 1.25 and 0.5
ADV = [2.0, -1.0]
W = [1.0, 1.0]


def inputs(weights: list[float] = W, **extra: torch.Tensor) -> LossInputs:
    return LossInputs(
        target_logprobs=torch.tensor([LP], dtype=torch.float64, requires_grad=True),
        weights=torch.tensor([weights], dtype=torch.float64),
        sampler_logprobs=torch.tensor([Q], dtype=torch.float64),
        advantages=torch.tensor([ADV], dtype=torch.float64),
        **extra,
    )


def test_cross_entropy_is_weighted_negative_log_likelihood() -> None:
    assert compute_loss("cross_entropy", inputs(), {}).item() == pytest.approx(math.log(2) + math.log(4))
    assert compute_loss("cross_entropy", inputs([0.0, 2.0]), {}).item() == pytest.approx(2 * math.log(4))


def test_importance_sampling() -> None:
    # -(1.25 * 2 + 0.5 * -1) = -2.0
    assert compute_loss("importance_sampling", inputs(), {}).item() == pytest.approx(-2.0)


def test_ppo_clips_the_ratio() -> None:
    # eps 0.2: token 1: min(1.25*2, 1.2*2) = 2.4; token 2: min(0.5*-1, 0.8*-1) = -0.8 -> loss -(2.4 - 0.8) = -1.6
    assert compute_loss("ppo", inputs(), {"clip_epsilon": 0.2}).item() == pytest.approx(-1.6)
    # a wide clip range leaves the unclipped importance-sampling objective
    assert compute_loss("ppo", inputs(), {"clip_epsilon": 0.9}).item() == pytest.approx(-2.0)
    # asymmetric: high 0.3 keeps 1.25; low 0.1 -> token 2: min(-0.5, -0.9) = -0.9 -> -(2.5 - 0.9) = -1.6
    config = {"clip_epsilon_low": 0.1, "clip_epsilon_high": 0.3}
    assert compute_loss("ppo", inputs(), config).item() == pytest.approx(-1.6)


def test_cispo_uses_a_stopped_clipped_ratio() -> None:
    x = inputs()
    loss = compute_loss("cispo", x, {"clip_epsilon": 0.2})
    # -(1.2 * log .5 * 2 + 0.8 * log .25 * -1)
    expected = -(1.2 * LP[0] * 2.0 + 0.8 * LP[1] * -1.0)
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    # the ratio is a constant: d/dlp = -w * clip(r) * adv
    assert x.target_logprobs.grad.tolist()[0] == pytest.approx([-1.2 * 2.0, -0.8 * -1.0])


def test_importance_sampling_gradient() -> None:
    x = inputs()
    compute_loss("importance_sampling", x, {}).backward()
    # d/dlp of -r*adv = -r*adv
    assert x.target_logprobs.grad.tolist()[0] == pytest.approx([-1.25 * 2.0, -0.5 * -1.0])


@pytest.mark.parametrize(
    ("loss_fn", "config", "match"),
    [
        ("cross_entropy", {"clip_epsilon": 0.2}, "not understood"),
        ("ppo", {"clip_epsilon": -1.0}, "must be a number"),
        ("ppo", {"clip_epsilon": 10.0}, "must be a number"),
        ("nope", {}, "unknown loss_fn"),
        ("ppo", {"clip_epsilon": 0.2, "clip_high_threshold": 1.2}, "use one form"),
        ("cispo", {"clip_low_threshold": 1.5, "clip_high_threshold": 1.2}, "low bound is above"),
        ("cispo", {"clip_low_threshold": 4.5}, "low bound is above"),  # above cispo's default high, 4.0
        ("gspo", {"clip_low_threshold": -0.1}, "must be >= 0"),
        ("ppo", {"clip_high_threshold": math.inf}, "finite"),
        ("ppo", {"clip_high_threshold": True}, "finite"),
        ("dro", {}, "needs loss_config\\['beta'\\]"),
        ("dro", {"beta": -1.0}, "must be >= 0"),
        ("dro", {"beta": 0.1, "clip_epsilon": 0.2}, "not understood"),
        ("importance_sampling", {"clip_low_threshold": 0.5}, "not understood"),
    ],
)
def test_bad_loss_config_is_rejected(loss_fn: str, config: dict[str, float], match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        compute_loss(loss_fn, inputs(), config)


def test_rl_loss_without_sampler_fields_is_rejected() -> None:
    x = LossInputs(target_logprobs=torch.zeros(1, 2), weights=torch.ones(1, 2))
    with pytest.raises(InvalidRequest, match="sampler logprobs"):
        compute_loss("ppo", x, {})


# ----- Tinker's absolute clip thresholds, CISPO's default, per-token thresholds -----


def test_ppo_takes_absolute_thresholds_as_well_as_offsets() -> None:
    tinker = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert compute_loss("ppo", inputs(), tinker).item() == pytest.approx(-1.6)  # as clip_epsilon 0.2
    assert compute_loss("ppo", inputs(), {}).item() == pytest.approx(-1.6)  # Tinker's default is the same
    # A low bound above 1: token 1: min(1.25*2, 1.3*2) = 2.5; token 2: min(0.5*-1, 1.3*-1) = -1.3
    assert compute_loss("ppo", inputs(), {"clip_low_threshold": 1.3, "clip_high_threshold": 2.0}).item() == (
        pytest.approx(-(2.5 - 1.3))
    )
    # A high bound below 1: token 1: min(2.5, 0.6*2) = 1.2; token 2: min(-0.5, 0.5*-1) = -0.5
    assert compute_loss("ppo", inputs(), {"clip_low_threshold": 0.1, "clip_high_threshold": 0.6}).item() == (
        pytest.approx(-(1.2 - 0.5))
    )
    # One threshold given: the other keeps Tinker's default (0.8): token 2 -> -0.8, token 1 -> min(2.5, 2.0)
    assert compute_loss("ppo", inputs(), {"clip_high_threshold": 1.0}).item() == pytest.approx(-(2.0 - 0.8))


def test_cispo_defaults_to_tinkers_one_sided_clip() -> None:
    # [0, 4]: neither ratio (1.25, 0.5) is clipped
    expected = -(1.25 * LP[0] * 2.0 + 0.5 * LP[1] * -1.0)
    assert compute_loss("cispo", inputs(), {}).item() == pytest.approx(expected)
    # the same with the thresholds spelled out; a high threshold of 1.0 clips token 1
    assert compute_loss("cispo", inputs(), {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}).item() == (
        pytest.approx(expected)
    )
    clipped = -(1.0 * LP[0] * 2.0 + 0.5 * LP[1] * -1.0)
    assert compute_loss("cispo", inputs(), {"clip_high_threshold": 1.0}).item() == pytest.approx(clipped)
    # hotlora's offsets keep their old meaning: one offset given, the other is 0.2 ([0.8, 1.2] here)
    assert compute_loss("cispo", inputs(), {"clip_epsilon_high": 0.2}).item() == pytest.approx(
        -(1.2 * LP[0] * 2.0 + 0.8 * LP[1] * -1.0)
    )


def test_per_token_thresholds_replace_the_calls_bounds() -> None:
    nan = math.nan
    # token 1 gets a high threshold of 1.1 (min(2.5, 2.2) = 2.2); token 2 none: the call's default 0.8 -> -0.8
    x = inputs(clip_high=torch.tensor([[1.1, nan]], dtype=torch.float64))
    assert compute_loss("ppo", x, {}).item() == pytest.approx(-(2.2 - 0.8))
    # token 2 gets a low threshold of 0.6 (min(-0.5, -0.6) = -0.6), token 1 the call's threshold 1.2
    x = inputs(clip_low=torch.tensor([[nan, 0.6]], dtype=torch.float64))
    assert compute_loss("ppo", x, {"clip_high_threshold": 1.2}).item() == pytest.approx(-(2.4 - 0.6))
    x = inputs(clip_low=torch.tensor([[0.0, 0.0]]), clip_high=torch.tensor([[1.0, 0.4]]))
    assert compute_loss("cispo", x, {}).item() == pytest.approx(-(1.0 * LP[0] * 2.0 + 0.4 * LP[1] * -1.0))


# ----- GSPO and DRO -----


def test_gspo_uses_the_sequence_ratio_with_each_tokens_gradient() -> None:
    x = inputs(ratio_mask=torch.tensor([[1.0, 1.0]]))
    loss = compute_loss("gspo", x, {})
    s = math.sqrt(1.25 * 0.5)  # geometric mean of the two ratios: 0.79
    # token 1: min(s*2, clip(s, .8, 1.2)*2) = s*2; token 2: min(-s, -0.8) = -0.8
    assert loss.item() == pytest.approx(-(s * 2.0 - 0.8))
    loss.backward()
    # token 1's ratio carries s's value and exp(lp)'s gradient: d/dlp1 = -s * adv; token 2 is clipped: 0
    assert x.target_logprobs.grad.tolist()[0] == pytest.approx([-s * 2.0, 0.0])
    # only token 1 marked: s = 1.25; token 1: min(2.5, 2.4) = 2.4; token 2: min(-1.25, -1.2) = -1.25
    assert compute_loss("gspo", inputs(ratio_mask=torch.tensor([[1.0, 0.0]])), {}).item() == (
        pytest.approx(-(2.4 - 1.25))
    )
    with pytest.raises(InvalidRequest, match="sequence_ratio_mask"):
        compute_loss("gspo", inputs(), {})
    # A mask that marks nothing is refused before the step (ModelRunner.validate_call, tests/test_forward_only.py);
    # the loss itself checks nothing on the device (no sync) and stays finite: the sequence ratio's value is 1.
    assert math.isfinite(compute_loss("gspo", inputs(ratio_mask=torch.zeros(1, 2)), {}).item())


def test_dro_is_the_advantage_weighted_logprob_minus_a_quadratic_penalty() -> None:
    x = inputs()
    loss = compute_loss("dro", x, {"beta": 0.1})
    expected = -sum(lp * a - 0.05 * (lp - q) ** 2 for lp, q, a in zip(LP, Q, ADV, strict=True))
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    # d/dlp = -(adv - beta * (lp - q))
    want = [-(a - 0.1 * (lp - q)) for lp, q, a in zip(LP, Q, ADV, strict=True)]
    assert x.target_logprobs.grad.tolist()[0] == pytest.approx(want)


# Tinker's implementations as its documentation prints them (one datum, no weights), for the random check.
def tinker_ppo(lp, q, adv, low, high):  # type: ignore[no-untyped-def]
    prob_ratio = torch.exp(lp - q)
    clipped_ratio = torch.clamp(prob_ratio, low, high)
    return -torch.min(prob_ratio * adv, clipped_ratio * adv).sum()


def tinker_cispo(lp, q, adv, low, high):  # type: ignore[no-untyped-def]
    clipped_ratio = torch.clamp(torch.exp(lp - q), low, high)
    return -(clipped_ratio.detach() * lp * adv).sum()


def tinker_gspo(lp, q, adv, low, high, mask):  # type: ignore[no-untyped-def]
    log_ratio = (lp.detach() - q)[mask != 0].mean()
    ratio = torch.exp(log_ratio + lp - lp.detach())
    return -torch.min(ratio * adv, torch.clamp(ratio, low, high) * adv).sum()


def tinker_dro(lp, q, adv, beta):  # type: ignore[no-untyped-def]
    return -(lp * adv - 0.5 * beta * (lp - q) ** 2).sum()


@pytest.mark.parametrize("loss_fn", ["ppo", "cispo", "gspo", "dro"])
def test_losses_match_tinkers_documented_implementation(loss_fn: str) -> None:
    gen = torch.Generator().manual_seed(11)
    rows, n = 3, 7
    lp = (-torch.rand(rows, n, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    q = lp.detach() + torch.randn(rows, n, generator=gen, dtype=torch.float64) * 0.5
    adv = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    mask = (torch.rand(rows, n, generator=gen) < 0.6).double()
    mask[:, 0] = 1.0
    config = {"beta": 0.3} if loss_fn == "dro" else {"clip_low_threshold": 0.7, "clip_high_threshold": 1.4}
    x = LossInputs(lp, torch.ones(rows, n, dtype=torch.float64), q, adv, ratio_mask=mask if loss_fn == "gspo" else None)
    ours = compute_loss(loss_fn, x, config)
    ours.sum().backward()
    our_grad = lp.grad.clone()
    lp.grad = None
    for r in range(rows):
        args = (lp[r], q[r], adv[r])
        if loss_fn == "dro":
            want = tinker_dro(*args, 0.3)
        elif loss_fn == "gspo":
            want = tinker_gspo(*args, 0.7, 1.4, mask[r])
        else:
            want = {"ppo": tinker_ppo, "cispo": tinker_cispo}[loss_fn](*args, 0.7, 1.4)
        assert ours[r].item() == pytest.approx(want.item(), rel=1e-12, abs=1e-12)
        want.backward()
    assert torch.allclose(our_grad, lp.grad, rtol=1e-12, atol=1e-12)
