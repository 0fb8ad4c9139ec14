"""``hotlora top``: a live view of every adapter of a deployment, from its metrics topic alone.

Engines publish heartbeats there (per-adapter ``load``: queue depth, tokens/s, version, version lag)
and agents publish one ``metrics`` event per training step (step, reward), so ``top`` works from any
machine that reaches the broker, with no access to the engines themselves.

The pure part is ``TopState``: ``fold`` one message at a time, then ``rows`` builds the table model and
``render`` turns it into a rich ``Table``; tests drive both without Kafka. ``MetricsFeed`` is the Kafka
edge: it starts ``--lookback`` seconds back (so a slow agent's last reward and every engine's last
heartbeat are there at once) and follows the topic from there.

An engine is live while its newest heartbeat is younger than ``--stale`` seconds (by the heartbeat's
``sent_at_ms`` against this machine's clock) and it has not reported ``stopped``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from hotlora.schemas import AdapterLoad, EngineStatus, Heartbeat, Message, Metrics, SchemaError, Topics, decode

POLL_MS = 200
STOPPED_STATES = frozenset({"stopped"})


@dataclass
class AgentView:
    """An agent's newest ``metrics`` event; ``reward`` is the newest step that had one."""

    metrics: Metrics
    reward: float | None = None


@dataclass(frozen=True)
class AdapterRow:
    """One line of the table; None means the source (an engine's load, an agent's metrics) is absent."""

    adapter_id: str
    engine_id: str | None
    load: AdapterLoad | None
    step: int | None
    reward: float | None
    experiment: str | None


@dataclass
class TopState:
    """What the metrics topic said, newest first per source.

    Engines key heartbeats and status events by engine id, but several engines' events (and those of
    engines older than that) interleave across partitions: every comparison is by ``sent_at_ms``, never by
    arrival.
    """

    heartbeats: dict[str, Heartbeat] = field(default_factory=dict)  # engine_id -> newest
    statuses: dict[str, EngineStatus] = field(default_factory=dict)  # engine_id -> newest
    agents: dict[str, AgentView] = field(default_factory=dict)  # adapter_id -> newest metrics

    def fold(self, message: Message) -> None:
        """Take one message of the metrics topic into the view; an older copy never replaces a newer one."""
        if isinstance(message, Heartbeat):
            seen = self.heartbeats.get(message.engine_id)
            if seen is None or message.sent_at_ms >= seen.sent_at_ms:
                self.heartbeats[message.engine_id] = message
        elif isinstance(message, EngineStatus):
            seen_status = self.statuses.get(message.engine_id)
            if seen_status is None or message.sent_at_ms >= seen_status.sent_at_ms:
                self.statuses[message.engine_id] = message
        elif isinstance(message, Metrics) and message.adapter_id:
            agent = self.agents.get(message.adapter_id)
            if agent is not None and message.sent_at_ms < agent.metrics.sent_at_ms:
                return
            reward = message.reward_mean if message.reward_mean is not None else agent.reward if agent else None
            self.agents[message.adapter_id] = AgentView(message, reward)

    def live_engines(self, now_ms: int, stale_s: float) -> list[Heartbeat]:
        """Newest heartbeats of the engines heard from within ``stale_s`` and not stopped since."""
        cutoff = now_ms - stale_s * 1000.0
        live = []
        for engine_id, heartbeat in sorted(self.heartbeats.items()):
            status = self.statuses.get(engine_id)
            stopped = heartbeat.state in STOPPED_STATES or (
                status is not None and status.state in STOPPED_STATES and status.sent_at_ms >= heartbeat.sent_at_ms
            )
            if heartbeat.sent_at_ms >= cutoff and not stopped:
                live.append(heartbeat)
        return live

    def rows(self, now_ms: int, stale_s: float) -> list[AdapterRow]:
        """Every adapter a live engine owns, plus agents heard from within ``stale_s`` (engine unknown).

        An adapter two live engines both report (a rebalance in flight) belongs to the newer heartbeat.
        """
        owner: dict[str, Heartbeat] = {}
        for heartbeat in self.live_engines(now_ms, stale_s):
            for adapter_id in (*heartbeat.load, *heartbeat.adapters):
                current = owner.get(adapter_id)
                if current is None or heartbeat.sent_at_ms > current.sent_at_ms:
                    owner[adapter_id] = heartbeat
        cutoff = now_ms - stale_s * 1000.0
        recent_agents = {a for a, v in self.agents.items() if v.metrics.sent_at_ms >= cutoff}
        rows = []
        for adapter_id in sorted(set(owner) | recent_agents):
            heartbeat = owner.get(adapter_id)
            agent = self.agents.get(adapter_id)
            rows.append(
                AdapterRow(
                    adapter_id=adapter_id,
                    engine_id=heartbeat.engine_id if heartbeat else None,
                    load=heartbeat.load.get(adapter_id) if heartbeat else None,
                    step=agent.metrics.step if agent else None,
                    reward=agent.reward if agent else None,
                    experiment=agent.metrics.experiment if agent else None,
                )
            )
        return rows


def _cell(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def render(state: TopState, now_ms: int, stale_s: float) -> Table:
    rows = state.rows(now_ms, stale_s)
    engines = state.live_engines(now_ms, stale_s)
    title = f"hotlora top: {len(engines)} live engine{'s' * (len(engines) != 1)}, {len(rows)} adapters"
    table = Table(title=title, title_justify="left")
    table.add_column("adapter", no_wrap=True)
    table.add_column("engine", no_wrap=True)
    for name in ("queued", "running", "rows", "paused", "refused", "tokens/s", "version", "step", "reward", "lag"):
        table.add_column(name, justify="right")
    table.add_column("experiment")
    for row in rows:
        load = row.load
        table.add_row(
            row.adapter_id,
            _cell(row.engine_id),
            _cell(load.queued if load else None),
            _cell(load.running if load else None),
            _cell(load.rows if load else None),
            _cell(load.paused_rows if load else None),
            _cell(load.quota_refusals if load else None),
            _cell(load.tokens_per_s if load else None, "{:.0f}"),
            _cell(load.version if load else None),
            _cell(row.step),
            _cell(row.reward, "{:.3f}"),
            _cell(load.version_lag if load else None),
            _cell(row.experiment),
        )
    if engines:
        table.caption = "  ".join(
            f"{h.engine_id}: {h.queued_requests} queued, {h.running_rows} rows, "
            f"{h.resident_adapters}/{h.resident_slots or '-'} resident"
            for h in engines
        )
        table.caption_justify = "left"
    return table


# ----- the Kafka edge -----


class MetricsFeed:
    """The metrics topic from ``lookback_s`` ago onwards; ``caught_up`` once the history is read."""

    def __init__(self, bootstrap: str, topic_prefix: str = "hotlora", lookback_s: float = 120.0) -> None:
        self.bootstrap = bootstrap
        self.topic = Topics(topic_prefix).metrics
        self.lookback_s = lookback_s
        self._consumer: Any = None
        self._ends: dict[Any, int] = {}

    async def __aenter__(self) -> MetricsFeed:
        from hotlora.engine.kafka.admin import group_less_consumer

        self._consumer = group_less_consumer(self.bootstrap)
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def attach(self) -> bool:
        """Assign the topic's partitions and seek back ``lookback_s``; False while the topic does not exist."""
        from aiokafka import TopicPartition

        from hotlora.engine.kafka.admin import log_end_offsets

        consumer = self._consumer
        if consumer.assignment():
            return True
        if self.topic not in await consumer.topics():  # topics() refreshes the cluster metadata
            return False
        partitions = [TopicPartition(self.topic, p) for p in sorted(consumer.partitions_for_topic(self.topic) or ())]
        if not partitions:
            return False
        consumer.assign(partitions)
        self._ends = await log_end_offsets(self.bootstrap, partitions)  # Tansu's end_offsets can read short
        since_ms = int((time.time() - self.lookback_s) * 1000)
        starts = await consumer.offsets_for_times({tp: since_ms for tp in partitions})
        for tp in partitions:
            found = starts.get(tp)
            consumer.seek(tp, found.offset if found is not None else self._ends[tp])
        return True

    async def poll(self, timeout_ms: int = POLL_MS) -> list[Message]:
        """The next decoded messages; records of other shapes (a newer schema) are skipped."""
        if not await self.attach():
            await asyncio.sleep(timeout_ms / 1000)
            return []
        found: list[Message] = []
        for records in (await self._consumer.getmany(timeout_ms=timeout_ms)).values():
            for record in records:
                with contextlib.suppress(SchemaError):
                    found.append(decode(record.value or b""))
        return found

    async def caught_up(self) -> bool:
        """Whether everything that was on the topic when it was attached has been read."""
        if not self._consumer.assignment():
            return False
        for tp, end in self._ends.items():
            if await self._consumer.position(tp) < end:
                return False
        return True


async def snapshot(bootstrap: str, topic_prefix: str, window_s: float, lookback_s: float, stale_s: float) -> TopState:
    """``--once``: read the recent history; stop once it is read and a live engine is known, or after the window."""
    state = TopState()
    deadline = time.monotonic() + window_s
    async with MetricsFeed(bootstrap, topic_prefix, lookback_s) as feed:
        while time.monotonic() < deadline:
            for message in await feed.poll():
                state.fold(message)
            if await feed.caught_up() and state.live_engines(_now_ms(), stale_s):
                break
    return state


async def follow(bootstrap: str, topic_prefix: str, lookback_s: float, stale_s: float, refresh_s: float) -> None:
    """The live view: redraw every ``refresh_s`` until interrupted."""
    state = TopState()
    console = Console()
    async with MetricsFeed(bootstrap, topic_prefix, lookback_s) as feed:
        with Live(render(state, _now_ms(), stale_s), console=console, auto_refresh=False, screen=False) as live:
            next_draw = 0.0
            while True:
                for message in await feed.poll(min(POLL_MS, int(refresh_s * 1000))):
                    state.fold(message)
                if time.monotonic() >= next_draw:
                    live.update(render(state, _now_ms(), stale_s), refresh=True)
                    next_draw = time.monotonic() + refresh_s


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# ----- command line -----


def add_top_parser(commands: Any) -> argparse.ArgumentParser:
    """Register ``hotlora top`` on the CLI's sub-command set."""
    top = commands.add_parser("top", help="live per-adapter view from the metrics topic: queue, tokens/s, reward, lag")
    add_arguments(top)
    top.set_defaults(func=run_top)
    return top


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", default=os.environ.get("HOTLORA_BOOTSTRAP"), help="Kafka bootstrap HOST:PORT")
    parser.add_argument("--topic-prefix", default=os.environ.get("HOTLORA_TOPIC_PREFIX", "hotlora"))
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit (no live view)")
    parser.add_argument(
        "--window", type=float, default=10.0, help="--once: longest wait for a live engine, seconds (default 10)"
    )
    parser.add_argument("--lookback", type=float, default=120.0, help="history read at start, seconds (default 120)")
    parser.add_argument(
        "--stale", type=float, default=15.0, help="an engine or agent silent this long is gone, seconds (default 15)"
    )
    parser.add_argument("--refresh", type=float, default=1.0, help="live view redraw interval, seconds (default 1)")


def run_top(args: argparse.Namespace) -> int:
    if not args.bootstrap:
        raise SystemExit("error: top needs a broker: pass --bootstrap HOST:PORT or set HOTLORA_BOOTSTRAP")
    if min(args.window, args.lookback, args.stale, args.refresh) <= 0:
        raise SystemExit("error: --window, --lookback, --stale and --refresh must be > 0")
    if args.once:
        state = asyncio.run(snapshot(args.bootstrap, args.topic_prefix, args.window, args.lookback, args.stale))
        console = Console(width=None if sys.stdout.isatty() else 200)  # a pipe: no wrapped adapter ids
        console.print(render(state, _now_ms(), args.stale))
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(follow(args.bootstrap, args.topic_prefix, args.lookback, args.stale, args.refresh))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hotlora top", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_top(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
