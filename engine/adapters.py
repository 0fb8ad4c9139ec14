"""Adapter lifecycle and residency: many adapters registered, a bounded number resident in slots.

Every registered adapter owns its factors, AdamW moments and gradients. A *resident* adapter lives
on the model's device and is attached to a slot of the shared ``MultiLoRALinear`` tables; an
*offloaded* one lives on the host device and is attached nowhere, so its slot serves another
adapter. ``acquire`` makes adapters resident on demand, evicting the least-recently-used unpinned
ones. Tensors move with ``p.data = ...`` / ``p.grad = ...`` so the optimizer's per-parameter state
keys, and the ``LoraPair`` objects, stay the same objects: an offload round trip changes no bits.

A move is a handful of copies, not one per tensor: an adapter's weights and optimizer state travel
back to back in one flat buffer (its gradients in another), and the moved tensors are views of the
buffer on the far side, so the next move in the other direction copies that buffer as it is. On
CUDA the host side is pinned and the copies are asynchronous, with one synchronisation per offload.

On CUDA, unless ``resident_slots`` is given, residency is sized from memory: the slots that fit one
default adapter's training state (``adapter_bytes``) into a fraction of what the loaded model left free.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial

import structlog
import torch
from torch._utils import _unflatten_dense_tensors

from hotlora.engine.checkpoint import peft_key
from hotlora.engine.lora import LoraContext, LoraPair, init_lora_pairs
from hotlora.engine.optim import AdapterOptimizer
from hotlora.engine.types import LoraSpec
from hotlora.schemas.errors import AdapterExists, CapacityExceeded, InvalidRequest, UnknownAdapter

ADAPTER_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Device copies of an adapter's factors while it trains: weights, gradients, AdamW's exp_avg and exp_avg_sq.
TRAINING_COPIES = 4
DEFAULT_RESIDENT_MEMORY_FRACTION = 0.25

log = structlog.get_logger("hotlora.adapters")


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


def layer_shapes(context: LoraContext) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every LoRA-wrapped module, by module name."""
    return {name: (layer.in_features, layer.out_features) for name, layer in context.layers.items()}


def adapter_bytes(shapes: Mapping[str, tuple[int, int]], spec: LoraSpec, dtype: torch.dtype = torch.float32) -> int:
    """Device bytes one resident adapter of ``spec`` holds at most: factors, gradients and two AdamW moments.

    ``shapes`` maps module names to (in_features, out_features), as ``layer_shapes`` gives them; a
    module takes part when its last name component is one of ``spec``'s targets.
    """
    wanted = set(spec.target_modules())
    numel = sum(
        spec.rank * (fan_in + fan_out)
        for name, (fan_in, fan_out) in shapes.items()
        if name.rsplit(".", 1)[-1] in wanted
    )
    return TRAINING_COPIES * numel * dtype.itemsize


def slots_for_memory(free_bytes: int, fraction: float, per_adapter: int, max_adapters: int) -> int:
    """Resident slots whose adapters fit in ``fraction`` of ``free_bytes``: at least 1, at most ``max_adapters``."""
    if not 0 < fraction <= 1:
        raise InvalidRequest(f"resident_memory_fraction must be in (0, 1], got {fraction}")
    return max(1, min(max_adapters, int(free_bytes * fraction) // max(per_adapter, 1)))


def flat_view(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The 1-d buffer that ``tensors`` fill back to back, in order, if they do (what a previous move left).

    ``tensors`` share one dtype. The span must lie inside the first tensor's storage, so all of them
    are views of that storage: no other live tensor's memory can be in between.
    """
    first = tensors[0]
    size = first.element_size()
    start = first.data_ptr()
    total = 0
    for t in tensors:
        if t.data_ptr() != start + total * size or not t.is_contiguous():
            return None
        total += t.numel()
    storage = first.untyped_storage()
    if (first.storage_offset() + total) * size > storage.nbytes():
        return None
    return first.new_empty(0).set_(storage, first.storage_offset(), (total,))


def copy_group(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``tensors`` (one dtype) back to back in a new flat buffer on ``device``, with one copy.

    The copy's source is the buffer they already fill when they do, else a packed copy made where
    they live. With CUDA on one side, the host buffer is pinned and the copy asynchronous, so the
    caller synchronises before the host reads what a device-to-host copy wrote.
    """
    here = tensors[0].device
    cuda = device.type == "cuda" or here.type == "cuda"  # pinned memory needs CUDA
    source = flat_view(tensors)
    if source is None:
        total = sum(t.numel() for t in tensors)
        source = torch.empty(total, dtype=tensors[0].dtype, device=here, pin_memory=cuda and here.type == "cpu")
        torch.cat([t.reshape(-1) for t in tensors], out=source)
    moved = torch.empty(source.shape, dtype=source.dtype, device=device, pin_memory=cuda and device.type == "cpu")
    moved.copy_(source, non_blocking=True)
    return moved


def transfer(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor | None:
    """One group's move: ``copy_group``, or None when the tensors already live on ``device``.

    The single seam for moves: the offload tests swap in a copying variant so that CPU-only runs
    exercise the same code paths as a real device-to-host transfer.
    """
    if all(t.device == device for t in tensors):
        return None
    return copy_group(tensors, device)


def move_adapter_tensors(adapter: Adapter, device: torch.device) -> None:
    """Move weights, gradients and AdamW state of ``adapter`` to ``device``, keeping tensor identity.

    One copy per (group, dtype), where the groups are weights with their optimizer state, and
    gradients: those get their own buffer so that ``optim_step`` dropping them frees it. 0-dim
    optimizer state (AdamW's ``step``) moves only when the optimizer keeps it beside the parameters
    (fused); otherwise torch keeps it on the CPU, and so do we.
    """
    optimizer = adapter.optimizer
    state = optimizer.torch_optimizer.state
    params = adapter.parameters()
    # (group, tensor, how to point its owner at the moved copy); weights come first: a gradient can
    # only be set on a parameter that already lives on its device.
    entries: list[tuple[str, torch.Tensor, Callable[[torch.Tensor], None]]] = []
    for p in params:
        entries.append(("weights", p.data, partial(setattr, p, "data")))
        for key, value in state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and (value.dim() > 0 or optimizer.steps_on_device):
                entries.append(("weights", value, partial(state[p].__setitem__, key)))
    entries += [("grads", p.grad, partial(setattr, p, "grad")) for p in params if p.grad is not None]
    groups: dict[tuple[str, torch.dtype], list[tuple[torch.Tensor, Callable[[torch.Tensor], None]]]] = {}
    for name, tensor, put in entries:
        groups.setdefault((name, tensor.dtype), []).append((tensor, put))
    to_host: torch.device | None = None
    with torch.no_grad():
        for members in groups.values():
            tensors = [tensor for tensor, _ in members]
            flat = transfer(tensors, device)
            if flat is None:
                continue
            # torch's C++ loop (the one DDP uses) for the views: a third of the time of split + view here
            for (_, put), view in zip(members, _unflatten_dense_tensors(flat, tensors), strict=True):
                put(view)
            if tensors[0].device.type == "cuda" and device.type != "cuda":
                to_host = tensors[0].device
    # Device-to-host copies must land before anything reads the host side. Host-to-device copies need
    # no wait: the kernels that read them run later on the same stream, and the pinned source stays
    # reserved by the caching host allocator until its copy has run.
    if to_host is not None:
        torch.cuda.synchronize(to_host)


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
        resident_memory_fraction: float = DEFAULT_RESIDENT_MEMORY_FRACTION,
    ) -> None:
        if max_adapters < 1:
            raise InvalidRequest(f"max_adapters must be >= 1, got {max_adapters}")
        if resident_slots is None and device.type == "cuda":
            resident_slots = self._slots_from_memory(context, device, resident_memory_fraction, max_adapters)
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

    @staticmethod
    def _slots_from_memory(context: LoraContext, device: torch.device, fraction: float, max_adapters: int) -> int:
        """As many default adapters (``LoraSpec()``) as fit in ``fraction`` of the device's free memory.

        Called after the base model is loaded; the rest of the free memory is left to activations.
        """
        free, total = torch.cuda.mem_get_info(device)
        per_adapter = adapter_bytes(layer_shapes(context), LoraSpec())
        slots = slots_for_memory(free, fraction, per_adapter, max_adapters)
        log.info(
            "resident_slots_sized",
            slots=slots,
            max_adapters=max_adapters,
            adapter_bytes=per_adapter,
            free_bytes=free,
            total_bytes=total,
            resident_memory_fraction=fraction,
        )
        return slots

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
        optimizer = AdapterOptimizer(ordered_parameters(pairs), device=self.device)
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
