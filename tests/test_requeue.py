"""A job whose upload fails (storage down, not refusing) is requeued, not acked, and
finishes once storage works."""

from __future__ import annotations

import json
import time

import redis

from tasks.producer import Client
from tasks.settings import Settings

from .conftest import S3Endpoint, start_worker, stop_process, worker_env
from .fault_tools import s3_behind_proxy, until


def test_upload_failure_requeues_until_storage_is_back(redis_server, s3: S3Endpoint, aws_env, tmp_path) -> None:
    # Its own Redis database, so the session worker never sees these messages.
    broker = redis_server.url.rsplit("/", 1)[0] + "/3"
    with s3_behind_proxy(s3, "requeue") as (proxy, endpoint):
        env = worker_env(broker, endpoint, aws_env, TTSPOOL_STORAGE_URL=f"s3://{endpoint.bucket}/x",
                         TTSPOOL_MAX_STRIKES="100", TTSPOOL_UPLOAD_RETRY_S="2")
        log = tmp_path / "worker.log"
        proc = start_worker(env, log)
        client = Client(Settings.from_env(env))
        r = redis.Redis.from_url(broker)
        # The result backend publishes every state it records: the job's history, in order.
        events = r.pubsub(ignore_subscribe_messages=True)
        events.subscribe("celery-task-meta-requeue-1")
        try:
            until("the worker ready", lambda: "worker ready" in log.read_text(), 180, proc, log)
            proxy.cut()  # down (connections refused), which a retry mends: not a refusal
            job = client.submit({"text": "Stored on the second try.", "job_id": "requeue-1"})
            until("the job given back", lambda: "goes back to the queue" in log.read_text(), 180, proc, log)
            assert client.status(job).status != "SUCCESS"
            proxy.start()
            st = client.wait([job], timeout=180)[0]
            assert st.status == "SUCCESS", st
            key = st.url.removeprefix(f"s3://{endpoint.bucket}/")
            assert s3.client().head_object(Bucket=endpoint.bucket, Key=key)["ContentLength"] > 44
            assert int(r.get("ttspool:deliveries:requeue-1") or 0) == 0  # deleted as the job ended
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
