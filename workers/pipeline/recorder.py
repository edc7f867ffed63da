"""Storing a job's audio and recording how it ended: its durable record (in storage), the
result (in Redis, for TTSPOOL_RESULT_TTL), its task event, its book, its metrics. Safe
to call from several threads (the store stage runs rows side by side): boto3 clients,
redis-py's pool, Celery's per-thread backend and prometheus_client all are."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator, TypeVar

import redis
from celery import Celery
from kombu.utils.functional import retry_over_time

from storage import Storage, StorageError, StorageRefused
from tasks import job_records
from tasks.audio import FORMATS, encode
from tasks.claims import Claim, claim_key, digest_of, tenant_of
from tasks.errors import JobExpired
from tasks.states import JobState

from workers.pipeline.book_tracker import BookTracker
from workers.pipeline.jobs import Job
from workers.metrics import Metrics
from workers.pipeline.task_events import TaskEvents

log = logging.getLogger(__name__)

# The audio object's metadata (S3 user metadata, x-amz-meta-*).
DURATION_META = "duration-s"
RATE_META = "sample-rate"
# Per job: GPU batches it was in that never returned (the worker died or hung in them).
STRIKES = "ttspool:strikes:"
# Per job: times a worker took its message (for operators and tests: a job delivered
# again after it ended has this key back, at 1).
DELIVERIES = "ttspool:deliveries:"
_NOT_IN_REDIS = frozenset({"id", "status", "key"})
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
        self._hold_claim(job_id, kwargs)
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
        # Redis keeps it through the result window, in every job's bytes: not the storage
        # key, which the URL ends with (job_records.audio_key), nor the id and state that
        # Celery's record around it holds already (docs/RELIABILITY.md, retention). The
        # task event (not kept) carries it whole.
        self.app.backend.mark_as_done(job.id, {k: v for k, v in result.items() if k not in _NOT_IN_REDIS})
        self._hold_claim(job.id, job.kwargs)
        self.events.succeeded(job.id, result, 0.0 if job.started is None else time.monotonic() - job.started)
        self.books.job_finished(job.id, duration_s=result["duration_s"])
        self.metrics.job_succeeded(job.spec, cached)

    def _hold_claim(self, job_id: str, kwargs: Any) -> None:
        """The id's claim lives as long as the result (it was set when the job was sent,
        which may be hours before): a resubmission meanwhile finds this job, not a new one.
        It keeps the job's digest and tenant, not who wrote it (a producer's token, needed
        only while its submit retries). Its strikes and delivery count are of no more use:
        an ended job is not run again (its result says it ended), and Redis need not keep
        them through the window. Called for jobs admitted as their id's owners only."""
        ended = Claim(digest_of(kwargs), tenant_of(kwargs), "")
        try:
            self.redis.pipeline(transaction=False).set(claim_key(job_id), ended.encode(), xx=True,
                                                       ex=self.ttl_s).delete(STRIKES + job_id,
                                                                             DELIVERIES + job_id).execute()
        except redis.exceptions.OutOfMemoryError as err:
            # The result is recorded by now: raising would record it again (as cached). At
            # maxmemory the claim keeps its first TTL (set at submit) and the deletes pass.
            log.warning("job %s: could not renew its claim (the broker is full): %s", job_id, err)

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
        time instead of a requeue and a second synthesis of the same audio. A refusal
        (StorageRefused: credentials, rights, no bucket) is raised at once."""

        def pause(err: Exception, intervals: Iterator[float], retries: int) -> float:
            if isinstance(err, StorageRefused):
                raise err
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
        duration = round(seconds, 6)
        with self.metrics.upload_seconds.time():
            # What the key does not say, on the object itself: a later job with the same
            # content learns it from the HEAD that finds the object (workers/pipeline/held_work.py),
            # without the broker keeping an index of every object.
            url = self.storage.put_bytes(key, data, FORMATS[fmt].content_type,
                                         metadata={DURATION_META: repr(duration), RATE_META: str(rate)})
        return {"url": url, "key": key, "duration_s": duration, "sample_rate": rate, "format": fmt}


def _unix(monotonic: float | None) -> float | None:
    return None if monotonic is None else time.time() - (time.monotonic() - monotonic)
