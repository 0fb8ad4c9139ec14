"""The ``hotlora`` command line: one entry point, one sub-command per job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _cmd_model_init(args: argparse.Namespace) -> int:
    from hotlora.engine.model_init import init_model

    path = init_model(Path(args.dir), pretrain=args.pretrain, seed=args.seed, steps=args.steps, force=args.force)
    print(f"model ready at {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from hotlora.engine.sft_demo import run_sft_demo

    return run_sft_demo(model_dir=args.model, steps=args.steps, seed=args.seed)


def _cmd_bench_core(args: argparse.Namespace) -> int:
    from hotlora.benchmarks.core import main as bench_core_main

    return bench_core_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hotlora", description="An always-hot engine for multi-LoRA RL.")
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", help="build local base models").add_subparsers(
        dest="model_command", required=True
    )
    init = model.add_parser("init", help="build a tiny Llama-architecture model and tokenizer (no downloads)")
    init.add_argument("dir", help="output directory (a Hugging Face model directory)")
    init.add_argument("--pretrain", action="store_true", help="pretrain briefly on the synthetic corpus")
    init.add_argument("--seed", type=int, default=0, help="seed for weights and corpus (default 0)")
    init.add_argument("--steps", type=int, default=None, help="pretraining steps (default 1500 with --pretrain)")
    init.add_argument("--force", action="store_true", help="overwrite DIR if it exists")
    init.set_defaults(func=_cmd_model_init)

    demo = commands.add_parser("demo", help="train two adapters at once in mixed micro-batches (SFT)")
    demo.add_argument("--model", default=None, help="base model directory (default: the cached tiny model)")
    demo.add_argument("--steps", type=int, default=100, help="optimizer steps per adapter (default 100)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

    bench = commands.add_parser("bench", help="benchmarks (results go to docs/benchmarks.md)")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    core = bench_commands.add_parser("core", help="mixed vs looped vs single-adapter forward/backward, and decode")
    from hotlora.benchmarks.core import add_arguments as add_core_arguments

    add_core_arguments(core)
    core.set_defaults(func=_cmd_bench_core)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
