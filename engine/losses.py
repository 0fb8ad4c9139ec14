"""The four losses, with the Tinker API's semantics: a datum's loss is a weighted *sum* over tokens.

Each loss maps the trainer's per-token target logprobs ``lp`` (``[rows, T]``, differentiable) and
the datum fields to one loss per row. ``w`` is the per-token weight (zero on prompt and padding),
``q`` the sampler's logprobs and ``adv`` the per-token advantages.

- ``cross_entropy``:        -sum w * lp
- ``importance_sampling``:  -sum w * exp(lp - q) * adv
- ``ppo``:                  -sum w * min(r * adv, clip(r, 1 - eps_low, 1 + eps_high) * adv),  r = exp(lp - q)
- ``cispo``:                -sum w * sg(clip(r, 1 - eps_low, 1 + eps_high)) * lp * adv

``target_logprobs`` computes ``lp`` itself from the model's last hidden states without ever holding
the full ``[tokens, vocab]`` log-softmax (see its docstring).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hotlora.schemas.errors import InvalidRequest

CLIP_KEYS = frozenset({"clip_epsilon", "clip_epsilon_low", "clip_epsilon_high"})
ALLOWED_CONFIG: dict[str, frozenset[str]] = {
    "cross_entropy": frozenset(),
    "importance_sampling": frozenset(),
    "ppo": CLIP_KEYS,
    "cispo": CLIP_KEYS,
}
DEFAULT_CLIP_EPSILON = 0.2
# Logits held at once by ``target_logprobs``: 2**26 fp32 values (256 MiB), i.e. 441 tokens of a
# 151936-word vocabulary (Qwen3) or 2048 tokens of a 32768-word one.
LOGITS_PER_CHUNK = 1 << 26


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


def _chunk_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def target_logprobs(
    hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, chunk_tokens: int | None = None
) -> torch.Tensor:
    """fp32 logprob of ``targets[i]`` under ``log_softmax(head(hidden[i]))`` for every row ``i``, differentiable
    in ``hidden``.

    Full-vocabulary fp32 logits of a whole micro-batch (8192 tokens of Qwen3's 151936 words: 5 GB, and
    autograd kept their log-softmax too) were the largest tensors of a training step. Here at most
    ``chunk_tokens`` rows (default: ``LOGITS_PER_CHUNK`` logits' worth) have logits at once: beyond one
    chunk, each is checkpointed, so the forward keeps only its fp32 result and the backward recomputes
    its logits (one more head matmul) when it gets there, one chunk at a time. The ops per row are the
    unchunked ones (logits in the head's dtype, then fp32 ``log_softmax``), so the results are too.
    The head must be frozen.
    """
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        raise ValueError("target_logprobs gives the output head no gradient; it must be frozen")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"want hidden [N, H] and targets [N], got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    chunk = chunk_tokens or max(1, LOGITS_PER_CHUNK // head.out_features)
    if hidden.shape[0] <= chunk:  # one chunk's logits are cheap enough to keep: nothing to recompute
        return _chunk_logprobs(hidden, head.weight, head.bias, targets)
    pieces = [
        # No randomness inside: nothing to replay, so no RNG state to stash per chunk.
        checkpoint(_chunk_logprobs, h, head.weight, head.bias, t, use_reentrant=False, preserve_rng_state=False)
        for h, t in zip(hidden.split(chunk), targets.split(chunk), strict=True)
    ]
    return torch.cat(pieces)
