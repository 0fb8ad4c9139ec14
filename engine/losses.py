"""The four losses, with the Tinker API's semantics: a datum's loss is a weighted *sum* over tokens.

Each loss maps the trainer's per-token target logprobs ``lp`` (``[rows, T]``, differentiable) and
the datum fields to one loss per row. ``w`` is the per-token weight (zero on prompt and padding),
``q`` the sampler's logprobs and ``adv`` the per-token advantages.

- ``cross_entropy``:        -sum w * lp
- ``importance_sampling``:  -sum w * exp(lp - q) * adv
- ``ppo``:                  -sum w * min(r * adv, clip(r, 1 - eps_low, 1 + eps_high) * adv),  r = exp(lp - q)
- ``cispo``:                -sum w * sg(clip(r, 1 - eps_low, 1 + eps_high)) * lp * adv
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from hotlora.engine.errors import InvalidRequest

CLIP_KEYS = frozenset({"clip_epsilon", "clip_epsilon_low", "clip_epsilon_high"})
ALLOWED_CONFIG: dict[str, frozenset[str]] = {
    "cross_entropy": frozenset(),
    "importance_sampling": frozenset(),
    "ppo": CLIP_KEYS,
    "cispo": CLIP_KEYS,
}
DEFAULT_CLIP_EPSILON = 0.2


@dataclass
class LossInputs:
    """Padded per-token tensors of the rows that share one loss; padding has ``weights == 0``."""

    target_logprobs: torch.Tensor
    weights: torch.Tensor
    sampler_logprobs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None


def validate_loss_config(loss_fn: str, config: Mapping[str, float]) -> None:
    if loss_fn not in ALLOWED_CONFIG:
        raise InvalidRequest(f"unknown loss_fn {loss_fn!r}; use one of {sorted(ALLOWED_CONFIG)}")
    unknown = set(config) - ALLOWED_CONFIG[loss_fn]
    if unknown:
        raise InvalidRequest(
            f"loss_config keys {sorted(unknown)} are not understood by {loss_fn!r} "
            f"(allowed: {sorted(ALLOWED_CONFIG[loss_fn]) or 'none'})"
        )
    for key, value in config.items():
        if not (isinstance(value, int | float) and 0.0 <= float(value) < 10.0):
            raise InvalidRequest(f"loss_config[{key!r}] must be a number in [0, 10), got {value!r}")


def _clip_bounds(config: Mapping[str, float]) -> tuple[float, float]:
    eps = float(config.get("clip_epsilon", DEFAULT_CLIP_EPSILON))
    low = float(config.get("clip_epsilon_low", eps))
    high = float(config.get("clip_epsilon_high", eps))
    return 1.0 - low, 1.0 + high


def _rl_fields(inputs: LossInputs, loss_fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    if inputs.sampler_logprobs is None or inputs.advantages is None:
        raise InvalidRequest(f"{loss_fn!r} needs every datum to carry sampler logprobs and advantages")
    return inputs.sampler_logprobs, inputs.advantages


def cross_entropy(inputs: LossInputs, config: Mapping[str, float]) -> torch.Tensor:
    return -(inputs.weights * inputs.target_logprobs).sum(dim=-1)


def importance_sampling(inputs: LossInputs, config: Mapping[str, float]) -> torch.Tensor:
    q, adv = _rl_fields(inputs, "importance_sampling")
    ratio = torch.exp(inputs.target_logprobs - q)
    return -(inputs.weights * ratio * adv).sum(dim=-1)


def ppo(inputs: LossInputs, config: Mapping[str, float]) -> torch.Tensor:
    q, adv = _rl_fields(inputs, "ppo")
    low, high = _clip_bounds(config)
    ratio = torch.exp(inputs.target_logprobs - q)
    objective = torch.minimum(ratio * adv, ratio.clamp(low, high) * adv)
    return -(inputs.weights * objective).sum(dim=-1)


def cispo(inputs: LossInputs, config: Mapping[str, float]) -> torch.Tensor:
    q, adv = _rl_fields(inputs, "cispo")
    low, high = _clip_bounds(config)
    ratio = torch.exp(inputs.target_logprobs - q).clamp(low, high).detach()
    return -(inputs.weights * ratio * inputs.target_logprobs * adv).sum(dim=-1)


LOSSES: dict[str, Callable[[LossInputs, Mapping[str, float]], torch.Tensor]] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
}


def compute_loss(loss_fn: str, inputs: LossInputs, config: Mapping[str, float]) -> torch.Tensor:
    """Per-row losses ``[rows]`` of one loss function."""
    validate_loss_config(loss_fn, config)
    return LOSSES[loss_fn](inputs, config)
