"""``hotlora demo``: the whole system on one machine, as separate OS processes talking over TCP.

It starts the embedded broker (unless ``--bootstrap`` names one), one engine process and N agent
processes, each agent its own experiment with its own adapter. It shows each experiment's progress,
then a summary table and a loss-curve PNG. Every process it starts is reaped, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

ENGINE_READY_TIMEOUT_S = 180.0
AGENT_TIMEOUT_S = 900.0


@dataclass
class Experiment:
    adapter_id: str
    losses: list[float] = field(default_factory=list)
    completion: str | None = None
    target: str | None = None
    error: str | None = None
    returncode: int | None = None
    seconds: float = 0.0


def hotlora_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "hotlora.cli", *args]


async def wait_for_engine(bootstrap: str, topic_prefix: str, timeout: float) -> None:
    """Readiness is the engine's first heartbeat on the broker, not a sleep."""
    from hotlora.agents.readiness import wait_for_heartbeat

    await wait_for_heartbeat(bootstrap, topic_prefix, timeout)


async def stream_agent(process: asyncio.subprocess.Process, exp: Experiment, progress: Progress, task: int) -> None:
    assert process.stdout is not None
    async for raw in process.stdout:
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if "loss" in line:
            exp.losses.append(float(line["loss"]))
            exp.seconds = float(line.get("t", 0.0))
            progress.update(task, completed=int(line["step"]), loss=exp.losses[-1])
        if line.get("done"):
            exp.completion, exp.target = line.get("completion"), line.get("target")
        if "error" in line:
            exp.error = str(line["error"])
    exp.returncode = await process.wait()


def terminate(process: asyncio.subprocess.Process | None) -> None:
    if process is not None and process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)


async def reap(process: asyncio.subprocess.Process | None, timeout: float = 60.0) -> int | None:
    if process is None:
        return None
    try:
        return await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        process.kill()
        return await process.wait()


async def run_demo(
    experiments: int, steps: int, bootstrap: str | None, model: str | None, workdir: Path, console: Console
) -> list[Experiment]:
    from hotlora.engine.broker import EmbeddedBroker
    from hotlora.engine.tiny_model import TinyModelRecipe, ensure_tiny_model

    model_dir = model or str(ensure_tiny_model(TinyModelRecipe()))
    prefix = f"demo-{os.getpid()}"
    broker = None if bootstrap else EmbeddedBroker(log_path=workdir / "broker.log").start()
    address = bootstrap or broker.bootstrap  # type: ignore[union-attr]
    console.print(f"broker {address} ({'embedded Tansu' if broker else 'external'}), model {model_dir}")
    engine: asyncio.subprocess.Process | None = None
    agents: list[asyncio.subprocess.Process] = []
    exps = [Experiment(f"exp-{i}") for i in range(experiments)]
    try:
        engine_log = open(workdir / "engine.log", "wb")  # noqa: SIM115 - closed with the process
        engine = await asyncio.create_subprocess_exec(
            *hotlora_command(
                "engine",
                "--bootstrap",
                address,
                "--model",
                model_dir,
                "--topic-prefix",
                prefix,
                "--checkpoint-dir",
                str(workdir / "checkpoints"),
            ),
            stdout=engine_log,
            stderr=asyncio.subprocess.STDOUT,
        )
        with console.status("waiting for the engine's first heartbeat"):
            await wait_for_engine(address, prefix, ENGINE_READY_TIMEOUT_S)
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"),
        )
        with Progress(*columns, console=console) as progress:
            streams = []
            for i, exp in enumerate(exps):
                process = await asyncio.create_subprocess_exec(
                    *hotlora_command(
                        "agent",
                        "--task",
                        "sft",
                        "--adapter",
                        exp.adapter_id,
                        "--steps",
                        str(steps),
                        "--seed",
                        str(i),
                        "--bootstrap",
                        address,
                        "--model",
                        model_dir,
                        "--topic-prefix",
                        prefix,
                    ),
                    stdout=asyncio.subprocess.PIPE,
                    stderr=open(workdir / f"{exp.adapter_id}.log", "wb"),  # noqa: SIM115
                )
                agents.append(process)
                task = progress.add_task(exp.adapter_id, total=steps, loss=float("nan"))
                streams.append(stream_agent(process, exp, progress, task))
            await asyncio.wait_for(asyncio.gather(*streams), AGENT_TIMEOUT_S)
    finally:
        for process in agents:
            terminate(process)
        for process in agents:
            await reap(process)
        terminate(engine)
        await reap(engine)
        if broker is not None:
            broker.stop()
    return exps


def summarize(exps: list[Experiment], console: Console, png: Path | None, seconds: float) -> None:
    table = Table(title=f"{len(exps)} concurrent experiments on one hot engine ({seconds:.0f} s)")
    for column in ("experiment", "steps", "first loss", "last loss", "completion", "target", "ok"):
        table.add_column(column)
    for e in exps:
        ok = e.returncode == 0 and e.completion == e.target
        first = f"{e.losses[0]:.3f}" if e.losses else "-"
        last = f"{e.losses[-1]:.3f}" if e.losses else "-"
        table.add_row(
            e.adapter_id,
            str(len(e.losses)),
            first,
            last,
            repr(e.completion),
            repr(e.target),
            "yes" if ok else (e.error or f"exit {e.returncode}"),
        )
    console.print(table)
    if png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for e in exps:
            ax.plot(range(1, len(e.losses) + 1), e.losses, label=e.adapter_id)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (sum over target tokens)")
        ax.set_yscale("log")
        ax.set_title("hotlora demo: per-experiment loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(png)
        plt.close(fig)
        console.print(f"loss curves: {png}")


def main(
    experiments: int, steps: int, bootstrap: str | None, model: str | None, json_path: str | None, png: str | None
) -> int:
    from hotlora.engine.core import run

    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="hotlora-demo-"))
    console.print(f"logs and checkpoints: {workdir}")
    start = time.perf_counter()
    exps = run(run_demo(experiments, steps, bootstrap, model, workdir, console))
    seconds = time.perf_counter() - start
    summarize(exps, console, Path(png) if png else workdir / "losses.png", seconds)
    if json_path:
        payload = {"seconds": seconds, "experiments": [e.__dict__ for e in exps]}
        Path(json_path).write_text(json.dumps(payload, indent=2))
    return 0 if all(e.returncode == 0 and e.completion == e.target for e in exps) else 1
