"""A producer that dies, stalls or meets a full broker in the middle of a submit loses no
job and sends none twice: a retry of the same jobs sends what the first call did not
(tasks/claimed_publish.py). Each producer here is a real process, killed (SIGKILL) or
stopped (SIGSTOP) at a point of the submit path; the queue is read back from Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from storage import storage_for
from tasks.claims import Claim, claim_key
from tasks.cli.local_redis import LocalRedis
from tasks.errors import BrokerFull
from tasks.gateway.app import create_app
from tasks.producer import Client
from tasks.settings import QUEUE_BULK, Settings

from .conftest import idle_client
from .fault_tools import until

ROOT = Path(__file__).resolve().parents[1]

# The producer process: submits the jobs in argv[3] (JSON) to the broker at argv[2], and
# dies (or stops) at the point argv[1] names. The point is reached through the client's
# own methods, so everything before it ran for real.
PRODUCER = r"""
import json, os, signal, sys
from tasks.producer import Client
from tasks.settings import Settings

point, url, jobs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
client = Client(Settings(broker_url=url))
claim, send = client._claim, client.app.send_task
sent = []

def die(sig=signal.SIGKILL):
    os.kill(os.getpid(), sig)

def claimed(wanted):
    won = claim(wanted)
    if point == "after_claim":
        die()
    if point == "stall_after_claim":
        print("claimed", flush=True)
        die(signal.SIGSTOP)
    return won

def sending(*args, **kwargs):
    out = send(*args, **kwargs)
    sent.append(kwargs["task_id"])
    if point == f"after_send_{len(sent)}":
        die()
    return out

if point == "before_claim":
    client._claim = lambda wanted: die()
else:
    client._claim = claimed
    client.app.send_task = sending
print(json.dumps(client.submit_many_report(jobs).new), flush=True)
"""


@pytest.fixture()
def idle(redis_server: LocalRedis) -> Iterator[Client]:
    with idle_client(redis_server, 7) as client:
        yield client


def _producer(client: Client, point: str, jobs: list[dict[str, object]]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", PRODUCER, point, client.settings.broker_url, json.dumps(jobs)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)


def _queued(client: Client) -> list[str]:
    """The task ids of the messages in the bulk queue, oldest first."""
    return [json.loads(m)["headers"]["id"] for m in reversed(client.redis.lrange(QUEUE_BULK, 0, -1))]


def _jobs(n: int, tenant: str | None = "acme") -> list[dict[str, object]]:
    return [{"text": f"Your order {i} ships today.", "job_id": f"order-{i}", "priority": "bulk",
             **({"tenant": tenant} if tenant else {})} for i in range(n)]


@pytest.mark.parametrize("point", ["before_claim", "after_claim", "after_send_1", "after_send_3", "after_send_5"])
def test_a_retry_after_a_killed_producer_sends_each_job_once(idle: Client, point: str) -> None:
    jobs = _jobs(5)
    proc = _producer(idle, point, jobs)
    try:
        assert proc.wait(timeout=120) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    before = _queued(idle)
    retried = idle.submit_many_report(jobs)
    ids = [f"acme:order-{i}" for i in range(5)]
    assert retried.ids == ids
    # Everything the dead producer did not send, the retry did; nothing twice.
    assert sorted(_queued(idle)) == sorted(ids), point
    assert sorted(before + retried.new) == sorted(ids)
    assert all(Claim.decode(idle.redis.get(claim_key(i))).sent for i in ids)
    # And a second retry has nothing left to send.
    assert idle.submit_many_report(jobs).new == [] and len(_queued(idle)) == 5


def test_a_stalled_producer_cannot_send_a_job_its_retry_sent(idle: Client) -> None:
    """Stopped after its claims, before any send (a long GC pause, a frozen VM): its retry
    takes the claims over and sends; the first one, resumed, pushes nothing."""
    jobs = _jobs(3)
    proc = _producer(idle, "stall_after_claim", jobs)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "claimed"
        until("the producer to stop", lambda: _state(proc.pid) == "T", 30)
        retried = idle.submit_many_report(jobs)
        assert sorted(retried.new) == sorted(retried.ids) and len(_queued(idle)) == 3
        os.kill(proc.pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert json.loads(out) == []  # it enqueued nothing: each of its pushes was refused
    finally:
        proc.kill()
        proc.wait()
    assert sorted(_queued(idle)) == sorted(retried.ids)


def _state(pid: int) -> str:
    """The process' state letter from /proc (T: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_full_broker_says_which_jobs_it_took(idle: Client) -> None:
    """Redis reaches maxmemory in the middle of a submit_many: the error lists exactly
    the jobs in the queue, the others are not claimed, and the same call once memory is
    free sends the rest, each once."""
    r = redis.Redis.from_url(idle.settings.broker_url)
    words = " ".join(["Your parcel is on its way"] * 72)
    jobs = [{"text": f"{words} ({i}).", "job_id": f"big-{i}", "priority": "bulk"} for i in range(80)]
    # Its connections open (and their buffers counted) before the limit is set.
    warm = idle.submit({"text": "Warming up.", "priority": "bulk"})
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory-policy", "noeviction")
    # Room for the claims and a few dozen of the ~3 KB messages, not for all eighty.
    r.config_set("maxmemory", used + 150_000)
    try:
        with pytest.raises(BrokerFull, match="were enqueued before it stopped") as caught:
            idle.submit_many(jobs)
    finally:
        r.config_set("maxmemory", 0)
    enqueued = caught.value.enqueued
    assert 0 < len(enqueued) < len(jobs)
    assert _queued(idle) == [warm] + enqueued
    unsent = [j["job_id"] for j in jobs if j["job_id"] not in enqueued]
    assert not any(r.exists(claim_key(i)) for i in unsent)
    again = idle.submit_many_report(jobs)
    assert sorted(again.new) == sorted(unsent)
    assert sorted(_queued(idle)) == sorted([warm] + [str(j["job_id"]) for j in jobs])


def test_the_gateway_names_the_jobs_a_full_broker_took(idle: Client, tmp_path: Path) -> None:
    """Over HTTP the same: 503 with Retry-After and the key's own ids that went in; the
    same request again, once memory is free, sends the rest."""
    key = "acme-key-0123456789abcdef"
    settings = Settings.from_env({"TTSPOOL_BROKER_URL": idle.settings.broker_url,
                                  "TTSPOOL_STORAGE_URL": f"file://{tmp_path}", "TTSPOOL_API_KEYS": f"acme={key}"})
    words = " ".join(["Your parcel is on its way"] * 72)
    jobs = [{"text": f"{words} ({i}).", "job_id": f"big-{i}", "priority": "bulk"} for i in range(80)]
    r = redis.Redis.from_url(idle.settings.broker_url)
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings, storage_for(settings)), raise_server_exceptions=False) as http:
        assert http.post("/v1/jobs", json={"text": "Warming up.", "priority": "bulk"}, headers=headers).status_code == 202
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", int(r.info("memory")["used_memory"]) + 150_000)
        try:
            resp = http.post("/v1/jobs", json=jobs, headers=headers)
        finally:
            r.config_set("maxmemory", 0)
        assert resp.status_code == 503 and resp.headers["retry-after"] == "5", resp.text
        enqueued = resp.json()["error"]["enqueued"]
        assert 0 < len(enqueued) < len(jobs)
        assert _queued(idle)[1:] == [f"acme:{i}" for i in enqueued]
        assert http.post("/v1/jobs", json=jobs, headers=headers).json()["ids"] == [j["job_id"] for j in jobs]
    assert sorted(_queued(idle)[1:]) == sorted(f"acme:big-{i}" for i in range(80))
