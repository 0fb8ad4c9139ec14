"""``hotlora bench hop``: what the Kafka hop adds to a tiny request, p50 and p99, on loopback.

Side by side in one run: the same tiny request (``list_adapters``, which does no model work) sent
(a) through ``HotLoraClient`` -> broker -> an engine process -> broker -> client, and (b) straight to
an in-process ``Engine``. (a) is the hop an agent pays per request; (b) is the engine loop's own floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from hotlora.benchmarks.core import append_section, git_commit, machine_info

DOCS_INTRO = """## `hotlora bench hop`

A tiny request (`list_adapters`, no model work) round-tripped N times in sequence: through Kafka
(client, broker, engine process, broker, client, all on loopback) and, in the same run, straight to an
in-process `Engine`. `hop_p50_ms` is the median Kafka round trip.
"""


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def time_calls(call: Any, n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        await call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - start) * 1000.0)
    return samples


async def measure(bootstrap: str | None, model: str, n: int, warmup: int, console: Console) -> dict[str, Any]:
    from hotlora.agents import HotLoraClient
    from hotlora.agents.readiness import wait_for_engine
    from hotlora.demo import reap, terminate
    from hotlora.engine.core import Engine
    from hotlora.engine.kafka.broker import EmbeddedBroker

    prefix = f"bench-hop-{os.getpid()}"
    broker = None if bootstrap else EmbeddedBroker().start()
    address = bootstrap or broker.bootstrap  # type: ignore[union-attr]
    workdir = Path(tempfile.mkdtemp(prefix="hotlora-hop-"))
    engine = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hotlora.cli", "engine", "--bootstrap", address, "--model", model,
        "--topic-prefix", prefix, "--checkpoint-dir", str(workdir), "--heartbeat-interval", "1",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with console.status("waiting for the engine to serve"):
            await wait_for_engine(address, prefix, timeout=180)
        async with HotLoraClient(address, topic_prefix=prefix, request_timeout=30) as client:
            with console.status(f"{n} requests through Kafka"):
                hop = await time_calls(client.list_adapters, n, warmup)
    finally:
        terminate(engine)
        await reap(engine)
        if broker is not None:
            broker.stop()
    async with Engine.from_pretrained(model) as local:
        with console.status(f"{n} requests in process"):
            inprocess = await time_calls(local.list_adapters, n, warmup)
    return {
        "broker": "external" if bootstrap else "embedded Tansu",
        "n": n,
        "hop_p50_ms": statistics.median(hop),
        "hop_p99_ms": percentile(hop, 0.99),
        "inprocess_p50_ms": statistics.median(inprocess),
        "inprocess_p99_ms": percentile(inprocess, 0.99),
    }


def markdown_section(result: dict[str, Any]) -> str:
    m = result["machine"]
    return (
        f"### hop: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
        f"- command: `{result['command']}`\n- commit: `{result['commit']}`\n"
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; broker: {result['broker']}\n\n"
        "| path | p50 ms | p99 ms |\n|---|---:|---:|\n"
        f"| Kafka round trip (`hop_p50_ms`) | {result['hop_p50_ms']:.2f} | {result['hop_p99_ms']:.2f} |\n"
        f"| in-process `Engine` | {result['inprocess_p50_ms']:.3f} | {result['inprocess_p99_ms']:.3f} |\n\n"
        f"{result['n']} sequential requests after warm-up.\n"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--bootstrap", default=os.environ.get("HOTLORA_BOOTSTRAP"), help="use this broker")
    parser.add_argument("--model", default=None, help="base model directory (default: the cached tiny model)")
    parser.add_argument("-n", "--requests", type=int, default=300, help="measured requests (default 300)")
    parser.add_argument("--no-docs", action="store_true", help="do not append a section to docs/benchmarks.md")


def main(args: argparse.Namespace) -> int:
    from hotlora.engine.event_loop import run
    from hotlora.models.tiny_model import TinyModelRecipe, ensure_tiny_model

    if args.requests < 1:
        raise SystemExit("error: --requests must be >= 1")
    console = Console(stderr=True)
    model = args.model or str(ensure_tiny_model(TinyModelRecipe()))
    command = shlex.join(["hotlora", *sys.argv[1:]]) if "hop" in sys.argv else "hotlora bench hop"
    result: dict[str, Any] = {"command": command, "commit": git_commit(), "machine": machine_info(torch.device("cpu"))}
    result.update(run(measure(args.bootstrap, model, args.requests, max(10, args.requests // 10), console)))
    console.print(
        f"hop_p50_ms = {result['hop_p50_ms']:.2f} (p99 {result['hop_p99_ms']:.2f}); "
        f"in process p50 {result['inprocess_p50_ms']:.3f} ms"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if not args.no_docs:
        append_section(markdown_section(result), DOCS_INTRO)
    return 0
