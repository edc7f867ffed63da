"""Faults of the broker: Redis restarted, connections dropped at the worst moments, Redis at maxmemory.

Real faults against real processes: no job is lost, none is reported twice differently
(tests/fault_tools.py says how they are set up)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
import redis

from tasks.cli.local_redis import LocalRedis, free_port
from tasks.errors import BrokerFull
from tasks.producer import Client
from tasks.settings import QUEUE_BULK, Settings
from workers.bench.tcp_proxy import TcpProxy

from .conftest import S3Endpoint, running_worker, start_worker, stop_process
from .fault_tools import assert_stored, counted_warm_up, fault_env, job_counts, jobs, tail, until, wait_all
from .scrape import fetch, parse, value


def test_redis_restart_loses_nothing(broker: LocalRedis, s3: S3Endpoint, aws_env, tmp_path: Path) -> None:
    env = fault_env(broker, s3, aws_env, TTSPOOL_MAX_BATCH="4")
    log = tmp_path / "worker.log"
    with running_worker(env, log) as (proc, client):
        ids = client.submit_many(jobs(16, "restart"))
        until("some jobs done", lambda: any(client.status(i).done for i in ids), 300, proc, log)
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGKILL)  # appendfsync always: every acked write is on disk
        broker.stop()
        submitted: list[str] = []
        # A producer submitting while Redis is down retries until it is back.
        producer = threading.Thread(target=lambda: submitted.extend(client.submit_many(jobs(2, "during"))))
        producer.start()
        time.sleep(3)
        broker.start()
        producer.join(60)
        assert len(submitted) == 2
        ids += submitted + client.submit_many(jobs(2, "after"))
        final = wait_all(client, ids, redis.Redis.from_url(broker.url), log)
        assert proc.poll() is None
    assert_stored(s3, final)
    assert "Connection to broker lost" in log.read_text()


def test_connection_lost_with_the_fetched_message_loses_nothing(broker: LocalRedis, s3: S3Endpoint,
                                                                 aws_env, tmp_path: Path) -> None:
    # The proxy drops the worker's connections at the reply that carries the message, so
    # Redis has popped it and the worker never sees it. kombu's BRPOP lost it there; the
    # fetch script recorded it as unacked in the same step, so it comes back.
    proxy = TcpProxy(("127.0.0.1", broker.port)).start()
    direct = Client(Settings(broker_url=broker.url))
    try:
        env = fault_env(broker, s3, aws_env, TTSPOOL_BROKER_URL=f"redis://127.0.0.1:{proxy.port}/0")
        log = tmp_path / "worker.log"
        with running_worker(env, log) as (proc, _):
            proxy.drop_at(lambda data: b"gap-0" in data, replies=True)
            [job] = direct.submit_many(jobs(1, "gap"))
            until("the connection to drop at the fetched message", proxy.dropped.is_set, 120, proc, log)
            final = wait_all(direct, [job], redis.Redis.from_url(broker.url), log, timeout=120)
            assert proc.poll() is None
        assert [st.status for st in final] == ["SUCCESS"], tail(log)
    finally:
        direct.close()
        proxy.close()


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
    proxy = TcpProxy(("127.0.0.1", broker.port)).start()
    direct = Client(Settings(broker_url=broker.url))
    try:
        port = free_port()
        # A visibility timeout past the 8 s outage and the retries after it: with the fault
        # tests' 10 s, the dropped consumer's messages came back while the first result was
        # still being retried (a loaded host, once in three suite runs), and the redelivery
        # was served from storage: a cached result, though nothing was made twice.
        env = fault_env(broker, s3, aws_env, TTSPOOL_BROKER_URL=f"redis://127.0.0.1:{proxy.port}/0",
                        TTSPOOL_MAX_BATCH="4", TTSPOOL_MAX_WAIT_MS="2000", TTSPOOL_METRICS_PORT=str(port),
                        TTSPOOL_VISIBILITY_TIMEOUT="40")
        log = tmp_path / "worker.log"
        with running_worker(env, log) as (proc, _):
            audio = value(parse(fetch(f"http://127.0.0.1:{port}/metrics")[1]), "ttspool_audio_seconds_total") or 0.0
            proxy.drop_at(lambda data: b"SETEX\r\n" in data and b"celery-task-meta-" in data and b"SUCCESS" in data,
                          outage_s=outage_s)
            ids = direct.submit_many(jobs(4, f"record{outage_s}"))
            until("the connection to drop at the first result", proxy.dropped.is_set, 120, proc, log)
            final = wait_all(direct, ids, redis.Redis.from_url(broker.url), log, timeout=120)
            assert proc.poll() is None
            made = value(parse(fetch(f"http://127.0.0.1:{port}/metrics")[1]), "ttspool_audio_seconds_total")
        assert_stored(s3, final)
        assert made is not None
        results = [direct.app.backend.get_task_meta(i)["result"] for i in ids]
        if outage_s < 20:
            # Each job's audio synthesized once: what the GPU made is what the results hold.
            assert abs((made - audio) - sum(st.duration_s for st in final)) < 0.01, tail(log)
            assert not any(r["cached"] for r in results), results
        else:
            assert any(r["cached"] for r in results), results
    finally:
        direct.close()
        proxy.close()


def test_broker_at_maxmemory_keeps_the_worker_and_the_audio(broker: LocalRedis, s3: S3Endpoint, aws_env,
                                                            tmp_path: Path) -> None:
    """Redis at maxmemory (noeviction) refuses every write: the worker keeps running and
    keeps the audio it made, a worker started meanwhile stays up, producers get
    BrokerFull; all ends well once memory is free."""
    port = free_port()
    env = fault_env(broker, s3, aws_env, TTSPOOL_MAX_BATCH="8", TTSPOOL_METRICS_PORT=str(port))
    log, log2 = tmp_path / "worker.log", tmp_path / "worker2.log"
    r = redis.Redis.from_url(broker.url)
    second = None
    try:
        with running_worker(env, log) as (proc, client):
            ids = client.submit_many(jobs(4, "full", words=150))  # long rows: seconds of generation
            # The batch has started (its strikes are written): it will upload its audio and
            # then find its results refused.
            until("the batch to start", lambda: r.get("ttspool:strikes:full-0") == b"1", 30, proc, log, poll=0.002)
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", 1)  # below what Redis uses: every write is refused from here
            try:
                with pytest.raises(BrokerFull, match="maxmemory"):
                    client.submit({"text": "No room for this one."})
                until("the refusal", lambda: "the broker refuses writes" in log.read_text(), 60, proc, log)
                # A worker (re)started while the broker is full, as an orchestrator would.
                second = start_worker({**env, "TTSPOOL_METRICS_PORT": "0"}, log2)
                # Refused writes, retried with pauses, stop neither worker: the first has
                # been refused again and again, the second has come up all the way.
                until("five refused ticks and the second worker ready",
                      lambda: (value(parse(fetch(f"http://127.0.0.1:{port}/metrics")[1]),
                                     "ttspool_broker_refused_writes_total") or 0) >= 5
                      and "worker ready" in log2.read_text(), 120, second, log2)
                assert proc.poll() is None and second.poll() is None, tail(log2)
                assert all(client.status(i).status == "STARTED" for i in ids)
            finally:
                r.config_set("maxmemory", 0)
            done = wait_all(client, ids, r, log, timeout=120)
            assert_stored(s3, done)
            # Served from the audio stored before the refusal, not synthesized a second time.
            assert all(client.app.backend.get_task_meta(i)["result"]["cached"] for i in ids), tail(log)
            after = client.wait([client.submit({"text": "Still serving after a full broker."})], timeout=120)[0]
            assert after.status == "SUCCESS" and proc.poll() is None and second.poll() is None
    finally:
        if second is not None:
            stop_process(second)


def test_redis_restart_without_its_data_sends_the_held_jobs_again(s3: S3Endpoint, aws_env, tmp_path: Path) -> None:
    """A Redis without persistence (`--save '' --appendonly no`) restarted on its port
    while the worker holds every job (a GPU batch running, the rest waiting in its
    window): the unacked records are gone with the data, and the worker sends what it
    held again (workers/broker/resend.py). Every job ends SUCCESS, recorded once and
    synthesized once."""
    broker = LocalRedis().start()
    try:
        port = free_port()
        env = fault_env(broker, s3, aws_env, TTSPOOL_MAX_BATCH="4", TTSPOOL_METRICS_PORT=str(port))
        log = tmp_path / "worker.log"
        r = redis.Redis.from_url(broker.url)
        with running_worker(env, log) as (proc, client):
            before = counted_warm_up(port, proc, log)
            audio = value(parse(fetch(f"http://127.0.0.1:{port}/metrics")[1]), "ttspool_audio_seconds_total") or 0
            ids = client.submit_many(jobs(8, "held", words=60))  # prefetch: two batches of 4
            until("every job held, four in a running batch",
                  lambda: r.llen(QUEUE_BULK) == 0 and r.hlen("unacked") == len(ids)
                  and r.get("ttspool:strikes:held-0") == b"1", 120, proc, log, poll=0.005)
            broker.stop()  # SIGTERM: with no save point, nothing is written to disk
            broker.start()
            final = wait_all(client, ids, r, log, timeout=180)
            assert proc.poll() is None
            until("every message acked", lambda: r.hlen("unacked") == 0, 30, proc, log)
            until("every job counted", lambda: sum(job_counts(port).values()) >= sum(before.values()) + 8, 30,
                  proc, log)
            after = job_counts(port)
            # Each job recorded once, and made once (none served again from its own audio).
            assert (after["synthesized"] - before["synthesized"], after["cache_hit"] - before["cache_hit"]) == (8, 0)
            made = value(parse(fetch(f"http://127.0.0.1:{port}/metrics")[1]), "ttspool_audio_seconds_total") or 0
            assert abs((made - audio) - sum(st.duration_s for st in final)) < 0.01, tail(log)
        assert_stored(s3, final)
        assert "held message(s) sent again" in log.read_text()
    finally:
        broker.close()
