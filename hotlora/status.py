"""``hotlora status``: which engines are live, their capacity and load, and which engine owns which adapter.

Everything comes from the engines' heartbeats on the metrics topic, so it works from any machine that
reaches the broker and needs no engine to answer a request. An engine counts as live when its latest
heartbeat is younger than ``window`` seconds and does not say ``stopped``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass

from rich import box
from rich.console import Console
from rich.table import Table

from hotlora.agents.metrics import read_events
from hotlora.schemas import Message
from hotlora.top import TopState


@dataclass(frozen=True)
class EngineView:
    engine_id: str
    state: str
    last_seen_s: float  # seconds since its latest heartbeat
    partitions: list[int]
    adapters: list[str]
    resident_slots: int
    resident_adapters: int
    running_rows: int
    max_decode_rows: int
    queued_requests: int
    # The base model it serves (a fleet must serve one; a mismatch is what an operator looks for first).
    model_name: str
    vocab_size: int
    context_length: int


def fold(events: list[object], now_ms: int, window_s: float) -> list[EngineView]:
    """The latest heartbeat (by send time) of each engine seen within ``window_s``, stopped ones left out."""
    state = TopState()
    for event in events:
        if isinstance(event, Message):
            state.fold(event)
    return [
        EngineView(
            engine_id=beat.engine_id,
            state=beat.state,
            last_seen_s=round(max((now_ms - beat.sent_at_ms) / 1000, 0.0), 1),
            partitions=list(beat.partitions),
            adapters=list(beat.adapters),
            resident_slots=beat.resident_slots,
            resident_adapters=beat.resident_adapters,
            running_rows=beat.running_rows,
            max_decode_rows=beat.max_decode_rows,
            queued_requests=beat.queued_requests,
            model_name=beat.model_name,
            vocab_size=beat.vocab_size,
            context_length=beat.context_length,
        )
        for beat in state.live_engines(now_ms, window_s)
    ]


def owners(views: list[EngineView]) -> dict[str, list[str]]:
    """adapter -> the engines that list it (more than one only for a moment, mid-rebalance)."""
    table: dict[str, list[str]] = {}
    for view in views:
        for adapter_id in view.adapters:
            table.setdefault(adapter_id, []).append(view.engine_id)
    return dict(sorted(table.items()))


async def collect(bootstrap: str, topic_prefix: str, window_s: float) -> list[EngineView]:
    now_ms = int(time.time() * 1000)
    events = await read_events(bootstrap, topic_prefix, since_ms=now_ms - int(window_s * 1000))
    return fold(events, int(time.time() * 1000), window_s)


def render(views: list[EngineView], console: Console) -> None:
    engines = Table(title="engines", box=box.SIMPLE_HEAD)
    for column in ("engine", "state", "model", "seen", "partitions", "adapters", "resident", "rows", "queued"):
        engines.add_column(column, no_wrap=True)
    for v in views:
        engines.add_row(
            v.engine_id,
            v.state,
            v.model_name or "-",
            f"{v.last_seen_s:.1f}s",
            ",".join(map(str, v.partitions)) or "-",
            str(len(v.adapters)),
            f"{v.resident_adapters}/{v.resident_slots}",
            f"{v.running_rows}/{v.max_decode_rows}",
            str(v.queued_requests),
        )
    console.print(engines)
    placement = Table(title="adapters", box=box.SIMPLE_HEAD)
    placement.add_column("adapter")
    placement.add_column("engine")
    for adapter_id, engine_ids in owners(views).items():
        placement.add_row(adapter_id, ", ".join(engine_ids))
    console.print(placement)


def main(bootstrap: str, topic_prefix: str, window_s: float, as_json: bool) -> int:
    views = asyncio.run(collect(bootstrap, topic_prefix, window_s))
    if as_json:
        print(json.dumps({"engines": [asdict(v) for v in views], "adapters": owners(views)}, indent=1))
    else:
        render(views, Console(width=None if sys.stdout.isatty() else 160))  # a pipe or a log: no wrapping
        if not views:
            print(f"no live engine (no heartbeat in the last {window_s:g} s on {topic_prefix}.metrics)")
    return 0
