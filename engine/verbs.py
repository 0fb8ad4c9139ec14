"""``Verbs``: the nine verbs of the Tinker vocabulary, written once over ``submit`` (``forward`` is
``forward_backward``'s forward-only form, one flag on the same request).

``Engine`` (in process) and ``HotLoraClient`` (over Kafka) both inherit them and differ only in
``submit``: each verb builds its typed request (``engine.types``) and awaits its result, so
``await x.sample(...)`` means the same whichever ``x`` is, and a loop written over these verbs
(``agents.grpo``) runs on both.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from hotlora.engine.types import (
    AdamParams,
    AdapterInfo,
    CreateAdapter,
    Datum,
    DeleteAdapter,
    ForwardBackward,
    ForwardBackwardOutput,
    ListAdapters,
    LoadState,
    LoraSpec,
    OptimStep,
    OptimStepOutput,
    Request,
    Sample,
    SampleOutput,
    SamplingParams,
    SaveOutput,
    SaveState,
)


class Verbs(ABC):
    """The typed verbs; a subclass supplies ``submit``, the one path every request takes."""

    @abstractmethod
    async def submit(self, request: Request) -> Any:
        """Run one request and return its result (see each request's docstring), or raise its typed error."""

    async def create_adapter(
        self,
        adapter_id: str,
        spec: LoraSpec | None = None,
        weight: float = 1.0,
        *,
        rank: int | None = None,
        alpha: float | None = None,
        targets: str | tuple[str, ...] | list[str] | None = None,
        seed: int | None = None,
    ) -> AdapterInfo:
        """A new adapter from ``spec``, or from keyword fields over ``LoraSpec``'s defaults."""
        overrides: dict[str, Any] = {"rank": rank, "alpha": alpha, "seed": seed}
        if targets is not None:
            overrides["targets"] = targets if isinstance(targets, str) else tuple(targets)
        spec = dataclasses.replace(spec or LoraSpec(), **{k: v for k, v in overrides.items() if v is not None})
        return await self.submit(CreateAdapter(adapter_id, spec, weight))

    async def delete_adapter(self, adapter_id: str) -> None:
        await self.submit(DeleteAdapter(adapter_id))

    async def list_adapters(self, adapter_id: str = "") -> list[AdapterInfo]:
        """The adapters of one engine. Over Kafka with several engines (``docs/scale-out.md``) that is the
        engine owning ``adapter_id``'s partition if given, else the one owning a random partition; the
        heartbeats (``hotlora status``) list every engine's."""
        return await self.submit(ListAdapters(adapter_id=adapter_id))

    async def sample(
        self, adapter_id: str | None, prompt_tokens: list[int], n: int = 1, params: SamplingParams | None = None
    ) -> SampleOutput:
        """``adapter_id=None`` samples the plain base model (over Kafka: unordered, ``seq`` 0)."""
        return await self.submit(Sample(adapter_id, list(prompt_tokens), n, params or SamplingParams()))

    async def forward_backward(
        self,
        adapter_id: str,
        datums: list[Datum],
        loss_fn: str = "cross_entropy",
        loss_config: dict[str, float] | None = None,
    ) -> ForwardBackwardOutput:
        return await self.submit(ForwardBackward(adapter_id, list(datums), loss_fn, dict(loss_config or {})))

    async def forward(
        self,
        adapter_id: str,
        datums: list[Datum],
        loss_fn: str = "cross_entropy",
        loss_config: dict[str, float] | None = None,
    ) -> ForwardBackwardOutput:
        """``forward_backward`` without the backward (Tinker's ``forward``): the same per-datum losses and
        target logprobs, and the adapter's accumulated gradients stay exactly as they were."""
        call = ForwardBackward(adapter_id, list(datums), loss_fn, dict(loss_config or {}), forward_only=True)
        return await self.submit(call)

    async def optim_step(self, adapter_id: str, params: AdamParams | None = None) -> OptimStepOutput:
        return await self.submit(OptimStep(adapter_id, params or AdamParams()))

    async def save_state(self, adapter_id: str, path: str | Path, include_optimizer: bool = True) -> SaveOutput:
        """``path`` is a directory the engine can reach (over Kafka: not necessarily this machine's)."""
        return await self.submit(SaveState(adapter_id, path, include_optimizer))

    async def save_weights_for_sampler(self, adapter_id: str, path: str | Path) -> SaveOutput:
        return await self.save_state(adapter_id, path, include_optimizer=False)

    async def load_state(self, adapter_id: str, path: str | Path) -> AdapterInfo:
        return await self.submit(LoadState(adapter_id, path))
