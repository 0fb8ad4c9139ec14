"""Each loss against a value computed by hand on a two-token case."""

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


def inputs(weights: list[float] = W) -> LossInputs:
    return LossInputs(
        target_logprobs=torch.tensor([LP], dtype=torch.float64, requires_grad=True),
        weights=torch.tensor([weights], dtype=torch.float64),
        sampler_logprobs=torch.tensor([Q], dtype=torch.float64),
        advantages=torch.tensor([ADV], dtype=torch.float64),
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
        ("nope", {}, "unknown loss_fn"),
    ],
)
def test_bad_loss_config_is_rejected(loss_fn: str, config: dict[str, float], match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        compute_loss(loss_fn, inputs(), config)


def test_rl_loss_without_sampler_fields_is_rejected() -> None:
    x = LossInputs(target_logprobs=torch.zeros(1, 2), weights=torch.ones(1, 2))
    with pytest.raises(InvalidRequest, match="sampler logprobs"):
        compute_loss("ppo", x, {})
