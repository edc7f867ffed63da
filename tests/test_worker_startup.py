"""A worker whose setup cannot work refuses to start, before it loads the model and
before it takes a job: no Redis, a store that does not answer or has no credentials, a
metrics port another worker holds. And a store that starts refusing later (its bucket
deleted) is not retried: the job goes back to the queue once and the worker stops.

Each worker here is a real `ttspool worker` process; the refusals cost seconds (the
imports), the last test a full worker start."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
import redis

from tasks.cli.local_redis import LocalRedis
from tasks.producer import Client
from tasks.settings import QUEUE_BULK, Settings
from workers.pipeline.recorder import DELIVERIES

from .conftest import S3Endpoint, running_worker, start_worker, stop_process, worker_env
from .test_doctor import closed_port

# What a worker logs once it loads the model, and once it takes jobs.
_MODEL_LOADING = ("engine ready", "ChatTTS")
_READY = "worker ready"


def _refusal(env: dict[str, str], log: Path) -> tuple[int, str]:
    """Exit status and output of a worker expected to refuse at start."""
    proc = start_worker(env, log)
    try:
        rc = proc.wait(120)
    finally:
        stop_process(proc)
    return rc, log.read_text(errors="replace")


def _error_line(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("ttspool: error: ")]
    assert len(errors) == 1, output[-3000:]
    return errors[0]


def _queued(r: redis.Redis, job_id: str) -> int:
    """How many of the job's messages wait in its queue (Redis priorities are separate
    lists: the queue and its suffixed siblings)."""
    return sum(job_id.encode() in message for key in r.keys(QUEUE_BULK + "*") if r.type(key) == b"list"
               for message in r.lrange(key, 0, -1))


def test_no_redis_refuses_before_the_model(s3: S3Endpoint, aws_env: dict[str, str], tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    rc, output = _refusal(worker_env(url, s3, aws_env), tmp_path / "worker.log")
    assert rc == 1
    line = _error_line(output)
    assert url in line and "TTSPOOL_BROKER_URL" in line and "Redis 7" not in output
    assert not any(mark in output for mark in (*_MODEL_LOADING, _READY)), output[-3000:]


def _no_aws(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The environment without any S3 credentials boto3 could find (and without asking
    the instance metadata address, which is not loopback)."""
    env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    return env | {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "none"),
                  "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.mark.parametrize("fault", ["dead endpoint", "no credentials"])
def test_a_store_it_cannot_use_refuses_before_the_model(fault: str, own_broker: LocalRedis, s3: S3Endpoint,
                                                        aws_env: dict[str, str], tmp_path: Path) -> None:
    client = Client(Settings(broker_url=own_broker.url))
    try:
        job_id = client.submit({"text": "Waiting for a worker.", "job_id": f"before-{fault.replace(' ', '-')}"})
        env = worker_env(own_broker.url, s3, aws_env)
        if fault == "dead endpoint":
            env["TTSPOOL_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{closed_port()}"
        else:
            env = _no_aws(env, tmp_path)
        rc, output = _refusal(env, tmp_path / "worker.log")
        assert rc == 1
        line = _error_line(output)
        assert line.startswith(f"ttspool: error: storage s3://{s3.bucket}/") and "; fix: " in line
        assert ("TTSPOOL_S3_ENDPOINT_URL" if fault == "dead endpoint" else "AWS_ACCESS_KEY_ID") in line
        assert not any(mark in output for mark in (*_MODEL_LOADING, _READY)), output[-3000:]
        # It never consumed: the job submitted before waits in the queue, untouched.
        assert _queued(client.redis, job_id) == 1 and client.status(job_id).status == "PENDING"
        assert client.redis.get(DELIVERIES + job_id) is None
    finally:
        client.close()


def test_a_metrics_port_in_use_names_the_setting(redis_server: LocalRedis, s3: S3Endpoint,
                                                 aws_env: dict[str, str], tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:  # the first worker on this host
        port = taken.getsockname()[1]
        env = worker_env(redis_server.url, s3, aws_env, TTSPOOL_METRICS_PORT=str(port))
        rc, output = _refusal(env, tmp_path / "worker.log")
    assert rc == 2
    line = _error_line(output)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "TTSPOOL_METRICS_PORT" in line
    assert not any(mark in output for mark in (*_MODEL_LOADING, _READY)), output[-3000:]


def test_a_bucket_deleted_under_a_running_worker_is_not_retried(broker: LocalRedis, s3: S3Endpoint,
                                                                aws_env: dict[str, str], tmp_path: Path) -> None:
    bucket = "ttspool-goes-away"
    s3.client().create_bucket(Bucket=bucket)
    env = worker_env(broker.url, s3, aws_env, TTSPOOL_STORAGE_URL=f"s3://{bucket}/jobs")
    log = tmp_path / "worker.log"
    with running_worker(env, log) as (proc, client):
        # The warm-up job's objects first: S3 deletes only an empty bucket.
        for obj in s3.client().list_objects_v2(Bucket=bucket).get("Contents", []):
            s3.client().delete_object(Bucket=bucket, Key=obj["Key"])
        s3.client().delete_bucket(Bucket=bucket)
        job_id = client.submit({"text": "Nowhere to put this.", "job_id": "no-bucket"})
        try:
            rc = proc.wait(120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker kept running:\n{log.read_text(errors='replace')[-3000:]}")
        output = log.read_text(errors="replace")
        assert rc == 1
        line = _error_line(output)
        assert "NoSuchBucket" in line and "fix: create the bucket" in line
        # Tried once, not retried as if storage were down for a while; back in the queue
        # once, for the next worker (which refuses at its probe until the bucket is back).
        assert "retrying" not in output and output.count("upload refused") == 1
        assert client.redis.get(DELIVERIES + job_id) == b"1"
        assert _queued(client.redis, job_id) == 1 and client.status(job_id).status == "PENDING"
