"""The ``hotlora`` command line: one entry point, one sub-command per job."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hotlora.agents.grpo import GrpoConfig

DEMO_STEPS = 120  # 4 experiments: about 4 minutes on a 2-core CPU


def _cmd_model_init(args: argparse.Namespace) -> int:
    from hotlora.models.model_init import init_model, init_shape
    from hotlora.schemas.errors import InvalidRequest

    try:
        if args.shape is None:
            if args.layers is not None or args.vocab is not None or args.dtype is not None:
                raise InvalidRequest("--layers, --vocab and --dtype apply only with --shape")
            path = init_model(
                Path(args.dir), pretrain=args.pretrain, seed=args.seed, steps=args.steps, force=args.force
            )
        else:
            if args.pretrain or args.steps is not None:
                raise InvalidRequest("--shape builds a random-init model: --pretrain and --steps do not apply")
            path = init_shape(
                Path(args.dir), args.shape, layers=args.layers, vocab=args.vocab, dtype=args.dtype or "bfloat16",
                device=args.device, seed=args.seed, force=args.force,
            )  # fmt: skip
    except InvalidRequest as err:
        raise SystemExit(f"error: {err.message}") from None
    print(f"model ready at {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.in_process:
        from hotlora.models.sft_demo import run_sft_demo

        return run_sft_demo(model_dir=args.model, steps=args.steps or 100, seed=args.seed)
    from hotlora.demo import main as demo_main

    return demo_main(
        args.experiments, args.steps or DEMO_STEPS, args.bootstrap, args.model, args.json, args.png, args.eval_every,
        args.seed, args.task, args.sampler,
    )  # fmt: skip


def _cmd_agent(args: argparse.Namespace) -> int:
    import socket

    from hotlora.models.tiny_model import TinyModelRecipe, ensure_tiny_model

    if not args.bootstrap:
        raise SystemExit("error: an agent needs a broker: pass --bootstrap HOST:PORT or set HOTLORA_BOOTSTRAP")
    # HotLoraClient reads these (and the Kafka TLS/SASL variables) wherever the agent creates one.
    os.environ.update({k: v for k, v in (("HOTLORA_PRINCIPAL", args.principal), ("HOTLORA_TOKEN", args.token)) if v})
    model = args.model or str(ensure_tiny_model(TinyModelRecipe()))
    if args.task == "sft" or (args.task is None and not args.config):
        from hotlora.agents.sft_agent import SftAgentConfig
        from hotlora.agents.sft_agent import main as sft_main

        config = SftAgentConfig(
            bootstrap=args.bootstrap,
            adapter_id=args.adapter or socket.gethostname(),
            model=model,
            steps=args.steps if args.steps is not None else 60,
            rank=args.rank if args.rank is not None else 8,
            learning_rate=args.lr if args.lr is not None else 3e-3,
            seed=args.seed if args.seed is not None else 0,
            topic_prefix=args.topic_prefix,
        )
        return sft_main(config)
    from hotlora.agents.grpo import main as grpo_main

    return grpo_main(grpo_config(args), args.bootstrap, model, args.topic_prefix, resume=args.resume)


def grpo_config(args: argparse.Namespace) -> GrpoConfig:
    """``GrpoConfig`` from its defaults, then ``--config FILE.toml`` (keys are its field names), then flags."""
    import dataclasses
    import socket

    import tomllib

    from hotlora.agents.grpo import GrpoConfig
    from hotlora.agents.tasks import TASKS

    values: dict[str, object] = {}
    if args.config:
        with open(args.config, "rb") as f:
            values.update(tomllib.load(f))
    known = {f.name for f in dataclasses.fields(GrpoConfig)}
    if unknown := sorted(set(values) - known):
        raise SystemExit(f"error: unknown key(s) in {args.config}: {', '.join(unknown)}")
    flags = {
        "task": args.task,
        "steps": args.steps,
        "rank": args.rank,
        "learning_rate": args.lr,
        "seed": args.seed,
        "group_size": args.group_size,
        "batch_size": args.batch_size,
        "loss": args.loss,
        "std_normalize": args.std_normalize,
        "eval_every": args.eval_every,
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.adapter or "adapter_id" not in values:
        values["adapter_id"] = args.adapter or socket.gethostname()
    if values.get("task") not in (*TASKS, "continual"):
        raise SystemExit(f"error: unknown task {values.get('task')!r} (available: sft, continual, {', '.join(TASKS)})")
    return GrpoConfig(**values)  # type: ignore[arg-type]


def _cmd_plot(args: argparse.Namespace) -> int:
    from hotlora.plot import main as plot_main

    return plot_main(args.bootstrap, args.topic_prefix, args.jsonl, args.out, hlr=args.hlr)


def _cmd_engine(args: argparse.Namespace) -> int:
    from hotlora.engine.kafka.service import main as engine_main
    from hotlora.engine.kafka.service_config import from_sources

    try:
        config = from_sources(args)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if not config.model:  # the default base: the cached tiny model, built on first use
        from hotlora.models.tiny_model import TinyModelRecipe, ensure_tiny_model

        config = dataclasses.replace(config, model=str(ensure_tiny_model(TinyModelRecipe())))
    return engine_main(config)


def _cmd_gateway(args: argparse.Namespace) -> int:
    from hotlora.gateway.launch import main as gateway_main

    return gateway_main(args)


def _cmd_topics(args: argparse.Namespace) -> int:
    import asyncio

    from hotlora.engine.kafka.admin import ensure_topics, list_topics
    from hotlora.schemas.topics import Topics

    bootstrap = args.bootstrap or os.environ.get("HOTLORA_BOOTSTRAP")
    prefix = args.topic_prefix or os.environ.get("HOTLORA_TOPIC_PREFIX") or "hotlora"
    partitions = int(args.partitions or os.environ.get("HOTLORA_PARTITIONS") or 4)
    if not bootstrap:  # an embedded broker would be empty and gone at exit: topics needs a running one
        raise SystemExit("error: pass --bootstrap HOST:PORT or set HOTLORA_BOOTSTRAP")
    if args.topics_command == "create":
        created = asyncio.run(ensure_topics(bootstrap, Topics(prefix), partitions))
        for name in Topics(prefix).all():
            print(f"{name}\t{'created' if name in created else 'exists'}")
        return 0
    for name in asyncio.run(list_topics(bootstrap, None if args.all else prefix)):
        print(name)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from hotlora.status import main as status_main

    if not args.bootstrap:
        raise SystemExit("error: pass --bootstrap HOST:PORT or set HOTLORA_BOOTSTRAP")
    return status_main(args.bootstrap, args.topic_prefix, args.window, args.json)


def _cmd_bench_core(args: argparse.Namespace) -> int:
    from hotlora.benchmarks.core import main as bench_core_main

    return bench_core_main(args)


def _cmd_bench_hop(args: argparse.Namespace) -> int:
    from hotlora.benchmarks.hop import main as bench_hop_main

    return bench_hop_main(args)


def _cmd_bench_experiments(args: argparse.Namespace) -> int:
    from hotlora.benchmarks.experiments import main as bench_experiments_main

    return bench_experiments_main(args)


def _cmd_bench_sampler(args: argparse.Namespace) -> int:
    from hotlora.benchmarks.sampler import main as bench_sampler_main

    return bench_sampler_main(args)


def _cmd_bench_soak(args: argparse.Namespace) -> int:
    from hotlora.benchmarks.soak import main as bench_soak_main

    return bench_soak_main(args)


def _cmd_bench_gateway(args: argparse.Namespace) -> int:
    from hotlora.benchmarks.gateway import main as bench_gateway_main

    return bench_gateway_main(args)


def _cmd_bench_fairness(args: argparse.Namespace) -> int:
    from hotlora.benchmarks.fairness import main as bench_fairness_main

    return bench_fairness_main(args)


def _cmd_bench_startup(args: argparse.Namespace) -> int:
    from hotlora.benchmarks.startup import main as bench_startup_main

    return bench_startup_main(args)


def _cmd_bench_migration(args: argparse.Namespace) -> int:
    from hotlora.benchmarks.migration import main as bench_migration_main

    return bench_migration_main(args)


# `hotlora bench NAME`: each module hotlora.benchmarks.NAME has add_arguments(parser) and main(args).
BENCHES = (
    ("core", "mixed vs looped vs single-adapter forward/backward, and decode", _cmd_bench_core),
    ("hop", "a tiny request through Kafka vs in process: p50 and p99", _cmd_bench_hop),
    (
        "experiments",
        "N RL experiments cold / warm one at a time vs all at once on one hot engine",
        _cmd_bench_experiments,
    ),
    (
        "sampler",
        "native vs vLLM sampler: decode tokens/s over k adapters and one RL step with weight sync",
        _cmd_bench_sampler,
    ),
    (
        "soak",
        "N tenants' mixed RL loop for M minutes: the engine's RSS over time, answered requests, errors",
        _cmd_bench_soak,
    ),
    (
        "gateway",
        "the Tinker gateway's per-call overhead over the direct Kafka client: a tiny call and an RL step",
        _cmd_bench_gateway,
    ),
    (
        "startup",
        "an engine process from spawn to serving, readiness seen, first answer; and kill -9 to serving again",
        _cmd_bench_startup,
    ),
    (
        "migration",
        "engines join and die under N agents: each migrated adapter's pause, verified run",
        _cmd_bench_migration,
    ),
    (
        "fairness",
        "a victim's RL step alone, under a flooding tenant and among N tenants: slowdown, flooder share, RSS",
        _cmd_bench_fairness,
    ),
)


def benches_named(argv: Sequence[str] | None) -> set[str]:
    """The benchmarks whose options the parser needs: the one a command line names (all without one).

    Each bench module imports torch and transformers (seconds), which no other command needs: ``hotlora
    engine`` joins its consumer group while they import on its loading thread, and ``hotlora status``
    should answer in a blink."""
    names = [name for name, _, _ in BENCHES]
    if argv is None:
        return set(names)
    args = list(argv)
    if "bench" not in args:
        return set()
    named = [arg for arg in args[args.index("bench") + 1 :] if arg in names]
    return set(named[:1])


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``argv``, only the benchmark it names gets its options."""
    parser = argparse.ArgumentParser(prog="hotlora", description="An always-hot engine for multi-LoRA RL.")
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", help="build local base models").add_subparsers(
        dest="model_command", required=True
    )
    init = model.add_parser(
        "init", help="build a tiny model (or, with --shape, a random-init model of a real configuration); no downloads"
    )
    init.add_argument("dir", help="output directory (a Hugging Face model directory)")
    init.add_argument("--pretrain", action="store_true", help="pretrain briefly on the synthetic corpus")
    init.add_argument("--seed", type=int, default=0, help="seed for weights and corpus (default 0)")
    init.add_argument("--steps", type=int, default=None, help="pretraining steps (default 1500 with --pretrain)")
    init.add_argument("--force", action="store_true", help="overwrite DIR if it exists")
    init.add_argument(
        "--shape",
        default=None,
        help="a named real configuration, random init: tiny, qwen3-0.6b, qwen3-4b, llama-3.2-1b",
    )
    init.add_argument("--layers", type=int, default=None, help="with --shape: fewer decoder layers than the original")
    init.add_argument("--vocab", type=int, default=None, help="with --shape: a smaller vocabulary (>= 259)")
    init.add_argument("--dtype", default=None, help="with --shape: weights' dtype on disk (default bfloat16)")
    init.add_argument("--device", default="auto", help="with --shape: where to initialise (auto: cuda if present)")
    init.set_defaults(func=_cmd_model_init)

    demo = commands.add_parser(
        "demo", help="broker + engine + N GRPO agent processes over TCP, each experiment its own adapter"
    )
    demo.add_argument("--experiments", type=int, default=4, help="concurrent experiments (default 4)")
    demo.add_argument(
        "--steps", type=int, default=None, help=f"GRPO steps per experiment (default {DEMO_STEPS}; SFT 100)"
    )
    demo.add_argument("--eval-every", type=int, default=None, help="steps between held-out evals (default steps/6)")
    demo.add_argument("--bootstrap", default=os.environ.get("HOTLORA_BOOTSTRAP"), help="use this broker")
    demo.add_argument("--model", default=os.environ.get("HOTLORA_MODEL"), help="base model directory")
    demo.add_argument("--json", default=None, metavar="PATH", help="write per-experiment results as JSON")
    demo.add_argument("--png", default=None, metavar="PATH", help="reward-curve PNG (default: in the run's dir)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--task", default=None, help="run every experiment on this task (e.g. continual) instead of the catalogue's"
    )
    demo.add_argument(
        "--sampler",
        choices=("native", "vllm", "auto"),
        default=os.environ.get("HOTLORA_SAMPLER", "native"),
        help="the engine's rollout backend (default native; see docs/benchmarks.md 'bench sampler')",
    )
    demo.add_argument("--in-process", action="store_true", help="SFT of two adapters in this process, no Kafka")
    demo.set_defaults(func=_cmd_demo)

    agent = commands.add_parser("agent", help="run one experiment as an agent process against a broker")
    agent.add_argument(
        "--task", default=os.environ.get("HOTLORA_TASK"), help="sft, continual or a task name (default sft)"
    )
    agent.add_argument("--adapter", default=os.environ.get("HOTLORA_ADAPTER"), help="adapter id (default: hostname)")
    agent.add_argument(
        "--resume",
        action="store_true",
        default=os.environ.get("HOTLORA_RESUME") == "1",
        help="GRPO: continue the adapter the engine still holds (after an agent crash) from the step its "
        "metrics reached, instead of creating it [env HOTLORA_RESUME=1]",
    )
    agent.add_argument("--bootstrap", default=os.environ.get("HOTLORA_BOOTSTRAP"), help="Kafka HOST:PORT")
    agent.add_argument("--model", default=os.environ.get("HOTLORA_MODEL"), help="base model dir (its tokenizer)")
    agent.add_argument("--topic-prefix", default=os.environ.get("HOTLORA_TOPIC_PREFIX", "hotlora"))
    steps_env = os.environ.get("HOTLORA_STEPS")
    agent.add_argument("--steps", type=int, default=int(steps_env) if steps_env else None)
    agent.add_argument("--rank", type=int, default=None)
    agent.add_argument("--lr", type=float, default=None)
    agent.add_argument("--seed", type=int, default=None)
    agent.add_argument("--config", default=None, metavar="FILE.toml", help="GRPO settings; flags override it")
    agent.add_argument("--group-size", type=int, default=None, help="completions per prompt")
    agent.add_argument("--batch-size", type=int, default=None, help="prompts per step")
    agent.add_argument("--loss", choices=("importance_sampling", "ppo"), default=None)
    agent.add_argument("--std-normalize", action="store_true", default=None, help="divide advantages by group std")
    agent.add_argument("--eval-every", type=int, default=None, help="steps between held-out evals")
    agent.add_argument("--temperature", type=float, default=None)
    agent.add_argument("--max-tokens", type=int, default=None)
    agent.add_argument("--principal", default=None, help="tenant that owns the adapter [env HOTLORA_PRINCIPAL]")
    agent.add_argument("--token", default=None, help="the principal's secret; prefer the env [env HOTLORA_TOKEN]")
    agent.set_defaults(func=_cmd_agent)

    plot = commands.add_parser("plot", help="reward and accuracy curves per experiment to a PNG")
    plot.add_argument("--bootstrap", default=os.environ.get("HOTLORA_BOOTSTRAP"), help="read the metrics topic")
    plot.add_argument("--topic-prefix", default=os.environ.get("HOTLORA_TOPIC_PREFIX", "hotlora"))
    plot.add_argument("--jsonl", default=None, metavar="FILE", help="read an agent's JSON lines instead")
    plot.add_argument("--hlr", default=None, metavar="FILE", help="read a recording (hotlora record) instead")
    plot.add_argument("--out", default="rewards.png", help="PNG path (default rewards.png)")
    plot.set_defaults(func=_cmd_plot)

    engine = commands.add_parser("engine", help="run the engine service: consume requests, publish results")
    from hotlora.engine.kafka.service_config import add_arguments as add_engine_arguments

    add_engine_arguments(engine)
    engine.set_defaults(func=_cmd_engine)

    gateway = commands.add_parser(
        "gateway", help="a Tinker-compatible HTTP API (the tinker SDK and cookbook) in front of the engine"
    )
    from hotlora.gateway.launch import add_arguments as add_gateway_arguments

    add_gateway_arguments(gateway)
    gateway.set_defaults(func=_cmd_gateway)

    from hotlora.replay.cli import add_commands as add_replay_commands

    add_replay_commands(commands)  # record, replay, diff, tail (docs/replay.md)

    topics = commands.add_parser("topics", help="list or create hotlora's Kafka topics")
    topics_commands = topics.add_subparsers(dest="topics_command", required=True)
    for name, text in (("list", "list the topics under the prefix"), ("create", "create the engine's topics")):
        sub = topics_commands.add_parser(name, help=text)
        sub.add_argument("--bootstrap", default=None, help="Kafka HOST:PORT [env HOTLORA_BOOTSTRAP]")
        sub.add_argument("--topic-prefix", default=None, help="topic prefix [env HOTLORA_TOPIC_PREFIX]")
        if name == "create":
            sub.add_argument("--partitions", default=None, help="partitions per topic (default 4)")
        else:
            sub.add_argument("--all", action="store_true", help="every topic, not only the prefix's")
        sub.set_defaults(func=_cmd_topics, partitions=None, all=False)

    from hotlora.top import add_top_parser

    add_top_parser(commands)

    status = commands.add_parser("status", help="live engines: capacity, load, and which engine owns which adapter")
    status.add_argument("--bootstrap", default=os.environ.get("HOTLORA_BOOTSTRAP"), help="Kafka HOST:PORT")
    status.add_argument("--topic-prefix", default=os.environ.get("HOTLORA_TOPIC_PREFIX", "hotlora"))
    status.add_argument(
        "--window", type=float, default=30.0, help="an engine is live if it sent a heartbeat this recently (s)"
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    status.set_defaults(func=_cmd_status)

    bench = commands.add_parser("bench", help="benchmarks (results go to docs/benchmarks.md)")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    needed = benches_named(argv)
    for name, text, command in BENCHES:
        sub = bench_commands.add_parser(name, help=text)
        if name in needed:
            importlib.import_module(f"hotlora.benchmarks.{name}").add_arguments(sub)
        sub.set_defaults(func=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
