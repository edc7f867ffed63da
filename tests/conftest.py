"""Real parts for the pipeline tests: redis-server, an S3 endpoint (moto), a worker process.

Everything here listens on 127.0.0.1 only, and every process a fixture starts is
stopped by that fixture.
"""

from __future__ import annotations

import base64
import json
import os

# The suite runs as two processes on two cores (deploy/test.sh): each torch in it (the
# tests' own engines and every worker they start, which inherit this) runs one thread,
# so that two engines never spin their thread pools against each other. Set before
# anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import subprocess
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import boto3
import pytest
from hypothesis import settings as hypothesis_settings

from tasks.cli import worker_process
from tasks.cli.local_redis import LocalRedis, free_port
from tasks.cli.worker_process import stop_worker as stop_process  # noqa: F401 - the tests take it from here
from tasks.producer import Client
from tasks.settings import QUEUE_BULK, TASK_NAME, Settings

# Property tests draw the same examples on every run: CI must not turn red on a new
# random draw. Each explicit @settings(...) inherits this.
hypothesis_settings.register_profile("ttspool", derandomize=True)
hypothesis_settings.load_profile("ttspool")

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "ttspool-test"
PREFIX = "jobs"
FAKE_SECRET = "FAKE-SECRET-ttspool-3f9a"
# Rows whose text holds this leak 200 KB each in the session's worker (workers/faults.py):
# tests/test_leak.py shows its measurement sees a leak.
LEAK_MARKER = " Leaks here."


@dataclass
class Request:
    """What the worker's batch function (BatchRunner) reads of a celery-batches
    SimpleRequest: for in-process tests that call it directly."""

    id: str
    kwargs: dict[str, Any]
    args: list[Any] = field(default_factory=list)


@contextmanager
def idle_client(redis_server: LocalRedis, db: int) -> Iterator[Client]:
    """A producer on a broker database (`db`) that no worker reads, empty before and after."""
    c = Client(Settings(broker_url=redis_server.url.rsplit("/", 1)[0] + f"/{db}"))
    c.redis.flushdb()
    try:
        yield c
    finally:
        c.redis.flushdb()
        c.close()


@pytest.fixture(scope="module")
def own_broker() -> Iterator[LocalRedis]:
    """A Redis of the test module's own (MONITOR sees its commands only)."""
    server = LocalRedis().start()
    yield server
    server.close()


@pytest.fixture()
def broker() -> Iterator[LocalRedis]:
    """A Redis of the test's own, with persistence: the fault tests kill and restart it."""
    server = LocalRedis(persist=True).start()
    try:
        yield server
    finally:
        server.close()


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
        # Its own loopback port: workers of parallel tests must not fight over 9808.
        "TTSPOOL_METRICS_PORT": str(free_port()),
        "TTSPOOL_METRICS_ADDR": "127.0.0.1",
        "PYTHONUNBUFFERED": "1",
        # As the image sets it (deploy/docker/Dockerfile): the soak test bounds RSS growth.
        "MALLOC_ARENA_MAX": "2",
    })
    env.update(extra)
    return env


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return worker_process.start_worker(env, log, cwd=ROOT)


@pytest.fixture(scope="session")
def worker(redis_server: LocalRedis, s3: S3Endpoint, aws_env: dict[str, str], tmp_path_factory) -> Iterator[WorkerProc]:
    env = worker_env(redis_server.url, s3, aws_env, TTSPOOL_FAULT_LEAK_ON_TEXT=LEAK_MARKER.strip(". "))
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with running_worker(env, log) as (proc, _):
        yield WorkerProc(proc, log, Settings.from_env(env), env)


def wait_ready(client: Client, proc: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> None:
    """Ready means: the worker has loaded the model and served a job end to end."""
    try:
        worker_process.wait_ready(client, proc, log, timeout)
    except (RuntimeError, TimeoutError):
        pytest.fail(f"worker did not become ready:\n{log.read_text(errors='replace')[-5000:]}")


@contextmanager
def running_worker(env: dict[str, str], log: Path) -> Iterator[tuple[subprocess.Popen[bytes], Client]]:
    """A ready worker subprocess and a client; both stopped when the block ends, failed or not."""
    with worker_process.running_worker(env, log, cwd=ROOT) as proc:
        client = Client(Settings.from_env(env))
        try:
            wait_ready(client, proc, log)
            yield proc, client
        finally:
            client.close()


def raw_message(job_id: str, body: bytes, content_type: str = "application/json", task: str = TASK_NAME) -> str:
    """A Celery protocol-2 message as it sits on a Redis list, for clients other than Python's."""
    return json.dumps({
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": {"lang": "js", "task": task, "id": job_id, "root_id": job_id, "parent_id": None,
                    "group": None, "retries": 0, "eta": None, "expires": None, "argsrepr": "[]", "kwargsrepr": "{}"},
        "properties": {"correlation_id": job_id, "reply_to": "", "delivery_mode": 2,
                       "delivery_info": {"exchange": QUEUE_BULK, "routing_key": QUEUE_BULK},
                       "priority": 0, "body_encoding": "base64", "delivery_tag": uuid.uuid4().hex},
    })


@pytest.fixture()
def client(worker: WorkerProc) -> Iterator[Client]:
    c = Client(worker.settings)
    yield c
    c.close()


def run_cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`ttspool ARGS` as a subprocess with `env`; output captured as text."""
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
