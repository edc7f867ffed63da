"""A small HTTP server for Prometheus: `/metrics` from a registry, plus JSON routes.

prometheus_client's own `start_http_server` answers every path with the metrics, so
a `/healthz` beside them needs this thin WSGI wrapper around its `make_wsgi_app`
(which keeps content negotiation, gzip and `name[]` filtering).
"""

from __future__ import annotations

import json
import threading
from http import HTTPStatus
from socketserver import ThreadingMixIn
from typing import Any, Callable, Iterable, Mapping
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

# A JSON route: returns the HTTP status code and the body.
Route = Callable[[], tuple[int, dict[str, Any]]]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    # A slow scrape must not hold up a health probe.
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        # One line per scrape and probe would drown the worker's own log.
        pass


def make_app(registry: CollectorRegistry, routes: Mapping[str, Route] | None = None) -> Callable[..., Iterable[bytes]]:
    metrics = make_wsgi_app(registry)
    routes = dict(routes or {})

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path in routes:
            code, body = routes[path]()
            data = json.dumps(body).encode()
            start_response(f"{code} {HTTPStatus(code).phrase}",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
            return [data]
        if path in ("/", "/metrics"):
            return metrics(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics\n"]

    return app


def start_server(registry: CollectorRegistry, addr: str, port: int,
                 routes: Mapping[str, Route] | None = None) -> WSGIServer:
    """Serve on a daemon thread; `server.server_port` is the bound port."""
    try:
        server = make_server(addr, port, make_app(registry, routes), _ThreadingServer, _QuietHandler)
    except OSError as err:
        raise RuntimeError(f"cannot listen on {addr}:{port} for metrics: {err.strerror or err}") from None
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
