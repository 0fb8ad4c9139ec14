"""Adapter lifecycle: create, delete and list adapters, each bound to a slot of the LoRA layers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from hotlora.engine.checkpoint import peft_key
from hotlora.engine.errors import AdapterExists, CapacityExceeded, InvalidRequest, UnknownAdapter
from hotlora.engine.lora import LoraContext, LoraPair, init_lora_pairs
from hotlora.engine.optim import AdapterOptimizer
from hotlora.engine.types import LoraSpec

ADAPTER_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class Adapter:
    """One experiment's LoRA: its factors, its optimizer and its version (= optimizer steps taken)."""

    adapter_id: str
    slot: int
    spec: LoraSpec
    pairs: dict[str, LoraPair]
    optimizer: AdapterOptimizer
    version: int = 0
    generator: torch.Generator = field(default_factory=lambda: torch.Generator(device="cpu"))

    def parameters(self) -> list[torch.Tensor]:
        return ordered_parameters(self.pairs)

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters())


def ordered_parameters(pairs: dict[str, LoraPair]) -> list[torch.Tensor]:
    """A and B of every targeted module in a fixed order (module name, then A before B)."""
    return [t for name in sorted(pairs) for t in (pairs[name].A, pairs[name].B)]


def ordered_parameter_keys(pairs: dict[str, LoraPair]) -> list[str]:
    """PEFT state-dict keys of ``ordered_parameters``, in the same order."""
    return [peft_key(name, which) for name in sorted(pairs) for which in ("A", "B")]


def validate_adapter_id(adapter_id: str) -> None:
    if not isinstance(adapter_id, str) or not ADAPTER_ID_PATTERN.match(adapter_id):
        raise InvalidRequest(
            f"adapter id {adapter_id!r} must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


class AdapterRegistry:
    """Maps adapter ids to slots of the shared ``MultiLoRALinear`` tables."""

    def __init__(self, context: LoraContext, device: torch.device, max_adapters: int = 64) -> None:
        self.context = context
        self.device = device
        self.max_adapters = max_adapters
        self._adapters: dict[str, Adapter] = {}
        self._free_slots: list[int] = list(range(max_adapters - 1, -1, -1))

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    def get(self, adapter_id: str) -> Adapter:
        try:
            return self._adapters[adapter_id]
        except KeyError:
            raise UnknownAdapter(f"no adapter named {adapter_id!r}") from None

    def list(self) -> list[Adapter]:
        return sorted(self._adapters.values(), key=lambda a: a.adapter_id)

    def create(self, adapter_id: str, spec: LoraSpec) -> Adapter:
        validate_adapter_id(adapter_id)
        if adapter_id in self._adapters:
            raise AdapterExists(f"adapter {adapter_id!r} already exists")
        if not self._free_slots:
            raise CapacityExceeded(f"all {self.max_adapters} adapter slots are in use")
        pairs = init_lora_pairs(self.context, spec, self.device)
        slot = self._free_slots.pop()
        optimizer = AdapterOptimizer(ordered_parameters(pairs))
        adapter = Adapter(adapter_id=adapter_id, slot=slot, spec=spec, pairs=pairs, optimizer=optimizer)
        adapter.generator.manual_seed(spec.seed)
        for name, pair in pairs.items():
            self.context.layers[name].attach(slot, pair)
        self._adapters[adapter_id] = adapter
        return adapter

    def delete(self, adapter_id: str) -> None:
        adapter = self.get(adapter_id)
        for name in adapter.pairs:
            self.context.layers[name].detach_slot(adapter.slot)
        del self._adapters[adapter_id]
        self._free_slots.append(adapter.slot)
