"""The engine's typed requests: one dataclass per verb, named as in the Tinker API.

``Engine.submit`` takes any of these and resolves to the result named in each docstring. The Kafka
service maps wire messages onto exactly these types, so a verb means the same thing at every layer.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from hotlora.engine.sampler import SampledSequence, SamplingParams
from hotlora.engine.types import AdamParams, Datum, LoraSpec


def new_request_id() -> str:
    return uuid.uuid4().hex


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
    """-> ``SampleOutput``. ``adapter_id=None`` samples the plain base."""

    adapter_id: str | None
    prompt_tokens: list[int]
    n: int = 1
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=new_request_id)


@dataclass
class ForwardBackward:
    """-> ``ForwardBackwardOutput``; gradients accumulate in the adapter until ``OptimStep``."""

    adapter_id: str
    datums: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_config: dict[str, float] = field(default_factory=dict)
    request_id: str = field(default_factory=new_request_id)


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


@dataclass
class SampleOutput:
    sequences: list[SampledSequence]
    adapter_version: int


@dataclass
class SaveOutput:
    path: str
    version: int
