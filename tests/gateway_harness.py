"""An engine service and a Tinker gateway on their own event loop in a background thread.

The ``tinker`` SDK is synchronous (it runs its own loop in a thread), so tests drive it from the main
thread while the engine and the gateway serve from here. Readiness is the engine service's ``ready``
event and the gateway's bound port, never a sleep; ``stop`` shuts both down and joins the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from hotlora.engine.kafka.broker import free_port
from hotlora.engine.kafka.service import EngineService
from hotlora.gateway.server import Gateway, GatewayConfig, build_app
from tests.helpers import service_config_for_tests, start_engine_service

T = TypeVar("T")
START_TIMEOUT_S = 120.0


@dataclass
class GatewayHarness:
    bootstrap: str
    prefix: str
    model: Path
    checkpoint_dir: Path
    gateway_overrides: dict[str, Any] = field(default_factory=dict)
    engine_overrides: dict[str, Any] = field(default_factory=dict)
    with_engine: bool = True
    port: int = 0
    gateway: Gateway | None = None
    service: EngineService | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _stop: asyncio.Event | None = None
    _done: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GatewayHarness:
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="gateway-harness", daemon=True)
        self._thread.start()
        ready.result(START_TIMEOUT_S)
        return self

    def call(self, make: Callable[[], Coroutine[Any, Any, T]], timeout: float = 60.0) -> T:
        """Run a coroutine on the harness's loop (e.g. a HotLoraClient call) and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(make(), self._loop).result(timeout)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(START_TIMEOUT_S)
            assert not self._thread.is_alive(), "the gateway harness did not stop"
        self._done.result(0)

    def __enter__(self) -> GatewayHarness:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            asyncio.run(self._main(ready))
            self._done.set_result(None)
        except BaseException as err:
            if not ready.done():
                ready.set_exception(err)
            self._done.set_exception(err)

    async def _main(self, ready: concurrent.futures.Future[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        engine_task = None
        if self.with_engine:
            config = service_config_for_tests(
                self.bootstrap, self.prefix, self.model, self.checkpoint_dir, heartbeat_interval=0.5,
                **self.engine_overrides,
            )  # fmt: skip
            self.service = EngineService(config)
            engine_task = await start_engine_service(self.service, START_TIMEOUT_S)
        gateway_config = GatewayConfig(
            bootstrap=self.bootstrap, topic_prefix=self.prefix, base_model=str(self.model), request_timeout=60.0,
            **self.gateway_overrides,
        )  # fmt: skip
        self.gateway = Gateway(gateway_config)
        runner = web.AppRunner(build_app(self.gateway), access_log=None)
        await runner.setup()
        try:
            self.port = self.port or free_port()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            ready.set_result(None)
            await self._stop.wait()
        finally:
            await runner.cleanup()
            if self.service is not None and engine_task is not None:
                self.service.request_stop()
                await asyncio.wait_for(engine_task, START_TIMEOUT_S)


def pip_target(name: str, marker: str, requirements: list[str], timeout_s: float) -> Path:
    """``requirements`` pip-installed (no deps) into ``~/.cache/hotlora/sdk/<name>`` on first use, reused after.

    For SDK versions that cannot share the venv with the installed ``tinker``: the tests put the directory
    on ``PYTHONPATH`` of a subprocess. ``marker`` (a file inside) says the install completed; it is staged
    and renamed, so an interrupted install is never taken for a finished one. Failing to install skips
    the test, or fails it under ``HOTLORA_REQUIRE_TINKER=1`` (CI).
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hotlora" / "sdk" / name
    if (cache / marker).exists():
        return cache
    staging = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
            "--target", str(staging), *requirements]  # fmt: skip
    try:
        subprocess.run(argv, check=True, timeout=timeout_s, capture_output=True, text=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        shutil.rmtree(staging, ignore_errors=True)
        reason = f"could not pip-install {' '.join(requirements)}: {getattr(err, 'stderr', '') or err}"
        if os.environ.get("HOTLORA_REQUIRE_TINKER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    shutil.rmtree(cache, ignore_errors=True)
    staging.rename(cache)
    return cache
