"""The window of messages a worker holds, unacked, and how each one is settled.

The worker sees every job it holds (those buffered since the last batch and those held
over from earlier ones), not only the newest flush: the scheduler chooses each GPU batch
from the whole window, so realtime jobs that arrive while a bulk batch runs go next and
a job waits for company at most `max_wait_ms`. A message is acked only once its result
is recorded (`settle`, as soon as that happens, which also frees its prefetch slot),
given back when the runner says so, and held otherwise. Celery runs each ack and
requeue later, on the consumer's event loop, through the transport's QoS
(workers/broker/transport.py), which keeps a Redis that refuses writes from turning
one into an error there: the calls here never fail.

Touched by the consumer thread (new messages), the pool thread (a batch's end) and the
store threads (rows acked as they are recorded): every method takes the lock.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Collection

from celery_batches import SimpleRequest

from workers.pipeline.jobs import Outcome


class HeldMessages:
    def __init__(self) -> None:
        self._held: dict[str, Any] = {}  # by job id: celery Requests
        self._arrivals: list[Any] = []  # held while a batch runs, not yet offered to it
        # Messages sent again after the broker lost its data (workers.broker.resend), until
        # their copies arrive, by job id: their kwargs, and whether the job was finished.
        self._again: dict[str, tuple[Any, bool]] = {}
        self._lock = threading.RLock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def clear(self) -> list[Any]:
        """Forget everything (a new broker connection: the old one's messages cannot be
        acked any more); returns what was held."""
        with self._lock:
            held = list(self._held.values())
            self._held.clear()
            self._arrivals.clear()
            self._again.clear()
        return held

    def expect_again(self, requests: Collection[Any]) -> None:
        """Copies of these messages are on their way back (workers.broker.resend). A job
        finished before its copy arrives (its result may have gone to the Redis that lost
        it) has the copy acked on arrival instead of being admitted, and run, again."""
        with self._lock:
            for req in requests:
                self._again.setdefault(req.id, (req.kwargs, False))

    def _finished(self, job_id: str, kwargs: Any) -> None:
        again = self._again.get(job_id)
        if again is not None and (kwargs is None or same_kwargs(again[0], kwargs)):
            self._again[job_id] = (again[0], True)

    def hold(self, requests: Collection[Any], owns: Callable[[str, Any], bool],
             refuse: Callable[[Any], None], running: bool) -> None:
        """Hold new messages; while a batch runs (`running`) they are also offered to it
        (`take_arrivals`). `owns(id, kwargs)`: whether a job is the one its id's claim
        names; `refuse(request)` records one that is not."""
        with self._lock:
            for req in requests:
                again = self._again.pop(req.id, None)
                if again is not None and again[1] and same_kwargs(again[0], req.kwargs):
                    req.acknowledge()
                    continue
                old = self._held.get(req.id)
                if old is not None and old is not req and not _same_job(old, req):
                    # A different job under a held job's id (a forged message, or a client
                    # that reuses ids): the one its id's claim names keeps it, the other is
                    # refused.
                    loser = old if owns(req.id, req.kwargs) else req
                    refuse(loser)
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
                if running and old is not req:
                    self._arrivals.append(SimpleRequest.from_request(req))
                self._held[req.id] = req

    def start_batch(self) -> list[Any]:
        """Every held message, for a new batch (which sees them all: none is an arrival)."""
        with self._lock:
            self._arrivals.clear()
            return list(self._held.values())

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
            self._finished(job_id, kwargs)
            req = self._held.get(job_id)
            if req is None or not same_kwargs(req.kwargs, kwargs):
                return
            del self._held[job_id]
        req.acknowledge()

    def end_batch(self, outcome: Outcome | None, given: dict[str, Any]) -> None:
        """A batch returned `outcome` (None: it raised, and every held message goes back);
        `given`: the kwargs it was given, by id."""
        with self._lock:
            # Every held message, also those that arrived while the batch ran.
            now_held = list(self._held.items())
            for job_id in outcome.finished if outcome is not None else ():
                self._finished(job_id, given.get(job_id))
        for job_id, req in now_held:
            if outcome is None or job_id in outcome.requeue:
                req.reject(requeue=True)
            elif job_id in outcome.finished:
                if job_id in given and not same_kwargs(given[job_id], req.kwargs):
                    continue  # a different job took the id meanwhile: not the one finished
                req.acknowledge()
            else:
                continue
            with self._lock:
                if self._held.get(job_id) is req:
                    del self._held[job_id]


def same_kwargs(a: Any, b: Any) -> bool:
    def plain(kwargs: Any) -> Any:
        return {k: v for k, v in kwargs.items() if k != "enqueued_at"} if isinstance(kwargs, dict) else kwargs

    return bool(plain(a) == plain(b))


def _same_job(a: Any, b: Any) -> bool:
    return bool(a.args == b.args) and same_kwargs(a.kwargs if isinstance(a.kwargs, dict) else {},
                                                  b.kwargs if isinstance(b.kwargs, dict) else {})
