"""`ttspool bench --soak`: many jobs through one worker process, and its memory when idle.

A closed-loop producer keeps `window` jobs in flight (the steady backlog of a queue under
sustained load) and drains after every `drain_every` jobs. At each drain the worker's RSS
is read once the worker is idle: the worker hands freed heap pages back after each batch
(workers/heap.py), so idle RSS is its live memory, while RSS under load sits on a floor or
tens of MB above it for hundreds of jobs at a time (allocator state, not leaks). A leak
shows as idle RSS that keeps growing from drain to drain: `growth_kb_per_job` is the
least-squares slope over the drains after the first (the first includes warm-up).

tasks/cli/bench_soak.py starts the parts; tests/test_leak.py runs the same loop, short,
against the session's worker, with and without an injected leak.
"""

from __future__ import annotations

import datetime
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tasks.producer import Client

IDLE_S = 2.0  # nothing in flight this long before the idle RSS is read
TEXTS = ("Soak test.", "Short and sweet.", "Hello there, friend.", "One more line.")


def rss_mb(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    if match is None:
        raise RuntimeError(f"no VmRSS for process {pid}")
    return int(match.group(1)) / 1024


def jobs(n: int, first_seed: int = 0, marker: str = "") -> list[dict[str, Any]]:
    """Short jobs, each its own synthesis (distinct seeds: no content-key sharing)."""
    return [{"text": f"{TEXTS[i % len(TEXTS)]}{marker}", "seed": first_seed + i, "voice": 1 + i % 3, "max_tokens": 24}
            for i in range(n)]


@dataclass
class Drain:
    """One closed-loop run to an empty queue."""

    jobs: int
    wall_s: float
    latencies_s: list[float] = field(repr=False)
    statuses: dict[str, str] = field(repr=False)


def run_closed_loop(client: Client, batch: Sequence[dict[str, Any]], window: int, alive: Callable[[], None],
                    timeout: float) -> Drain:
    """Keeps up to `window` of `batch` in flight until every one has ended."""
    started = time.monotonic()
    sent_at: dict[str, float] = {}
    in_flight: list[str] = []
    statuses: dict[str, str] = {}
    submitted = 0
    while len(statuses) < len(batch):
        alive()
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{len(batch) - len(statuses)} of {len(batch)} jobs not done after {timeout:.0f} s")
        room = min(window - len(in_flight), len(batch) - submitted)
        if room > 0:
            ids = client.submit_many(list(batch[submitted:submitted + room]))
            sent_at.update(dict.fromkeys(ids, time.time()))
            in_flight += ids
            submitted += room
        for job_id in list(in_flight):
            st = client.status(job_id)
            if st.done:
                statuses[job_id] = st.status
                in_flight.remove(job_id)
        time.sleep(0.05)
    wall = time.monotonic() - started
    latencies = []
    for job_id in statuses:
        meta = client.app.backend.get_task_meta(job_id)
        done = meta.get("date_done")
        if done is not None:
            finished = datetime.datetime.fromisoformat(str(done)).replace(tzinfo=datetime.timezone.utc)
            latencies.append(finished.timestamp() - sent_at[job_id])
    return Drain(len(batch), wall, latencies, statuses)


def idle_rss_mb(pid: int) -> float:
    time.sleep(IDLE_S)
    return rss_mb(pid)


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over x; 0 with fewer than two points."""
    if len(points) < 2:
        return 0.0
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def soak(client: Client, pid: int, n_jobs: int, drain_every: int, window: int, alive: Callable[[], None],
         timeout: float, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    start_rss = rss_mb(pid)
    idle: list[tuple[int, float]] = []
    latencies: list[float] = []
    failed = 0
    wall = 0.0
    done = 0
    while done < n_jobs:
        n = min(drain_every, n_jobs - done)
        drain = run_closed_loop(client, jobs(n, first_seed=done), window, alive, timeout)
        done += n
        wall += drain.wall_s
        latencies += drain.latencies_s
        failed += sum(s != "SUCCESS" for s in drain.statuses.values())
        idle.append((done, idle_rss_mb(pid)))
        log(f"{done} jobs: {n / drain.wall_s:.1f} jobs/s, idle RSS {idle[-1][1]:.1f} MB")
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else [0.0] * 99
    return {
        "jobs": n_jobs, "window": window, "drain_every": drain_every, "failed": failed,
        "wall_s": round(wall, 1), "jobs_per_s": round(n_jobs / wall, 2) if wall else 0.0,
        "latency_p50_s": round(q[49], 2), "latency_p99_s": round(q[98], 2),
        "rss_mb_at_start": round(start_rss, 1),
        "idle_rss_mb": [{"jobs": j, "mb": round(mb, 1)} for j, mb in idle],
        # The first drain includes the warm-up's allocations: the slope starts after it.
        "growth_kb_per_job": round(slope([(j, mb) for j, mb in idle[1:]]) * 1024, 2),
    }
