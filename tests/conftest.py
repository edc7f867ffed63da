"""Real parts for the pipeline tests: redis-server, an S3 endpoint (moto), a worker process.

Everything here listens on 127.0.0.1 only, and every process a fixture starts is
stopped by that fixture.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import boto3
import pytest

from tasks.local_redis import LocalRedis
from tasks.producer import Client
from tasks.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "ttspool-test"
PREFIX = "jobs"
FAKE_SECRET = "FAKE-SECRET-ttspool-3f9a"


@dataclass
class S3Endpoint:
    url: str
    bucket: str

    def client(self):  # -> botocore S3 client
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    server = LocalRedis().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def aws_env() -> Iterator[dict[str, str]]:
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3(aws_env: dict[str, str]) -> Iterator[S3Endpoint]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = S3Endpoint(f"http://{host}:{port}", BUCKET)
    endpoint.client().create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@dataclass
class WorkerProc:
    proc: subprocess.Popen[bytes]
    log: Path
    settings: Settings
    env: dict[str, str]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def worker_env(redis_url: str, s3: S3Endpoint, aws_env: dict[str, str], **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(aws_env)
    env.update({
        "TTSPOOL_BROKER_URL": redis_url,
        "TTSPOOL_STORAGE_URL": f"s3://{s3.bucket}/{PREFIX}",
        "TTSPOOL_S3_ENDPOINT_URL": s3.url,
        "TTSPOOL_MODEL": "random-tiny",
        "TTSPOOL_DEVICE": "cpu",
        "TTSPOOL_MAX_BATCH": "8",
        "TTSPOOL_MAX_WAIT_MS": "300",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tasks.cli", "worker", "--loglevel", "INFO"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def worker(redis_server: LocalRedis, s3: S3Endpoint, aws_env: dict[str, str], tmp_path_factory) -> Iterator[WorkerProc]:
    env = worker_env(redis_server.url, s3, aws_env)
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    proc = start_worker(env, log)
    settings = Settings.from_env(env)
    handle = WorkerProc(proc, log, settings, env)
    client = Client(settings)
    try:
        # Ready means: it has loaded the model and served a job end to end.
        job = client.submit({"text": "warm up", "job_id": "fixture-warmup"})
        deadline = time.monotonic() + 300
        while not client.status(job).done:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"worker did not become ready:\n{handle.log_text()[-5000:]}")
            time.sleep(0.2)
        yield handle
    finally:
        client.close()
        stop_process(proc)


@pytest.fixture()
def client(worker: WorkerProc) -> Iterator[Client]:
    c = Client(worker.settings)
    yield c
    c.close()
