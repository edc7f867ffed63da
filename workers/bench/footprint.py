"""`ttspool bench --footprint`: what one job costs the broker's Redis, and what is left
of it after the result window (TTSPOOL_RESULT_TTL).

tasks/cli/bench_footprint.py starts the parts (a throwaway Redis, S3, a worker process);
this module measures, with Redis' own counters:
- submit: the jobs are sent before the worker starts, so every command in this phase is
  the producer's (INFO commandstats, before and after);
- run: the worker starts and runs them all; its commands over the phase include its
  start and its idle fetch polling while the last jobs are stored, so they are an upper
  bound of the run path's per job;
- status: one `Client.status` per finished job;
- kept: every key the jobs left, by kind, with MEMORY USAGE (the key, its value and
  Redis' own overhead for it), and `used_memory` against the start; "other" is what the
  worker itself keeps (its queue bindings, the unacked index), not per job;
- after the window: the same, once every key the jobs left has expired, and one status
  per job again (now read from the durable record in storage).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from typing import Any, Callable, Sequence

import redis

# Key kinds, by prefix: what each one protects is in docs/RELIABILITY.md (retention).
KINDS = (
    ("result", "celery-task-meta-"),
    ("claim", "ttspool:jobid:"),
    ("deliveries", "ttspool:deliveries:"),
    ("strikes", "ttspool:strikes:"),
)


def kind_of(key: str) -> str:
    return next((name for name, prefix in KINDS if key.startswith(prefix)), "other")


def commands(r: redis.Redis) -> int:
    """Commands Redis has run so far, without the INFO calls this module makes."""
    stats = r.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


def keys_by_kind(r: redis.Redis, ignore: set[bytes]) -> dict[str, dict[str, int]]:
    out: dict[str, Counter[str]] = {}
    for key in r.scan_iter(count=1000):
        if key in ignore:
            continue
        kind = kind_of(key.decode(errors="replace"))
        c = out.setdefault(kind, Counter())
        c["keys"] += 1
        c["bytes"] += int(r.memory_usage(key, samples=0) or 0)
    return {k: dict(v) for k, v in sorted(out.items())}


def jobs(n: int, run: str) -> list[dict[str, Any]]:
    """Distinct short texts (no two share audio), as a bulk producer sends them."""
    return [{"text": f"Footprint line {i} of {run}.", "seed": i, "max_tokens": 24, "job_id": f"fp-{run}-{i}"}
            for i in range(n)]


def _wait(r: redis.Redis, ids: Sequence[str], start_worker: Callable[[], None], timeout: float) -> None:
    """Until every job has ended, seen on the result backend's pub/sub (one PSUBSCRIBE):
    polling each job's status would be counted as the run path's commands."""
    waiting = {f"celery-task-meta-{j}" for j in ids}
    ps = r.pubsub(ignore_subscribe_messages=True)
    ps.psubscribe("celery-task-meta-*")
    try:
        start_worker()
        deadline = time.monotonic() + timeout
        while waiting:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(waiting)} job(s) not finished after {timeout:.0f} s")
            msg = ps.get_message(timeout=1.0)
            if msg is not None and json.loads(msg["data"]).get("status") in ("SUCCESS", "FAILURE"):
                waiting.discard(msg["channel"].decode())
    finally:
        ps.close()


def measure(r: redis.Redis, client: Any, n_jobs: int, ttl_s: int, start_worker: Callable[[], None],
            timeout: float, log: Callable[[str], None]) -> dict[str, Any]:
    run = re.sub(r"[^a-z0-9]", "", hex(time.time_ns())[-8:])
    before = set(r.scan_iter(count=1000))
    mem0 = int(r.info("memory")["used_memory"])
    c0 = commands(r)
    ids = client.submit_many(jobs(n_jobs, run))
    c1 = commands(r)
    log(f"submitted {n_jobs} jobs: {(c1 - c0) / n_jobs:.1f} Redis commands per job")
    _wait(r, ids, start_worker, timeout)
    c2 = commands(r)
    done = [client.status(job_id) for job_id in ids]
    c3 = commands(r)
    bad = [s for s in done if s.status != "SUCCESS"]
    if bad:
        raise RuntimeError(f"{len(bad)} job(s) did not succeed, e.g. {bad[0]}")
    kept = keys_by_kind(r, before)
    mem1 = int(r.info("memory")["used_memory"])
    log(f"ran them: {(c2 - c1) / n_jobs:.1f} commands per job; {sum(k['bytes'] for k in kept.values()) / n_jobs:.0f} "
        f"bytes per job kept; waiting {ttl_s} s for the result window to pass")
    deadline = time.monotonic() + 3 * ttl_s + 30  # bounded: every key the jobs left has a TTL
    while time.monotonic() < deadline and set(keys_by_kind(r, before)) - {"other"}:
        time.sleep(1)
    left = keys_by_kind(r, before)
    mem2 = int(r.info("memory")["used_memory"])
    c4 = commands(r)
    late = [client.status(job_id) for job_id in ids]
    c5 = commands(r)
    if any(s.status != "SUCCESS" for s in late):
        raise RuntimeError("a job's status after the result window is not SUCCESS: its durable record is missing")
    return {
        "jobs": n_jobs,
        "result_ttl_s": ttl_s,
        "commands_per_job": {"submit": round((c1 - c0) / n_jobs, 2), "run": round((c2 - c1) / n_jobs, 2),
                             "status": round((c3 - c2) / n_jobs, 2),
                             "status_after_window": round((c5 - c4) / n_jobs, 2)},
        "in_window": {"keys": kept, "bytes_per_job": round(sum(k["bytes"] for k in kept.values()) / n_jobs, 1),
                      "used_memory_per_job": round((mem1 - mem0) / n_jobs, 1)},
        "after_window": {"keys": left, "bytes_per_job": round(sum(k["bytes"] for k in left.values()) / n_jobs, 1),
                         "used_memory_per_job": round((mem2 - mem0) / n_jobs, 1)},
    }
