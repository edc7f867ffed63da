"""celery-batches with one GPU batch in flight and a scheduler-visible window of jobs.

Stock celery-batches hands every flush of its buffer to the pool and acks all of it
when the batch function returns. Here:
- a flush is skipped while a batch runs (with one GPU thread, flushes taken meanwhile
  would queue up as many tiny batches); the buffer keeps filling, bounded by the
  prefetch limit;
- the batch function sees every job this worker holds (newly buffered plus those held
  over from earlier flushes), runs at most one GPU batch, and says which jobs are
  finished (acked) and which must go back to the queue (rejected with requeue); the
  rest stay held, unacked, for the next flush. So the scheduler chooses each GPU batch
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


class GpuBatches(Batches):
    def __init__(self) -> None:
        super().__init__()
        self._inflight = threading.Event()
        self._held: dict[str, Any] = {}
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

    def send_event(self, event_type: str, **fields: Any) -> None:
        eventer = self.eventer
        if eventer is not None:
            eventer.send(event_type, **fields)

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
        self._held.clear()
        for stale in (self._buffer, self._pending):
            list(consume_queue(stale))
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        self.eventer = consumer.event_dispatcher
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

    @staticmethod
    def _same_job(a: Any, b: Any) -> bool:
        def fields(req: Any) -> Any:
            kwargs = req.kwargs if isinstance(req.kwargs, dict) else {}
            return req.args, {k: v for k, v in kwargs.items() if k != "enqueued_at"}

        return bool(fields(a) == fields(b))

    def _clear_inflight(self) -> None:
        self.inflight_since = None
        self._inflight.clear()

    def _dispatch(self, requests: Collection[Any]) -> Any:
        for req in requests:
            old = self._held.get(req.id)
            if old is not None and old is not req and not self._same_job(old, req):
                # A different job under a held job's id (a forged message, or a client that
                # reuses ids): the one its id's claim names keeps it, the other is refused.
                loser = old if self.owns(req.id, req.kwargs) else req
                self.refuse(loser)
                loser.acknowledge()
                if loser is req:
                    continue
            elif old is not None and old is not req and old.message.delivery_tag != req.message.delivery_tag:
                # A second copy of a held job under another delivery tag (a producer sent
                # it again): the new one stands in; acking the old frees its prefetch slot.
                # Redis restores a message past the visibility timeout under its own tag:
                # acking that would delete the broker's only record of the job, and a crash
                # from then on would lose it, so the new delivery just stands in.
                old.acknowledge()
            self._held[req.id] = req
        held = list(self._held.values())
        simple = ([SimpleRequest.from_request(r) for r in held],)

        def on_return(outcome: Outcome | None) -> None:
            try:
                for req in held:
                    if self._held.get(req.id) is not req:
                        continue  # replaced by a newer delivery, or gone with its connection
                    try:
                        if outcome is None or req.id in outcome.requeue:
                            req.reject(requeue=True)
                            self._held.pop(req.id, None)
                        elif req.id in outcome.finished:
                            req.acknowledge()
                            self._held.pop(req.id, None)
                    except RedisError as err:
                        # Redis refused (out of memory, or gone): the message is still the
                        # broker's, unacked; it stays held and is settled on a later flush.
                        log.warning("could not settle job %s with the broker, kept: %s", req.id, err)
            finally:
                self._clear_inflight()

        return self._pool.apply_async(apply_batches_task, (self, simple, 0, None), callback=on_return)
