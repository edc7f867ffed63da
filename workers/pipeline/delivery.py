"""The store stage: each row's audio is encoded, uploaded and recorded on a small thread
pool the moment the engine yields it, while the GPU goes on with the rest of the batch,
and its message is acked as soon as its result is recorded (not when the batch ends).

The hand-off is bounded (`capacity` rows handed over and not yet stored): when storage is
slow, `hand` blocks the GPU thread rather than buffer audio without limit (one row is up
to ~4 MB of float32, 43.7 s at 24 kHz).

One retry budget per GPU batch, counted from its first failed upload: a row's upload is
retried in place until then; once a row has used it up, storage is down, and the batch's
rows not stored yet go back to the queue untried (per row, a batch of 16 held the worker
for 16 budgets).

A store that refuses (StorageRefused: no credentials, access denied, no such bucket) is
not retried at all: the row and the rest of the batch go back to the queue once, and the
worker stops (a warm shutdown, as on SIGTERM) and exits naming the fix. Failing the jobs
instead would turn a revoked key into a queue of failures; the next worker to start
refuses at its storage probe (workers/worker.py) until the store is fixed.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterable

import redis

from storage import StorageError, StorageRefused
from tasks.errors import JobFailed

from workers.engine.requests import SynthResult
from workers.pipeline.jobs import Job, Phase, Work
from workers.metrics import Metrics
from workers.pipeline.recorder import Recorder

log = logging.getLogger(__name__)


class Delivery:
    def __init__(self, recorder: Recorder, strike: Callable[[Iterable[Job], int], None],
                 settle: Callable[[Job], None], metrics: Metrics, threads: int, capacity: int,
                 stop: Callable[[], None]) -> None:
        self.recorder = recorder
        self.strike = strike
        # Acks a finished job's message at once (workers.broker.held_messages.HeldMessages.settle).
        self.settle = settle
        self.metrics = metrics
        # How the worker stops when the store refuses (the composition root's choice: a
        # runner in a test process must not signal that process).
        self.stop = stop
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="store")
        self._slots = threading.BoundedSemaphore(capacity)
        # The store's first refusal: the worker stops, and says why as it exits.
        self.refused: StorageRefused | None = None
        self._refused_lock = threading.Lock()

    def refuse(self, err: StorageRefused) -> None:
        with self._refused_lock:
            if self.refused is not None:
                return
            self.refused = err
        log.error("storage refuses (%s): no retry mends that; this worker stops", err)
        self.stop()

    def batch(self, retry_s: float) -> "BatchDelivery":
        return BatchDelivery(self, retry_s)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class BatchDelivery:
    """The store stage of one GPU batch."""

    def __init__(self, stage: Delivery, retry_s: float) -> None:
        self.stage = stage
        self.retry_s = retry_s
        # Set by the batch's first failed upload: a long batch (refilled for minutes) would
        # have spent a budget counted from its start before storage ever failed.
        self._deadline: float | None = None
        self.storage_down = threading.Event()
        self.finished: set[str] = set()
        self.requeue: set[str] = set()
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._futures: list[Future[None]] = []

    def hand(self, work: Work, result: SynthResult) -> None:
        """Called on the GPU thread as a row ends; blocks while `capacity` rows wait."""
        work.move(Phase.STORING)
        t0 = time.perf_counter()
        self.stage._slots.acquire()
        self.stage.metrics.store_wait_seconds.inc(time.perf_counter() - t0)
        try:
            future = self.stage._pool.submit(self._deliver, work, result)
        except BaseException:
            self.stage._slots.release()
            raise
        future.add_done_callback(lambda _: self.stage._slots.release())
        self._futures.append(future)

    def wait(self) -> None:
        """Until every row handed over is stored (or given up)."""
        wait(self._futures)
        if len(self.requeue) > 1:
            log.warning("storage is down: %d job(s) of this batch go back to the queue", len(self.requeue))

    def _deliver(self, work: Work, result: SynthResult) -> None:
        try:
            self._deliver_row(work, result)
        except BaseException as err:  # noqa: BLE001 - raised again on the GPU thread after the batch
            # Recording failed (Redis gone past its retries, or full): the tick fails once
            # the batch is over, and every job not recorded (still STORING, so no refill
            # takes it meanwhile) is looked for in storage when its message comes back.
            with self._lock:
                self.errors.append(err)

    def _deliver_row(self, work: Work, result: SynthResult) -> None:
        rec = self.stage.recorder
        try:
            self.stage.strike(work.jobs, -1)
        except redis.exceptions.OutOfMemoryError as err:
            # The audio is made: store it before anything else, or it is lost with the
            # refusal. The strike stays; the job would run alone if it came back.
            log.warning("could not take back a row's strike (%s); storing its audio first", err)
        if result.audio is None:
            for job in work.jobs:
                rec.fail(job.id, job.kwargs, JobFailed(result.error or "synthesis failed"), job.started)
                self._finished(job)
            return
        if self.storage_down.is_set():
            self._requeue(work)
            return
        audio, fmt = result.audio, work.jobs[0].spec.format

        def store() -> list[dict[str, Any]]:
            # The audio, then each job's durable record: retried together.
            record = rec.store(work.key, audio, fmt)
            return [rec.keep(job, record, cached=False) for job in work.jobs]

        try:
            try:
                results = store()
            except StorageError as err:
                deadline = self._deadline_from_now()
                if isinstance(err, StorageRefused) or time.monotonic() >= deadline:
                    raise
                log.warning("upload failed, retrying within the batch's budget: %s", err)
                results = rec.patiently(store, deadline)
        except StorageRefused as err:
            log.warning("upload refused, the job goes back to the queue: %s", err)
            self.storage_down.set()
            self._requeue(work)
            self.stage.refuse(err)
            return
        except StorageError as err:
            log.warning("upload failed, the job goes back to the queue: %s", err)
            self.storage_down.set()
            self._requeue(work)
            return
        for job, res in zip(work.jobs, results):
            rec.succeed(job, res)
            self._finished(job)

    def _deadline_from_now(self) -> float:
        with self._lock:
            if self._deadline is None:
                self._deadline = time.monotonic() + self.retry_s
            return self._deadline

    def _finished(self, job: Job) -> None:
        job.move(Phase.FINISHED)
        with self._lock:
            self.finished.add(job.id)
        self.stage.settle(job)

    def _requeue(self, work: Work) -> None:
        # Given back when the batch ends (with the other unfinished jobs): given back now,
        # this worker could fetch it again at once and synthesize it into the same outage.
        work.move(Phase.REQUEUED)
        with self._lock:
            self.requeue |= {job.id for job in work.jobs}
