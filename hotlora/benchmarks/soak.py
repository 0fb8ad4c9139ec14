"""``hotlora bench soak``: does the engine's memory stay flat under a long multi-tenant load?

One engine process (a subprocess, so its RSS is its own) on a broker (the embedded Tansu unless
``--bootstrap``), and N tenants in this process, each with its own ``HotLoraClient`` and adapter,
running a realistic mixed RL loop for the given minutes: ``sample`` a group, score it with a synthetic
reward, ``forward_backward`` (``importance_sampling``) on the group's advantages, ``optim_step``, and
now and then ``save_state``. The engine's RSS is sampled over time (psutil, else ``/proc/PID/status``).

Reported: RSS after warm-up (every tenant through one full iteration) and at the end, the growth (MiB,
%), the slope of a least-squares line through the samples (MiB/min), answered requests and errors,
and throughput. It is a soak, not a CI test: ``--minutes 0.1`` only smoke-tests it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from hotlora.benchmarks.core import append_section, logs_off_stdout, result_header, typed_command
from hotlora.progress import progress_bar

DOCS_INTRO = """## `hotlora bench soak`

One engine process (its own RSS) and N tenants, each its own client and adapter, running a mixed RL
loop for M minutes: `sample` a group, score it (synthetic reward), `forward_backward`
(`importance_sampling`), `optim_step`, and every few steps `save_state`. RSS is sampled over time;
`rss_start` is taken once every tenant has finished one iteration (warm-up), `slope` is a least-squares
line through the samples after it. A flat engine shows growth near 0 and a slope near 0 MiB/min.
"""
MIB = 1024 * 1024


@dataclasses.dataclass
class SoakConfig:
    tenants: int = 32
    minutes: float = 10.0
    rank: int = 8
    group: int = 4  # samples per prompt
    prompt_tokens: int = 8
    max_tokens: int = 16
    save_every: int = 5  # iterations between save_state calls, per tenant
    sample_every_s: float = 0.0  # seconds between RSS samples; 0: about 120 over the run, 0.25-5 s apart
    request_timeout: float = 120.0
    seed: int = 0

    def rss_interval(self) -> float:
        if self.sample_every_s > 0:
            return self.sample_every_s
        return min(5.0, max(0.25, self.minutes * 60.0 / 120.0))


# ----- RSS -----


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid``: psutil when installed, else ``VmRSS`` from ``/proc/PID/status``."""
    try:
        import psutil
    except ImportError:
        psutil = None  # type: ignore[assignment]
    if psutil is not None:
        return int(psutil.Process(pid).memory_info().rss)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for pid {pid}")


def linear_slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over x; 0 with fewer than two distinct x."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx


# ----- the tenants -----


@dataclasses.dataclass
class Counters:
    answered: int = 0
    errors: int = 0
    optim_steps: int = 0
    saves: int = 0
    sampled_tokens: int = 0
    trained_tokens: int = 0
    by_verb: dict[str, int] = dataclasses.field(default_factory=dict)
    error_kinds: dict[str, int] = dataclasses.field(default_factory=dict)

    def ok(self, verb: str) -> None:
        self.answered += 1
        self.by_verb[verb] = self.by_verb.get(verb, 0) + 1

    def failed(self, err: BaseException) -> None:
        self.errors += 1
        kind = type(err).__name__
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


def reward(tokens: Sequence[int]) -> float:
    """A synthetic, cheap reward: the share of even token ids (the tenant adds a little noise)."""
    return sum(t % 2 == 0 for t in tokens) / max(1, len(tokens))


async def tenant(
    client: Any, index: int, cfg: SoakConfig, vocab: int, stop_at: list[float], warm: asyncio.Event, counts: Counters
) -> None:
    """One tenant's loop until ``stop_at[0]`` (monotonic); errors are counted and the loop goes on."""
    from hotlora.agents.grpo import group_advantages, rl_datum
    from hotlora.engine.types import AdamParams, LoraSpec, SamplingParams
    from hotlora.schemas.errors import HotLoraError

    adapter_id = f"soak-{index}"
    rng = random.Random(cfg.seed * 100_003 + index)
    await client.create_adapter(adapter_id, LoraSpec(rank=cfg.rank, alpha=2.0 * cfg.rank, seed=index))
    counts.ok("create_adapter")
    adam = AdamParams(learning_rate=1e-3, grad_clip_norm=1.0)
    step = 0
    first = True
    while time.monotonic() < stop_at[0]:
        step += 1
        try:
            prompt = [rng.randrange(3, vocab) for _ in range(cfg.prompt_tokens)]
            params = SamplingParams(max_tokens=cfg.max_tokens, temperature=1.0, seed=rng.randrange(1 << 30))
            out = await client.sample(adapter_id, prompt, n=cfg.group, params=params)
            counts.ok("sample")
            counts.sampled_tokens += sum(len(s.tokens) for s in out.sequences)
            # Noise keeps a signal where the group's sequences are identical (a random model repeats itself).
            advantages = group_advantages([reward(s.tokens) + 0.1 * rng.random() for s in out.sequences])
            if any(a != 0.0 for a in advantages):
                datums = [
                    rl_datum(prompt, s.tokens, s.logprobs, a) for s, a in zip(out.sequences, advantages, strict=True)
                ]
                fb = await client.forward_backward(adapter_id, datums, "importance_sampling")
                counts.ok("forward_backward")
                counts.trained_tokens += fb.num_tokens
                await client.optim_step(adapter_id, adam)
                counts.ok("optim_step")
                counts.optim_steps += 1
            if step % cfg.save_every == 0:
                # One path per tenant, overwritten: the soak measures memory, not disk.
                await client.save_state(adapter_id, f"soak/{adapter_id}")
                counts.ok("save_state")
                counts.saves += 1
        except (HotLoraError, OSError) as err:
            counts.failed(err)
        if first:
            first = False
            warm.set()


# ----- the run -----


async def measure(cfg: SoakConfig, bootstrap: str | None, model: str, console: Console) -> dict[str, Any]:
    from hotlora.agents import HotLoraClient
    from hotlora.agents.readiness import wait_for_engine
    from hotlora.demo import reap, terminate
    from hotlora.engine.kafka.broker import EmbeddedBroker

    prefix = f"bench-soak-{os.getpid()}-{int(time.time())}"
    workdir = Path(tempfile.mkdtemp(prefix="hotlora-soak-"))
    broker = None if bootstrap else EmbeddedBroker().start()
    address = bootstrap or broker.bootstrap  # type: ignore[union-attr]
    engine = None
    clients: list[Any] = []
    try:
        engine = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hotlora.cli", "engine", "--bootstrap", address, "--model", model,
            "--topic-prefix", prefix, "--checkpoint-dir", str(workdir), "--heartbeat-interval", "1",
            "--log-level", "warning",
            stdout=asyncio.subprocess.DEVNULL, stderr=(workdir / "engine.log").open("wb"),
        )  # fmt: skip
        with console.status("waiting for the engine to serve"):
            await wait_for_engine(address, prefix, timeout=180)
        vocab = int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])
        clients = [
            HotLoraClient(address, topic_prefix=prefix, request_timeout=cfg.request_timeout, retries=1)
            for _ in range(cfg.tenants)
        ]
        with console.status(f"starting {cfg.tenants} clients"):
            for client in clients:
                await client.start()
        counts = Counters()
        warms = [asyncio.Event() for _ in clients]
        stop_at = [float("inf")]
        tasks = [
            asyncio.create_task(tenant(c, i, cfg, vocab, stop_at, warms[i], counts)) for i, c in enumerate(clients)
        ]
        with console.status("warm-up: every tenant through one iteration"):
            warm_start = time.monotonic()
            waiting = asyncio.gather(*(w.wait() for w in warms))
            done, _ = await asyncio.wait([waiting, *tasks], return_when=asyncio.FIRST_COMPLETED, timeout=600)
            for task in done:
                if task is not waiting:
                    task.result()  # a tenant crashed in warm-up (create_adapter failed): raise it
            if waiting not in done:
                raise TimeoutError("warm-up did not finish within 600 s")
            warmup_s = time.monotonic() - warm_start
        base = dataclasses.replace(counts, by_verb=dict(counts.by_verb), error_kinds=dict(counts.error_kinds))
        start = time.monotonic()
        duration = cfg.minutes * 60.0
        stop_at[0] = start + duration
        samples: list[tuple[float, float]] = []  # (seconds since start, RSS MiB)
        interval = cfg.rss_interval()
        progress = progress_bar(
            TextColumn("soak"), BarColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), console=console,
        )  # fmt: skip
        with progress:
            bar = progress.add_task("soak", total=duration, info="")
            while True:
                now = time.monotonic() - start
                rss = rss_bytes(engine.pid) / MIB
                samples.append((now, rss))
                progress.update(
                    bar,
                    completed=min(now, duration),
                    info=f"engine RSS {rss:,.0f} MiB, {counts.answered - base.answered:,} answered, "
                    f"{counts.errors - base.errors} errors",
                )
                if now >= duration or all(t.done() for t in tasks):
                    break
                await asyncio.sleep(min(interval, max(0.0, duration - now)))
        measured_s = time.monotonic() - start
        end_rss = rss_bytes(engine.pid) / MIB  # before tenants finish their last calls
        with console.status("tenants finishing their last iteration"):
            await asyncio.gather(*tasks)
        total_s = time.monotonic() - start
        answered = counts.answered - base.answered
        retries = sum(c.stats.retries for c in clients)
    finally:
        for client in clients:
            await client.close()
        terminate(engine)
        code = await reap(engine)
        if broker is not None:
            broker.stop()
    start_rss = samples[0][1]
    slope = linear_slope([(t / 60.0, rss) for t, rss in samples])
    return {
        "broker": "external" if bootstrap else "embedded Tansu",
        "tenants": cfg.tenants,
        "minutes": cfg.minutes,
        "warmup_s": round(warmup_s, 2),
        "measured_s": round(measured_s, 2),
        "rss_start_mib": round(start_rss, 1),
        "rss_end_mib": round(end_rss, 1),
        "rss_peak_mib": round(max([rss for _, rss in samples] + [end_rss]), 1),
        "rss_growth_mib": round(end_rss - start_rss, 1),
        "rss_growth_pct": round(100.0 * (end_rss - start_rss) / start_rss, 2),
        "rss_slope_mib_per_min": round(slope, 3),
        "rss_samples": len(samples),
        "rss_interval_s": interval,
        "answered": answered,
        "errors": counts.errors - base.errors,
        "error_kinds": counts.error_kinds,
        "client_retries": retries,
        "by_verb": {k: n for k, v in counts.by_verb.items() if (n := v - base.by_verb.get(k, 0))},
        "optim_steps": counts.optim_steps - base.optim_steps,
        "saves": counts.saves - base.saves,
        "requests_per_s": round(answered / total_s, 2),
        "optim_steps_per_s": round((counts.optim_steps - base.optim_steps) / total_s, 3),
        "sampled_tokens_per_s": round((counts.sampled_tokens - base.sampled_tokens) / total_s, 1),
        "engine_exit_code": code,
        "rss_timeline": [[round(t, 2), round(rss, 1)] for t, rss in samples],
        "workload": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("tenants", "minutes")},
    }


# ----- reporting -----


def markdown_section(result: dict[str, Any]) -> str:
    m = result["machine"]
    w = result["workload"]
    return (
        f"### soak: {result['timestamp']}\n\n"
        f"- command: `{result['command']}`\n- commit: `{result['commit']}`\n"
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; broker: {result['broker']}\n"
        f"- workload: {result['tenants']} tenants for {result['minutes']:g} min (after {result['warmup_s']:.0f} s "
        f"warm-up); each iteration samples {w['group']} x {w['max_tokens']} tokens, then `forward_backward` "
        f"(importance_sampling) and `optim_step`; `save_state` every {w['save_every']} iterations; rank "
        f"{w['rank']}; model `{result['model']}`\n\n"
        "| engine RSS start MiB | end MiB | peak MiB | growth MiB | growth % | slope MiB/min |\n"
        "|---:|---:|---:|---:|---:|---:|\n"
        f"| {result['rss_start_mib']:,.1f} | {result['rss_end_mib']:,.1f} | {result['rss_peak_mib']:,.1f} "
        f"| {result['rss_growth_mib']:+,.1f} | {result['rss_growth_pct']:+.2f} "
        f"| {result['rss_slope_mib_per_min']:+.3f} |\n\n"
        "| answered | errors | client re-sends | optim steps | saves | requests/s | optim steps/s | sampled tok/s |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {result['answered']:,} | {result['errors']} | {result['client_retries']} | {result['optim_steps']:,} "
        f"| {result['saves']} | {result['requests_per_s']:.1f} | {result['optim_steps_per_s']:.2f} "
        f"| {result['sampled_tokens_per_s']:,.0f} |\n\n"
        f"{result['rss_samples']} RSS samples, one every {result['rss_interval_s']:g} s.\n"
    )


def append_docs(result: dict[str, Any], path: Path | None = None) -> Path:
    return append_section(markdown_section(result), DOCS_INTRO, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenants", type=int, default=32, help="concurrent tenants, one adapter each (default 32)")
    parser.add_argument("--minutes", type=float, default=10.0, help="measured minutes after warm-up (default 10)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    parser.add_argument("--bootstrap", default=os.environ.get("HOTLORA_BOOTSTRAP"), help="use this broker")
    parser.add_argument("--model", default=None, help="base model directory (default: the cached tiny model)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of every tenant (default 8)")
    parser.add_argument("--save-every", type=int, default=5, help="iterations between save_state (default 5)")
    parser.add_argument("--sample-every", type=float, default=0.0, help="seconds between RSS samples (default auto)")
    parser.add_argument("--no-docs", action="store_true", help="do not append a section to docs/benchmarks.md")


def main(args: argparse.Namespace) -> int:
    from hotlora.engine.event_loop import run
    from hotlora.models.tiny_model import TinyModelRecipe, ensure_tiny_model

    if args.tenants < 1:
        raise SystemExit("error: --tenants must be >= 1")
    if args.minutes <= 0:
        raise SystemExit("error: --minutes must be > 0")
    if args.save_every < 1:
        raise SystemExit("error: --save-every must be >= 1")
    cfg = SoakConfig(
        tenants=args.tenants, minutes=args.minutes, rank=args.rank, save_every=args.save_every,
        sample_every_s=args.sample_every,
    )  # fmt: skip
    console = Console(stderr=True)
    model = args.model or str(ensure_tiny_model(TinyModelRecipe()))
    command = typed_command("soak", f"hotlora bench soak --tenants {args.tenants} --minutes {args.minutes:g}")
    result: dict[str, Any] = {**result_header("soak", command, torch.device("cpu")), "model": model}
    with logs_off_stdout(args.json):
        result.update(run(measure(cfg, args.bootstrap, model, console)))
    console.print(
        f"engine RSS {result['rss_start_mib']:,.1f} -> {result['rss_end_mib']:,.1f} MiB "
        f"({result['rss_growth_mib']:+.1f} MiB, {result['rss_growth_pct']:+.2f}%), slope "
        f"{result['rss_slope_mib_per_min']:+.3f} MiB/min; {result['answered']:,} answered, {result['errors']} errors, "
        f"{result['requests_per_s']:.1f} req/s"
    )
    if args.json:
        print(json.dumps(result))
    if not args.no_docs:
        console.print(f"appended to {append_docs(result)}")
    return 0
