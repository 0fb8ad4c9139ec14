"""The multi-adapter LoRA layer: one pass over the frozen base serves rows of many adapters.

Every row (sequence) of a batch carries an adapter slot index (``-1`` = plain base). Before a
forward the model runner publishes a ``LoraBatch``: the runs of consecutive rows that share a slot.
Each ``MultiLoRALinear`` computes ``base(x)`` once for all rows, then adds each run's low-rank delta
``scale * (x @ A.T) @ B.T``, either with one segment matmul per run (``segment``) or with
``torch._grouped_mm`` over all runs at once (``grouped``, where the device and dtype support it).
The base weights are never copied per adapter.

The delta is computed in the activations' dtype (mixed precision): the factors stay fp32 master
weights and are cast to ``x.dtype`` inside the graph, so their gradients still arrive in fp32, while
autograd keeps only the (bf16) activations it already has, not an fp32 copy of them per module. With
fp32 activations (CPU) the casts are no-ops and nothing changes.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from hotlora.engine.types import TARGET_PRESETS, LoraSpec
from hotlora.schemas.errors import InvalidRequest

ALL_TARGETS: frozenset[str] = frozenset(TARGET_PRESETS["all-linear"])


@dataclass
class LoraPair:
    """One module's factors in PEFT layout: ``A`` is ``[rank, in]``, ``B`` is ``[out, rank]``."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float


@dataclass(frozen=True)
class Run:
    """Rows ``[start, end)`` of the batch all use adapter ``slot`` (``-1``: base only)."""

    slot: int
    start: int
    end: int


@dataclass
class LoraBatch:
    """What the layers need to know about the current batch: its runs of same-adapter rows."""

    runs: list[Run]
    num_rows: int
    # Per-batch scratch the layers share, e.g. the stacked path's row masks (same for every layer
    # that serves the same adapters).
    scratch: dict[object, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_slots(cls, slots: Sequence[int]) -> LoraBatch:
        runs: list[Run] = []
        start = 0
        for i in range(1, len(slots) + 1):
            if i == len(slots) or slots[i] != slots[start]:
                runs.append(Run(int(slots[start]), start, i))
                start = i
        return cls(runs=runs, num_rows=len(slots))


@dataclass
class LoraContext:
    """Shared by all layers of one model: the active batch and the compute backend."""

    backend: str = "auto"  # auto | segment | stacked | grouped | reference
    batch: LoraBatch | None = None
    layers: dict[str, MultiLoRALinear] = field(default_factory=dict)


# ``auto`` takes the stacked path at or below this many tokens when no gradient is being recorded
# (decode, prefill), else the grouped path where ``grouped_mm_fast`` holds, else the segment path.
# Training never stacks: a stacked product's shape depends on which other adapters share the batch,
# which changes a row's last bits with its partners; a segment's product does not (tests/test_training.py).
STACKED_MAX_TOKENS = 256
# ``torch._grouped_mm`` on CUDA reads its operands with TMA: every pointer and every row stride must be a
# multiple of 16 bytes (GroupedMMUtils.h). The rank is zero-padded to a multiple of this many bytes.
GROUPED_MM_ALIGN_BYTES = 16


@functools.cache
def cutlass_grouped_mm(device_index: int) -> bool:
    """Whether torch's one-launch CUTLASS grouped GEMM runs on this CUDA device: sm90 or sm100 only."""
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index)[0] in (9, 10)


def grouped_mm_fast(x: torch.Tensor, in_features: int, out_features: int) -> bool:
    """Whether ``auto`` should run the grouped path for activations ``x``.

    Only in bf16 on a CUDA device with torch's CUTLASS kernel (one launch, no host sync). Elsewhere
    ``torch._grouped_mm`` falls back to a loop of mm calls, which is the segment path plus padding,
    with a device-to-host copy of the offsets. The feature sizes must keep rows 16-byte aligned; the
    rank is padded to that in ``_delta_grouped``.
    """
    align = GROUPED_MM_ALIGN_BYTES // x.element_size()
    return (
        hasattr(torch, "_grouped_mm")
        and x.device.type == "cuda"
        and x.dtype == torch.bfloat16
        and in_features % align == 0
        and out_features % align == 0
        and (x.storage_offset() * x.element_size()) % GROUPED_MM_ALIGN_BYTES == 0
        and cutlass_grouped_mm(x.device.index or 0)
    )


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a table of adapter slots, each with its own rank and scale."""

    def __init__(self, base: nn.Linear, name: str, context: LoraContext) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.suffix = name.rsplit(".", 1)[-1]
        self.context = context
        # Tensors are owned by the adapter objects; the layer only indexes them by slot.
        self.slots: dict[int, LoraPair] = {}
        self._stack: tuple[torch.Tensor, torch.Tensor] | None = None  # see _stacked_factors
        self._stack_key: tuple[object, ...] | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def attach(self, slot: int, pair: LoraPair) -> None:
        self.slots[slot] = pair
        self._stack_key = None

    def detach_slot(self, slot: int) -> None:
        self.slots.pop(slot, None)
        self._stack_key = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        batch = self.context.batch
        if batch is None or not self.slots:
            return out
        active = [run for run in batch.runs if run.slot in self.slots]
        if not active:
            return out
        if x.shape[0] != batch.num_rows:
            raise RuntimeError(f"{self.name}: batch has {x.shape[0]} rows, LoraBatch says {batch.num_rows}")
        backend = self.context.backend
        if backend == "auto":
            if len(active) == 1:
                backend = "segment"
            elif x.numel() // x.shape[-1] <= STACKED_MAX_TOKENS and not torch.is_grad_enabled():
                backend = "stacked"
            else:
                backend = "grouped" if grouped_mm_fast(x, self.in_features, self.out_features) else "segment"
        if backend == "reference":
            return out + self._delta_reference(x, active).to(out.dtype)
        if backend == "stacked":
            return out + self._delta_stacked(x, active, batch).to(out.dtype)
        if backend == "grouped":
            return out + self._delta_grouped(x, batch.runs, batch).to(out.dtype)
        return self._add_delta_segments(out, x, batch.runs)

    def _add_delta_segments(self, out: torch.Tensor, x: torch.Tensor, runs: list[Run]) -> torch.Tensor:
        """One pair of small matmuls per run of same-adapter rows; rows of other runs get an exact zero.

        ``x`` is cut with ONE ``split`` and the deltas joined with ONE ``cat``, so the backward is one
        concatenation too: slicing per run would make autograd zero-fill a full-size gradient per run.
        The scale multiplies the rank-wide hidden, not the output-wide delta.
        """
        pieces = [x] if len(runs) == 1 else torch.split(x, [run.end - run.start for run in runs])
        deltas: list[torch.Tensor] = []
        for run, xs in zip(runs, pieces, strict=True):
            pair = self.slots.get(run.slot)
            if pair is None:
                deltas.append(out.new_zeros(*xs.shape[:-1], self.out_features))
                continue
            hidden = (xs @ pair.A.to(xs.dtype).t()) * pair.scale
            deltas.append((hidden @ pair.B.to(xs.dtype).t()).to(out.dtype))
        return out + (torch.cat(deltas) if len(deltas) > 1 else deltas[0])

    def _delta_stacked(self, x: torch.Tensor, active: list[Run], batch: LoraBatch) -> torch.Tensor:
        """Every active adapter side by side: ONE ``x @ [A_1; A_2; ...].T``, a mask keeping each row's own
        (scaled) rank columns, ONE ``@ [B_1, B_2, ...].T``.

        That is K times the segment path's LoRA flops, but a fixed number of ops whatever K is: the
        right trade for decode, where rows are few and per-op overhead is the whole bill. Rows outside
        ``active`` have an all-zero mask row, so their delta is an exact zero.
        """
        slots = list(dict.fromkeys(run.slot for run in active))
        pairs = [self.slots[slot] for slot in slots]
        ranks = [pair.A.shape[0] for pair in pairs]
        dtype = x.dtype
        key = ("stacked-mask", dtype, tuple(zip(slots, ranks, [pair.scale for pair in pairs], strict=True)))
        mask = batch.scratch.get(key)
        if mask is None:
            offsets = dict(zip(slots, itertools.accumulate([0, *ranks[:-1]]), strict=True))
            mask = torch.zeros(batch.num_rows, sum(ranks), dtype=dtype)
            for run in active:
                pair = self.slots[run.slot]
                mask[run.start : run.end, offsets[run.slot] : offsets[run.slot] + pair.A.shape[0]] = pair.scale
            mask = mask.to(x.device)
            batch.scratch[key] = mask
        a_t, b_t = self._stacked_factors(slots, pairs, dtype)
        hidden = x @ a_t
        hidden = hidden * mask.view(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1])
        return hidden @ b_t

    def _stacked_factors(
        self, slots: list[int], pairs: list[LoraPair], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[A_1; ...; A_K].T`` and ``[B_1, ..., B_K].T`` in ``dtype``, reused across decode steps while nothing
        changed.

        Concatenating every adapter's factors in every layer at every step was half of a mixed decode
        step on CPU. Without autograd the stacks are reused while the same slots hold the same storage at
        the same version: an ``optim_step`` or a checkpoint load bumps a tensor's ``_version``, an offload
        or reload changes its ``data_ptr``, and attaching or detaching any slot drops the stack, so
        sampling never sees stale weights. With autograd on (training) the stack is built fresh, inside the graph.
        """
        if torch.is_grad_enabled():
            a_t = torch.cat([p.A for p in pairs]).to(dtype).t()
            return a_t, torch.cat([p.B for p in pairs], dim=1).to(dtype).t()
        key = (
            dtype,
            *(
                (slot, p.A.data_ptr(), p.A._version, p.B.data_ptr(), p.B._version, p.scale)
                for slot, p in zip(slots, pairs, strict=True)
            ),
        )
        if self._stack_key != key or self._stack is None:
            a_t = torch.cat([p.A for p in pairs]).to(dtype).t().contiguous()
            b_t = torch.cat([p.B for p in pairs], dim=1).to(dtype).t().contiguous()
            self._stack, self._stack_key = (a_t, b_t), key
        return self._stack

    def _delta_grouped(self, x: torch.Tensor, runs: list[Run], batch: LoraBatch) -> torch.Tensor:
        """All runs in two grouped GEMMs. Ranks are zero-padded to the largest, rounded up to 16 bytes
        (``GROUPED_MM_ALIGN_BYTES``), and base-only runs get all-zero factors: padding adds exact zeros.

        The scale is folded into ``A`` in the factors' fp32 before the cast, so it is rounded once.
        """
        lead = x.shape[1:-1]
        rows_per = math.prod(lead) if lead else 1
        flat = x.reshape(-1, x.shape[-1])
        pairs = [self.slots.get(run.slot) for run in runs]
        align = max(1, GROUPED_MM_ALIGN_BYTES // x.element_size())
        r_max = max(p.A.shape[0] for p in pairs if p is not None)
        r_pad = -(-r_max // align) * align
        a_stack, b_stack = [], []
        for pair in pairs:
            if pair is None:
                a_stack.append(x.new_zeros(self.in_features, r_pad))
                b_stack.append(x.new_zeros(r_pad, self.out_features))
                continue
            pad = r_pad - pair.A.shape[0]
            a_t = (pair.A.t() * pair.scale).to(x.dtype)
            b_t = pair.B.t().to(x.dtype)
            if pad:
                a_t = torch.nn.functional.pad(a_t, (0, pad))
                b_t = torch.nn.functional.pad(b_t, (0, 0, 0, pad))
            a_stack.append(a_t)
            b_stack.append(b_t)
        key = ("grouped-offsets", rows_per, x.device)
        offs = batch.scratch.get(key)
        if offs is None:  # one host-to-device copy per batch, not one per layer
            offs = torch.tensor([run.end * rows_per for run in runs], dtype=torch.int32).to(x.device)
            batch.scratch[key] = offs
        hidden = torch._grouped_mm(flat, torch.stack(a_stack), offs=offs)
        delta = torch._grouped_mm(hidden, torch.stack(b_stack), offs=offs)
        if delta.requires_grad:
            # The kernel's backward takes the incoming gradient as it comes, and an expanded one (from a
            # ``.sum()`` downstream) fails its stride check.
            delta.register_hook(torch.Tensor.contiguous)
        return delta.reshape(*x.shape[:-1], self.out_features)

    def _delta_reference(self, x: torch.Tensor, active: list[Run]) -> torch.Tensor:
        """The plain path for tests: a full-batch delta per adapter, masked to its rows."""
        delta = x.new_zeros(*x.shape[:-1], self.out_features)
        for run in active:
            pair = self.slots[run.slot]
            mask = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            mask[run.start : run.end] = True
            full = (x @ pair.A.to(x.dtype).t()) @ pair.B.to(x.dtype).t() * pair.scale
            shape = (x.shape[0],) + (1,) * (x.dim() - 1)
            delta = delta + torch.where(mask.view(shape), full, torch.zeros_like(full))
        return delta


def inject_multi_lora(model: nn.Module, backend: str = "auto") -> LoraContext:
    """Replace every attention/MLP ``nn.Linear`` inside the decoder with a ``MultiLoRALinear``.

    All candidate modules are wrapped once at load time; each adapter then attaches only to the
    modules in its own target set.
    """
    if backend not in ("auto", "segment", "stacked", "grouped", "reference"):
        raise InvalidRequest(f"unknown LoRA backend {backend!r}")
    context = LoraContext(backend=backend)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ALL_TARGETS
    ]
    if not targets:
        raise InvalidRequest("the base model has no q/k/v/o/gate/up/down_proj linear modules to adapt")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = MultiLoRALinear(module, name, context)
        setattr(parent, child, wrapped)
        context.layers[name] = wrapped
    return context


def init_lora_pairs(
    context: LoraContext, spec: LoraSpec, device: torch.device, dtype: torch.dtype = torch.float32
) -> dict[str, LoraPair]:
    """PEFT's initialisation (A kaiming-uniform with a=sqrt(5), B zero), drawn from the adapter's seed."""
    wanted = set(spec.target_modules())
    unknown = wanted - {layer.suffix for layer in context.layers.values()}
    if unknown:
        raise InvalidRequest(f"target modules {sorted(unknown)} do not exist in the base model")
    generator = torch.Generator(device="cpu").manual_seed(spec.seed)
    pairs: dict[str, LoraPair] = {}
    for name, layer in context.layers.items():
        if layer.suffix not in wanted:
            continue
        a = torch.empty(spec.rank, layer.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        b = torch.zeros(layer.out_features, spec.rank, dtype=torch.float32)
        pairs[name] = LoraPair(
            A=a.to(device=device, dtype=dtype).requires_grad_(True),
            B=b.to(device=device, dtype=dtype).requires_grad_(True),
            scale=spec.scale,
        )
    return pairs


@contextmanager
def lora_batch(context: LoraContext, slots: Sequence[int]) -> Iterator[LoraBatch]:
    """Publish the batch's row-to-adapter map to every layer for the duration of one forward."""
    batch = LoraBatch.from_slots(list(slots))
    previous = context.batch
    context.batch = batch
    try:
        yield batch
    finally:
        context.batch = previous
