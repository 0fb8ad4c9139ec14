"""The engine's vocabulary: every type the nine verbs take and return, named as in the Tinker API.

One word means one thing at every layer: ``Engine.submit`` (in process) and ``HotLoraClient.submit``
(over Kafka) take these requests and resolve to these results, the runner and the samplers work on
them, and the Kafka edge (``engine.kafka.convert``) maps the wire messages onto exactly these types.
The constructors validate what a tenant could get wrong (``InvalidRequest``), so a bad request fails
before it reaches the scheduler.

Light on purpose: the wire errors only, never the model code or transformers, so an agent imports the
vocabulary without the engine; torch (``Datum``'s tensors) is imported where a tensor is made, so the
Kafka edge imports before torch does and an engine joins its group while torch imports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from hotlora.schemas.errors import InvalidRequest
from hotlora.schemas.messages import new_request_id

if TYPE_CHECKING:
    import torch

LossName = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "gspo", "dro"]
LOSS_NAMES: tuple[str, ...] = ("cross_entropy", "importance_sampling", "ppo", "cispo", "gspo", "dro")

ATTENTION_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ATTENTION_MODULES,
    "mlp": MLP_MODULES,
    "all-linear": ATTENTION_MODULES + MLP_MODULES,
}
# Bounds that keep one hostile request from exhausting memory: a rank beyond this is never useful
# (vLLM's largest is 512), and no model has more distinct LoRA target suffixes than this.
MAX_LORA_RANK = 1024
MAX_TARGET_MODULES = 256


def is_int(value: object) -> bool:
    """An int that is not a bool: what every integer knob from the wire must be."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """A finite int or float (not a bool): what every numeric knob from the wire must be."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# ----- settings -----


@dataclass(frozen=True)
class LoraSpec:
    """One adapter's shape: its own rank, alpha and target set, so heterogeneous adapters mix."""

    rank: int = 16
    alpha: float = 32.0
    targets: str | tuple[str, ...] = "all-linear"
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or not 1 <= self.rank <= MAX_LORA_RANK:
            raise InvalidRequest(f"LoRA rank must be an integer in [1, {MAX_LORA_RANK}], got {self.rank!r}")
        if not (_is_real(self.alpha) and self.alpha > 0):
            raise InvalidRequest(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not -(2**63) <= self.seed < 2**64:
            raise InvalidRequest(f"LoRA seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        self.target_modules()  # validate early

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def target_modules(self) -> tuple[str, ...]:
        """Module-name suffixes (``q_proj``, ...) this adapter wraps."""
        if isinstance(self.targets, str):
            if self.targets not in TARGET_PRESETS:
                raise InvalidRequest(
                    f"unknown target preset {self.targets!r}; use one of {sorted(TARGET_PRESETS)} "
                    "or a list of module names"
                )
            return TARGET_PRESETS[self.targets]
        names = tuple(self.targets)
        if not names:
            raise InvalidRequest("an adapter needs at least one target module")
        if len(names) > MAX_TARGET_MODULES:
            raise InvalidRequest(f"an adapter may name at most {MAX_TARGET_MODULES} target modules, got {len(names)}")
        if not all(isinstance(n, str) and n for n in names):
            raise InvalidRequest("target module names must be non-empty strings")
        return names


@dataclass(frozen=True)
class AdamParams:
    """AdamW settings of one ``optim_step``; the defaults are the Tinker SDK's ``AdamParams``, so
    ``grad_clip_norm=0.0``: no clipping unless the caller asks (losses are sums over tokens, so a norm
    of 1.0 would clip nearly every step)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def __post_init__(self) -> None:
        # Every field must be finite: a NaN or inf would silently poison the adapter's weights.
        for name in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"):
            value = getattr(self, name)
            if not _is_real(value):
                raise InvalidRequest(f"{name} must be a finite number, got {value!r}")
        if not self.learning_rate >= 0:
            raise InvalidRequest(f"learning_rate must be >= 0, got {self.learning_rate!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise InvalidRequest(f"{name} must lie in [0, 1), got {value!r}")
        if not self.eps > 0:
            raise InvalidRequest(f"eps must be > 0, got {self.eps!r}")
        if not self.weight_decay >= 0:
            raise InvalidRequest(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not self.grad_clip_norm >= 0:
            raise InvalidRequest(f"grad_clip_norm must be >= 0 (0 disables), got {self.grad_clip_norm!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. ``temperature=0`` is greedy; EOS always stops a sequence."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: tuple[str | int, ...] = ()  # stop strings or stop token ids
    seed: int | None = None

    def __post_init__(self) -> None:
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        temperature = self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise InvalidRequest(f"temperature must be a number, got {temperature!r}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise InvalidRequest(f"temperature must be finite and >= 0 (0 = greedy), got {temperature!r}")
        top_p = self.top_p
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
            raise InvalidRequest(f"top_p must lie in (0, 1], got {top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise InvalidRequest(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        stop = (self.stop,) if isinstance(self.stop, (str, int)) else self.stop
        if not isinstance(stop, (tuple, list)):
            raise InvalidRequest(f"stop must be a tuple of strings or token ids, got {self.stop!r}")
        for item in stop:
            if isinstance(item, str) and not item:
                raise InvalidRequest("stop strings must be non-empty")
            if not isinstance(item, str) and not (is_int(item) and item >= 0):
                raise InvalidRequest(f"stop entries must be non-empty strings or token ids >= 0, got {item!r}")
        object.__setattr__(self, "stop", tuple(stop))  # frozen: keep it hashable
        if self.seed is not None and not is_int(self.seed):
            raise InvalidRequest(f"seed must be an integer or None, got {self.seed!r}")


# ----- data -----


def _as_tensor(values: Sequence[float] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    import torch

    if isinstance(values, torch.Tensor):
        return values.detach().to(dtype=dtype, device="cpu").reshape(-1)
    return torch.tensor(list(values), dtype=dtype)


@dataclass
class Datum:
    """One training sequence.

    ``input_tokens[t]`` predicts ``target_tokens[t]`` with weight ``weights[t]``. RL losses also read
    the sampler's per-token ``logprobs`` and per-token ``advantages``. The clipped losses (ppo, cispo,
    gspo) read optional per-token ``clip_low_threshold`` / ``clip_high_threshold`` (absolute bounds on
    the ratio that replace the call's on this datum's tokens, as Tinker's loss inputs of those names),
    and gspo its ``sequence_ratio_mask`` (the tokens whose mean log-ratio is the sequence ratio).
    """

    input_tokens: torch.Tensor
    target_tokens: torch.Tensor
    weights: torch.Tensor
    logprobs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    clip_low_threshold: torch.Tensor | None = None
    clip_high_threshold: torch.Tensor | None = None
    sequence_ratio_mask: torch.Tensor | None = None

    @classmethod
    def create(
        cls,
        input_tokens: Sequence[int] | torch.Tensor,
        target_tokens: Sequence[int] | torch.Tensor,
        weights: Sequence[float] | torch.Tensor | None = None,
        logprobs: Sequence[float] | torch.Tensor | None = None,
        advantages: Sequence[float] | torch.Tensor | None = None,
        *,
        clip_low_threshold: Sequence[float] | torch.Tensor | None = None,
        clip_high_threshold: Sequence[float] | torch.Tensor | None = None,
        sequence_ratio_mask: Sequence[float] | torch.Tensor | None = None,
    ) -> Datum:
        import torch

        inputs = _as_tensor(input_tokens, torch.long)
        targets = _as_tensor(target_tokens, torch.long)
        n = inputs.numel()
        w = torch.ones(n) if weights is None else _as_tensor(weights, torch.float32)

        def floats(values: Sequence[float] | torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else _as_tensor(values, torch.float32)

        datum = cls(
            input_tokens=inputs,
            target_tokens=targets,
            weights=w,
            logprobs=floats(logprobs),
            advantages=floats(advantages),
            clip_low_threshold=floats(clip_low_threshold),
            clip_high_threshold=floats(clip_high_threshold),
            sequence_ratio_mask=floats(sequence_ratio_mask),
        )
        datum.validate()
        return datum

    @classmethod
    def from_sequence(cls, tokens: Sequence[int], prompt_len: int = 0) -> Datum:
        """Next-token datum over ``tokens``; the first ``prompt_len`` tokens carry no loss."""
        if len(tokens) < 2:
            raise InvalidRequest("a training sequence needs at least two tokens")
        weights = [0.0 if i + 1 < prompt_len else 1.0 for i in range(len(tokens) - 1)]
        return cls.create(tokens[:-1], tokens[1:], weights)

    def __len__(self) -> int:
        return int(self.input_tokens.numel())

    def validate(self) -> None:
        import torch

        n = len(self)
        if n == 0:
            raise InvalidRequest("a datum needs at least one input token")
        for name in ("target_tokens", *FLOAT_FIELDS):
            value = getattr(self, name)
            if value is not None and value.numel() != n:
                raise InvalidRequest(f"datum {name} has {value.numel()} entries, input_tokens has {n}")
        if self.input_tokens.min() < 0 or self.target_tokens.min() < 0:
            raise InvalidRequest("token ids must be non-negative")
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if value is not None and not bool(torch.isfinite(value).all()):
                raise InvalidRequest(f"datum {name} must be finite (no NaN or inf)")
        low, high = self.clip_low_threshold, self.clip_high_threshold
        for name, value in (("clip_low_threshold", low), ("clip_high_threshold", high)):
            if value is not None and bool((value < 0).any()):
                raise InvalidRequest(f"datum {name} bounds the ratio p/q and must be >= 0")
        if low is not None and high is not None and bool((low > high).any()):
            raise InvalidRequest("datum clip_low_threshold is above clip_high_threshold at some token")


# A datum's optional per-token float fields, in wire order.
FLOAT_FIELDS: tuple[str, ...] = (
    "weights",
    "logprobs",
    "advantages",
    "clip_low_threshold",
    "clip_high_threshold",
    "sequence_ratio_mask",
)


# ----- requests: one per verb; ``Request`` is their union -----


@dataclass
class CreateAdapter:
    """-> ``AdapterInfo``"""

    adapter_id: str
    spec: LoraSpec = field(default_factory=LoraSpec)
    weight: float = 1.0  # the adapter's share of tokens in the scheduler's deficit round robin
    request_id: str = field(default_factory=new_request_id)


@dataclass
class DeleteAdapter:
    """-> ``None``"""

    adapter_id: str
    request_id: str = field(default_factory=new_request_id)


@dataclass
class ListAdapters:
    """-> ``list[AdapterInfo]``. ``adapter_id`` only routes: over Kafka the request then goes to the
    engine that owns that adapter (several engines share the tenants), which lists its adapters."""

    request_id: str = field(default_factory=new_request_id)
    adapter_id: str = ""


@dataclass
class Sample:
    """-> ``SampleOutput``: ``n`` sequences from one prompt. ``adapter_id=None`` samples the plain base.

    The samplers take this request as it is; ``engine.sampler.validate_sample`` checks it against the
    model (vocabulary, positions, rows) the same way for every backend.
    """

    adapter_id: str | None
    prompt_tokens: list[int]
    n: int = 1
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=new_request_id)


@dataclass
class ForwardBackward:
    """-> ``ForwardBackwardOutput``; gradients accumulate in the adapter until ``OptimStep``.

    The runner takes a list of these (one per adapter and request) and runs them in shared micro-batches.
    """

    adapter_id: str
    datums: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_config: dict[str, float] = field(default_factory=dict)
    request_id: str = field(default_factory=new_request_id)
    # Tinker's ``forward``: the same losses and logprobs, computed without a backward; the adapter's
    # accumulated gradients are left exactly as they were.
    forward_only: bool = False

    def __post_init__(self) -> None:
        if self.loss_fn not in LOSS_NAMES:
            raise InvalidRequest(f"unknown loss_fn {self.loss_fn!r}; use one of {list(LOSS_NAMES)}")
        if not self.datums:
            raise InvalidRequest("forward_backward needs at least one datum")


@dataclass
class OptimStep:
    """-> ``OptimStepOutput`` (the adapter's new version)."""

    adapter_id: str
    params: AdamParams = field(default_factory=AdamParams)
    request_id: str = field(default_factory=new_request_id)
    # Also return a copy of the adapter's whole training state as of this step (``OptimStepOutput.state``),
    # taken in the same engine step: what the service's durable snapshot writes, off the model thread.
    capture_state: bool = False


@dataclass
class SaveState:
    """-> ``SaveOutput``. ``include_optimizer=False`` writes sampler weights only (PEFT files)."""

    adapter_id: str
    path: str | Path
    include_optimizer: bool = True
    request_id: str = field(default_factory=new_request_id)


@dataclass
class LoadState:
    """-> ``AdapterInfo``; creates or replaces ``adapter_id`` from a checkpoint directory."""

    adapter_id: str
    path: str | Path
    request_id: str = field(default_factory=new_request_id)


Request = CreateAdapter | DeleteAdapter | ListAdapters | Sample | ForwardBackward | OptimStep | SaveState | LoadState


# ----- results -----


@dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str
    slot: int | None  # None while offloaded
    resident: bool
    rank: int
    alpha: float
    targets: tuple[str, ...]
    version: int
    num_parameters: int
    seq: int = 0  # the last request seq the engine service accepted for it (0 in process)


@dataclass
class SampledSequence:
    """One generated sequence: its tokens (with the stop token that ended it) and raw logprobs."""

    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" | "length"
    adapter_version: int


@dataclass
class SampleOutput:
    sequences: list[SampledSequence]
    adapter_version: int


@dataclass
class SaveOutput:
    path: str
    version: int


@dataclass
class ForwardBackwardOutput:
    """Per-datum losses and per-token target logprobs, in the order of the call's datums."""

    adapter_id: str
    losses: list[float]
    logprobs: list[torch.Tensor]
    num_tokens: int

    @property
    def loss(self) -> float:
        return float(sum(self.losses))


@dataclass
class OptimStepOutput:
    adapter_id: str
    version: int
    grad_norm: float
    # Seconds to export the new weights and load them into a sampler that holds its own copy (vLLM);
    # None for the native sampler, which reads the live tensors.
    weight_sync_s: float | None = None
    # ``OptimStep(capture_state=True)`` only: an ``engine.checkpoint.LoadedAdapter`` copy of the state.
    state: object | None = field(default=None, repr=False)
