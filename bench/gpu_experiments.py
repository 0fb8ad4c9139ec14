"""``hotlora bench experiments`` on a GPU: cold vs warm vs concurrent GRPO throughput at a real shape.

The base is a random-init model of a real configuration (default Qwen3-4B, ``hotlora.models.shapes``) in bf16,
written to a temporary directory with the engine's tokenizer padded to the shape's vocabulary (no
downloads). Every experiment is GRPO-shaped: per step ``--batch-size`` prompts x ``--group-size``
samples of up to ``--max-tokens`` new tokens, reward minus group mean, an ``importance_sampling``
``forward_backward`` and an ``optim_step``. A random-init base earns no task reward, so the experiments
use the dense ``digits`` reward (the share of digit characters; filler tokens decode to ``<12345>``):
nearly every group has signal and trains, as in a real run. No held-out evals and no reward band: this
measures throughput only (the CPU run on the pretrained tiny base checks rewards).

The measurement is exactly ``hotlora.benchmarks.experiments.run_bench``, with the engine on the device.
By default the warm and concurrent phases run before the cold one, and the times measured so far are
written to ``<out>.partial.json`` after each phase, so a time-limited session still keeps them.

    python bench/gpu_experiments.py --out out/gpu_experiments.json [--shape qwen3-4b] [--steps 2]
    python bench/gpu_experiments.py --device cpu --shape tiny --experiments 2 --steps 1 --max-tokens 8
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from hotlora.benchmarks.experiments import Plan, parse_sweep, quiet_client_logs, run_bench
from hotlora.models.shapes import SHAPES, get_shape, write_shape


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", default="out/gpu_experiments.json", help="where to write the JSON results")
    parser.add_argument("--shape", default="qwen3-4b", choices=sorted(SHAPES), help="model configuration")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the shape has")
    parser.add_argument("--device", default="cuda", help="cuda (the point of this script) or cpu (rehearsal)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--experiments", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="GRPO steps per experiment")
    parser.add_argument("--sweep", default=None, help="extra concurrency levels (default: only 1 and --experiments)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per GRPO step")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=256, help="new tokens per sample, at most")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of every experiment")
    parser.add_argument("--max-decode-rows", type=int, default=512, help="the engine's decode batch rows")
    parser.add_argument("--cold-first", action="store_true", help="run the cold phase first (the CPU bench's order)")
    parser.add_argument("--engine-arg", action="append", default=[], help="extra `hotlora engine` flag (repeatable)")
    parser.add_argument("--bootstrap", default=None, help="use this broker (default: embedded Tansu)")
    return parser.parse_args(argv)


def plan_from(args: argparse.Namespace) -> Plan:
    if args.experiments < 1 or args.steps < 1:
        raise SystemExit("error: --experiments and --steps must be >= 1")
    levels = set(parse_sweep(args.sweep)) if args.sweep else set()
    sweep = tuple(sorted(levels | {1, args.experiments}))
    overrides: dict[str, Any] = {
        "task": "digits",
        "batch_size": args.batch_size,
        "group_size": args.group_size,
        "max_tokens": args.max_tokens,
        "rank": args.rank,
    }
    return Plan(
        args.experiments,
        args.steps,
        solo_seeds=1,
        sweep=sweep,
        overrides=overrides,
        rewards=False,
        cold_first=args.cold_first,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"skipped: no CUDA (torch {torch.__version__} sees no GPU); rehearse with --device cpu --shape tiny")
        return 0
    plan = plan_from(args)
    console = Console(stderr=True)
    quiet_client_logs()
    shape = get_shape(args.shape).with_overrides(layers=args.layers)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.json")
    workdir = Path(tempfile.mkdtemp(prefix="hotlora-gpu-experiments-"))
    try:
        with console.status(f"writing a random-init {shape.name} ({shape.num_layers} layers, {dtype})"):
            model = str(write_shape(shape, workdir / "model", dtype=dtype, device=device))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        engine_args = ["--device", args.device, "--dtype", args.dtype, "--max-decode-rows", str(args.max_decode_rows)]
        engine_args += args.engine_arg
        command = shlex.join(["python", "bench/gpu_experiments.py", *(sys.argv[1:] if argv is None else argv)])

        def save_partial(times: dict[str, Any]) -> None:
            partial.write_text(json.dumps({"command": command, "shape": shape.name, **times}, indent=2) + "\n")

        result = run_bench(plan, model, args.bootstrap, command, console, engine_args, device, on_phase=save_partial)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["model"] = f"random-init {shape.name}, {shape.num_layers} layers, {args.dtype} ({shape.source})"
    result["shape"] = shape.name
    result["workload"] = {
        "prompts_per_step": args.batch_size,
        "samples_per_prompt": args.group_size,
        "max_tokens": args.max_tokens,
        "rank": args.rank,
        "reward": "digits (dense; random-init base: throughput only)",
    }
    console.print(
        f"cold_ratio = {result['cold_ratio']:.2f}, warm_ratio = {result['warm_ratio']:.2f} "
        f"(T1 {result['T1_seconds']:.1f} s, T2 {result['T2_seconds']:.1f} s, T3 {result['T3_seconds']:.1f} s), "
        f"steps trained {result['steps_trained']}"
    )
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
