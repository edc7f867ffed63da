"""Faults of the worker process: killed mid-batch, stopped, killed right after a fetch, killed by a job.

Real faults against real processes: no job is lost, none is reported twice differently
(tests/fault_tools.py says how they are set up)."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import redis

from tasks.cli.local_redis import LocalRedis
from tasks.producer import Client
from tasks.settings import QUEUE_BULK, Settings

from .conftest import S3Endpoint, running_worker, start_worker, stop_process, wait_ready
from .fault_tools import VISIBILITY_S, assert_stored, fault_env, jobs, statuses_of, tail, until, wait_all


def test_sigkill_mid_batch_loses_nothing(broker: LocalRedis, s3: S3Endpoint, aws_env, tmp_path: Path) -> None:
    env = fault_env(broker, s3, aws_env, TTSPOOL_MAX_BATCH="4")
    r = redis.Redis.from_url(broker.url)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    with running_worker(env, log_a) as (proc_a, client):
        ids = client.submit_many(jobs(24, "kill"))
        # Kill while a GPU batch runs (its jobs hold a strike) and some jobs are done.
        until("a batch in flight after a finished one", lambda: any(client.status(i).done for i in ids)
               and any(r.get(f"ttspool:strikes:{i}") == b"1" for i in ids), 300, proc_a, log_a, poll=0.01)
        proc_a.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        proc_a.wait()
        before = {i: st for i, st in statuses_of(client, ids).items() if st.done}
        unfinished = [i for i in ids if i not in before]
        assert unfinished, "the kill came too late to test anything"
        proc_b = start_worker(env, log_b)
        try:
            until("a killed job's redelivery", lambda: any(int(r.get(f"ttspool:deliveries:{i}") or 0) > 1
                                                           for i in unfinished), 120, proc_b, log_b)
            redelivered_after = time.monotonic() - killed_at
            final = wait_all(client, ids, r, log_b)
        finally:
            stop_process(proc_b)
    assert_stored(s3, final)
    after = dict(zip(ids, final))
    # A job done before the kill keeps its result; at most one output per job.
    assert all(after[i] == st for i, st in before.items())
    print(f"\nSIGKILL: {len(unfinished)} of {len(ids)} jobs unfinished at the kill; first one "
          f"redelivered {redelivered_after:.1f} s after the kill (visibility timeout {VISIBILITY_S} s)")
    assert redelivered_after < 3600  # the transport default: the configured timeout was used


def test_sigterm_finishes_the_batch_and_gives_back_the_rest(broker: LocalRedis, s3: S3Endpoint, aws_env,
                                                            tmp_path: Path) -> None:
    env = fault_env(broker, s3, aws_env, TTSPOOL_MAX_BATCH="4", TTSPOOL_VISIBILITY_TIMEOUT="3600")
    r = redis.Redis.from_url(broker.url)
    log = tmp_path / "worker.log"
    with running_worker(env, log) as (proc, client):
        ids = client.submit_many(jobs(24, "term", words=30))
        in_batch = until("a batch in flight", lambda: [i for i in ids if r.get(f"ttspool:strikes:{i}") == b"1"],
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
        assert proc.returncode == 0, tail(log)
        statuses = statuses_of(client, ids)
        # The batch that was running finished, uploaded and was acked...
        assert_stored(s3, [statuses[i] for i in in_batch])
        # ...and every other job is either done or back on the queue, none left unacked.
        assert r.hlen("unacked") == 0
        queued = {json.loads(m)["headers"]["id"] for m in r.lrange(QUEUE_BULK, 0, -1)}
        done = {i for i, st in statuses.items() if st.done}
        assert done | queued == set(ids) and not done & queued and not set(in_batch) & queued
        print(f"\nSIGTERM: exited {stop_s:.1f} s after the signal, the running batch of {len(in_batch)} finished "
              f"{batch_done_s or stop_s:.1f} s after it; {len(queued)} held/queued job(s) went back to the queue")
    with running_worker(env, tmp_path / "again.log") as (_, client):
        assert_stored(s3, client.wait(ids, timeout=300))
    # Jobs of the finished batch were never delivered again: a job's delivery count goes
    # when it ends, and a delivery after that would have brought it back.
    assert all(r.get(f"ttspool:deliveries:{i}") is None for i in in_batch)


def test_worker_killed_right_after_the_fetch_loses_nothing(broker: LocalRedis, s3: S3Endpoint, aws_env,
                                                           tmp_path: Path) -> None:
    """The worker dies between taking a message off the queue and delivering it: the
    message is the broker's (unacked) all along, and the restarted worker runs it."""
    env = fault_env(broker, s3, aws_env)
    logs = [tmp_path / "worker0.log", tmp_path / "worker1.log"]
    r = redis.Redis.from_url(broker.url)
    first = start_worker({**env, "TTSPOOL_FAULT_EXIT_AFTER_FETCH": "fetched-0"}, logs[0])
    client = Client(Settings.from_env(env))
    second = None
    try:
        wait_ready(client, first, logs[0])
        [job] = client.submit_many(jobs(1, "fetched"))
        until("the worker to die after the fetch", lambda: first.poll() is not None, 60, log=logs[0])
        assert first.returncode == 86 and r.llen(QUEUE_BULK) == 0 and r.hlen("unacked") == 1
        second = start_worker(env, logs[1])  # what a supervisor does
        final = wait_all(client, [job], r, logs[1], timeout=180)
        assert [st.status for st in final] == ["SUCCESS"]
    finally:
        client.close()
        for proc in (first, second):
            if proc is not None:
                stop_process(proc)


def test_job_that_kills_the_worker_is_dead_lettered(broker: LocalRedis, s3: S3Endpoint, aws_env, tmp_path: Path) -> None:
    env = fault_env(broker, s3, aws_env, TTSPOOL_MAX_BATCH="8", TTSPOOL_MAX_STRIKES="2",
               TTSPOOL_FAULT_CRASH_ON_TEXT="kaboom")
    r = redis.Redis.from_url(broker.url)
    logs = [tmp_path / f"worker{n}.log" for n in range(4)]
    procs = [start_worker(env, logs[0])]
    client = Client(Settings.from_env(env))
    try:
        wait_ready(client, procs[0], logs[0])
        innocent = client.submit_many(jobs(7, "innocent"))
        poison = client.submit({"text": "This one goes kaboom every time.", "job_id": "poison"})
        deadline = time.monotonic() + 400
        while not all(st.done for st in statuses_of(client, [*innocent, poison]).values()):
            if procs[-1].poll() is not None:  # what a supervisor (Kubernetes) would do
                assert len(procs) < len(logs), "the worker kept crashing"
                procs.append(start_worker(env, logs[len(procs)]))
            assert time.monotonic() < deadline, tail(logs[len(procs) - 1])
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
        after = client.wait(client.submit_many(jobs(3, "after")), timeout=120)
        assert all(st.status == "SUCCESS" for st in after) and procs[-1].poll() is None
    finally:
        client.close()
        for p in procs:
            stop_process(p)
