"""The scheduler: which adapters' work the engine runs next, and in what shape.

A pure function of pending work and policy: no I/O, no clocks, no torch, so it is tested with plain
data. The engine loop ``submit``s every incoming request, asks ``next_step(free_decode_rows)``, runs
the step, and reports ``complete(request_id)`` when a request is done, successfully or not: samples
after the decode slices that finish them, ``forward_backward`` and barrier items as soon as their step
ran. Nothing completes by itself; the scheduler only learns of completion from ``complete``.

Order. Each adapter's requests keep their submission order within a kind. ``sample`` and
``forward_backward`` leave the weights alone, so between two barriers (an *epoch*) they may interleave
freely: a ``forward_backward`` may run while earlier samples of its adapter still decode. ``optim_step``
and ``control`` items are *barriers*: one is eligible only once every earlier item of its adapter has
completed (admitted-but-unfinished samples count as unfinished), and nothing submitted after it is
eligible until it has completed. Barriers are cheap and hold their adapter up, so an eligible barrier
is returned (``RunBarrier``) before any slice, round robin over adapters.

Slices. A ``DecodeSlice`` admits samples into the running decode batch (their rows within
``free_decode_rows``) and runs ``decode_steps_per_slice`` steps; its admit list may be empty while
earlier samples still decode. A ``TrainSlice`` packs ``forward_backward`` items of many adapters under
``train_token_budget`` padded tokens; an item larger than the budget runs alone rather than never (the
engine cuts a ``forward_backward`` over the budget into parts first, ``engine.split_calls``).
When both kinds have work the slices alternate, so neither sampling nor training latency can starve
the other; when only one has, it runs back to back.

Fairness. Each kind runs its own weighted deficit round robin (DRR) on tokens over the adapters with
eligible work of that kind. Each visit adds ``quantum_tokens * weight`` to the adapter's deficit and
takes its items while their cost fits the deficit; an adapter without eligible work has its deficit
reset to 0, so idle time cannot be banked. The slices of one kind are cuts through a single DRR
stream: a slice that fills up mid-visit is resumed by the next slice of that kind without a new
quantum, so tokens served track weights within a constant whatever the slice size, and a slice packs
about ``train_token_budget / quantum_tokens`` visits, i.e. items of many adapters.

Bound (no starvation). Let q = ``quantum_tokens``, B = ``train_token_budget``, w_a the adapter's weight,
W the sum of the weights and A the number of adapters with eligible work of the kind while a waits,
C the largest cost of that kind, and V_a = ceil(C / (q * w_a)). Adapter a affords its head item within
V_a of its visits; meanwhile any other adapter b gets at most C + (V_a + 1) * q * w_b tokens (its
deficit is below C between visits), S_a = (A - 1) * C + (V_a + 1) * q * (W - w_a) in all.

- Training: a slice closes only when its next item does not fit, and that item opens the next training
  slice, so any two consecutive training slices carry more than B tokens. Adapter a with eligible
  ``forward_backward`` work therefore waits at most ``2 * ceil(S_a / B)`` training slices, and at most
  twice that plus one slices of either kind (barriers are not slices).
- Sampling: rows, not tokens, bound admission, and rows come back only when the engine completes
  samples. When the adapter whose turn it is does not fit the free rows, admission stops there
  (head-of-line reservation) instead of letting smaller samples of others take the rows forever. If
  every admitted sample completes within L decode slices, such a stall lasts at most L slices, and
  adapter a with eligible samples waits at most ``(N_a + 1) * (L + 1) - 1`` decode slices, where
  ``N_a = sum over b != a of floor((C + (V_a + 1) * q * w_b) / c_min)`` bounds the samples of others
  admitted first (c_min: the cheapest sample, at least 1 token).
- Rows per adapter: ``max_adapter_rows`` caps the rows one adapter's admitted samples hold. An adapter at
  its cap is skipped (not a head-of-line stall) and its deficit reset, so with more admission rows than
  one adapter may hold, a hog cannot fill them all: the native sampler admits ``2 x`` its decode rows
  and one adapter may hold at most the decode rows, so a newcomer finds rows free whenever fewer than
  two adapters hold their cap, and the sampler's fair share (pausing) gives it decode rows at once.

Each ``next_step`` costs O(number of adapters) plus the items it takes.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from hotlora.schemas.errors import InvalidRequest


class WorkKind(str, Enum):
    SAMPLE = "sample"
    FORWARD_BACKWARD = "forward_backward"
    OPTIM_STEP = "optim_step"
    CONTROL = "control"

    @property
    def is_barrier(self) -> bool:
        """Barriers may change the adapter's weights or state, so they order everything around them."""
        return self in (WorkKind.OPTIM_STEP, WorkKind.CONTROL)


@dataclass(frozen=True)
class WorkItem:
    """One request as the scheduler sees it: who, what, and what it costs.

    ``tokens`` is the DRR cost: padded tokens of a ``forward_backward``'s datums; ``n * (prompt_len +
    max_tokens)`` of a sample; 0 for barriers. ``rows`` is what a sample occupies in the decode batch
    (its ``n``), or a ``forward_backward``'s number of datums.
    """

    request_id: str
    adapter_id: str
    kind: WorkKind
    tokens: int
    rows: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.kind, WorkKind):
            raise InvalidRequest(f"unknown work kind {self.kind!r}")
        # A cost of at least one token keeps the starvation bound finite (it divides by the cheapest item).
        least = 0 if self.kind.is_barrier else 1
        if not isinstance(self.tokens, int) or self.tokens < least:
            raise InvalidRequest(f"{self.kind.value} {self.request_id!r}: tokens must be an int >= {least}")
        if not isinstance(self.rows, int) or self.rows < 1:
            raise InvalidRequest(f"{self.kind.value} {self.request_id!r}: rows must be an int >= 1")


@dataclass
class SchedulerPolicy:
    """Knobs of the scheduler.

    ``decode_steps_per_slice``: decode steps per sampling slice. Longer slices amortise switching
    between sampling and training; shorter ones cut the latency the other kind sees.
    ``train_token_budget``: padded tokens per training slice, what one slice of forward/backward may
    hold in memory (the runner splits it into micro-batches under its own budget).
    ``quantum_tokens``: DRR quantum per visit, times the adapter's weight. Smaller quanta interleave
    adapters more finely (more adapters per slice); larger ones take fewer visits per big item.
    ``max_decode_rows``: the decode batch's capacity in rows, if known. A sample wider than the whole
    batch could never be admitted and would hold up every adapter's sampling at its turn, so ``submit``
    refuses it as the tenant's error. ``None`` leaves that check to the caller.
    ``decode_in_background``: the decode batch runs outside the engine's steps (the vLLM sampler), so a
    ``DecodeSlice`` only admits: running rows still hold capacity, but never make a slice by themselves.
    """

    decode_steps_per_slice: int = 8
    train_token_budget: int = 8192
    quantum_tokens: int = 1024
    max_decode_rows: int | None = None
    decode_in_background: bool = False
    max_adapter_rows: int | None = None

    def __post_init__(self) -> None:
        for name in ("decode_steps_per_slice", "train_token_budget", "quantum_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_decode_rows is not None and (not isinstance(self.max_decode_rows, int) or self.max_decode_rows < 1):
            raise ValueError(f"max_decode_rows must be a positive int or None, got {self.max_decode_rows!r}")
        cap = self.max_adapter_rows
        if cap is not None and (not isinstance(cap, int) or cap < 1):
            raise ValueError(f"max_adapter_rows must be a positive int or None, got {cap!r}")


@dataclass(frozen=True)
class RunBarrier:
    """Run this ``optim_step`` or ``control`` item alone, now."""

    item: WorkItem


@dataclass(frozen=True)
class TrainSlice:
    """Run the ``forward_backward`` of these items, of many adapters, as one training slice."""

    items: list[WorkItem]

    @property
    def tokens(self) -> int:
        return sum(item.tokens for item in self.items)


@dataclass(frozen=True)
class DecodeSlice:
    """Admit these samples into the decode batch, then run ``steps`` decode steps for all running rows."""

    admit: list[WorkItem]
    steps: int

    @property
    def rows(self) -> int:
        return sum(item.rows for item in self.admit)


@dataclass(frozen=True)
class Idle:
    """Nothing can run until something is submitted or completed."""


Step = RunBarrier | TrainSlice | DecodeSlice | Idle


@dataclass
class _Epoch:
    """An adapter's items between two barriers; ``barrier`` closes it (None: still open)."""

    samples: deque[WorkItem] = field(default_factory=deque)
    forward_backward: deque[WorkItem] = field(default_factory=deque)
    barrier: WorkItem | None = None


@dataclass
class _AdapterState:
    weight: float = 1.0
    # Never empty: the last epoch is the open one that new sample/forward_backward items join.
    epochs: deque[_Epoch] = field(default_factory=lambda: deque([_Epoch()]))
    in_flight: int = 0  # dispatched, not yet completed
    barrier_in_flight: bool = False
    rows: int = 0  # decode rows held by its admitted, unfinished samples

    def eligible(self, kind: WorkKind) -> deque[WorkItem] | None:
        """The queue of ``kind`` whose head may run now, if any (only the first epoch's)."""
        if self.barrier_in_flight:
            return None
        epoch = self.epochs[0]
        return epoch.samples if kind is WorkKind.SAMPLE else epoch.forward_backward

    def ready_barrier(self) -> WorkItem | None:
        epoch = self.epochs[0]
        if self.barrier_in_flight or self.in_flight or epoch.samples or epoch.forward_backward:
            return None
        return epoch.barrier


QueueOf = Callable[[str], "deque[WorkItem] | None"]


class _DeficitRoundRobin:
    """Weighted DRR over the adapters' queues of one kind, resumable across slices.

    ``cursor`` indexes the adapter ring; ``in_visit`` says the adapter at the cursor already got this
    round's quantum, which is how a slice that filled up mid-visit hands the visit to the next slice.
    """

    def __init__(self, quantum: int) -> None:
        self.quantum = quantum
        self.deficit: dict[str, float] = {}
        self.cursor = 0
        self.in_visit = False

    def fill(
        self,
        ring: list[str],
        queue: QueueOf,
        weight: Callable[[str], float],
        capacity: int,
        size: Callable[[WorkItem], int],
        oversize_alone: bool,
        room: Callable[[str], int] | None = None,
    ) -> list[WorkItem]:
        """Pop items in DRR order until the next one does not fit ``capacity`` or nothing is eligible.

        ``room(adapter)``: how much more ``size`` that adapter may take now; an adapter whose head does not
        fit its own room is skipped as not eligible (None: no per-adapter bound).
        """
        taken: list[WorkItem] = []
        taken_by: dict[str, int] = {}
        used = 0
        idle_visits = 0
        base = queue

        def fits_room(adapter: str, item: WorkItem) -> bool:
            return room is None or taken_by.get(adapter, 0) + size(item) <= room(adapter)

        def queue(adapter: str) -> deque[WorkItem] | None:
            items = base(adapter)
            return items if items and fits_room(adapter, items[0]) else None

        while ring:
            self.cursor %= len(ring)
            adapter = ring[self.cursor]
            items = queue(adapter)
            served = False
            if items:
                if not self.in_visit:
                    self.deficit[adapter] = self.deficit.get(adapter, 0.0) + self.quantum * weight(adapter)
                    self.in_visit = True
                while items and items[0].tokens <= self.deficit[adapter]:
                    item = items[0]
                    if not fits_room(adapter, item):
                        break  # at its own bound: the rest of its queue is not eligible now
                    if used + size(item) > capacity and not (oversize_alone and not taken):
                        return taken  # full: the next slice resumes this visit
                    items.popleft()
                    taken.append(item)
                    taken_by[adapter] = taken_by.get(adapter, 0) + size(item)
                    used += size(item)
                    self.deficit[adapter] -= item.tokens
                    served = True
            if not queue(adapter):
                self.deficit.pop(adapter, None)  # no eligible work: no banked credit
            self.in_visit = False
            self.cursor = (self.cursor + 1) % len(ring)
            idle_visits = 0 if served else idle_visits + 1
            if idle_visits >= len(ring):
                if taken and not _any_head_fits(ring, queue, size, capacity - used):
                    break  # nothing more fits this slice: the next slice grants the rounds, among who waits then
                if not self._skip_idle_rounds(ring, queue, weight):
                    break
                idle_visits = 0
        return taken

    def _skip_idle_rounds(self, ring: list[str], queue: QueueOf, weight: Callable[[str], float]) -> bool:
        """After a round in which no one could afford its head, grant at once the rounds until someone can.

        Equivalent to running those empty rounds one by one (each eligible adapter gets its quantum
        per round), without looping ``cost / quantum`` times over big items. False if no one is eligible.
        """
        rounds: dict[str, float] = {}
        for adapter in ring:
            items = queue(adapter)
            if items:
                rounds[adapter] = (items[0].tokens - self.deficit.get(adapter, 0.0)) / (self.quantum * weight(adapter))
        if not rounds:
            return False
        skip = max(0, math.ceil(min(rounds.values())) - 1)
        for adapter in rounds:
            self.deficit[adapter] = self.deficit.get(adapter, 0.0) + skip * self.quantum * weight(adapter)
        return True

    def forget(self, index: int, adapter_id: str) -> None:
        """The adapter at ``index`` left the ring; keep the cursor on the same adapter (or its successor)."""
        self.deficit.pop(adapter_id, None)
        if index < self.cursor:
            self.cursor -= 1
        elif index == self.cursor:
            self.in_visit = False


def _any_head_fits(ring: list[str], queue: QueueOf, size: Callable[[WorkItem], int], room: int) -> bool:
    """Whether some adapter's next item fits ``room``. Without this check a full slice would grant the
    rounds a big item needs, and the next slice would open with that pre-paid visit, ahead of an adapter
    whose work arrived meanwhile (a tenant's small forward_backward waited one more 0.4 s slice of a
    training flood's parts)."""
    return any((items := queue(adapter)) and size(items[0]) <= room for adapter in ring)


def validate_weight(adapter_id: str, weight: object) -> None:
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
        raise InvalidRequest(f"adapter {adapter_id!r}: weight must be a finite number > 0, got {weight!r}")


class Scheduler:
    """Decides the engine's next step from pending work; see the module docstring for the rules."""

    def __init__(self, policy: SchedulerPolicy | None = None) -> None:
        self.policy = policy or SchedulerPolicy()
        self._adapters: dict[str, _AdapterState] = {}
        self._ring: list[str] = []  # adapters in registration order: the round-robin order
        self._in_flight: dict[str, tuple[WorkItem, _AdapterState]] = {}
        self._order: dict[str, int] = {}  # pending request_id -> submission number
        self._submitted = 0
        self._running_rows = 0
        self._last_slice: WorkKind | None = None
        self._train = _DeficitRoundRobin(self.policy.quantum_tokens)
        self._decode = _DeficitRoundRobin(self.policy.quantum_tokens)
        self._barrier_cursor = 0

    # -- input -------------------------------------------------------------------------------------

    def submit(self, item: WorkItem) -> None:
        if item.request_id in self._order or item.request_id in self._in_flight:
            raise InvalidRequest(f"request_id {item.request_id!r} is already queued or running")
        cap = self.policy.max_decode_rows
        if item.kind is WorkKind.SAMPLE and cap is not None and item.rows > cap:
            raise InvalidRequest(f"sample {item.request_id!r} needs {item.rows} rows; the decode batch holds {cap}")
        own = self.policy.max_adapter_rows
        if item.kind is WorkKind.SAMPLE and own is not None and item.rows > own:
            raise InvalidRequest(f"sample {item.request_id!r} needs {item.rows} rows; one adapter may hold {own}")
        state = self._state(item.adapter_id)
        epoch = state.epochs[-1]
        if item.kind.is_barrier:
            epoch.barrier = item
            state.epochs.append(_Epoch())
        elif item.kind is WorkKind.SAMPLE:
            epoch.samples.append(item)
        else:
            epoch.forward_backward.append(item)
        self._order[item.request_id] = self._submitted
        self._submitted += 1

    def set_weight(self, adapter_id: str, weight: float) -> None:
        """An adapter's share of tokens, relative to others (default 1.0); kept until ``remove_adapter``."""
        validate_weight(adapter_id, weight)
        self._state(adapter_id).weight = float(weight)

    def complete(self, request_id: str) -> None:
        """A dispatched request is done (successfully or not); frees its rows and may unblock a barrier."""
        if request_id not in self._in_flight:
            raise ValueError(f"request {request_id!r} is not running")
        item, state = self._in_flight.pop(request_id)
        state.in_flight -= 1
        if item.kind.is_barrier:
            state.barrier_in_flight = False
        elif item.kind is WorkKind.SAMPLE:
            self._running_rows -= item.rows
            state.rows -= item.rows

    def remove_adapter(self, adapter_id: str) -> list[WorkItem]:
        """Forget the adapter and return its pending items in submission order.

        Its running items stay counted (their rows are still taken) until the engine stops them and
        calls ``complete``.
        """
        state = self._adapters.pop(adapter_id, None)
        if state is None:
            return []
        index = self._ring.index(adapter_id)
        self._ring.pop(index)
        self._train.forget(index, adapter_id)
        self._decode.forget(index, adapter_id)
        if index < self._barrier_cursor:
            self._barrier_cursor -= 1
        dropped = [
            item
            for epoch in state.epochs
            for item in (*epoch.samples, *epoch.forward_backward, *((epoch.barrier,) if epoch.barrier else ()))
        ]
        dropped.sort(key=lambda item: self._order[item.request_id])
        for item in dropped:
            del self._order[item.request_id]
        return dropped

    # -- decisions ---------------------------------------------------------------------------------

    def next_step(self, free_decode_rows: int, continue_decode: bool = False) -> Step:
        """The next step. ``continue_decode``: the engine cut the last decode slice short for a newcomer
        while sampling still had time owed (it had less time than the last training slice): sample again
        before training's turn. The engine bounds it by time, so training still runs in turn."""
        if free_decode_rows < 0:
            raise ValueError(f"free_decode_rows must be >= 0, got {free_decode_rows}")
        barrier = self._take_barrier()
        if barrier is not None:
            self._dispatch(barrier)
            return RunBarrier(barrier)
        decoding_here = self._running_rows > 0 and not self.policy.decode_in_background
        decode_ready = decoding_here or self._any_eligible(WorkKind.SAMPLE)
        train_ready = self._any_eligible(WorkKind.FORWARD_BACKWARD)
        decode_first = continue_decode or self._last_slice is not WorkKind.SAMPLE
        for decode in (decode_first, not decode_first):
            if decode and decode_ready:
                admit = self._decode.fill(
                    self._ring,
                    self._queue(WorkKind.SAMPLE),
                    self.weight,
                    free_decode_rows,
                    _rows,
                    False,
                    None if self.policy.max_adapter_rows is None else self._adapter_room,
                )
                # Empty and nothing running: the next sample cannot fit even an idle batch (see
                # ``max_decode_rows``); decoding nothing would spin, so let training run instead.
                if admit or decoding_here:
                    for item in admit:
                        self._dispatch(item)
                    self._last_slice = WorkKind.SAMPLE
                    return DecodeSlice(admit=admit, steps=self.policy.decode_steps_per_slice)
            if not decode and train_ready:
                items = self._train.fill(
                    self._ring,
                    self._queue(WorkKind.FORWARD_BACKWARD),
                    self.weight,
                    self.policy.train_token_budget,
                    _tokens,
                    True,
                )
                for item in items:
                    self._dispatch(item)
                self._last_slice = WorkKind.FORWARD_BACKWARD
                return TrainSlice(items=items)
        return Idle()

    # -- introspection -----------------------------------------------------------------------------

    def pending(self, adapter_id: str | None = None) -> int:
        """Submitted items not yet dispatched, of one adapter or all."""
        if adapter_id is None:
            return len(self._order)
        state = self._adapters.get(adapter_id)
        if state is None:
            return 0
        return sum(len(e.samples) + len(e.forward_backward) + (e.barrier is not None) for e in state.epochs)

    def has_work(self) -> bool:
        """Whether anything is pending or decoding.

        ``next_step`` may still be ``Idle`` while all of it waits on completions not yet reported.
        """
        return bool(self._order) or self._running_rows > 0

    def in_flight(self, adapter_id: str | None = None) -> int:
        """Dispatched items not yet reported complete, of one adapter or all."""
        if adapter_id is None:
            return len(self._in_flight)
        state = self._adapters.get(adapter_id)
        return state.in_flight if state is not None else 0

    def adapter_ids(self) -> list[str]:
        """Adapters the scheduler knows (registration order)."""
        return list(self._ring)

    def adapter_rows(self, adapter_id: str) -> int:
        """Decode rows held by the adapter's admitted, unfinished samples."""
        state = self._adapters.get(adapter_id)
        return state.rows if state is not None else 0

    @property
    def running_rows(self) -> int:
        """Decode rows held by admitted, unfinished samples."""
        return self._running_rows

    def weight(self, adapter_id: str) -> float:
        state = self._adapters.get(adapter_id)
        return state.weight if state is not None else 1.0

    def deficit(self, adapter_id: str, kind: WorkKind) -> float:
        """The adapter's DRR credit in tokens for ``kind`` (sample or forward_backward)."""
        drr = self._decode if kind is WorkKind.SAMPLE else self._train
        return drr.deficit.get(adapter_id, 0.0)

    def eligible(self, adapter_id: str, kind: WorkKind) -> bool:
        """Whether the adapter has an item of ``kind`` that ordering allows to run now."""
        state = self._adapters.get(adapter_id)
        if state is None:
            return False
        if kind.is_barrier:
            return state.ready_barrier() is not None
        return bool(state.eligible(kind))

    # -- internals ---------------------------------------------------------------------------------

    def _state(self, adapter_id: str) -> _AdapterState:
        state = self._adapters.get(adapter_id)
        if state is None:
            state = self._adapters[adapter_id] = _AdapterState()
            self._ring.append(adapter_id)
        return state

    def _adapter_room(self, adapter_id: str) -> int:
        assert self.policy.max_adapter_rows is not None
        return self.policy.max_adapter_rows - self._adapters[adapter_id].rows

    def _queue(self, kind: WorkKind) -> QueueOf:
        return lambda adapter_id: self._adapters[adapter_id].eligible(kind)

    def _any_eligible(self, kind: WorkKind) -> bool:
        return any(state.eligible(kind) for state in self._adapters.values())

    def _take_barrier(self) -> WorkItem | None:
        n = len(self._ring)
        for offset in range(n):
            index = (self._barrier_cursor + offset) % n
            state = self._adapters[self._ring[index]]
            if state.ready_barrier() is not None:
                self._barrier_cursor = (index + 1) % n
                return state.epochs.popleft().barrier
        return None

    def _dispatch(self, item: WorkItem) -> None:
        state = self._adapters[item.adapter_id]
        del self._order[item.request_id]
        self._in_flight[item.request_id] = (item, state)
        state.in_flight += 1
        if item.kind.is_barrier:
            state.barrier_in_flight = True
        elif item.kind is WorkKind.SAMPLE:
            self._running_rows += item.rows
            state.rows += item.rows


def _rows(item: WorkItem) -> int:
    return item.rows


def _tokens(item: WorkItem) -> int:
    return item.tokens
