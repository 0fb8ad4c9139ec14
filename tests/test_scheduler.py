"""The scheduler, driven with plain data by a simulated engine.

``Sim`` plays the engine loop: barriers and training items complete as soon as their step ran, each
sample after its own number of decode slices. It keeps its own model of what is eligible (derived
from submission order alone, not from the scheduler) and checks every step against the module
docstring's rules: order around barriers, budgets, alternation, and the starvation bounds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotlora.engine.scheduler import (
    DecodeSlice,
    Idle,
    RunBarrier,
    Scheduler,
    SchedulerPolicy,
    Step,
    TrainSlice,
    WorkItem,
    WorkKind,
)
from hotlora.schemas.errors import InvalidRequest

S, FB, OPT, CTL = WorkKind.SAMPLE, WorkKind.FORWARD_BACKWARD, WorkKind.OPTIM_STEP, WorkKind.CONTROL


def item(rid: str, adapter: str, kind: WorkKind, tokens: int = 0, rows: int = 1) -> WorkItem:
    if not kind.is_barrier:
        tokens = max(tokens, 1)
    return WorkItem(rid, adapter, kind, tokens, rows)


@dataclass
class Sim:
    scheduler: Scheduler
    capacity: int  # decode batch rows
    durations: dict[str, int] = field(default_factory=dict)  # sample -> decode slices it needs
    weights: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[WorkItem]] = field(default_factory=lambda: defaultdict(list))  # per adapter
    pending: dict[str, list[WorkItem]] = field(default_factory=lambda: defaultdict(list))  # not dispatched
    done: set[str] = field(default_factory=set)
    running: dict[str, int] = field(default_factory=dict)  # sample -> decode slices left
    rows_of: dict[str, int] = field(default_factory=dict)
    position: dict[str, int] = field(default_factory=dict)  # request -> index in its adapter's history
    barriers: dict[str, list[WorkItem]] = field(default_factory=lambda: defaultdict(list))
    slices: list[WorkKind] = field(default_factory=list)
    train_waits: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    decode_waits: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    max_train_wait: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    max_decode_wait: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    served_tokens: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def submit(self, work: WorkItem, duration: int = 1) -> None:
        self.scheduler.submit(work)
        self.position[work.request_id] = len(self.history[work.adapter_id])
        self.history[work.adapter_id].append(work)
        if work.kind.is_barrier:
            self.barriers[work.adapter_id].append(work)
        self.pending[work.adapter_id].append(work)
        self.rows_of[work.request_id] = work.rows
        if work.kind is S:
            self.durations[work.request_id] = duration

    def eligible(self, adapter: str, kind: WorkKind) -> bool:
        """Our own model: an item of ``kind`` pending before the adapter's first pending barrier.

        (Barriers complete within their step here, so none is ever in flight between steps.)
        """
        for queued in self.pending[adapter]:
            if queued.kind.is_barrier:
                return False
            if queued.kind is kind:
                return True
        return False

    @property
    def running_rows(self) -> int:
        return sum(self.rows_of[rid] for rid in self.running)

    def step(self) -> Step:
        adapters = list(self.pending)
        train_ready = {a for a in adapters if self.eligible(a, FB)}
        sample_ready = {a for a in adapters if self.eligible(a, S)}
        decode_work = bool(sample_ready) or bool(self.running)
        free = self.capacity - self.running_rows
        step = self.scheduler.next_step(free)

        if isinstance(step, RunBarrier):
            self._dispatch([step.item])
            self._complete(step.item.request_id)
        elif isinstance(step, TrainSlice):
            assert train_ready, "training slice without eligible forward_backward"
            assert step.items, "empty training slice"
            budget = self.scheduler.policy.train_token_budget
            assert step.tokens <= budget or len(step.items) == 1, f"{step.tokens} tokens over budget {budget}"
            assert all(x.kind is FB for x in step.items)
            self._alternates(FB, decode_work)
            self._dispatch(step.items)
            served = {x.adapter_id for x in step.items}
            self._track_waits(self.train_waits, self.max_train_wait, train_ready, served)
            for x in step.items:
                self.served_tokens[x.adapter_id] += x.tokens
                self._complete(x.request_id)
        elif isinstance(step, DecodeSlice):
            assert decode_work, "decode slice with nothing to decode"
            assert step.steps == self.scheduler.policy.decode_steps_per_slice
            assert step.rows <= free, f"admitted {step.rows} rows, {free} free"
            assert step.admit or self.running, "decode slice that admits nothing and decodes nothing"
            assert all(x.kind is S for x in step.admit)
            self._alternates(S, bool(train_ready))
            self._dispatch(step.admit)
            served = {x.adapter_id for x in step.admit}
            self._track_waits(self.decode_waits, self.max_decode_wait, sample_ready, served)
            for x in step.admit:
                self.running[x.request_id] = self.durations[x.request_id]
            for rid in list(self.running):
                self.running[rid] -= 1
                if self.running[rid] == 0:
                    del self.running[rid]
                    self._complete(rid)
        else:
            assert isinstance(step, Idle)
            assert not any(self.pending.values()) and not self.running, "idle while work could run: deadlock"
        # DRR credit is never banked by adapters that have nothing eligible.
        for a in adapters:
            for kind in (S, FB):
                if not self.eligible(a, kind):
                    assert self.scheduler.deficit(a, kind) == 0, (a, kind)
        return step

    def _alternates(self, kind: WorkKind, other_kind_has_work: bool) -> None:
        if other_kind_has_work and self.slices:
            assert self.slices[-1] is not kind, f"two {kind.value} slices in a row while the other kind had work"
        self.slices.append(kind)

    @staticmethod
    def _track_waits(waits: dict[str, int], worst: dict[str, int], ready: set[str], served: set[str]) -> None:
        for a in list(waits):
            if a not in ready:
                waits[a] = 0
        for a in ready:
            waits[a] = 0 if a in served else waits[a] + 1
            worst[a] = max(worst[a], waits[a])

    def _dispatch(self, items: list[WorkItem]) -> None:
        for x in items:
            queue = self.pending[x.adapter_id]
            here = self.position[x.request_id]
            if x.kind.is_barrier:
                earlier = self.history[x.adapter_id][:here]
                assert all(e.request_id in self.done for e in earlier), f"barrier {x.request_id} ran early"
            else:
                assert all(
                    b.request_id in self.done for b in self.barriers[x.adapter_id] if self.position[b.request_id] < here
                ), f"{x.request_id} ran before an earlier barrier completed"
                # Within a kind, submission order holds.
                assert next(q for q in queue if q.kind is x.kind) is x, f"{x.request_id} overtook its kind"
            queue.remove(x)

    def _complete(self, rid: str) -> None:
        self.scheduler.complete(rid)
        self.done.add(rid)


def train_bound(policy: SchedulerPolicy, weights: dict[str, float], adapter: str, largest: int) -> int:
    """The module docstring's training bound, with A and W over every adapter in ``weights``."""
    q, budget = policy.quantum_tokens, policy.train_token_budget
    v = math.ceil(largest / (q * weights[adapter]))
    others = [b for b in weights if b != adapter]
    total = len(others) * largest + (v + 1) * q * sum(weights[b] for b in others)
    return 2 * math.ceil(total / budget)


def decode_bound(
    policy: SchedulerPolicy, weights: dict[str, float], adapter: str, largest: int, cheapest: int, longest: int
) -> int:
    """The sampling bound: ``longest`` is the most decode slices any sample takes (L)."""
    q = policy.quantum_tokens
    v = math.ceil(largest / (q * weights[adapter]))
    n = sum(math.floor((largest + (v + 1) * q * weights[b]) / cheapest) for b in weights if b != adapter)
    return (n + 1) * (longest + 1) - 1


KIND_MIX = [S, S, S, FB, FB, FB, OPT, CTL]


Arrival = tuple[int, WorkItem, int]  # (step it arrives before, item, decode slices a sample takes)
Workload = tuple[SchedulerPolicy, int, dict[str, float], list[Arrival]]  # (policy, decode rows, weights, arrivals)


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    policy = SchedulerPolicy(
        decode_steps_per_slice=draw(st.integers(1, 4)),
        train_token_budget=draw(st.integers(16, 128)),
        quantum_tokens=draw(st.integers(4, 64)),
    )
    capacity = draw(st.integers(1, 8))
    n_adapters = draw(st.integers(1, 5))
    weights = {f"a{i}": draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])) for i in range(n_adapters)}
    arrivals = []
    for i in range(draw(st.integers(0, 40))):
        adapter = f"a{draw(st.integers(0, n_adapters - 1))}"
        kind = draw(st.sampled_from(KIND_MIX))
        if kind is S:
            work = item(f"r{i}", adapter, kind, draw(st.integers(1, 200)), draw(st.integers(1, capacity)))
        elif kind is FB:
            # Up to twice the budget, so oversize items show up.
            work = item(f"r{i}", adapter, kind, draw(st.integers(1, 2 * policy.train_token_budget)))
        else:
            work = item(f"r{i}", adapter, kind)
        arrivals.append((draw(st.integers(0, 20)), work, draw(st.integers(1, 5))))
    arrivals.sort(key=lambda a: a[0])  # stable: same-time arrivals keep their order
    return policy, capacity, weights, arrivals


def run_workload(policy: SchedulerPolicy, capacity: int, weights: dict[str, float], arrivals: list[Arrival]) -> Sim:
    scheduler = Scheduler(policy)
    sim = Sim(scheduler, capacity, weights=weights)
    for adapter, weight in weights.items():
        scheduler.set_weight(adapter, weight)
    longest = max((d for _, _, d in arrivals), default=1)
    last = max((t for t, _, _ in arrivals), default=0)
    # Every step makes progress: a barrier or a training slice dispatches an item, and a decode
    # slice admits one or is one of at most ``longest`` slices in a row that only decode.
    limit = last + 1 + len(arrivals) * (longest + 2) + longest
    queue = list(arrivals)
    for t in range(limit):
        while queue and queue[0][0] == t:
            _, work, duration = queue.pop(0)
            sim.submit(work, duration)
        sim.step()
        if not queue and not scheduler.has_work():
            break
    assert not queue
    assert not scheduler.has_work() and scheduler.in_flight() == 0, f"not done within {limit} steps"
    assert sim.done == {work.request_id for _, work, _ in arrivals}
    return sim


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_keep_order_budgets_alternation_and_bounds(workload: Workload) -> None:
    policy, capacity, weights, arrivals = workload
    sim = run_workload(policy, capacity, weights, arrivals)
    fb_costs = [work.tokens for _, work, _ in arrivals if work.kind is FB] or [1]
    sample_costs = [work.tokens for _, work, _ in arrivals if work.kind is S] or [1]
    longest = max((d for _, _, d in arrivals), default=1)
    for adapter in weights:
        assert sim.max_train_wait[adapter] <= train_bound(policy, weights, adapter, max(fb_costs)), adapter
        bound = decode_bound(policy, weights, adapter, max(sample_costs), min(sample_costs), longest)
        assert sim.max_decode_wait[adapter] <= bound, adapter


@settings(max_examples=100, deadline=None)
@given(
    weights=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=2, max_size=4),
    quantum=st.integers(8, 256),
    budget=st.integers(64, 2048),
    cost=st.integers(1, 1024),
    seed=st.integers(0, 2**16),
)
def test_backlogged_service_tracks_weights(
    weights: list[float], quantum: int, budget: int, cost: int, seed: int
) -> None:
    """DRR's guarantee: served_a / w_a of always-backlogged adapters differ by less than q + C / min(w).

    After k full rounds adapter a was served k*q*w_a minus its deficit (in [0, C)); a partial round adds
    at most q*w_a. Dividing by w_a gives the bound, whatever the slice cuts.
    """
    policy = SchedulerPolicy(train_token_budget=budget, quantum_tokens=quantum)
    scheduler = Scheduler(policy)
    sim = Sim(scheduler, capacity=1)
    n = 0
    for i, w in enumerate(weights):
        scheduler.set_weight(f"a{i}", w)
        for _ in range(200):
            n += 1
            sim.submit(item(f"r{n}", f"a{i}", FB, 1 + (n * 7919 + seed) % cost))
    for _ in range(30):
        assert isinstance(sim.step(), TrainSlice)
        # Stop measuring once any queue could have drained: "backlogged" must hold throughout.
        if min(scheduler.pending(f"a{i}") for i in range(len(weights))) < 2:
            break
        normalized = [sim.served_tokens[f"a{i}"] / w for i, w in enumerate(weights)]
        assert max(normalized) - min(normalized) < quantum + cost / min(weights)


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=1, max_size=4),
    newcomer_weight=st.sampled_from([0.5, 1.0, 3.0]),
    arrival=st.integers(0, 30),
    seed=st.integers(0, 2**16),
)
def test_backlogged_adapters_cannot_starve_a_newcomer(
    weights: list[float], newcomer_weight: float, arrival: int, seed: int
) -> None:
    """Adapters that never run dry, and one that sends a single sample and forward_backward late.

    The newcomer must be served within the docstring's bounds: a scheduler that drained one queue
    before the next, or let narrow samples take the rows a wide one waits for, never serves it.
    """
    policy = SchedulerPolicy(decode_steps_per_slice=2, train_token_budget=256, quantum_tokens=32)
    capacity, longest, largest, cheapest = 4, 3, 300, 10
    backlogged = {f"b{i}": w for i, w in enumerate(weights)}
    all_weights = {**backlogged, "new": newcomer_weight}
    scheduler = Scheduler(policy)
    sim = Sim(scheduler, capacity, weights=all_weights)
    for adapter, w in all_weights.items():
        scheduler.set_weight(adapter, w)
    n = 0

    def cost(k: int) -> int:
        return cheapest + (k * 7919 + seed) % (largest - cheapest + 1)

    for t in range(arrival + 200):
        for adapter in backlogged:
            for kind in (S, FB):
                while sum(x.kind is kind for x in sim.pending[adapter]) < 3:
                    n += 1
                    sim.submit(item(f"r{n}", adapter, kind, cost(n), rows=1 + n % capacity), 1 + n % longest)
        if t == arrival:
            sim.submit(item("new-s", "new", S, largest, rows=capacity), longest)
            sim.submit(item("new-f", "new", FB, largest))
        sim.step()
    assert {"new-s", "new-f"} <= sim.done
    assert sim.max_train_wait["new"] <= train_bound(policy, all_weights, "new", largest)
    assert sim.max_decode_wait["new"] <= decode_bound(policy, all_weights, "new", largest, cheapest, longest)


def test_weights_one_to_three_share_tokens_one_to_three() -> None:
    """Two backlogged adapters at weights 1 and 3 over 300 training slices.

    By the bound above |s1 - s3/3| < q + C; with s1 around 6e5 tokens that allows 1.5% off 3:1, and
    a scheduler that ignored weights would sit at 1:1.
    """
    policy = SchedulerPolicy(train_token_budget=8192, quantum_tokens=1024)
    scheduler = Scheduler(policy)
    scheduler.set_weight("light", 1.0)
    scheduler.set_weight("heavy", 3.0)
    sim = Sim(scheduler, capacity=1)
    cost = 2000
    for i in range(2500):
        for adapter in ("light", "heavy"):
            sim.submit(item(f"{adapter}{i}", adapter, FB, 1 + (i * 7919) % cost))
    for _ in range(300):
        assert isinstance(sim.step(), TrainSlice)
    assert scheduler.pending("light") and scheduler.pending("heavy")  # backlogged to the end
    light, heavy = sim.served_tokens["light"], sim.served_tokens["heavy"]
    tolerance = 3 * (policy.quantum_tokens + cost) / light
    assert tolerance < 0.02
    assert abs(heavy / light - 3) <= tolerance, heavy / light


def test_slices_pack_many_adapters() -> None:
    scheduler = Scheduler(SchedulerPolicy(train_token_budget=8192, quantum_tokens=1024))
    for a in range(10):
        for i in range(4):
            scheduler.submit(item(f"{a}-{i}", f"a{a}", FB, 1000))
    step = scheduler.next_step(0)
    assert isinstance(step, TrainSlice)
    assert len({x.adapter_id for x in step.items}) == 8  # one 1000-token item per 1024-token visit
    assert step.tokens == 8000


def test_alternates_decode_and_train_and_decodes_with_empty_admit() -> None:
    scheduler = Scheduler(SchedulerPolicy(decode_steps_per_slice=4))
    scheduler.submit(item("s1", "a", S, 100, rows=2))
    for i in range(3):
        scheduler.submit(item(f"f{i}", "b", FB, 5000))
    kinds = []
    for _ in range(6):
        step = scheduler.next_step(free_decode_rows=8 - scheduler.running_rows)
        kinds.append(type(step))
        if isinstance(step, TrainSlice):
            for x in step.items:
                scheduler.complete(x.request_id)
    assert kinds == [DecodeSlice, TrainSlice, DecodeSlice, TrainSlice, DecodeSlice, TrainSlice]
    scheduler.complete("s1")
    assert isinstance(scheduler.next_step(8), Idle)
    assert not scheduler.has_work()


def test_barrier_waits_for_running_samples_and_holds_later_items() -> None:
    scheduler = Scheduler()
    scheduler.submit(item("s1", "a", S, 100, rows=4))
    scheduler.submit(item("f1", "a", FB, 100))
    scheduler.submit(item("o1", "a", OPT))
    scheduler.submit(item("f2", "a", FB, 100))
    step = scheduler.next_step(8)
    assert step == DecodeSlice(admit=[item("s1", "a", S, 100, rows=4)], steps=8)
    step = scheduler.next_step(4)
    assert isinstance(step, TrainSlice) and [x.request_id for x in step.items] == ["f1"]  # overtakes s1
    scheduler.complete("f1")
    # s1 still decodes: the optim_step and everything after it wait.
    for _ in range(3):
        step = scheduler.next_step(4)
        assert step == DecodeSlice(admit=[], steps=8)
    scheduler.complete("s1")
    assert scheduler.next_step(8) == RunBarrier(item("o1", "a", OPT))
    assert isinstance(scheduler.next_step(8), Idle)  # f2 waits for o1 to complete
    scheduler.complete("o1")
    step = scheduler.next_step(8)
    assert isinstance(step, TrainSlice) and [x.request_id for x in step.items] == ["f2"]


def test_barriers_go_first_round_robin() -> None:
    scheduler = Scheduler()
    for a in ("a", "b"):
        scheduler.submit(item(f"{a}f", a, FB, 10))
    for a in ("a", "b"):
        for i in range(2):
            scheduler.submit(item(f"{a}o{i}", a, OPT if i == 0 else CTL))
    step = scheduler.next_step(8)
    assert isinstance(step, TrainSlice)
    for x in step.items:
        scheduler.complete(x.request_id)
    order = []
    for _ in range(4):
        step = scheduler.next_step(8)
        assert isinstance(step, RunBarrier)
        order.append(step.item.request_id)
        scheduler.complete(step.item.request_id)
    assert order == ["ao0", "bo0", "ao1", "bo1"]


def test_oversize_item_runs_alone() -> None:
    scheduler = Scheduler(SchedulerPolicy(train_token_budget=100, quantum_tokens=50))
    scheduler.submit(item("small", "a", FB, 10))
    scheduler.submit(item("huge", "b", FB, 500))
    scheduler.submit(item("small2", "a", FB, 10))
    slices = []
    while scheduler.has_work():
        step = scheduler.next_step(0)
        assert isinstance(step, TrainSlice)
        slices.append([x.request_id for x in step.items])
        for x in step.items:
            scheduler.complete(x.request_id)
    assert ["huge"] in slices
    assert sorted(r for s in slices for r in s) == ["huge", "small", "small2"]


def test_wide_sample_reserves_rows_instead_of_starving() -> None:
    """Narrow samples of another adapter must not keep taking the rows a wide sample waits for."""
    scheduler = Scheduler(SchedulerPolicy(quantum_tokens=100))
    scheduler.submit(item("n0", "narrow", S, 100, rows=1))
    scheduler.submit(item("wide", "wide", S, 100, rows=4))
    for i in range(1, 20):
        scheduler.submit(item(f"n{i}", "narrow", S, 100, rows=1))
    step = scheduler.next_step(2)
    assert [x.request_id for x in step.admit] == ["n0"]  # then wide's turn: 4 rows > 1 free
    assert scheduler.next_step(1) == DecodeSlice(admit=[], steps=8)  # holds the row for wide
    scheduler.complete("n0")
    step = scheduler.next_step(4)
    assert step.admit[0].request_id == "wide"


def test_remove_adapter_returns_pending_in_order_and_running_still_complete() -> None:
    scheduler = Scheduler()
    scheduler.submit(item("s1", "a", S, 10))
    scheduler.submit(item("f1", "a", FB, 10))
    scheduler.submit(item("o1", "a", OPT))
    scheduler.submit(item("s2", "a", S, 10))
    scheduler.submit(item("g1", "b", FB, 10))
    step = scheduler.next_step(8)
    assert [x.request_id for x in step.admit] == ["s1"]
    dropped = scheduler.remove_adapter("a")
    assert [x.request_id for x in dropped] == ["f1", "o1", "s2"]
    assert scheduler.pending() == 1 and scheduler.running_rows == 1
    scheduler.complete("s1")
    assert scheduler.running_rows == 0
    step = scheduler.next_step(8)
    assert isinstance(step, TrainSlice) and [x.request_id for x in step.items] == ["g1"]
    assert scheduler.remove_adapter("a") == []


def test_rejects_bad_input() -> None:
    scheduler = Scheduler(SchedulerPolicy(max_decode_rows=4))
    scheduler.submit(item("r", "a", FB, 1))
    with pytest.raises(InvalidRequest):
        scheduler.submit(item("r", "a", FB, 1))
    with pytest.raises(InvalidRequest):
        scheduler.submit(item("wide", "a", S, 1, rows=5))
    with pytest.raises(InvalidRequest):
        scheduler.set_weight("a", 0)
    with pytest.raises(InvalidRequest):
        WorkItem("x", "a", FB, 0)
    with pytest.raises(ValueError):
        scheduler.complete("r")  # queued, not running
    with pytest.raises(ValueError):
        SchedulerPolicy(train_token_budget=0)


def test_a_full_slice_does_not_prepay_the_next_visit() -> None:
    """A tenant whose work arrives while a big item's slice runs goes first in the next slice: the full
    slice did not grant the big items' next rounds in advance (it once did, and the newcomer's small
    forward_backward waited behind one more big part)."""
    sched = Scheduler(SchedulerPolicy(train_token_budget=8192, quantum_tokens=1024))
    for n in range(3):
        sched.submit(item(f"part{n}", "flood", FB, 8192))
    first = sched.next_step(free_decode_rows=0)
    assert isinstance(first, TrainSlice) and [i.request_id for i in first.items] == ["part0"]
    sched.complete("part0")
    sched.submit(item("small", "victim", FB, 368))
    second = sched.next_step(free_decode_rows=0)
    assert isinstance(second, TrainSlice) and [i.request_id for i in second.items] == ["small"]
    sched.complete("small")
    third = sched.next_step(free_decode_rows=0)
    assert isinstance(third, TrainSlice) and [i.request_id for i in third.items] == ["part1"]
