"""The losses, with the Tinker API's semantics: a datum's loss is a weighted *sum* over tokens.

Each loss maps the trainer's per-token target logprobs ``lp`` (``[rows, T]``, differentiable) and
the datum fields to one loss per row. ``w`` is the per-token weight (zero on prompt and padding),
``q`` the sampler's logprobs, ``adv`` the per-token advantages, ``r = exp(lp - q)`` the ratio and
``[lo, hi]`` the clip bounds (see ``clip_bounds``); ``sg`` stops the gradient.

- ``cross_entropy``:        -sum w * lp
- ``importance_sampling``:  -sum w * r * adv
- ``ppo``:                  -sum w * min(r * adv, clip(r, lo, hi) * adv)
- ``cispo``:                -sum w * sg(clip(r, lo, hi)) * lp * adv
- ``gspo``:                 ``ppo`` with every token's ratio ``s_t = exp(mean_M(sg(lp) - q) + lp - sg(lp))``: the
  sequence ratio's value (a geometric mean over the tokens ``M`` that ``sequence_ratio_mask`` marks) with
  the token's own gradient (Tinker's GSPO-token)
- ``dro``:                  -sum w * (lp * adv - beta / 2 * (lp - q)^2)

These are the formulas of Tinker's loss documentation (tinker-docs losses/*), checked against hand
computations in ``tests/test_losses.py``. Tinker's ``stable_reinforce`` is not here: its objective reads
information the sampler records server-side, and Tinker does not publish it.

**Clip bounds** (ppo, cispo, gspo) come as Tinker's absolute thresholds on the ratio,
``clip_low_threshold`` / ``clip_high_threshold``, or as hotlora's offsets ``clip_epsilon[_low|_high]``
(``[1 - low, 1 + high]``), never both. Without either, the defaults are Tinker's: ``[0.8, 1.2]`` for ppo
and gspo, one-sided ``[0.0, 4.0]`` for cispo. A datum may carry per-token thresholds (``Datum``'s
``clip_low_threshold`` / ``clip_high_threshold``), which replace the call's bounds on its tokens.

``target_logprobs`` computes ``lp`` itself from the model's last hidden states without ever holding
the full ``[tokens, vocab]`` log-softmax (see its docstring).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hotlora.schemas.errors import InvalidRequest

OFFSET_KEYS = frozenset({"clip_epsilon", "clip_epsilon_low", "clip_epsilon_high"})
THRESHOLD_KEYS = frozenset({"clip_low_threshold", "clip_high_threshold"})
CLIP_KEYS = OFFSET_KEYS | THRESHOLD_KEYS
ALLOWED_CONFIG: dict[str, frozenset[str]] = {
    "cross_entropy": frozenset(),
    "importance_sampling": frozenset(),
    "ppo": CLIP_KEYS,
    "cispo": CLIP_KEYS,
    "gspo": CLIP_KEYS,
    "dro": frozenset({"beta"}),
}
# Losses that read the sampler's logprobs and the advantages of every datum.
RL_LOSSES = frozenset({"importance_sampling", "ppo", "cispo", "gspo", "dro"})
CLIPPED_LOSSES = frozenset(name for name, keys in ALLOWED_CONFIG.items() if keys == CLIP_KEYS)
# Tinker's default bounds on the ratio when a call names none (tinker-docs losses/ppo, losses/cispo).
DEFAULT_THRESHOLDS: dict[str, tuple[float, float]] = {"ppo": (0.8, 1.2), "cispo": (0.0, 4.0), "gspo": (0.8, 1.2)}
DEFAULT_CLIP_EPSILON = 0.2  # an offset left out beside other offsets (hotlora's older form)
MAX_CLIP_EPSILON = 10.0
# Logits held at once by ``target_logprobs``: 2**26 fp32 values (256 MiB), i.e. 441 tokens of a
# 151936-word vocabulary (Qwen3) or 2048 tokens of a 32768-word one.
LOGITS_PER_CHUNK = 1 << 26


@dataclass
class LossInputs:
    """Padded per-token tensors of the rows that share one loss; padding has ``weights == 0``.

    ``clip_low`` / ``clip_high`` hold per-token thresholds, NaN where a datum gave none (the call's bounds
    apply there); ``ratio_mask`` is GSPO's ``sequence_ratio_mask`` (0 on padding).
    """

    target_logprobs: torch.Tensor
    weights: torch.Tensor
    sampler_logprobs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    clip_low: torch.Tensor | None = None
    clip_high: torch.Tensor | None = None
    ratio_mask: torch.Tensor | None = None


def _number(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"loss_config[{key!r}] must be a finite number, got {value!r}")
    return float(value)


def validate_loss_config(loss_fn: str, config: Mapping[str, float]) -> None:
    """Refuse, with the reason, a loss or a setting the engine would not train exactly as asked."""
    if loss_fn not in ALLOWED_CONFIG:
        raise InvalidRequest(f"unknown loss_fn {loss_fn!r}; use one of {sorted(ALLOWED_CONFIG)}")
    unknown = set(config) - ALLOWED_CONFIG[loss_fn]
    if unknown:
        raise InvalidRequest(
            f"loss_config keys {sorted(unknown)} are not understood by {loss_fn!r} "
            f"(allowed: {sorted(ALLOWED_CONFIG[loss_fn]) or 'none'})"
        )
    values = {key: _number(key, value) for key, value in config.items()}
    if loss_fn == "dro":
        if "beta" not in values:
            # Tinker's documentation shows a custom beta but not its default: guessing one would train
            # something other than what the caller's code trains on Tinker.
            raise InvalidRequest("'dro' needs loss_config['beta'] (the weight of its quadratic penalty), e.g. 0.05")
        if values["beta"] < 0:
            raise InvalidRequest(f"loss_config['beta'] must be >= 0, got {values['beta']!r}")
        return
    if set(values) & OFFSET_KEYS and set(values) & THRESHOLD_KEYS:
        raise InvalidRequest(
            f"loss_config gives both clip offsets {sorted(set(values) & OFFSET_KEYS)} and absolute thresholds "
            f"{sorted(set(values) & THRESHOLD_KEYS)}; use one form (thresholds are Tinker's: low = 1 - offset)"
        )
    for key in set(values) & OFFSET_KEYS:
        if not 0.0 <= values[key] < MAX_CLIP_EPSILON:
            raise InvalidRequest(
                f"loss_config[{key!r}] must be a number in [0, {MAX_CLIP_EPSILON:g}), got {values[key]!r}"
            )
    for key in set(values) & THRESHOLD_KEYS:
        if values[key] < 0:
            raise InvalidRequest(
                f"loss_config[{key!r}] is a bound on the ratio p/q and must be >= 0, got {values[key]!r}"
            )
    if loss_fn in CLIPPED_LOSSES:
        low, high = clip_bounds(loss_fn, values)
        if low > high:
            raise InvalidRequest(f"{loss_fn!r} clip bounds [{low:g}, {high:g}]: the low bound is above the high one")


def clip_bounds(loss_fn: str, config: Mapping[str, float]) -> tuple[float, float]:
    """``(low, high)``, absolute bounds on the ratio: Tinker's thresholds, else hotlora's offsets from 1
    (a missing offset is ``clip_epsilon``, else 0.2, as before thresholds existed), else Tinker's defaults."""
    if set(config) & OFFSET_KEYS:
        eps = float(config.get("clip_epsilon", DEFAULT_CLIP_EPSILON))
        return 1.0 - float(config.get("clip_epsilon_low", eps)), 1.0 + float(config.get("clip_epsilon_high", eps))
    low, high = DEFAULT_THRESHOLDS[loss_fn]
    return float(config.get("clip_low_threshold", low)), float(config.get("clip_high_threshold", high))


def _rl_fields(inputs: LossInputs, loss_fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    if inputs.sampler_logprobs is None or inputs.advantages is None:
        raise InvalidRequest(f"{loss_fn!r} needs every datum to carry sampler logprobs and advantages")
    return inputs.sampler_logprobs, inputs.advantages


def _clip(ratio: torch.Tensor, inputs: LossInputs, loss_fn: str, config: Mapping[str, float]) -> torch.Tensor:
    """``ratio`` clipped to the call's bounds, or to a datum's per-token thresholds where it has them."""
    low, high = clip_bounds(loss_fn, config)
    if inputs.clip_low is None and inputs.clip_high is None:
        return ratio.clamp(low, high)
    lows = ratio.new_full(ratio.shape, low)
    highs = ratio.new_full(ratio.shape, high)
    if inputs.clip_low is not None:
        lows = torch.where(torch.isnan(inputs.clip_low), lows, inputs.clip_low.to(ratio.dtype))
    if inputs.clip_high is not None:
        highs = torch.where(torch.isnan(inputs.clip_high), highs, inputs.clip_high.to(ratio.dtype))
    return torch.clamp(ratio, lows, highs)


def cross_entropy(inputs: LossInputs, config: Mapping[str, float]) -> torch.Tensor:
    return -(inputs.weights * inputs.target_logprobs).sum(dim=-1)


def importance_sampling(inputs: LossInputs, config: Mapping[str, float]) -> torch.Tensor:
    q, adv = _rl_fields(inputs, "importance_sampling")
    ratio = torch.exp(inputs.target_logprobs - q)
    return -(inputs.weights * ratio * adv).sum(dim=-1)


def _clipped_objective(
    ratio: torch.Tensor, adv: torch.Tensor, inputs: LossInputs, loss_fn: str, config: Mapping[str, float]
) -> torch.Tensor:
    return -(inputs.weights * torch.minimum(ratio * adv, _clip(ratio, inputs, loss_fn, config) * adv)).sum(dim=-1)


def ppo(inputs: LossInputs, config: Mapping[str, float]) -> torch.Tensor:
    q, adv = _rl_fields(inputs, "ppo")
    return _clipped_objective(torch.exp(inputs.target_logprobs - q), adv, inputs, "ppo", config)


def cispo(inputs: LossInputs, config: Mapping[str, float]) -> torch.Tensor:
    q, adv = _rl_fields(inputs, "cispo")
    ratio = _clip(torch.exp(inputs.target_logprobs - q), inputs, "cispo", config).detach()
    return -(inputs.weights * ratio * inputs.target_logprobs * adv).sum(dim=-1)


def gspo(inputs: LossInputs, config: Mapping[str, float]) -> torch.Tensor:
    q, adv = _rl_fields(inputs, "gspo")
    if inputs.ratio_mask is None:
        raise InvalidRequest("'gspo' needs every datum to carry a sequence_ratio_mask")
    lp = inputs.target_logprobs
    marked = (inputs.ratio_mask != 0).to(lp.dtype)
    # ``ModelRunner.validate_call`` refuses a mask that marks no token, on the CPU before the step; the
    # clamp only keeps a check here from costing a device sync per micro-batch.
    count = marked.sum(dim=-1, keepdim=True).clamp(min=1)
    log_ratio = ((lp.detach() - q) * marked).sum(dim=-1, keepdim=True) / count
    ratio = torch.exp(log_ratio + lp - lp.detach())
    return _clipped_objective(ratio, adv, inputs, "gspo", config)


def dro(inputs: LossInputs, config: Mapping[str, float]) -> torch.Tensor:
    q, adv = _rl_fields(inputs, "dro")
    lp = inputs.target_logprobs
    beta = float(config["beta"])
    return -(inputs.weights * (lp * adv - 0.5 * beta * (lp - q) ** 2)).sum(dim=-1)


LOSSES: dict[str, Callable[[LossInputs, Mapping[str, float]], torch.Tensor]] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "gspo": gspo,
    "dro": dro,
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
