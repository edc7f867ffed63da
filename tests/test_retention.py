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
from tasks.cli.local_redis import LocalRedis
from tasks.producer import Client
from tasks.settings import Settings

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
                audio = gw.request("GET", f"/v1/jobs/{ok}/audio")
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
                code, _, body = gw.request("GET", f"/v1/jobs/{ok}")
                assert code == 200 and json.loads(body)["status"] == "SUCCESS"
                assert json.loads(body)["audio_url"].startswith(s3.url)  # presigned
                assert gw.request("GET", f"/v1/jobs/{ok}/audio")[2] == audio[2]
                assert gw.request("GET", f"/v1/jobs/{ok}", key=KEY_B)[0] == 404
                assert gw.request("GET", f"/v1/jobs/{ok}/audio", key=KEY_B)[0] == 404
            finally:
                stop_process(gw.proc)
                client.close()
                r.close()
