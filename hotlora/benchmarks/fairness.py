"""``hotlora bench fairness``: can a flooding tenant slow another tenant's RL step down, or lock it out?

One default ``hotlora engine`` (a subprocess, so its RSS is its own, with Prometheus metrics on) on a
broker (the embedded Tansu unless ``--bootstrap``). A *victim* tenant runs RL steps: ``--victim-samples``
concurrent ``sample`` requests of n=``--victim-n``, ``--victim-tokens`` tokens each, then
``forward_backward`` (importance_sampling) and ``optim_step``. Its step latency is measured in three
phases:

1. **solo**: the victim alone;
2. **flood**: while a *flooder* tenant (its own principal and client) has ``--flood-requests`` samples of
   n=``--flood-n``, ``--flood-tokens`` tokens in flight at once (what one large eval sends); the
   flooder's own throughput, its share of the decode rows while both sample (the engine's
   ``hotlora_decode_rows`` gauge, scraped every 50 ms) and its ``quota_exceeded`` refusals are reported;
3. **train flood**: while the flooder trains, ``--train-flood-loops`` loops each sending one
   ``forward_backward`` of ``--train-flood-datums`` datums x ``--train-flood-tokens`` tokens after
   another (a big batch, many training slices long: the engine runs it as parts, with the victim's work
   between them; ``--train-slice-tokens`` sets the engine's slice, and a huge one shows the unsplit
   engine);
4. **tenants**: while ``--tenants`` ordinary tenants run the same RL loop as the victim.

Reported: median and p90 step latency per phase, the victim's slowdown (phase median / solo median),
the flooder's tokens/s and row share, its training tokens/s, and the engine's RSS before the flood, its
peak and after it. Targets (issue 18, the 2-core CPU): slowdown under the flood <= 2.5x, flooder share
>= 1/3.
``--quick`` shrinks every phase for a smoke test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import secrets
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from hotlora.benchmarks.core import append_section, logs_off_stdout, result_header, typed_command
from hotlora.benchmarks.soak import MIB, rss_bytes

DOCS_INTRO = """## `hotlora bench fairness`

A victim tenant's RL step (concurrent `sample`s, then `forward_backward` and `optim_step`) timed alone,
under a flooding tenant (hundreds of wide, long samples in flight at once), and among ordinary tenants
running the same loop, on one default `hotlora engine`; since 2026-12-05 also under a training flood
(back-to-back `forward_backward` calls of many training slices each). The slowdown is each phase's median over the
solo median; the flooder's row share is its share of the decode rows in the decode steps both tenants
ran in, over the victim's steps (the engine's `hotlora_shared_decode_row_steps` counters). Targets on a
2-core CPU: slowdown under the flood <= 2.5x with the flooder keeping >= 1/3 of the rows.
"""


@dataclasses.dataclass
class FairnessConfig:
    steps: int = 8  # victim RL steps measured per phase
    victim_samples: int = 4
    victim_n: int = 4
    victim_tokens: int = 16
    flood_requests: int = 300
    flood_n: int = 16
    flood_tokens: int = 64
    tenants: int = 7
    train_flood_loops: int = 2
    train_flood_datums: int = 256
    train_flood_tokens: int = 64
    prompt_tokens: int = 8
    rank: int = 8
    request_timeout: float = 1800.0  # the flood's last requests wait behind its first ones
    seed: int = 0

    @classmethod
    def quick(cls) -> FairnessConfig:
        return cls(
            steps=3, flood_requests=24, flood_n=8, flood_tokens=32, tenants=2, victim_tokens=8, train_flood_datums=128,
            train_flood_tokens=96,
        )  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int, family_name: str) -> dict[str, float]:
    """One metric family's value per ``adapter`` label, from the engine's /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == family_name:
            for sample in family.samples:
                if sample.name in (family_name, f"{family_name}_total"):
                    values[sample.labels["adapter"]] = sample.value
    return values


WARMUP_STEPS = 3
SHARED = "hotlora_shared_decode_row_steps"  # rows each adapter ran in steps shared with another adapter


def _summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return {"median_s": round(statistics.median(ordered), 4), "p90_s": round(p90, 4), "steps": len(ordered)}


async def rl_step(client: Any, adapter_id: str, cfg: FairnessConfig, rng: random.Random, vocab: int) -> float:
    """One RL step of ``adapter_id``; returns its wall time in seconds."""
    from hotlora.agents.grpo import group_advantages, rl_datum
    from hotlora.engine.types import AdamParams, SamplingParams

    started = time.perf_counter()
    prompts = [[rng.randrange(3, vocab) for _ in range(cfg.prompt_tokens)] for _ in range(cfg.victim_samples)]
    params = SamplingParams(max_tokens=cfg.victim_tokens, temperature=1.0, seed=rng.randrange(1 << 30))
    outs = await asyncio.gather(*(client.sample(adapter_id, p, n=cfg.victim_n, params=params) for p in prompts))
    datums = []
    for prompt, out in zip(prompts, outs, strict=True):
        rewards = [
            sum(t % 2 == 0 for t in s.tokens) / max(1, len(s.tokens)) + 0.1 * rng.random() for s in out.sequences
        ]
        for seq, advantage in zip(out.sequences, group_advantages(rewards), strict=True):
            datums.append(rl_datum(prompt, seq.tokens, seq.logprobs, advantage))
    await client.forward_backward(adapter_id, datums, "importance_sampling")
    await client.optim_step(adapter_id, AdamParams(learning_rate=1e-3))
    return time.perf_counter() - started


def training_datums(rng: random.Random, count: int, length: int, vocab: int) -> list[Any]:
    """``count`` cross-entropy datums of ``length`` random tokens (the training flood's batch)."""
    from hotlora.engine.types import Datum

    return [Datum.from_sequence([rng.randrange(3, vocab) for _ in range(length + 1)]) for _ in range(count)]


async def measure(
    cfg: FairnessConfig, bootstrap: str | None, model: str, console: Console, train_slice_tokens: int | None = None
) -> dict[str, Any]:
    from hotlora.agents import HotLoraClient
    from hotlora.agents.readiness import wait_for_engine
    from hotlora.demo import reap, terminate
    from hotlora.engine.kafka.broker import EmbeddedBroker
    from hotlora.engine.types import LoraSpec, SamplingParams
    from hotlora.schemas.errors import HotLoraError

    prefix = f"bench-fairness-{os.getpid()}-{int(time.time())}"
    workdir = Path(tempfile.mkdtemp(prefix="hotlora-fairness-"))
    broker = None if bootstrap else EmbeddedBroker().start()
    address = bootstrap or broker.bootstrap  # type: ignore[union-attr]
    port = free_port()
    engine = None
    clients: list[Any] = []
    rng = random.Random(cfg.seed)
    vocab = int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])

    def client(name: str, in_flight: int = 64) -> Any:
        made = HotLoraClient(
            address, topic_prefix=prefix, request_timeout=cfg.request_timeout, retries=0, max_in_flight=in_flight,
            principal=name, token=secrets.token_urlsafe(16),
        )  # fmt: skip
        clients.append(made)
        return made

    try:
        engine = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hotlora.cli", "engine", "--bootstrap", address, "--model", model,
            "--topic-prefix", prefix, "--checkpoint-dir", str(workdir), "--heartbeat-interval", "1",
            "--metrics-port", str(port), "--log-level", "warning",
            *(["--train-slice-tokens", str(train_slice_tokens)] if train_slice_tokens else []),
            stdout=asyncio.subprocess.DEVNULL, stderr=(workdir / "engine.log").open("wb"),
        )  # fmt: skip
        with console.status("waiting for the engine's heartbeat"):
            await wait_for_engine(address, prefix, timeout=180)
        victim = client("victim")
        flooder = client("flooder", in_flight=max(64, cfg.flood_requests))
        others = [client(f"tenant-{i}") for i in range(cfg.tenants)]
        for c in clients:
            await c.start()
        spec = LoraSpec(rank=cfg.rank, alpha=2.0 * cfg.rank)
        await victim.create_adapter("victim", spec)
        await flooder.create_adapter("flooder", spec)
        for i, c in enumerate(others):
            await c.create_adapter(f"tenant-{i}", spec)

        async def victim_steps() -> list[float]:
            return [await rl_step(victim, "victim", cfg, rng, vocab) for _ in range(cfg.steps)]

        with console.status("warm-up and solo"):
            for _ in range(WARMUP_STEPS):  # not counted: first steps pay one-time costs (allocations, snapshots)
                await rl_step(victim, "victim", cfg, rng, vocab)
            solo = await victim_steps()
        rss_before = rss_bytes(engine.pid) / MIB

        # ----- flood -----
        flood_params = SamplingParams(max_tokens=cfg.flood_tokens, temperature=1.0)
        flood_tokens = [0]
        refused = [0]
        failed: dict[str, int] = {}

        async def one_flood(k: int) -> None:
            prompt = [3 + (k * 7 + j) % (vocab - 3) for j in range(cfg.prompt_tokens)]
            try:
                out = await flooder.sample("flooder", prompt, n=cfg.flood_n, params=flood_params)
                flood_tokens[0] += sum(len(s.tokens) for s in out.sequences)
            except HotLoraError as err:
                if err.code == "quota_exceeded":
                    refused[0] += 1
                else:
                    failed[err.code] = failed.get(err.code, 0) + 1

        peak = [rss_before]
        stop = asyncio.Event()

        async def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_bytes(engine.pid) / MIB)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.05)

        with console.status(f"flood: {cfg.flood_requests} samples of n={cfg.flood_n} x {cfg.flood_tokens} tokens"):
            flood_started = time.perf_counter()
            flood = [asyncio.create_task(one_flood(k)) for k in range(cfg.flood_requests)]
            watcher = asyncio.create_task(watch())
            await asyncio.sleep(0)
            # The victim starts once the flood holds the batch (the engine's gauge shows its rows).
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    if (await asyncio.to_thread(scrape, port, "hotlora_decode_rows")).get("flooder", 0) > 0:
                        break
                await asyncio.sleep(0.05)
            shared_before = await asyncio.to_thread(scrape, port, SHARED)
            flooded = await victim_steps()
            shared_after = await asyncio.to_thread(scrape, port, SHARED)
            tokens_during_victim = flood_tokens[0]
            victim_window = time.perf_counter() - flood_started
            await asyncio.gather(*flood)
            flood_s = time.perf_counter() - flood_started
            stop.set()
            await watcher
        rss_after = rss_bytes(engine.pid) / MIB

        # ----- training flood -----
        trained = asyncio.Event()
        train_tokens = [0]

        async def train_loop(i: int) -> None:
            local = random.Random(cfg.seed * 7919 + i)
            while not trained.is_set():
                batch = training_datums(local, cfg.train_flood_datums, cfg.train_flood_tokens, vocab)
                await flooder.forward_backward("flooder", batch, "cross_entropy")
                train_tokens[0] += cfg.train_flood_datums * cfg.train_flood_tokens

        calls = f"{cfg.train_flood_datums} x {cfg.train_flood_tokens} tokens"
        with console.status(f"train flood: {cfg.train_flood_loops} loops of forward_backward({calls})"):
            train_started = time.perf_counter()
            loops = [asyncio.create_task(train_loop(i)) for i in range(cfg.train_flood_loops)]
            await asyncio.sleep(0)
            train_flooded = await victim_steps()
            trained.set()
            await asyncio.gather(*loops)
            train_s = time.perf_counter() - train_started

        # ----- ordinary tenants -----
        busy = asyncio.Event()

        async def ordinary(i: int) -> int:
            steps = 0
            local = random.Random(cfg.seed * 1000 + i)
            while not busy.is_set():
                await rl_step(others[i], f"tenant-{i}", cfg, local, vocab)
                steps += 1
            return steps

        with console.status(f"{cfg.tenants} ordinary tenants"):
            loops = [asyncio.create_task(ordinary(i)) for i in range(cfg.tenants)]
            crowded = await victim_steps()
            busy.set()
            other_steps = await asyncio.gather(*loops)
        rss_end = rss_bytes(engine.pid) / MIB
    finally:
        for c in clients:
            await c.close()
        terminate(engine)
        code = await reap(engine)
        if broker is not None:
            broker.stop()

    solo_s, flood_sum, crowd_sum = _summary(solo), _summary(flooded), _summary(crowded)
    train_sum = _summary(train_flooded)
    grown = {a: shared_after.get(a, 0.0) - shared_before.get(a, 0.0) for a in ("flooder", "victim")}
    contended = grown["flooder"] + grown["victim"]
    return {
        "broker": "external" if bootstrap else "embedded Tansu",
        "solo": solo_s,
        "flood": flood_sum,
        "tenants_phase": crowd_sum,
        "train_flood": train_sum,
        "slowdown_flood": round(flood_sum["median_s"] / solo_s["median_s"], 3),
        "slowdown_train_flood": round(train_sum["median_s"] / solo_s["median_s"], 3),
        "slowdown_tenants": round(crowd_sum["median_s"] / solo_s["median_s"], 3),
        "flooder": {
            "requests": cfg.flood_requests,
            "answered": cfg.flood_requests - refused[0] - sum(failed.values()),
            "quota_refused": refused[0],
            "other_errors": failed,
            "tokens": flood_tokens[0],
            "tokens_per_s": round(flood_tokens[0] / flood_s, 1),
            "tokens_during_victim": tokens_during_victim,
            "tokens_per_s_during_victim": round(tokens_during_victim / victim_window, 1),
            "seconds": round(flood_s, 2),
            # Its share of the decode rows in the steps both decoded, while the victim ran its steps.
            "row_share": round(grown["flooder"] / contended, 3) if contended else None,
            "contended_row_steps": int(contended),
        },
        "train_flooder": {
            "tokens": train_tokens[0],
            "tokens_per_s": round(train_tokens[0] / train_s, 1),
            "seconds": round(train_s, 2),
        },
        "engine_train_slice_tokens": train_slice_tokens,  # None: the engine's default
        "ordinary_tenant_steps": other_steps,
        "rss_before_flood_mib": round(rss_before, 1),
        "rss_peak_mib": round(peak[0], 1),
        "rss_after_flood_mib": round(rss_after, 1),
        "rss_end_mib": round(rss_end, 1),
        "engine_exit_code": code,
        "workload": dataclasses.asdict(cfg),
    }


def markdown_section(result: dict[str, Any]) -> str:
    m, w, f, t = result["machine"], result["workload"], result["flooder"], result["train_flooder"]
    slice_tokens = result["engine_train_slice_tokens"] or "default (8192)"
    share = "-" if f["row_share"] is None else f"{f['row_share']:.2f}"
    return (
        f"### fairness: {result['timestamp']}\n\n"
        f"- command: `{result['command']}`\n- commit: `{result['commit']}`\n"
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; broker: {result['broker']}\n"
        f"- victim step: {w['victim_samples']} samples of n={w['victim_n']} x {w['victim_tokens']} tokens, then "
        f"`forward_backward` + `optim_step`, {w['steps']} steps per phase; flood: {w['flood_requests']} samples of "
        f"n={w['flood_n']} x {w['flood_tokens']} tokens at once; training flood: {w['train_flood_loops']} loops of "
        f"`forward_backward` ({w['train_flood_datums']} datums x {w['train_flood_tokens']} tokens); engine "
        f"`--train-slice-tokens` {slice_tokens}; {w['tenants']} ordinary tenants; model `{result['model']}`\n\n"
        "| phase | median s | p90 s | slowdown |\n|---|---:|---:|---:|\n"
        f"| solo | {result['solo']['median_s']:.3f} | {result['solo']['p90_s']:.3f} | 1.00 |\n"
        f"| flood | {result['flood']['median_s']:.3f} | {result['flood']['p90_s']:.3f} | "
        f"{result['slowdown_flood']:.2f} |\n"
        f"| train flood | {result['train_flood']['median_s']:.3f} | {result['train_flood']['p90_s']:.3f} | "
        f"{result['slowdown_train_flood']:.2f} |\n"
        f"| {w['tenants']} tenants | {result['tenants_phase']['median_s']:.3f} | "
        f"{result['tenants_phase']['p90_s']:.3f} | {result['slowdown_tenants']:.2f} |\n\n"
        "| flooder answered | quota refused | tokens/s | tokens/s while victim ran | row share |\n"
        "|---:|---:|---:|---:|---:|\n"
        f"| {f['answered']} | {f['quota_refused']} | {f['tokens_per_s']:,.0f} | {f['tokens_per_s_during_victim']:,.0f} "
        f"| {share} |\n\n"
        f"Training flood: {t['tokens_per_s']:,.0f} tokens/s trained over the phase.\n\n"
        f"Engine RSS: {result['rss_before_flood_mib']:,.1f} MiB before the flood, peak {result['rss_peak_mib']:,.1f}, "
        f"{result['rss_after_flood_mib']:,.1f} after it, {result['rss_end_mib']:,.1f} at the end.\n"
    )


def append_docs(result: dict[str, Any], path: Path | None = None) -> Path:
    return append_section(markdown_section(result), DOCS_INTRO, path)


_FLAGS = {
    "steps": "victim RL steps per phase",
    "victim_samples": "concurrent samples per victim step",
    "victim_n": "n per victim sample",
    "victim_tokens": "max_tokens per victim sample",
    "flood_requests": "flood samples in flight at once (configurable flood size)",
    "flood_n": "n per flood sample",
    "flood_tokens": "max_tokens per flood sample",
    "tenants": "ordinary tenants of the last phase",
    "train_flood_loops": "training flood: loops, each sending one forward_backward after another",
    "train_flood_datums": "training flood: datums per forward_backward",
    "train_flood_tokens": "training flood: tokens per datum",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = FairnessConfig()
    for name, text in _FLAGS.items():
        flag = f"--{name.replace('_', '-')}"
        parser.add_argument(flag, type=int, default=None, help=f"{text} (default {getattr(d, name)})")
    parser.add_argument(
        "--train-slice-tokens", type=int, default=None,
        help="the engine's --train-slice-tokens (default: its own, 8192); a huge value runs the unsplit engine",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="small phases: a smoke test (explicit flags still win)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    parser.add_argument("--bootstrap", default=os.environ.get("HOTLORA_BOOTSTRAP"), help="use this broker")
    parser.add_argument("--model", default=None, help="base model directory (default: the cached tiny model)")
    parser.add_argument("--no-docs", action="store_true", help="do not append a section to docs/benchmarks.md")


def config_from(args: argparse.Namespace) -> FairnessConfig:
    """Defaults (or ``--quick``'s), overridden by the flags given."""
    cfg = FairnessConfig.quick() if args.quick else FairnessConfig()
    for name in _FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg, name, value)
    for name in _FLAGS:
        if getattr(cfg, name) < (0 if name == "tenants" else 1):
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= {0 if name == 'tenants' else 1}")
    if args.train_slice_tokens is not None and args.train_slice_tokens < 1:
        raise SystemExit("error: --train-slice-tokens must be >= 1")
    return cfg


def main(args: argparse.Namespace) -> int:
    from hotlora.engine.event_loop import run
    from hotlora.models.tiny_model import TinyModelRecipe, ensure_tiny_model

    cfg = config_from(args)
    console = Console(stderr=True)
    model = args.model or str(ensure_tiny_model(TinyModelRecipe()))
    command = typed_command("fairness", "hotlora bench fairness")
    result: dict[str, Any] = {**result_header("fairness", command, torch.device("cpu")), "model": model}
    with logs_off_stdout(args.json):
        result.update(run(measure(cfg, args.bootstrap, model, console, args.train_slice_tokens)))
    f = result["flooder"]
    console.print(
        f"victim median step: solo {result['solo']['median_s']:.3f} s, flood {result['flood']['median_s']:.3f} s "
        f"({result['slowdown_flood']:.2f}x), train flood {result['train_flood']['median_s']:.3f} s "
        f"({result['slowdown_train_flood']:.2f}x), {cfg.tenants} tenants {result['tenants_phase']['median_s']:.3f} s "
        f"({result['slowdown_tenants']:.2f}x); flooder {f['tokens_per_s']:,.0f} tok/s, row share {f['row_share']}, "
        f"{f['quota_refused']} refused; engine RSS {result['rss_before_flood_mib']:,.0f} -> peak "
        f"{result['rss_peak_mib']:,.0f} -> {result['rss_after_flood_mib']:,.0f} MiB"
    )
    if args.json:
        print(json.dumps(result))
    if not args.no_docs:
        console.print(f"appended to {append_docs(result)}")
    return 0
