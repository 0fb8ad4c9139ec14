"""``hotlora bench core``: what mixing adapters in one micro-batch costs, and what it saves.

For K = 1, 2, 4, 8, 16 adapters sharing the same total tokens per step, side by side in one run:

- **mixed**: one ``forward_backward_many`` whose K calls share one micro-batch (hotlora's way);
- **loop**: the same datums as K separate ``forward_backward`` calls, one adapter at a time;
- **single**: the same datums as one call of one adapter: the floor a mixed batch is held to.

Then decode: the same rows (requests with ``n`` samples each) either spread over 8 adapters or all on
one adapter, through ``NativeSampler``. Repetitions interleave the variants (rotating their order)
after a warm-up, and every figure is a median. ``run_core`` takes any ``ModelRunner``, so
``bench/gpu_core.py`` measures a larger model on a GPU with exactly this code.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from hotlora.engine.runner import ModelRunner, RunnerConfig
from hotlora.engine.types import Datum, ForwardBackward, LoraSpec
from hotlora.progress import progress_bar

KS: tuple[int, ...] = (1, 2, 4, 8, 16)
HEADLINE_K = 8
DECODE_ADAPTERS = 8
# Targets on a CPU; "<=" targets are ratios that should stay low, ">=" ones high.
TARGETS: dict[str, tuple[str, float]] = {
    "mixed_over_single": ("<=", 1.15),
    "loop_over_mixed": (">=", 2.0),
    "decode_mixed_over_single": ("<=", 1.15),
}


def repo_root() -> Path:
    """The source checkout this module runs from, else the working directory."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


@contextlib.contextmanager
def logs_off_stdout(json_output: bool) -> Iterator[None]:
    """With ``--json``, stdout carries the one JSON object: the in-process clients' log lines go to
    stderr, warnings only, for the duration; the logging setup is restored after."""
    saved = structlog.get_config()
    if json_output:
        structlog.configure(
            wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        )
    try:
        yield
    finally:
        structlog.configure(**saved)


def append_section(section: str, intro: str = "", path: Path | None = None) -> Path:
    """Append one run's section to ``docs/benchmarks.md`` (every bench's record of what it measured).

    ``intro`` (a bench's ``## `hotlora bench X` `` header and what it measures) is written once, before
    the bench's first section; runs of three or more blank lines are folded to one.
    """
    path = path or repo_root() / "docs" / "benchmarks.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if intro and intro.splitlines()[0] not in text:
        text = text.rstrip("\n") + "\n\n" + intro
    path.write_text(text.rstrip("\n") + "\n\n" + re.sub(r"\n{3,}", "\n\n", section))
    return path


DOCS_HEADER = """# Benchmarks

Each section below was appended by one benchmark run and names the command, machine and commit it
measured. Numbers from different machines are not comparable; ratios within one section are.

## `hotlora bench core`

Training steps hold the total tokens fixed and vary K, the number of adapters they serve:

- **mixed**: one `forward_backward_many` whose K calls share one micro-batch (rows grouped by adapter,
  each LoRA layer adds one low-rank delta per adapter run).
- **loop**: the same datums as K separate `forward_backward` calls, one adapter at a time.
- **single**: the same datums as one call of one adapter, the floor for a mixed batch.
- `mixed_over_single` (at K=8) is the price of mixing; `loop_over_mixed` is what mixing saves over
  serving tenants one by one. At K=1 mixed and single are the same work, so that row's mixed/single
  is the run's noise floor.

Decode runs the same rows (GRPO-style requests of `n` samples, greedy) through `NativeSampler`, spread
over 8 adapters or all on one; `decode_mixed_over_single` is the ratio of their time per token.
`bench/gpu_core.py` runs the same measurement on a GPU with a random-init Qwen3-0.6B-shaped model.
"""


@dataclass
class CoreBenchConfig:
    """Shapes of one run. Datum lengths are drawn in ``[min_len, max_len]`` (RL-ish rollouts)."""

    tokens: int = 4096
    repeats: int = 11
    warmup: int = 2
    rank: int = 16
    min_len: int = 64
    max_len: int = 128
    decode_rows: int = 32
    decode_prompt: int = 32
    decode_tokens: int = 64
    seed: int = 0

    @classmethod
    def quick(cls) -> CoreBenchConfig:
        return cls(tokens=2048, repeats=3, warmup=1, decode_rows=16, decode_tokens=16)


# ----- workload -----


def adapter_specs(rank: int, count: int = max(KS)) -> list[LoraSpec]:
    """All-linear adapters whose ranks cycle around ``rank`` (mean ``rank``): heterogeneous tenants."""
    cycle = [rank, max(1, rank // 2), rank + rank // 2, rank]
    return [LoraSpec(rank=cycle[i % len(cycle)], alpha=2.0 * rank, targets="all-linear", seed=i) for i in range(count)]


def make_datums(cfg: CoreBenchConfig, vocab: int) -> list[Datum]:
    """Rollout-like datums totalling exactly ``cfg.tokens`` tokens: a quarter prompt, the rest scored."""
    gen = torch.Generator().manual_seed(cfg.seed)
    lengths: list[int] = []
    while sum(lengths) < cfg.tokens:
        lengths.append(int(torch.randint(cfg.min_len, cfg.max_len + 1, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - cfg.tokens
    if lengths[-1] < 2:
        lengths[-2] += lengths.pop()
    if len(lengths) < max(KS):
        raise ValueError(f"--tokens {cfg.tokens} gives {len(lengths)} datums; K={max(KS)} needs at least {max(KS)}")
    datums = []
    for length in lengths:
        tokens = torch.randint(3, vocab, (length + 1,), generator=gen)
        weights = torch.ones(length)
        weights[: length // 4] = 0.0
        logprobs = -torch.rand(length, generator=gen) * 3.0
        advantages = torch.full((length,), float(torch.randn(1, generator=gen))) * weights
        datums.append(Datum.create(tokens[:-1], tokens[1:], weights, logprobs, advantages))
    return datums


def split_calls(datums: Sequence[Datum], adapter_ids: Sequence[str]) -> list[ForwardBackward]:
    """Near-equal contiguous shares of the datums, one call per adapter."""
    k = len(adapter_ids)
    bounds = [round(i * len(datums) / k) for i in range(k + 1)]
    return [
        ForwardBackward(adapter_id, list(datums[bounds[i] : bounds[i + 1]]), "importance_sampling")
        for i, adapter_id in enumerate(adapter_ids)
    ]


# ----- timing -----


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], object]) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _zero_grads(runner: ModelRunner) -> None:
    for adapter in runner.adapters.list():
        adapter.optimizer.zero_grad()


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def measure_training(
    runner: ModelRunner, cfg: CoreBenchConfig, ids: Sequence[str], advance: Callable[[], None]
) -> list[dict[str, Any]]:
    datums = make_datums(cfg, runner.base.vocab_size)
    single = [ForwardBackward(ids[0], list(datums), "importance_sampling")]
    work: dict[int, dict[str, Callable[[], object]]] = {}
    for k in KS:
        calls = split_calls(datums, ids[:k])
        work[k] = {
            "mixed": lambda calls=calls: runner.forward_backward_many(calls),
            "loop": lambda calls=calls: [runner.forward_backward(c.adapter_id, c.datums, c.loss_fn) for c in calls],
            "single": lambda: runner.forward_backward_many(single),
        }
    samples: dict[int, dict[str, list[float]]] = {k: {m: [] for m in work[k]} for k in KS}
    for rep in range(cfg.warmup + cfg.repeats):
        for k in KS:
            modes = list(work[k])
            shift = rep % len(modes)
            for mode in modes[shift:] + modes[:shift]:  # rotate so no variant always runs first
                _zero_grads(runner)
                seconds = _timed(runner.device, work[k][mode])
                if rep >= cfg.warmup:
                    samples[k][mode].append(seconds)
            advance()
    _zero_grads(runner)
    rows = []
    for k in KS:
        mixed, loop, single_s = (_median(samples[k][m]) for m in ("mixed", "loop", "single"))
        fastest = {m: min(samples[k][m]) for m in samples[k]}
        rows.append(
            {
                "k": k,
                "tokens": cfg.tokens,
                "datums": len(datums),
                "mixed_s": mixed,
                "loop_s": loop,
                "single_s": single_s,
                "mixed_tokens_per_s": cfg.tokens / mixed,
                "mixed_over_single": mixed / single_s,
                "loop_over_mixed": loop / mixed,
                # Interference only ever adds time, so ratios of the fastest runs are a second opinion.
                "mixed_over_single_min": fastest["mixed"] / fastest["single"],
                "loop_over_mixed_min": fastest["loop"] / fastest["mixed"],
                "samples_s": samples[k],
            }
        )
    return rows


def _decode_once(runner: ModelRunner, cfg: CoreBenchConfig, adapter_ids: Sequence[str]) -> dict[str, float]:
    """All requests admitted at once; returns prefill-step time, decode time and tokens after prefill."""
    from hotlora.engine.sampler import NativeSampler
    from hotlora.engine.types import Sample, SamplingParams

    sampler = NativeSampler(runner, max_rows=cfg.decode_rows)
    per_request = cfg.decode_rows // DECODE_ADAPTERS
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    params = SamplingParams(max_tokens=cfg.decode_tokens, temperature=0.0)
    for i in range(DECODE_ADAPTERS):
        prompt = torch.randint(3, runner.base.vocab_size, (cfg.decode_prompt,), generator=gen).tolist()
        sampler.add(Sample(adapter_ids[i % len(adapter_ids)], prompt, per_request, params, request_id=f"req-{i}"))
    step_times: list[float] = []
    generated = stopped = 0
    while sampler.has_unfinished():
        _sync(runner.device)
        start = time.perf_counter()
        finished = sampler.step()
        _sync(runner.device)
        step_times.append(time.perf_counter() - start)
        for _, sequences in finished:
            generated += sum(len(s.tokens) for s in sequences)
            stopped += sum(s.stop_reason == "stop" for s in sequences)
    rows = per_request * DECODE_ADAPTERS
    # The first step prefills every prompt and decodes one token per row.
    return {
        "prefill_s": step_times[0],
        "decode_s": sum(step_times[1:]),
        "decode_tokens": generated - rows,
        "stopped_early": stopped,
        "steps": len(step_times),
    }


def measure_decode(
    runner: ModelRunner, cfg: CoreBenchConfig, ids: Sequence[str], advance: Callable[[], None]
) -> dict[str, Any]:
    variants = {"mixed": list(ids[:DECODE_ADAPTERS]), "single": [ids[0]]}
    samples: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for rep in range(cfg.warmup + cfg.repeats):
        order = list(variants) if rep % 2 == 0 else list(variants)[::-1]
        for variant in order:
            result = _decode_once(runner, cfg, variants[variant])
            if rep >= cfg.warmup:
                samples[variant].append(result)
        advance()
    out: dict[str, Any] = {
        "rows": cfg.decode_rows // DECODE_ADAPTERS * DECODE_ADAPTERS,
        "adapters_mixed": DECODE_ADAPTERS,
        "prompt_tokens": cfg.decode_prompt,
        "max_tokens": cfg.decode_tokens,
    }
    per_token, fastest = {}, {}
    for variant, runs in samples.items():
        per_token[variant] = _median([r["decode_s"] / max(1, r["decode_tokens"]) for r in runs])
        fastest[variant] = min(r["decode_s"] / max(1, r["decode_tokens"]) for r in runs)
        out[f"{variant}_tokens_per_s"] = 1.0 / per_token[variant]
        out[f"{variant}_prefill_s"] = _median([r["prefill_s"] for r in runs])
        out[f"{variant}_stopped_early"] = max(r["stopped_early"] for r in runs)
        out[f"{variant}_samples"] = runs
    out["mixed_over_single"] = per_token["mixed"] / per_token["single"]
    out["mixed_over_single_min"] = fastest["mixed"] / fastest["single"]
    return out


def run_core(runner: ModelRunner, cfg: CoreBenchConfig, console: Console | None = None) -> dict[str, Any]:
    """The whole measurement on ``runner`` (which must have no adapters yet); returns the results dict."""
    console = console or Console(stderr=True)
    ids = []
    for i, spec in enumerate(adapter_specs(cfg.rank)):
        ids.append(f"bench-{i}")
        runner.create_adapter(ids[-1], spec)
    reps = cfg.warmup + cfg.repeats
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with progress_bar(*columns, console=console) as progress:
        train_task = progress.add_task("forward/backward", total=reps * len(KS))
        training = measure_training(runner, cfg, ids, lambda: progress.advance(train_task))
        decode_task = progress.add_task("decode", total=reps)
        decode = measure_decode(runner, cfg, ids, lambda: progress.advance(decode_task))
    headline = next(row for row in training if row["k"] == HEADLINE_K)
    return {
        "mixed_over_single": headline["mixed_over_single"],
        "loop_over_mixed": headline["loop_over_mixed"],
        "decode_mixed_over_single": decode["mixed_over_single"],
        "targets": {name: {"op": op, "value": value} for name, (op, value) in TARGETS.items()},
        "config": dataclasses.asdict(cfg),
        "adapter_ranks": [spec.rank for spec in adapter_specs(cfg.rank)],
        "token_budget": runner.config.token_budget,
        "lora_backend": runner.lora.backend,
        "forward_backward": training,
        "decode": decode,
    }


# ----- provenance -----


def git_commit(start: Path | None = None) -> str:
    """HEAD's commit read from ``.git`` directly (no git process).

    Outside a checkout (a copied working tree on a lent GPU machine, say) ``HOTLORA_COMMIT`` names it,
    else ``unknown``.
    """
    found = _git_head(start)
    return os.environ.get("HOTLORA_COMMIT", found) if found == "unknown" else found


def _git_head(start: Path | None) -> str:
    here = (start or repo_root()).resolve()
    for root in (here, *here.parents):
        git = root / ".git"
        if not git.is_dir():
            continue
        try:
            head = (git / "HEAD").read_text().strip()
            if not head.startswith("ref: "):
                return head
            ref = head[5:]
            if (git / ref).is_file():
                return (git / ref).read_text().strip()
            packed = git / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
            return f"unborn ({ref})"
        except OSError:
            return "unknown"
    return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def typed_command(bench: str, fallback: str) -> str:
    """The command as typed when ``hotlora bench <bench>`` runs from the shell, else ``fallback``
    (called in-process, by a test or another bench)."""
    argv = sys.argv[1:]
    return shlex.join(["hotlora", *argv]) if bench in argv else fallback


def result_header(bench: str, command: str, device: torch.device) -> dict[str, Any]:
    """What every bench result starts with (and its docs section shows): the bench, the UTC time, the
    command, the commit and the machine."""
    return {
        "bench": bench,
        "timestamp": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "commit": git_commit(),
        "machine": machine_info(device),
    }


def command_line(args: argparse.Namespace) -> str:
    """The command as typed when run from the shell; rebuilt from ``args`` when called in-process."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("hotlora", "cli.py", "__main__.py") and "core" in argv:
        return shlex.join(["hotlora", *argv[1:]])
    rebuilt = ["hotlora", "bench", "core"]
    for flag in ("json", "model", "tokens", "repeats", "rank", "device", "dtype", "threads"):
        value = getattr(args, flag, None)
        if value is not None:
            rebuilt += [f"--{flag}", str(value)]
    rebuilt += [f"--{flag.replace('_', '-')}" for flag in ("no_docs", "quick") if getattr(args, flag, False)]
    return shlex.join(rebuilt)


# ----- reporting -----


def _verdict(name: str, value: float) -> str:
    op, target = TARGETS[name]
    ok = value <= target if op == "<=" else value >= target
    return f"{'pass' if ok else 'MISS'} ({op} {target:g})"


def render_table(result: dict[str, Any]) -> Table:
    table = Table(title="forward/backward, equal total tokens per step")
    for header in ("K", "mixed ms", "loop ms", "single ms", "mixed tok/s", "mixed/single", "loop/mixed"):
        table.add_column(header, justify="right")
    for row in result["forward_backward"]:
        table.add_row(
            str(row["k"]),
            f"{row['mixed_s'] * 1e3:.1f}",
            f"{row['loop_s'] * 1e3:.1f}",
            f"{row['single_s'] * 1e3:.1f}",
            f"{row['mixed_tokens_per_s']:,.0f}",
            f"{row['mixed_over_single']:.3f}",
            f"{row['loop_over_mixed']:.2f}",
        )
    return table


def markdown_section(result: dict[str, Any]) -> str:
    machine = result["machine"]
    decode = result["decode"]
    cfg = result["config"]
    lines = [
        f"### core: {result['timestamp']}",
        "",
        f"- command: `{result['command']}`",
        f"- commit: `{result['commit']}`",
        f"- machine: {machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch threads), "
        f"device `{machine['device']}`{', ' + machine['gpu'] if 'gpu' in machine else ''}, torch {machine['torch']}",
        f"- model: `{result['model']}` ({result['dtype']}); {cfg['tokens']} tokens per step in "
        f"{result['forward_backward'][0]['datums']} datums of {cfg['min_len']}-{cfg['max_len']} tokens; "
        f"adapter ranks {sorted(set(result['adapter_ranks']))} (mean {cfg['rank']}), importance-sampling loss; "
        f"median of {cfg['repeats']} after {cfg['warmup']} warm-up",
        "",
        "| K | mixed ms | loop ms | single ms | mixed tok/s | mixed/single | loop/mixed |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["forward_backward"]:
        lines.append(
            f"| {row['k']} | {row['mixed_s'] * 1e3:.1f} | {row['loop_s'] * 1e3:.1f} | {row['single_s'] * 1e3:.1f} "
            f"| {row['mixed_tokens_per_s']:,.0f} | {row['mixed_over_single']:.3f} | {row['loop_over_mixed']:.2f} |"
        )
    floor = result["forward_backward"][0]["mixed_over_single"]
    headline = next(row for row in result["forward_backward"] if row["k"] == HEADLINE_K)
    lines += [
        "",
        f"Noise floor: K=1 mixed/single (identical work) = {floor:.3f}. Ratios of the fastest runs instead of "
        f"medians: mixed/single {headline['mixed_over_single_min']:.3f}, loop/mixed "
        f"{headline['loop_over_mixed_min']:.3f}, decode {decode['mixed_over_single_min']:.3f}.",
        "",
        f"Decode ({decode['rows']} rows, prompt {decode['prompt_tokens']}, {decode['max_tokens']} new tokens, "
        f"greedy): mixed over {decode['adapters_mixed']} adapters {decode['mixed_tokens_per_s']:,.0f} tok/s, "
        f"single adapter {decode['single_tokens_per_s']:,.0f} tok/s.",
        "",
        "| ratio | value | target |",
        "|---|---:|---|",
    ]
    for name in TARGETS:
        lines.append(f"| `{name}` | {result[name]:.3f} | {_verdict(name, result[name])} |")
    return "\n".join(lines) + "\n"


def append_docs(result: dict[str, Any], path: Path | None = None) -> Path:
    return append_section(markdown_section(result), DOCS_HEADER, path)


def print_summary(console: Console, result: dict[str, Any]) -> None:
    console.print(render_table(result))
    decode = result["decode"]
    console.print(
        f"decode: mixed {decode['mixed_tokens_per_s']:,.0f} tok/s, single {decode['single_tokens_per_s']:,.0f} tok/s"
    )
    for name in TARGETS:
        console.print(f"{name} = {result[name]:.3f}  {_verdict(name, result[name])}")


# ----- CLI -----


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="write the full results as JSON")
    parser.add_argument("--model", metavar="DIR", help="base model directory (default: the cached tiny model)")
    parser.add_argument("--tokens", type=int, help="total tokens per training step (default 4096, quick 2048)")
    parser.add_argument("--repeats", type=int, help="measured repetitions per variant (default 11, quick 3)")
    parser.add_argument("--rank", type=int, default=16, help="mean LoRA rank; adapters cycle r, r/2, 3r/2, r")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--no-docs", action="store_true", help="do not append a section to docs/benchmarks.md")
    parser.add_argument("--quick", action="store_true", help="smaller, shorter run (smoke test)")


def config_from_args(args: argparse.Namespace) -> CoreBenchConfig:
    cfg = CoreBenchConfig.quick() if args.quick else CoreBenchConfig()
    overrides = {"tokens": args.tokens, "repeats": args.repeats, "rank": args.rank}
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def runner_config(cfg: CoreBenchConfig) -> RunnerConfig:
    # Room for the whole step in one micro-batch: "mixed" must mean ONE forward/backward.
    datums = cfg.tokens // cfg.min_len + 1
    return RunnerConfig(token_budget=max(8192, datums * cfg.max_len))


def finish(result: dict[str, Any], json_path: str | None, write_docs: bool, console: Console) -> None:
    """Print, and write the JSON and the docs section."""
    print_summary(console, result)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {json_path}")
    if write_docs:
        console.print(f"appended to {append_docs(result)}")


def provenance(runner: ModelRunner, model: str, command: str) -> dict[str, Any]:
    return {
        **result_header("core", command, runner.device),
        "model": model,
        "dtype": str(runner.base.dtype).removeprefix("torch."),
    }


def main(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    cfg = config_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        from hotlora.models.tiny_model import TinyModelRecipe, ensure_tiny_model

        model = str(ensure_tiny_model(TinyModelRecipe()))
    command = command_line(args)
    console.print(f"[bold]hotlora bench core[/bold]  {command}")
    runner = ModelRunner.from_pretrained(model, dtype=args.dtype, device=args.device, config=runner_config(cfg))
    result = provenance(runner, model, command)
    console.print(f"commit {result['commit']}, {result['machine']['cpu']}, device {result['machine']['device']}")
    result.update(run_core(runner, cfg, console))
    finish(result, args.json, not args.no_docs, console)
    return 0
