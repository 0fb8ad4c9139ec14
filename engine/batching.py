"""Packing ``forward_backward`` calls of many adapters into mixed micro-batches, and back.

A micro-batch is a right-padded ``[rows, width]`` block whose rows come from any adapters; its cost
is ``rows * width`` padded tokens, which the token budget bounds. Rows are ordered by adapter slot so
that each adapter's rows form one contiguous run for the LoRA layers.

The width is rounded up to a multiple of ``WIDTH_MULTIPLE``: attention reduces over the padded key
length, and a CPU kernel's vector lanes and tail loop split a reduction by that length, so a row
padded to 13 and the same row padded to 17 round differently in the last bits. Padded widths that
are whole multiples of the vector width keep a row's numbers independent of its partners in the
micro-batch (measured: a 10-token row beside partners of 11 to 100 tokens, bit for bit), which is
what makes a mixed-adapter run replay exactly (``docs/replay.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from hotlora.engine.losses import LossInputs
from hotlora.engine.types import Datum, ForwardBackward, ForwardBackwardOutput

WIDTH_MULTIPLE = 16  # 16 fp32 lanes of AVX-512; also a whole number of 16-byte bf16 tiles on a GPU


def padded_width(length: int) -> int:
    """The micro-batch width for a longest row of ``length`` tokens (see the module docstring)."""
    return -(-length // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


@dataclass(frozen=True)
class RowRef:
    call_index: int
    datum_index: int
    slot: int
    length: int


@dataclass
class MicroBatch:
    rows: list[RowRef]
    width: int

    @property
    def padded_tokens(self) -> int:
        return len(self.rows) * self.width

    @property
    def slots(self) -> list[int]:
        return [row.slot for row in self.rows]


def pack_forward_backward(
    calls: Sequence[ForwardBackward], slots: Mapping[str, int], token_budget: int
) -> list[MicroBatch]:
    """Greedy first-come packing under ``token_budget`` padded tokens per micro-batch.

    A datum longer than the whole budget still runs, alone in its own micro-batch: refusing it
    would make the budget a hard cap on sequence length, which is the model's job, not the packer's.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    batches: list[MicroBatch] = []
    current: list[RowRef] = []
    width = 0
    for call_index, call in enumerate(calls):
        slot = slots[call.adapter_id]
        for datum_index, datum in enumerate(call.datums):
            row = RowRef(call_index, datum_index, slot, len(datum))
            new_width = max(width, padded_width(row.length))
            if current and (len(current) + 1) * new_width > token_budget:
                batches.append(_close(current, width))
                current, new_width = [], padded_width(row.length)
            current.append(row)
            width = new_width
    if current:
        batches.append(_close(current, width))
    return batches


def _close(rows: list[RowRef], width: int) -> MicroBatch:
    return MicroBatch(rows=sorted(rows, key=lambda r: r.slot), width=width)


@dataclass
class CollatedBatch:
    """Tensors of one micro-batch, plus which rows use which (loss_fn, loss_config).

    ``token_index`` lists the real (non-padding) positions of the flattened ``[rows, width]`` block,
    row by row: the only positions whose logprobs are computed.
    """

    input_ids: torch.Tensor
    target_ids: torch.Tensor
    token_index: torch.Tensor
    weights: torch.Tensor
    sampler_logprobs: torch.Tensor
    advantages: torch.Tensor
    # Per-token clip thresholds (NaN where a datum gives none) and GSPO masks; None when no row has any.
    clip_low: torch.Tensor | None
    clip_high: torch.Tensor | None
    ratio_mask: torch.Tensor | None
    # Host-side, one flag per row: deciding whether a loss group has RL fields must not read the device.
    has_rl_fields: list[bool]
    loss_groups: dict[tuple[str, tuple[tuple[str, float], ...]], list[int]] = field(default_factory=dict)

    def loss_inputs(self, rows: list[int], target_logprobs: torch.Tensor) -> LossInputs:
        index = torch.tensor(rows, dtype=torch.long, device=target_logprobs.device)
        rl_ok = all(self.has_rl_fields[i] for i in rows)
        return LossInputs(
            target_logprobs=target_logprobs.index_select(0, index),
            weights=self.weights.index_select(0, index),
            sampler_logprobs=self.sampler_logprobs.index_select(0, index) if rl_ok else None,
            advantages=self.advantages.index_select(0, index) if rl_ok else None,
            clip_low=None if self.clip_low is None else self.clip_low.index_select(0, index),
            clip_high=None if self.clip_high is None else self.clip_high.index_select(0, index),
            ratio_mask=None if self.ratio_mask is None else self.ratio_mask.index_select(0, index),
        )


# Datum fields only some losses read, and what a row without them holds: NaN thresholds mean "the
# call's bounds"; a zero mask marks nothing.
OPTIONAL_FIELDS: dict[str, float] = {
    "clip_low_threshold": math.nan,
    "clip_high_threshold": math.nan,
    "sequence_ratio_mask": 0.0,
}


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


def collate(batch: MicroBatch, calls: Sequence[ForwardBackward], device: torch.device) -> CollatedBatch:
    n, width = len(batch.rows), batch.width
    input_ids = torch.zeros(n, width, dtype=torch.long)
    target_ids = torch.zeros(n, width, dtype=torch.long)
    weights = torch.zeros(n, width)
    sampler_logprobs = torch.zeros(n, width)
    advantages = torch.zeros(n, width)
    optional: dict[str, torch.Tensor | None] = dict.fromkeys(OPTIONAL_FIELDS)
    has_rl = [False] * n
    token_index = torch.cat([torch.arange(length) + i * width for i, length in enumerate(r.length for r in batch.rows)])
    groups: dict[tuple[str, tuple[tuple[str, float], ...]], list[int]] = {}
    for i, row in enumerate(batch.rows):
        call = calls[row.call_index]
        datum: Datum = call.datums[row.datum_index]
        length = row.length
        input_ids[i, :length] = datum.input_tokens
        target_ids[i, :length] = datum.target_tokens
        weights[i, :length] = datum.weights
        if datum.logprobs is not None and datum.advantages is not None:
            sampler_logprobs[i, :length] = datum.logprobs
            advantages[i, :length] = datum.advantages
            has_rl[i] = True
        for name, fill in OPTIONAL_FIELDS.items():
            value = getattr(datum, name)
            if value is None:
                continue
            if optional[name] is None:
                optional[name] = torch.full((n, width), fill)
            optional[name][i, :length] = value  # type: ignore[index]
        key = (call.loss_fn, tuple(sorted((k, float(v)) for k, v in call.loss_config.items())))
        groups.setdefault(key, []).append(i)
    return CollatedBatch(
        input_ids=input_ids.to(device),
        target_ids=target_ids.to(device),
        token_index=token_index.to(device),
        weights=weights.to(device),
        sampler_logprobs=sampler_logprobs.to(device),
        advantages=advantages.to(device),
        clip_low=_to(optional["clip_low_threshold"], device),
        clip_high=_to(optional["clip_high_threshold"], device),
        ratio_mask=_to(optional["sequence_ratio_mask"], device),
        has_rl_fields=has_rl,
        loss_groups=groups,
    )


class ResultAssembler:
    """Collects per-row results from micro-batches back into one output per call."""

    def __init__(self, calls: Sequence[ForwardBackward]) -> None:
        self.calls = calls
        self._losses: list[list[float | None]] = [[None] * len(c.datums) for c in calls]
        self._logprobs: list[list[torch.Tensor | None]] = [[None] * len(c.datums) for c in calls]

    def add(self, batch: MicroBatch, row_losses: torch.Tensor, target_logprobs: torch.Tensor) -> None:
        losses = row_losses.detach().cpu().tolist()
        logprobs = target_logprobs.detach().cpu()
        for i, row in enumerate(batch.rows):
            self._losses[row.call_index][row.datum_index] = float(losses[i])
            self._logprobs[row.call_index][row.datum_index] = logprobs[i, : row.length].clone()

    def outputs(self) -> list[ForwardBackwardOutput]:
        outputs = []
        for index, call in enumerate(self.calls):
            losses = self._losses[index]
            logprobs = self._logprobs[index]
            if any(x is None for x in losses):
                raise RuntimeError(f"call {index} ({call.adapter_id}) is missing rows after packing")
            outputs.append(
                ForwardBackwardOutput(
                    adapter_id=call.adapter_id,
                    losses=[float(x) for x in losses if x is not None],
                    logprobs=[t for t in logprobs if t is not None],
                    num_tokens=sum(len(d) for d in call.datums),
                )
            )
        return outputs
