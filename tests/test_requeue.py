"""A job whose upload fails is requeued, not acked, and finishes once storage works."""

from __future__ import annotations

import json
import time

import redis

from tasks.producer import Client
from tasks.settings import Settings

from .conftest import S3Endpoint, start_worker, stop_process, worker_env


def test_upload_failure_requeues_until_storage_is_back(redis_server, s3: S3Endpoint, aws_env, tmp_path) -> None:
    bucket = "created-later"
    # Its own Redis database, so the session worker never sees these messages.
    broker = redis_server.url.rsplit("/", 1)[0] + "/3"
    env = worker_env(broker, s3, aws_env, TTSPOOL_STORAGE_URL=f"s3://{bucket}/x", TTSPOOL_MAX_STRIKES="100",
                     TTSPOOL_UPLOAD_RETRY_S="2")
    log = tmp_path / "worker.log"
    proc = start_worker(env, log)
    client = Client(Settings.from_env(env))
    r = redis.Redis.from_url(broker)
    # The result backend publishes every state it records: the job's history, in order.
    events = r.pubsub(ignore_subscribe_messages=True)
    events.subscribe("celery-task-meta-requeue-1")
    try:
        job = client.submit({"text": "Stored on the second try.", "job_id": "requeue-1"})
        deadline = time.monotonic() + 180
        while int(r.get("ttspool:deliveries:requeue-1") or 0) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)
        assert client.status(job).status != "SUCCESS"
        s3.client().create_bucket(Bucket=bucket)
        st = client.wait([job], timeout=120)[0]
        assert st.status == "SUCCESS", st
        key = st.url.removeprefix(f"s3://{bucket}/")
        assert s3.client().head_object(Bucket=bucket, Key=key)["ContentLength"] > 44
        states = []
        end = time.monotonic() + 3
        while time.monotonic() < end:
            message = events.get_message(timeout=0.5)
            if message is not None:
                states.append(json.loads(message["data"])["status"])
        # Back in the queue after the failed upload, it reads PENDING (queued), not STARTED.
        assert states[:3] == ["STARTED", "PENDING", "STARTED"] and states[-1] == "SUCCESS", states
    finally:
        events.close()
        client.close()
        stop_process(proc)
        r.flushdb()
