"""Faults inside a GPU batch: out of memory, and a batch that never returns.

Real faults against real processes: no job is lost, none is reported twice differently
(tests/fault_tools.py says how they are set up)."""

from __future__ import annotations

from pathlib import Path

from tasks.cli.local_redis import LocalRedis, free_port
from tasks.producer import Client
from tasks.settings import Settings

from .conftest import S3Endpoint, running_worker, start_worker, stop_process, wait_ready
from .fault_tools import assert_stored, fault_env, health, jobs, until


def test_injected_gpu_oom_splits_the_batch_and_fails_only_the_row(broker: LocalRedis, s3: S3Endpoint, aws_env,
                                                                  tmp_path: Path) -> None:
    env = fault_env(broker, s3, aws_env, TTSPOOL_MAX_BATCH="8", TTSPOOL_FAULT_OOM_ABOVE="2",
               TTSPOOL_FAULT_OOM_ON_TEXT="elephant")
    log = tmp_path / "worker.log"
    with running_worker(env, log) as (proc, client):
        ids = client.submit_many(jobs(6, "oom") + [{"text": "An elephant does not fit.", "job_id": "too-big"}])
        done = dict(zip(ids, client.wait(ids, timeout=300)))
        big = done.pop("too-big")
        assert big.status == "FAILURE" and "OutOfMemoryError" in (big.error or ""), big
        assert_stored(s3, list(done.values()))
        assert "failed (OutOfMemoryError); retrying in halves" in log.read_text()
        after = client.wait([client.submit({"text": "Still serving after an OOM."})], timeout=120)[0]
        assert after.status == "SUCCESS" and proc.poll() is None


def test_a_hung_batch_fails_healthz(broker: LocalRedis, s3: S3Endpoint, aws_env, tmp_path: Path) -> None:
    """A batch wedged past the visibility timeout (its jobs go to other workers by then)
    makes /healthz answer 503, so the orchestrator restarts the worker."""
    port = free_port()
    env = fault_env(broker, s3, aws_env, TTSPOOL_METRICS_PORT=str(port), TTSPOOL_FAULT_HANG_ON_TEXT="wedged")
    log = tmp_path / "worker.log"
    proc = start_worker(env, log)
    client = Client(Settings.from_env(env))
    try:
        wait_ready(client, proc, log)
        assert health(port)[0] == 200
        client.submit({"text": "This one gets wedged."})
        status, body = until("/healthz to fail", lambda: (h := health(port))[0] == 503 and h, 90, proc, log, poll=0.5)
        assert body["model_loaded"] and body["broker"] and "one batch has run for" in body["scheduler"], body
    finally:
        client.close()
        stop_process(proc, timeout=5)
