"""Redis at maxmemory while a batch records its results and acks them: the worker keeps
running, and every job ends once when memory is freed.

Celery runs each ack on the consumer's event loop a moment after the result is recorded
(up to one idle pause of the fetch later). Redis fills up in that moment here, for real:
the test watches the first finished job until its result and claim are written, then sets
`maxmemory` below what Redis uses (`noeviction`), while the job's unacked record is still
there. kombu's ack (a MULTI) was refused there and stopped the worker ("Unrecoverable
error"); the transport's ack passes at maxmemory (workers/broker/transport.py)."""

from __future__ import annotations

import json
from pathlib import Path

import redis

from tasks.cli.local_redis import LocalRedis, free_port

from .conftest import S3Endpoint, running_worker
from .fault_tools import assert_stored, counted_warm_up, fault_env, job_counts, tail, until, wait_all
from .scrape import fetch, parse, value


def _unacked_tag(r: redis.Redis, job_id: str) -> bytes | None:
    """The delivery tag of the job's unacked record, None when there is none."""
    for tag, record in r.hgetall("unacked").items():
        envelope = json.loads(record)[0]
        if envelope["headers"]["id"] == job_id:
            return bytes(tag)
    return None


def _recorded(r: redis.Redis, job_id: str) -> bool:
    """Its result is written and its delivery count dropped: the recorder is done with
    Redis for this job, and only the ack is left."""
    raw = r.get(f"celery-task-meta-{job_id}")
    return raw is not None and b'"SUCCESS"' in raw and not r.exists(f"ttspool:deliveries:{job_id}")


def test_broker_full_between_a_result_and_its_ack(broker: LocalRedis, s3: S3Endpoint, aws_env,
                                                  tmp_path: Path) -> None:
    port = free_port()
    env = fault_env(broker, s3, aws_env, TTSPOOL_MAX_BATCH="8", TTSPOOL_METRICS_PORT=str(port))
    log = tmp_path / "worker.log"
    r = redis.Redis.from_url(broker.url)
    r.config_set("maxmemory-policy", "noeviction")
    with running_worker(env, log) as (proc, client):
        before = sum(counted_warm_up(port, proc, log).values())
        audio_before = value(parse(fetch(f"http://127.0.0.1:{port}/metrics")[1]), "ttspool_audio_seconds_total") or 0
        # Rows of different lengths: they end, and are recorded, one at a time.
        ids = client.submit_many([{"text": "Mem says " + " ".join(["steady"] * (10 + 6 * i)) + ".", "seed": i,
                                   "voice": 3, "job_id": f"mem-{i}"} for i in range(6)])
        full_at = None
        try:
            for job in sorted(ids, key=lambda i: int(i.rsplit("-", 1)[1])):
                until(f"{job} to be recorded", lambda: _recorded(r, job), 120, proc, log, poll=0.001)
                r.config_set("maxmemory", 1)  # below what Redis uses: every write refused from here
                tag = _unacked_tag(r, job)
                if tag is not None:
                    full_at = job  # its ack comes while Redis is full
                    break
                r.config_set("maxmemory", 0)  # acked already: try the next row
            assert full_at is not None, "every ack came before the test could fill Redis"
            until("the ack of a recorded job to pass while Redis is full",
                  lambda: not r.hexists("unacked", tag), 60, proc, log)
            # The rest of the batch is refused (results, strikes) and held; the worker
            # retries with pauses and stays up.
            until("the runner to be refused", lambda: "the broker refuses writes" in log.read_text(), 120, proc, log)
            assert proc.poll() is None
        finally:
            r.config_set("maxmemory", 0)
        done = wait_all(client, ids, r, log, timeout=180)
        assert proc.poll() is None, tail(log)
        # Exactly once: each job recorded once (a cached one was served from the audio it
        # uploaded before the refusal) and each job's audio synthesized once.
        until("every job counted", lambda: sum(job_counts(port).values()) - before >= len(ids), 30, proc, log)
        until("every message acked", lambda: r.hlen("unacked") == 0, 30, proc, log)
        assert sum(job_counts(port).values()) - before == len(ids), tail(log)
        made = value(parse(fetch(f"http://127.0.0.1:{port}/metrics")[1]), "ttspool_audio_seconds_total") or 0
        assert abs((made - audio_before) - sum(st.duration_s for st in done)) < 0.01, tail(log)
    assert_stored(s3, done)
    assert "Unrecoverable error" not in log.read_text()
