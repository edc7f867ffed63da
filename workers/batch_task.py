"""`ttspool.synthesize`: from buffered broker messages to stored WAVs and recorded results.

The batch function composes the worker's parts: admission (workers.admission), the table
of held work (workers.held_work), the planner (scheduler.planner), the engine, and the
store stage (workers.delivery, workers.recorder). Two stages overlap: the GPU thread runs
the batch and hands each row over as it ends; the store stage encodes, uploads, records
and acks it meanwhile. When rows free up, the planner picks held jobs to join the
running batch (iteration-level batching, TTSPOOL_REFILL).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Sequence

import redis
from celery import Celery
from celery.signals import worker_shutting_down

from scheduler.planner import PlanItem, Policy, next_batch, refill as refill_plan
from storage import Storage
from tasks.broker_redis import broker_redis
from tasks.schema import MAX_STEPS
from tasks.settings import TASK_NAME, Settings
from tasks.text.frontend import FrontEnd
from tasks.voices import VoiceLibrary

from .admission import Admission
from .batching import GpuBatches, Outcome
from .books import BookTracker
from .delivery import BatchDelivery, Delivery
from .engine.engine import Engine
from .engine.requests import SynthRequest
from .heap import release_free_heap
from .held_work import HeldWork
from .jobs import Job, Phase, Work
from .metrics import BatchTimer, Metrics
from .recorder import Recorder
from .task_events import TaskEvents
from .voices import VoiceResolver

log = logging.getLogger(__name__)


class BatchRunner:
    """The batch function: sees every job the worker holds, runs at most one GPU batch.

    Stateful across calls only as a cache: a job admitted once (validated, delivery
    counted, prepared) is not admitted again while the worker holds its message.
    """

    def __init__(self, app: Celery, engine: Engine, storage: Storage, settings: Settings,
                 metrics: Metrics | None = None) -> None:
        self.app = app
        self.engine = engine
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        # Retried like the producer's: a dropped connection while recording a finished
        # batch must not throw away the batch (the rows not uploaded yet, the requeue).
        self.redis = broker_redis(settings)
        self.events = TaskEvents()  # register() connects it to the worker's event dispatcher
        self.recorder = Recorder(app, storage, self.redis, BookTracker(app, self.redis), self.metrics, self.events,
                                 engine.sample_rate, settings.result_ttl)
        self.admission = Admission(app, self.redis, settings.max_strikes, self.recorder, self.events,
                                   settings.result_ttl)
        frontend = FrontEnd.from_settings(settings)

        def read_text(text: str) -> str:
            """A text as the model is given it (a recording voice's transcript)."""
            return engine.normalize(frontend.speak(text, "auto", True).spoken_text)

        self.voices = VoiceResolver(VoiceLibrary(storage, self.redis), engine, read_text,
                                    ttl_s=settings.voice_cache_s)
        self.table = HeldWork(engine, storage, frontend, self.voices, self.recorder, self.metrics)
        # A whole batch's rows may wait for storage before the GPU thread waits for it.
        self.delivery = Delivery(self.recorder, self.admission.strike, lambda job: self.settle(job.id, job.kwargs),
                                 self.metrics, threads=settings.store_threads, capacity=settings.max_batch)
        self.policy = Policy(
            max_batch=settings.max_batch,
            # Steps one GPU batch may hold (sum of predicted lengths): half the rows at
            # the longest length, so a batch of long jobs stays within memory.
            token_budget=max(MAX_STEPS, settings.max_batch * MAX_STEPS // 2),
            max_wait_s=settings.max_wait_ms / 1000.0,
            aging_s=settings.aging_ms / 1000.0,
        )
        # Rows a running batch may have: max_batch, and a few more for realtime jobs only.
        self.max_rows = settings.max_batch + settings.realtime_rows
        # How long a running batch takes new rows (then it ends): well within the
        # visibility timeout, past which another worker would get its jobs.
        self.refill_window_s = min(600.0, settings.visibility_timeout / 4)
        # Set by register() to GpuBatches': ack a finished job's message at once, and the
        # messages buffered while a batch runs (candidates for its free rows).
        self.settle: Callable[[str, dict[str, Any]], None] = lambda job_id, kwargs: None
        self.arrivals: Callable[[], list[Any]] = list
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
            decision = next_batch([w.plan_item(now - time.time()) for w in self.table.ready(out)], now, self.policy)
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
            # Every held message goes back (workers.batching).
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
        # A suspect runs alone (planner): nothing joins its batch either.
        solo = any(job.suspect for work in batch for job in work.jobs)
        refill = _Refill(self, rows, timer, delivery, out) if self.settings.refill and not solo else None
        ended = 0
        try:
            stream = self.engine.stream([w.row() for w in batch], refill=refill,
                                        max_rows=self.max_rows if refill else 0)
            for i, result in stream:
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
        if refill is not None and refill.error is not None:
            raise refill.error
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

    def refill(self, free: int, batch: "_Refill") -> list[SynthRequest]:
        """Held jobs to join the running batch in `free` rows: messages that arrived while
        it ran are admitted first; the planner then chooses, as for a new batch."""
        out = batch.out
        before = set(out.finished)
        arrived = [r for r in self.arrivals() if r.id not in self.table.jobs]
        self._admit(arrived, out)
        # A row whose audio is being stored: jobs that want the same audio wait until it
        # is stored (then served from storage) instead of synthesizing it a second time.
        storing = {w.key for w in batch.rows if w.jobs[0].phase is Phase.STORING}
        waiting = []
        for work in self.table.ready(out, wait=False, busy=storing):
            running = self.table.running.get(work.key)
            if running is not None and not any(job.suspect for job in work.jobs):
                self._join(work, running)
            else:
                waiting.append(work)
        chosen: list[Work] = []
        if waiting:
            now = time.monotonic()
            left = self.policy.token_budget - sum(w.steps for w in self.table.running.values())
            items = [w.plan_item(now - time.time()) for w in waiting]
            # Of the free rows, those past max_batch are for realtime jobs only; all are
            # while a realtime job's storage lookup is not back yet (a step or so).
            bulk_free = max(0, self.policy.max_batch - (self.max_rows - free))
            if self.table.realtime_lookup_pending():
                bulk_free = 0
            decision = refill_plan(items, now, self.policy, free, left, reserved=free - bulk_free)
            for item in decision.expired:
                self.table.expire(item.payload, now, out)
            chosen = [item.payload for item in decision.batch]
            if chosen:
                self._start(chosen, batch.rows, batch.timer)
            taken = {id(w) for w in chosen} | {id(i.payload) for i in decision.expired}
            if any(self._needs_own_batch(i, now, left) for i in items if id(i.payload) not in taken):
                # Refills would keep this batch going past it: let the batch end instead.
                batch.drain = True
        # Served from storage, expired or refused: acked now, not when the batch ends (a
        # long batch would hold their prefetch slots).
        kwargs = {r.id: r.kwargs for r in arrived} | {j.id: j.kwargs for j in self.table.jobs.values()}
        for job_id in out.finished - before:
            if job_id in kwargs:
                self.settle(job_id, kwargs[job_id])
        return [w.row() for w in chosen]

    def _needs_own_batch(self, item: PlanItem[Work], now: float, left: int) -> bool:
        """A held item no refill will take: a suspect, one larger than any batch's budget,
        or one that has waited past the aging time and does not fit in what is left."""
        return (item.alone or item.steps > self.policy.token_budget
                or (item.steps > left and now - item.arrived >= self.policy.aging_s))


class _Refill:
    """The engine's refill callback for one batch. It never raises into the engine (which
    would take the error for its rows' own and rerun them): an error stops the refills
    and is raised once the batch is over. Refills also stop when storage is found down
    (rows made now could not be stored), on a warm shutdown, when a held job needs a
    batch of its own, and after REFILL_WINDOW_S: the batch then ends, within the
    visibility timeout, and what only a new batch can run gets its turn."""

    def __init__(self, runner: BatchRunner, rows: list[Work], timer: BatchTimer, delivery: BatchDelivery,
                 out: Outcome) -> None:
        self.runner, self.rows, self.timer, self.delivery, self.out = runner, rows, timer, delivery, out
        self.error: BaseException | None = None
        self.drain = False
        self.t0 = time.monotonic()

    def __call__(self, free: int) -> list[SynthRequest]:
        if (self.error is not None or self.drain or self.delivery.storage_down.is_set()
                or self.runner.stopping.is_set()):
            return []
        if time.monotonic() - self.t0 > self.runner.refill_window_s:
            log.info("the batch has taken new rows for %.0f s; it ends now", self.runner.refill_window_s)
            self.drain = True
            return []
        try:
            return self.runner.refill(free, self)
        except Exception as err:  # noqa: BLE001 - raised again after the batch, see above
            log.warning("could not refill the running batch; it runs on without new rows: %s", err)
            self.error = err
            return []


def register(app: Celery, runner: BatchRunner, settings: Settings) -> GpuBatches:
    @app.task(
        name=TASK_NAME,
        base=GpuBatches,
        bind=False,
        acks_late=True,
        flush_every=settings.max_batch,
        # The scheduler's clock: held jobs are looked at again on every tick.
        flush_interval=max(10, min(settings.max_wait_ms, 50)) / 1000.0,
    )
    def synthesize(requests: Sequence[Any]) -> Outcome:
        return runner(requests)

    task: GpuBatches = app.tasks[TASK_NAME]
    task.owns = runner.admission.owns
    task.refuse = runner.admission.refuse
    runner.events.send = task.send_event
    runner.settle = task.settle
    runner.arrivals = task.take_arrivals
    worker_shutting_down.connect(lambda **_: runner.stopping.set(), weak=False)
    return task
