"""The gateway's limits (issue 33), against a real Redis, a real S3 endpoint (moto) and a
real worker: bad path parameters on every route answer 4xx, a storage backend that
accepts connections and never answers holds neither the Redis-only routes nor /healthz,
and a served gateway closes over-long, never-finished, idle and half-sent requests."""

from __future__ import annotations

import json
import os
import re
import selectors
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient

from storage import storage_for
from tasks.cli.local_redis import LocalRedis, free_port
from tasks.gateway.app import create_app
from tasks.settings import Settings

from .conftest import PREFIX, ROOT, S3Endpoint, WorkerProc, stop_process
from .test_cli_errors import HangUp
from .test_gateway import Gateway

KEY = "acme-key-0123456789abcdef"
# Malformed in every kind; percent-encoded where a client would otherwise rewrite it.
_BAD = ["%E2%98%83", "a%20b", "%00", "%0D%0A", "a" * 600, "%2E%2E", "-x", ".hidden", "_x"]
# Each kind of path parameter: its bad values. A route with a parameter not named here
# fails the test until its kind is added.
BAD_VALUES = {"job_id": _BAD, "name": [*_BAD, "123"], "path": _BAD}


def _routes(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) of every route of the app, through included routers; a mount's path
    ends in its {path} of files."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _routes(included.routes, prefix + route.include_context.prefix)
        else:
            for method in sorted(set(getattr(route, "methods", None) or {"GET"}) - {"HEAD"}):
                yield method, prefix + route.path_format


def _assert_openai_error(status: int, body: bytes, what: str) -> None:
    assert 400 <= status < 500, (what, status, body[:300])
    error = json.loads(body)["error"]
    assert isinstance(error["message"], str) and error["message"], what
    assert error["type"] == "invalid_request_error" and error["code"] == status, (what, error)


@pytest.mark.parametrize("keys", [True, False], ids=["keys", "no-keys"])
def test_every_route_refuses_bad_path_parameters(keys: bool, own_broker: LocalRedis, s3: S3Endpoint) -> None:
    env = {"TTSPOOL_BROKER_URL": own_broker.url, "TTSPOOL_STORAGE_URL": f"s3://{s3.bucket}/{PREFIX}",
           "TTSPOOL_S3_ENDPOINT_URL": s3.url, "TTSPOOL_API_KEYS": f"acme={KEY}" if keys else ""}
    settings = Settings.from_env(env)
    app = create_app(settings, storage_for(settings))
    routes = [(m, p) for m, p in _routes(app.routes) if "{" in p]
    # The four of the job and voice APIs at least, and the docs' static files.
    assert {("GET", "/v1/jobs/{job_id}"), ("GET", "/v1/jobs/{job_id}/audio"), ("GET", "/v1/voices/{name}"),
            ("DELETE", "/v1/voices/{name}")} <= set(routes)
    headers = {"Authorization": f"Bearer {KEY}"} if keys else {}
    with TestClient(app, raise_server_exceptions=False) as http:
        for method, path in routes:
            params = re.findall(r"\{(\w+)\}", path)
            unknown = set(params) - set(BAD_VALUES)
            assert not unknown, f"{method} {path}: add the bad values of {unknown} to BAD_VALUES"
            for param in params:
                for value in BAD_VALUES[param]:
                    url = re.sub(r"\{(\w+)\}", lambda m: value if m[1] == param else "well-formed", path)
                    resp = http.request(method, url, headers=headers)
                    if path.startswith("/static"):
                        assert resp.status_code == 404, (url, resp.status_code)  # StaticFiles' own answer
                    else:
                        _assert_openai_error(resp.status_code, resp.content, f"{method} {url}")
        # Well-formed but unknown: 404, with keys or without (no claim, no record).
        for method, url in (("GET", "/v1/jobs/no-such-job"), ("GET", "/v1/jobs/no-such-job/audio"),
                            ("GET", "/v1/voices/no-such-voice"), ("DELETE", "/v1/voices/no-such-voice")):
            resp = http.request(method, url, headers=headers)
            assert resp.status_code == 404, (method, url, resp.text)


class StalledServer:
    """A loopback TCP server that accepts every connection and never answers: a storage
    endpoint that stopped working without refusing connections. Counts the connections
    it accepted and those their clients gave up on (closed)."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.url = "http://127.0.0.1:%d" % self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._changed = threading.Condition()
        self.accepted = 0
        self.given_up = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.1):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                if sock is self._listener:
                    conn, _ = sock.accept()
                    conn.setblocking(False)
                    self._selector.register(conn, selectors.EVENT_READ)
                    self._count("accepted")
                    continue
                try:
                    data = sock.recv(65536)  # the request, read and ignored
                except OSError:
                    data = b""
                if not data:
                    self._selector.unregister(sock)
                    sock.close()
                    self._count("given_up")

    def _count(self, name: str) -> None:
        with self._changed:
            setattr(self, name, getattr(self, name) + 1)
            self._changed.notify_all()

    def wait_for(self, name: str, at_least: int, timeout: float = 120) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: getattr(self, name) >= at_least, timeout), (name, at_least)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=10)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()


def serve(env: dict[str, str], log: Path) -> Gateway:
    """`ttspool serve` on a free loopback port, once it answers (whatever /healthz says)."""
    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tasks.cli", "serve"], cwd=ROOT,
                                env={**env, "TTSPOOL_HTTP_PORT": str(port)}, stdout=out, stderr=subprocess.STDOUT)
    gw = Gateway(proc, f"http://127.0.0.1:{port}", log)
    for _ in range(300):
        if proc.poll() is not None:
            pytest.fail(f"gateway exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(gw.url + "/metrics", timeout=2):
                return gw
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    stop_process(proc)
    pytest.fail("gateway did not start")


def test_stalled_storage_holds_neither_redis_routes_nor_healthz(worker: WorkerProc, client, tmp_path: Path) -> None:
    """45 audio reads against storage that never answers (more than anyio's 40 default
    threads) while a job is submitted and read: the storage reads wait on their own
    threads, end with 503 once their timeout passes, and /healthz names storage."""
    [job_id] = client.submit_many([{"text": "Read back while storage stalls."}])
    [done] = client.wait([job_id], timeout=120)
    assert done.status == "SUCCESS"
    stalled = StalledServer()
    threads = 8
    env = {**worker.env, "TTSPOOL_S3_ENDPOINT_URL": stalled.url, "TTSPOOL_API_KEYS": "",
           "TTSPOOL_HTTP_STORAGE_TIMEOUT": "10", "TTSPOOL_HTTP_STORAGE_ATTEMPTS": "1",
           "TTSPOOL_HTTP_STORAGE_THREADS": str(threads)}
    gw = serve(env, tmp_path / "gateway.log")
    try:
        with ThreadPoolExecutor(45) as pool:
            reads = [pool.submit(gw.request, "GET", f"/v1/jobs/{job_id}/audio", key=None) for _ in range(45)]
            stalled.wait_for("accepted", threads)  # every storage thread is stuck
            status, _, body = gw.request("POST", "/v1/jobs", {"text": "Submitted during the stall."}, key=None)
            assert status == 202, body
            [new_id] = json.loads(body)["ids"]
            status, _, body = gw.request("GET", f"/v1/jobs/{new_id}", key=None)
            assert status == 200 and json.loads(body)["status"] in ("PENDING", "STARTED", "SUCCESS"), body
            status, _, body = gw.request("GET", "/healthz", key=None)
            health = json.loads(body)
            assert status == 503 and "storage" in health["status"], health
            assert health["checks"]["broker"] == "ok" and health["checks"]["storage"] != "ok", health
            # All of that answered while no storage read had ended.
            assert stalled.given_up == 0 and not any(r.done() for r in reads)
            # The reads' own timeout ends them (the first storage threads give up by
            # themselves); then the endpoint goes away and the rest fail at once.
            stalled.wait_for("given_up", threads)
            stalled.close()
            answers = [r.result(timeout=120) for r in reads]
        for status, headers, body in answers:
            assert status == 503 and headers["retry-after"] == "5", (status, body)
            assert "S3 download" in json.loads(body)["error"]["message"]
        assert gw.request("GET", f"/v1/jobs/{new_id}", key=None)[0] == 200
    finally:
        stalled.close()
        stop_process(gw.proc)


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's timeout
    bounds the wait: a server that never closes fails the test)."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


@pytest.fixture(scope="module")
def limited_gateway(own_broker: LocalRedis, tmp_path_factory) -> Iterator[Gateway]:
    folder = tmp_path_factory.mktemp("limited")
    env = {**os.environ, "TTSPOOL_BROKER_URL": own_broker.url, "TTSPOOL_STORAGE_URL": f"file://{folder}",
           "TTSPOOL_HTTP_BODY_TIMEOUT": "1", "TTSPOOL_HTTP_HEADER_TIMEOUT": "1", "TTSPOOL_HTTP_KEEPALIVE_TIMEOUT": "1"}
    gw = serve(env, folder / "gateway.log")
    yield gw
    stop_process(gw.proc)


def test_chunked_body_over_the_limit_is_413(limited_gateway: Gateway) -> None:
    body = b"{" + b" " * (2 << 20) + b"}"
    with _raw(limited_gateway.url) as sock:
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(body), 65536):
            part = body[i:i + 65536]
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        sock.sendall(b"0\r\n\r\n")
        answer = _read_all(sock)
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), head
    _assert_openai_error(413, payload, "chunked 2 MiB")


def test_body_that_never_arrives_is_closed_after_the_body_timeout(limited_gateway: Gateway) -> None:
    with _raw(limited_gateway.url) as sock:
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"text\": ")
        answer = _read_all(sock)  # ends: the server closed the connection
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower(), head
    _assert_openai_error(408, payload, "body never sent")


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nHost: gw\r\n",
                                  b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n"],
                         ids=["never-a-byte", "half-sent-headers", "idle-after-a-request"])
def test_idle_and_half_sent_connections_are_closed(limited_gateway: Gateway, sent: bytes) -> None:
    with _raw(limited_gateway.url) as sock:
        sock.sendall(sent)
        answer = _read_all(sock)  # the server closes it: idle or header timeout
    assert answer == b"" or answer.startswith(b"HTTP/1.1 200 "), answer[:200]


def test_connections_past_the_limit_get_503(own_broker: LocalRedis, tmp_path: Path) -> None:
    # Timeouts far off: the held connections stay open whatever the machine's pace.
    env = {**os.environ, "TTSPOOL_BROKER_URL": own_broker.url, "TTSPOOL_STORAGE_URL": f"file://{tmp_path}",
           "TTSPOOL_HTTP_HEADER_TIMEOUT": "120", "TTSPOOL_HTTP_KEEPALIVE_TIMEOUT": "120",
           "TTSPOOL_HTTP_MAX_CONNECTIONS": "4"}
    gw = serve(env, tmp_path / "gateway.log")
    held: list[socket.socket] = []
    try:
        held = [_raw(gw.url) for _ in range(3)]
        for sock in held:  # a request each, its headers still coming
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        with _raw(gw.url) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            assert _read_all(sock).startswith(b"HTTP/1.1 503 ")
        for sock in held:
            sock.close()
        # Once they are gone, requests are served again (uvicorn sees the closes soon).
        for _ in range(200):
            if gw.request("GET", "/metrics", key=None)[0] == 200:
                break
            time.sleep(0.05)
        else:
            pytest.fail("still 503 after the held connections closed")
    finally:
        for sock in held:
            sock.close()
        stop_process(gw.proc)


def test_a_broker_never_reached_answers_503_at_once(tmp_path: Path) -> None:
    """A gateway whose Redis never answered: a submit tries it once (no retry loop) and
    answers 503 with Retry-After; the result listener's Redis, on a port of its own,
    is left to its backed-off reconnects."""
    broker, backend = HangUp(), HangUp()
    try:
        settings = Settings.from_env({"TTSPOOL_BROKER_URL": broker.url, "TTSPOOL_RESULT_BACKEND": backend.url,
                                      "TTSPOOL_STORAGE_URL": tmp_path.as_uri()})
        with TestClient(create_app(settings, storage_for(settings)), raise_server_exceptions=False) as http:
            resp = http.post("/v1/jobs", json={"text": "Hello."})
            assert resp.status_code == 503 and resp.headers["retry-after"] == "5", resp.text
            assert "unreachable" in resp.json()["error"]["message"]
            assert broker.accepted == 1
    finally:
        broker.close()
        backend.close()
