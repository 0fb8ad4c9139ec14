"""The engine's HTTP port: ``/metrics`` for Prometheus, ``/ready`` and ``/live`` for an orchestrator.

Why a probe beside Kafka: a supervisor (compose healthchecks, Kubernetes probes) must know whether an
engine serves without joining a broker itself. ``/ready`` is 200 only while the engine serves (it joined
its consumer group and took its partitions; not while loading, draining or stopped), else 503; ``/live``
is 200 while the process answers at all, loading included. Both bodies are one word, the engine's state.

prometheus_client's own WSGI app still serves every other path (``/metrics``), so scrapers see no change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: the engine's stdout is its JSON log, and probes come every few seconds."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def probe_app(metrics: WsgiApp, state: Callable[[], str]) -> WsgiApp:
    """``metrics`` behind ``/ready`` and ``/live``; ``state()`` is the engine's state, ``running`` when serving."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in ("/ready", "/live"):
            return metrics(environ, start_response)
        now = state()
        ok = path == "/live" or now == "running"
        start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
        return [f"{now}\n".encode()]

    return app


def serve(registry: CollectorRegistry, state: Callable[[], str], port: int, addr: str = "0.0.0.0") -> WSGIServer:
    """Serve on a daemon thread; ``port`` 0 picks a free one (``server.server_port``). ``shutdown()`` stops it."""
    server = make_server(addr, port, probe_app(make_wsgi_app(registry), state), ThreadingWSGIServer, _QuietHandler)
    threading.Thread(target=server.serve_forever, name="hotlora-http", daemon=True).start()
    return server
