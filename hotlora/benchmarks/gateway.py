"""``hotlora bench gateway``: what the Tinker gateway adds per call over the direct Kafka client, on loopback.

One broker, one engine process and one ``hotlora gateway`` process (in front of that engine). The bench
process sends the same work both ways, alternating, in sequence:

- **info**: ``get_info`` (one HTTP call, answered from one ``list_adapters`` over Kafka), the floor.
- **tiny**: ``forward_backward`` of one 4-token datum. Direct: ``HotLoraClient.forward_backward``. Through
  the gateway: the SDK's two HTTP calls, ``POST /forward_backward`` then ``POST /retrieve_future``.
- **rl step**: sample 4 completions of 8 tokens, ``importance_sampling`` ``forward_backward`` on them and
  ``optim_step`` (submitted together, as the SDK does). Direct: the three ``HotLoraClient`` verbs. Through
  the gateway: ``asample`` + its future, then ``forward_backward`` and ``optim_step`` + their futures. The
  gateway samples a frozen copy (a sampling client) and the direct client the adapter itself: the same
  engine work; no weight sync either way.

The overhead is the difference of the medians (p50) and of the 99th percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from hotlora.benchmarks.core import append_section, git_commit, machine_info
from hotlora.benchmarks.hop import percentile

DOCS_INTRO = """## `hotlora bench gateway`

The same calls through the Tinker gateway (HTTP, as the `tinker` SDK makes them: a POST, then
`retrieve_future`) and straight through `HotLoraClient`, alternating, on loopback: one broker, one engine
process, one `hotlora gateway` process. *get_info* answers at once (one HTTP call over one Kafka
`list_adapters`); *tiny* is a `forward_backward` of one 4-token datum (a POST and its future); *rl step* is
sample (4 x 8 tokens), `importance_sampling` `forward_backward` and `optim_step`. Overhead = gateway minus
direct, per percentile. Target: p50 overhead <= 5 ms.
"""

API_KEY = "tml-bench-gateway"
PROMPT = [5, 9, 17, 23]


def _datum_json(tokens: list[int], logprobs: list[float] | None = None, advantages: list[float] | None = None) -> dict:
    inputs: dict[str, Any] = {"target_tokens": {"data": tokens[1:], "dtype": "int64"}}
    if logprobs is not None:
        inputs["logprobs"] = {"data": logprobs, "dtype": "float32"}
        inputs["advantages"] = {"data": advantages, "dtype": "float32"}
    return {"model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens[:-1]}]}, "loss_fn_inputs": inputs}


class Http:
    """The SDK's calls, made by hand: a POST that answers a future id, then ``retrieve_future`` until done."""

    def __init__(self, base_url: str) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(base_url=base_url, headers={"X-API-Key": API_KEY})

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self.session.post(f"/api/v1/{path}", json=body) as response:
            payload = await response.json()
            if response.status != 200:
                raise RuntimeError(f"{path}: {response.status} {payload}")
            return payload

    async def result(self, request_id: str) -> dict[str, Any]:
        while True:
            async with self.session.post("/api/v1/retrieve_future", json={"request_id": request_id}) as response:
                if response.status == 408:
                    continue
                payload = await response.json()
            if "error" in payload:
                raise RuntimeError(payload["error"])
            return payload

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.result((await self.post(path, body))["request_id"])

    async def close(self) -> None:
        await self.session.close()


async def measure(bootstrap: str | None, model: str, n: int, warmup: int, console: Console) -> dict[str, Any]:
    from hotlora.agents import HotLoraClient
    from hotlora.agents.readiness import wait_for_engine
    from hotlora.demo import reap, terminate
    from hotlora.engine.kafka.broker import EmbeddedBroker, free_port
    from hotlora.engine.types import AdamParams, Datum, SamplingParams

    prefix = f"bench-gateway-{os.getpid()}"
    broker = None if bootstrap else EmbeddedBroker().start()
    address = bootstrap or broker.bootstrap  # type: ignore[union-attr]
    workdir = Path(tempfile.mkdtemp(prefix="hotlora-bench-gateway-"))
    engine = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hotlora.cli", "engine", "--bootstrap", address, "--model", model,
        "--topic-prefix", prefix, "--checkpoint-dir", str(workdir), "--heartbeat-interval", "1",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    port = free_port()
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hotlora.cli", "gateway", "--bootstrap", address, "--topic-prefix", prefix,
        "--port", str(port), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    http: Http | None = None
    drain: asyncio.Task[None] | None = None
    try:
        with console.status("waiting for the engine and the gateway"):
            await wait_for_engine(address, prefix, timeout=180)
            assert gateway.stdout is not None
            async with asyncio.timeout(180):
                while b"Tinker API at" not in await gateway.stdout.readline():
                    pass
        drain = asyncio.create_task(_drain(gateway.stdout))  # its log must never fill the pipe and block it
        http = Http(f"http://127.0.0.1:{port}")
        session = (await http.post("create_session", {"tags": [], "sdk_version": "bench", "user_metadata": {}}))[
            "session_id"
        ]
        model_id = (
            await http.call(
                "create_model",
                {"session_id": session, "model_seq_id": 0, "base_model": model, "lora_config": {"rank": 8, "seed": 0}},
            )
        )["model_id"]
        saved = await http.call("save_weights_for_sampler", {"model_id": model_id, "path": "bench"})
        sampler_path = saved["path"]
        async with HotLoraClient(address, topic_prefix=prefix, request_timeout=60) as client:
            await client.create_adapter("bench-direct", rank=8, alpha=32.0, seed=0)
            tiny_tokens = [5, 9, 17, 23]
            tiny_datum = Datum.from_sequence(tiny_tokens)
            seq = {"gateway": 0}

            async def tiny_direct() -> None:
                await client.forward_backward("bench-direct", [tiny_datum], "cross_entropy")

            async def tiny_gateway() -> None:
                seq["gateway"] += 1
                body = {
                    "model_id": model_id,
                    "seq_id": seq["gateway"],
                    "forward_backward_input": {"data": [_datum_json(tiny_tokens)], "loss_fn": "cross_entropy"},
                }
                await http.call("forward_backward", body)  # type: ignore[union-attr]

            params = SamplingParams(max_tokens=8, temperature=1.0, seed=1)

            async def rl_direct() -> None:
                out = await client.sample("bench-direct", PROMPT, 4, params)
                datums = [
                    Datum.create(
                        (PROMPT + s.tokens)[:-1],
                        (PROMPT + s.tokens)[1:],
                        None,
                        [0.0] * (len(PROMPT) - 1) + s.logprobs,
                        [0.0] * (len(PROMPT) - 1) + [0.5] * len(s.tokens),
                    )
                    for s in out.sequences
                ]
                await asyncio.gather(
                    client.forward_backward("bench-direct", datums, "importance_sampling"),
                    client.optim_step("bench-direct", AdamParams(learning_rate=1e-4, grad_clip_norm=0.0)),
                )

            async def rl_gateway() -> None:
                assert http is not None
                sample = await http.call(
                    "asample",
                    {
                        "model_path": sampler_path, "num_samples": 4,
                        "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
                        "sampling_params": {"max_tokens": 8, "temperature": 1.0, "seed": 1},
                    },
                )  # fmt: skip
                data = []
                for s in sample["sequences"]:
                    tokens, pad = PROMPT + s["tokens"], [0.0] * (len(PROMPT) - 1)
                    data.append(_datum_json(tokens, pad + s["logprobs"], pad + [0.5] * len(s["tokens"])))
                seq["gateway"] += 2
                fb = {
                    "model_id": model_id, "seq_id": seq["gateway"] - 1,
                    "forward_backward_input": {"data": data, "loss_fn": "importance_sampling"},
                }  # fmt: skip
                opt = {"model_id": model_id, "seq_id": seq["gateway"], "adam_params": {"learning_rate": 1e-4}}
                futures = [
                    (await http.post("forward_backward", fb))["request_id"],
                    (await http.post("optim_step", opt))["request_id"],
                ]
                await asyncio.gather(*(http.result(f) for f in futures))

            async def info_direct() -> None:
                await client.list_adapters("bench-direct")

            async def info_gateway() -> None:
                await http.post("get_info", {"model_id": model_id})  # type: ignore[union-attr]

            results: dict[str, Any] = {
                "broker": "external" if bootstrap else "embedded Tansu",
                "n": n,
                "samples_ms": {},
            }
            for name, direct, via in (
                ("info", info_direct, info_gateway),
                ("tiny", tiny_direct, tiny_gateway),
                ("rl_step", rl_direct, rl_gateway),
            ):
                with console.status(f"{name}: {n} calls each way"):
                    samples = await alternate(direct, via, n, warmup)
                results["samples_ms"][name] = samples
                for way in ("direct", "gateway"):
                    results[f"{name}_{way}_p50_ms"] = statistics.median(samples[way])
                    results[f"{name}_{way}_p99_ms"] = percentile(samples[way], 0.99)
                for q in ("p50", "p99"):
                    results[f"{name}_overhead_{q}_ms"] = (
                        results[f"{name}_gateway_{q}_ms"] - results[f"{name}_direct_{q}_ms"]
                    )
            return results
    finally:
        if http is not None:
            await http.close()
        if drain is not None:
            drain.cancel()
        for process in (gateway, engine):
            terminate(process)
            await reap(process)
        if broker is not None:
            broker.stop()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def alternate(direct: Any, via: Any, n: int, warmup: int) -> dict[str, list[float]]:
    """Time the two ways in turn, so drift on a shared machine hits both alike."""
    for _ in range(warmup):
        await direct()
        await via()
    samples: dict[str, list[float]] = {"direct": [], "gateway": []}
    for _ in range(n):
        for way, call in (("direct", direct), ("gateway", via)):
            start = time.perf_counter()
            await call()
            samples[way].append((time.perf_counter() - start) * 1000.0)
    return samples


def markdown_section(result: dict[str, Any]) -> str:
    m = result["machine"]
    rows = "".join(
        f"| {label} | {result[f'{key}_direct_p50_ms']:.2f} | {result[f'{key}_gateway_p50_ms']:.2f} | "
        f"**{result[f'{key}_overhead_p50_ms']:.2f}** | {result[f'{key}_direct_p99_ms']:.2f} | "
        f"{result[f'{key}_gateway_p99_ms']:.2f} | {result[f'{key}_overhead_p99_ms']:.2f} |\n"
        for key, label in (
            ("info", "`get_info` / `list_adapters` (no model work)"),
            ("tiny", "tiny `forward_backward` (4 tokens, a future)"),
            ("rl_step", "rl step (sample, `forward_backward`, `optim_step`)"),
        )
    )
    return (
        f"### gateway: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
        f"- command: `{result['command']}`\n- commit: `{result['commit']}`\n"
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; broker: {result['broker']}\n\n"
        "| call | direct p50 ms | gateway p50 ms | overhead p50 ms "
        "| direct p99 ms | gateway p99 ms | overhead p99 ms |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
        f"{rows}\n{result['n']} calls each way, alternating, after warm-up.\n"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--bootstrap", default=os.environ.get("HOTLORA_BOOTSTRAP"), help="use this broker")
    parser.add_argument("--model", default=None, help="base model directory (default: the cached tiny model)")
    parser.add_argument("-n", "--requests", type=int, default=200, help="measured calls each way (default 200)")
    parser.add_argument("--no-docs", action="store_true", help="do not append a section to docs/benchmarks.md")


def main(args: argparse.Namespace) -> int:
    from hotlora.engine.event_loop import run
    from hotlora.models.tiny_model import TinyModelRecipe, ensure_tiny_model

    if args.requests < 1:
        raise SystemExit("error: --requests must be >= 1")
    console = Console(stderr=True)
    model = args.model or str(ensure_tiny_model(TinyModelRecipe()))
    command = shlex.join(["hotlora", *sys.argv[1:]]) if "gateway" in sys.argv else "hotlora bench gateway"
    result: dict[str, Any] = {"command": command, "commit": git_commit(), "machine": machine_info(torch.device("cpu"))}
    result.update(run(measure(args.bootstrap, model, args.requests, max(5, args.requests // 10), console)))
    console.print(
        f"gateway overhead p50: tiny {result['tiny_overhead_p50_ms']:.2f} ms, "
        f"rl step {result['rl_step_overhead_p50_ms']:.2f} ms "
        f"(p99 {result['tiny_overhead_p99_ms']:.2f} / {result['rl_step_overhead_p99_ms']:.2f})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if not args.no_docs:
        append_section(markdown_section(result), DOCS_INTRO)
    return 0
