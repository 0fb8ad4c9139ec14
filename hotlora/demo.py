"""``hotlora demo``: concurrent RL experiments on one hot engine, as separate OS processes over TCP.

It starts the embedded broker (unless ``--bootstrap`` names one), one engine process and N GRPO agent
processes, each a different experiment (task, learning rate: ``agents/experiments.py``) with its own
adapter, on the pretrained tiny base. It shows each experiment's progress, then a table of held-out
reward at step 0 and at the end, and a reward-curve PNG. Every process it starts is reaped, whatever happens.
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
from typing import Any

import msgspec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from hotlora.agents.grpo import GrpoConfig
from hotlora.progress import progress_bar, progress_console
from hotlora.schemas import Metrics

ENGINE_READY_TIMEOUT_S = 180.0
AGENT_TIMEOUT_S = 1800.0


@dataclass
class Experiment:
    config: GrpoConfig
    metrics: list[Metrics] = field(default_factory=list)
    error: str | None = None
    returncode: int | None = None
    seconds: float = 0.0

    @property
    def evals(self) -> list[Metrics]:
        return [m for m in self.metrics if m.eval_reward is not None]

    @property
    def initial_reward(self) -> float | None:
        return self.evals[0].eval_reward if self.evals else None

    @property
    def final_reward(self) -> float | None:
        return self.evals[-1].eval_reward if len(self.evals) > 1 else None

    def mean_of(self, name: str) -> float | None:
        """Mean of a per-step metric over the steps that report it (None when none does)."""
        values = [getattr(m, name) for m in self.metrics if getattr(m, name) is not None]
        return sum(values) / len(values) if values else None

    def summary(self) -> dict[str, Any]:
        evals = self.evals
        return {
            "adapter_id": self.config.adapter_id,
            "task": self.config.task,
            "learning_rate": self.config.learning_rate,
            "seed": self.config.seed,
            "steps": max((m.step for m in self.metrics), default=0),
            "initial_eval_reward": self.initial_reward,
            "final_eval_reward": self.final_reward,
            "initial_accuracy": evals[0].accuracy if evals else None,
            "final_accuracy": evals[-1].accuracy if len(evals) > 1 else None,
            "eval_curve": [(m.step, m.eval_reward) for m in evals],
            "logprob_mismatch": self.mean_of("logprob_mismatch"),
            "weight_sync_s": self.mean_of("weight_sync_s"),
            "checkpoints": [
                {"step": m.step, "task": m.task, "path": m.checkpoint, "eval_reward_by_task": m.eval_reward_by_task}
                for m in self.metrics
                if m.checkpoint
            ],
            "seconds": self.seconds,
            "returncode": self.returncode,
            "error": self.error,
        }


def hotlora_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "hotlora.cli", *args]


def agent_command(cfg: GrpoConfig, address: str, model_dir: str, prefix: str) -> list[str]:
    flags = {
        "--task": cfg.task,
        "--adapter": cfg.adapter_id,
        "--lr": repr(cfg.learning_rate),
        "--seed": str(cfg.seed),
        "--steps": str(cfg.steps),
        "--eval-every": str(cfg.eval_every),
        "--bootstrap": address,
        "--model": model_dir,
        "--topic-prefix": prefix,
    }
    return hotlora_command("agent", *(part for pair in flags.items() for part in pair))


async def wait_for_engine(bootstrap: str, topic_prefix: str, timeout: float) -> None:
    """Readiness is the engine's announcement on the broker that it serves (``running``), not a sleep."""
    from hotlora.agents import readiness

    await readiness.wait_for_engine(bootstrap, topic_prefix, timeout)


async def stream_agent(process: asyncio.subprocess.Process, exp: Experiment, progress: Progress, task: int) -> None:
    """Reads the agent's stdout: one ``Metrics`` JSON line per step, or an ``{"error": ...}`` line."""
    assert process.stdout is not None
    start = time.perf_counter()
    async for raw in process.stdout:
        try:
            metrics = msgspec.json.decode(raw, type=Metrics)
        except msgspec.DecodeError:
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                if isinstance(line, dict) and "error" in line:
                    exp.error = str(line["error"])
            continue
        exp.metrics.append(metrics)
        exp.seconds = time.perf_counter() - start
        fields: dict[str, Any] = {"completed": metrics.step}
        if metrics.reward_mean is not None:
            fields["reward"] = metrics.reward_mean
        if metrics.eval_reward is not None:
            fields["eval"] = metrics.eval_reward
        progress.update(task, **fields)
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
    configs: list[GrpoConfig],
    bootstrap: str | None,
    model_dir: str,
    workdir: Path,
    console: Console,
    sampler: str = "native",
) -> list[Experiment]:
    from hotlora.engine.kafka.broker import EmbeddedBroker

    prefix = f"demo-{os.getpid()}"
    broker = None if bootstrap else EmbeddedBroker(log_path=workdir / "broker.log").start()
    address = bootstrap or broker.bootstrap  # type: ignore[union-attr]
    console.print(
        f"broker {address} ({'embedded Tansu' if broker else 'external'}), model {model_dir}, sampler {sampler}"
    )
    engine: asyncio.subprocess.Process | None = None
    agents: list[asyncio.subprocess.Process] = []
    exps = [Experiment(cfg) for cfg in configs]
    try:
        engine_log = open(workdir / "engine.log", "wb")  # noqa: SIM115 - closed with the process
        engine = await asyncio.create_subprocess_exec(
            *hotlora_command("engine", "--bootstrap", address, "--model", model_dir, "--topic-prefix", prefix,
                             "--checkpoint-dir", str(workdir / "checkpoints"), "--sampler", sampler),
            stdout=engine_log,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        with progress_console().status("waiting for the engine to serve"):
            await wait_for_engine(address, prefix, ENGINE_READY_TIMEOUT_S)
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("train reward {task.fields[reward]:.2f}  held-out {task.fields[eval]:.3f}"),
        )
        # On stderr, live on a terminal only; the summary table on stdout is the record of the run.
        with progress_bar(*columns, transient=False) as progress:
            streams = []
            for exp in exps:
                cfg = exp.config
                process = await asyncio.create_subprocess_exec(
                    *agent_command(cfg, address, model_dir, prefix),
                    stdout=asyncio.subprocess.PIPE,
                    stderr=open(workdir / f"{cfg.adapter_id}.log", "wb"),  # noqa: SIM115
                )
                agents.append(process)
                label = f"{cfg.adapter_id} lr {cfg.learning_rate:g}"
                task = progress.add_task(label, total=cfg.steps, reward=float("nan"), eval=float("nan"))
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
    table = Table(title=f"{len(exps)} concurrent RL experiments on one hot engine ({seconds:.0f} s)")
    for column in ("experiment", "task", "lr", "steps", "held-out reward: step 0", "final", "change", "greedy acc"):
        table.add_column(column)
    for e in exps:
        row = e.summary()
        first, last = row["initial_eval_reward"], row["final_eval_reward"]
        change = f"{last - first:+.3f}" if first is not None and last is not None else "-"
        acc = (
            f"{row['initial_accuracy']:.2f} -> {row['final_accuracy']:.2f}"
            if row["final_accuracy"] is not None
            else "-"
        )
        status = e.error or (f"exit {e.returncode}" if e.returncode else None)
        table.add_row(
            e.config.adapter_id,
            e.config.task,
            f"{e.config.learning_rate:g}",
            str(row["steps"]),
            f"{first:.3f}" if first is not None else "-",
            f"{last:.3f}" if last is not None else "-",
            status or change,
            acc,
        )
    console.print(table)
    mismatch = [v for e in exps if (v := e.mean_of("logprob_mismatch")) is not None]
    sync = [v for e in exps if (v := e.mean_of("weight_sync_s")) is not None]
    if mismatch:
        console.print(f"train/inference logprob mismatch (mean |sampler - trainer|): {max(mismatch):.2e} at most")
    if sync:
        console.print(f"weight sync to vLLM per optim_step: {1000 * sum(sync) / len(sync):.1f} ms mean")
    for e in exps:
        if any(m.checkpoint for m in e.metrics):
            console.print(forgetting_table(e))
    metrics = [m for e in exps for m in e.metrics]
    if png is not None and metrics:
        from hotlora.plot import plot_metrics

        console.print(f"reward curves: {plot_metrics(metrics, png)}")


def forgetting_table(exp: Experiment) -> Table:
    """A continual run: held-out reward on every task seen so far, at each phase's checkpoint."""
    rows = [m for m in exp.metrics if m.checkpoint or m.step == 0]
    tasks = list(dict.fromkeys(name for m in rows for name in m.eval_reward_by_task))
    table = Table(title=f"{exp.config.adapter_id}: continual learning, held-out reward per checkpoint")
    for column in ("step", "trained on", "checkpoint", *tasks):
        table.add_column(column)
    for m in rows:
        cells = [f"{m.eval_reward_by_task[t]:.3f}" if t in m.eval_reward_by_task else "" for t in tasks]
        table.add_row(str(m.step), m.task if m.step else "-", m.checkpoint or "(base)", *cells)
    return table


def main(
    experiments: int,
    steps: int,
    bootstrap: str | None,
    model: str | None,
    json_path: str | None,
    png: str | None,
    eval_every: int | None = None,
    seed: int = 0,
    task: str | None = None,
    sampler: str = "native",
) -> int:
    from hotlora.agents.experiments import experiment_configs
    from hotlora.agents.tasks import TASKS
    from hotlora.engine.event_loop import run
    from hotlora.models.model_init import rl_base_model

    if experiments < 1 or steps < 1:
        raise SystemExit("error: --experiments and --steps must be >= 1")
    if task is not None and task not in (*TASKS, "continual"):
        raise SystemExit(f"error: unknown task {task!r} (available: continual, {', '.join(TASKS)})")
    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="hotlora-demo-"))
    console.print(f"logs and checkpoints: {workdir}")
    model_dir = model or rl_base_model()
    overrides: dict[str, object] = {"eval_every": eval_every or max(1, steps // 6)}
    if task:
        overrides["task"] = task
    configs = experiment_configs(experiments, steps, seed=seed, **overrides)
    start = time.perf_counter()
    exps = run(run_demo(configs, bootstrap, model_dir, workdir, console, sampler))
    seconds = time.perf_counter() - start
    summarize(exps, console, Path(png) if png else workdir / "rewards.png", seconds)
    if json_path:
        payload = {
            "seconds": seconds,
            "model": model_dir,
            "sampler": sampler,
            "experiments": [e.summary() for e in exps],
        }
        Path(json_path).write_text(json.dumps(payload, indent=2))
    return 0 if all(e.returncode == 0 and e.error is None for e in exps) else 1
