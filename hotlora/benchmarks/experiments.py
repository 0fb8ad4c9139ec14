"""``hotlora bench experiments``: RL experiments per hour, one tenant at a time vs all on one hot engine.

The same fixed catalogue of GRPO experiments (``agents.experiments.experiment_configs``: fixed seeds,
fixed steps) runs three ways in one run, each agent an asyncio task with its own ``HotLoraClient``:

1. **cold** single-tenant: one at a time, each on a freshly started engine process (start-up and
   model load included), the way a job-per-experiment cluster runs them. ``T1`` is the sum.
2. **warm** single-tenant: one at a time on one already-running engine. ``T2`` is the sum.
3. **concurrent**: all at once on that hot engine. ``T3`` is the wall time.

``cold_ratio = T1/T3`` and ``warm_ratio = T2/T3`` are the speed-ups of sharing one engine. Sharing
must not cost reward: each experiment also runs solo with a few seeds, and its concurrent final
held-out reward must not fall below that noise band (``band_low``). A sweep over the number of
concurrent experiments shows where throughput stops scaling and what a step costs meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hotlora.benchmarks.core import append_section, git_commit, machine_info, repo_root
from hotlora.progress import progress_bar

if TYPE_CHECKING:
    from hotlora.agents.client import HotLoraClient
    from hotlora.agents.grpo import GrpoConfig
    from hotlora.schemas import Metrics

DOCS_INTRO = """## `hotlora bench experiments`

The fixed catalogue of GRPO experiments (`agents/experiments.py`: one task and learning rate each, fixed
seeds and steps, held-out eval only at step 0 and at the end) runs three ways in one run. Every agent is
an asyncio task in the bench process with its own `HotLoraClient`, talking over Kafka to ONE engine
process:

- **cold** single-tenant: one experiment at a time, each on a freshly started engine process; its time
  runs from spawning the engine (model load and Kafka start-up included) to the experiment's last
  result (the engine's shutdown afterwards is not counted). `T1` is the sum.
- **warm** single-tenant: one at a time on one already-running engine. `T2` is the sum.
- **concurrent**: all at once on the same hot engine. `T3` is the wall time.

`cold_ratio = T1/T3` is the speed-up over launching a job per experiment; `warm_ratio = T2/T3` the
speed-up over queueing experiments on one warm engine.

**No reward regression.** Each experiment also runs solo on the warm engine with `s` seeds (the warm
run is seed 0; the others shift the LoRA init and the problems sampled). Its final reward is the last
held-out eval (`eval_reward`: mean verifier reward of `m` = 64 prompts x `eval_samples` sampled
completions). The band is one-sided, since doing better is no regression:
`band_low = min(solo finals) - 2 SE`, `SE = sqrt(p(1-p)/m)` with `p` the mean solo final clipped to
[0.05, 0.95]; an experiment is within band if its concurrent final reward >= `band_low`, and
`no_reward_regression` holds if every experiment is.

**Sweep.** For k concurrent experiments (the first k of the catalogue) on the warm engine, wall `W_k`
and `ratio_k = k W_1 / W_k`: throughput relative to one experiment alone (k would be perfect scaling).
Step latency is the agents' own `step_seconds` (sample, score, forward_backward, optim_step). k=1 reuses
the warm run of the first experiment and k=N the concurrent run.

`--quick` (under 5 minutes on 2 cores) runs every phase with less in it: 4 experiments x 3 steps, 3 solo
seeds, sweep 1,2,4, and 1 sampled completion per held-out prompt (m = 64, so a wider band).
"""

SECTION_HEADER = "## `hotlora bench experiments`"
DEFAULT_SWEEP: tuple[int, ...] = (1, 2, 4, 8, 16)
QUICK_SWEEP: tuple[int, ...] = (1, 2, 4)
DEFAULT_STEPS = 30
DEFAULT_EXPERIMENTS = 8
DEFAULT_SOLO_SEEDS = 3
# Quick must finish in under 5 minutes on 2 cores: every phase runs (cold start-ups included), just less
# of it. Evals dominate an experiment this short, so quick also draws 1 completion per held-out prompt.
QUICK_STEPS = 3
QUICK_EXPERIMENTS = 4  # 8 measured 330 s here: each cold engine start-up alone is ~15-20 s
QUICK_SOLO_SEEDS = 3
QUICK_OVERRIDES: dict[str, Any] = {"eval_samples": 1}
SE_CLIP = (0.05, 0.95)
ENGINE_READY_TIMEOUT_S = 300.0
CLEANUP_TIMEOUT_S = 15.0  # deleting an adapter must not hang a failing run on a dead engine
REQUEST_TIMEOUT_S = 600.0  # a request may queue behind many tenants' work on 2 cores: no spurious retries


@dataclass(frozen=True)
class Plan:
    """What one bench run does; validated once, so the phases can trust it."""

    experiments: int
    steps: int
    solo_seeds: int
    sweep: tuple[int, ...]
    quick: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # GrpoConfig fields (quick, tests)
    # False: throughput only, no held-out evals and no reward band (random-init shapes earn no reward).
    rewards: bool = True
    cold_first: bool = True  # False: warm and concurrent first, so a run cut short still has the ratio's base

    def configs(self, n: int | None = None, seed: int = 0) -> list[GrpoConfig]:
        """The catalogue's first ``n`` experiments; eval only at step 0 and the end in every mode (same cost)."""
        from hotlora.agents.experiments import experiment_configs

        return experiment_configs(n or self.experiments, self.steps, seed=seed, **self.grpo_overrides())

    def grpo_overrides(self) -> dict[str, Any]:
        return {"eval_every": self.steps if self.rewards else 0, **self.overrides}


@dataclass
class Run:
    """One experiment's run: when it finished (from its phase's start) and every Metrics it emitted."""

    config: GrpoConfig
    seconds: float
    metrics: list[Metrics] = field(default_factory=list)

    @property
    def final_reward(self) -> float:
        rewards = [m.eval_reward for m in self.metrics if m.eval_reward is not None]
        if not rewards:
            raise RuntimeError(f"{self.config.adapter_id} emitted no eval reward")
        return float(rewards[-1])

    @property
    def step_seconds(self) -> list[float]:
        return [m.step_seconds for m in self.metrics if m.step > 0]


# ----- the pure parts, tested by hand -----


def parse_sweep(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> ``(1, 2, 4)``: positive, distinct, sorted; ``SystemExit`` with the reason otherwise."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"error: --sweep must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise SystemExit(f"error: --sweep needs concurrency levels >= 1, got {text!r}")
    return tuple(sorted(set(values)))


def plan_from_args(args: argparse.Namespace) -> Plan:
    """Flags over the quick/full defaults, with a clear error for each bad value."""

    def pick(value: Any, quick: Any, full: Any) -> Any:
        return value if value is not None else (quick if args.quick else full)

    experiments = pick(args.experiments, QUICK_EXPERIMENTS, DEFAULT_EXPERIMENTS)
    if experiments < 1:
        raise SystemExit(f"error: --experiments must be >= 1, got {experiments}")
    steps = pick(args.steps, QUICK_STEPS, DEFAULT_STEPS)
    if steps < 1:
        raise SystemExit(f"error: --steps must be >= 1, got {steps}")
    solo_seeds = pick(args.solo_seeds, QUICK_SOLO_SEEDS, DEFAULT_SOLO_SEEDS)
    if solo_seeds < 1:
        raise SystemExit(f"error: --solo-seeds must be >= 1, got {solo_seeds}")
    sweep = parse_sweep(args.sweep) if args.sweep else (QUICK_SWEEP if args.quick else DEFAULT_SWEEP)
    overrides = dict(QUICK_OVERRIDES) if args.quick else {}
    return Plan(experiments, steps, solo_seeds, sweep, args.quick, overrides)


def band_low(solo_finals: Sequence[float], samples_per_eval: int) -> float:
    """min over solo seeds - 2 SE of a binomial mean over ``samples_per_eval`` draws (p clipped, so SE > 0)."""
    p = min(max(statistics.fmean(solo_finals), SE_CLIP[0]), SE_CLIP[1])
    return min(solo_finals) - 2.0 * math.sqrt(p * (1.0 - p) / samples_per_eval)


def within_band(concurrent_final: float, low: float) -> bool:
    """One-sided: a concurrent run that does better than solo is no regression."""
    return concurrent_final >= low


def speedup(single_tenant_seconds: float, concurrent_seconds: float) -> float:
    if concurrent_seconds <= 0:
        raise ValueError(f"concurrent wall time must be > 0, got {concurrent_seconds}")
    return single_tenant_seconds / concurrent_seconds


def sweep_ratio(k: int, w1: float, wk: float) -> float:
    """Throughput of k concurrent experiments relative to one alone: k W_1 / W_k (k is perfect scaling)."""
    return k * w1 / wk


def samples_per_eval(cfg: GrpoConfig) -> int:
    """m: held-out prompts of the task evaluated last, times completions per prompt."""
    from hotlora.agents.grpo import make_schedule
    from hotlora.agents.tasks import TASKS

    return TASKS[make_schedule(cfg).task_at(cfg.steps - 1)].eval_size * cfg.eval_samples


# ----- running experiments -----


@dataclass
class Bench:
    """Where the engine lives and how agents reach it; ``advance`` ticks the progress bar per step."""

    address: str
    model: str
    workdir: Path
    codec: tuple[Callable[[Any], list[int]], Callable[[list[int]], str]]
    engine_args: tuple[str, ...] = ()
    engine_threads: int | None = None  # torch intra-op threads in the engine (OMP_NUM_THREADS); None: torch's
    advance: Callable[[], None] = lambda: None

    def client(self, prefix: str) -> HotLoraClient:
        from hotlora.agents.client import HotLoraClient

        return HotLoraClient(self.address, topic_prefix=prefix, request_timeout=REQUEST_TIMEOUT_S, retries=1)


async def run_experiment(bench: Bench, prefix: str, cfg: GrpoConfig, tag: str, started: float) -> Run:
    """One agent: own client, own adapter (unique id per run, deleted after), the reference GRPO loop."""
    from hotlora.agents.grpo import TASKS, make_schedule, run_grpo
    from hotlora.engine.types import LoraSpec

    cfg = dataclasses.replace(cfg, adapter_id=f"{cfg.adapter_id}-{tag}")
    run = Run(cfg, 0.0)

    async def emit(metrics: Metrics) -> None:
        run.metrics.append(metrics)
        if metrics.step > 0:
            bench.advance()

    async with bench.client(prefix) as client:
        await client.create_adapter(cfg.adapter_id, LoraSpec(rank=cfg.rank, seed=cfg.seed))
        try:
            await run_grpo(client, cfg, make_schedule(cfg), TASKS, *bench.codec, emit)
            run.seconds = time.perf_counter() - started
        finally:
            with contextlib.suppress(Exception):  # a warm engine must not keep a failed run's adapter
                await asyncio.wait_for(client.delete_adapter(cfg.adapter_id), CLEANUP_TIMEOUT_S)
    return run


async def run_together(bench: Bench, prefix: str, configs: Sequence[GrpoConfig], tag: str) -> tuple[float, list[Run]]:
    """All ``configs`` at once; each run's ``seconds`` is its finish time, the first value the wall time."""
    started = time.perf_counter()
    runs = await asyncio.gather(*(run_experiment(bench, prefix, cfg, tag, started) for cfg in configs))
    return time.perf_counter() - started, list(runs)


@contextlib.asynccontextmanager
async def engine_process(bench: Bench, prefix: str) -> AsyncIterator[None]:
    """An engine subprocess on ``prefix``, ready once it announces ``running``; always terminated and reaped."""
    from hotlora.agents.readiness import wait_for_engine
    from hotlora.demo import hotlora_command, reap, terminate

    args = ["--bootstrap", bench.address, "--model", bench.model, "--topic-prefix", prefix]
    args += ["--checkpoint-dir", str(bench.workdir / prefix), "--heartbeat-interval", "1", *bench.engine_args]
    env = dict(os.environ)
    if bench.engine_threads:
        env["OMP_NUM_THREADS"] = str(bench.engine_threads)
    with open(bench.workdir / f"{prefix}.log", "wb") as log:
        engine = await asyncio.create_subprocess_exec(
            *hotlora_command("engine", *args), stdout=log, stderr=log, env=env
        )
        ready = asyncio.create_task(wait_for_engine(bench.address, prefix, ENGINE_READY_TIMEOUT_S))
        exited = asyncio.create_task(engine.wait())
        try:
            await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                ready.cancel()
                raise RuntimeError(f"the engine exited ({engine.returncode}) before it was ready: see {log.name}")
            ready.result()
            async with fail_fast_on_exit(exited, log.name):
                yield
        finally:
            exited.cancel()
            terminate(engine)
            await reap(engine)


@contextlib.asynccontextmanager
async def fail_fast_on_exit(exited: asyncio.Task[int], log: str) -> AsyncIterator[None]:
    """An engine that dies mid-run (killed, crashed) fails the phase now, not after every request's timeout."""
    owner = asyncio.current_task()
    assert owner is not None
    died: list[int] = []

    def on_exit(task: asyncio.Task[int]) -> None:
        if not task.cancelled():
            died.append(task.result())
            owner.cancel()

    exited.add_done_callback(on_exit)
    try:
        yield
    except asyncio.CancelledError:
        if not died:
            raise
        owner.uncancel()
        raise RuntimeError(f"the engine exited ({died[0]}) in the middle of the run: see {log}") from None
    finally:
        exited.remove_done_callback(on_exit)


async def warm_up(bench: Bench, prefix: str) -> None:
    """One round trip and one base-model sample, so 'warm' means joined consumers and a used decode path."""
    from hotlora.engine.types import SamplingParams

    async with bench.client(prefix) as client:
        await client.list_adapters()
        await client.sample(None, bench.codec[0](_probe_problem()), 1, SamplingParams(max_tokens=2))


def _probe_problem() -> Any:
    from hotlora.agents.tasks import TASKS

    return next(iter(TASKS.values())).problems(0, 1)[0]


# ----- the phases -----


@dataclass
class Phases:
    """Everything measured, by phase, before it is reduced to the report."""

    cold: list[Run] = field(default_factory=list)
    warm: list[Run] = field(default_factory=list)
    concurrent: list[Run] = field(default_factory=list)
    concurrent_wall: float = 0.0
    solo: dict[int, list[Run]] = field(default_factory=dict)  # seed -> runs, seed 0 is ``warm``
    sweep: dict[int, tuple[float, list[Run]]] = field(default_factory=dict)


class Reporter:
    """A rich progress bar per phase, counted in agent steps."""

    def __init__(self, progress: Progress, bench: Bench) -> None:
        self.progress, self.bench = progress, bench

    def phase(self, description: str, steps: int) -> int:
        if not self.progress.console.is_terminal:  # no live bars in a log file: one line per phase instead
            self.progress.console.print(f"{time.strftime('%H:%M:%S')} {description}")
        task = self.progress.add_task(description, total=steps)
        self.bench.advance = lambda: self.progress.advance(task)
        return task

    def note(self, task: int, description: str) -> None:
        self.progress.update(task, description=description)


async def cold_phase(
    bench: Bench, plan: Plan, base: str, report: Reporter, on_run: Callable[[list[Run]], None] = lambda runs: None
) -> list[Run]:
    """Each experiment on its own fresh engine; the clock starts before the engine is spawned."""
    task = report.phase("cold", plan.experiments * plan.steps)
    runs: list[Run] = []
    for i, cfg in enumerate(plan.configs()):
        prefix = f"{base}-cold{i}"
        report.note(task, f"cold {i + 1}/{plan.experiments}: starting an engine")
        started = time.perf_counter()
        async with engine_process(bench, prefix):
            report.note(task, f"cold {i + 1}/{plan.experiments}: {cfg.adapter_id}")
            runs.append(await run_experiment(bench, prefix, cfg, "cold", started))
        on_run(runs)
    return runs


async def one_at_a_time(bench: Bench, prefix: str, configs: Sequence[GrpoConfig], tag: str) -> list[Run]:
    runs = []
    for cfg in configs:
        runs.append(await run_experiment(bench, prefix, cfg, tag, time.perf_counter()))
    return runs


async def warm_phases(
    bench: Bench, plan: Plan, prefix: str, report: Reporter, phases: Phases, done_phase: Callable[[], None]
) -> None:
    """warm, concurrent, extra solo seeds and the sweep, all on one engine started once."""
    n, s = plan.experiments, plan.steps
    report.phase("warm single-tenant", n * s)
    phases.warm = await one_at_a_time(bench, prefix, plan.configs(), "warm")
    phases.solo[0] = phases.warm
    done_phase()
    report.phase(f"concurrent ({n} at once)", n * s)
    phases.concurrent_wall, phases.concurrent = await run_together(bench, prefix, plan.configs(), "concurrent")
    done_phase()
    for seed in range(1, plan.solo_seeds):
        report.phase(f"solo seed {seed}", n * s)
        phases.solo[seed] = await one_at_a_time(bench, prefix, plan.configs(seed=seed), f"solo-s{seed}")
    phases.sweep[1] = (phases.warm[0].seconds, phases.warm[:1])
    phases.sweep[n] = (phases.concurrent_wall, phases.concurrent)
    for k in plan.sweep:
        if k not in phases.sweep:
            report.phase(f"sweep: {k} at once", k * s)
            phases.sweep[k] = await run_together(bench, prefix, plan.configs(k), f"sweep{k}")


async def measure(
    plan: Plan,
    model: str,
    bootstrap: str | None,
    console: Console,
    engine_args: Sequence[str] = (),
    engine_threads: int | None = None,
    on_phase: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every phase on one broker (embedded Tansu unless ``bootstrap``); returns the report's measured part.

    ``on_phase`` gets the phase times measured so far after each phase (``partial_times``), so a run that
    is cut short (a time-limited GPU session) still leaves what it measured.
    """
    from hotlora.agents.grpo import tokenizer_codec
    from hotlora.engine.kafka.broker import EmbeddedBroker

    workdir = Path(tempfile.mkdtemp(prefix="hotlora-bench-experiments-"))
    base = f"bench-exp-{os.getpid()}-{uuid.uuid4().hex[:6]}"  # Tansu must never see a topic name twice
    broker = None if bootstrap else EmbeddedBroker(log_path=workdir / "broker.log").start()
    try:
        address = bootstrap or broker.bootstrap  # type: ignore[union-attr]
        bench = Bench(address, model, workdir, tokenizer_codec(model), tuple(engine_args), engine_threads)
        console.print(f"broker {address} ({'external' if bootstrap else 'embedded Tansu'}); logs in {workdir}")
        phases = Phases()
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        # Live bars on a terminal only; elsewhere Reporter prints one line per phase instead.
        with progress_bar(*columns, console=console, transient=False) as progress:
            report = Reporter(progress, bench)

            def done_phase() -> None:
                if on_phase is not None:
                    on_phase(partial_times(phases))

            def cold_run_done(runs: list[Run]) -> None:
                phases.cold = runs
                done_phase()

            if plan.cold_first:
                phases.cold = await cold_phase(bench, plan, base, report, cold_run_done)
            warm_prefix = f"{base}-warm"
            task = report.phase("starting the warm engine", 1)
            async with engine_process(bench, warm_prefix):
                await warm_up(bench, warm_prefix)
                progress.update(task, completed=1)
                await warm_phases(bench, plan, warm_prefix, report, phases, done_phase)
            if not plan.cold_first:
                phases.cold = await cold_phase(bench, plan, base, report, cold_run_done)
    finally:
        if broker is not None:
            broker.stop()
    return summarize(plan, phases) | {"broker": "external" if bootstrap else "embedded Tansu", "logs": str(workdir)}


# ----- the report -----


def partial_times(phases: Phases) -> dict[str, Any]:
    """What is measured so far, per phase: each experiment's seconds and the phase's sum or wall."""
    out: dict[str, Any] = {}
    if phases.cold:
        out["cold_seconds"] = [run.seconds for run in phases.cold]
        out["T1_seconds"] = sum(out["cold_seconds"])
    if phases.warm:
        out["warm_seconds"] = [run.seconds for run in phases.warm]
        out["T2_seconds"] = sum(out["warm_seconds"])
    if phases.concurrent:
        out["concurrent_seconds"] = [run.seconds for run in phases.concurrent]
        out["T3_seconds"] = phases.concurrent_wall
    return out


def experiment_rows(phases: Phases, rewards: bool = True) -> list[dict[str, Any]]:
    rows = []
    for i, conc in enumerate(phases.concurrent):
        cfg = phases.warm[i].config
        row: dict[str, Any] = {
            "id": cfg.adapter_id.removesuffix("-warm"),
            "task": cfg.task,
            "learning_rate": cfg.learning_rate,
            "cold_seconds": phases.cold[i].seconds,
            "warm_seconds": phases.warm[i].seconds,
            "concurrent_seconds": conc.seconds,
        }
        if rewards:
            solo = [phases.solo[seed][i].final_reward for seed in sorted(phases.solo)]
            low = band_low(solo, samples_per_eval(cfg))
            row |= {
                "solo_final_rewards": solo,
                "concurrent_final_reward": conc.final_reward,
                "cold_final_reward": phases.cold[i].final_reward,
                "band_low": low,
                "within_band": within_band(conc.final_reward, low),
            }
        rows.append(row)
    return rows


def sweep_rows(phases: Phases, levels: Sequence[int]) -> list[dict[str, Any]]:
    w1 = phases.sweep[1][0]
    rows = []
    for k in sorted(set(levels) | {1}):
        wall, runs = phases.sweep[k]
        steps = [s for run in runs for s in run.step_seconds]
        rows.append(
            {
                "concurrency": k,
                "wall_seconds": wall,
                "ratio": sweep_ratio(k, w1, wall),
                "step_latency_ms_mean": 1000.0 * statistics.fmean(steps),
                "step_latency_ms_p50": 1000.0 * statistics.median(steps),
            }
        )
    return rows


def summarize(plan: Plan, phases: Phases) -> dict[str, Any]:
    t1 = sum(run.seconds for run in phases.cold)
    t2 = sum(run.seconds for run in phases.warm)
    t3 = phases.concurrent_wall
    rows = experiment_rows(phases, plan.rewards)
    result = {
        "cold_ratio": speedup(t1, t3),
        "warm_ratio": speedup(t2, t3),
        "T1_seconds": t1,
        "T2_seconds": t2,
        "T3_seconds": t3,
        "steps": plan.steps,
        "n_experiments": plan.experiments,
        "solo_seeds": plan.solo_seeds,
        "config_overrides": plan.grpo_overrides(),
        "experiments": rows,
        "sweep": sweep_rows(phases, plan.sweep),
        "steps_trained": trained_steps(phases),
    }
    if plan.rewards:
        result["no_reward_regression"] = all(row["within_band"] for row in rows)
        result["samples_per_eval"] = samples_per_eval(phases.warm[0].config)
    return result


def trained_steps(phases: Phases) -> dict[str, int]:
    """Steps that ran forward_backward + optim_step, per phase (a GRPO step whose groups all tie skips both)."""
    runs = {"cold": phases.cold, "warm": phases.warm, "concurrent": phases.concurrent}
    return {
        name: sum(1 for run in rs for m in run.metrics if m.step > 0 and m.loss is not None)
        for name, rs in runs.items()
    }


def draw_png(result: dict[str, Any], path: Path) -> Path:
    """Throughput ratio and step latency against concurrency, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [row["concurrency"] for row in result["sweep"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(ks, [row["ratio"] for row in result["sweep"]], "o-", label="measured k W1 / Wk")
    left.plot(ks, ks, "--", color="grey", label="perfect scaling")
    left.set(xscale="log", xlabel="concurrent experiments", ylabel="throughput vs one alone", title="throughput")
    left.set_xticks(ks, [str(k) for k in ks])
    left.minorticks_off()
    left.legend()
    right.plot(ks, [row["step_latency_ms_mean"] for row in result["sweep"]], "o-", label="mean")
    right.plot(ks, [row["step_latency_ms_p50"] for row in result["sweep"]], "s--", label="p50")
    right.set(xscale="log", xlabel="concurrent experiments", ylabel="ms per GRPO step", title="step latency")
    right.set_xticks(ks, [str(k) for k in ks])
    right.minorticks_off()
    right.legend()
    fig.suptitle(f"hotlora bench experiments ({result['steps']} steps, commit {result['commit'][:8]})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_section(result: dict[str, Any], png: Path | None) -> str:
    m = result["machine"]
    rewards = "no_reward_regression" in result
    evals = f"m = {result['samples_per_eval']} samples per eval" if rewards else "throughput only, no evals"
    verdict = f", `no_reward_regression` {result['no_reward_regression']}" if rewards else ""
    lines = [
        f"### experiments: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"- command: `{result['command']}`",
        f"- commit: `{result['commit']}`",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}{', ' + m['gpu'] if 'gpu' in m else ''}; "
        f"broker: {result['broker']}; engine threads: {result['engine_threads'] or 'torch default'}",
        f"- {result['n_experiments']} experiments x {result['steps']} steps; {result['solo_seeds']} solo seeds; "
        f"{evals}; GRPO overrides `{result['config_overrides']}`{'; quick' if result['quick'] else ''}",
        "",
        f"T1 (cold, sum) {result['T1_seconds']:.1f} s, T2 (warm, sum) {result['T2_seconds']:.1f} s, "
        f"T3 (concurrent, wall) {result['T3_seconds']:.1f} s: **`cold_ratio` {result['cold_ratio']:.2f}**, "
        f"**`warm_ratio` {result['warm_ratio']:.2f}**{verdict}.",
        "",
    ]
    if rewards:
        lines += [
            "| experiment | task | lr | cold s | warm s | concurrent s "
            "| solo finals | concurrent final | band_low | ok |",
            "|---|---|---:|---:|---:|---:|---|---:|---:|---|",
        ]
    else:
        lines += ["| experiment | task | lr | cold s | warm s | concurrent s |", "|---|---|---:|---:|---:|---:|"]
    for row in result["experiments"]:
        line = (
            f"| {row['id']} | {row['task']} | {row['learning_rate']:g} | {row['cold_seconds']:.1f} "
            f"| {row['warm_seconds']:.1f} | {row['concurrent_seconds']:.1f} |"
        )
        if rewards:
            solo = ", ".join(f"{r:.3f}" for r in row["solo_final_rewards"])
            ok = "yes" if row["within_band"] else "NO"
            line += f" {solo} | {row['concurrent_final_reward']:.3f} | {row['band_low']:.3f} | {ok} |"
        lines.append(line)
    lines += ["", "| k | wall s | k W1/Wk | step ms mean | step ms p50 |", "|---:|---:|---:|---:|---:|"]
    for row in result["sweep"]:
        lines.append(
            f"| {row['concurrency']} | {row['wall_seconds']:.1f} | {row['ratio']:.2f} "
            f"| {row['step_latency_ms_mean']:.0f} | {row['step_latency_ms_p50']:.0f} |"
        )
    if png is not None:
        docs = repo_root() / "docs"
        link = png.relative_to(docs) if png.is_relative_to(docs) else png
        lines += ["", f"![throughput and step latency vs concurrency]({link})"]
    return "\n".join(lines) + "\n"


def append_docs(result: dict[str, Any], png: Path | None) -> Path:
    return append_section(markdown_section(result, png), DOCS_INTRO)


# ----- CLI -----


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiments", type=int, default=None, help="experiments from the catalogue (default 8)")
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps per experiment (default 30)")
    parser.add_argument("--solo-seeds", type=int, default=None, help="solo seeds per experiment (default 3)")
    parser.add_argument("--sweep", default=None, help="concurrency levels, comma-separated (default 1,2,4,8,16)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"under 5 minutes: {QUICK_EXPERIMENTS} experiments x {QUICK_STEPS} steps, {QUICK_SOLO_SEEDS} solo seeds, "
        f"sweep {','.join(map(str, QUICK_SWEEP))}, 1 eval sample per prompt (flags still override)",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--png", default=None, metavar="PATH", help="plot (default docs/bench_experiments.png)")
    parser.add_argument("--model", default=None, help="base model directory (default: the pretrained RL base)")
    parser.add_argument("--bootstrap", default=os.environ.get("HOTLORA_BOOTSTRAP"), help="use this broker")
    parser.add_argument("--no-docs", action="store_true", help="no docs section (and no PNG unless --png)")
    parser.add_argument(
        "--engine-threads", type=int, default=None, help="torch threads in each engine (default: torch's choice)"
    )


def command_line(args: argparse.Namespace) -> str:
    """The command as typed from the shell; rebuilt from ``args`` when called in process (tests)."""
    if sys.argv and Path(sys.argv[0]).name in ("hotlora", "cli.py", "__main__.py") and "experiments" in sys.argv:
        return shlex.join(["hotlora", *sys.argv[1:]])
    argv = ["hotlora", "bench", "experiments"]
    for flag in ("experiments", "steps", "solo_seeds", "sweep", "json", "png", "model", "bootstrap", "engine_threads"):
        if getattr(args, flag, None) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return shlex.join(argv + [f"--{f.replace('_', '-')}" for f in ("quick", "no_docs") if getattr(args, f, False)])


def run_bench(
    plan: Plan,
    model: str,
    bootstrap: str | None,
    command: str,
    console: Console,
    engine_args: Sequence[str] = (),
    device: torch.device | None = None,
    engine_threads: int | None = None,
    on_phase: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The whole bench, provenance included; ``bench/gpu_experiments.py`` calls it with CUDA engine flags."""
    from hotlora.engine.event_loop import run

    result: dict[str, Any] = {"command": command, "commit": git_commit(), "quick": plan.quick}
    result["machine"] = machine_info(device or torch.device("cpu"))
    result["model"] = model
    result["engine_args"] = list(engine_args)
    result["engine_threads"] = engine_threads
    started = time.perf_counter()
    result.update(run(measure(plan, model, bootstrap, console, engine_args, engine_threads, on_phase)))
    result["bench_seconds"] = time.perf_counter() - started
    return result


def write_outputs(result: dict[str, Any], args: argparse.Namespace, console: Console) -> None:
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    png = Path(args.png) if args.png else (None if args.no_docs else repo_root() / "docs" / "bench_experiments.png")
    if png is not None:
        console.print(f"plot: {draw_png(result, png.resolve())}")
    if not args.no_docs:
        console.print(f"appended to {append_docs(result, png.resolve() if png else None)}")


def quiet_client_logs() -> None:
    """Each agent's client logs its start and close at info: hundreds of lines that would bury the progress."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def interrupt_on_sigterm() -> None:
    """SIGTERM (``timeout``, a CI runner) unwinds like Ctrl-C, so every engine and the broker are reaped."""
    import signal

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    if args.engine_threads is not None and args.engine_threads < 1:
        raise SystemExit(f"error: --engine-threads must be >= 1, got {args.engine_threads}")
    console = Console(stderr=True)
    quiet_client_logs()
    if args.model:
        model = args.model
    else:
        from hotlora.models.model_init import rl_base_model

        model = rl_base_model()
    interrupt_on_sigterm()
    try:
        result = run_bench(plan, model, args.bootstrap, command_line(args), console, engine_threads=args.engine_threads)
    except KeyboardInterrupt:
        console.print("interrupted: the engines and the broker were stopped; no results written")
        return 130
    console.print(
        f"cold_ratio = {result['cold_ratio']:.2f}, warm_ratio = {result['warm_ratio']:.2f}, "
        f"no_reward_regression = {result['no_reward_regression']} "
        f"(T1 {result['T1_seconds']:.1f} s, T2 {result['T2_seconds']:.1f} s, T3 {result['T3_seconds']:.1f} s)"
    )
    write_outputs(result, args, console)
    return 0
