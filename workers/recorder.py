"""Storing a job's audio and recording how it ended: its durable record (in storage), the
result (in Redis, for TTSPOOL_RESULT_TTL), its task event, its book, its metrics. Safe
to call from several threads (the store stage runs rows side by side): boto3 clients,
redis-py's pool, Celery's per-thread backend and prometheus_client all are."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Iterator, TypeVar

import redis
from celery import Celery
from kombu.utils.functional import retry_over_time

from storage import Storage, StorageError
from tasks import job_records
from tasks.audio import FORMATS, encode
from tasks.claims import claim_key
from tasks.errors import JobExpired
from tasks.states import JobState

from .books import BookTracker
from .jobs import Job
from .metrics import Metrics
from .task_events import TaskEvents

log = logging.getLogger(__name__)

OBJECTS = "ttspool:objects:"
# Per job: GPU batches it was in that never returned (the worker died or hung in them).
STRIKES = "ttspool:strikes:"
T = TypeVar("T")


class Recorder:
    def __init__(self, app: Celery, storage: Storage, r: redis.Redis, books: BookTracker, metrics: Metrics,
                 events: TaskEvents, sample_rate: int, ttl_s: int) -> None:
        self.app = app
        self.storage = storage
        self.redis = r
        self.books = books
        self.metrics = metrics
        self.events = events
        self.sample_rate = sample_rate
        # Of the content index (OBJECTS): only a shortcut, a lookup without it asks storage.
        self.ttl_s = ttl_s

    def fail(self, job_id: str, kwargs: Any, exc: Exception, started: float | None = None) -> None:
        """`kwargs`: the job's message as received; `started`: monotonic, if it ran."""
        log.info("job %s failed: %s", job_id, exc)
        state = JobState.EXPIRED if isinstance(exc, JobExpired) else JobState.FAILURE
        try:
            job_records.write(self.storage, job_records.finished(
                job_id, kwargs, state, error=f"{type(exc).__name__}: {exc}", started_at=_unix(started)))
        except (StorageError, ValueError) as err:  # ValueError: an id no storage key can hold
            # The failure still goes to Redis: readable for TTSPOOL_RESULT_TTL, not after.
            log.warning("job %s: could not write its durable record: %s", job_id, err)
        self.app.backend.mark_as_failure(job_id, exc)
        self._hold_claim(job_id)
        self.events.failed(job_id, exc)
        self.books.job_finished(job_id, error=f"{type(exc).__name__}: {exc}")
        self.metrics.job_failed(exc)

    def keep(self, job: Job, record: dict[str, Any], cached: bool) -> dict[str, Any]:
        """Write the job's durable record (raises StorageError); returns its result for
        `succeed`. First, so that every SUCCESS in Redis has its record in storage."""
        result = {"id": job.id, "status": JobState.SUCCESS, **record, "spoken_text": job.spoken_text,
                  "cached": cached, **({"voice": job.voice} if job.voice is not None else {}),
                  **({"dropped": job.dropped} if job.dropped else {})}
        job_records.write(self.storage, job_records.finished(job.id, job.kwargs, JobState.SUCCESS, result=result,
                                                             started_at=_unix(job.started)))
        return result

    def succeed(self, job: Job, result: dict[str, Any]) -> None:
        cached = bool(result["cached"])
        self.app.backend.mark_as_done(job.id, result)
        self._hold_claim(job.id)
        self.events.succeeded(job.id, result, 0.0 if job.started is None else time.monotonic() - job.started)
        self.books.job_finished(job.id, duration_s=result["duration_s"])
        self.metrics.job_succeeded(job.spec, cached)

    def _hold_claim(self, job_id: str) -> None:
        """The id's claim lives as long as the result (it was set when the job was sent,
        which may be hours before): a resubmission meanwhile finds this job, not a new one.
        Its strikes are of no more use: an ended job is not run again."""
        self.redis.pipeline(transaction=False).expire(claim_key(job_id), self.ttl_s).delete(
            STRIKES + job_id).execute()

    def mark_queued(self, job_ids: set[str]) -> None:
        """Back to the queue: the job's state says so (not STARTED) while it waits again."""
        try:
            for job_id in job_ids:
                self.app.backend.store_result(job_id, {"id": job_id}, JobState.PENDING)
        except redis.RedisError as err:
            log.warning("could not mark requeued jobs as queued: %s", err)
        for job_id in job_ids:
            self.events.requeued(job_id)

    def patiently(self, store: Callable[[], T], deadline: float) -> T:
        """`store()` (an upload), retried with growing pauses until `deadline` (monotonic;
        one try if it has passed) while it raises StorageError: a storage outage then costs
        time instead of a requeue and a second synthesis of the same audio."""

        def pause(err: Exception, intervals: Iterator[float], retries: int) -> float:
            wait = next(intervals)
            log.warning("upload failed (try %d), retrying in %.0f s: %s", retries + 1, wait, err)
            return wait

        budget = max(0.0, deadline - time.monotonic())
        stored: T = retry_over_time(
            store, StorageError, (), errback=pause, max_retries=None if budget else 0,
            interval_start=1, interval_step=2, interval_max=10, timeout=budget,
        )
        return stored

    def store(self, key: str, audio: Any, fmt: str) -> dict[str, Any]:
        data, rate, seconds = encode(audio, self.sample_rate, fmt)
        with self.metrics.upload_seconds.time():
            url = self.storage.put_bytes(key, data, FORMATS[fmt].content_type)
        record = {"url": url, "key": key, "duration_s": round(seconds, 6), "sample_rate": rate, "format": fmt}
        try:
            # Only what the key does not say (the URL and format follow from it).
            self.redis.set(OBJECTS + key, json.dumps({"d": record["duration_s"], "r": rate}), ex=self.ttl_s)
        except redis.exceptions.OutOfMemoryError:
            pass  # only an index: a cache lookup without it asks storage
        return record


def _unix(monotonic: float | None) -> float | None:
    return None if monotonic is None else time.time() - (time.monotonic() - monotonic)
