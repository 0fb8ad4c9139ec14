"""``hotlora bench startup``: how long an engine process takes to serve, and to serve again after ``kill -9``.

Each spawn, on one embedded broker and a fresh topic prefix whose topics already exist (as in a
deployment after its first start, ``hotlora topics create``): the clock starts when ``hotlora engine``
is spawned. Read from the engine's own JSON log (wall-clock timestamps, same machine): *edge imported*
(``engine_starting``, its first line: the Kafka edge, without torch), *group joined* (``group_joined``),
*imports done* (``loading_model``: torch and transformers, imported on the loading thread while the group
joins, so either may come first), *model loaded* (``model_loaded``) and ``engine_running`` (its first
assignment taken). Seen by this process: *readiness seen* (``wait_for_engine``, started at the
spawn) and *first answer* (a ``create_adapter`` sent at the spawn, answered).

Then the engine is SIGKILLed once that adapter's snapshot is durable and respawned at once with the same
settings, as a supervisor would: *restarted* is the respawn, and *first answer* is the first ``sample``
of that adapter (sent right after the kill) answered. Medians over ``--spawns``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DOCS_INTRO = """## `hotlora bench startup`

An engine process (`hotlora engine`, tiny model, CPU, embedded broker, its topics already created)
timed from its spawn: the Kafka edge imported (its first log line), consumer group joined, torch and
transformers imported, model loaded (the join overlaps the imports and the load), `engine_running`
(first assignment taken, its adapters loaded), readiness seen by `wait_for_engine` (started at the
spawn), and the first answer to a `create_adapter` sent at the spawn.
Then `kill -9` once that adapter's snapshot is durable, an immediate respawn, and the first answer to a
`sample` of the adapter. Medians of `--spawns` spawns; times in seconds.
"""

PHASES = (
    "edge_imported", "group_joined", "imports_done", "model_loaded", "engine_running", "readiness_seen", "first_answer",
)  # fmt: skip
LOG_EVENTS = {  # phase -> the engine's log event marking it (its first occurrence)
    "edge_imported": "engine_starting",
    "group_joined": "group_joined",
    "imports_done": "loading_model",
    "model_loaded": "model_loaded",
    "engine_running": "engine_running",
}
TARGETS = {"engine_running": 3.0, "readiness_after_running": 0.2, "recovery_first_answer": 5.0}
TENANT = "tenant-0"


@dataclass
class EngineRun:
    """One engine process: its log events' wall times, read as they come."""

    process: asyncio.subprocess.Process
    spawned: float
    events: dict[str, float] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                event = json.loads(line)
                at = dt.datetime.fromisoformat(event["timestamp"]).timestamp()
                self.events.setdefault(event["event"], at)
                self.changed.set()

    async def wait_event(self, name: str, timeout: float) -> float:
        """The wall time of the engine's first ``name`` log line; fails loudly if it exits or times out."""
        async with asyncio.timeout(timeout):
            while name not in self.events:
                if self.process.returncode is not None:
                    raise RuntimeError(f"the engine exited with {self.process.returncode} before logging {name}")
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.5)
        return self.events[name]


async def spawn_engine(env: dict[str, str]) -> EngineRun:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hotlora.cli", "engine", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    run = EngineRun(process, time.time())
    run.reader = asyncio.create_task(run.read())
    return run


async def stop_engine(run: EngineRun | None, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
    """``sig``, then SIGKILL if it lingers; always reaped, and its log reader finished."""
    if run is None:
        return
    if run.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            run.process.send_signal(sig)
        try:
            await asyncio.wait_for(run.process.wait(), timeout)
        except TimeoutError:
            run.process.kill()
            await run.process.wait()
    if run.reader is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(run.reader, timeout)


async def wait_durable(checkpoint_dir: Path, adapter_id: str, timeout: float) -> None:
    """Until the engine's durable store holds a current snapshot of ``adapter_id`` (checked every 50 ms)."""
    from hotlora.engine.kafka.durability import DurableStore

    store = DurableStore(checkpoint_dir / ".durable")
    async with asyncio.timeout(timeout):
        while not any(found.adapter_id == adapter_id for found in await asyncio.to_thread(store.load_all)):
            await asyncio.sleep(0.05)


async def one_spawn(bootstrap: str, model: str, workdir: Path, index: int, timeout: float) -> dict[str, Any]:
    """Spawn, time every phase, kill -9, respawn, time the recovery; both engines are reaped on any exit."""
    from hotlora.agents import HotLoraClient
    from hotlora.agents.readiness import wait_for_engine
    from hotlora.engine.kafka.admin import ensure_topics
    from hotlora.engine.types import SamplingParams
    from hotlora.schemas import Topics

    prefix = f"bench-startup-{os.getpid()}-{index}"
    engine_id = f"startup-{index}"
    checkpoint_dir = workdir / f"checkpoints-{index}"
    await ensure_topics(bootstrap, Topics(prefix), 4)
    env = {
        **os.environ,
        "HOTLORA_BOOTSTRAP": bootstrap,
        "HOTLORA_MODEL": model,
        "HOTLORA_TOPIC_PREFIX": prefix,
        "HOTLORA_CHECKPOINT_DIR": str(checkpoint_dir),
        "HOTLORA_DEVICE": "cpu",
        "HOTLORA_DTYPE": "float32",
        "HOTLORA_ENGINE_ID": engine_id,
    }
    first = second = None
    client = HotLoraClient(bootstrap, topic_prefix=prefix, request_timeout=timeout, retries=0)
    try:
        first = await spawn_engine(env)
        ready = asyncio.create_task(wait_for_engine(bootstrap, prefix, timeout, engine_id))
        await client.start()
        await client.create_adapter(TENANT, rank=8)
        answered = time.time()
        await ready
        seen = time.time()
        times = {phase: await first.wait_event(event, timeout) - first.spawned for phase, event in LOG_EVENTS.items()}
        times.update(readiness_seen=seen - first.spawned, first_answer=answered - first.spawned)

        await wait_durable(checkpoint_dir, TENANT, timeout)
        killed = time.time()
        await stop_engine(first, signal.SIGKILL)
        second = await spawn_engine(env)
        await client.sample(TENANT, [5, 6, 7], 1, SamplingParams(max_tokens=1, temperature=0.0))
        recovered = time.time()
        restart_running = await second.wait_event("engine_running", timeout)
        recovery = {
            "restarted": second.spawned - killed,
            "engine_running": restart_running - killed,
            "first_answer": recovered - killed,
            "first_answer_after_spawn": recovered - second.spawned,
        }
        return {"startup_s": times, "recovery_s": recovery}
    finally:
        with contextlib.suppress(Exception):
            await client.close()
        await stop_engine(first, signal.SIGKILL)
        await stop_engine(second)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of each phase over the spawns."""

    def median(part: str, key: str) -> float:
        return round(statistics.median(run[part][key] for run in runs), 3)

    startup = {phase: median("startup_s", phase) for phase in PHASES}
    recovery = {key: median("recovery_s", key) for key in runs[0]["recovery_s"]}
    after_running = statistics.median(
        run["startup_s"]["readiness_seen"] - run["startup_s"]["engine_running"] for run in runs
    )
    return {"startup_s": startup, "recovery_s": recovery, "readiness_after_running_s": round(after_running, 3)}


def verdicts(summary: dict[str, Any]) -> dict[str, str]:
    values = {
        "engine_running": summary["startup_s"]["engine_running"],
        "readiness_after_running": summary["readiness_after_running_s"],
        "recovery_first_answer": summary["recovery_s"]["first_answer_after_spawn"],
    }
    return {name: f"{'pass' if values[name] <= limit else 'MISS'} (<= {limit:g} s)" for name, limit in TARGETS.items()}


def markdown_section(result: dict[str, Any]) -> str:
    m = result["machine"]
    startup, recovery = result["startup_s"], result["recovery_s"]
    lines = [
        f"### startup: {result['timestamp']}",
        "",
        f"- command: `{result['command']}`",
        f"- commit: `{result['commit']}`",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; embedded Tansu; load average at start "
        f"{result['load_average']}; group session {result['session_timeout_ms']} ms",
        "",
        "| from spawn to | median s |",
        "|---|---:|",
        *(f"| {phase.replace('_', ' ')} | {startup[phase]:.2f} |" for phase in PHASES),
        "",
        f"Readiness seen {result['readiness_after_running_s']:.3f} s after `engine_running` (median).",
        "",
        "| after `kill -9` | median s |",
        "|---|---:|",
        f"| restarted (respawned) | {recovery['restarted']:.2f} |",
        f"| restarted engine running | {recovery['engine_running']:.2f} |",
        f"| first answer for the adapter it had | {recovery['first_answer']:.2f} |",
        f"| (first answer, from the respawn) | {recovery['first_answer_after_spawn']:.2f} |",
        "",
        "| target | verdict |",
        "|---|---|",
        *(f"| `{name}` | {verdict} |" for name, verdict in result["verdicts"].items()),
    ]
    return "\n".join(lines) + "\n"


def append_docs(result: dict[str, Any], path: Path | None = None) -> Path:
    from hotlora.benchmarks.core import repo_root

    path = path or repo_root() / "docs" / "benchmarks.md"
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if "## `hotlora bench startup`" not in text:
        text = text.rstrip("\n") + "\n\n" + DOCS_INTRO
    path.write_text(text.rstrip("\n") + "\n\n" + markdown_section(result))
    return path


async def measure(
    bootstrap: str, model: str, spawns: int, timeout: float, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="hotlora-startup-") as tmp:
        for index in range(spawns):
            run = await one_spawn(bootstrap, model, Path(tmp), index, timeout)
            log(
                f"spawn {index + 1}/{spawns}: running {run['startup_s']['engine_running']:.2f} s, "
                f"readiness {run['startup_s']['readiness_seen']:.2f} s, "
                f"recovered answer {run['recovery_s']['first_answer_after_spawn']:.2f} s after respawn"
            )
            runs.append(run)
    return runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--spawns", type=int, default=5, help="engine spawns, each also killed and respawned (default 5)"
    )
    parser.add_argument("--model", default=None, help="base model directory (default: the cached tiny model)")
    parser.add_argument("--timeout", type=float, default=180.0, help="bound on each wait, in seconds (default 180)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    parser.add_argument("--no-docs", action="store_true", help="do not append a section to docs/benchmarks.md")


def main(args: argparse.Namespace) -> int:
    import structlog
    import torch
    from rich.console import Console

    from hotlora.benchmarks.core import result_header, typed_command
    from hotlora.engine.kafka.broker import EmbeddedBroker
    from hotlora.engine.kafka.service_config import ServiceConfig
    from hotlora.models.tiny_model import TinyModelRecipe, ensure_tiny_model

    if args.spawns < 1:
        raise SystemExit("error: --spawns must be >= 1")
    console = Console(stderr=True)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout is for --json
    model = args.model or str(ensure_tiny_model(TinyModelRecipe()))
    load = os.getloadavg()[0]
    with EmbeddedBroker() as broker:
        runs = asyncio.run(measure(broker.bootstrap, model, args.spawns, args.timeout, lambda s: console.log(s)))
    result: dict[str, Any] = {
        **result_header("startup", typed_command("startup", "hotlora bench startup"), torch.device("cpu")),
        "load_average": round(load, 2),
        "session_timeout_ms": ServiceConfig().session_timeout_ms,
        "spawns": args.spawns,
        **summarize(runs),
        "runs": runs,
    }
    result["verdicts"] = verdicts(result)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        console.print(markdown_section(result))
    if not args.no_docs:
        console.print(f"appended to {append_docs(result)}")
    return 0
