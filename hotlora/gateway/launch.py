"""``hotlora gateway``: the Tinker gateway as a process, alone or with its own broker and engine.

With ``--bootstrap`` it fronts the engines already serving that broker under ``--topic-prefix``. Without
one it starts the embedded broker and one engine process on ``--model`` (so ``hotlora gateway --model DIR``
alone is a Tinker endpoint on one machine), and stops both when it stops. Either way it serves only
once an engine has announced itself (its ``engine_status`` event), and takes the base model's name from
that announcement unless ``--base-model`` names it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the server imports torch: only ``hotlora gateway`` itself pays for it, not ``hotlora --help``
    from hotlora.gateway.server import GatewayConfig
    from hotlora.schemas import EngineStatus

ENGINE_READY_TIMEOUT_S = 300.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--bootstrap", default=env("HOTLORA_BOOTSTRAP"), help="Kafka HOST:PORT (default: embedded broker and engine)"
    )
    parser.add_argument("--topic-prefix", default=env("HOTLORA_TOPIC_PREFIX", "hotlora"))
    parser.add_argument(
        "--host", default=env("HOTLORA_GATEWAY_HOST", "127.0.0.1"), help="listen address (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, default=int(env("HOTLORA_GATEWAY_PORT", "8000")), help="listen port (default 8000)"
    )
    parser.add_argument("--model", default=env("HOTLORA_MODEL"), help="base model directory of the engine this starts")
    parser.add_argument(
        "--base-model", default=None, help="the name clients use for the base model (default: the engine's)"
    )
    parser.add_argument(
        "--checkpoint-dir", default=None, help="the started engine's checkpoint_dir (default: a temp dir)"
    )
    parser.add_argument("--engine-args", default="", help="extra flags for the started engine, e.g. '--dtype float32'")
    parser.add_argument(
        "--api-keys", default=env("HOTLORA_GATEWAY_KEYS"),
        help="JSON file of api key -> principal or {principal, token}; default: every key is its own tenant",
    )  # fmt: skip
    parser.add_argument("--long-poll", type=float, default=20.0, help="seconds one retrieve_future may wait")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds per engine request attempt")
    parser.add_argument("--frozen-idle", type=float, default=300.0, help="retire a sampler copy idle this long (s)")
    parser.add_argument("--frozen-per-model", type=int, default=4, help="sampler copies kept per training model")


async def engine_status(bootstrap: str, topic_prefix: str, timeout: float = ENGINE_READY_TIMEOUT_S) -> EngineStatus:
    """A running engine's status on ``{prefix}.metrics``: the latest one there, or the first one to come."""
    from aiokafka import AIOKafkaConsumer

    from hotlora.engine.kafka.security import kafka_kwargs
    from hotlora.schemas import EngineStatus, SchemaError, Topics, decode

    topic = Topics(topic_prefix).metrics
    # Subscribed (without a group) once the topic exists: the consumer learns its partitions and reads each
    # from its start. Not before: asking Tansu for a missing topic's metadata creates it, with the broker's
    # default partition count rather than the engine's. (A consumer that assigns by hand must know the
    # partitions, which aiokafka never learns for a topic created after it started.)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        metadata_max_age_ms=500,
        **kafka_kwargs(),
    )
    await consumer.start()
    try:
        async with asyncio.timeout(timeout):
            while topic not in await consumer.topics():  # every topic's metadata: creates nothing
                await asyncio.sleep(0.2)
            consumer.subscribe([topic])
            latest: EngineStatus | None = None
            while latest is None or latest.state != "running":
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for record in records:
                        with contextlib.suppress(SchemaError):
                            message = decode(record.value)
                            if isinstance(message, EngineStatus):
                                latest = message
            return latest
    finally:
        await consumer.stop()


async def serve(config: GatewayConfig, host: str, port: int, stop: asyncio.Event) -> None:
    from aiohttp import web

    from hotlora.gateway.server import Gateway, build_app

    gateway = Gateway(config)
    runner = web.AppRunner(build_app(gateway), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        print(f"hotlora gateway: Tinker API at http://{host}:{port} (base model {config.base_model})", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


async def run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    broker = engine = None
    workdir = Path(tempfile.mkdtemp(prefix="hotlora-gateway-"))
    try:
        bootstrap = args.bootstrap
        if not bootstrap:
            from hotlora.engine.kafka.broker import EmbeddedBroker
            from hotlora.models.model_init import rl_base_model

            model = args.model or rl_base_model()
            broker = EmbeddedBroker(log_path=workdir / "broker.log").start()
            bootstrap = broker.bootstrap
            checkpoints = args.checkpoint_dir or str(workdir / "checkpoints")
            argv = [
                *(sys.executable, "-m", "hotlora.cli", "engine", "--bootstrap", bootstrap, "--model", model),
                *("--topic-prefix", args.topic_prefix, "--checkpoint-dir", checkpoints),
                *shlex.split(args.engine_args),
            ]
            with open(workdir / "engine.log", "wb") as engine_log:  # the child keeps its own copy
                engine = await asyncio.create_subprocess_exec(
                    *argv, stdout=engine_log, stderr=asyncio.subprocess.STDOUT
                )
            print(
                f"hotlora gateway: embedded broker {bootstrap}, engine pid {engine.pid}, logs in {workdir}", flush=True
            )
        waiting = asyncio.create_task(engine_status(bootstrap, args.topic_prefix))
        stopping = asyncio.create_task(stop.wait())
        watch = [waiting, stopping] + ([asyncio.create_task(engine.wait())] if engine else [])
        done, _ = await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
        for task in watch:
            if task not in done:
                task.cancel()
        if waiting not in done:
            if stopping in done:
                return 0
            print(f"error: the engine exited before it was ready; see {workdir / 'engine.log'}", file=sys.stderr)
            return 1
        status = waiting.result()
        from hotlora.gateway.server import GatewayConfig
        from hotlora.gateway.tenants import KeyMap

        config = GatewayConfig(
            bootstrap=bootstrap,
            topic_prefix=args.topic_prefix,
            base_model=args.base_model or status.model,
            keys=KeyMap.from_file(args.api_keys) if args.api_keys else None,
            request_timeout=args.request_timeout,
            long_poll_s=args.long_poll,
            frozen_idle_s=args.frozen_idle,
            frozen_per_model=args.frozen_per_model,
        )
        await serve(config, args.host, args.port, stop)
        return 0
    finally:
        if engine is not None and engine.returncode is None:
            engine.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(engine.wait(), 60)
            except TimeoutError:
                engine.kill()
                await engine.wait()
        if broker is not None:
            broker.stop()


def main(args: argparse.Namespace) -> int:
    from hotlora.engine.event_loop import run as run_loop

    return int(run_loop(run(args)))
