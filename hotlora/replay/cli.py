"""The ``record``, ``replay``, ``diff`` and ``tail`` sub-commands of ``hotlora`` (flags and exit codes)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

T = TypeVar("T")


def _bootstrap(value: str | None) -> str:
    bootstrap = value or os.environ.get("HOTLORA_BOOTSTRAP")
    if not bootstrap:
        raise SystemExit("error: pass --bootstrap HOST:PORT or set HOTLORA_BOOTSTRAP")
    return bootstrap


def _until_interrupted(main: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """Run ``main(stop)``; Ctrl-C or SIGTERM sets ``stop`` so it can finish its file and report."""

    async def runner() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        return await main(stop)

    return asyncio.run(runner())


@contextlib.contextmanager
def _engine_logs_to_stderr(level: str) -> Iterator[None]:
    """The in-process engine's structlog lines go to stderr at ``level``, leaving stdout to the report.

    The previous structlog configuration is restored after, so a caller (a test, an embedding
    program) keeps its own; the stream is looked up per line, never cached.
    """
    import logging

    import structlog

    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise SystemExit(f"error: unknown log level {level!r}")
    previous = structlog.get_config()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        structlog.configure(**previous)


def cmd_record(args: argparse.Namespace) -> int:
    from hotlora.replay.kafka import TopicNotFound
    from hotlora.replay.record import RecordOptions, parse_start, record

    try:
        start = parse_start(args.start) if args.start else None
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    options = RecordOptions(
        bootstrap=_bootstrap(args.bootstrap), topics=args.topics, out=Path(args.out), adapter=args.adapter,
        follow=args.follow, duration=args.duration, progress=not args.quiet,
    )  # fmt: skip
    if start is not None:
        options.start = start
    console = Console(stderr=True, soft_wrap=True)
    try:
        summary = _until_interrupted(lambda stop: record(options, stop, console))
    except TopicNotFound as err:
        raise SystemExit(f"error: {err}") from None
    topics = ", ".join(f"{t} {n}" for t, n in sorted(summary.per_topic.items())) or "none"
    skipped = f", {summary.skipped} left out by --adapter" if summary.skipped else ""
    console.print(
        f"recorded {summary.records} records from {summary.partitions} partitions in {summary.seconds:.1f} s "
        f"-> {summary.path} ({topics}{skipped})"
    )
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from hotlora.replay.format import HlrError
    from hotlora.replay.replay import ReplayError, ReplayOptions, replay

    source = Path(args.recording)
    out = Path(args.out) if args.out else source.with_suffix(".replay.hlr")
    options = ReplayOptions(
        source=source, out=out, adapter=args.adapter, until=args.until, bootstrap=args.bootstrap,
        prefix=args.prefix, model=args.model, checkpoint_dir=args.checkpoint_dir, pace=args.pace,
        timeout=args.timeout, engine=not args.no_engine, dtype=args.dtype, device=args.device,
        session_timeout_ms=args.session_timeout_ms,
    )  # fmt: skip
    console = Console(stderr=True, soft_wrap=True)
    try:
        with _engine_logs_to_stderr(args.log_level):
            summary = asyncio.run(replay(options))
    except (ReplayError, HlrError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    errors = ", ".join(f"{code} {n}" for code, n in sorted(summary.errors.items()))
    console.print(
        f"replayed {summary.sent} requests to prefix {summary.prefix} (model {summary.model}) in "
        f"{summary.seconds:.1f} s: {summary.answered} answered"
        f"{f' (errors: {errors})' if errors else ''} -> {summary.out}"
    )
    if summary.missing:
        console.print(f"[red]{len(summary.missing)} request(s) got no reply[/red]: {', '.join(summary.missing[:10])}")
        return 2
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from hotlora.replay.diff import diff_files, render
    from hotlora.replay.format import HlrError

    try:
        report = diff_files(args.a, args.b, atol=args.atol, common=args.common)
    except (HlrError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    render(report, args.a, args.b, Console(soft_wrap=True), show=args.show)  # soft wrap: greppable lines
    return 0 if report.identical else 1


def cmd_tail(args: argparse.Namespace) -> int:
    from hotlora.replay.tail import TailOptions, tail

    options = TailOptions(
        bootstrap=_bootstrap(args.bootstrap), topics=args.topics or [], prefix=args.prefix, adapter=args.adapter,
        types=args.types or [], max_messages=args.max_messages, timeout=args.timeout,
        from_beginning=args.from_beginning,
    )  # fmt: skip
    _until_interrupted(lambda stop: tail(options, stop=stop))
    return 0


def add_commands(commands: Any) -> None:
    """Register the sub-commands on ``hotlora``'s sub-parser collection."""
    record = commands.add_parser("record", help="record topics' messages to an .hlr file (docs/replay.md)")
    record.add_argument("--topics", nargs="+", required=True, metavar="TOPIC", help="names or patterns, e.g. 'run1.*'")
    record.add_argument("--adapter", default=None, metavar="ID", help="only this adapter's records (and engine_status)")
    record.add_argument(
        "--from", dest="start", default=None, metavar="TIME|OFFSET",
        help="start at an offset (N, offset:N) in every partition, or a time (ISO-8601, epoch ms, ms:N)",
    )  # fmt: skip
    record.add_argument("--follow", action="store_true", help="keep recording after the end offsets seen at start")
    record.add_argument("--duration", type=float, default=None, metavar="S", help="with --follow: stop after S seconds")
    record.add_argument("--bootstrap", default=None, help="Kafka HOST:PORT [env HOTLORA_BOOTSTRAP]")
    record.add_argument("--out", required=True, metavar="FILE.hlr", help="output file")
    record.add_argument("--quiet", action="store_true", help="no progress bar")
    record.set_defaults(func=cmd_record)

    replay = commands.add_parser(
        "replay", help="re-publish a recording's requests to a fresh engine; record the results"
    )
    replay.add_argument("recording", metavar="RUN.hlr")
    replay.add_argument("--adapter", default=None, metavar="ID", help="replay only this adapter's requests")
    replay.add_argument("--until", type=int, default=None, metavar="SEQ", help="only requests with seq <= SEQ")
    replay.add_argument("--bootstrap", default=None, help="use this broker (default: start an embedded one)")
    replay.add_argument("--out", default=None, metavar="FILE.hlr", help="results file (default RUN.replay.hlr)")
    replay.add_argument("--prefix", default=None, help="topic prefix of the replay (default replay-<random>)")
    replay.add_argument("--model", default=None, help="base model dir (default: the one the recording names)")
    replay.add_argument(
        "--checkpoint-dir", default=None, help="the fresh engine's checkpoint dir (default: a temp dir)"
    )
    replay.add_argument(
        "--pace", choices=("recorded", "serial", "burst"), default="recorded",
        help="per adapter: keep the recorded pipelining (default), wait for every reply, or wait for none",
    )  # fmt: skip
    replay.add_argument("--timeout", type=float, default=120.0, metavar="S", help="wait for one reply (default 120)")
    replay.add_argument("--no-engine", action="store_true", help="do not start an engine: one already serves --prefix")
    replay.add_argument("--dtype", default="auto", help="the fresh engine's dtype (default auto: fp32 on CPU)")
    replay.add_argument("--device", default="auto", help="the fresh engine's device (default auto)")
    replay.add_argument(
        "--session-timeout-ms", type=int, default=None,
        help="the engine's consumer session timeout (default 2000 on the embedded broker, else the engine default)",
    )  # fmt: skip
    replay.add_argument("--log-level", default="warning", help="the in-process engine's log level (default warning)")
    replay.set_defaults(func=cmd_replay)

    diff = commands.add_parser("diff", help="compare two .hlr files' results; exit 1 at a divergence")
    diff.add_argument("a", metavar="A.hlr")
    diff.add_argument("b", metavar="B.hlr")
    diff.add_argument("--atol", type=float, default=None, help="float tolerance (default: exact, bit for bit)")
    diff.add_argument("--common", action="store_true", help="compare only results both files hold")
    diff.add_argument("--show", type=int, default=10, metavar="N", help="list N divergences after the first")
    diff.set_defaults(func=cmd_diff)

    tail = commands.add_parser("tail", help="pretty-print live messages from hotlora topics")
    tail.add_argument("--adapter", default=None, metavar="ID", help="only this adapter's messages")
    tail.add_argument(
        "--type", dest="types", nargs="+", default=None, metavar="TYPE", help="message types, e.g. sample"
    )
    tail.add_argument("--topics", nargs="+", default=None, metavar="TOPIC", help="names or patterns (default PREFIX.*)")
    tail.add_argument("--bootstrap", default=None, help="Kafka HOST:PORT [env HOTLORA_BOOTSTRAP]")
    tail.add_argument("--prefix", default=os.environ.get("HOTLORA_TOPIC_PREFIX", "hotlora"), help="topic prefix")
    tail.add_argument("--max-messages", type=int, default=None, metavar="N", help="stop after N messages")
    tail.add_argument("--timeout", type=float, default=None, metavar="S", help="stop after S seconds")
    tail.add_argument("--from-beginning", action="store_true", help="start at each topic's beginning, not its end")
    tail.set_defaults(func=cmd_tail)
