"""What the fault tests share: a throwaway Redis with persistence per test, the job sets,
waits on conditions (never fixed sleeps), and a TCP proxy a test can cut.

Each fault test has its own redis-server (with persistence), so killed workers, restarted
servers and leftover messages never reach another test. Numbers the tests measure are
printed (run with -s to see them) and written down in docs/RELIABILITY.md. The tests are
split by what fails (test_faults_worker, _broker, _storage, _engine) so that the suite's
two processes share them out.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import redis

from tasks.cli.local_redis import LocalRedis, free_port
from tasks.producer import Client, JobStatus
from tasks.settings import QUEUE_BULK

from .conftest import S3Endpoint, worker_env

VISIBILITY_S = 10  # the setting's minimum: killed workers' jobs come back this fast


def fault_env(broker: LocalRedis, s3: S3Endpoint, aws_env: dict[str, str], **extra: str) -> dict[str, str]:
    return worker_env(broker.url, s3, aws_env, **{"TTSPOOL_METRICS_PORT": "0",
                                                  "TTSPOOL_VISIBILITY_TIMEOUT": str(VISIBILITY_S), **extra})


def jobs(n: int, tag: str, words: int = 12) -> list[dict[str, object]]:
    # Distinct seeds: every job is its own synthesis (no content-key sharing).
    text = " ".join(["steady"] * words)
    return [{"text": f"Job {tag} says {text}.", "seed": i, "voice": 3, "job_id": f"{tag}-{i}"} for i in range(n)]


def until(what: str, cond, timeout: float, proc=None, log: Path | None = None, poll: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"worker exited ({proc.returncode}) while waiting for {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n{tail(log)}")
        time.sleep(poll)


def tail(log: Path | None) -> str:
    return log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""


def statuses_of(client: Client, ids: list[str]) -> dict[str, JobStatus]:
    return {i: client.status(i) for i in ids}


def wait_all(client: Client, ids: list[str], r: redis.Redis, log: Path, timeout: float = 300) -> list[JobStatus]:
    try:
        return client.wait(ids, timeout=timeout)
    except TimeoutError:
        left = {i: (client.status(i).status, r.get(f"ttspool:deliveries:{i}"), r.get(f"ttspool:strikes:{i}"))
                for i in ids if not client.status(i).done}
        pytest.fail(f"not finished (status, deliveries, strikes): {left}; queue {r.llen(QUEUE_BULK)}, "
                    f"unacked {r.hlen('unacked')}, restore mutex ttl {r.ttl('unacked_mutex')}\n{tail(log)}")


def assert_stored(s3: S3Endpoint, statuses: list[JobStatus]) -> None:
    for st in statuses:
        assert st.status == "SUCCESS" and st.url is not None, st
        bucket, key = st.url.removeprefix("s3://").split("/", 1)
        assert s3.client().head_object(Bucket=bucket, Key=key)["ContentLength"] > 44, st


class CuttableProxy:
    """A TCP forwarder whose cut() drops every connection and refuses new ones, as a
    network partition or a dead load balancer does (stopping moto itself is no outage:
    its handler threads keep serving kept-alive connections). After drop_at(match), the
    next client write (or server reply) that matches is not forwarded: every connection
    drops right there, and new ones are accepted. close() stops it for good. Written here
    because it is a few lines of sockets and no test library offers it.

    Its pump threads share the connection set and the one-shot drop, so both are changed
    under a lock: two pumps matching at once must drop (and schedule a reopening) once."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._drop_once: Callable[[bytes], bool] | None = None
        self._drop_replies = False
        self._outage_s = 0.0
        self._reopen: threading.Timer | None = None
        self._closed = False
        self.dropped = threading.Event()

    def drop_at(self, match: Callable[[bytes], bool], replies: bool = False, outage_s: float = 0) -> None:
        """Drop at the next client write that matches, or server reply with `replies`;
        with `outage_s`, refuse new connections for that long after."""
        with self._lock:
            self.dropped.clear()
            self._drop_replies = replies
            self._drop_once = match
            self._outage_s = outage_s

    def start(self) -> "CuttableProxy":
        with self._lock:
            if self._closed:
                return self
            self._listener = listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            with self._lock:
                self._socks |= {client, upstream}
            for src, dst, watch in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, watch), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, watch: bool) -> None:
        try:
            while data := src.recv(65536):
                if self._drops(data, watch):
                    return
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _drops(self, data: bytes, from_client: bool) -> bool:
        with self._lock:
            if (from_client == self._drop_replies or self._drop_once is None or self.dropped.is_set()
                    or not self._drop_once(data)):
                return False
            self.dropped.set()
            outage = self._outage_s
        if outage:
            self.cut()
            with self._lock:
                self._reopen = threading.Timer(outage, self.start)
                self._reopen.daemon = True
                self._reopen.start()
        else:
            self._drop_all()
        return True

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self._drop_all()

    def close(self) -> None:
        """Cut, and never reopen (a pending outage's reopening included)."""
        with self._lock:
            self._closed = True
            if self._reopen is not None:
                self._reopen.cancel()
        self.cut()

    def _drop_all(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@contextlib.contextmanager
def s3_behind_proxy(s3: S3Endpoint, bucket: str) -> Iterator[tuple[CuttableProxy, S3Endpoint]]:
    """A bucket of its own, reached through a proxy the test can cut."""
    host, port = s3.url.removeprefix("http://").split(":")
    proxy = CuttableProxy((host, int(port))).start()
    try:
        endpoint = S3Endpoint(f"http://127.0.0.1:{proxy.port}", bucket)
        endpoint.client().create_bucket(Bucket=bucket)
        yield proxy, endpoint
    finally:
        proxy.close()


def health(port: int) -> tuple[int, dict[str, object]]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
