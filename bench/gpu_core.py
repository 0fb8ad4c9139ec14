"""``hotlora bench core`` on a GPU: a random-init model of a real configuration (default Qwen3-4B), bf16.

The model is built in memory from ``hotlora.models.shapes`` (no downloads, the engine's byte tokenizer padded to
the shape's vocabulary), and the measurement is exactly ``hotlora.benchmarks.core.run_core``: mixed vs
looped vs single-adapter forward/backward for K = 1..16 at equal total tokens, and decode mixed over 8
adapters vs one. ``peak_memory_gib`` is the device's peak allocation over the whole run.

    python bench/gpu_core.py --json out/gpu_core.json [--shape qwen3-4b] [--tokens 8192] [--docs]
    python bench/gpu_core.py --device cpu --shape tiny --quick   # the CPU rehearsal
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from rich.console import Console

from hotlora.benchmarks.core import CoreBenchConfig, append_docs, provenance, run_core, runner_config
from hotlora.benchmarks.core import print_summary as print_core_summary
from hotlora.engine.base_model import BaseModel
from hotlora.engine.runner import ModelRunner
from hotlora.models.shapes import SHAPES, ModelShape, build_shape_model, build_shape_tokenizer, get_shape


def build_runner(
    cfg: CoreBenchConfig, shape: ModelShape, device: torch.device, dtype: torch.dtype, gradient_checkpointing: bool
) -> ModelRunner:
    model = build_shape_model(shape, dtype, device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = build_shape_tokenizer(shape.vocab_size)
    base = BaseModel(model=model, tokenizer=tokenizer, path=f"random-init {shape.name}", device=device, dtype=dtype)
    config = runner_config(cfg)
    if gradient_checkpointing and hasattr(config, "gradient_checkpointing"):
        config.gradient_checkpointing = True
    return ModelRunner(base, config)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", default="out/gpu_core.json", help="where to write the results")
    parser.add_argument("--shape", default="qwen3-4b", choices=sorted(SHAPES), help="model configuration")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the shape has")
    parser.add_argument("--tokens", type=int, default=8192, help="total tokens per training step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16, help="mean LoRA rank")
    parser.add_argument("--min-len", type=int, default=128, help="shortest datum")
    parser.add_argument("--max-len", type=int, default=512, help="longest datum")
    parser.add_argument("--decode-rows", type=int, default=64)
    parser.add_argument("--decode-prompt", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--device", default="cuda", help="cuda[:N] (the point of this script) or cpu (rehearsal)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--quick", action="store_true", help="a tiny rehearsal: 2048 tokens, short decode")
    parser.add_argument("--docs", action="store_true", help="also append a section to docs/benchmarks.md")
    return parser.parse_args(argv)


def bench_config(args: argparse.Namespace) -> CoreBenchConfig:
    if args.quick:
        return CoreBenchConfig(
            tokens=1024, repeats=1, warmup=1, rank=4, min_len=32, max_len=64, decode_rows=8, decode_tokens=4
        )
    return CoreBenchConfig(
        tokens=args.tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        rank=args.rank,
        min_len=args.min_len,
        max_len=args.max_len,
        decode_rows=args.decode_rows,
        decode_prompt=args.decode_prompt,
        decode_tokens=args.decode_tokens,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "bench/gpu_core.py needs a CUDA device, and torch sees none (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}). Rehearse with --device cpu --shape tiny, or run `hotlora bench core`.",
            file=sys.stderr,
        )
        return 2
    console = Console(stderr=True)
    shape = get_shape(args.shape).with_overrides(layers=args.layers)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    cfg = bench_config(args)
    runner = build_runner(cfg, shape, device, dtype, args.gradient_checkpointing)
    command = shlex.join(["python", "bench/gpu_core.py", *(sys.argv[1:] if argv is None else argv)])
    result = provenance(runner, f"random-init {shape.name}, {shape.num_layers} layers ({shape.source})", command)
    console.print(f"[bold]bench/gpu_core.py[/bold]  {result['machine'].get('gpu', device)}  commit {result['commit']}")
    result.update(run_core(runner, cfg, console))
    result["shape"] = shape.name
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print_core_summary(console, result)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.json}")
    if args.docs:
        console.print(f"appended to {append_docs(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
