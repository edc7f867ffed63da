"""Faults of the object store: down for longer than boto3's retries, and down for a whole batch.

Real faults against real processes: no job is lost, none is reported twice differently
(tests/fault_tools.py says how they are set up)."""

from __future__ import annotations

import time
from pathlib import Path

import redis

from tasks.cli.local_redis import LocalRedis

from .conftest import S3Endpoint, running_worker
from .fault_tools import assert_stored, fault_env, jobs, s3_behind_proxy, statuses_of, tail, until, wait_all


def test_s3_down_for_30_s_uploads_retry_in_place(broker: LocalRedis, s3: S3Endpoint, aws_env, tmp_path: Path) -> None:
    with s3_behind_proxy(s3, "outage") as (proxy, s3):
        # One delivery allowed: a job put back on the queue would show up as a second one.
        env = fault_env(broker, s3, aws_env, TTSPOOL_STORAGE_URL=f"s3://{s3.bucket}/jobs", TTSPOOL_MAX_BATCH="4",
                   TTSPOOL_UPLOAD_RETRY_S="120", TTSPOOL_MAX_STRIKES="1", TTSPOOL_VISIBILITY_TIMEOUT="3600")
        log = tmp_path / "worker.log"
        r = redis.Redis.from_url(broker.url)
        with running_worker(env, log) as (proc, client):
            ids = client.submit_many(jobs(12, "s3down"))
            until("some jobs done", lambda: any(client.status(i).done for i in ids), 300, proc, log)
            proxy.cut()
            down_at = time.monotonic()
            seen: set[str] = set()
            # Down for 30 s, and at least until an upload outlasted boto3's own retries
            # (15-35 s) so that ttspool's retry-in-place is what carries the job.
            while time.monotonic() - down_at < 30 or "upload failed (try" not in log.read_text():
                assert time.monotonic() - down_at < 120, tail(log)
                seen |= {i for i, st in statuses_of(client, ids).items() if st.done}
                time.sleep(0.5)
            down_s = time.monotonic() - down_at
            proxy.start()
            final = wait_all(client, ids, r, log)
        assert_stored(s3, final)
        assert all(r.get(f"ttspool:deliveries:{i}") is None for i in ids)
        assert "requeueing" not in log.read_text()
        print(f"\nS3 outage of {down_s:.0f} s: {len(seen)} of {len(ids)} jobs done before or during it, "
              f"all {len(ids)} stored after it, none requeued")


def test_storage_down_costs_one_retry_budget_per_batch(broker: LocalRedis, s3: S3Endpoint, aws_env,
                                                       tmp_path: Path) -> None:
    with s3_behind_proxy(s3, "budget") as (proxy, s3):
        env = fault_env(broker, s3, aws_env, TTSPOOL_STORAGE_URL=f"s3://{s3.bucket}/jobs", TTSPOOL_MAX_BATCH="4",
                   TTSPOOL_MAX_WAIT_MS="2000", TTSPOOL_UPLOAD_RETRY_S="5", TTSPOOL_VISIBILITY_TIMEOUT="3600",
                   # One store thread: rows are tried one after the other, so the log shows
                   # which used the budget and which went back untried.
                   TTSPOOL_STORE_THREADS="1")
        log = tmp_path / "worker.log"
        r = redis.Redis.from_url(broker.url)
        with running_worker(env, log) as (proc, client):
            proxy.cut()
            ids = client.submit_many(jobs(4, "budget"))
            # Per row, the batch would hold the worker for four budgets and four rounds of
            # boto3's retries before giving anything back.
            until("the batch given back", lambda: "of this batch go back to the queue" in log.read_text(), 200,
                   proc, log)
            proxy.start()
            final = wait_all(client, ids, r, log)
        assert_stored(s3, final)
        text = log.read_text()
        first = text[:text.index("of this batch go back to the queue")]
        assert first.count("upload failed, the job goes back to the queue") == 1, tail(log)
        assert "storage is down: 4 job(s) of this batch go back to the queue" in text
