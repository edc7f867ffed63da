"""Retention: Redis keeps a job for TTSPOOL_RESULT_TTL only, and its status is read from
its durable record in storage afterwards (tasks/job_records.py), by the Python API and
`ttspool status` and the gateway alike. A real worker, a real Redis, moto's S3, a real
gateway process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import redis

from storage import storage_for
from tasks import job_records
from tasks.cli.local_redis import LocalRedis
from tasks.producer import Client
from tasks.settings import Settings
from tasks.states import JobState

from .conftest import ROOT, S3Endpoint, running_worker, stop_process, worker_env
from .test_gateway import KEY_A, KEY_B, start_gateway

TTL_S = 10


def _keys_naming(r: redis.Redis, job_ids: list[str]) -> list[str]:
    return [k.decode() for k in r.scan_iter(count=1000) if any(j in k.decode() for j in job_ids)]


def test_after_the_result_window_redis_holds_nothing_of_a_job_and_its_status_comes_from_storage(
        s3: S3Endpoint, aws_env: dict[str, str], tmp_path: Path) -> None:
    with LocalRedis() as broker:
        env = worker_env(broker.url, s3, aws_env, TTSPOOL_RESULT_TTL=str(TTL_S))
        settings = Settings.from_env(env)
        with running_worker(env, tmp_path / "worker.log"):
            client = Client(settings, storage=storage_for(settings))
            r = redis.Redis.from_url(broker.url)
            gw = start_gateway(env, tmp_path / "gateway.log", TTSPOOL_API_KEYS=f"acme={KEY_A},beta={KEY_B}")
            try:
                ok = client.submit({"text": "Kept for good.", "seed": 4, "max_tokens": 24, "job_id": "keep-1",
                                    "tenant": "acme"})
                late = client.submit({"text": "Too late.", "expires_at": time.time() - 1})
                before = {j: client.wait([j], timeout=120)[0] for j in (ok, late)}
                assert ok == "acme:keep-1"  # the task id; acme's gateway calls it keep-1
                audio = gw.request("GET", "/v1/jobs/keep-1/audio")
                assert audio[0] == 200 and audio[2][:4] == b"RIFF"
                assert before[ok].status == "SUCCESS" and before[late].status == "EXPIRED"
                url = client.record(ok)["url"]  # type: ignore[index]
                assert _keys_naming(r, [ok, late])
                deadline = time.monotonic() + 4 * TTL_S  # bounded: every key has a TTL of TTL_S
                while _keys_naming(r, [ok, late]) and time.monotonic() < deadline:
                    time.sleep(0.5)
                assert _keys_naming(r, [ok, late]) == []
                after = {j: client.status(j) for j in (ok, late)}
                assert after == before
                record = client.record(ok)  # the durable one now: with the storage key
                assert record is not None and record["url"] == url and url.endswith("/" + record["key"])
                assert client.status("never-submitted").status == "PENDING"
                cli = subprocess.run([sys.executable, "-m", "tasks.cli", "status", ok, "--json"], cwd=ROOT,
                                     env=env, capture_output=True, text=True, timeout=60)
                assert cli.returncode == 0, cli.stderr
                assert json.loads(cli.stdout)["status"] == "SUCCESS"
                assert json.loads(cli.stdout)["url"] == before[ok].url
                # The gateway: the tenant from the record (the claim is gone), the audio from storage.
                code, _, body = gw.request("GET", "/v1/jobs/keep-1")
                assert code == 200 and json.loads(body)["status"] == "SUCCESS"
                assert json.loads(body)["audio_url"].startswith(s3.url)  # presigned
                assert gw.request("GET", "/v1/jobs/keep-1/audio")[2] == audio[2]
                assert gw.request("GET", "/v1/jobs/keep-1", key=KEY_B)[0] == 404
                assert gw.request("GET", "/v1/jobs/keep-1/audio", key=KEY_B)[0] == 404
                # Past the window, beta's own keep-1 is another job: acme's stays acme's.
                code, _, body = gw.request("POST", "/v1/jobs", {"text": "Beta keeps its own.", "job_id": "keep-1"}, key=KEY_B)
                assert code == 202 and json.loads(body)["ids"] == ["keep-1"]
                assert client.wait(["beta:keep-1"], timeout=120)[0].spoken_text == "Beta keeps its own."
                for key, said in ((KEY_A, "Kept for good."), (KEY_B, "Beta keeps its own.")):
                    code, _, body = gw.request("GET", "/v1/jobs/keep-1", key=key)
                    assert code == 200 and json.loads(body)["spoken_text"] == said, body
                assert client.record(ok)["url"] == url  # type: ignore[index]
            finally:
                stop_process(gw.proc)
                client.close()
                r.close()


def test_a_tenants_record_from_before_per_tenant_ids_is_its_own(tmp_path: Path) -> None:
    """Records written under a bare id (before ids were per tenant) are found under the
    tenant's task id, by the tenant they name, and by no other tenant."""
    store = storage_for(Settings.from_env({"TTSPOOL_STORAGE_URL": f"file://{tmp_path}"}))
    old = job_records.finished("old-1", {"text": "Before.", "tenant": "acme"}, JobState.SUCCESS, result={"url": "u"})
    store.put_bytes("records/job-old-1.json", json.dumps(old).encode(), "application/json")
    found = job_records.read(store, "acme:old-1")
    assert found is not None and found["id"] == "acme:old-1" and found["url"] == "u"
    assert job_records.read(store, "beta:old-1") is None
    new = job_records.finished("acme:old-1", {"text": "After.", "tenant": "acme"}, JobState.SUCCESS)
    job_records.write(store, new)
    assert job_records.record_key("acme:old-1") == "records/acme/job-old-1.json"
    assert job_records.read(store, "acme:old-1")["params"]["text"] == "After."  # type: ignore[index]
