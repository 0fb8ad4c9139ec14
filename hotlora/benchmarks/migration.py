"""``hotlora bench migration``: what a rebalance costs the tenants, on a real multi-engine fleet.

The scenario, as a user runs it: engine processes ``a`` and ``b`` share one checkpoint directory and
one consumer group on a broker; N ``hotlora agent`` GRPO processes (one experiment each, adapters
spread over the partitions) train; when every agent has reached step ``kill_at`` engine ``b`` is
SIGKILLed, and at step ``join_at`` a third engine ``c`` joins (in step order, either may come first).
The agents know none of this. While ``c`` imports torch and loads the model (seconds; 8 s or more on a
loaded 2-core CPU, longer than the rest of a short run) the agents are held with SIGSTOP and go on
once it is loaded, before it joins: so ``c`` always joins a running workload, on any machine.

Measured per migrated adapter, from the engines' JSON logs: the *migration pause*, from the moment the
adapter stopped being served (graceful: the old owner's revoke began; failure: the SIGKILL) to the
first result the new owner published for it. A failure's pause includes the group's session timeout:
the survivors cannot know an engine died before its session expires.

The same run is verified (``verify``): every step reported once, versions moving by at most one per
step, no ``optim_step`` applied twice, and one engine per adapter at a time. ``tests/test_scale_out.py``
runs the scenario small and asserts the verification; the bench runs it larger and records the pauses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from hotlora.agents.metrics import read_events
from hotlora.engine.kafka.admin import ensure_topics
from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.engine.kafka.placement import partition_for
from hotlora.schemas import Heartbeat, Metrics, Topics
from hotlora.top import TopState

DOCS_INTRO = """## `hotlora bench migration`

Engines `a` and `b` (processes, one consumer group, one shared checkpoint directory) serve N GRPO
agent processes; mid-run `b` is SIGKILLed (failure), later a third engine `c` joins (graceful
rebalance; the agents are held with SIGSTOP while `c` loads, so it joins a running workload). The
pause of a migrated adapter runs from the moment it stopped being served (the old owner's revoke
began, or the SIGKILL) to the new owner's first result for it. A failure's pause includes the group
session timeout (`--session-timeout-ms`), the time Kafka takes to declare the engine dead. The run is
verified as in `tests/test_scale_out.py`.
"""


@dataclass
class FleetSettings:
    agents: int = 6
    steps: int = 6
    join_at: int = 2  # every agent reached this step: engine c joins
    kill_at: int = 4  # every agent reached this step: engine b is SIGKILLed (0: never)
    partitions: int = 6
    session_timeout_ms: int = 2000
    timeout_s: float = 600.0  # the whole scenario


@dataclass
class LocalFleet:
    """Engine and agent processes on this machine; every one is reaped on exit (``running_fleet``)."""

    bootstrap: str
    prefix: str
    model: Path
    workdir: Path
    settings: FleetSettings
    engines: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    agents: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    killed: dict[str, float] = field(default_factory=dict)  # engine -> wall time of its SIGKILL

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HOTLORA_BOOTSTRAP": self.bootstrap,
            "HOTLORA_MODEL": str(self.model),
            "HOTLORA_TOPIC_PREFIX": self.prefix,
            "HOTLORA_CHECKPOINT_DIR": str(self.workdir / "shared-checkpoints"),
            "HOTLORA_PARTITIONS": str(self.settings.partitions),
            "HOTLORA_DTYPE": "float32",
            "HOTLORA_DEVICE": "cpu",
            "HOTLORA_SESSION_TIMEOUT_MS": str(self.settings.session_timeout_ms),
            "HOTLORA_HEARTBEAT_INTERVAL_MS": str(max(self.settings.session_timeout_ms // 6, 100)),
            "HOTLORA_HEARTBEAT_INTERVAL": "0.5",
        }

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    async def _spawn(self, name: str, *args: str) -> asyncio.subprocess.Process:
        with open(self.log(name), "wb") as out:
            return await asyncio.create_subprocess_exec(
                sys.executable, "-m", "hotlora.cli", *args, env=self.env(), stdout=out, stderr=asyncio.subprocess.STDOUT
            )

    async def start_engine(self, name: str) -> None:
        self.engines[name] = await self._spawn(name, "engine", "--engine-id", name)

    async def start_agents(self, adapter_ids: list[str]) -> None:
        for adapter_id in adapter_ids:
            self.agents[adapter_id] = await self._spawn(
                adapter_id, "agent", "--task", "sort", "--adapter", adapter_id, "--steps", str(self.settings.steps),
                "--batch-size", "2", "--group-size", "4", "--max-tokens", "8", "--eval-every", "1000", "--seed", "3",
            )  # fmt: skip

    @contextlib.asynccontextmanager
    async def agents_held(self) -> AsyncIterator[None]:
        """SIGSTOP every running agent, SIGCONT on exit (failures included): their Kafka clients use no
        group, so a held agent loses nothing and picks up its results where it stopped."""
        held = [p for p in self.agents.values() if p.returncode is None]
        for process in held:
            process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            for process in held:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)

    async def join(self, name: str) -> None:
        """Start an engine with the agents held until it has loaded the model (see the module docstring)."""
        async with self.agents_held():
            await self.start_engine(name)
            await self.wait_for(f"engine {name} to load the model", lambda: self.logged(name, "model_loaded"))

    async def logged(self, name: str, event: str) -> bool:
        """Whether the engine's JSON log has this event (fails loudly if the engine exited)."""
        process = self.engines[name]
        if process.returncode is not None:
            raise RuntimeError(f"engine {name} exited {process.returncode}:\n{self.log(name).read_text()[-3000:]}")
        return any(line.get("event") == event for line in _json_lines(self.log(name)))

    async def kill(self, name: str) -> None:
        self.killed[name] = time.time()
        self.engines[name].send_signal(signal.SIGKILL)
        await self.engines[name].wait()

    async def reap(self) -> None:
        for process in [*self.agents.values(), *self.engines.values()]:
            if process.returncode is None:
                process.kill()
                await process.wait()

    async def wait_agents(self) -> None:
        for adapter_id, process in self.agents.items():
            code = await process.wait()
            if code != 0:
                raise RuntimeError(f"agent {adapter_id} exited {code}:\n{self.log(adapter_id).read_text()[-3000:]}")

    async def heartbeats(self) -> dict[str, Heartbeat]:
        """Each engine's latest heartbeat, by send time: heartbeats carry no key, so they spread over
        partitions and arrive out of order."""
        state = TopState()
        for event in await read_events(self.bootstrap, self.prefix):
            state.fold(event)
        return state.heartbeats

    async def wait_for(self, what: str, predicate: Callable[[], Awaitable[bool]], poll: float = 0.3) -> None:
        """Poll until true; fail loudly (with the engines' log tails) after the scenario's bound."""
        try:
            async with asyncio.timeout(self.settings.timeout_s / 2):
                while not await predicate():
                    await asyncio.sleep(poll)
        except TimeoutError:
            tails = "\n".join(f"--- {n}\n{self.log(n).read_text()[-2000:]}" for n in self.engines)
            raise TimeoutError(f"timed out waiting for {what}\n{tails}") from None

    async def wait_for_split(self, names: list[str]) -> None:
        """Until these engines' latest heartbeats hold disjoint partitions that cover all of them."""

        async def split() -> bool:
            beats = await self.heartbeats()
            parts = [beats[n].partitions for n in names if n in beats]
            flat = sorted(p for ps in parts for p in ps)
            return len(parts) == len(names) and all(parts) and flat == list(range(self.settings.partitions))

        await self.wait_for(f"partitions split over {names}", split)

    async def wait_for_step(self, step: int) -> None:
        async def reached() -> bool:
            done = [m for m in await read_events(self.bootstrap, self.prefix) if isinstance(m, Metrics)]
            return sum(m.step >= step for m in done) >= len(self.agents)

        await self.wait_for(f"every agent at step {step}", reached)

    def engine_lines(self) -> list[dict[str, Any]]:
        """Every JSON log line of every engine, with ``engine`` (its name) and ``t`` (epoch seconds)."""
        lines = []
        for name in self.engines:
            for line in _json_lines(self.log(name)):
                with contextlib.suppress(KeyError, ValueError):
                    line.update(engine=name, t=_epoch(line["timestamp"]))
                    lines.append(line)
        return sorted(lines, key=lambda x: x["t"])


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """A process log's JSON lines (structlog's); other output, and a line still being written, skipped."""
    lines = []
    for text in path.read_text().splitlines():
        if text.startswith("{"):
            with contextlib.suppress(ValueError):
                lines.append(json.loads(text))
    return lines


def _epoch(timestamp: str) -> float:
    return dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def spread_adapter_ids(prefix: str, count: int, partitions: int) -> list[str]:
    """Adapter ids on as many different partitions as possible, so every engine gets tenants."""
    chosen: dict[int, str] = {}
    extra: list[str] = []
    n = 0
    while len(chosen) + len(extra) < count:
        name = f"{prefix}-x{n}"
        if chosen.setdefault(partition_for(name, partitions), name) != name and len(chosen) == partitions:
            extra.append(name)
        n += 1
    return [*chosen.values(), *extra][:count]


@contextlib.asynccontextmanager
async def running_fleet(
    bootstrap: str, prefix: str, model: Path, workdir: Path, settings: FleetSettings
) -> AsyncIterator[LocalFleet]:
    await ensure_topics(bootstrap, Topics(prefix), settings.partitions)
    fleet = LocalFleet(bootstrap, prefix, model, workdir, settings)
    try:
        async with asyncio.timeout(settings.timeout_s):
            yield fleet
    finally:
        await fleet.reap()


@dataclass
class ScenarioRun:
    adapter_ids: list[str]
    metrics: list[Metrics]
    heartbeats: dict[str, Heartbeat]
    lines: list[dict[str, Any]]
    killed: dict[str, float]
    seconds: float


async def run_scenario(
    bootstrap: str,
    prefix: str,
    model: Path,
    workdir: Path,
    settings: FleetSettings,
    say: Callable[[str], None],
    before_exit: Callable[[LocalFleet], Awaitable[None]] | None = None,
) -> ScenarioRun:
    """Two engines, the agents, then (in step order) a third engine at ``join_at`` and a SIGKILL of
    ``b`` at ``kill_at``; ``before_exit`` runs while the surviving engines still serve."""
    adapter_ids = spread_adapter_ids(prefix, settings.agents, settings.partitions)
    started = time.perf_counter()
    async with running_fleet(bootstrap, prefix, model, workdir, settings) as fleet:
        await fleet.start_engine("a")
        await fleet.wait_for_split(["a"])
        await fleet.start_engine("b")
        await fleet.wait_for_split(["a", "b"])
        say(f"engines a and b ready; starting {len(adapter_ids)} agents x {settings.steps} steps")
        await fleet.start_agents(adapter_ids)
        live = ["a", "b"]
        events = sorted((step, what) for step, what in ((settings.join_at, "join"), (settings.kill_at, "kill")) if step)
        for step, what in events:
            await fleet.wait_for_step(step)
            if what == "join":
                say(f"step {step}: engine c joins")
                await fleet.join("c")
                live.append("c")
            else:
                say(f"step {step}: SIGKILL engine b")
                await fleet.kill("b")
                live.remove("b")
            await fleet.wait_for_split(live)
        await fleet.wait_agents()
        if before_exit is not None:
            await before_exit(fleet)
        events = await read_events(bootstrap, prefix)
        return ScenarioRun(
            adapter_ids=adapter_ids,
            metrics=[m for m in events if isinstance(m, Metrics)],
            heartbeats=await fleet.heartbeats(),
            lines=fleet.engine_lines(),
            killed=dict(fleet.killed),
            seconds=time.perf_counter() - started,
        )


# ----- verification and pauses (pure, from the run's records) -----


def verify(run: ScenarioRun, steps: int) -> list[str]:
    """Everything wrong with the run (empty when it kept every guarantee); see the module docstring."""
    problems: list[str] = []
    live = {name: beat for name, beat in run.heartbeats.items() if name not in run.killed}
    for adapter_id in run.adapter_ids:
        holders = [name for name, beat in live.items() if adapter_id in beat.adapters]
        if len(holders) != 1:
            problems.append(f"{adapter_id} is held by {holders} at the end")
        mine = sorted((m for m in run.metrics if m.experiment == adapter_id), key=lambda m: m.step)
        if [m.step for m in mine] != list(range(steps + 1)):
            problems.append(f"{adapter_id} reported steps {[m.step for m in mine]}")
            continue
        for before, after in itertools.pairwise(mine):
            expected = 1 if after.groups > after.skipped_groups else 0
            if after.version - before.version != expected:
                problems.append(f"{adapter_id} step {after.step}: version {before.version} -> {after.version}")
    done = results(run)
    durable = {(x["engine"], x["adapter_id"], x["seq"]) for x in run.lines if x.get("event") == "snapshot_written"}
    ran: dict[tuple[str, int], list[str]] = {}
    for x in done:
        if x.get("type") == "optim_step" and "code" not in x:
            ran.setdefault((x["adapter_id"], x["seq"]), []).append(x["engine"])
    for (adapter_id, seq), engines in ran.items():
        # Twice only as a re-run of a killed engine's step that never became durable (its effect died with it).
        lost = [e for e in engines if e in run.killed and (e, adapter_id, seq) not in durable]
        if len(engines) - len(lost) != 1:
            problems.append(f"optim_step seq {seq} of {adapter_id} applied on {engines}")
    for adapter_id, runs in serving_runs(done).items():
        for (_, end, first), (start, _, second) in itertools.pairwise(runs):
            if end > start:
                problems.append(f"{adapter_id} served by {first} and {second} at once ({end:.3f} > {start:.3f})")
    problems += overlapping_holders(run)
    overran = [x["engine"] for x in run.lines if x.get("event") == "rebalance_overrun"]
    problems += [f"engine {name} overran a rebalance and stopped" for name in overran]
    return problems


def overlapping_holders(run: ScenarioRun) -> list[str]:
    """From an engine's ``adapter_acquired`` until it released the adapter (or died), no other engine
    may answer for the adapter, snapshot it, or load it: the state has one writer at a time."""
    activity = ("request_done", "snapshot_written", "adapter_acquired")
    problems = []
    for got in (x for x in run.lines if x.get("event") == "adapter_acquired"):
        holder, adapter_id, since = got["engine"], got["adapter_id"], got["t"]
        releases = [
            x["t"]
            for x in run.lines
            if x.get("event") == "adapter_released" and x["engine"] == holder and x["adapter_id"] == adapter_id
            and x["t"] > since
        ]  # fmt: skip
        until = min([*releases, run.killed.get(holder, float("inf"))])
        for x in run.lines:
            same = x.get("adapter_id") == adapter_id and x.get("event") in activity
            if same and x["engine"] != holder and since < x["t"] < until:
                problems.append(f"{x['engine']} {x['event']} {adapter_id} while {holder} held it")
    return problems


def serving_runs(done: list[dict[str, Any]]) -> dict[str, list[tuple[float, float, str]]]:
    """adapter -> (first, last, engine) spans of consecutive results from one engine, in time order."""
    runs: dict[str, list[tuple[float, float, str]]] = {}
    for x in sorted(done, key=lambda x: x["t"]):
        spans = runs.setdefault(x["adapter_id"], [])
        if spans and spans[-1][2] == x["engine"]:
            spans[-1] = (spans[-1][0], x["t"], x["engine"])
        else:
            spans.append((x["t"], x["t"], x["engine"]))
    return runs


def results(run: ScenarioRun) -> list[dict[str, Any]]:
    """The engines' ``request_done`` log lines of requests on an adapter, in time order."""
    return [x for x in run.lines if x.get("event") == "request_done" and x.get("adapter_id")]


def served_by(run: ScenarioRun) -> dict[str, set[str]]:
    served: dict[str, set[str]] = {}
    for x in results(run):
        served.setdefault(x["engine"], set()).add(x["adapter_id"])
    return served


def migration_pauses(run: ScenarioRun) -> list[dict[str, Any]]:
    """One row per adapter hand-over: from, to, cause, and the pause (see the module docstring)."""
    done = results(run)
    revokes = [x for x in run.lines if x.get("event") == "partitions_revoked"]
    releases = [x for x in run.lines if x.get("event") == "adapter_released"]
    rows = []
    for adapter_id, spans in serving_runs(done).items():
        for (_, end, old), (start, _, new) in itertools.pairwise(spans):
            released = [x["t"] for x in releases if x["engine"] == old and x["adapter_id"] == adapter_id]
            released = [t for t in released if end <= t <= start]
            if released:  # the old owner handed it over: from the start of the revoke before its release
                began = [
                    x["t"] - x["quiesce_s"] for x in revokes if x["engine"] == old and end <= x["t"] <= released[0]
                ]
                cause, stopped = "rebalance", min(began, default=end)
            elif old in run.killed and end <= run.killed[old] <= start:
                cause, stopped = "failure", run.killed[old]
            else:  # no record of why (should not happen): measured from its last result
                cause, stopped = "unknown", end
            rows.append({"adapter_id": adapter_id, "from": old, "to": new, "cause": cause, "pause_s": start - stopped})
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for cause in ("rebalance", "failure"):
        pauses = [r["pause_s"] for r in rows if r["cause"] == cause]
        if pauses:
            out[cause] = {
                "adapters": len(pauses),
                "median_s": round(statistics.median(pauses), 3),
                "max_s": round(max(pauses), 3),
                "min_s": round(min(pauses), 3),
            }
    return out


# ----- the command -----


def markdown_section(result: dict[str, Any]) -> str:
    m = result["machine"]
    text = (
        f"### migration: {result['timestamp']}\n\n"
        f"- command: `{result['command']}`\n- commit: `{result['commit']}`\n"
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; broker: embedded Tansu\n"
        f"- fleet: engines a, b (b SIGKILLed at step {result['kill_at']}, c joins at step {result['join_at']}), "
        f"{result['agents']} GRPO agents x {result['steps']} steps, {result['partitions']} partitions, "
        f"session timeout {result['session_timeout_ms']} ms; run took {result['seconds']:.0f} s; "
        f"verified: {'yes' if not result['problems'] else 'NO: ' + '; '.join(result['problems'])}\n\n"
        "| cause | adapters moved | median pause s | min s | max s |\n|---|---:|---:|---:|---:|\n"
    )
    for cause, s in result["pauses"].items():
        text += f"| {cause} | {s['adapters']} | {s['median_s']:.3f} | {s['min_s']:.3f} | {s['max_s']:.3f} |\n"
    return text + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--agents", type=int, default=6, help="GRPO agent processes (default 6)")
    parser.add_argument("--steps", type=int, default=14, help="steps per experiment (default 14)")
    parser.add_argument("--kill-at", type=int, default=3, help="step at which b is SIGKILLed (default 3; 0: never)")
    parser.add_argument("--join-at", type=int, default=6, help="step at which engine c joins (default 6; 0: never)")
    parser.add_argument("--session-timeout-ms", type=int, default=2000, help="consumer group session (default 2000)")
    parser.add_argument("--model", default=None, help="base model directory (default: the pretrained RL base)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    parser.add_argument("--no-docs", action="store_true", help="do not append a section to docs/benchmarks.md")


def main(args: argparse.Namespace) -> int:
    import torch

    from hotlora.benchmarks.core import append_section, result_header, typed_command
    from hotlora.models.model_init import rl_base_model

    if not args.steps > 0 or args.agents < 1:
        raise SystemExit("error: --steps and --agents must be >= 1")
    if not (0 <= args.join_at < args.steps and 0 <= args.kill_at < args.steps):
        raise SystemExit("error: --join-at and --kill-at must be steps before --steps (0: never)")
    console = Console(stderr=True)
    settings = FleetSettings(
        agents=args.agents, steps=args.steps, join_at=args.join_at, kill_at=args.kill_at,
        session_timeout_ms=args.session_timeout_ms,
    )  # fmt: skip
    model = Path(args.model or rl_base_model(progress=True))
    with tempfile.TemporaryDirectory(prefix="hotlora-migration-") as tmp, EmbeddedBroker() as broker:
        run = asyncio.run(
            run_scenario(broker.bootstrap, "bench-migration", model, Path(tmp), settings, lambda s: console.log(s))
        )
    rows = migration_pauses(run)
    result = {
        **result_header("migration", typed_command("migration", "hotlora bench migration"), torch.device("cpu")),
        "agents": settings.agents,
        "steps": settings.steps,
        "join_at": settings.join_at,
        "kill_at": settings.kill_at,
        "partitions": settings.partitions,
        "session_timeout_ms": settings.session_timeout_ms,
        "seconds": round(run.seconds, 1),
        "problems": verify(run, settings.steps),
        "pauses": summarize(rows),
        "migrations": rows,
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        console.print(markdown_section(result))
    if not args.no_docs:
        append_section(markdown_section(result), DOCS_INTRO)
    return 1 if result["problems"] else 0
