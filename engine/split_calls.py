"""A ``forward_backward`` too big for one training slice, run as parts that other tenants' work interleaves.

Without splitting, a call over ``train_token_budget`` ran alone in one slice and held the model for as
long as it took (seconds for a large batch on a GPU, minutes on a CPU): every other tenant's samples and
training waited behind it. The engine cuts such a call into consecutive runs of datums of at most the
budget each (``split_datums``) and submits them as separate scheduler items, so decode slices and other
adapters' training run between them.

What the caller sees does not change, because every loss is a sum over tokens (``docs/protocol.md``):

- One result, in datum order: the parts' losses and logprobs joined (``SplitCall.output``).
- All or nothing for the gradients, as for an unsplit call (``ModelRunner.run_calls``): each part's
  gradient is set aside (``ModelRunner.forward_backward_aside``) and the sum reaches the adapter only
  when the last part has run. A part that fails fails the whole call, the gradient set aside is dropped,
  and the parts after it are not run.
- Validation of the whole call before its first part runs: a bad datum in the last part refuses the call
  before any compute.

The parts are scheduled like any ``forward_backward``: in order within their adapter, all before the
adapter's next barrier (so an ``optim_step`` sent after the call sees all of its gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from hotlora.engine.types import Datum, ForwardBackward, ForwardBackwardOutput
from hotlora.schemas.errors import HotLoraError

if TYPE_CHECKING:
    import torch

PART_SEPARATOR = "#part"  # a part's request id: f"{request_id}#part{index}"


def call_tokens(datums: Sequence[Datum]) -> int:
    """A call's cost as the scheduler counts it: its longest datum times its number of datums."""
    return max(len(d) for d in datums) * len(datums)


def split_datums(datums: Sequence[Datum], budget: int) -> list[range]:
    """Consecutive runs of datum indices, each costing at most ``budget`` (``call_tokens``).

    A datum longer than the budget is a run of its own (it runs alone, as before). One run covering
    everything means the call needs no splitting.
    """
    if budget < 1:
        raise ValueError(f"budget must be positive, got {budget}")
    runs: list[range] = []
    start, width = 0, 0
    for index, datum in enumerate(datums):
        new_width = max(width, len(datum))
        if index > start and new_width * (index - start + 1) > budget:
            runs.append(range(start, index))
            start, new_width = index, len(datum)
        width = new_width
    runs.append(range(start, len(datums)))
    return runs


@dataclass
class SplitCall:
    """One split call's parts and what they have produced so far.

    Touched by the engine's worker thread while a part runs and by the event loop between steps, never
    at once: the busy loop finishes a step's bookkeeping before it schedules the next.
    """

    call: ForwardBackward
    parts: list[ForwardBackward]
    outputs: dict[int, ForwardBackwardOutput] = field(default_factory=dict)
    error: HotLoraError | None = None
    # The parts' summed gradient, one tensor (or None) per adapter parameter, until the last part adds it.
    aside: list[torch.Tensor | None] | None = None
    finished: int = 0  # parts completed, run or skipped

    @classmethod
    def of(cls, call: ForwardBackward, budget: int) -> SplitCall | None:
        """The call's parts, or None when it fits one slice (or is one datum: nothing to split)."""
        runs = split_datums(call.datums, budget)
        if len(runs) == 1:
            return None
        parts = [
            replace(call, datums=[call.datums[i] for i in run], request_id=f"{call.request_id}{PART_SEPARATOR}{n}")
            for n, run in enumerate(runs)
        ]
        return cls(call, parts)

    def index(self, part_id: str) -> int:
        return int(part_id.rsplit(PART_SEPARATOR, 1)[1])

    def record(self, part_id: str, result: Any) -> bool:
        """Note a part's result; True once every part is done (the call can be answered)."""
        self.finished += 1
        if isinstance(result, HotLoraError):
            if self.error is None:
                self.error = result
            self.aside = None  # never added: the call fails as a whole
        elif isinstance(result, ForwardBackwardOutput):
            self.outputs[self.index(part_id)] = result
        return self.finished == len(self.parts)

    def result(self) -> ForwardBackwardOutput | HotLoraError:
        """The whole call's answer: the first error, or the parts' outputs joined in datum order."""
        if self.error is not None:
            return self.error
        ordered = [self.outputs[n] for n in range(len(self.parts))]
        return ForwardBackwardOutput(
            adapter_id=self.call.adapter_id,
            losses=[loss for out in ordered for loss in out.losses],
            logprobs=[lp for out in ordered for lp in out.logprobs],
            num_tokens=sum(out.num_tokens for out in ordered),
        )
