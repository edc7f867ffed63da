"""Celery task events for batched jobs, read by a real Flower process: a synthesized job,
a job served from storage and a failing job each show up in Flower with the state,
fields and worker that Celery's own events would give them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from tasks.cli.local_redis import free_port
from tasks.producer import Client
from tasks.settings import TASK_NAME

from .conftest import ROOT, WorkerProc, stop_process


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _task(flower: str, job_id: str) -> dict[str, Any]:
    try:
        return _get(f"{flower}/api/task/info/{job_id}")
    except urllib.error.HTTPError as err:
        if err.code == 404:  # Flower has seen no event of it (yet)
            return {}
        raise
    except urllib.error.URLError:  # Flower's web server is not up yet
        return {}


def _wait_state(flower: str, job_id: str, state: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = _task(flower, job_id)
        if info.get("state") == state or time.monotonic() > deadline:
            return info
        time.sleep(0.2)


def test_flower_shows_batched_jobs(worker: WorkerProc, client: Client, tmp_path: Path) -> None:
    port = free_port()
    flower = f"http://127.0.0.1:{port}"
    env = {**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"}
    with open(tmp_path / "flower.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "celery", "--broker", worker.settings.broker_url, "flower",
                                 "--address=127.0.0.1", f"--port={port}"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # Flower subscribes to the event stream after its web server is up, and events
        # sent before that are gone: probe jobs until one is seen whole.
        for _ in range(30):
            probe = client.submit({"text": f"Flower probe {uuid.uuid4().hex[:6]}."})
            client.wait([probe], timeout=60)
            if _wait_state(flower, probe, "SUCCESS", timeout=2).get("state") == "SUCCESS":
                break
            assert proc.poll() is None, (tmp_path / "flower.log").read_text(errors="replace")[-3000:]
        else:
            raise AssertionError("Flower never showed a probe job:\n"
                                 + (tmp_path / "flower.log").read_text(errors="replace")[-3000:])

        tag = uuid.uuid4().hex[:8]
        synthesized, again = client.submit_many([{"text": f"Seen by Flower, {tag}."}] * 2)
        # Nothing but a snowman: nothing to say, so the job fails in the worker.
        failing = client.submit({"text": "☃☃☃"})
        done = client.wait([synthesized, again, failing], timeout=120)
        assert [st.status for st in done] == ["SUCCESS", "SUCCESS", "FAILURE"]

        for job_id in (synthesized, again):
            info = _wait_state(flower, job_id, "SUCCESS")
            assert info["state"] == "SUCCESS", info
            assert info["name"] == TASK_NAME and info["worker"].startswith("celery@")
            assert info["received"] and tag in info["kwargs"] and job_id in info["result"]
        # Two ids, one content: one was synthesized (started on the GPU, with a runtime);
        # the other shared its synthesis or was served from storage.
        infos = [_task(flower, j) for j in (synthesized, again)]
        assert any(i["started"] and i["runtime"] > 0 for i in infos), json.dumps(infos, indent=1)
        info = _wait_state(flower, failing, "FAILURE")
        assert info["state"] == "FAILURE" and "empty after normalization" in info["exception"], info
        tasks = _get(f"{flower}/api/tasks?taskname={TASK_NAME}")
        assert {synthesized, again, failing} <= set(tasks)
        assert "could not send task-" not in worker.log_text()
    finally:
        stop_process(proc)
