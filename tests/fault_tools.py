"""What the fault tests share: a throwaway Redis with persistence per test, the job sets,
waits on conditions (never fixed sleeps), and S3 behind a TCP proxy a test can cut
(workers/bench/tcp_proxy.py).

Each fault test has its own redis-server (with persistence), so killed workers, restarted
servers and leftover messages never reach another test. Numbers the tests measure are
printed (run with -s to see them) and written down in docs/RELIABILITY.md. The tests are
split by what fails (test_faults_worker, _broker, _storage, _engine) so that the suite's
two processes share them out.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis

from tasks.cli.local_redis import LocalRedis
from tasks.producer import Client, JobStatus
from tasks.settings import QUEUE_BULK
from workers.bench.tcp_proxy import TcpProxy

from .conftest import S3Endpoint, worker_env
from .scrape import fetch, parse, value

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


@contextlib.contextmanager
def s3_behind_proxy(s3: S3Endpoint, bucket: str) -> Iterator[tuple[TcpProxy, S3Endpoint]]:
    """A bucket of its own, reached through a proxy the test can cut."""
    host, port = s3.url.removeprefix("http://").split(":")
    proxy = TcpProxy((host, int(port))).start()
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


def job_counts(port: int) -> dict[str, float]:
    """The worker's `ttspool_jobs_total` for successes, by reason (synthesized, cache_hit)."""
    scraped = parse(fetch(f"http://127.0.0.1:{port}/metrics")[1])
    return {reason: value(scraped, "ttspool_jobs_total", status="success", reason=reason) or 0.0
            for reason in ("synthesized", "cache_hit")}


def counted_warm_up(port: int, proc, log: Path) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """job_counts once the worker's warm-up job is counted: its status reads done a moment
    before the metric moves, and it is a cache hit when an earlier worker of the session
    made the same audio."""
    return until("the warm-up job to be counted", lambda: sum(job_counts(port).values()) >= 1 and job_counts(port),
                 30, proc, log)
