"""`ttspool.synthesize` on celery-batches: one GPU batch in flight, and a tick that lets
the scheduler look at every held job.

celery-batches turns broker messages into requests and hands them to `flush`, the one
hook of it this class overrides (its documented way to act on buffered requests), with
`flush_every = 1` so each message reaches `flush` as it arrives; `Strategy` is Celery's
own hook, wrapped. Nothing else of celery-batches is touched. Stock celery-batches would run each flush of its buffer as a batch and ack all of
it when the batch returns. Here:
- every message joins the window of held messages (workers.broker.held_messages); while
  a batch runs, the new ones are also offered to it (its free rows are refilled from
  them);
- a tick of our own (Celery's timer, every `WorkerPolicy.tick_s`) runs the batch function
  on the pool when no batch is in flight and jobs are held; so does a window that holds
  a whole batch. The batch function sees every held job, runs at most one GPU batch, and
  says which jobs are finished (acked) and which must go back to the queue; the rest stay
  held, unacked, for a later tick;
- if the batch function raises, every held message is requeued: a job is never acked
  without a recorded result. A requeue Redis refuses (out of memory) is tried again at
  each of the transport's sweeps, instead of stopping the worker
  (workers.broker.transport.QoS).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Collection, Sequence

from celery import Celery
from celery.exceptions import InvalidTaskError
from celery.signals import worker_shutting_down
from celery_batches import Batches, SimpleRequest, apply_batches_task

from tasks.settings import TASK_NAME
from workers.broker.event_outbox import EventOutbox
from workers.broker.held_messages import HeldMessages
from workers.broker.resend import Resender
from workers.pipeline.jobs import Outcome
from workers.pipeline.runner import BatchRunner

log = logging.getLogger(__name__)


class GpuBatches(Batches):
    # Celery builds the task class from the decorator's options (register): these are
    # its collaborators, set when the class is made.
    runner: BatchRunner
    messages: HeldMessages
    outbox: EventOutbox
    resender: Resender
    tick_s: float
    flush_every = 1

    def __init__(self) -> None:
        super().__init__()
        self._inflight = threading.Event()
        self._worker_pool: Any = None
        self._tick_tref: Any = None
        self._unheld: list[Any] = []  # messages whose id conflict could not be settled yet
        # For /healthz: the scheduler's last tick, and since when the batch in flight runs.
        self.last_tick = time.monotonic()
        self.inflight_since: float | None = None

    def stalled(self, tick_s: float, batch_s: float) -> str | None:
        """Why this worker is stuck, or None: no scheduler tick for `tick_s`, or one batch
        running for longer than `batch_s`."""
        now = time.monotonic()
        if self._tick_tref is not None and now - self.last_tick > tick_s:
            return f"no scheduler tick for {now - self.last_tick:.0f} s"
        since = self.inflight_since
        if since is not None and now - since > batch_s:
            return f"one batch has run for {now - since:.0f} s"
        return None

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Any:  # noqa: N802 - Celery's name
        # Celery calls this again when the consumer restarts after a lost broker
        # connection. Requests from the old connection cannot be acked any more (their
        # messages come back through Redis, or are sent again if Redis lost them:
        # workers.broker.resend), and the old timer's ticks are gone.
        orphans = self.messages.clear() + self._unheld
        self._unheld = []
        self.resender.reconnected(orphans)
        self._worker_pool = consumer.pool
        self.outbox.attach(consumer)
        if self._tick_tref is not None:
            self._tick_tref.cancel()
        self._tick_tref = consumer.timer.call_repeatedly(self.tick_s, self._tick)
        handler = super().Strategy(task, app, consumer)

        def checked(*args: Any, **kwargs: Any) -> Any:
            # A JSON body that is not [args, kwargs, embed] fails while Celery builds its
            # Request, with an error Celery treats as fatal to the whole worker. As an
            # InvalidTaskError it is rejected and recorded (workers.broker.consumer) instead.
            try:
                return handler(*args, **kwargs)
            except (ValueError, TypeError) as exc:
                raise InvalidTaskError(f"message body is not [args, kwargs, embed] ({exc})") from exc

        return checked

    def flush(self, requests: Collection[Any]) -> Any:
        """celery-batches' hook, with each message as it arrives: hold it."""
        self._hold(list(requests))
        if not self._inflight.is_set() and len(self.messages) >= self.runner.policy.max_batch:
            try:
                return self._dispatch()
            except Exception as err:  # noqa: BLE001 - inside Celery's message handler: the tick tries again
                log.warning("could not start a batch yet: %s", err)
        return None

    def _hold(self, requests: list[Any]) -> None:
        try:
            self.messages.hold(requests, self.runner.admission.owns, self.runner.admission.refuse,
                               running=self._inflight.is_set())
        except Exception as err:  # noqa: BLE001 - the loop must go on; the messages are kept
            # Settling an id conflict needs Redis: tried again at the next tick.
            log.warning("could not hold %d message(s) yet: %s", len(requests), err)
            self._unheld.extend(requests)

    def _tick(self) -> None:
        self.last_tick = time.monotonic()
        self.resender.retry()
        if self._unheld:
            retry, self._unheld = self._unheld, []
            self._hold(retry)
        if not self._inflight.is_set() and len(self.messages):
            self._dispatch()

    def _dispatch(self) -> Any:
        self._inflight.set()
        self.inflight_since = time.monotonic()
        try:
            held = self.messages.start_batch()
            given = {r.id: r.kwargs for r in held}

            def on_return(outcome: Outcome | None) -> None:
                try:
                    self.messages.end_batch(outcome, given)
                finally:
                    self.inflight_since = None
                    self._inflight.clear()

            simple = ([SimpleRequest.from_request(r) for r in held],)
            return self._worker_pool.apply_async(apply_batches_task, (self, simple, 0, None), callback=on_return)
        except BaseException:
            # Whatever broke here must not leave a batch marked in flight that never
            # runs: nothing would be served again.
            self.inflight_since = None
            self._inflight.clear()
            raise


def register(app: Celery, runner: BatchRunner, messages: HeldMessages, outbox: EventOutbox,
             resender: Resender) -> GpuBatches:
    @app.task(name=TASK_NAME, base=GpuBatches, bind=False, acks_late=True, runner=runner, messages=messages,
              outbox=outbox, resender=resender, tick_s=runner.policy.tick_s,
              # celery-batches' own timer: each message is flushed as it arrives, so its
              # buffer is empty whenever the timer would look.
              flush_interval=1.0)
    def synthesize(requests: Sequence[Any]) -> Outcome:
        return runner(requests)

    task: GpuBatches = app.tasks[TASK_NAME]
    worker_shutting_down.connect(lambda **_: runner.stopping.set(), weak=False)
    return task
