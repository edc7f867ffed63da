"""The batch function: from the messages a worker holds to stored WAVs and recorded results.

It composes the worker's parts: admission (workers.pipeline.admission), the table of held
work (workers.pipeline.held_work), the worker's scheduling policy
(scheduler.worker_policy), the engine, and the store stage (workers.pipeline.delivery,
workers.pipeline.recorder). The runner drives and the engine computes: the engine's
batch stream yields each row as it ends and says when rows are free; the runner hands
the row to the store stage (encode, upload, record and ack on its own threads while
the GPU goes on) and, when rows are free, asks the policy which held jobs join
(iteration-level batching, TTSPOOL_REFILL). Its Redis and storage work happens
between the engine's steps, never inside them.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import redis
from celery import Celery

from scheduler.planner import PlanItem
from scheduler.worker_policy import BatchState, WorkerPolicy
from storage import Storage
from tasks.broker_redis import broker_redis
from tasks.settings import Settings
from tasks.text.frontend import FrontEnd
from tasks.voices import VoiceLibrary

from workers.engine.requests import RowsFree, SynthRequest
from workers.heap import release_free_heap
from workers.metrics import BatchTimer, Metrics
from workers.pipeline.admission import Admission
from workers.pipeline.book_tracker import BookTracker
from workers.pipeline.delivery import BatchDelivery, Delivery
from workers.pipeline.held_work import HeldWork
from workers.pipeline.jobs import Job, Outcome, Phase, Work
from workers.pipeline.recorder import Recorder
from workers.pipeline.rejections import Rejections
from workers.pipeline.task_events import TaskEvents
from workers.pipeline.voice_resolver import VoiceResolver

if TYPE_CHECKING:
    from workers.engine.engine import Engine

log = logging.getLogger(__name__)


class BatchRunner:
    """The batch function: sees every job the worker holds, runs at most one GPU batch.

    Stateful across calls only as a cache: a job admitted once (validated, delivery
    counted, prepared) is not admitted again while the worker holds its message.
    """

    def __init__(self, app: Celery, engine: Engine, storage: Storage, settings: Settings,
                 metrics: Metrics | None = None, *, messages: Messages | None = None,
                 events: TaskEvents | None = None, rejections: Rejections | None = None,
                 stop: Callable[[], None] | None = None) -> None:
        """`messages`: the broker's side of the held messages (arrivals while a batch runs,
        acks as rows are recorded; workers.broker.held_messages); `events`: where task
        events go; `rejections`: where refused messages are recorded; `stop`: how the
        worker stops when the store refuses (`delivery.refused` says why). Left out, the
        runner sees no arrivals, acks nothing, sends no events and stops nothing: it runs
        in process."""
        self.app = app
        self.engine = engine
        self.settings = settings
        self.policy = WorkerPolicy.from_settings(settings)
        self.metrics = metrics if metrics is not None else Metrics()
        self.messages: Messages = messages if messages is not None else NoMessages()
        # Retried like the producer's: a dropped connection while recording a finished
        # batch must not throw away the batch (the rows not uploaded yet, the requeue).
        self.redis = broker_redis(settings)
        self.events = events if events is not None else TaskEvents()
        self.rejections = rejections if rejections is not None else Rejections(
            app, self.redis, lambda reason: self.metrics.rejected.labels(reason).inc(), settings.result_ttl)
        self.recorder = Recorder(app, storage, self.redis, BookTracker(app, self.redis), self.metrics, self.events,
                                 engine.sample_rate, settings.result_ttl)
        self.admission = Admission(app, self.redis, settings.max_strikes, self.recorder, self.events,
                                   self.rejections, settings.result_ttl)
        frontend = FrontEnd.from_settings(settings)

        def read_text(text: str) -> str:
            """A text as the model is given it (a recording voice's transcript)."""
            return engine.normalize(frontend.speak(text, "auto", True).spoken_text)

        self.voices = VoiceResolver(VoiceLibrary(storage, self.redis), engine, read_text,
                                    ttl_s=settings.voice_cache_s)
        self.table = HeldWork(engine, storage, frontend, self.voices, self.recorder, self.metrics)
        # A whole batch's rows may wait for storage before the GPU thread waits for it.
        self.delivery = Delivery(self.recorder, self.admission.strike,
                                 lambda job: self.messages.settle(job.id, job.kwargs),
                                 self.metrics, threads=settings.store_threads, capacity=settings.max_batch,
                                 stop=stop if stop is not None else lambda: None)
        self._refused_since: float | None = None  # Redis has refused writes since then
        # A warm shutdown waits for the running batch: it must not take in held jobs
        # then (they go back to the queue), or the batch would outlast the grace period.
        self.stopping = threading.Event()

    def close(self) -> None:
        self.delivery.close()
        self.table.close()

    def __call__(self, requests: Sequence[Any]) -> Outcome:
        """Called with every held request; returns which are finished or to requeue."""
        out = Outcome()
        try:
            self._admit(self.table.sync(requests), out)
            now = time.monotonic()
            decision = self.policy.start([w.plan_item(now - time.time()) for w in self.table.ready(out)], now)
            for item in decision.expired:
                self.table.expire(item.payload, now, out)
            if decision.batch:
                self._run([item.payload for item in decision.batch], out)
            self._refused_since = None
        except redis.exceptions.OutOfMemoryError as err:
            # The broker is at maxmemory: results, strikes and requeues are refused. What
            # is recorded stays recorded (acked below); everything else stays held and is
            # tried again after a pause. Audio already uploaded is found in storage then.
            self._back_off(err)
        except BaseException:
            # Every held message goes back (workers.broker.gpu_batches).
            self.table.recheck()
            raise
        finally:
            self.table.forget(out.finished | out.requeue)
        if out.requeue:
            log.warning("requeueing %d unfinished job(s)", len(out.requeue))
            self.recorder.mark_queued(out.requeue)
        return out

    def _admit(self, requests: Sequence[Any], out: Outcome) -> None:
        if requests:
            self.table.add(self.admission.admit(requests, out))

    def _back_off(self, err: Exception) -> None:
        now = time.monotonic()
        if self._refused_since is None:
            self._refused_since = now
            log.error("the broker refuses writes (%s); holding %d job(s) and retrying", err, len(self.table.jobs))
        self.metrics.broker_refusals.inc()
        self.table.recheck()
        # Growing pauses, up to 10 s, while the batch counts as in flight (no new flush).
        time.sleep(min(10.0, 0.5 + (now - self._refused_since) / 4))

    # -- the batch ----------------------------------------------------------------

    def _run(self, batch: list[Work], out: Outcome) -> None:
        timer = self.metrics.batch_started()
        delivery = self.delivery.batch(self.settings.upload_retry_s)
        rows: list[Work] = []  # by the engine's row index: the batch, then each refill
        self._start(batch, rows, timer)
        # A suspect runs alone (planner), and the policy lets nothing join its batch.
        solo = any(job.suspect for work in batch for job in work.jobs)
        feed = _Feed(self, rows, timer, delivery, out, solo)
        # A batch that will never take rows gets no room for them (a suspect's batch is
        # isolated because it may run out of memory).
        grows = self.policy.closed(self._state(self.policy.max_rows - len(batch), feed, feed.t0, False)) is None
        ended = 0
        try:
            stream = self.engine.stream([w.row() for w in batch], max_rows=self.policy.max_rows if grows else 0)
            for event in stream:
                if isinstance(event, RowsFree):
                    stream.add(feed.rows_for(event.rows))
                    continue
                i, result = event
                ended += 1
                work = rows[i]
                self.table.running.pop(work.key, None)
                timer.row(result, self.engine.sample_rate)
                delivery.hand(work, result)
            timer.generated()
            if ended != len(rows):
                # Rows never returned would be held forever, neither acked nor requeued.
                raise RuntimeError(f"the engine returned {ended} of the batch's {len(rows)} rows")
        finally:
            # Also when the GPU stage failed: what it made is stored before the tick fails.
            delivery.wait()
            self.table.running.clear()
            out.finished |= delivery.finished
            out.requeue |= delivery.requeue
            release_free_heap()
        if feed.error is not None:
            raise feed.error
        if delivery.errors:
            # Jobs whose recording failed are looked for in storage again (recheck) when
            # their messages come back.
            oom = [e for e in delivery.errors if isinstance(e, redis.exceptions.OutOfMemoryError)]
            raise (oom or delivery.errors)[0]
        timer.finished()

    def _start(self, works: list[Work], rows: list[Work], timer: BatchTimer) -> None:
        """Rows joining the GPU batch. A strike for each job, taken back as its row leaves
        the batch: only a batch the worker dies (or hangs past the visibility timeout) in
        leaves one."""
        jobs = [job for work in works for job in work.jobs]
        self.admission.strike(jobs, 1)
        timer.started([job.spec for job in jobs])
        now = time.monotonic()
        for work in works:
            work.move(Phase.RUNNING)
            self.table.running[work.key] = work
            self._started(work.jobs, now)
        rows.extend(works)

    def _join(self, work: Work, running: Work) -> None:
        """Jobs that want audio a running row is making get it from that row."""
        self.admission.strike(work.jobs, 1)
        work.move(Phase.RUNNING)
        self._started(work.jobs, running.jobs[0].started or time.monotonic())
        running.jobs.extend(work.jobs)

    def _started(self, jobs: list[Job], at: float) -> None:
        for job in jobs:
            job.started = at
            self.events.started(job.id)

    def refill(self, free: int, feed: "_Feed") -> list[SynthRequest]:
        """Held jobs to join the running batch in `free` rows: messages that arrived while
        it ran are admitted first; the policy then chooses."""
        out = feed.out
        closed = self.policy.closed(self._state(free, feed, time.monotonic(), lookup_pending=False))
        if closed is not None:
            log.info("the running batch takes no more rows: %s", closed)
            feed.drain = True
            return []
        before = set(out.finished)
        arrived = [r for r in self.messages.take_arrivals() if r.id not in self.table.jobs]
        self._admit(arrived, out)
        # A row whose audio is being stored: jobs that want the same audio wait until it
        # is stored (then served from storage) instead of synthesizing it a second time.
        storing = {w.key for w in feed.rows if w.jobs[0].phase is Phase.STORING}
        waiting = []
        for work in self.table.ready(out, wait=False, busy=storing):
            running = self.table.running.get(work.key)
            if running is not None and not any(job.suspect for job in work.jobs):
                self._join(work, running)
            else:
                waiting.append(work)
        now = time.monotonic()
        items: list[PlanItem[Work]] = [w.plan_item(now - time.time()) for w in waiting]
        decision = self.policy.admit(items, now, self._state(free, feed, now, self.table.realtime_lookup_pending()))
        for item in decision.expired:
            self.table.expire(item.payload, now, out)
        chosen = [item.payload for item in decision.batch]
        if chosen:
            self._start(chosen, feed.rows, feed.timer)
        if decision.drain:
            log.info("the running batch takes no more rows: %s", decision.why)
            feed.drain = True
        # Served from storage, expired or refused: acked now, not when the batch ends (a
        # long batch would hold their prefetch slots).
        kwargs = {r.id: r.kwargs for r in arrived} | {j.id: j.kwargs for j in self.table.jobs.values()}
        for job_id in out.finished - before:
            if job_id in kwargs:
                self.messages.settle(job_id, kwargs[job_id])
        return [w.row() for w in chosen]


    def _state(self, free: int, feed: "_Feed", now: float, lookup_pending: bool) -> BatchState:
        return BatchState(rows=self.policy.max_rows - free, steps=sum(w.steps for w in self.table.running.values()),
                          age_s=now - feed.t0, solo=feed.solo, lookup_pending=lookup_pending)


class _Feed:
    """What one batch's free rows are filled with. It never raises into the batch's loop
    (which would leave the running rows unstored): an error stops the refills and is
    raised once the batch is over. Refills also stop when storage is found down (rows
    made now could not be stored), on a warm shutdown, and when the policy drains the
    batch."""

    def __init__(self, runner: BatchRunner, rows: list[Work], timer: BatchTimer, delivery: BatchDelivery,
                 out: Outcome, solo: bool) -> None:
        self.runner, self.rows, self.timer, self.delivery, self.out = runner, rows, timer, delivery, out
        self.solo = solo
        self.error: BaseException | None = None
        self.drain = False
        self.t0 = time.monotonic()

    def rows_for(self, free: int) -> list[SynthRequest]:
        if (self.error is not None or self.drain or self.delivery.storage_down.is_set()
                or self.runner.stopping.is_set()):
            return []
        try:
            return self.runner.refill(free, self)
        except Exception as err:  # noqa: BLE001 - raised again after the batch, see above
            log.warning("could not refill the running batch; it runs on without new rows: %s", err)
            self.error = err
            return []


class Messages(Protocol):
    """The broker's side of the messages a worker holds (workers.broker.held_messages)."""

    def take_arrivals(self) -> list[Any]: ...

    def settle(self, job_id: str, kwargs: Any) -> None: ...


class NoMessages:
    """No broker: nothing arrives while a batch runs, and nothing needs an ack."""

    def take_arrivals(self) -> list[Any]:
        return []

    def settle(self, job_id: str, kwargs: Any) -> None:
        return None
