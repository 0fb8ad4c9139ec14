"""Adapter lifecycle and residency: many adapters registered, a bounded number resident in slots.

Every registered adapter owns its factors, AdamW moments and gradients. A *resident* adapter lives
on the model's device and is attached to a slot of the shared ``MultiLoRALinear`` tables; an
*offloaded* one lives on the host device and is attached nowhere, so its slot serves another
adapter. ``acquire`` makes adapters resident on demand, evicting the least-recently-used unpinned
ones. Tensors move with ``p.data = ...`` / ``p.grad = ...`` so the optimizer's per-parameter state
keys, and the ``LoraPair`` objects, stay the same objects: an offload round trip changes no bits.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable
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
    """One experiment's LoRA: its factors, its optimizer and its version (= optimizer steps taken).

    ``slot`` is its index in the layers' slot tables while resident and ``None`` while offloaded;
    it can change across an offload and reload, so read it only after ``AdapterRegistry.acquire``.
    """

    adapter_id: str
    slot: int | None
    spec: LoraSpec
    pairs: dict[str, LoraPair]
    optimizer: AdapterOptimizer
    version: int = 0
    generator: torch.Generator = field(default_factory=lambda: torch.Generator(device="cpu"))

    @property
    def resident(self) -> bool:
        return self.slot is not None

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


def transfer(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One tensor's move between host and device (no copy when it is already there).

    The single seam for moves: the offload tests swap in a copying variant so that CPU-only runs
    exercise the same code paths as a real device-to-host transfer.
    """
    return tensor.to(device)


def move_adapter_tensors(adapter: Adapter, device: torch.device) -> None:
    """Move weights, gradients and AdamW moments of ``adapter`` to ``device``, keeping tensor identity.

    0-dim optimizer state (AdamW's ``step``) stays where torch put it: on the CPU unless the optimizer
    is capturable or fused, which ours never is.
    """
    state = adapter.optimizer.torch_optimizer.state
    with torch.no_grad():
        for p in adapter.parameters():
            grad = p.grad
            p.data = transfer(p.data, device)
            if grad is not None:
                p.grad = transfer(grad, device)
            for key, value in state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    state[p][key] = transfer(value, device)


class AdapterRegistry:
    """Registered adapters (at most ``max_adapters``), of which at most ``resident_slots`` are resident.

    Residency is LRU over unpinned adapters. ``pin`` holds an adapter resident (and its slot fixed)
    until the matching ``unpin``: the sampler pins every adapter with rows in flight.
    """

    def __init__(
        self,
        context: LoraContext,
        device: torch.device,
        max_adapters: int = 256,
        resident_slots: int | None = None,
        host_device: str | torch.device = "cpu",
    ) -> None:
        if max_adapters < 1:
            raise InvalidRequest(f"max_adapters must be >= 1, got {max_adapters}")
        slots = max_adapters if resident_slots is None else min(resident_slots, max_adapters)
        if slots < 1:
            raise InvalidRequest(f"resident_slots must be >= 1, got {resident_slots}")
        self.context = context
        self.device = device
        self.host_device = torch.device(host_device)
        self.max_adapters = max_adapters
        self.resident_slots = slots
        self._adapters: dict[str, Adapter] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident ids, least recently used first
        self._pins: dict[str, int] = {}
        self._free_slots: list[int] = list(range(slots - 1, -1, -1))

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    def get(self, adapter_id: str) -> Adapter:
        """The adapter, resident or not; use ``acquire`` before reading its ``slot``."""
        try:
            return self._adapters[adapter_id]
        except KeyError:
            raise UnknownAdapter(f"no adapter named {adapter_id!r}") from None

    def list(self) -> list[Adapter]:
        return sorted(self._adapters.values(), key=lambda a: a.adapter_id)

    def resident_ids(self) -> list[str]:
        """Resident adapters, least recently used first."""
        return list(self._lru)

    def pinned_ids(self) -> set[str]:
        return set(self._pins)

    def is_pinned(self, adapter_id: str) -> bool:
        return adapter_id in self._pins

    # ----- lifecycle -----

    def create(self, adapter_id: str, spec: LoraSpec) -> Adapter:
        """Register a new adapter; it takes a slot if one is free or evictable, else starts offloaded."""
        validate_adapter_id(adapter_id)
        if adapter_id in self._adapters:
            raise AdapterExists(f"adapter {adapter_id!r} already exists")
        if len(self._adapters) >= self.max_adapters:
            raise CapacityExceeded(f"all {self.max_adapters} adapters are registered; delete one first")
        resident = bool(self._free_slots) or self._evictable(exclude=()) is not None
        pairs = init_lora_pairs(self.context, spec, self.device if resident else self.host_device)
        optimizer = AdapterOptimizer(ordered_parameters(pairs))
        adapter = Adapter(adapter_id=adapter_id, slot=None, spec=spec, pairs=pairs, optimizer=optimizer)
        adapter.generator.manual_seed(spec.seed)
        self._adapters[adapter_id] = adapter
        if resident:
            self._make_room(1, exclude=())
            self._attach(adapter)
        return adapter

    def delete(self, adapter_id: str) -> None:
        adapter = self.get(adapter_id)
        if adapter_id in self._pins:
            raise InvalidRequest(f"adapter {adapter_id!r} is in use (pinned by in-flight work); retry when idle")
        if adapter.resident:
            self._detach(adapter)
        del self._adapters[adapter_id]

    # ----- residency -----

    def acquire(self, adapter_ids: Iterable[str]) -> dict[str, Adapter]:
        """Make every adapter resident and most recently used; each returned ``.slot`` is valid.

        All-or-nothing: raises ``CapacityExceeded`` before moving anything when the adapters do not fit
        beside the pinned ones, and ``UnknownAdapter`` for an unregistered id.
        """
        ids = list(dict.fromkeys(adapter_ids))
        adapters = {adapter_id: self.get(adapter_id) for adapter_id in ids}
        if len(ids) > self.resident_slots:
            raise CapacityExceeded(
                f"{len(ids)} adapters requested at once, but only {self.resident_slots} resident slots exist"
            )
        missing = [a for a in adapters.values() if not a.resident]
        self._make_room(len(missing), exclude=set(ids))
        for adapter in missing:
            self._attach(adapter)
        for adapter_id in ids:
            self._lru.move_to_end(adapter_id)
        return adapters

    def pin(self, adapter_id: str) -> Adapter:
        """Acquire ``adapter_id`` and keep it resident, in the same slot, until a matching ``unpin``.

        Pins count: two pins need two unpins (one per in-flight request, say).
        """
        adapter = self.acquire([adapter_id])[adapter_id]
        self._pins[adapter_id] = self._pins.get(adapter_id, 0) + 1
        return adapter

    def unpin(self, adapter_id: str) -> None:
        count = self._pins.get(adapter_id, 0)
        if count == 0:
            raise RuntimeError(f"unpin of adapter {adapter_id!r}, which is not pinned")
        if count == 1:
            del self._pins[adapter_id]
        else:
            self._pins[adapter_id] = count - 1

    def offload(self, adapter_id: str) -> None:
        """Move an unpinned adapter to the host now and free its slot (normally ``acquire`` decides)."""
        adapter = self.get(adapter_id)
        if adapter_id in self._pins:
            raise InvalidRequest(f"adapter {adapter_id!r} is pinned and cannot be offloaded")
        if adapter.resident:
            self._detach(adapter)
            move_adapter_tensors(adapter, self.host_device)

    def _evictable(self, exclude: Iterable[str]) -> str | None:
        skip = set(exclude)
        return next((a for a in self._lru if a not in self._pins and a not in skip), None)

    def _make_room(self, needed: int, exclude: Iterable[str]) -> None:
        """Free ``needed`` slots by evicting LRU unpinned adapters outside ``exclude``, or raise unchanged."""
        skip = set(exclude)
        shortfall = needed - len(self._free_slots)
        if shortfall <= 0:
            return
        victims = [a for a in self._lru if a not in self._pins and a not in skip][:shortfall]
        if len(victims) < shortfall:
            raise CapacityExceeded(
                f"need {needed} free resident slots but only {len(self._free_slots) + len(victims)} can be "
                f"freed: {len(self._pins)} of {self.resident_slots} slots are pinned by in-flight work"
            )
        for victim in victims:
            self.offload(victim)

    def _attach(self, adapter: Adapter) -> None:
        move_adapter_tensors(adapter, self.device)
        slot = self._free_slots.pop()
        for name, pair in adapter.pairs.items():
            self.context.layers[name].attach(slot, pair)
        adapter.slot = slot
        self._lru[adapter.adapter_id] = None

    def _detach(self, adapter: Adapter) -> None:
        slot = adapter.slot
        if slot is None:
            return
        for name in adapter.pairs:
            self.context.layers[name].detach_slot(slot)
        adapter.slot = None
        self._free_slots.append(slot)
        self._lru.pop(adapter.adapter_id, None)
