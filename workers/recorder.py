"""Storing a job's audio and recording how it ended: the result, its task event, its
book, its metrics. Safe to call from several threads (the store stage runs rows side by
side): boto3 clients, redis-py's pool, Celery's per-thread backend and prometheus_client
all are."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Iterator

import redis
from celery import Celery
from kombu.utils.functional import retry_over_time

from storage import Storage, StorageError
from tasks.audio import FORMATS, encode
from tasks.states import JobState

from .books import BookTracker
from .jobs import Job
from .metrics import Metrics
from .task_events import TaskEvents

log = logging.getLogger(__name__)

OBJECTS = "ttspool:objects:"
RECORD_TTL = 7 * 86400


class Recorder:
    def __init__(self, app: Celery, storage: Storage, r: redis.Redis, books: BookTracker, metrics: Metrics,
                 events: TaskEvents, sample_rate: int) -> None:
        self.app = app
        self.storage = storage
        self.redis = r
        self.books = books
        self.metrics = metrics
        self.events = events
        self.sample_rate = sample_rate

    def fail(self, job_id: str, exc: Exception) -> None:
        log.info("job %s failed: %s", job_id, exc)
        self.app.backend.mark_as_failure(job_id, exc)
        self.events.failed(job_id, exc)
        self.books.job_finished(job_id, error=f"{type(exc).__name__}: {exc}")
        self.metrics.job_failed(exc)

    def succeed(self, job: Job, record: dict[str, Any], cached: bool) -> None:
        result = {"id": job.id, "status": JobState.SUCCESS, **record, "spoken_text": job.spoken_text,
                  "cached": cached, **({"voice": job.voice} if job.voice is not None else {}),
                  **({"dropped": job.dropped} if job.dropped else {})}
        self.app.backend.mark_as_done(job.id, result)
        self.events.succeeded(job.id, result, 0.0 if job.started is None else time.monotonic() - job.started)
        self.books.job_finished(job.id, duration_s=record["duration_s"])
        self.metrics.job_succeeded(job.spec, cached)

    def mark_queued(self, job_ids: set[str]) -> None:
        """Back to the queue: the job's state says so (not STARTED) while it waits again."""
        try:
            for job_id in job_ids:
                self.app.backend.store_result(job_id, {"id": job_id}, JobState.PENDING)
        except redis.RedisError as err:
            log.warning("could not mark requeued jobs as queued: %s", err)
        for job_id in job_ids:
            self.events.requeued(job_id)

    def store_patiently(self, key: str, audio: Any, fmt: str, deadline: float) -> dict[str, Any]:
        """Upload, retrying with growing pauses until `deadline` (monotonic; one try if it
        has passed): a storage outage then costs time instead of a requeue and a second
        synthesis of the same audio."""

        def pause(err: Exception, intervals: Iterator[float], retries: int) -> float:
            wait = next(intervals)
            log.warning("upload failed (try %d), retrying in %.0f s: %s", retries + 1, wait, err)
            return wait

        budget = max(0.0, deadline - time.monotonic())
        record: dict[str, Any] = retry_over_time(
            self.store, StorageError, (key, audio, fmt), errback=pause, max_retries=None if budget else 0,
            interval_start=1, interval_step=2, interval_max=10, timeout=budget,
        )
        return record

    def store(self, key: str, audio: Any, fmt: str) -> dict[str, Any]:
        data, rate, seconds = encode(audio, self.sample_rate, fmt)
        with self.metrics.upload_seconds.time():
            url = self.storage.put_bytes(key, data, FORMATS[fmt].content_type)
        record = {"url": url, "key": key, "duration_s": round(seconds, 6), "sample_rate": rate, "format": fmt}
        try:
            self.redis.set(OBJECTS + key, json.dumps(record), ex=RECORD_TTL)
        except redis.exceptions.OutOfMemoryError:
            pass  # only an index: a cache lookup without it asks storage
        return record
