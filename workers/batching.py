"""celery-batches with one GPU batch in flight and a scheduler-visible window of jobs.

Stock celery-batches hands every flush of its buffer to the pool and acks all of it
when the batch function returns. Here:
- a flush is skipped while a batch runs (with one GPU thread, flushes taken meanwhile
  would queue up as many tiny batches); what arrives meanwhile joins the held window at
  once and is offered to the running batch (`take_arrivals`: its free rows are refilled
  from it), bounded by the prefetch limit;
- the batch function sees every job this worker holds (newly buffered plus those held
  over from earlier flushes), runs at most one GPU batch, and says which jobs are
  finished (acked) and which must go back to the queue (rejected with requeue); the
  rest stay held, unacked, for the next flush. A job whose result is recorded while the
  batch still runs is acked at once (`settle`), which also frees its prefetch slot; So the scheduler chooses each GPU batch
  from the whole window: realtime jobs that arrive while a bulk batch runs go next,
  and a job waits for company at most `max_wait_ms`;
- if the batch function raises, every held message is requeued: a job is never acked
  without a recorded result. A requeue Redis refuses (out of memory) leaves the job held,
  to be tried again on a later flush, instead of stopping the worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Collection

from celery.exceptions import InvalidTaskError
from celery_batches import Batches, SimpleRequest, apply_batches_task, consume_queue
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    finished: set[str] = field(default_factory=set)  # result recorded: ack
    requeue: set[str] = field(default_factory=set)  # not done, give back to the broker


# How often the event loop sends the task events of batched jobs (GpuBatches.send_event).
EVENTS_EVERY_S = 0.05


class GpuBatches(Batches):
    def __init__(self) -> None:
        super().__init__()
        self._inflight = threading.Event()
        # By job id. Touched by the consumer thread (new messages), the pool thread (the
        # batch's end) and the store threads (rows acked as they are recorded).
        self._held: dict[str, Any] = {}
        self._lock = threading.RLock()
        self._arrivals: list[Any] = []  # held while a batch runs, not yet offered to it
        # For /healthz: the scheduler's last tick, and since when the batch in flight runs.
        self.last_tick = time.monotonic()
        self.inflight_since: float | None = None
        # Set by the batch function's owner (workers.batch_task.register): whether a job
        # (id, kwargs) is the one its id's claim names, and how to refuse one that is not.
        self.owns: Callable[[str, Any], bool] = lambda job_id, kwargs: True
        self.refuse: Callable[[Any], None] = lambda request: None
        # The consumer's event dispatcher, for the task events of batched jobs
        # (workers.task_events); Strategy sets it, again after every reconnect.
        self.eventer: Any = None
        # Task events wait here for the consumer's event loop to send them (EVENTS_EVERY_S).
        self._events: deque[tuple[str, dict[str, Any]]] = deque()
        self._events_tref: Any = None

    def send_event(self, event_type: str, **fields: Any) -> None:
        """From any thread (the GPU's, the store threads'). Celery's dispatcher belongs to
        the event loop: it buffers task events in lists its flush empties without a lock,
        so an event added from another thread during a flush was lost (a Flower test saw
        a job stay STARTED), and the flush it schedules from there could be lost too."""
        if self._events_tref is None:
            # No event loop: Celery's dispatcher does not buffer, it publishes at once.
            if self.eventer is not None:
                self.eventer.send(event_type, **fields)
            return
        self._events.append((event_type, fields))

    def _send_events(self) -> None:
        eventer = self.eventer
        while self._events and eventer is not None:
            event_type, fields = self._events.popleft()
            try:
                eventer.send(event_type, **fields)
            except Exception as err:  # noqa: BLE001 - events are for watching: never stop the loop
                log.warning("could not send %s for job %s: %s", event_type, fields.get("uuid"), err)

    def stalled(self, tick_s: float, batch_s: float) -> str | None:
        """Why this worker is stuck, or None: no scheduler tick for `tick_s`, or one batch
        running for longer than `batch_s`."""
        now = time.monotonic()
        # celery-batches stops its flush timer while there is nothing to flush (an idle
        # worker), and starts it with the next message: only a running timer must tick.
        if self._tref is not None and now - self.last_tick > tick_s:
            return f"no scheduler tick for {now - self.last_tick:.0f} s"
        since = self.inflight_since
        if since is not None and now - since > batch_s:
            return f"one batch has run for {now - since:.0f} s"
        return None

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Any:  # noqa: N802 - Celery's name
        # Celery calls this again when the consumer restarts after a lost broker
        # connection. Requests from the old connection cannot be acked any more (their
        # messages come back through Redis), and stock celery-batches would keep its
        # dead flush timer, so nothing held would ever be flushed again.
        with self._lock:
            self._held.clear()
            self._arrivals.clear()
        for stale in (self._buffer, self._pending):
            list(consume_queue(stale))
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        self.eventer = consumer.event_dispatcher
        if self._events_tref is not None:
            self._events_tref.cancel()
        # On the event loop: what Celery's dispatcher needs (see send_event).
        self._events_tref = consumer.hub.call_repeatedly(EVENTS_EVERY_S, self._send_events) if consumer.hub else None
        handler = super().Strategy(task, app, consumer)

        def checked(*args: Any, **kwargs: Any) -> Any:
            # A JSON body that is not [args, kwargs, embed] fails while Celery builds its
            # Request, with an error Celery treats as fatal to the whole worker. As an
            # InvalidTaskError it is rejected and recorded (workers.consumer) instead.
            try:
                return handler(*args, **kwargs)
            except (ValueError, TypeError) as exc:
                raise InvalidTaskError(f"message body is not [args, kwargs, embed] ({exc})") from exc

        return checked

    def _do_flush(self) -> None:
        self.last_tick = time.monotonic()
        if self._inflight.is_set():
            self._absorb()
            return
        if self._buffer.empty() and self._held:
            # Stock _do_flush would see nothing to do and stop the timer.
            self.flush([])
            return
        super()._do_flush()

    def flush(self, requests: Collection[Any]) -> Any:
        self._inflight.set()
        self.inflight_since = time.monotonic()
        try:
            return self._dispatch(requests)
        except BaseException:
            # Whatever broke here must not leave a batch marked in flight that never
            # runs: nothing would be served again.
            self._clear_inflight()
            raise

    @classmethod
    def _same_job(cls, a: Any, b: Any) -> bool:
        return bool(a.args == b.args) and cls._same_kwargs(a.kwargs if isinstance(a.kwargs, dict) else {},
                                                         b.kwargs if isinstance(b.kwargs, dict) else {})

    def _clear_inflight(self) -> None:
        self.inflight_since = None
        self._inflight.clear()

    def _absorb(self) -> None:
        """While a batch runs: new messages join the held window now, so that the running
        batch can take them into its free rows."""
        for req in consume_queue(self._buffer):
            if req.eta:
                self._pending.put(req)  # waits in celery-batches' own queue for a real flush
                continue
            try:
                taken = self._take([req])
            except Exception as err:  # noqa: BLE001 - the timer must go on; the message is kept
                # Settling an id conflict needs Redis: tried again at the next flush.
                log.warning("could not hold job %s yet: %s", req.id, err)
                self._buffer.put(req)
                return
            with self._lock:
                self._arrivals.extend(SimpleRequest.from_request(r) for r in taken)

    def take_arrivals(self) -> list[Any]:
        """The messages held since the batch started, each offered once."""
        with self._lock:
            taken, self._arrivals = self._arrivals, []
        return taken

    def settle(self, job_id: str, kwargs: Any) -> None:
        """Ack a held job whose result is recorded, while its batch still runs. Only the
        message the runner finished: one that replaced it under the same id meanwhile
        (a different job) is left for its own turn."""
        with self._lock:
            req = self._held.get(job_id)
            if req is None or not self._same_kwargs(req.kwargs, kwargs):
                return
            del self._held[job_id]
        try:
            req.acknowledge()
        except Exception as err:  # noqa: BLE001 - kept held: settled again when the batch ends
            log.warning("could not ack job %s, kept: %s", job_id, err)
            with self._lock:
                self._held.setdefault(job_id, req)

    def _take(self, requests: Collection[Any]) -> list[Any]:
        """Hold new messages; the ones now held (a message that lost its id is not)."""
        taken = []
        with self._lock:
            for req in requests:
                old = self._held.get(req.id)
                if old is not None and old is not req and not self._same_job(old, req):
                    # A different job under a held job's id (a forged message, or a client
                    # that reuses ids): the one its id's claim names keeps it, the other is
                    # refused.
                    loser = old if self.owns(req.id, req.kwargs) else req
                    self.refuse(loser)
                    loser.acknowledge()
                    if loser is req:
                        continue
                elif old is not None and old is not req and old.message.delivery_tag != req.message.delivery_tag:
                    # A second copy of a held job under another delivery tag (a producer
                    # sent it again): the new one stands in; acking the old frees its
                    # prefetch slot. Redis restores a message past the visibility timeout
                    # under its own tag: acking that would delete the broker's only record
                    # of the job, and a crash from then on would lose it, so the new
                    # delivery just stands in.
                    old.acknowledge()
                self._held[req.id] = req
                taken.append(req)
        return taken

    @staticmethod
    def _same_kwargs(a: Any, b: Any) -> bool:
        def plain(kwargs: Any) -> Any:
            return {k: v for k, v in kwargs.items() if k != "enqueued_at"} if isinstance(kwargs, dict) else kwargs

        return bool(plain(a) == plain(b))

    def _dispatch(self, requests: Collection[Any]) -> Any:
        self._take(requests)
        with self._lock:
            held = list(self._held.values())
            self._arrivals.clear()  # the batch function sees every held job anyway
        simple = ([SimpleRequest.from_request(r) for r in held],)
        given = {r.id: r.kwargs for r in held}

        def on_return(outcome: Outcome | None) -> None:
            try:
                with self._lock:
                    # Every held message, also those that arrived while the batch ran.
                    now_held = list(self._held.items())
                for job_id, req in now_held:
                    try:
                        if outcome is None or job_id in outcome.requeue:
                            req.reject(requeue=True)
                        elif job_id in outcome.finished:
                            if job_id in given and not self._same_kwargs(given[job_id], req.kwargs):
                                continue  # a different job took the id meanwhile: not the one finished
                            req.acknowledge()
                        else:
                            continue
                        with self._lock:
                            if self._held.get(job_id) is req:
                                del self._held[job_id]
                    except RedisError as err:
                        # Redis refused (out of memory, or gone): the message is still the
                        # broker's, unacked; it stays held and is settled on a later flush.
                        log.warning("could not settle job %s with the broker, kept: %s", job_id, err)
            finally:
                self._clear_inflight()

        return self._pool.apply_async(apply_batches_task, (self, simple, 0, None), callback=on_return)
