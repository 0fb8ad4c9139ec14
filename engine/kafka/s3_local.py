"""A local S3 (``moto[server]`` on a free loopback port) for a durable embedded broker in tests.

Tansu's ``s3://`` storage keeps topics, records and committed offsets across a broker restart, which
memory storage does not. ``LocalS3`` starts moto's server, waits until it answers HTTP (bounded, no
fixed sleeps), creates the bucket, and gives the environment the broker needs::

    with LocalS3() as s3, EmbeddedBroker(storage=s3.storage_url, env=s3.broker_env()) as broker:
        ...
        broker.restart()  # same port, same data

moto keeps everything in its process's memory: stopping ``LocalS3`` loses it. Needs the ``dev``
extra (``moto[server]``, ``boto3``).
"""

from __future__ import annotations

import contextlib
import http.client
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from hotlora.engine.kafka.broker import free_port

READY_TIMEOUT_S = 30.0  # moto imports a lot; a busy 2-core machine takes a few seconds
DUMMY_KEY_ID = "testing"
DUMMY_SECRET = "testing"  # moto accepts any credentials
REGION = "us-east-1"


class LocalS3Error(RuntimeError):
    pass


def http_answers(host: str, port: int) -> bool:
    """True once the server answers an HTTP request (any status), not merely once the port is bound."""
    connection = http.client.HTTPConnection(host, port, timeout=0.5)
    try:
        connection.request("GET", "/")
        connection.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


@dataclass
class LocalS3:
    """``moto_server`` on loopback with one bucket; ``with LocalS3() as s3: s3.storage_url``."""

    bucket: str = field(default_factory=lambda: f"hotlora-{uuid.uuid4().hex[:12]}")
    host: str = "127.0.0.1"
    port: int = 0
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def storage_url(self) -> str:
        """Tansu's ``--storage-engine`` value for this bucket."""
        return f"s3://{self.bucket}/"

    def broker_env(self) -> dict[str, str]:
        """What Tansu's S3 storage needs: the endpoint, plain HTTP allowed, and (dummy) credentials."""
        return {
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": DUMMY_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
        }

    def start(self, timeout: float = READY_TIMEOUT_S) -> LocalS3:
        """Start moto's server, wait until it answers (bounded), create the bucket."""
        if self.process is not None:
            return self
        try:
            import boto3
            import moto.server  # noqa: F401 - only to fail early with a clear message
        except ImportError as err:
            raise LocalS3Error("a local S3 needs the dev extra: pip install 'moto[server]' boto3") from err
        self.port = self.port or free_port()
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT if self.log_path else subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        deadline = time.monotonic() + timeout
        while not http_answers(self.host, self.port):
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise LocalS3Error(f"moto_server exited with code {code} before answering on {self.endpoint}")
            if time.monotonic() > deadline:
                self.stop()
                raise LocalS3Error(f"moto_server did not answer on {self.endpoint} within {timeout:.0f} s")
            time.sleep(0.05)
        try:
            client = boto3.client(
                "s3",
                endpoint_url=self.endpoint,
                aws_access_key_id=DUMMY_KEY_ID,
                aws_secret_access_key=DUMMY_SECRET,
                region_name=REGION,
            )
            client.create_bucket(Bucket=self.bucket)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it lingers; always reaps the process."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
