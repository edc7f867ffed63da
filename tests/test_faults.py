"""Real faults against real processes: no job is lost, none is reported twice differently.

Each test has its own redis-server (with persistence), so killed workers, restarted
servers and leftover messages never reach another test. Numbers the tests measure are
printed (run with -s to see them) and written down in docs/RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import redis

from tasks.cli.local_redis import LocalRedis, free_port
from tasks.errors import BrokerFull
from tasks.producer import Client, JobStatus
from tasks.settings import QUEUE_BULK, Settings

from .scrape import fetch, parse, value
from .conftest import S3Endpoint, running_worker, start_worker, stop_process, wait_ready, worker_env

VISIBILITY_S = 10  # the setting's minimum: killed workers' jobs come back this fast


@pytest.fixture()
def broker() -> Iterator[LocalRedis]:
    server = LocalRedis(persist=True).start()
    try:
        yield server
    finally:
        server.close()


def _env(broker: LocalRedis, s3: S3Endpoint, aws_env: dict[str, str], **extra: str) -> dict[str, str]:
    return worker_env(broker.url, s3, aws_env, **{"TTSPOOL_METRICS_PORT": "0",
                                                  "TTSPOOL_VISIBILITY_TIMEOUT": str(VISIBILITY_S), **extra})


def _jobs(n: int, tag: str, words: int = 12) -> list[dict[str, object]]:
    # Distinct seeds: every job is its own synthesis (no content-key sharing).
    text = " ".join(["steady"] * words)
    return [{"text": f"Job {tag} says {text}.", "seed": i, "voice": 3, "job_id": f"{tag}-{i}"} for i in range(n)]


def _until(what: str, cond, timeout: float, proc=None, log: Path | None = None, poll: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"worker exited ({proc.returncode}) while waiting for {what}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n{_tail(log)}")
        time.sleep(poll)


def _tail(log: Path | None) -> str:
    return log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""


def _statuses(client: Client, ids: list[str]) -> dict[str, JobStatus]:
    return {i: client.status(i) for i in ids}


def _wait_all(client: Client, ids: list[str], r: redis.Redis, log: Path, timeout: float = 300) -> list[JobStatus]:
    try:
        return client.wait(ids, timeout=timeout)
    except TimeoutError:
        left = {i: (client.status(i).status, r.get(f"ttspool:deliveries:{i}"), r.get(f"ttspool:strikes:{i}"))
                for i in ids if not client.status(i).done}
        pytest.fail(f"not finished (status, deliveries, strikes): {left}; queue {r.llen(QUEUE_BULK)}, "
                    f"unacked {r.hlen('unacked')}, restore mutex ttl {r.ttl('unacked_mutex')}\n{_tail(log)}")


def _assert_stored(s3: S3Endpoint, statuses: list[JobStatus]) -> None:
    for st in statuses:
        assert st.status == "SUCCESS" and st.url is not None, st
        bucket, key = st.url.removeprefix("s3://").split("/", 1)
        assert s3.client().head_object(Bucket=bucket, Key=key)["ContentLength"] > 44, st


def test_sigkill_mid_batch_loses_nothing(broker: LocalRedis, s3: S3Endpoint, aws_env, tmp_path: Path) -> None:
    env = _env(broker, s3, aws_env, TTSPOOL_MAX_BATCH="4")
    r = redis.Redis.from_url(broker.url)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    with running_worker(env, log_a) as (proc_a, client):
        ids = client.submit_many(_jobs(24, "kill"))
        # Kill while a GPU batch runs (its jobs hold a strike) and some jobs are done.
        _until("a batch in flight after a finished one", lambda: any(client.status(i).done for i in ids)
               and any(r.get(f"ttspool:strikes:{i}") == b"1" for i in ids), 300, proc_a, log_a, poll=0.01)
        proc_a.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        proc_a.wait()
        before = {i: st for i, st in _statuses(client, ids).items() if st.done}
        unfinished = [i for i in ids if i not in before]
        assert unfinished, "the kill came too late to test anything"
        proc_b = start_worker(env, log_b)
        try:
            _until("a killed job's redelivery", lambda: any(int(r.get(f"ttspool:deliveries:{i}") or 0) > 1
                                                           for i in unfinished), 120, proc_b, log_b)
            redelivered_after = time.monotonic() - killed_at
            final = _wait_all(client, ids, r, log_b)
        finally:
            stop_process(proc_b)
    _assert_stored(s3, final)
    after = dict(zip(ids, final))
    # A job done before the kill keeps its result; at most one output per job.
    assert all(after[i] == st for i, st in before.items())
    print(f"\nSIGKILL: {len(unfinished)} of {len(ids)} jobs unfinished at the kill; first one "
          f"redelivered {redelivered_after:.1f} s after the kill (visibility timeout {VISIBILITY_S} s)")
    assert redelivered_after < 3600  # the transport default: the configured timeout was used


def test_sigterm_finishes_the_batch_and_gives_back_the_rest(broker: LocalRedis, s3: S3Endpoint, aws_env,
                                                            tmp_path: Path) -> None:
    env = _env(broker, s3, aws_env, TTSPOOL_MAX_BATCH="4", TTSPOOL_VISIBILITY_TIMEOUT="3600")
    r = redis.Redis.from_url(broker.url)
    log = tmp_path / "worker.log"
    with running_worker(env, log) as (proc, client):
        ids = client.submit_many(_jobs(24, "term", words=30))
        in_batch = _until("a batch in flight", lambda: [i for i in ids if r.get(f"ttspool:strikes:{i}") == b"1"],
                          300, proc, log, poll=0.01)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        batch_done_s = None
        while proc.poll() is None:
            assert time.monotonic() - t0 < 180, "no exit within the 180 s grace period"
            if batch_done_s is None and all(client.status(i).done for i in in_batch):
                batch_done_s = time.monotonic() - t0
            time.sleep(0.05)
        stop_s = time.monotonic() - t0
        assert proc.returncode == 0, _tail(log)
        statuses = _statuses(client, ids)
        # The batch that was running finished, uploaded and was acked...
        _assert_stored(s3, [statuses[i] for i in in_batch])
        # ...and every other job is either done or back on the queue, none left unacked.
        assert r.hlen("unacked") == 0
        queued = {json.loads(m)["headers"]["id"] for m in r.lrange(QUEUE_BULK, 0, -1)}
        done = {i for i, st in statuses.items() if st.done}
        assert done | queued == set(ids) and not done & queued and not set(in_batch) & queued
        print(f"\nSIGTERM: exited {stop_s:.1f} s after the signal, the running batch of {len(in_batch)} finished "
              f"{batch_done_s or stop_s:.1f} s after it; {len(queued)} held/queued job(s) went back to the queue")
    with running_worker(env, tmp_path / "again.log") as (_, client):
        _assert_stored(s3, client.wait(ids, timeout=300))
    # Jobs of the finished batch were never delivered again: a job's delivery count goes
    # when it ends, and a delivery after that would have brought it back.
    assert all(r.get(f"ttspool:deliveries:{i}") is None for i in in_batch)


def test_redis_restart_loses_nothing(broker: LocalRedis, s3: S3Endpoint, aws_env, tmp_path: Path) -> None:
    env = _env(broker, s3, aws_env, TTSPOOL_MAX_BATCH="4")
    log = tmp_path / "worker.log"
    with running_worker(env, log) as (proc, client):
        ids = client.submit_many(_jobs(16, "restart"))
        _until("some jobs done", lambda: any(client.status(i).done for i in ids), 300, proc, log)
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGKILL)  # appendfsync always: every acked write is on disk
        broker.stop()
        submitted: list[str] = []
        # A producer submitting while Redis is down retries until it is back.
        producer = threading.Thread(target=lambda: submitted.extend(client.submit_many(_jobs(2, "during"))))
        producer.start()
        time.sleep(3)
        broker.start()
        producer.join(60)
        assert len(submitted) == 2
        ids += submitted + client.submit_many(_jobs(2, "after"))
        final = _wait_all(client, ids, redis.Redis.from_url(broker.url), log)
        assert proc.poll() is None
    _assert_stored(s3, final)
    assert "Connection to broker lost" in log.read_text()


def test_connection_lost_with_the_fetched_message_loses_nothing(broker: LocalRedis, s3: S3Endpoint,
                                                                 aws_env, tmp_path: Path) -> None:
    # The proxy drops the worker's connections at the reply that carries the message, so
    # Redis has popped it and the worker never sees it. kombu's BRPOP lost it there; the
    # fetch script recorded it as unacked in the same step, so it comes back.
    proxy = CuttableProxy(("127.0.0.1", broker.port)).start()
    direct = Client(Settings(broker_url=broker.url))
    try:
        env = _env(broker, s3, aws_env, TTSPOOL_BROKER_URL=f"redis://127.0.0.1:{proxy.port}/0")
        log = tmp_path / "worker.log"
        with running_worker(env, log) as (proc, _):
            proxy.drop_at(lambda data: b"gap-0" in data, replies=True)
            [job] = direct.submit_many(_jobs(1, "gap"))
            _until("the connection to drop at the fetched message", proxy.dropped.is_set, 120, proc, log)
            final = _wait_all(direct, [job], redis.Redis.from_url(broker.url), log, timeout=120)
            assert proc.poll() is None
        assert [st.status for st in final] == ["SUCCESS"], _tail(log)
    finally:
        direct.close()
        proxy.cut()


@pytest.mark.parametrize("outage_s", [8, 45])
def test_connection_lost_recording_a_finished_batch_keeps_it(broker: LocalRedis, s3: S3Endpoint, aws_env,
                                                             tmp_path: Path, outage_s: int) -> None:
    # The proxy drops every worker connection at the first row's result, written right
    # after its upload and durable record, and refuses new ones for 8 s (redis-py's own
    # default retries give up after at most 7). The worker's Redis calls reconnect and try
    # again for longer, so the batch is recorded as made. Before, the batch function raised, every
    # held job went back, and the rows were synthesized a second time.
    # Down for 45 s, longer than any retry: the batch function raises and every held job
    # goes back; the row stored before the outage is then served from storage, not made
    # again (the worker had remembered it as looked up already).
    proxy = CuttableProxy(("127.0.0.1", broker.port)).start()
    direct = Client(Settings(broker_url=broker.url))
    try:
        port = free_port()
        env = _env(broker, s3, aws_env, TTSPOOL_BROKER_URL=f"redis://127.0.0.1:{proxy.port}/0",
                   TTSPOOL_MAX_BATCH="4", TTSPOOL_MAX_WAIT_MS="2000", TTSPOOL_METRICS_PORT=str(port))
        log = tmp_path / "worker.log"
        with running_worker(env, log) as (proc, _):
            audio = value(parse(fetch(f"http://127.0.0.1:{port}/metrics")[1]), "ttspool_audio_seconds_total") or 0.0
            proxy.drop_at(lambda data: b"SETEX\r\n" in data and b"celery-task-meta-" in data and b"SUCCESS" in data,
                          outage_s=outage_s)
            ids = direct.submit_many(_jobs(4, f"record{outage_s}"))
            _until("the connection to drop at the first result", proxy.dropped.is_set, 120, proc, log)
            final = _wait_all(direct, ids, redis.Redis.from_url(broker.url), log, timeout=120)
            assert proc.poll() is None
            made = value(parse(fetch(f"http://127.0.0.1:{port}/metrics")[1]), "ttspool_audio_seconds_total")
        _assert_stored(s3, final)
        assert made is not None
        results = [direct.app.backend.get_task_meta(i)["result"] for i in ids]
        if outage_s < 20:
            # Each job's audio synthesized once: what the GPU made is what the results hold.
            assert abs((made - audio) - sum(st.duration_s for st in final)) < 0.01, _tail(log)
            assert not any(r["cached"] for r in results), results
        else:
            assert any(r["cached"] for r in results), results
    finally:
        direct.close()
        proxy.cut()


def test_worker_killed_right_after_the_fetch_loses_nothing(broker: LocalRedis, s3: S3Endpoint, aws_env,
                                                           tmp_path: Path) -> None:
    """The worker dies between taking a message off the queue and delivering it: the
    message is the broker's (unacked) all along, and the restarted worker runs it."""
    env = _env(broker, s3, aws_env)
    logs = [tmp_path / "worker0.log", tmp_path / "worker1.log"]
    r = redis.Redis.from_url(broker.url)
    first = start_worker({**env, "TTSPOOL_FAULT_EXIT_AFTER_FETCH": "fetched-0"}, logs[0])
    client = Client(Settings.from_env(env))
    second = None
    try:
        wait_ready(client, first, logs[0])
        [job] = client.submit_many(_jobs(1, "fetched"))
        _until("the worker to die after the fetch", lambda: first.poll() is not None, 60, log=logs[0])
        assert first.returncode == 86 and r.llen(QUEUE_BULK) == 0 and r.hlen("unacked") == 1
        second = start_worker(env, logs[1])  # what a supervisor does
        final = _wait_all(client, [job], r, logs[1], timeout=180)
        assert [st.status for st in final] == ["SUCCESS"]
    finally:
        client.close()
        for proc in (first, second):
            if proc is not None:
                stop_process(proc)


class CuttableProxy:
    """A TCP forwarder whose cut() drops every connection and refuses new ones, as a
    network partition or a dead load balancer does (stopping moto itself is no outage:
    its handler threads keep serving kept-alive connections). After drop_at(match), the
    next client write (or server reply) that matches is not forwarded: every connection
    drops right there, and new ones are accepted. Written here because it is a few lines of sockets and no
    test library offers it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._socks: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._drop_once: Callable[[bytes], bool] | None = None
        self._drop_replies = False
        self._outage_s = 0.0
        self.dropped = threading.Event()

    def drop_at(self, match: Callable[[bytes], bool], replies: bool = False, outage_s: float = 0) -> None:
        """Drop at the next client write that matches, or server reply with `replies`;
        with `outage_s`, refuse new connections for that long after."""
        self.dropped.clear()
        self._drop_replies = replies
        self._drop_once = match
        self._outage_s = outage_s

    def start(self) -> "CuttableProxy":
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self._socks |= {client, upstream}
            for src, dst, watch in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, watch), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, watch: bool) -> None:
        try:
            while data := src.recv(65536):
                if watch != self._drop_replies and self._drop_once and not self.dropped.is_set() and self._drop_once(data):
                    self.dropped.set()
                    if self._outage_s:
                        self.cut()
                        threading.Timer(self._outage_s, self.start).start()
                    else:
                        self._drop_all()
                    return
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._drop_all()

    def _drop_all(self) -> None:
        for s in list(self._socks):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self._socks.clear()


@contextlib.contextmanager
def _s3_behind_proxy(s3: S3Endpoint, bucket: str) -> Iterator[tuple[CuttableProxy, S3Endpoint]]:
    """A bucket of its own, reached through a proxy the test can cut."""
    host, port = s3.url.removeprefix("http://").split(":")
    proxy = CuttableProxy((host, int(port))).start()
    try:
        endpoint = S3Endpoint(f"http://127.0.0.1:{proxy.port}", bucket)
        endpoint.client().create_bucket(Bucket=bucket)
        yield proxy, endpoint
    finally:
        proxy.cut()


def test_s3_down_for_30_s_uploads_retry_in_place(broker: LocalRedis, s3: S3Endpoint, aws_env, tmp_path: Path) -> None:
    with _s3_behind_proxy(s3, "outage") as (proxy, s3):
        # One delivery allowed: a job put back on the queue would show up as a second one.
        env = _env(broker, s3, aws_env, TTSPOOL_STORAGE_URL=f"s3://{s3.bucket}/jobs", TTSPOOL_MAX_BATCH="4",
                   TTSPOOL_UPLOAD_RETRY_S="120", TTSPOOL_MAX_STRIKES="1", TTSPOOL_VISIBILITY_TIMEOUT="3600")
        log = tmp_path / "worker.log"
        r = redis.Redis.from_url(broker.url)
        with running_worker(env, log) as (proc, client):
            ids = client.submit_many(_jobs(12, "s3down"))
            _until("some jobs done", lambda: any(client.status(i).done for i in ids), 300, proc, log)
            proxy.cut()
            down_at = time.monotonic()
            seen: set[str] = set()
            # Down for 30 s, and at least until an upload outlasted boto3's own retries
            # (15-35 s) so that ttspool's retry-in-place is what carries the job.
            while time.monotonic() - down_at < 30 or "upload failed (try" not in log.read_text():
                assert time.monotonic() - down_at < 120, _tail(log)
                seen |= {i for i, st in _statuses(client, ids).items() if st.done}
                time.sleep(0.5)
            down_s = time.monotonic() - down_at
            proxy.start()
            final = _wait_all(client, ids, r, log)
        _assert_stored(s3, final)
        assert all(r.get(f"ttspool:deliveries:{i}") is None for i in ids)
        assert "requeueing" not in log.read_text()
        print(f"\nS3 outage of {down_s:.0f} s: {len(seen)} of {len(ids)} jobs done before or during it, "
              f"all {len(ids)} stored after it, none requeued")


def test_storage_down_costs_one_retry_budget_per_batch(broker: LocalRedis, s3: S3Endpoint, aws_env,
                                                       tmp_path: Path) -> None:
    with _s3_behind_proxy(s3, "budget") as (proxy, s3):
        env = _env(broker, s3, aws_env, TTSPOOL_STORAGE_URL=f"s3://{s3.bucket}/jobs", TTSPOOL_MAX_BATCH="4",
                   TTSPOOL_MAX_WAIT_MS="2000", TTSPOOL_UPLOAD_RETRY_S="5", TTSPOOL_VISIBILITY_TIMEOUT="3600",
                   # One store thread: rows are tried one after the other, so the log shows
                   # which used the budget and which went back untried.
                   TTSPOOL_STORE_THREADS="1")
        log = tmp_path / "worker.log"
        r = redis.Redis.from_url(broker.url)
        with running_worker(env, log) as (proc, client):
            proxy.cut()
            ids = client.submit_many(_jobs(4, "budget"))
            # Per row, the batch would hold the worker for four budgets and four rounds of
            # boto3's retries before giving anything back.
            _until("the batch given back", lambda: "of this batch go back to the queue" in log.read_text(), 200,
                   proc, log)
            proxy.start()
            final = _wait_all(client, ids, r, log)
        _assert_stored(s3, final)
        text = log.read_text()
        first = text[:text.index("of this batch go back to the queue")]
        assert first.count("upload failed, the job goes back to the queue") == 1, _tail(log)
        assert "storage is down: 4 job(s) of this batch go back to the queue" in text


def test_job_that_kills_the_worker_is_dead_lettered(broker: LocalRedis, s3: S3Endpoint, aws_env, tmp_path: Path) -> None:
    env = _env(broker, s3, aws_env, TTSPOOL_MAX_BATCH="8", TTSPOOL_MAX_STRIKES="2",
               TTSPOOL_FAULT_CRASH_ON_TEXT="kaboom")
    r = redis.Redis.from_url(broker.url)
    logs = [tmp_path / f"worker{n}.log" for n in range(4)]
    procs = [start_worker(env, logs[0])]
    client = Client(Settings.from_env(env))
    try:
        wait_ready(client, procs[0], logs[0])
        innocent = client.submit_many(_jobs(7, "innocent"))
        poison = client.submit({"text": "This one goes kaboom every time.", "job_id": "poison"})
        deadline = time.monotonic() + 400
        while not all(st.done for st in _statuses(client, [*innocent, poison]).values()):
            if procs[-1].poll() is not None:  # what a supervisor (Kubernetes) would do
                assert len(procs) < len(logs), "the worker kept crashing"
                procs.append(start_worker(env, logs[len(procs)]))
            assert time.monotonic() < deadline, _tail(logs[len(procs) - 1])
            time.sleep(0.2)
        assert [p.returncode for p in procs[:-1]] == [86, 86]  # faults.CRASH_EXIT_CODE, once per strike
        # The first crash took batch-mates with it; they were not blamed for it.
        first = re.search(r"crashing the worker process inside a batch of (\d+)", logs[0].read_text())
        assert first is not None and int(first.group(1)) > 1
        assert all(st.status == "SUCCESS" for st in client.wait(innocent, timeout=10))
        dead = client.status(poison)
        assert dead.status == "FAILURE" and "RedeliveryLimit" in (dead.error or ""), dead
        entries = [json.loads(e) for e in r.lrange("ttspool:dead", 0, -1)]
        assert [e["id"] for e in entries] == [poison]
        assert entries[0]["kwargs"]["text"].endswith("kaboom every time.") and "limit 2" in entries[0]["reason"]
        # The queue keeps flowing on the surviving worker.
        after = client.wait(client.submit_many(_jobs(3, "after")), timeout=120)
        assert all(st.status == "SUCCESS" for st in after) and procs[-1].poll() is None
    finally:
        client.close()
        for p in procs:
            stop_process(p)


def test_injected_gpu_oom_splits_the_batch_and_fails_only_the_row(broker: LocalRedis, s3: S3Endpoint, aws_env,
                                                                  tmp_path: Path) -> None:
    env = _env(broker, s3, aws_env, TTSPOOL_MAX_BATCH="8", TTSPOOL_FAULT_OOM_ABOVE="2",
               TTSPOOL_FAULT_OOM_ON_TEXT="elephant")
    log = tmp_path / "worker.log"
    with running_worker(env, log) as (proc, client):
        ids = client.submit_many(_jobs(6, "oom") + [{"text": "An elephant does not fit.", "job_id": "too-big"}])
        done = dict(zip(ids, client.wait(ids, timeout=300)))
        big = done.pop("too-big")
        assert big.status == "FAILURE" and "OutOfMemoryError" in (big.error or ""), big
        _assert_stored(s3, list(done.values()))
        assert "failed (OutOfMemoryError); retrying in halves" in log.read_text()
        after = client.wait([client.submit({"text": "Still serving after an OOM."})], timeout=120)[0]
        assert after.status == "SUCCESS" and proc.poll() is None


def test_a_hung_batch_fails_healthz(broker: LocalRedis, s3: S3Endpoint, aws_env, tmp_path: Path) -> None:
    """A batch wedged past the visibility timeout (its jobs go to other workers by then)
    makes /healthz answer 503, so the orchestrator restarts the worker."""
    port = free_port()
    env = _env(broker, s3, aws_env, TTSPOOL_METRICS_PORT=str(port), TTSPOOL_FAULT_HANG_ON_TEXT="wedged")
    log = tmp_path / "worker.log"
    proc = start_worker(env, log)
    client = Client(Settings.from_env(env))
    try:
        wait_ready(client, proc, log)
        assert _health(port)[0] == 200
        client.submit({"text": "This one gets wedged."})
        status, body = _until("/healthz to fail", lambda: (h := _health(port))[0] == 503 and h, 90, proc, log, poll=0.5)
        assert body["model_loaded"] and body["broker"] and "one batch has run for" in body["scheduler"], body
    finally:
        client.close()
        stop_process(proc, timeout=5)


def _health(port: int) -> tuple[int, dict[str, object]]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_broker_at_maxmemory_keeps_the_worker_and_the_audio(broker: LocalRedis, s3: S3Endpoint, aws_env,
                                                            tmp_path: Path) -> None:
    """Redis at maxmemory (noeviction) refuses every write: the worker keeps running and
    keeps the audio it made, a worker started meanwhile stays up, producers get
    BrokerFull; all ends well once memory is free."""
    env = _env(broker, s3, aws_env, TTSPOOL_MAX_BATCH="8")
    log, log2 = tmp_path / "worker.log", tmp_path / "worker2.log"
    r = redis.Redis.from_url(broker.url)
    second = None
    try:
        with running_worker(env, log) as (proc, client):
            ids = client.submit_many(_jobs(4, "full", words=150))  # long rows: seconds of generation
            # The batch has started (its strikes are written): it will upload its audio and
            # then find its results refused.
            _until("the batch to start", lambda: r.get("ttspool:strikes:full-0") == b"1", 30, proc, log, poll=0.002)
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", 1)  # below what Redis uses: every write is refused from here
            try:
                with pytest.raises(BrokerFull, match="maxmemory"):
                    client.submit({"text": "No room for this one."})
                _until("the refusal", lambda: "the broker refuses writes" in log.read_text(), 60, proc, log)
                # A worker (re)started while the broker is full, as an orchestrator would.
                second = start_worker(env, log2)
                time.sleep(20)  # refused writes, retried with pauses, stop neither worker
                assert proc.poll() is None and second.poll() is None, _tail(log2)
                assert all(client.status(i).status == "STARTED" for i in ids)
            finally:
                r.config_set("maxmemory", 0)
            done = _wait_all(client, ids, r, log, timeout=120)
            _assert_stored(s3, done)
            # Served from the audio stored before the refusal, not synthesized a second time.
            assert all(client.app.backend.get_task_meta(i)["result"]["cached"] for i in ids), _tail(log)
            after = client.wait([client.submit({"text": "Still serving after a full broker."})], timeout=120)[0]
            assert after.status == "SUCCESS" and proc.poll() is None and second.poll() is None
    finally:
        if second is not None:
            stop_process(second)
