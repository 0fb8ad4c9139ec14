"""``hotlora bench sampler``: the native sampler vs the colocated vLLM one, side by side in one run.

The same workload runs on an in-process ``Engine`` with ``EngineConfig(sampler="native")`` and then,
in the same process, with ``sampler="vllm"`` (one engine at a time, each started and closed):

- **decode**: for k adapters at once, each adapter submits its sample requests concurrently (a few
  prompts x ``n`` sequences, seeded, temperature 1); tokens/s is the tokens actually generated (EOS can
  end a sequence early, so nothing is assumed from ``max_tokens``) over the wall time of the round,
  the median of ``repeats`` rounds (the k levels interleave, so drift spreads over all of them). A
  warm-up round over every adapter comes first, so vLLM's start and first-request costs are excluded;
  the engine's start is reported on its own (``start_s``).
- **rl_step**: k adapters concurrently each run GRPO-shaped steps: sample a group, score it, build
  ``importance_sampling`` datums from the sampler's logprobs, ``forward_backward``, ``optim_step``.
  Reported: mean step seconds, mean ``weight_sync_s`` (the export + load of each new version into vLLM)
  and the mean |sampler logprob - trainer logprob| (``agents.grpo.logprob_mismatch``).

Both backends see the same prompts and seeds; their random streams differ, so the sampled tokens do too.
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
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hotlora.benchmarks.core import append_section, git_commit, machine_info
from hotlora.benchmarks.experiments import interrupt_on_sigterm, quiet_client_logs
from hotlora.progress import progress_bar

BACKENDS: tuple[str, ...] = ("native", "vllm")
SECTION_HEADER = "## `hotlora bench sampler`"
DOCS_INTRO = f"""{SECTION_HEADER}

The engine's two sampler backends on the same workload, one after the other in one process:
`EngineConfig(sampler="native")` (decode inside the engine's own steps) and `sampler="vllm"` (an
`AsyncLLM` colocated in the engine, which gets each adapter's new weights after every `optim_step`).

- **decode**: k adapters at once, each submitting its seeded sample requests (temperature 1)
  concurrently; tokens/s counts the tokens actually generated over the round's wall time, median of
  the measured rounds, after a warm-up round. `start_s` (engine start: vLLM's `AsyncLLM` start-up) is reported apart.
- **RL step**: k adapters concurrently, each step = sample a group, build `importance_sampling` datums
  from the sampler's logprobs, `forward_backward`, `optim_step` (for vLLM, including the weight sync:
  `weight_sync_s`). Step seconds are means over every adapter's measured steps, split into sample,
  `forward_backward` and `optim_step` (sync included). `mismatch` is the mean
  |sampler logprob - trainer logprob| over generated tokens.

Two models of the same shape (hidden 128, 4 layers): decode runs on the random tiny model, which never
emits EOS, so every sequence decodes all `max_tokens` and tokens/s measures decoding; the RL step runs
on the pretrained RL base (as `bench experiments`), whose completions end at EOS after a few tokens and
whose logprobs are not saturated (on the random model every sampled logprob is 0, so a zero mismatch
would prove nothing). `start_s` is the RL engine's start.
"""


@dataclass
class SamplerBenchConfig:
    """Shapes of one run; the same for both backends."""

    adapters: tuple[int, ...] = (1, 2, 4, 8)  # decode: adapters sampling at once
    rl_adapters: int = 4
    prompts_per_adapter: int = 2  # decode: sample requests each adapter submits per round
    n: int = 4  # sequences per request (so 8 per adapter)
    prompt_tokens: int = 16
    max_tokens: int = 48
    repeats: int = 5  # measured decode rounds per k (the median round is reported)
    rl_group: int = 8  # sequences per RL step (one prompt)
    rl_steps: int = 3  # measured RL steps per adapter
    rl_warmup: int = 1  # RL steps per adapter before measuring
    rank: int = 8
    learning_rate: float = 1e-3
    seed: int = 0
    quick: bool = False
    device: str = "cpu"  # bench/gpu_vllm.py runs the same bench on "cuda"
    dtype: str = "float32"
    gpu_memory_utilization: float = 0.5  # vLLM's share of the GPU (ignored on CPU)

    @classmethod
    def quick_config(cls) -> SamplerBenchConfig:
        return cls(
            adapters=(1, 2), rl_adapters=2, n=2, max_tokens=8, repeats=1, rl_group=4, rl_steps=1, quick=True
        )  # fmt: skip

    @property
    def pool(self) -> int:
        return max(*self.adapters, self.rl_adapters)


def parse_adapters(text: str) -> tuple[int, ...]:
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise SystemExit(f"error: --adapters wants positive integers, comma-separated, got {text!r}")
    return tuple(values)


# ----- workload -----


def make_prompt(vocab: int, length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=gen).tolist()


def reward(tokens: Sequence[int]) -> float:
    """A stand-in verifier: the share of even token ids. Any score that varies within a group will do."""
    return sum(t % 2 == 0 for t in tokens) / max(len(tokens), 1)


async def decode_round(engine: Any, cfg: SamplerBenchConfig, ids: Sequence[str], rnd: int) -> dict[str, float]:
    """Every adapter in ``ids`` submits its requests at once; returns generated tokens and wall seconds."""
    from hotlora.engine.types import SamplingParams

    vocab = engine.runner.base.vocab_size
    calls = []
    for a, adapter_id in enumerate(ids):
        for p in range(cfg.prompts_per_adapter):
            seed = cfg.seed * 1_000_003 + rnd * 10_000 + a * 100 + p
            params = SamplingParams(max_tokens=cfg.max_tokens, temperature=1.0, seed=seed)
            calls.append((adapter_id, make_prompt(vocab, cfg.prompt_tokens, seed), params))
    start = time.perf_counter()
    outs = await asyncio.gather(*(engine.sample(i, prompt, cfg.n, params) for i, prompt, params in calls))
    seconds = time.perf_counter() - start
    sequences = [s for out in outs for s in out.sequences]
    return {
        "tokens": sum(len(s.tokens) for s in sequences),
        "seconds": seconds,
        "stopped_early": sum(s.stop_reason == "stop" for s in sequences),
    }


async def measure_decode(
    engine: Any, cfg: SamplerBenchConfig, ids: Sequence[str], advance: Callable[[], None]
) -> list[dict[str, Any]]:
    await decode_round(engine, cfg, ids[: cfg.pool], 99_999)  # warm-up: every adapter, first-request costs
    advance()
    rounds: dict[int, list[dict[str, float]]] = {k: [] for k in cfg.adapters}
    for rep in range(cfg.repeats):  # the k levels interleave, so drift spreads over all of them
        for k in cfg.adapters:
            rounds[k].append(await decode_round(engine, cfg, ids[:k], rep * 100 + k))
            advance()
    rows = []
    for k in cfg.adapters:
        tokens = sum(r["tokens"] for r in rounds[k])
        seconds = sum(r["seconds"] for r in rounds[k])
        rates = [r["tokens"] / r["seconds"] for r in rounds[k]]
        rows.append(
            {
                "adapters": k,
                "sequences": k * cfg.prompts_per_adapter * cfg.n * cfg.repeats,
                "tokens": tokens,  # over all measured rounds
                "seconds": seconds,
                # The median round: one round stalled by a noisy neighbour must not decide the figure.
                "tokens_per_s": statistics.median(rates),
                "tokens_per_s_total": tokens / seconds,
                "round_tokens_per_s": rates,
                "tokens_per_sequence": tokens / (k * cfg.prompts_per_adapter * cfg.n * cfg.repeats),
                "stopped_early": sum(r["stopped_early"] for r in rounds[k]),
                "round_seconds": [r["seconds"] for r in rounds[k]],
            }
        )
    return rows


async def rl_steps(
    engine: Any, cfg: SamplerBenchConfig, adapter_index: int, advance: Callable[[], None]
) -> list[dict[str, Any]]:
    """One adapter's GRPO-shaped steps; the timings and mismatch of each measured one."""
    from hotlora.agents.grpo import group_advantages, logprob_mismatch, rl_datum
    from hotlora.engine.types import AdamParams, SamplingParams

    adapter_id = f"bench-{adapter_index}"
    vocab = engine.runner.base.vocab_size
    measured = []
    for step in range(cfg.rl_warmup + cfg.rl_steps):
        seed = cfg.seed * 1_000_003 + 5_000_000 + adapter_index * 1_000 + step
        prompt = make_prompt(vocab, cfg.prompt_tokens, seed)
        params = SamplingParams(max_tokens=cfg.max_tokens, temperature=1.0, seed=seed)
        t0 = time.perf_counter()
        group = await engine.sample(adapter_id, prompt, cfg.rl_group, params)
        t1 = time.perf_counter()
        advantages = group_advantages([reward(s.tokens) for s in group.sequences])
        datums = [rl_datum(prompt, s.tokens, s.logprobs, a) for s, a in zip(group.sequences, advantages, strict=True)]
        fb = await engine.forward_backward(adapter_id, datums, "importance_sampling")
        t2 = time.perf_counter()
        out = await engine.optim_step(adapter_id, AdamParams(learning_rate=cfg.learning_rate, grad_clip_norm=1.0))
        t3 = time.perf_counter()
        if step >= cfg.rl_warmup:
            sampled = [lp for s in group.sequences for lp in s.logprobs]
            measured.append(
                {
                    "step_s": t3 - t0,
                    "sample_s": t1 - t0,
                    "forward_backward_s": t2 - t1,
                    "optim_step_s": t3 - t2,  # weight sync included
                    "weight_sync_s": out.weight_sync_s,
                    "mismatch": logprob_mismatch(datums, fb),
                    "sampler_logprob": statistics.fmean(sampled),
                }
            )
        advance()
    return measured


async def measure_rl(engine: Any, cfg: SamplerBenchConfig, advance: Callable[[], None]) -> dict[str, Any]:
    start = time.perf_counter()
    per_adapter = await asyncio.gather(*(rl_steps(engine, cfg, i, advance) for i in range(cfg.rl_adapters)))
    wall = time.perf_counter() - start
    steps = [s for runs in per_adapter for s in runs]
    syncs = [s["weight_sync_s"] for s in steps if s["weight_sync_s"] is not None]
    mismatches = [s["mismatch"] for s in steps]
    return {
        "adapters": cfg.rl_adapters,
        "steps": len(steps),
        "group": cfg.rl_group,
        "step_s": statistics.fmean(s["step_s"] for s in steps),
        "step_s_median": statistics.median(s["step_s"] for s in steps),
        "sample_s": statistics.fmean(s["sample_s"] for s in steps),
        "forward_backward_s": statistics.fmean(s["forward_backward_s"] for s in steps),
        "optim_step_s": statistics.fmean(s["optim_step_s"] for s in steps),
        "weight_sync_s": statistics.fmean(syncs) if syncs else None,
        "logprob_mismatch": statistics.fmean(mismatches),
        "logprob_mismatch_max": max(mismatches),
        # Near 0 means a saturated model (every sampled token certain): then a zero mismatch proves nothing.
        "sampler_logprob_mean": statistics.fmean(s["sampler_logprob"] for s in steps),
        "wall_s": wall,  # warm-up steps included
    }


@contextlib.asynccontextmanager
async def started_engine(
    backend: str, model: str, cfg: SamplerBenchConfig, progress: Progress, label: str, times: dict[str, float]
) -> AsyncIterator[tuple[Any, list[str]]]:
    """An engine of ``backend`` on ``model`` with the adapter pool created; load/start/create times into ``times``."""
    from hotlora.engine.core import Engine, EngineConfig
    from hotlora.engine.types import LoraSpec
    from hotlora.engine.vllm_sampler import VllmSettings

    task = progress.add_task(f"{backend}: starting the engine ({label})", total=1)
    started = time.perf_counter()
    config = EngineConfig(sampler=backend, vllm=VllmSettings(gpu_memory_utilization=cfg.gpu_memory_utilization))
    engine = Engine.from_pretrained(model, dtype=cfg.dtype, device=cfg.device, config=config)
    times[f"{label}_load_s"] = time.perf_counter() - started
    started = time.perf_counter()
    await engine.start()
    times[f"{label}_start_s"] = time.perf_counter() - started
    try:
        ids = [f"bench-{i}" for i in range(cfg.pool)]
        started = time.perf_counter()
        for i, adapter_id in enumerate(ids):
            await engine.create_adapter(adapter_id, LoraSpec(rank=cfg.rank, alpha=2.0 * cfg.rank, seed=i))
        times[f"{label}_create_adapter_s"] = (time.perf_counter() - started) / len(ids)
        progress.update(task, completed=1)
        yield engine, ids
    finally:
        await engine.close()


async def measure_backend(
    backend: str, decode_model: str, rl_model: str, cfg: SamplerBenchConfig, progress: Progress
) -> dict[str, Any]:
    """Decode on ``decode_model``, then RL steps on ``rl_model``, each on a fresh engine of ``backend``."""
    times: dict[str, float] = {}
    async with started_engine(backend, decode_model, cfg, progress, "decode", times) as (engine, ids):
        task = progress.add_task(f"{backend}: decode", total=1 + cfg.repeats * len(cfg.adapters))
        decode = await measure_decode(engine, cfg, ids, lambda: progress.advance(task))
    async with started_engine(backend, rl_model, cfg, progress, "rl", times) as (engine, _):
        task = progress.add_task(f"{backend}: RL steps", total=cfg.rl_adapters * (cfg.rl_warmup + cfg.rl_steps))
        rl = await measure_rl(engine, cfg, lambda: progress.advance(task))
    return {
        "load_s": times["rl_load_s"],
        "start_s": times["rl_start_s"],
        "create_adapter_s": times["rl_create_adapter_s"],
        "times": times,
        "decode": decode,
        "rl_step": rl,
    }


# ----- comparison -----


def compare(backends: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``vllm_vs_native_decode`` and ``recommendation``, from the measured numbers only."""
    if not all(b in backends for b in BACKENDS):
        return {}
    native = {row["adapters"]: row["tokens_per_s"] for row in backends["native"]["decode"]}
    vllm = {row["adapters"]: row["tokens_per_s"] for row in backends["vllm"]["decode"]}
    ratios = {str(k): vllm[k] / native[k] for k in sorted(native)}
    decode_gmean = math.exp(statistics.fmean(math.log(r) for r in ratios.values()))
    step = {b: backends[b]["rl_step"]["step_s"] for b in BACKENDS}
    faster_decode = "vllm" if decode_gmean > 1.0 else "native"
    faster_step = min(BACKENDS, key=lambda b: step[b])
    reason = (
        f"decode: vLLM/native tokens/s {decode_gmean:.2f}x (geometric mean over k = {', '.join(ratios)}); "
        f"RL step with {backends['native']['rl_step']['adapters']} adapters: native {step['native']:.2f} s, "
        f"vLLM {step['vllm']:.2f} s (weight sync {backends['vllm']['rl_step']['weight_sync_s'] or 0.0:.3f} s); "
        f"vLLM also costs {backends['vllm']['start_s']:.1f} s to start"
    )
    return {
        "vllm_vs_native_decode": ratios,
        "vllm_vs_native_decode_gmean": decode_gmean,
        "vllm_vs_native_rl_step": step["native"] / step["vllm"],  # > 1: vLLM's steps are faster
        "recommendation": {
            "decode": faster_decode,
            "rl_step": faster_step,
            "sampler": faster_step,  # the RL loop is the workload the engine serves
            "reason": reason,
        },
    }


# ----- report -----


def markdown_section(result: dict[str, Any]) -> str:
    m = result["machine"]
    cfg = result["config"]
    backends = result["backends"]
    names = list(backends)
    lines = [
        f"### sampler: {result['timestamp']}",
        "",
        f"- command: `{result['command']}`",
        f"- commit: `{result['commit']}`",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}"
        f"{', vllm ' + result['vllm_version'] if result.get('vllm_version') else ''}",
        f"- models: decode `{result['decode_model']}`, RL `{result['model']}` ({cfg['dtype']}, {cfg['device']}); "
        f"LoRA rank {cfg['rank']}; "
        f"decode: per adapter "
        f"{cfg['prompts_per_adapter']} requests x n={cfg['n']}, prompt {cfg['prompt_tokens']} tokens, "
        f"max_tokens {cfg['max_tokens']}, temperature 1, median of {cfg['repeats']} rounds per k after a warm-up "
        f"round; "
        f"RL: group {cfg['rl_group']}, {cfg['rl_steps']} steps per adapter after {cfg['rl_warmup']} warm-up"
        f"{'; quick' if cfg['quick'] else ''}",
    ]
    ratio = "vllm_vs_native_decode" in result
    header = [f"{b} tok/s" for b in names] + [f"{b} tokens/seq" for b in names] + (["vLLM/native"] if ratio else [])
    lines += ["", "| adapters | " + " | ".join(header) + " |", "|---:|" + "---:|" * len(header)]
    for i, row in enumerate(backends[names[0]]["decode"]):
        cells = [f"{backends[b]['decode'][i]['tokens_per_s']:,.0f}" for b in names]
        cells += [f"{backends[b]['decode'][i]['tokens_per_sequence']:.1f}" for b in names]
        if ratio:
            cells.append(f"{result['vllm_vs_native_decode'][str(row['adapters'])]:.2f}")
        lines.append(f"| {row['adapters']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| backend | load s | start s | RL adapters | step s | sample s | fwd/bwd s | optim s | weight sync s "
        "| mismatch (mean) | mismatch (max) | sampler logprob |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in names:
        rl = backends[b]["rl_step"]
        sync = "-" if rl["weight_sync_s"] is None else f"{rl['weight_sync_s']:.3f}"
        lines.append(
            f"| {b} | {backends[b]['load_s']:.1f} | {backends[b]['start_s']:.1f} | {rl['adapters']} "
            f"| {rl['step_s']:.3f} | {rl['sample_s']:.3f} | {rl['forward_backward_s']:.3f} | {rl['optim_step_s']:.3f} "
            f"| {sync} | {rl['logprob_mismatch']:.2e} | {rl['logprob_mismatch_max']:.2e} "
            f"| {rl['sampler_logprob_mean']:.2f} |"
        )
    if "recommendation" in result:
        rec = result["recommendation"]
        lines += ["", f"Faster here: decode **{rec['decode']}**, RL step **{rec['rl_step']}** ({rec['reason']})."]
    return "\n".join(lines) + "\n"


def append_docs(result: dict[str, Any], path: Path | None = None) -> Path:
    return append_section(markdown_section(result), DOCS_INTRO, path)


def print_summary(console: Console, result: dict[str, Any]) -> None:
    for name, backend in result["backends"].items():
        decode = ", ".join(f"k={r['adapters']} {r['tokens_per_s']:,.0f}" for r in backend["decode"])
        rl = backend["rl_step"]
        sync = "" if rl["weight_sync_s"] is None else f", weight sync {rl['weight_sync_s']:.3f} s"
        console.print(
            f"{name}: start {backend['start_s']:.1f} s; decode tok/s {decode}; RL step {rl['step_s']:.3f} s{sync}, "
            f"mismatch {rl['logprob_mismatch']:.2e}"
        )
    if "recommendation" in result:
        console.print(f"recommendation: {result['recommendation']['sampler']} ({result['recommendation']['reason']})")


# ----- running it -----


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Point fd 1 at stderr while engines run (vLLM's processes inherit it), so stdout carries only the JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run_bench(
    cfg: SamplerBenchConfig,
    model: str,
    backends: Sequence[str],
    command: str,
    console: Console,
    decode_model: str | None = None,
) -> dict[str, Any]:
    """Both backends one after the other; the result dict, provenance included."""
    from hotlora.engine.event_loop import run

    result: dict[str, Any] = {
        "bench": "sampler",
        "timestamp": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": command,
        "commit": git_commit(),
        "machine": machine_info(torch.device(cfg.device)),
        "model": model,
        "decode_model": decode_model or model,
        "config": dataclasses.asdict(cfg),
    }
    if "vllm" in backends:
        import vllm

        result["vllm_version"] = vllm.__version__

    async def measure() -> dict[str, dict[str, Any]]:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with progress_bar(*columns, console=console, transient=False) as progress:
            return {b: await measure_backend(b, decode_model or model, model, cfg, progress) for b in backends}

    started = time.perf_counter()
    with stdout_to_stderr():
        result["backends"] = run(measure())
    result["bench_seconds"] = time.perf_counter() - started
    result.update(compare(result["backends"]))
    return result


# ----- CLI -----


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapters", default=None, help="decode: adapters at once, comma-separated (default 1,2,4,8)")
    parser.add_argument("--rl-adapters", type=int, default=None, help="adapters in the RL step (default 4)")
    parser.add_argument("--quick", action="store_true", help="a smoke-test size: adapters 1,2, tiny token counts")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    parser.add_argument("--no-docs", action="store_true", help="do not append a section to docs/benchmarks.md")
    parser.add_argument("--model", default=None, help="RL-step base model (default: the pretrained RL base)")
    parser.add_argument(
        "--decode-model", default=None, help="decode base model (default: the random tiny model of the same shape)"
    )
    parser.add_argument("--native-only", action="store_true", help="measure the native sampler alone (no vLLM)")


def config_from_args(args: argparse.Namespace) -> SamplerBenchConfig:
    cfg = SamplerBenchConfig.quick_config() if args.quick else SamplerBenchConfig()
    if args.adapters is not None:
        cfg = dataclasses.replace(cfg, adapters=parse_adapters(args.adapters))
    if args.rl_adapters is not None:
        if args.rl_adapters < 1:
            raise SystemExit(f"error: --rl-adapters must be >= 1, got {args.rl_adapters}")
        cfg = dataclasses.replace(cfg, rl_adapters=args.rl_adapters)
    return cfg


def command_line(args: argparse.Namespace) -> str:
    """The command as typed from the shell; rebuilt from ``args`` when called in process (tests)."""
    if sys.argv and Path(sys.argv[0]).name in ("hotlora", "cli.py", "__main__.py") and "sampler" in sys.argv:
        return shlex.join(["hotlora", *sys.argv[1:]])
    argv = ["hotlora", "bench", "sampler"]
    for flag in ("adapters", "rl_adapters", "model", "decode_model"):
        if getattr(args, flag, None) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    flags = ("quick", "json", "no_docs", "native_only")
    return shlex.join(argv + [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f, False)])


def main(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    cfg = config_from_args(args)
    backends: tuple[str, ...] = ("native",) if args.native_only else BACKENDS
    if "vllm" in backends:
        from hotlora.engine.vllm_sampler import INSTALL_HINT, vllm_import_error

        if (error := vllm_import_error()) is not None:
            console.print(
                f"error: vLLM does not import ({error}), so the vLLM sampler cannot be measured; "
                f"{INSTALL_HINT}, or pass --native-only",
                markup=False,
            )
            return 2
    quiet_client_logs()
    if args.model:
        model = args.model
    else:
        # Not the random tiny model: it is saturated (it repeats a token with probability 1), so every
        # logprob is 0 and the train/inference mismatch could not show anything.
        from hotlora.models.model_init import rl_base_model

        with stdout_to_stderr():  # a first build shows its progress bar, never on stdout
            model = rl_base_model()
    if args.decode_model:
        decode_model = args.decode_model
    else:
        # The RL base ends most completions at EOS within ~6 tokens, so decode would mostly time request
        # overheads; the random tiny model of the same shape never emits EOS and decodes every max_token.
        from hotlora.models.tiny_model import TinyModelRecipe, ensure_tiny_model

        decode_model = str(ensure_tiny_model(TinyModelRecipe()))
    command = command_line(args)
    console.print(f"[bold]hotlora bench sampler[/bold]  {escape(command)}")
    interrupt_on_sigterm()
    try:
        result = run_bench(cfg, model, backends, command, console, decode_model)
    except KeyboardInterrupt:
        console.print("interrupted: the engines were closed; no results written")
        return 130
    print_summary(console, result)
    if not args.no_docs:
        console.print(f"appended to {append_docs(result)}")
    if args.json:
        print(json.dumps(result), flush=True)
    return 0
